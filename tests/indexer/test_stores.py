import json

import numpy as np
import pytest

from beit3 import IndexMismatchError, InputDataError
from indexer.stores import open_store, rows_from_vectors
from indexer.stores.faiss_store import build_faiss_index


def clustered(count: int, dim: int, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Unit vectors from a Gaussian mixture (uniform random vectors make ANN recall meaningless)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    points = centres[rng.integers(0, clusters, count)] + 0.35 * rng.normal(size=(count, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def meta(i: int) -> dict:
    sha = f"{i:064x}"
    return {
        "sha256": sha,
        "modality": "image",
        "path": f"/x/{i}.png",
        "paths": [f"/x/{i}.png"],
        "mtimes": [1.0],
        "text": None,
        "size": 10,
        "mtime": 1.0,
        "model_id": "m@1",
    }


def table(start: int, vectors: np.ndarray):
    return rows_from_vectors(
        [meta(start + i) for i in range(len(vectors))], vectors, vectors.shape[1]
    )


@pytest.mark.parametrize(("index_type", "floor"), [("flat", 1.0), ("hnsw", 0.95), ("ivfpq", 0.9)])
def test_faiss_index_types_reach_recall_on_clustered_vectors(index_type, floor):
    data = clustered(3000, 64)
    queries = clustered(100, 64, seed=1)
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    index, built = build_faiss_index(data, index_type)
    assert built == index_type and index.ntotal == 3000
    if index_type == "hnsw":
        index.hnsw.efSearch = 128
    if index_type == "ivfpq":
        import faiss

        faiss.extract_index_ivf(index.base_index).nprobe = 16
        index.k_factor = 8
    _, ids = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    assert recall >= floor, recall


def test_ivfpq_on_a_small_table_is_built_flat():
    index, built = build_faiss_index(clustered(500, 64), "ivfpq")
    assert built == "flat" and index.ntotal == 500


def test_faiss_store_versions_are_switched_atomically_and_pending_chunks_survive(tmp_path):
    data = clustered(300, 64)
    store = open_store(tmp_path, "t", "faiss", dim=64, create=True, index_type="hnsw")
    store.append(table(0, data[:200]))
    store.append(table(200, data[200:250]))
    assert store.count() == 0  # not searchable before the commit
    reopened = open_store(tmp_path, "t", "faiss", dim=64)
    reopened.recover()  # what the next run does after a crash
    assert store.count() == 250
    state = json.loads((tmp_path / "faiss/t/state.json").read_text())
    assert (state["version"], state["built_as"], state["built_on"]) == (1, "hnsw", 250)

    store.append(table(250, data[250:]))  # append only: added to the same graph
    store.commit()
    state = json.loads((tmp_path / "faiss/t/state.json").read_text())
    assert (state["version"], state["count"], state["built_on"]) == (2, 300, 250)
    hit = store.search(data[260:261], k=1)[0][0]
    assert hit.row["sha256"] == meta(260)["sha256"] and hit.score == pytest.approx(1, abs=1e-5)

    updated = meta(5) | {"paths": ["/x/5.png", "/y/5.png"], "mtimes": [1.0, 2.0]}
    store.upsert(rows_from_vectors([updated], data[5:6], 64))
    store.delete([meta(7)["sha256"], meta(299)["sha256"]])
    store.commit()
    assert store.count() == 298
    files = sorted(p.name for p in (tmp_path / "faiss/t").iterdir())
    assert files == [
        "index-3.faiss",
        "lock",
        "meta-3.parquet",
        "pending",
        "state.json",
        "vectors-3.npy",
    ]
    assert list((tmp_path / "faiss/t/pending").iterdir()) == []
    got = store.fetch([meta(5)["sha256"], meta(7)["sha256"]]).to_pylist()
    assert len(got) == 1 and got[0]["paths"] == ["/x/5.png", "/y/5.png"]
    np.testing.assert_allclose(got[0]["vector"], data[5], atol=1e-6)
    hits = store.search(data[8:9], k=3)[0]
    assert hits[0].row["sha256"] == meta(8)["sha256"]
    assert meta(7)["sha256"] not in {h.row["sha256"] for h in store.search(data[7:8], k=20)[0]}


def test_stores_check_dimension_and_names(tmp_path):
    open_store(tmp_path, "t", "lancedb", dim=64, create=True)
    open_store(tmp_path, "f", "faiss", dim=64, create=True)
    with pytest.raises(IndexMismatchError, match="holds 64-d vectors, the model gives 32-d"):
        open_store(tmp_path, "t", "lancedb", dim=32)
    with pytest.raises(IndexMismatchError, match="holds 64-d vectors, the model gives 32-d"):
        open_store(tmp_path, "f", "faiss", dim=32)
    with pytest.raises(InputDataError, match="unknown backend 'milvus'; choose one of lancedb"):
        open_store(tmp_path, "t", "milvus", dim=64)
    with pytest.raises(InputDataError, match="unknown FAISS index type 'ivf'"):
        open_store(tmp_path, "g", "faiss", dim=64, create=True, index_type="ivf")
    with pytest.raises(InputDataError, match="invalid item id"):
        open_store(tmp_path, "t", "lancedb", dim=64).fetch(["x' OR 1=1 --"])


@pytest.mark.parametrize("index_type", ["ivf_flat", "auto"])
def test_lancedb_ivf_index_is_built_at_commit_and_finds_neighbours(tmp_path, index_type):
    from indexer.stores.lance_store import LanceStore

    data = clustered(6000, 64)
    store = LanceStore(
        tmp_path, "t", dim=64, create=True, index_type=index_type, auto_index_rows=5000
    )
    store.append(table(0, data[:4000]))
    store.commit()
    assert not store.has_vector_index()  # 4000 rows: exact search still
    store.append(table(4000, data[4000:]))
    store.commit()
    assert store.has_vector_index()
    queries = data[:50]
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    found = store.search(queries, k=10)
    ids = [[int(m.row["sha256"], 16) for m in matches] for matches in found]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    assert recall >= 0.95, recall
