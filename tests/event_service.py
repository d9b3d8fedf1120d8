"""A service with a durable event handler, for the runner test (``python -m natsrpc.run tests.event_service``)."""

from __future__ import annotations

from natsrpc import Service, event

HANDLED_SUBJECT = "test.handled"


class Receipts(Service):
    """Says on ``test.handled`` which payment it handled (durably)."""

    name = "evreceipts"

    @event("pay.made", durable=True)
    async def on_paid(self, n: int) -> None:
        await self.ctx.client.nc.publish(HANDLED_SUBJECT, str(n).encode())
