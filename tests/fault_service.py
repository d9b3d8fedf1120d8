"""The service the fault tests run as replicas (``python -m natsrpc.run tests.fault_service``)."""

from __future__ import annotations

import asyncio
import os

from natsrpc import Service, rpc


class Work(Service):
    """Works for a given time and says which process did it, so a test can tell the replicas apart."""

    name = "faultwork"

    @rpc
    async def work(self, ms: float) -> int:
        """Sleeps ``ms`` milliseconds, then returns the pid of the replica that served the call."""
        if ms > 0:
            await asyncio.sleep(ms / 1000)
        return os.getpid()
