"""Tests of the example vdb service: upsert, cosine search (best first, top k), delete, count, validation."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import natsrpc
from natsrpc.testing import serve
from services.vdb import VDB, Hit


@pytest_asyncio.fixture
async def vdb(client: natsrpc.Client) -> AsyncIterator[VDB]:
    """The example VDB service, hosted on the test's client."""
    service = VDB()
    async with serve(client, service):
        yield service


@pytest.fixture
def proxy(client: natsrpc.Client, vdb: VDB) -> VDB:
    """A typed proxy of the hosted VDB."""
    return client.proxy(VDB)


def cosine(a: list[float], b: list[float]) -> float:
    """Returns the cosine similarity of two vectors, computed here independently of the service."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.hypot(*a) * math.hypot(*b))


class TestUpsertAndCount:
    """Upserts store vectors by id; count says how many are stored."""

    async def test_count_follows_upserts_and_replacements(self, proxy: VDB, vdb: VDB) -> None:
        """Two new ids count 2; upserting an existing id replaces it without adding one."""
        assert await proxy.count() == 0
        await proxy.upsert("a", [1.0, 0.0, 0.0])
        await proxy.upsert("b", [0.0, 1.0, 0.0], {"tag": "b"})
        assert await proxy.count() == 2
        await proxy.upsert("a", [0.0, 0.0, 1.0], {"tag": "new"})
        assert await proxy.count() == 2
        assert vdb.vectors["a"][0] == [0.0, 0.0, 1.0]
        hits = await proxy.search([0.0, 0.0, 1.0], 1)
        assert hits == [Hit("a", 1.0, {"tag": "new"})]

    async def test_plain_json_callers_can_upsert_and_search(self, client: natsrpc.Client, vdb: VDB) -> None:
        """The untyped sugar (named and positional arguments) works as well as the typed proxy."""
        store = client.call_service["vdb"]
        await store.upsert(id="x", vector=[0.5, 0.5])
        await store.upsert("y", [1.0, 0.0], {"k": "v"})
        hits = await store.search([1.0, 0.0], k=2)
        assert [h["id"] for h in hits] == ["y", "x"]
        assert hits[0] == {"id": "y", "score": 1.0, "metadata": {"k": "v"}}


class TestSearch:
    """Search ranks by cosine similarity, best first, and returns at most k hits."""

    VECTORS = {  # noqa: RUF012 - read-only table
        "east": [1.0, 0.0],
        "north-east": [1.0, 1.0],
        "north": [0.0, 3.0],  # length does not matter for cosine
        "west": [-1.0, 0.0],
    }

    @pytest.fixture
    async def filled(self, proxy: VDB) -> VDB:
        """The proxy, after upserting VECTORS."""
        for id_, vector in self.VECTORS.items():
            await proxy.upsert(id_, vector)
        return proxy

    async def test_ranks_by_cosine_best_first(self, filled: VDB) -> None:
        """All hits come back ordered by cosine similarity, with the scores cosine gives."""
        query = [2.0, 0.5]
        hits = await filled.search(query, k=10)
        expected = sorted(self.VECTORS, key=lambda i: cosine(query, self.VECTORS[i]), reverse=True)
        assert [h.id for h in hits] == expected == ["east", "north-east", "north", "west"]
        for hit in hits:
            assert hit.score == pytest.approx(cosine(query, self.VECTORS[hit.id]))
        assert hits[-1].score == pytest.approx(-cosine([2.0, 0.5], [1.0, 0.0]))

    @pytest.mark.parametrize(("k", "expected"), [(1, 1), (2, 2), (4, 4), (100, 4)], ids=["1", "2", "all", "over"])
    async def test_returns_at_most_k(self, filled: VDB, k: int, expected: int) -> None:
        """k caps the number of hits; a k beyond the store size returns everything."""
        hits = await filled.search([0.0, 1.0], k)
        assert len(hits) == expected
        assert hits[0].id == "north"

    async def test_default_k_is_five(self, proxy: VDB) -> None:
        """Without k, search returns five hits."""
        for i in range(8):
            await proxy.upsert(f"v{i}", [1.0, float(i)])
        assert len(await proxy.search([1.0, 0.0])) == 5

    async def test_empty_store_returns_nothing(self, proxy: VDB) -> None:
        """Searching an empty store returns an empty list, not an error."""
        assert await proxy.search([1.0, 2.0], 3) == []


class TestScan:
    """scan streams every stored vector, in batches."""

    async def test_scan_streams_every_vector(self, client: natsrpc.Client, proxy: VDB) -> None:
        for i in range(250):
            await proxy.upsert(f"v{i}", [1.0, float(i)], {"n": str(i)})
        hits = [hit async for hit in proxy.scan(batch=100)]  # type: ignore[attr-defined]
        assert [h.id for h in hits] == [f"v{i}" for i in range(250)]
        assert all(isinstance(h, Hit) and h.metadata == {"n": h.id[1:]} for h in hits)
        assert [h async for h in client.call_service["vdb"].scan()] == [
            {"id": h.id, "score": 1.0, "metadata": h.metadata} for h in hits
        ]

    async def test_an_empty_store_scans_nothing(self, proxy: VDB) -> None:
        assert [h async for h in proxy.scan()] == []  # type: ignore[attr-defined]

    async def test_a_bad_batch_is_bad_request(self, proxy: VDB) -> None:
        with pytest.raises(natsrpc.BadRequest, match="batch must be >= 1"):
            await anext(aiter(proxy.scan(batch=0)))  # type: ignore[attr-defined]


class TestDelete:
    """Delete removes a vector and says whether it existed."""

    async def test_delete_removes_from_search_and_count(self, proxy: VDB) -> None:
        """A deleted id is no longer found or counted; deleting it again returns False."""
        await proxy.upsert("keep", [1.0, 0.0])
        await proxy.upsert("drop", [1.0, 0.1])
        assert await proxy.delete("drop") is True
        assert await proxy.count() == 1
        assert [h.id for h in await proxy.search([1.0, 0.1], 5)] == ["keep"]
        assert await proxy.delete("drop") is False
        assert await proxy.delete("never-stored") is False


class TestValidation:
    """Bad vectors and bad k are the caller's fault: 400 BadRequest naming the problem."""

    async def test_wrong_dimension_is_bad_request(self, proxy: VDB) -> None:
        """Once the store holds dimension 3, upserting or searching with dimension 2 is a 400."""
        await proxy.upsert("a", [1.0, 2.0, 3.0])
        with pytest.raises(natsrpc.BadRequest) as upsert:
            await proxy.upsert("b", [1.0, 2.0])
        with pytest.raises(natsrpc.BadRequest) as search:
            await proxy.search([1.0, 2.0], 1)
        for error in (upsert.value, search.value):
            assert error.code == 400
            assert "dimension 2" in error.message
            assert "dimension 3" in error.message
        assert await proxy.count() == 1

    async def test_dimension_from_config_applies_before_the_first_upsert(self, client: natsrpc.Client) -> None:
        """With dim = 4 in the config, the very first upsert of dimension 3 is a 400."""
        async with serve(client, VDB(), config={"vdb": {"dim": 4}}):
            proxy = client.proxy(VDB)
            with pytest.raises(natsrpc.BadRequest, match="dimension 3"):
                await proxy.upsert("a", [1.0, 2.0, 3.0])
            await proxy.upsert("a", [1.0, 2.0, 3.0, 4.0])
            assert await proxy.count() == 1

    @pytest.mark.parametrize("k", [0, -1], ids=["zero", "negative"])
    async def test_k_below_one_is_bad_request(self, proxy: VDB, k: int) -> None:
        """k < 1 is a 400 whose message names k."""
        await proxy.upsert("a", [1.0, 0.0])
        with pytest.raises(natsrpc.BadRequest, match="k must be >= 1") as info:
            await proxy.search([1.0, 0.0], k)
        assert info.value.code == 400

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
    async def test_non_finite_components_are_bad_request(self, client: natsrpc.Client, vdb: VDB, bad: float) -> None:
        """NaN and infinite components are refused with 400 (MessagePack can carry them), never stored."""
        proxy = client.proxy(VDB, encoding="msgpack")
        with pytest.raises(natsrpc.BadRequest, match="finite"):
            await proxy.upsert("x", [1.0, bad])
        assert vdb.vectors == {}

    async def test_an_emptied_store_forgets_its_dimension(self, proxy: VDB) -> None:
        """Upsert a 3-vector, delete it: a 256-vector is then accepted (the dimension was only learnt)."""
        await proxy.upsert("a", [1.0, 0.0, 0.0])
        assert await proxy.delete("a")
        await proxy.upsert("b", [1.0] * 256)
        assert await proxy.count() == 1

    async def test_empty_vector_is_bad_request(self, proxy: VDB) -> None:
        """An empty vector is a 400 on upsert and on search."""
        with pytest.raises(natsrpc.BadRequest, match="empty"):
            await proxy.upsert("a", [])
        with pytest.raises(natsrpc.BadRequest, match="empty"):
            await proxy.search([], 1)

    async def test_wrongly_typed_vector_is_bad_request_naming_the_field(self, client: natsrpc.Client, vdb: VDB) -> None:
        """A vector of strings fails argument validation with a 400 that names ``vector``."""
        with pytest.raises(natsrpc.BadRequest, match="vector"):
            await client.call_service["vdb"].upsert(id="a", vector=["x", "y"])
        assert vdb.vectors == {}
