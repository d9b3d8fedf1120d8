"""Events: publish/subscribe between services. ``@event("order.created")`` handles them,
``client.emit("order.created", value)`` and ``self.emit(...)`` publish them on ``evt.<type>``."""

from natsrpc.events.handlers import EventHandler, event

__all__ = ["EventHandler", "event"]
