from __future__ import annotations

import numpy as np

from deployments.semantic_index import SemanticEntry, SemanticIndex, entry_id


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def entry(text: str, vec: np.ndarray, ns: str = "t1", scope: str = "s") -> SemanticEntry:
    return SemanticEntry(entry_id(ns, scope, text), ns, scope, text, vec, 0.0, None)


def test_search_returns_nearest_first_with_cosine() -> None:
    index = SemanticIndex(dim=3)
    index.add(entry("x", unit(1, 0, 0)))
    index.add(entry("xy", unit(1, 1, 0)))
    found = index.search("t1", "s", unit(1, 0.1, 0), k=2)
    assert [e.text for e, _ in found] == ["x", "xy"]
    assert abs(found[0][1] - float(unit(1, 0.1, 0) @ unit(1, 0, 0))) < 1e-3


def test_scopes_and_namespaces_never_mix() -> None:
    index = SemanticIndex(dim=3)
    index.add(entry("x", unit(1, 0, 0), ns="t1"))
    index.add(entry("x", unit(1, 0, 0), ns="t2", scope="s"))
    assert [e.namespace for e, _ in index.search("t2", "s", unit(1, 0, 0), k=5)] == ["t2"]
    assert index.search("t1", "other", unit(1, 0, 0), k=5) == []
    assert index.exact("t1", "s", "x") is not None and index.exact("t3", "s", "x") is None


def test_remove_hides_an_entry_and_compaction_keeps_the_rest() -> None:
    index = SemanticIndex(dim=3)
    rng = np.random.default_rng(0)
    entries = [entry(f"e{k}", unit(*rng.normal(size=3))) for k in range(20)]
    for e in entries:
        index.add(e)
    for e in entries[:10]:  # past the compaction ratio
        assert index.remove(e.id)
    assert not index.remove(entries[0].id)
    assert len(index) == 10
    for e in entries[10:]:
        (best, sim), *_ = index.search("t1", "s", e.vector, k=1)
        assert best.id == e.id and sim > 0.999
    assert {b.id for b, _ in index.search("t1", "s", entries[0].vector, k=20)} == {
        e.id for e in entries[10:]
    }


def test_re_adding_an_id_replaces_the_entry() -> None:
    index = SemanticIndex(dim=3)
    index.add(entry("x", unit(1, 0, 0)))
    index.add(entry("x", unit(0, 1, 0)))
    assert len(index) == 1
    assert len(index.search("t1", "s", unit(1, 0, 0), k=5)) == 1


def test_remove_namespace_and_clear() -> None:
    index = SemanticIndex(dim=3)
    index.add(entry("a", unit(1, 0, 0), ns="t1"))
    index.add(entry("b", unit(1, 0, 0), ns="t2"))
    assert index.remove_namespace("t1") == 1
    assert index.search("t1", "s", unit(1, 0, 0), k=5) == []
    index.clear()
    assert len(index) == 0


def timed(text: str, vec: np.ndarray, created: float, ttl: float | None) -> SemanticEntry:
    return SemanticEntry(entry_id("t1", "s", text), "t1", "s", text, vec, created, ttl)


def test_expire_removes_only_entries_past_their_ttl() -> None:
    index = SemanticIndex(dim=3)
    index.add(timed("short", unit(1, 0, 0), created=100.0, ttl=10.0))
    index.add(timed("long", unit(0, 1, 0), created=100.0, ttl=60.0))
    index.add(timed("forever", unit(0, 0, 1), created=100.0, ttl=None))
    assert index.expire(109.9) == 0
    assert index.expire(110.0) == 1  # expired at created + ttl, as SemanticEntry.expired says
    assert index.exact("t1", "s", "short") is None and len(index) == 2
    assert index.expire(1e12) == 1
    assert [e.text for e, _ in index.search("t1", "s", unit(1, 1, 1), k=5)] == ["forever"]


def test_a_replaced_entry_lives_by_its_new_ttl() -> None:
    index = SemanticIndex(dim=3)
    index.add(timed("x", unit(1, 0, 0), created=100.0, ttl=10.0))
    index.add(timed("x", unit(1, 0, 0), created=105.0, ttl=10.0))  # stored again
    assert index.expire(112.0) == 0
    assert index.exact("t1", "s", "x") is not None
    assert index.expire(115.0) == 1 and len(index) == 0


def test_expire_after_removal_and_clear_is_harmless() -> None:
    index = SemanticIndex(dim=3)
    index.add(timed("a", unit(1, 0, 0), created=0.0, ttl=1.0))
    index.add(timed("b", unit(0, 1, 0), created=0.0, ttl=1.0))
    index.remove(timed("a", unit(1, 0, 0), 0.0, 1.0).id)
    assert index.expire(5.0) == 1
    index.add(timed("c", unit(0, 0, 1), created=0.0, ttl=1.0))
    index.clear()
    assert index.expire(5.0) == 0 and len(index) == 0


def test_a_mass_expiry_leaves_the_survivors_searchable() -> None:
    index = SemanticIndex(dim=3)
    rng = np.random.default_rng(1)
    old = [timed(f"old{k}", unit(*rng.normal(size=3)), 0.0, 10.0) for k in range(200)]
    new = [timed(f"new{k}", unit(*rng.normal(size=3)), 50.0, 10.0) for k in range(20)]
    for e in [*old, *new]:
        index.add(e)
    assert index.expire(30.0) == 200
    assert len(index) == 20
    for e in new:
        (best, sim), *_ = index.search("t1", "s", e.vector, k=1)
        assert best.id == e.id and sim > 0.999
    assert {b.id for b, _ in index.search("t1", "s", new[0].vector, k=50)} == {e.id for e in new}
