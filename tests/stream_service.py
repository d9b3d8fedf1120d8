"""A streaming service for the stream tests, hosted in-process or by ``python -m natsrpc.run tests.stream_service``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec

from natsrpc import Service, ServiceError, current_call, rpc


class Word(msgspec.Struct):
    """A typed stream item."""

    index: int
    text: str


class Streams(Service):
    """Streaming endpoints that count, stall, fail and record how their generators ended."""

    name = "streams"

    def __init__(self) -> None:
        self.yielded = 0  # items produced, over all calls
        self.closed: list[float] = []  # monotonic time each generator's finally ran
        self.cancelled: list[bool] = []  # current_call().cancelled as each generator ended

    @rpc
    async def count(self, n: int, size: int = 0) -> AsyncIterator[int]:
        """Yields 0..n-1 at once (``size`` > 0: yields strings of that many bytes instead, as ints' lengths)."""
        try:
            for i in range(n):
                self.yielded += 1
                yield i
        finally:
            self.closed.append(time.monotonic())

    @rpc
    async def words(self, text: str) -> AsyncIterator[Word]:
        """Yields each word of ``text`` as a typed item."""
        for i, word in enumerate(text.split()):
            yield Word(i, word)

    @rpc
    async def slow(self, n: int = 1_000_000, every: float = 0.01) -> AsyncIterator[int]:
        """Yields 0..n-1, one every ``every`` seconds, recording when it is closed."""
        try:
            for i in range(n):
                await asyncio.sleep(every)
                self.yielded += 1
                yield i
        finally:
            self.closed.append(time.monotonic())
            self.cancelled.append(current_call().cancelled)

    @rpc
    async def fail_after(self, n: int) -> AsyncIterator[int]:
        """Yields n items, then raises a 409."""
        for i in range(n):
            yield i
        raise ServiceError(409, f"stopped after {n}", {"n": n})

    @rpc
    async def big(self, sizes: list[int]) -> AsyncIterator[str]:
        """Yields a string of each size."""
        for size in sizes:
            yield "x" * size

    @rpc
    async def lie(self) -> AsyncIterator[int]:
        """Yields an int, then a string where ints are annotated."""
        yield 1
        yield "two"  # type: ignore[misc]

    @rpc
    async def echo(self, value: str) -> str:
        """A unary endpoint next to the streams."""
        return value
