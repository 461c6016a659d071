"""Searching an index: text or image queries against image or text tables."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image

from beit3 import Checkpoint
from beit3.errors import IndexMismatchError, InputDataError
from beit3.quantize import quantize_checkpoint
from indexer.build import load_index_model
from indexer.embed import encode_images, load_query_image, resolve_device
from indexer.facts import keyword_query
from indexer.filters import Filters
from indexer.manifest import DbManifest, TableInfo, Version
from indexer.rerank import candidate_image, match_probabilities
from indexer.stores import Match, Store, open_store

__all__ = ["MODES", "Filters", "Hit", "Query", "Searcher"]

logger = logging.getLogger(__name__)

Query = str | Path | bytes | BinaryIO | Image.Image
_SHA = re.compile(r"[0-9a-f]{64}")
MODES = ("vector", "keyword", "hybrid")
RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank)
HYBRID_CANDIDATES = 0  # rows of each ranking fused (at least k + offset)


@dataclass(frozen=True)
class Hit:
    """One search result.

    rank: 1-based position in the full ranking (offset + 1 for the first hit of a page);
    score: the mode's ranking score: cosine similarity in [-1, 1] (vector), BM25 (keyword),
    the fused sum of 1 / (60 + rank) (hybrid); id: the content's sha256 (stable across runs);
    path: the image file (None for texts); text: the text (None for images);
    paths: every path (images) or ``file:line`` reference (texts) with this content;
    match: with reranking, the fusion encoder's calibrated probability that the hit matches
    the query (None without reranking);
    similar: with near-duplicate collapse, how many lower hits were folded into this one
    (``indexer.query.collapse_hits``; 0 otherwise).
    """

    rank: int
    score: float
    table: str
    modality: str
    id: str
    path: str | None
    text: str | None
    paths: tuple[str, ...] = ()
    match: float | None = None
    similar: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["paths"] = list(self.paths)
        return data


class Searcher:
    """Search the tables of one database directory.

    Args:
        db: the directory ``beit3 index`` wrote.
        model: a checkpoint directory; default: the one recorded in the index. Either way its
            model id must be the index's.
        device: ``auto``, ``cpu``, ``cuda``...

    Raises:
        InputDataError: ``db`` is not an index.
        IndexMismatchError: ``model`` is not the index's model.
    """

    def __init__(
        self, db: str | Path, model: str | Path | None = None, device: str = "auto"
    ) -> None:
        start = time.perf_counter()
        self.db = Path(db)
        self.device = resolve_device(device)
        self._manifest_key: tuple[int, int] | None = None
        self._checkpoints: dict[tuple[str, str], Checkpoint] = {}  # (model id, encoder)
        self._stores: dict[tuple[str, int | None], Store] = {}
        self._lock = threading.Lock()
        manifest = self._read_manifest()
        if manifest is None or manifest.default_version() is None:
            raise InputDataError(
                f"{self.db} is not a beit3 index (no beit3_index.json); build one "
                "with: beit3 index images FOLDER --db DIR --model CKPT"
            )
        default = manifest.default_version()
        assert default is not None, "checked above"
        given = load_index_model(self.db, model, str(self.device), version=default, action="query")
        self._checkpoints[(given.model_id, "fp32")] = given
        self.checkpoint = self._checkpoint(default)
        self.model_id = self.checkpoint.model_id
        logger.info(
            "opened index %s (%s, tables: %s) in %.1f s",
            self.db,
            self.model_id,
            ", ".join(manifest.searchable()) or "none",
            time.perf_counter() - start,
        )

    # -- tables ------------------------------------------------------------------------------------

    @property
    def manifest(self) -> DbManifest:
        """The manifest as of now (re-read when the file changed: another process committed)."""
        manifest = self._read_manifest()
        assert manifest is not None, "checked at start"
        return manifest

    def _read_manifest(self) -> DbManifest | None:
        path = DbManifest.path_of(self.db)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key != self._manifest_key:
                self._manifest = DbManifest.read(self.db)
                self._manifest_key = key
            return self._manifest

    @property
    def tables(self) -> dict[str, TableInfo]:
        """name -> TableInfo of its active version (count read now); tables whose first
        version is still being built are left out."""
        manifest = self.manifest
        return {
            name: manifest.table_info(name, self._store(name).count())
            for name in manifest.searchable()
        }

    def version_of(self, table: str) -> Version:
        """The active version of ``table`` (what a search of it reads)."""
        manifest = self.manifest
        version = manifest.active(table)
        if version is None:
            known = ", ".join(sorted(manifest.searchable())) or "none"
            if table in manifest.tables:
                raise InputDataError(
                    f"table {table!r} of index {self.db} is still being built (its first "
                    f"indexing run has not finished); its tables: {known}"
                )
            raise InputDataError(f"index {self.db} has no table {table!r}; its tables: {known}")
        return version

    def checkpoint_of(self, table: str) -> Checkpoint:
        """The model of ``table``'s active version (loaded once)."""
        return self._checkpoint(self.version_of(table))

    def _checkpoint(self, version: Version) -> Checkpoint:
        """The model that made ``version``'s vectors: its checkpoint, quantised when the
        version's encoder is int8 (a query must be embedded as the items were)."""
        key = (version.model_id, version.encoder)
        if key not in self._checkpoints:
            with self._lock:
                fp32 = self._checkpoints.get((version.model_id, "fp32")) or load_index_model(
                    self.db, None, str(self.device), version=version, action="query"
                )
                self._checkpoints[(version.model_id, "fp32")] = fp32
                if version.encoder != "fp32":
                    self._checkpoints[key] = quantize_checkpoint(fp32, version.encoder)
        return self._checkpoints[key]

    def _store(self, table: str) -> Store:
        return self._open(self.version_of(table))

    def _open(self, version: Version) -> Store:
        """The store of ``version``, pinned to its last finished commit; a newer commit opens a
        new reader, so a query in flight keeps the state it started with."""
        key = (version.id, version.snapshot)
        store = self._stores.get(key)
        if store is None:
            entry = self.manifest.tables[version.table]
            store = open_store(
                self.db,
                version.store,
                entry["backend"],
                dim=version.dim,
                index_type=entry.get("index_type"),
            )
            store.pin(version.snapshot)
            with self._lock:
                for old in [k for k in self._stores if k[0] == version.id]:
                    del self._stores[old]  # an older snapshot of this version
                self._stores[key] = store
        return store

    def _resolve(self, table: str) -> tuple[Store, Checkpoint]:
        """``table``'s store and model, of one version (an activation between the two reads
        must not pair one version's vectors with another's model)."""
        version = self.version_of(table)
        return self._open(version), self._checkpoint(version)

    # -- queries -----------------------------------------------------------------------------------

    def embed_query(
        self, query: Query, table: str | None = None, version: Version | None = None
    ) -> np.ndarray:
        """A text (``str``) or an image (path, bytes, file object, PIL image) -> (D,) unit vector,
        by the model of ``version`` or of ``table``'s active version (default: the index's)."""
        if version is not None:
            ckpt = self._checkpoint(version)
        else:
            ckpt = self.checkpoint if table is None else self.checkpoint_of(table)
        if isinstance(query, str):
            return self._embed_text(query, ckpt)
        return encode_images(
            ckpt.retrieval_model, self._query_image(query, ckpt)[None], self.device
        )[0]

    def _embed_text(self, query: str, ckpt: Checkpoint) -> np.ndarray:
        if not query.strip():
            raise InputDataError("the text query is empty; type a few words")
        batch = ckpt.tokenizer([query.strip()])
        with torch.inference_mode():
            vector = ckpt.retrieval_model.encode_text(
                batch.text_ids.to(self.device), batch.padding_mask.to(self.device)
            )
        return vector.float().cpu().numpy()[0]

    def _query_image(self, query: Query, ckpt: Checkpoint) -> torch.Tensor:
        """An image query (Path, bytes, file object, PIL image) -> (3, S, S), decoded as the
        indexer decodes."""
        if isinstance(query, bytes):
            query = io.BytesIO(query)
        if isinstance(query, Path | Image.Image) or hasattr(query, "read"):
            return load_query_image(query, ckpt.preprocess)  # type: ignore[arg-type]
        raise InputDataError(
            f"cannot search with a {type(query).__name__}: pass a text (str) or "
            "an image (Path, bytes, file object or PIL image)"
        )

    def search(
        self,
        query: Query,
        table: str,
        k: int = 10,
        offset: int = 0,
        rerank: int = 0,
        min_match: float | None = None,
        *,
        mode: str = "vector",
        filters: Filters | None = None,
        where: str | None = None,
        keyword_text: str | None = None,
    ) -> list[Hit]:
        """The ``k`` best items of ``table`` for ``query``, after skipping ``offset``.

        A ``str`` is a text query; a Path, bytes, file object or PIL image is an image query.

        Args:
            mode: ``vector`` (embedding similarity), ``keyword`` (BM25 over each row's
                ``search_text``: a text table's text; an image's caption plus the words of its
                file name and two folders) or ``hybrid`` (reciprocal rank fusion of the two).
                LanceDB tables only.
            filters: conditions applied before ranking (:class:`indexer.Filters`).
            where: a raw SQL predicate over the row columns, ANDed with ``filters``.
            keyword_text: the words for keyword / hybrid mode; default: a text query itself
                (an image query in those modes needs it).
            rerank: re-score the vector search's top ``rerank`` candidates with the fusion
                encoder (text query -> image table, image query -> text table) and order them
                by match probability; pages are cut from that one reordered list, so a page
                past ``rerank`` items is empty. 0: cosine order, no matcher.
            min_match: with reranking, drop hits whose match probability is below this.

        Raises:
            CheckpointError: reranking with a model that has no matcher.
            InputDataError: bad paging, or reranking a direction that has no image-text pair.
        """
        store, ckpt = self._resolve(table)
        _check_page(k, offset)
        if rerank < 0 or (min_match is not None and not 0.0 <= min_match <= 1.0):
            raise InputDataError(
                f"rerank must be >= 0 and min_match in [0, 1], got {rerank}, {min_match}"
            )
        if min_match is not None and not rerank:
            raise InputDataError("min_match needs reranking: pass rerank (e.g. 32) as well")
        sql = _where_sql(store, mode, filters, where)
        if keyword_text is None and isinstance(query, str):
            keyword_text = query
        if mode == "keyword" and not rerank:
            return self._hits(
                table, _retrieve(store, None, keyword_text, mode, k, offset, sql), offset
            )
        # Decode an image query once: a file object can be read only once.
        query_image = None if isinstance(query, str) else self._query_image(query, ckpt)
        vector = (
            self._embed_text(query, ckpt)  # type: ignore[arg-type]
            if query_image is None
            else encode_images(ckpt.retrieval_model, query_image[None], self.device)[0]
        )
        if not rerank:
            return self._hits(
                table, _retrieve(store, vector, keyword_text, mode, k, offset, sql), offset
            )
        hits = self._hits(table, _retrieve(store, vector, keyword_text, mode, rerank, 0, sql), 0)
        hits = self._rerank(
            query_image if query_image is not None else str(query), table, hits, ckpt
        )
        if min_match is not None:
            hits = [h for h in hits if h.match is not None and h.match >= min_match]
        page = hits[offset : offset + k]
        return [dataclasses.replace(h, rank=offset + i + 1) for i, h in enumerate(page)]

    def _rerank(
        self, query: str | torch.Tensor, table: str, hits: list[Hit], ckpt: Checkpoint
    ) -> list[Hit]:
        """Score (query, hit) pairs with the matcher (``query``: a text, or a decoded image);
        hits ordered by match probability."""
        matcher = ckpt.matcher  # raises "no matcher: fine-tune it with --itm"
        modality = self.manifest.tables[table].get("modality", hits[0].modality if hits else "")
        text_query = isinstance(query, str)
        if text_query == (modality == "text"):
            raise InputDataError(
                "reranking scores image-text pairs: use a text query against an image table "
                f"or an image query against a text table (this is {'text' if text_query else 'image'}"
                f" -> {modality})"
            )
        tokenizer = ckpt.tokenizer
        if isinstance(query, str):
            kept, images = [], []
            for hit in hits:
                image = candidate_image((hit.path, *hit.paths), ckpt.preprocess, hit.path or hit.id)
                if image is not None:
                    kept.append(hit)
                    images.append(image)
            hits = kept
            texts = [query.strip()] * len(hits)
        else:
            images = [query] * len(hits)
            texts = [h.text or "" for h in hits]
        if not hits:
            return []
        match = match_probabilities(matcher, tokenizer, images, texts, self.device)
        scored = [dataclasses.replace(h, match=float(m)) for h, m in zip(hits, match, strict=True)]
        # Stable: equal probabilities keep the vector search's order.
        return sorted(scored, key=lambda h: -(h.match or 0.0))

    def search_vector(
        self,
        vector: np.ndarray,
        table: str,
        k: int = 10,
        offset: int = 0,
        *,
        mode: str = "vector",
        filters: Filters | None = None,
        where: str | None = None,
        keyword_text: str | None = None,
        version: Version | None = None,
    ) -> list[Hit]:
        """Search with a (D,) unit vector of this model (a combined or feedback query).

        ``mode``, ``filters`` and ``where`` are as for :meth:`search`; ``keyword_text`` gives
        the words that ``keyword`` / ``hybrid`` mode match (the text terms of a compositional
        query), required in those modes. ``version``: the table version the vector was made
        for (:meth:`version_of` read before embedding, see :meth:`embed_query`), so that an
        activation in between cannot pair it with another model's rows; default: the active.
        """
        store = self._open(version) if version is not None else self._store(table)
        _check_page(k, offset)
        sql = _where_sql(store, mode, filters, where)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != store.dim:
            raise IndexMismatchError(
                f"query vector has {vector.shape[0]} dims; table {table!r} "
                f"holds {store.dim}-d vectors of {self.version_of(table).model_id}"
            )
        return self._hits(
            table, _retrieve(store, vector, keyword_text, mode, k, offset, sql), offset
        )

    def search_similar(
        self, table: str, item_id: str, target: str, k: int = 10, offset: int = 0
    ) -> list[Hit]:
        """Search ``target`` with the stored vector of item ``item_id`` of ``table`` ("more like
        this"). When ``target`` is ``table`` the item itself is left out of the results."""
        vector = self.get_vector(table, item_id)
        if vector is None:
            raise InputDataError(f"table {table!r} of {self.db} has no item {item_id!r}")
        if target != table:
            return self.search_vector(vector, target, k, offset)
        hits = [h for h in self.search_vector(vector, target, k + 1, offset) if h.id != item_id]
        hits = hits[:k]
        return [
            Hit(offset + i + 1, h.score, h.table, h.modality, h.id, h.path, h.text, h.paths)
            for i, h in enumerate(hits)
        ]

    def get(self, table: str, item_id: str) -> Hit | None:
        """The item ``item_id`` of ``table`` (rank 0, score NaN), or None if it is not there."""
        if not _SHA.fullmatch(item_id):
            return None
        rows = self._store(table).fetch([item_id], with_vectors=False).to_pylist()
        if not rows:
            return None
        return _hit(table, 0, math.nan, rows[0])

    def get_vector(self, table: str, item_id: str) -> np.ndarray | None:
        """The stored (D,) vector of ``item_id``, or None."""
        if not _SHA.fullmatch(item_id):
            return None
        rows = self._store(table).fetch([item_id], with_vectors=True)
        if rows.num_rows == 0:
            return None
        return np.asarray(rows.column("vector")[0].as_py(), dtype=np.float32)

    def get_vectors(self, table: str, item_ids: Sequence[str]) -> np.ndarray:
        """(N, D) float32: the stored vectors of ``item_ids``, in their order.

        Raises:
            InputDataError: an id that ``table`` does not hold.
        """
        rows = self._store(table).fetch(list(dict.fromkeys(item_ids)), with_vectors=True)
        ids, vectors = rows.column("sha256").to_pylist(), rows.column("vector").to_pylist()
        found = dict(zip(ids, vectors, strict=True))
        missing = [i for i in item_ids if i not in found]
        if missing:
            raise InputDataError(f"table {table!r} of {self.db} has no item {missing[0]!r}")
        return np.asarray([found[i] for i in item_ids], dtype=np.float32).reshape(
            len(item_ids), self._store(table).dim
        )

    def _hits(self, table: str, matches: list[Match], offset: int) -> list[Hit]:
        return [_hit(table, offset + i + 1, m.score, m.row) for i, m in enumerate(matches)]


def _where_sql(store: Store, mode: str, filters: Filters | None, where: str | None) -> str | None:
    """Check the mode and the table's columns; the combined SQL predicate (or None)."""
    if mode not in MODES:
        raise InputDataError(f"--mode: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    filters = filters or Filters()
    if where is not None:
        both = where if filters.where is None else f"({filters.where}) AND ({where})"
        filters = dataclasses.replace(filters, where=both)
    if filters.uses_new_columns:
        store.check_columns("filters on file type, size, EXIF date and camera")
    return filters.to_sql()


def _retrieve(
    store: Store,
    vector: np.ndarray | None,
    text: str | None,
    mode: str,
    k: int,
    offset: int,
    where: str | None,
) -> list[Match]:
    """One page of ``mode``'s ranking of ``store``'s rows that match ``where``."""
    try:
        return _ranking(store, vector, text, mode, k, offset, where)
    except ValueError as exc:
        # LanceDB reports a predicate it cannot parse or bind as "Invalid input, ..."
        if where is None or not str(exc).startswith("Invalid input"):
            raise
        reason = str(exc).removeprefix("Invalid input, ").split(". Valid fields")[0]
        raise InputDataError(f"--where: {where!r} is not a valid filter: {reason}") from None


def _ranking(
    store: Store,
    vector: np.ndarray | None,
    text: str | None,
    mode: str,
    k: int,
    offset: int,
    where: str | None,
) -> list[Match]:
    if mode != "vector" and (text is None or not text.strip()):
        raise InputDataError(
            f"{mode} search needs words: give a text query, or keyword_text with an image or "
            "vector query"
        )
    text = keyword_query(text) if text is not None else None
    if mode == "keyword":
        assert text is not None, "checked above"
        return store.search_keyword(text, k, offset, where)
    assert vector is not None, f"{mode} search needs a vector"
    if mode == "hybrid":
        assert text is not None, "checked above"
        return store.search_hybrid(
            vector, text, k, offset, where, rrf_k=RRF_K, candidates=HYBRID_CANDIDATES
        )
    return store.search(vector[None], k, offset, where)[0]


def _hit(table: str, rank: int, score: float, row: dict[str, Any]) -> Hit:
    return Hit(
        rank=rank,
        score=float(score),
        table=table,
        modality=row["modality"],
        id=row["sha256"],
        path=row["path"],
        text=row["text"],
        paths=tuple(row["paths"] or ()),
    )


def _check_page(k: int, offset: int) -> None:
    if k < 1 or offset < 0:
        raise InputDataError(f"k must be >= 1 and offset >= 0, got k={k}, offset={offset}")
