"""LanceDB table on local disk: the embedded default store.

Layout: ``<db>/lancedb/<table>.lance``. Every :meth:`LanceStore.append` is one Lance commit, so a
killed run loses at most the chunk it was writing. Appends from several processes (torchrun ranks)
are compatible commits in Lance's optimistic concurrency; a rare conflict is retried.

Search is exact (brute force, dot product on unit vectors) unless the table has an ANN index
(``index_type``; by default one is built once the table reaches AUTO_INDEX_ROWS rows), which
:meth:`LanceStore.commit` builds or refreshes.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from beit3.errors import IndexMismatchError, InputDataError
from indexer.stores import META_COLUMNS, Match, Store, import_optional, row_schema

__all__ = ["LANCE_INDEX_TYPES", "LanceStore"]

logger = logging.getLogger(__name__)

# Lance ANN index types we expose; None (no index) is exact search.
# "auto" (the default): exact search below AUTO_INDEX_ROWS rows, an IVF_FLAT index above (exact
# search over the cached vectors, LanceStore._cached_rows: 20 ms p50 at 100k x 768 on 2 cores,
# where Lance's own brute force took 0.3-0.56 s, and 2.5 s at 1M; IVF_FLAT with sqrt(N)
# partitions and 32 probes: 6-20 ms at recall@10 1.0, see bench/search_speed.py).
LANCE_INDEX_TYPES = ("auto", "exact", "ivf_flat", "ivf_pq", "ivf_hnsw_sq")
AUTO_INDEX_ROWS = 20_000
_MIN_ROWS_FOR_INDEX = 5_000  # below this, brute force is fast and an IVF index cannot train well
_RETRIES = 8
_IN_CHUNK = 500  # keys per "sha256 IN (...)" filter
_HEX = re.compile(r"[0-9a-f]{1,64}")
# A filtered query over an ANN-indexed table reads the vectors of the matching rows and ranks
# them exactly when they are at most this many (see LanceStore._few_matching and the filtered
# rows of bench/search_speed.py); with more, IVF with the prefilter.
EXACT_FILTER_ROWS = 20_000
# A table without an ANN index is searched exactly over a cached copy of its vectors up to this
# size (170k rows of 768-d); a larger one (index_type "exact") is left to Lance's brute force.
EXACT_CACHE_BYTES = 512 * 2**20
_FTS_COLUMN = "search_text"


class LanceStore(Store):
    """One LanceDB table; see the module docstring."""

    backend = "lancedb"

    def __init__(
        self,
        db: Path,
        table: str,
        *,
        dim: int,
        create: bool = False,
        index_type: str | None = None,
        nprobes: int = 32,
        refine_factor: int | None = None,
        auto_index_rows: int = AUTO_INDEX_ROWS,
        exact_filter_rows: int = EXACT_FILTER_ROWS,
    ) -> None:
        index_type = index_type or "auto"
        if index_type not in LANCE_INDEX_TYPES:
            raise InputDataError(
                f"unknown LanceDB index type {index_type!r}; choose one of "
                f"{', '.join(LANCE_INDEX_TYPES)}"
            )
        self.auto_index_rows = auto_index_rows
        self.exact_filter_rows = exact_filter_rows
        lancedb = import_optional("lancedb", "lancedb")
        self.name = table
        self.dim = dim
        self.index_type = index_type
        self.nprobes = nprobes
        self.refine_factor = refine_factor
        # Strong consistency: a long-lived reader (the app) sees every commit of an indexer
        # running beside it; on local disk the check is one small read per query.
        self._conn = lancedb.connect(
            str(Path(db) / "lancedb"), read_consistency_interval=datetime.timedelta(0)
        )
        try:
            self._table = self._conn.open_table(table)
        except ValueError:
            if not create:
                raise InputDataError(
                    f"{db}: no LanceDB table {table!r}; build it with beit3 index"
                ) from None
            self._table = self._conn.create_table(table, schema=row_schema(dim), exist_ok=True)
        self.columns = [c for c in META_COLUMNS if c in self._table.schema.names]
        field = self._table.schema.field("vector")
        stored_dim = field.type.list_size
        if stored_dim != dim:
            raise IndexMismatchError(
                f"{db}: table {table!r} holds {stored_dim}-d vectors, the model gives {dim}-d; "
                "use another --table or --db"
            )

    def count(self) -> int:
        return self._table.count_rows()

    def snapshot(self) -> int | None:
        return int(self._table.version)

    def pin(self, snapshot: int | None) -> None:
        """Read the table as of ``snapshot`` (a Lance version) from now on; None: the latest."""
        if snapshot is None:
            self._table.checkout_latest()
        else:  # even when it is the latest now: a checked-out table stays there
            self._table.checkout(snapshot)

    def read_meta(self) -> pa.Table:
        if self.count() == 0:
            return row_schema(self.dim).empty_table().select(self.columns)
        return self._table.search().select(self.columns).limit(None).to_arrow()

    def has_vector_index(self) -> bool:
        """Whether the table has an ANN index (the full-text index does not count)."""
        return any(i.index_type != "FTS" for i in self._table.list_indices())

    def missing_columns(self) -> list[str]:
        return [c for c in META_COLUMNS if c not in self.columns]

    def migrate(self, fill: Any) -> None:
        """Rewrite the table with the current schema, the missing columns from ``fill(row)``
        (vectors are kept; the ANN and full-text indexes are rebuilt by the next commit)."""
        missing = self.missing_columns()
        if not missing:
            return
        start = time.perf_counter()
        old = self._table.search().select([*self.columns, "vector"]).limit(None).to_arrow()
        rows = old.select(self.columns).to_pylist()
        for row in rows:
            row.update({c: v for c, v in fill(row).items() if c in missing})
        vectors = (
            old.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
            if old.num_rows
            else np.zeros((0, self.dim), np.float32)
        )
        from indexer.stores import rows_from_vectors

        table = rows_from_vectors(rows, vectors.reshape(-1, self.dim), self.dim)
        self._table = self._conn.create_table(
            self.name, data=table, schema=row_schema(self.dim), mode="overwrite"
        )
        self.columns = list(META_COLUMNS)
        logger.info(
            "migrated table %s (%d rows): added %s in %.1f s",
            self.name,
            len(rows),
            ", ".join(missing),
            time.perf_counter() - start,
        )

    def fetch(self, shas: Sequence[str], with_vectors: bool = True) -> pa.Table:
        columns = self.columns + (["vector"] if with_vectors else [])
        parts = []
        for start in range(0, len(shas), _IN_CHUNK):
            part = shas[start : start + _IN_CHUNK]
            query = self._table.search().where(_in_filter(part)).select(columns).limit(None)
            parts.append(query.to_arrow())
        if not parts:
            return row_schema(self.dim).empty_table().select(columns)
        return pa.concat_tables(parts)

    def append(self, rows: pa.Table) -> None:
        self._retry(lambda: self._table.add(rows))

    def upsert(self, rows: pa.Table) -> None:
        self._retry(
            lambda: (
                self._table.merge_insert("sha256")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(rows)
            )
        )

    def delete(self, shas: Sequence[str]) -> None:
        for start in range(0, len(shas), _IN_CHUNK):
            where = _in_filter(shas[start : start + _IN_CHUNK])
            self._retry(lambda where=where: self._table.delete(where))

    def commit(self) -> None:
        stats = self._table.stats()
        fragments = stats["fragment_stats"]["num_fragments"]
        if fragments > 16:
            start = time.perf_counter()
            self._table.optimize()
            logger.info(
                "compacted %s: %d fragments in %.1f s",
                self.name,
                fragments,
                time.perf_counter() - start,
            )
        self._refresh_fts()
        count = self.count()
        kind = self.index_type
        if kind == "exact":
            return
        if kind == "auto":
            if count < self.auto_index_rows:
                return
            kind = "ivf_flat"
        elif count < _MIN_ROWS_FOR_INDEX:
            logger.info(
                "table %s has %d rows: exact search, no %s index yet", self.name, count, kind
            )
            return
        if self.has_vector_index():
            self._table.optimize()  # adds new rows to the existing index
            return
        start = time.perf_counter()
        # With a config, create_index's first argument is the column (lancedb 0.40).
        self._table.create_index(
            "vector", replace=True, config=lance_index_config(kind, count, self.dim)
        )
        logger.info(
            "built a LanceDB %s index on %d rows in %.1f s",
            kind,
            count,
            time.perf_counter() - start,
        )

    def _refresh_fts(self) -> None:
        """Build the full-text index of ``search_text`` once, then fold new rows into it.

        Rows written after the last build are searched too (Lance scans the unindexed part), and
        deleted rows never come back, so keyword results are right between commits as well."""
        if _FTS_COLUMN not in self.columns or self.count() == 0:
            return
        fts = [i for i in self._table.list_indices() if i.index_type == "FTS"]
        if not fts:
            from lancedb.index import FTS

            # No stemming or stop words: the field is names and file-name words, and a query
            # word must meet the same token ("2041", "1f355", "the").
            self._table.create_index(
                _FTS_COLUMN, config=FTS(stem=False, remove_stop_words=False), replace=True
            )
            logger.info("built the full-text index of %s", self.name)
        elif self._table.index_stats(fts[0].name).num_unindexed_rows:
            self._table.optimize()

    def _tune(self, query: Any, where: str | None) -> Any:
        """Prefilter and ANN settings of a vector (or hybrid) query."""
        if where is not None:
            query = query.where(where, prefilter=True)
        if self.has_vector_index():
            query = query.nprobes(self.nprobes)
            if self.refine_factor:
                query = query.refine_factor(self.refine_factor)
        return query

    def search(
        self, vectors: np.ndarray, k: int, offset: int = 0, where: str | None = None
    ) -> list[list[Match]]:
        results = []
        matching = self._few_matching(where) if where is not None else None
        cached = self._cached_rows() if matching is None else None
        rows = None
        if cached is not None and where is not None:  # the filter picks rows of the copy
            rows = self._cached_matching(cached, where)
        for vector in np.asarray(vectors, dtype=np.float32):
            if matching is not None:
                results.append(self._exact_over(matching, vector, k, offset))
                continue
            if cached is not None:
                results.append(self._exact_cached(cached, vector, k, offset, rows))
                continue
            query = self._table.search(vector, vector_column_name="vector").distance_type("dot")
            query = self._tune(query, where).limit(k).offset(offset)
            table = query.select([*self.columns, "_distance"]).to_arrow()
            distances = table.column("_distance").to_pylist()
            rows = table.select(self.columns).to_pylist()
            # Lance's "dot" distance is 1 - <q, v>; on unit vectors <q, v> is the cosine.
            results.append([Match(1.0 - d, row) for d, row in zip(distances, rows, strict=True)])
        return results

    # Exact search without an ANN index: the rows of the table version, cached in RAM.
    _exact_cache: tuple[int, np.ndarray, pa.Table] | None = None

    def _cached_rows(self) -> tuple[int, np.ndarray, pa.Table] | None:
        """(version, (N, dim) float32 vectors, (N,) metadata rows) of the table as read now, when
        it has no ANN index and its vectors fit in EXACT_CACHE_BYTES; else None (Lance searches).

        Why: Lance's brute force cost 304-559 ms at 100k x 768 here whichever columns it
        returned (one fragment), and any Lance query, a take of 10 rows included, ~10-15 ms even
        at 5k rows; over the cached copy, 20 ms p50 at 100k (bench/search_speed.py --sizes 100k
        --methods faiss-flat,lance-flat, 2026-12-02; memory: 295 MiB for that table). The cache
        is re-read only when the table version changes (one small manifest read per query, as
        before), so a reader still sees every commit."""
        if self.has_vector_index():
            return None
        version = int(self._table.version)
        cache = self._exact_cache
        if cache is not None and cache[0] == version:
            return cache
        self._exact_cache = None
        if self.count() * self.dim * 4 > EXACT_CACHE_BYTES:
            return None
        scan = self._table.search().select([*self.columns, "vector"]).limit(None).to_arrow()
        flat = scan.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
        vectors = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1, self.dim)
        cache = (version, vectors, scan.select(self.columns).combine_chunks())
        self._exact_cache = cache
        return cache

    def _cached_matching(self, cache: tuple[int, np.ndarray, pa.Table], where: str) -> np.ndarray:
        """Positions in the cached copy of the rows matching ``where`` (Lance evaluates the
        predicate over the metadata; no vector is read)."""
        keys = self._table.search().where(where).select(["sha256"]).limit(None).to_arrow()
        wanted = set(keys.column("sha256").to_pylist())
        shas = cache[2].column("sha256").to_pylist()
        return np.asarray([i for i, sha in enumerate(shas) if sha in wanted], dtype=np.int64)

    def _exact_cached(
        self,
        cache: tuple[int, np.ndarray, pa.Table],
        vector: np.ndarray,
        k: int,
        offset: int,
        subset: np.ndarray | None = None,
    ) -> list[Match]:
        _, vectors, meta = cache
        scores = vectors @ vector  # (N,): cosines of unit vectors
        pool = np.arange(len(scores)) if subset is None else subset
        want = min(k + offset, len(pool))
        if want <= 0:
            return []
        partial = want < len(pool)
        top = pool[np.argpartition(-scores[pool], want - 1)[:want]] if partial else pool
        top = top[np.lexsort((top, -scores[top]))][offset:]  # best first, ties by row order
        rows = meta.take(pa.array(top, pa.int64())).to_pylist()
        return [Match(float(scores[i]), row) for i, row in zip(top, rows, strict=True)]

    def _few_matching(self, where: str) -> tuple[list[str], np.ndarray] | None:
        """(keys, (M, dim) vectors) of the rows matching ``where`` when the table has an ANN
        index and they are at most ``exact_filter_rows``; else None (IVF with the prefilter).

        Why: IVF with a selective prefilter probes partitions that hold few matches and loses
        recall, and Lance's own exact search (bypass_vector_index) scans every vector of the
        table (0.6 s at 100k); reading only the matching rows' vectors is both exact and fast."""
        if not self.has_vector_index():
            return None  # Lance's exact search with the prefilter is exact already
        scan = (
            self._table.search()
            .where(where)
            .select(["sha256", "vector"])
            .limit(self.exact_filter_rows + 1)
            .to_arrow()
        )
        if scan.num_rows > self.exact_filter_rows:
            return None
        keys = scan.column("sha256").to_pylist()
        flat = scan.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
        return keys, np.asarray(flat, dtype=np.float32).reshape(-1, self.dim)

    def _exact_over(
        self, matching: tuple[list[str], np.ndarray], vector: np.ndarray, k: int, offset: int
    ) -> list[Match]:
        keys, vectors = matching
        scores = vectors @ vector
        order = np.argsort(-scores, kind="stable")[offset : offset + k]
        picked = [keys[i] for i in order]
        rows = {r["sha256"]: r for r in self.fetch(picked, with_vectors=False).to_pylist()}
        return [Match(float(scores[i]), rows[keys[i]]) for i in order if keys[i] in rows]

    def search_keyword(
        self, text: str, k: int, offset: int = 0, where: str | None = None
    ) -> list[Match]:
        if not self._check_fts():
            return []
        query = self._table.search(text, query_type="fts", fts_columns=_FTS_COLUMN)
        if where is not None:
            query = query.where(where, prefilter=True)
        table = query.limit(k).offset(offset).select([*self.columns, "_score"]).to_arrow()
        scores = table.column("_score").to_pylist()
        rows = table.select(self.columns).to_pylist()
        return [Match(float(s), row) for s, row in zip(scores, rows, strict=True)]

    def search_hybrid(
        self,
        vector: np.ndarray,
        text: str,
        k: int,
        offset: int = 0,
        where: str | None = None,
        rrf_k: int = 60,
        candidates: int = 0,
    ) -> list[Match]:
        from lancedb.rerankers import RRFReranker

        if not self._check_fts():
            return []
        # Each ranking contributes its top max(k + offset, candidates) rows to the fusion.
        want = max(k + offset, candidates)
        matching = self._few_matching(where) if where is not None else None
        if matching is not None:  # the vector half exact over the matches, as in search()
            rankings = (
                self._exact_over(matching, np.asarray(vector, dtype=np.float32), want, 0),
                self.search_keyword(text, want, 0, where),
            )
            return _fuse(rankings, rrf_k)[offset : offset + k]
        hybrid = (
            self._table.search(
                query_type="hybrid", vector_column_name="vector", fts_columns=_FTS_COLUMN
            )
            .vector(np.asarray(vector, dtype=np.float32))
            .text(text)
            .distance_type("dot")
            .rerank(RRFReranker(K=rrf_k))
        )
        table = self._tune(hybrid, where).limit(want).to_arrow()
        table = table.slice(offset, k)
        scores = table.column("_relevance_score").to_pylist()
        rows = table.select(self.columns).to_pylist()
        return [Match(float(s), row) for s, row in zip(scores, rows, strict=True)]

    def _check_fts(self) -> bool:
        """True when there is something to search; raises for a table without the index."""
        self.check_columns("keyword search")
        if self.count() == 0:
            return False
        if not any(i.index_type == "FTS" for i in self._table.list_indices()):
            raise InputDataError(
                f"table {self.name!r} has no full-text index yet (an indexing run did not "
                "finish); re-run beit3 index on it"
            )
        return True

    def _retry(self, write: Any) -> None:
        for attempt in range(_RETRIES):
            try:
                write()
                return
            except (RuntimeError, OSError) as exc:
                if "conflict" not in str(exc).lower() or attempt == _RETRIES - 1:
                    raise
                logger.debug("commit conflict on %s, retrying: %s", self.name, exc)
                time.sleep(0.05 * (attempt + 1))


def _fuse(rankings: Sequence[list[Match]], rrf_k: int) -> list[Match]:
    """Reciprocal rank fusion as LanceDB's RRFReranker computes it: each row scores the sum of
    1 / (rrf_k + rank) over the rankings it is in (rank from 1), best first."""
    scores: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    for ranking in rankings:
        for rank, match in enumerate(ranking, 1):
            key = match.row["sha256"]
            scores[key] = scores.get(key, 0.0) + 1.0 / (rrf_k + rank)
            rows.setdefault(key, match.row)
    order = sorted(scores, key=lambda key: -scores[key])  # stable: vector ranking first
    return [Match(scores[key], rows[key]) for key in order]


def lance_index_config(index_type: str, count: int, dim: int) -> Any:
    """A LanceDB index config sized for ``count`` rows (dot product on unit vectors).

    Partitions ~ sqrt(N) keeps both the k-means training and the per-query scan small; PQ uses
    dim / 16 sub-vectors (48 for 768-d), 8 bits each.
    """
    from lancedb.index import IvfFlat, IvfHnswSq, IvfPq

    partitions = max(1, min(4096, int(math.sqrt(count))))
    if index_type == "ivf_flat":
        return IvfFlat(distance_type="dot", num_partitions=partitions)
    if index_type == "ivf_pq":
        return IvfPq(
            distance_type="dot", num_partitions=partitions, num_sub_vectors=max(1, dim // 16)
        )
    return IvfHnswSq(distance_type="dot", num_partitions=max(1, partitions // 16))


def _in_filter(shas: Sequence[str]) -> str:
    for sha in shas:
        if not _HEX.fullmatch(sha):  # keys are hex digests; anything else must not reach SQL
            raise InputDataError(f"invalid item id {sha!r}: expected a hex sha256")
    return "sha256 IN (" + ", ".join(f"'{sha}'" for sha in shas) + ")"
