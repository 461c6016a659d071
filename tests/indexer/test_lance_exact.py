"""LanceStore exact search over its cached rows (issue 17): Lance's ranking, every commit seen."""

from __future__ import annotations

import numpy as np

from indexer.stores import lance_store, open_store, rows_from_vectors


def _unit(count: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rows(start: int, vectors: np.ndarray):
    meta = [
        {"sha256": f"{start + i:064x}", "modality": "image", "path": f"/x/{start + i}.png"}
        for i in range(len(vectors))
    ]
    return rows_from_vectors(meta, vectors, vectors.shape[1])


def _ranking(store, queries, k=10, offset=0):
    return [
        [(m.row["sha256"], round(m.score, 5)) for m in hits]
        for hits in store.search(queries, k, offset)
    ]


def test_cached_exact_search_equals_lance_and_sees_new_commits(tmp_path, monkeypatch):
    data = _unit(600, 32, seed=0)
    queries = _unit(5, 32, seed=1)
    store = open_store(tmp_path, "t", "lancedb", dim=32, create=True, index_type="exact")
    store.append(_rows(0, data[:500]))
    cached = _ranking(store, queries, offset=3)
    assert store._exact_cache is not None  # the cached path ran
    expected = np.argsort(-(queries @ data[:500].T), axis=1, kind="stable")[:, 3:13]
    assert [[int(s, 16) for s, _ in r] for r in cached] == expected.tolist()
    monkeypatch.setattr(lance_store, "EXACT_CACHE_BYTES", 0)  # Lance's own brute force
    store._exact_cache = None
    assert _ranking(store, queries, offset=3) == cached
    assert store._exact_cache is None
    monkeypatch.undo()

    store.append(_rows(500, data[500:]))  # a new version: the cache is re-read
    hits = store.search(data[550:551], 1)[0]
    assert hits[0].row["sha256"] == f"{550:064x}" and abs(hits[0].score - 1) < 1e-5
    assert hits[0].row["path"] == "/x/550.png"
    assert store.search(queries, 10, offset=600) == [[] for _ in queries]


def test_a_filter_on_a_table_without_an_index_ranks_the_matching_rows_of_the_copy(
    tmp_path, monkeypatch
):
    data = _unit(400, 32, seed=2)
    queries = _unit(3, 32, seed=3)
    store = open_store(tmp_path, "t", "lancedb", dim=32, create=True, index_type="exact")
    store.append(_rows(0, data))
    where = "path LIKE '/x/1%'"  # 1, 10-19, 100-199: 111 rows
    got = [
        [(m.row["sha256"], round(m.score, 5)) for m in h]
        for h in store.search(queries, 7, 2, where)
    ]
    assert store._exact_cache is not None  # the cached path ran
    picked = np.asarray([i for i in range(400) if str(i).startswith("1")])
    order = picked[np.argsort(-(queries @ data[picked].T), axis=1, kind="stable")][:, 2:9]
    assert [[int(s, 16) for s, _ in r] for r in got] == order.tolist()
    monkeypatch.setattr(lance_store, "EXACT_CACHE_BYTES", 0)  # Lance's prefiltered brute force
    store._exact_cache = None
    lance = [
        [(m.row["sha256"], round(m.score, 5)) for m in h]
        for h in store.search(queries, 7, 2, where)
    ]
    assert [[s for s, _ in r] for r in lance] == [[s for s, _ in r] for r in got]
    assert np.allclose(
        [[x for _, x in r] for r in lance], [[x for _, x in r] for r in got], atol=1e-4
    )
