"""Runnable example services: ``python -m natsrpc.run services.kv``."""
