"""Services for the runner tests (``python -m natsrpc.run tests.slow_service``), run in a subprocess."""

from __future__ import annotations

import asyncio

from natsrpc import Service, rpc

STARTED_SUBJECT = "test.started"
WORK_SECONDS = 0.5


class SlowWork(Service):
    """Announces each call on ``test.started`` when it starts, then works for half a second."""

    name = "slowrun"

    @rpc
    async def work(self, n: int, seconds: float = WORK_SECONDS) -> int:
        """Publishes ``n`` on ``test.started``, sleeps ``seconds``, returns ``n``."""
        await self.ctx.client.nc.publish(STARTED_SUBJECT, str(n).encode())
        await asyncio.sleep(seconds)
        return n

    @rpc(idempotent=True)
    async def ping(self) -> str:
        """Returns ``"pong"`` at once (readiness probe)."""
        return "pong"


class Other(Service):
    """A second service in the module, so ``module:Class`` selection can be observed."""

    name = "slowother"

    @rpc(idempotent=True)
    async def ping(self) -> str:
        """Returns ``"other"`` at once."""
        return "other"
