"""A process hosting a durable handler for the kill test: ``python tests/durable_child.py URL``.

Each payment it handles is published on ``test.handled`` (its number) after a short pause; it
prints "ready" on stderr once consuming. JetStream redelivers what it had not acknowledged 1 s
after it died.
"""

from __future__ import annotations

import asyncio
import sys

import natsrpc
from natsrpc import Service, event


class Payments(Service):
    name = "evkill"

    @event("kill.pay", durable=True)
    async def on_paid(self, n: int) -> None:
        await asyncio.sleep(0.002)
        await self.ctx.client.nc.publish("test.handled", str(n).encode())


async def main(url: str) -> None:
    async with (
        natsrpc.connect(url) as client,
        natsrpc.Host(client, [Payments()], max_concurrency=4, event_ack_wait=1.0, heartbeat_interval=0.5),
    ):
        print("ready", file=sys.stderr, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
