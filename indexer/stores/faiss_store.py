"""FAISS index with its metadata beside it.

Layout of ``<db>/faiss/<table>/``::

    state.json            {"version": v, "count", "dim", "index_type", "built_as"}: the commit point
    meta-<v>.parquet      one row per vector (META_COLUMNS), row i = FAISS id i
    vectors-<v>.npy       (count, dim) float32, memory-mapped by readers (for search_similar)
    index-<v>.faiss       IndexFlatIP, IndexHNSWFlat or IVF-PQ (codes only: its candidates are
                          re-ranked exactly from vectors-<v>.npy, read through the memory map)
    pending/*.parquet     chunks written since the last commit (rows, or keys to delete)

Writers only add files under ``pending/`` (each written to a temporary name and renamed), so a
killed run loses at most the chunk in flight and several processes may write at once. Commit
merges the pending chunks into version v + 1, writes every file to a temporary name, renames it,
and switches ``state.json`` last: a crash leaves version v intact, and the next run commits again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from beit3.errors import IndexMismatchError, InputDataError
from indexer.stores import (
    FAISS_INDEX_TYPES,
    META_COLUMNS,
    Match,
    Store,
    import_optional,
    row_schema,
)

__all__ = [
    "COARSE_EF_SEARCH",
    "FaissStore",
    "build_faiss_index",
    "build_ivfpq",
    "search_reranked",
    "set_ivf_search",
]

logger = logging.getLogger(__name__)

LARGE_TABLE_ROWS, LARGE_K_FACTOR = 2_000_000, 96  # see FaissStore
_MIN_ROWS_FOR_IVF = 2_000  # below this an IVF-PQ cannot train; a flat index is exact and fast
_ADD_BLOCK = 65_536


def _faiss() -> Any:
    return import_optional("faiss", "faiss-cpu")


class FaissStore(Store):
    """One FAISS table; see the module docstring.

    Search defaults come from bench/search_speed.py on clustered 768-d vectors (2 cores, one
    FAISS thread): IVF-PQ nprobe 32 with re-ranking of 32 x k candidates gave recall@10 0.988 at
    0.38 ms p50 at 1M (x16: 0.976); at 10M x32 reached 0.916 at any nprobe from 16 and x96 0.956
    (nprobe 24: 4.2 ms p50), so tables above 2M rows re-rank at least 96 x k
    (``LARGE_K_FACTOR``). HNSW efSearch 128 (M=32, efConstruction 40) gave 0.97 at 100k, 0.82
    at 1M.
    """

    backend = "faiss"

    def __init__(
        self,
        db: Path,
        table: str,
        *,
        dim: int,
        create: bool = False,
        index_type: str = "flat",
        nprobe: int = 32,
        ef_search: int = 128,
        k_factor: int = 32,
    ) -> None:
        if index_type not in FAISS_INDEX_TYPES:
            raise InputDataError(
                f"unknown FAISS index type {index_type!r}; choose one of "
                f"{', '.join(FAISS_INDEX_TYPES)}"
            )
        self.name = table
        self.dim = dim
        self.dir = Path(db) / "faiss" / table
        self.pending_dir = self.dir / "pending"
        self.nprobe, self.ef_search, self.k_factor = nprobe, ef_search, k_factor
        self._loaded: tuple[int, pa.Table, np.ndarray, Any] | None = None
        self._keys: dict[str, int] | None = None
        state = self._read_state()
        if state is None:
            if not create:
                raise InputDataError(f"{db}: no FAISS table {table!r}; build it with beit3 index")
            self.pending_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "version": 0,
                "count": 0,
                "dim": dim,
                "index_type": index_type,
                "built_as": "flat",
                "built_on": 0,
            }
            _write_json(self.dir / "state.json", state)
        if state["dim"] != dim:
            raise IndexMismatchError(
                f"{self.dir}: holds {state['dim']}-d vectors, the model gives {dim}-d; "
                "use another --table or --db"
            )
        self.index_type = state["index_type"]

    # -- reading -------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def _load(self) -> tuple[int, pa.Table, np.ndarray, Any]:
        """(version, meta, vectors (mmap), index) of the committed state, cached per version."""
        for attempt in range(3):
            state = self._read_state()
            assert state is not None, f"{self.dir}: state.json vanished"
            version = state["version"]
            if self._loaded is not None and self._loaded[0] == version:
                return self._loaded
            try:
                self._loaded = self._load_version(version)
                self._keys = None
                return self._loaded
            except FileNotFoundError:  # a commit replaced this version while we read it
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _load_version(self, version: int) -> tuple[int, pa.Table, np.ndarray, Any]:
        if version == 0:
            empty = row_schema(self.dim).empty_table().select(list(META_COLUMNS))
            return 0, empty, np.zeros((0, self.dim), np.float32), None
        import pyarrow.parquet as pq

        faiss = _faiss()
        meta = pq.read_table(self.dir / f"meta-{version}.parquet")
        vectors = np.load(self.dir / f"vectors-{version}.npy", mmap_mode="r")
        index = faiss.read_index(str(self.dir / f"index-{version}.faiss"))
        return version, meta, vectors, _to_gpu(index)

    def _key_map(self) -> dict[str, int]:
        _, meta, _, _ = self._load()
        if self._keys is None:
            self._keys = {sha: i for i, sha in enumerate(meta.column("sha256").to_pylist())}
        return self._keys

    def count(self) -> int:
        state = self._read_state()
        return 0 if state is None else int(state["count"])

    def read_meta(self) -> pa.Table:
        return self._load()[1]

    def fetch(self, shas: Sequence[str], with_vectors: bool = True) -> pa.Table:
        _, meta, vectors, _ = self._load()
        keys = self._key_map()
        positions = sorted(keys[s] for s in set(shas) if s in keys)
        rows = meta.take(pa.array(positions, pa.int64()))
        if with_vectors:
            block = np.asarray(vectors[positions], dtype=np.float32).reshape(-1, self.dim)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), self.dim)
            rows = rows.append_column(pa.field("vector", arr.type), arr)
        return rows

    def search(
        self, vectors: np.ndarray, k: int, offset: int = 0, where: str | None = None
    ) -> list[list[Match]]:
        if where is not None:  # no SQL engine over the parquet metadata: refuse, never ignore
            raise InputDataError(self._lacks("filters"))
        _, meta, stored, index = self._load()
        queries = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if index is None or index.ntotal == 0 or offset >= index.ntotal:
            return [[] for _ in queries]
        want = min(k + offset, index.ntotal)
        k_factor = self.k_factor
        if index.ntotal > LARGE_TABLE_ROWS:
            k_factor = max(k_factor, LARGE_K_FACTOR)
        _set_search_params(
            index, nprobe=self.nprobe, ef_search=max(self.ef_search, want), k_factor=k_factor
        )
        if _reranks_from_disk(index):
            scores, ids = search_reranked(index, stored, queries, want, k_factor)
        else:  # flat, HNSW, or an IVF-PQ of an older version with its fp32 copy in RAM (RFlat)
            scores, ids = index.search(queries, want)
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            pairs = [
                (float(s), int(i)) for s, i in zip(row_scores, row_ids, strict=True) if i >= 0
            ][offset:]
            rows = meta.take(pa.array([i for _, i in pairs], pa.int64())).to_pylist()
            results.append([Match(s, row) for (s, _), row in zip(pairs, rows, strict=True)])
        return results

    # -- writing -------------------------------------------------------------------------------

    def append(self, rows: pa.Table) -> None:
        self._write_pending(rows, "rows")

    def upsert(self, rows: pa.Table) -> None:
        self._write_pending(rows, "rows")

    def delete(self, shas: Sequence[str]) -> None:
        if shas:
            self._write_pending(pa.table({"sha256": pa.array(list(shas), pa.string())}), "delete")

    def _write_pending(self, table: pa.Table, kind: str) -> None:
        import pyarrow.parquet as pq

        self.pending_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}.{kind}.parquet"
        tmp = self.pending_dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.pending_dir / name)

    def _pending(self) -> list[Path]:
        if not self.pending_dir.is_dir():
            return []
        return sorted(
            p
            for p in self.pending_dir.iterdir()
            if p.name.endswith(".parquet") and not p.name.startswith(".")
        )

    def recover(self) -> None:
        if self._pending():
            logger.info("%s: merging chunks left by an interrupted run", self.dir)
            self.commit()

    def commit(self) -> None:
        with _locked(self.dir / "lock"):
            pending = self._pending()
            if pending:
                self._commit(pending)

    def _commit(self, pending: list[Path]) -> None:
        import pyarrow.parquet as pq

        start = time.perf_counter()
        version, meta, vectors, index = self._load()
        keys = dict(self._key_map())
        keep = np.ones(meta.num_rows, dtype=bool)
        updates: dict[int, dict[str, Any]] = {}
        added: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
        for path in pending:
            table = pq.read_table(path)
            if path.name.endswith(".delete.parquet"):
                for sha in table.column("sha256").to_pylist():
                    added.pop(sha, None)
                    if sha in keys:
                        keep[keys[sha]] = False
                continue
            vecs = _vectors_of(table, self.dim)
            for i, row in enumerate(table.select(list(META_COLUMNS)).to_pylist()):
                pos = keys.get(row["sha256"])
                if pos is not None and keep[pos]:
                    updates[pos] = row  # same content, same vector: only the metadata changes
                else:
                    added[row["sha256"]] = (row, vecs[i])

        if updates:
            order = np.arange(meta.num_rows)
            extra = pa.Table.from_pylist([updates[p] for p in sorted(updates)], schema=meta.schema)
            order[sorted(updates)] = meta.num_rows + np.arange(len(updates))
            meta = pa.concat_tables([meta, extra]).take(pa.array(order))
        kept_meta = meta.filter(pa.array(keep)) if not keep.all() else meta
        new_meta = pa.Table.from_pylist([r for r, _ in added.values()], schema=meta.schema)
        new_vectors = (
            np.stack([v for _, v in added.values()])
            if added
            else np.zeros((0, self.dim), np.float32)
        )
        all_meta = pa.concat_tables([kept_meta, new_meta])
        count = all_meta.num_rows

        nxt = version + 1
        vec_path = self.dir / f"vectors-{nxt}.npy"
        all_vectors = _write_vectors(vec_path, vectors, keep, new_vectors)
        _write_parquet(all_meta, self.dir / f"meta-{nxt}.parquet")
        state = self._read_state() or {}
        built_as, built_on = state.get("built_as", "flat"), state.get("built_on", 0)
        # Adding to the existing index keeps FAISS ids = row numbers when no row moved; an IVF-PQ
        # is retrained once the table doubled (its lists were fitted to the old data).
        incremental = (
            keep.all()
            and index is not None
            and (
                (built_as == self.index_type and (built_as != "ivfpq" or count <= 2 * built_on))
                or (built_as == "flat" and count < _MIN_ROWS_FOR_IVF)
            )
        )
        if incremental:
            index = _to_cpu(index)
            for block in range(0, len(new_vectors), _ADD_BLOCK):
                index.add(new_vectors[block : block + _ADD_BLOCK])
        else:
            # IVF-PQ: codes only; search re-ranks from the vectors file (memory-mapped).
            index, built_as = build_faiss_index(
                all_vectors, self.index_type, use_memory_refine=False
            )
            built_on = count
        _write_index(index, self.dir / f"index-{nxt}.faiss")
        _write_json(
            self.dir / "state.json",
            {
                "version": nxt,
                "count": count,
                "dim": self.dim,
                "index_type": self.index_type,
                "built_as": built_as,
                "built_on": built_on,
            },
        )
        for path in pending:
            path.unlink(missing_ok=True)
        for name in (f"meta-{version}.parquet", f"vectors-{version}.npy", f"index-{version}.faiss"):
            (self.dir / name).unlink(missing_ok=True)
        logger.info(
            "committed %s: %d rows (+%d, -%d, %d updated) as %s in %.1f s",
            self.name,
            count,
            len(added),
            int((~keep).sum()),
            len(updates),
            built_as,
            time.perf_counter() - start,
        )


def build_faiss_index(
    vectors: np.ndarray,
    index_type: str,
    *,
    hnsw_m: int = 32,
    ef_construction: int = 40,
    nlist: int | None = None,
    pq_m: int | None = None,
    use_memory_refine: bool = True,
) -> tuple[Any, str]:
    """Build an inner-product index over (N, D) unit vectors.

    Args:
        vectors: (N, D) float32 or float16 (may be a memory map: it is read in blocks).
        index_type: ``flat`` (exact), ``hnsw`` (graph, M = ``hnsw_m``) or ``ivfpq`` (inverted lists
            over product-quantised codes; see :func:`build_ivfpq`).
        nlist / pq_m: IVF lists (default ~ 4 sqrt(N)) and PQ sub-quantisers (default D / 16).
        use_memory_refine: IVF-PQ only: keep an fp32 copy of every vector inside the index for
            the exact re-ranking (FAISS RFlat; 3 KiB per 768-d row in RAM). False: codes only,
            and the caller re-ranks with :func:`search_reranked` from its vectors file, as
            :class:`FaissStore` does since issue 17.

    Returns:
        (the CPU index, the kind actually built: an IVF-PQ on fewer than 2,000 rows is flat).
    """
    faiss = _faiss()
    count, dim = vectors.shape
    if index_type == "ivfpq" and count < _MIN_ROWS_FOR_IVF:
        logger.info("only %d rows: a flat index instead of IVF-PQ", count)
        index_type = "flat"
    blocks = (vectors[b : b + _ADD_BLOCK] for b in range(0, count, _ADD_BLOCK))
    if index_type == "ivfpq":
        sample = min(count, max(_ivf_lists(count, nlist) * 40, 65_536))
        rng = np.random.default_rng(0)
        train = vectors[np.sort(rng.choice(count, sample, replace=False))]
        index = build_ivfpq(
            train,
            blocks,
            count=count,
            nlist=nlist,
            pq_m=pq_m,
            use_memory_refine=use_memory_refine,
        )
        return index, index_type
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    for block in blocks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index, index_type


def _ivf_lists(count: int, nlist: int | None) -> int:
    nlist = nlist or max(16, min(65_536, int(4 * math.sqrt(count))))
    return min(nlist, count // 39)  # faiss wants >= 39 training points per list


def build_ivfpq(
    train: np.ndarray,
    blocks: Iterable[np.ndarray],
    *,
    count: int,
    nlist: int | None = None,
    pq_m: int | None = None,
    use_memory_refine: bool = False,
) -> Any:
    """An IVF-PQ trained on ``train`` and filled block by block: no more than one block of
    vectors is in memory at a time (the 10M build of bench/search_speed.py streams them from a
    file).

    Args:
        train: (S, D) training sample (float32 or float16), ideally ~40 x nlist rows.
        blocks: the (n_i, D) vectors to add, in id order (float32 or float16).
        count: the total number of rows (sizes the lists and the codebooks).
        nlist: IVF lists (default ~ 4 sqrt(count), at least 39 training rows each).
        pq_m: PQ sub-quantisers (default D / 16: 48 bytes a 768-d vector).
        use_memory_refine: wrap in FAISS RFlat (an fp32 copy of every vector in RAM).

    Returns:
        ``IVF{nlist}[_HNSW32],PQ{m}x{bits}`` (inner product), or that inside an IndexRefineFlat.
    """
    faiss = _faiss()
    dim = train.shape[1]
    nlist = _ivf_lists(count, nlist)
    pq_m = pq_m or _pq_subquantizers(dim)
    # 8-bit codes need ~39 x 256 training points; small tables get smaller codebooks.
    nbits = max(4, min(8, int(math.log2(count / 39))))
    # Over ~1k lists an HNSW graph on the centroids assigns vectors ~100x faster than a scan.
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 1024 else f"IVF{nlist}"
    refine = ",RFlat" if use_memory_refine else ""
    index = faiss.index_factory(
        dim, f"{coarse},PQ{pq_m}x{nbits}{refine}", faiss.METRIC_INNER_PRODUCT
    )
    ivf = faiss.downcast_index(
        faiss.extract_index_ivf(index.base_index if use_memory_refine else index)
    )
    # Polysemous training (on by default) is ~20x the rest of the training time and only
    # serves Hamming-filtered search, which the exact re-ranking makes pointless.
    ivf.do_polysemous_training = False
    ivf.cp.niter = 10  # k-means iterations for the lists: 25 (default) gains nothing here
    _train(index, np.ascontiguousarray(train, dtype=np.float32))
    for block in blocks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def search_reranked(
    index: Any, vectors: np.ndarray, queries: np.ndarray, k: int, k_factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Search a codes-only IVF-PQ for ``k_factor * k`` candidates, then rank them exactly.

    Args:
        index: an IVF-PQ whose ids are row numbers of ``vectors`` (nprobe already set).
        vectors: (N, D) float32 or float16, typically a memory map: only the candidates' rows are
            read (k_factor * k of them a query), so the full vectors stay on disk.
        queries: (Q, D) float32.
        k: results per query; k_factor: candidates per result.

    Returns:
        (scores (Q, k) float32, ids (Q, k) int64), best first; -1 ids where fewer were found.
    """
    _, candidates = index.search(queries, k * k_factor)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for row, (query, found) in enumerate(zip(queries, candidates, strict=True)):
        found = np.sort(found[found >= 0])  # ascending: the reads go forward through the file
        if not len(found):
            continue
        exact = np.asarray(vectors[found], dtype=np.float32) @ query  # (n,)
        top = np.argsort(-exact, kind="stable")[:k]
        scores[row, : len(top)], ids[row, : len(top)] = exact[top], found[top]
    return scores, ids


def _reranks_from_disk(index: Any) -> bool:
    """A codes-only IVF-PQ (the layout since issue 17), re-ranked by :func:`search_reranked`."""
    faiss = _faiss()
    return isinstance(_to_cpu(index), faiss.IndexIVF)


def _pq_subquantizers(dim: int) -> int:
    for m in (dim // 16, dim // 8, dim // 4, dim // 2, dim):
        if m >= 1 and dim % m == 0:
            return m
    return dim


def _train(index: Any, train: np.ndarray) -> None:
    faiss = _faiss()
    if faiss.get_num_gpus() > 0:  # train the coarse quantizer's k-means on the GPUs
        ivf = faiss.extract_index_ivf(index)
        clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(train.shape[1]))
        ivf.clustering_index = clustering_index
        index.train(train)
        ivf.clustering_index = None
        return
    index.train(train)


# The HNSW graph over the IVF centroids (from 1k lists) finds the lists to probe; at FAISS's
# efSearch (16, or nprobe when larger) it misses some of the nearest lists: at 1M vectors in
# 8,192 lists, nprobe 32 with x32 re-ranking, recall@10 was 0.935 at 16 and 0.969 at 64, 128 and
# 256 alike (0.6 ms more); bench/search_speed.py --coarse-ef measures it.
COARSE_EF_SEARCH = 64


def set_ivf_search(index: Any, nprobe: int, coarse_ef: int = COARSE_EF_SEARCH) -> None:
    """Probe ``nprobe`` lists of the IVF inside ``index``, found by a coarse HNSW graph (when it
    has one) searched at ``max(coarse_ef, nprobe)``."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(coarse_ef, nprobe)


def _set_search_params(index: Any, *, nprobe: int, ef_search: int, k_factor: int) -> None:
    faiss = _faiss()
    cpu = _to_cpu(index) if index is not None else None
    if isinstance(cpu, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search
    elif isinstance(cpu, faiss.IndexRefine):
        index.k_factor = k_factor
        set_ivf_search(index.base_index, nprobe)
    elif isinstance(cpu, faiss.IndexIVF):
        set_ivf_search(index, nprobe)


def _to_gpu(index: Any) -> Any:
    """Move flat / IVF indexes to all GPUs when faiss finds any (HNSW has no GPU version)."""
    faiss = _faiss()
    # HNSW has no GPU version; an IVF-PQ (RFlat or codes only) has an HNSW coarse quantizer
    # over 1k lists, and searching it costs ~1 ms on the CPU, so it stays there too.
    if faiss.get_num_gpus() == 0 or isinstance(
        index, faiss.IndexHNSW | faiss.IndexRefine | faiss.IndexIVFPQ
    ):
        return index
    return faiss.index_cpu_to_all_gpus(index)


def _to_cpu(index: Any) -> Any:
    faiss = _faiss()
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_gpu_to_cpu"):
        with contextlib.suppress(Exception):  # already a CPU index
            return faiss.index_gpu_to_cpu(index)
    return index


def _vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def _write_vectors(path: Path, old: np.ndarray, keep: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Write kept old rows then new rows to ``path`` (via a temporary name); returns a memmap."""
    total = int(keep.sum()) + len(new)
    tmp = path.parent / f".{path.name}.tmp"
    out = np.lib.format.open_memmap(
        tmp,
        mode="w+",
        dtype=np.float32,
        shape=(total, old.shape[1] if old.ndim == 2 else new.shape[1]),
    )
    row = 0
    for start in range(0, len(old), _ADD_BLOCK):
        block = np.asarray(old[start : start + _ADD_BLOCK])[keep[start : start + _ADD_BLOCK]]
        out[row : row + len(block)] = block
        row += len(block)
    out[row:] = new
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _write_parquet(table: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.parent / f".{path.name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_index(index: Any, path: Path) -> None:
    faiss = _faiss()
    tmp = path.parent / f".{path.name}.tmp"
    faiss.write_index(_to_cpu(index), str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
