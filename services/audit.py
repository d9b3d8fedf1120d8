"""The audit service: keeps what memory did (durable ``memory.*`` events), serves the latest.

``python -m natsrpc.run services.audit`` (JetStream needed: the runner's embedded server has it).
"""

from __future__ import annotations

import time
from collections import deque

import msgspec

from natsrpc import Service, ServiceError, current_call, event, rpc
from services.memory import MemoryEvent  # the events' payload, as memory emits it

KEEP = 1000  # entries kept in memory


class Entry(msgspec.Struct):
    """One audited event: its type, the memory id, and when it was handled (epoch seconds)."""

    event: str
    id: str
    at: float


class Audit(Service):
    """Records ``memory.remembered`` and ``memory.forgotten``, durably: none is missed while it is down."""

    name = "audit"
    version = "1.0.0"
    description = "The latest memory events"

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque(maxlen=KEEP)

    @event("memory.*", durable=True)
    async def on_memory(self, change: MemoryEvent) -> None:
        """Keeps one memory event."""
        self.entries.append(Entry(current_call().event_type, change.id, time.time()))

    @rpc(idempotent=True)
    async def recent(self, n: int = 10) -> list[Entry]:
        """Returns the ``n`` latest entries, newest first."""
        if n < 0:
            raise ServiceError(400, f"n must be >= 0, got {n}", type="BadRequest")
        return list(reversed(self.entries))[:n]
