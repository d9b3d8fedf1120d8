"""Checked by mypy (``[tool.mypy] files``): calls through ``client.proxy(Service)`` are typed by the Service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

import natsrpc
from natsrpc import Service, rpc


class Item(msgspec.Struct):
    """A stored item."""

    key: str
    value: str
    version: int = 0


class Store(Service):
    """A service whose signatures the typed proxy must reproduce."""

    name = "store"

    @rpc
    async def put(self, item: Item) -> Item:
        """Stores an item and returns it with its new version."""
        return Item(item.key, item.value, item.version + 1)

    @rpc(idempotent=True)
    async def get(self, key: str) -> Item | None:
        """Returns the item stored under ``key``."""
        return None

    @rpc(name="list")
    async def list_keys(self, prefix: str = "", *, limit: int = 100) -> list[str]:
        """Returns up to ``limit`` keys starting with ``prefix``."""
        return []

    @rpc
    async def clear(self) -> None:
        """Removes every item."""

    @rpc
    async def scan(self, prefix: str = "") -> AsyncIterator[Item]:
        """Streams the items whose keys start with ``prefix``."""
        yield Item(prefix, "")


async def use_store(client: natsrpc.Client) -> None:
    """Calls every endpoint with well-typed arguments and assigns results to annotated variables."""
    store = client.proxy(Store)
    stored: Item = await store.put(Item("a", "1"))
    by_name: Item = await store.put(item=Item(key="b", value="2"))
    found: Item | None = await store.get("a")
    keys: list[str] = await store.list_keys()
    some_keys: list[str] = await store.list_keys("a", limit=10)
    await store.clear()
    fast = client.proxy(Store, timeout=0.5)
    again: Item | None = await fast.get(key=stored.key)
    streamed: list[Item] = [item async for item in store.scan("a")]
    print(stored, by_name, found, keys, some_keys, again, streamed)
