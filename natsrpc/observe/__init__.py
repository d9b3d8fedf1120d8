"""Observability: middleware around every call, and (optional extras) metrics, traces and health.

:mod:`natsrpc.observe.middleware` needs nothing beyond natsrpc. ``natsrpc.observe.metrics``
(``natsrpc[metrics]``), ``natsrpc.observe.health`` and ``natsrpc.observe.tracing``
(``natsrpc[otel]``) import their libraries themselves, so ``import natsrpc`` never needs them.
"""

from natsrpc.observe.middleware import Invocation, Middleware, Observer, compose

__all__ = ["Invocation", "Middleware", "Observer", "compose"]
