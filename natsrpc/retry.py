"""Retries in the style of gRPC A6: which failures to retry, jittered backoff, one deadline, throttling.

:func:`run_with_retries` repeats one call's attempts under a :class:`RetryPolicy` while a shared
:class:`TokenBucket` stops retries when failures pile up (DESIGN.md §4). It does no I/O itself and
takes its clock and sleep as arguments, so tests move a fake clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from random import uniform
from typing import TypeVar

from natsrpc import protocol
from natsrpc.errors import CallTimeout, ConfigurationError, ConnectionLost, DeadlineExceeded, NoResponders, RemoteError

T = TypeVar("T")

MAX_ATTEMPTS = 5
"""The most attempts a policy may allow (gRPC A6 caps ``maxAttempts`` at 5 too)."""

_ALWAYS_RETRIED_CODES = frozenset({protocol.OVERLOADED, protocol.UNAVAILABLE})


def should_retry(exc: BaseException, idempotent: bool) -> bool:
    """Returns whether a failed attempt may be tried again.

    Retried always, because the request was not executed: :class:`~natsrpc.NoResponders` (nobody
    got it), 429 :class:`~natsrpc.Overloaded` and 503 :class:`~natsrpc.Unavailable` (the instance
    refused it before running it). Retried only for idempotent methods, because the request may
    have run: :class:`~natsrpc.CallTimeout` and :class:`~natsrpc.ConnectionLost`. Nothing else is
    retried: other remote errors are answers, and local errors would fail the same way again.

    Args:
        exc: the exception the attempt raised.
        idempotent: whether running the method twice is harmless (``@rpc(idempotent=True)``).
    """
    if isinstance(exc, NoResponders):
        return True
    if isinstance(exc, RemoteError):
        return exc.code in _ALWAYS_RETRIED_CODES
    return idempotent and isinstance(exc, CallTimeout | ConnectionLost)


def _is_transient(exc: BaseException) -> bool:
    """Returns whether a failure is one the token bucket counts: retryable for an idempotent call."""
    return should_retry(exc, idempotent=True)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times to try a call and how long to pause in between.

    The pause before retry ``n`` (1 for the first retry) is drawn from
    ``uniform(0, min(initial_backoff * multiplier ** (n - 1), max_backoff))`` ("full jitter"), as
    gRPC A6 specifies; without jitter it is the upper bound itself.

    Attributes:
        max_attempts: attempts in all, the first included (1 to 5; 1 means no retries).
        initial_backoff: upper bound of the first pause, in seconds.
        max_backoff: cap on the upper bound of any pause, in seconds.
        multiplier: growth of the upper bound per retry.
        jitter: whether to draw the pause at random below the bound.
        random: ``(low, high) -> float`` drawing the jittered pause (``random.uniform``; inject
            a fixed one in tests).

    Raises:
        ConfigurationError: a value is out of range.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: bool = True
    random: Callable[[float, float], float] = field(default=uniform, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            problems.append(f"max_attempts must be in [1, {MAX_ATTEMPTS}], got {self.max_attempts!r}")
        if not self.initial_backoff >= 0:
            problems.append(f"initial_backoff must be >= 0 seconds, got {self.initial_backoff!r}")
        if not self.max_backoff >= self.initial_backoff:
            problems.append(f"max_backoff must be >= initial_backoff, got {self.max_backoff!r}")
        if not self.multiplier >= 1:
            problems.append(f"multiplier must be >= 1, got {self.multiplier!r}")
        if problems:
            raise ConfigurationError("; ".join(problems))

    def backoff_bound(self, retry: int) -> float:
        """Returns the upper bound of the pause before retry number ``retry`` (1-based)."""
        return min(self.initial_backoff * self.multiplier ** (retry - 1), self.max_backoff)

    def backoff(self, retry: int) -> float:
        """Returns the pause before retry number ``retry`` (1-based), jittered if the policy says so."""
        bound = self.backoff_bound(retry)
        return self.random(0.0, bound) if self.jitter else bound


NO_RETRIES = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()
"""A policy that makes one attempt and never retries."""


class TokenBucket:
    """Retry throttling (gRPC A6): a bucket that failures drain and successes refill.

    Every failed attempt that signals trouble (see :func:`should_retry` for an idempotent call)
    takes one token, every successful call adds ``token_ratio``; retries are allowed only while more
    than half the tokens remain. A client shares one bucket per service, so a service that fails
    for everyone stops being hammered with retries while single failures still get theirs.

    Args:
        max_tokens: the bucket's size and starting level.
        token_ratio: tokens a success gives back (0.1: ten successes repay one failure).

    Raises:
        ConfigurationError: a value is out of range.
    """

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if not max_tokens > 0:
            raise ConfigurationError(f"max_tokens must be > 0, got {max_tokens!r}")
        if not token_ratio > 0:
            raise ConfigurationError(f"token_ratio must be > 0, got {token_ratio!r}")
        self.max_tokens = float(max_tokens)
        self.token_ratio = float(token_ratio)
        self._tokens = self.max_tokens

    @property
    def tokens(self) -> float:
        """The tokens left."""
        return self._tokens

    @property
    def allows_retry(self) -> bool:
        """Whether retries may be sent: more than half the tokens remain."""
        return self._tokens > self.max_tokens / 2

    def record_failure(self) -> None:
        """Takes one token for a failed attempt (never below zero)."""
        self._tokens = max(0.0, self._tokens - 1)

    def record_success(self) -> None:
        """Gives back ``token_ratio`` tokens for a successful call (never above ``max_tokens``)."""
        self._tokens = min(self.max_tokens, self._tokens + self.token_ratio)

    def __repr__(self) -> str:
        return f"<TokenBucket {self._tokens:g}/{self.max_tokens:g}>"


MAX_RECOVERIES = 3
"""The most immediate retries one call gets through ``recover`` (see :func:`run_with_retries`)."""

Recover = Callable[[Exception, float], Awaitable[bool]]
"""``recover(error, deadline)``: waits for what makes an immediate retry worth it; returns whether it came."""


async def run_with_retries(
    attempt: Callable[[float], Awaitable[T]],
    *,
    policy: RetryPolicy,
    bucket: TokenBucket | None = None,
    idempotent: bool = False,
    deadline: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    first_error: Exception | None = None,
    recover: Recover | None = None,
) -> T:
    """Runs ``attempt`` until it returns, retrying as the policy and the bucket allow.

    One deadline covers every attempt and pause: each attempt gets the time that is left, no pause
    reaches past the deadline, and no attempt starts without time left.

    Args:
        attempt: makes one attempt; takes the seconds left until the deadline (its timeout).
        policy: attempts and backoff.
        bucket: retry throttling shared across calls; None for no throttling.
        idempotent: whether the method may run twice (allows retries after a timeout).
        deadline: the time on ``clock`` by which the whole call must be done.
        clock: monotonic seconds (inject a fake in tests).
        sleep: the pause between attempts (inject one that moves the fake clock in tests).
        first_error: the error of a first attempt the caller already made (its fast path);
            the retries then start at attempt 2.
        recover: asked first after each failure; when it returns True (it waited, within the
            deadline, for the condition that failed the attempt to pass: a reconnect, the service's
            heartbeat), the call is retried at once, without counting the attempt or spending the
            bucket, at most :data:`MAX_RECOVERIES` times.

    Returns:
        What the first successful attempt returned.

    Raises:
        Exception: the last attempt's error when it may not be retried, the attempts are used up,
            the bucket refuses a retry, or the next pause would cross the deadline.
        DeadlineExceeded: the deadline had passed before the first attempt.
    """
    last_error: Exception | None = first_error
    number = 1  # the attempt that failed last (or is about to run, when nothing failed yet)
    recoveries = 0
    while True:
        if last_error is not None:
            if recover is not None and recoveries < MAX_RECOVERIES and await recover(last_error, deadline):
                recoveries += 1
            else:
                pause = _pause_after(last_error, number, policy, bucket, idempotent, deadline, clock)
                await sleep(pause)
                number += 1
        remaining = deadline - clock()
        if remaining <= 0:
            if last_error is not None:
                raise last_error
            raise DeadlineExceeded("no time left for the call: its deadline passed before the first attempt")
        try:
            result = await attempt(remaining)
        except Exception as exc:
            last_error = exc
        else:
            if bucket is not None:
                bucket.record_success()
            return result


def _pause_after(
    exc: Exception,
    number: int,
    policy: RetryPolicy,
    bucket: TokenBucket | None,
    idempotent: bool,
    deadline: float,
    clock: Callable[[], float],
) -> float:
    """Returns the pause before retrying after attempt ``number`` failed with ``exc``; raises ``exc`` if none."""
    if bucket is not None and _is_transient(exc):
        bucket.record_failure()
    if (
        number >= policy.max_attempts
        or not should_retry(exc, idempotent)
        or (bucket is not None and not bucket.allows_retry)
    ):
        raise exc
    pause = policy.backoff(number)
    if clock() + pause >= deadline:
        raise exc
    return pause
