"""index_images / index_texts: incremental, resumable, sharded embedding into a store.

A run plans before it embeds. It lists the items (files or text lines), reuses the content hash of
every file whose (size, mtime) matches the index, hashes the rest (sha256), and compares the result
with the stored rows: new contents are embedded (once, however many paths share them), rows whose
paths changed get their metadata rewritten, rows nobody points to any more are deleted. Embeddings
stream to the store in chunks of ``chunk_size`` rows, each durable when written, so a killed run
resumes where it stopped: the next run finds those rows and embeds only the rest.

Under torchrun every rank plans the same way (hashing its share of the files), embeds every
world_size-th new content and writes its own chunks; rank 0 applies deletions and commits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from beit3 import Checkpoint, load_checkpoint
from beit3.errors import CheckpointError, IndexMismatchError, InputDataError
from beit3.quantize import QUANTIZE_MODES, quantize_checkpoint
from indexer._dist import DistContext
from indexer.embed import embed_image_files, embed_texts, resolve_device
from indexer.facts import image_facts, row_facts, search_text
from indexer.manifest import (
    DbManifest,
    Version,
    check_table_name,
    manifest_lock,
    now_utc,
    write_lock,
)
from indexer.report import IndexReport
from indexer.sources import MAX_TEXT_CHARS, hash_files, scan_images, scan_texts, sha256_text
from indexer.stores import Store, check_backend, open_store, rows_from_vectors

ENCODERS = ("fp32", *QUANTIZE_MODES)  # how a version's vectors were computed

__all__ = ["ProgressFn", "index_images", "index_texts", "load_index_model"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: ``hash``, ``embed``, ``commit``."""

_FETCH_BLOCK = 4096


def index_images(
    sources: Sequence[str | Path] | str | Path,
    db: str | Path,
    model: str | Path | Checkpoint | None = None,
    *,
    backend: str | None = None,
    table: str = "images",
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    progress: ProgressFn | None = None,
    index_type: str | None = None,
    chunk_size: int = 1024,
    activate: bool = False,
    quantize: str | None = None,
) -> IndexReport:
    """Embed image files into the table ``table`` of the database directory ``db``.

    Args:
        sources: folders (walked recursively), image files, or JSONL / JSON / CSV / TSV
            manifests with an image column (``image``, ``path``, ``file``... see
            ``beit3.data.IMAGE_COLUMNS``; relative paths are relative to the manifest; a text
            column, if there is one, labels the images).
        db: the database directory (created if needed).
        model: a checkpoint directory, or one already loaded (``load_checkpoint``; indexing
            several tables loads it once); None means the model of the table's active version
            (an error if ``db`` is new). A model other than the active version's builds (or
            resumes) another version of the table beside it, re-using the stored content
            hashes; the active version keeps serving until that one is activated.
        backend: ``lancedb`` or ``faiss``; None: the table's, or ``lancedb`` for a new table.
        table: the table name.
        batch_size: images per model call.
        num_workers: DataLoader processes that decode and preprocess (0: in this process).
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:1``...
        progress: called as ``progress(stage, done, total)`` on rank 0. Without it the summary
            line is logged at INFO; with it, the caller shows the returned report.
        index_type: FAISS ``flat`` (default, exact), ``hnsw`` or ``ivfpq``; LanceDB ``auto``
            (default: exact search up to 20k rows, then an IVF_FLAT index), ``exact``,
            ``ivf_flat``, ``ivf_pq`` or ``ivf_hnsw_sq``. Fixed when the table is created.
        chunk_size: rows per write; a killed run loses at most one chunk per rank.
        activate: make the version written the active one when the run finishes (the first
            version of a table always is).
        quantize: ``int8``: embed with the int8 (dynamically quantised) encoder, on the CPU
            (about 2x faster there; bench/model_speed.py). The version records it and queries
            use the same encoder; fp32 and int8 vectors of one model live in separate versions.
            None: the encoder of the version updated (fp32 for a new one).

    Returns:
        The run's counts and the version written; ``str(report)`` is a one-line summary.

    Raises:
        InputDataError: a source does not exist, or ``db`` is new and ``model`` is None.
        IndexMismatchError: ``table`` holds texts, or another backend or index type.
    """
    with _writing(db, table):
        return _Run(
            db,
            model,
            table,
            "image",
            backend,
            index_type,
            device,
            progress,
            chunk_size,
            batch_size,
            activate,
            quantize,
        ).run_images(sources, num_workers)


def index_texts(
    source: str | Path,
    db: str | Path,
    model: str | Path | Checkpoint | None = None,
    *,
    column: str | None = None,
    table: str = "texts",
    backend: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    progress: ProgressFn | None = None,
    index_type: str | None = None,
    chunk_size: int = 4096,
    max_chars: int = MAX_TEXT_CHARS,
    activate: bool = False,
    quantize: str | None = None,
) -> IndexReport:
    """Embed the texts of ``source`` into the table ``table`` of ``db``.

    Args:
        source: a plain text file (one text per line), or a JSONL / JSON / CSV / TSV file.
        column: the JSON field or CSV column; default: the first of ``beit3.data.TEXT_COLUMNS``
            (text, caption, captions, texts, sentence, name, title) present. Tokenizing runs in
            this process (sentencepiece does ~1M short texts a minute): no worker processes.
        max_chars: longer texts are skipped (the model reads only the first 64 tokens anyway).
        Other arguments: as for :func:`index_images`.

    Returns:
        The run's counts. Text items are ``file:line`` references; identical texts are embedded
        once and every reference is kept.
    """
    with _writing(db, table):
        return _Run(
            db,
            model,
            table,
            "text",
            backend,
            index_type,
            device,
            progress,
            chunk_size,
            batch_size,
            activate,
            quantize,
        ).run_texts(source, column, max_chars)


def _writing(db: str | Path, table: str) -> contextlib.AbstractContextManager[None]:
    """The database's writer lock, held by rank 0 for the whole run."""
    if not DistContext().is_main:
        return contextlib.nullcontext()
    return write_lock(db, f"beit3 index into table {table!r}")


def load_index_model(
    db: str | Path,
    model: str | Path | Checkpoint | None,
    device: str = "auto",
    *,
    version: Version | None = None,
    action: str = "given",
) -> Checkpoint:
    """Load ``model`` (a directory, or a loaded Checkpoint moved to ``device``), or with None the
    checkpoint ``version`` records; with both, ``model`` must be ``version``'s model."""
    db = Path(db)
    manifest = DbManifest.read(db)
    if model is None:
        if version is None or manifest is None:
            raise InputDataError(
                f"{db} holds no index yet (no {DbManifest.path_of(db).name}): "
                "pass --model CKPT to choose the model"
            )
        model = manifest.checkpoint_path(db, version)
        if not model.is_dir():
            raise CheckpointError(
                f"version {version.id} of table {version.table!r} of {db} was built with the "
                f"checkpoint {model}, which no longer exists; pass --model with a copy of it "
                f"({version.model_id})"
            )
    if isinstance(model, Checkpoint):
        ckpt = model
        ckpt.model.to(resolve_device(device))
    else:
        ckpt = load_checkpoint(model, device=resolve_device(device))
    ckpt.retrieval_model  # noqa: B018 - raises CheckpointError for another architecture
    if version is not None and manifest is not None:
        manifest.check_model(db, version, ckpt.model_id, action=action)
    return ckpt


@dataclass
class _Found:
    """An item found by this run: its key (path or file:line), content hash, size, mtime, and
    its text (a text item's content; an image's label from a manifest, or None)."""

    key: str
    sha: str
    size: int
    mtime: float
    text: str | None = None


@dataclass
class _Plan:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # sha -> target metadata
    to_embed: list[str] = field(default_factory=list)
    updates: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    new_duplicates: dict[str, list[str]] = field(default_factory=dict)  # new sha -> other keys
    unchanged: int = 0
    duplicates: int = 0
    removed: int = 0


class _Run:
    """One indexing run against one table (see the module docstring)."""

    def __init__(
        self,
        db: str | Path,
        model: str | Path | Checkpoint | None,
        table: str,
        modality: str,
        backend: str | None,
        index_type: str | None,
        device: str,
        progress: ProgressFn | None,
        chunk_size: int,
        batch_size: int,
        activate: bool = False,
        quantize: str | None = None,
    ) -> None:
        self.start = time.perf_counter()
        if chunk_size < 1 or batch_size < 1:
            raise InputDataError(
                f"chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}"
            )
        self.db = Path(db)
        self.table = check_table_name(table)
        self.modality = modality
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.ctx = DistContext()
        self.draws_progress = progress is not None
        self.progress = progress if (progress and self.ctx.is_main) else (lambda *a: None)
        self.device = resolve_device(device)
        self.activate = activate
        manifest = DbManifest.read(self.db)
        self.ckpt = self._load_model(manifest, model)
        self.model_id = self.ckpt.model_id
        self.encoder = self._encoder(manifest, quantize)
        if self.encoder != "fp32":
            self.ckpt = quantize_checkpoint(self.ckpt, self.encoder)
        self.dim = self.ckpt.retrieval_model.embed_dim
        self.report = IndexReport(table=self.table)
        self.store = self._open_table(backend, index_type)
        # the hashes a new version re-uses: the active version's rows (unchanged files are
        # not hashed again)
        self.known: Store | None = None
        active = self.manifest.active(self.table)
        if active is not None and active.id != self.version.id:
            entry = self.manifest.tables[self.table]
            self.known = open_store(
                self.db,
                active.store,
                entry["backend"],
                dim=active.dim,
                index_type=entry.get("index_type"),
            )

    def _load_model(
        self, manifest: DbManifest | None, model: str | Path | Checkpoint | None
    ) -> Checkpoint:
        """The run's model: ``model``, or without it the table's active (or newest) version's,
        or for a new table the one model of the database."""
        if model is not None or manifest is None:
            return load_index_model(self.db, model, str(self.device))
        versions = manifest.table_versions(self.table)
        version = manifest.active(self.table) or (versions[-1] if versions else None)
        return load_index_model(
            self.db, None, str(self.device), version=version or manifest.default_version()
        )

    def _encoder(self, manifest: DbManifest | None, quantize: str | None) -> str:
        """``quantize``, or without it the encoder of the version this model updates."""
        if quantize is not None:
            if quantize not in ENCODERS:
                raise InputDataError(
                    f"--quantize: unknown mode {quantize!r}; choose one of {', '.join(ENCODERS)}"
                )
            return quantize
        versions = manifest.table_versions(self.table) if manifest is not None else []
        active = manifest.active(self.table) if manifest is not None else None
        mine = [v for v in [active, *reversed(versions)] if v and v.model_id == self.model_id]
        return mine[0].encoder if mine else "fp32"

    def _target_version(self, manifest: DbManifest) -> Version:
        """The version this run writes: the table's active one when it has this model and
        encoder, else the newest version with them (resumed), else a new one."""
        active = manifest.active(self.table)
        ours = (self.model_id, self.encoder)
        if active is not None and (active.model_id, active.encoder) == ours:
            return active
        mine = [v for v in manifest.table_versions(self.table) if (v.model_id, v.encoder) == ours]
        if mine:
            return mine[-1]
        version = manifest.new_version(
            self.db, self.table, self.model_id, self.ckpt.path, self.dim, encoder=self.encoder
        )
        if active is not None:
            logger.info(
                "table %s: building version %s with %s beside the active %s (%s)",
                self.table,
                version.id,
                self.model_id,
                active.id,
                active.model_id,
            )
        return version

    def _open_table(self, backend: str | None, index_type: str | None) -> Store:
        if backend is not None:
            check_backend(backend)
        with manifest_lock(self.db):
            manifest = DbManifest.read(self.db) or DbManifest()
            entry = manifest.tables.get(self.table)
            if entry is not None:
                if entry["modality"] != self.modality:
                    raise IndexMismatchError(
                        f"table {self.table!r} of {self.db} holds {entry['modality']}s, not "
                        f"{self.modality}s; choose another --table"
                    )
                if backend is not None and backend != entry["backend"]:
                    raise IndexMismatchError(
                        f"table {self.table!r} of {self.db} is a {entry['backend']} table, not "
                        f"{backend}; drop --backend or choose another --table"
                    )
                if index_type is not None and index_type != entry.get("index_type"):
                    raise IndexMismatchError(
                        f"table {self.table!r} of {self.db} has index type "
                        f"{entry.get('index_type')}, not {index_type}; drop the option or "
                        "choose another --table"
                    )
                backend, index_type = entry["backend"], entry.get("index_type")
            backend = backend or "lancedb"
            index_type = index_type or ("flat" if backend == "faiss" else "auto")
            if entry is None:
                entry = {"modality": self.modality, "backend": backend, "active": None}
                manifest.tables[self.table] = entry
            entry["index_type"] = index_type
            self.version = self._target_version(manifest)
            if not manifest.checkpoint_path(self.db, self.version).is_dir():
                self.version.checkpoint = os.path.relpath(
                    Path(self.ckpt.path).absolute(), self.db.absolute()
                )  # the recorded copy moved
                self.version.checkpoint_absolute = str(Path(self.ckpt.path).absolute())
                manifest.put_version(self.version)
            if self.ctx.is_main:
                manifest.write(self.db)
        self.manifest = manifest
        self.report.version = self.version.id
        name = self.version.store
        if self.ctx.is_main:
            store = open_store(
                self.db, name, backend, dim=self.dim, create=True, index_type=index_type
            )
            store.recover()
            if store.missing_columns():  # an index from before keyword search and filters
                store.migrate(row_facts)
        self.ctx.barrier()
        if not self.ctx.is_main:
            store = open_store(self.db, name, backend, dim=self.dim, index_type=index_type)
        return store

    def _finish(self) -> None:
        """Record the commit in the manifest (readers move to it) and activate the version when
        asked, or when the table has none active yet."""
        snapshot, count = self.store.snapshot(), self.store.count()
        with manifest_lock(self.db):
            manifest = DbManifest.read(self.db) or self.manifest
            if self.version.id not in manifest.versions:
                raise InputDataError(
                    f"version {self.version.id} of {self.db} was removed while this run wrote it"
                )
            version = manifest.version(self.version.id)
            version.snapshot, version.count = snapshot, count
            version.committed = now_utc()
            manifest.put_version(version)
            entry = manifest.tables[self.table]
            if self.activate or entry.get("active") is None:
                self.report.activated = entry.get("active") != version.id
                entry["active"] = version.id
            manifest.write(self.db)
        self.manifest, self.version = manifest, version

    # -- the two kinds of input ------------------------------------------------------------------

    def run_images(
        self, sources: Sequence[str | Path] | str | Path, num_workers: int
    ) -> IndexReport:
        scan = scan_images(sources)
        stored = self._stored()
        known = self._stored(self.known) if self.known is not None else []
        by_path = {
            p: (r["sha256"], r["size"], mt)
            for r in known + stored
            for p, mt in zip(r["paths"], r["mtimes"], strict=True)
        }
        # a new version keeps the active version's captions (from the manifest that labelled
        # them) for files this run's sources do not label
        for row in known:
            for path in row["paths"] if row["text"] else ():
                scan.labels.setdefault(path, row["text"])
        found: list[_Found] = []
        to_hash = []
        for item in scan.items:
            seen = by_path.get(item.path)
            if seen is not None and seen[1] == item.size and seen[2] == item.mtime:
                found.append(
                    _Found(item.path, seen[0], item.size, item.mtime, scan.labels.get(item.path))
                )
            else:
                to_hash.append(item)
        self.progress("hash", 0, len(to_hash))
        mine = self.ctx.shard(list(range(len(to_hash))))
        hashes = dict(zip(mine, hash_files([to_hash[i].path for i in mine]), strict=True))
        for part in self.ctx.all_gather(hashes):
            hashes.update(part)
        self.progress("hash", len(to_hash), len(to_hash))
        skipped = list(scan.skipped)
        for i, item in enumerate(to_hash):
            digest = hashes[i]
            if isinstance(digest, tuple):
                skipped.append((item.path, digest[1]))
            else:
                found.append(
                    _Found(item.path, digest, item.size, item.mtime, scan.labels.get(item.path))
                )
        found.sort(key=lambda f: f.key)
        plan = _plan(
            found,
            stored,
            modality="image",
            model_id=self.model_id,
            in_scope=scan.in_scope,
            still_exists=os.path.exists,
            refresh_mtime=True,
        )
        self._apply(
            plan,
            skipped,
            len(found) + len(skipped),
            lambda shard: self._embed_images(plan, shard, num_workers),
        )
        return self.report

    def run_texts(self, source: str | Path, column: str | None, max_chars: int) -> IndexReport:
        scan = scan_texts(source, column, max_chars)
        found = sorted(
            (
                _Found(t.ref, sha256_text(t.text), len(t.text.encode("utf-8")), scan.mtime, t.text)
                for t in scan.items
            ),
            key=lambda f: f.key,
        )
        plan = _plan(
            found,
            self._stored(),
            modality="text",
            model_id=self.model_id,
            in_scope=scan.in_scope,
            still_exists=lambda ref: os.path.exists(ref.rpartition(":")[0]),
            refresh_mtime=False,
        )
        self._apply(
            plan,
            list(scan.skipped),
            len(found) + len(scan.skipped),
            lambda shard: self._embed_texts(plan, shard),
        )
        return self.report

    # -- shared steps ------------------------------------------------------------------------------

    def _stored(self, store: Store | None = None) -> list[dict[str, Any]]:
        meta = (store or self.store).read_meta()
        wanted = ["sha256", "paths", "mtimes", "size", "text", "width", "height", "taken", "camera"]
        return meta.select([c for c in wanted if c in meta.column_names]).to_pylist()

    def _apply(
        self,
        plan: _Plan,
        skipped: list[tuple[str, str]],
        seen: int,
        embed: Callable[[list[str]], list[tuple[str, str]]],
    ) -> None:
        self.ctx.barrier()  # every rank has read the stored rows before anyone writes
        if self.ctx.is_main:
            self._write_metadata_changes(plan)
        shard = self.ctx.shard(plan.to_embed)
        failures: list[tuple[str, str]] = []
        for part in self.ctx.all_gather(embed(shard)):
            failures.extend(part)
        self.ctx.barrier()
        if self.ctx.is_main:
            self.progress("commit", 0, 1)
            self.store.commit()
            self._finish()
            self.progress("commit", 1, 1)
        self.ctx.barrier()

        report = self.report
        report.seen = seen
        report.unchanged, report.duplicates, report.removed = (
            plan.unchanged,
            plan.duplicates,
            plan.removed,
        )
        report.skipped_reasons = list(skipped)
        for sha, reason in failures:
            first = plan.rows[sha]["paths"][0]
            others = plan.new_duplicates.get(sha, [])
            report.duplicates -= len(others)
            report.skipped_reasons.extend((key, reason) for key in [first, *others])
        report.indexed = len(plan.to_embed) - len(failures)
        report.skipped = len(report.skipped_reasons)
        report.elapsed_s = time.perf_counter() - self.start
        if self.ctx.is_main:
            for where, reason in report.skipped_reasons:
                logger.warning("skipped %s: %s", where, reason)
            if not self.draws_progress:  # a front end that draws progress prints the report
                logger.info("%s", report)
        assert report.seen == (
            report.indexed + report.unchanged + report.duplicates + report.skipped
        ), f"inconsistent counts: {report}"

    def _write_metadata_changes(self, plan: _Plan) -> None:
        """Deletions, then rows whose paths changed (their stored vectors are reused)."""
        if plan.deletes:
            self.store.delete(plan.deletes)
        for start in range(0, len(plan.updates), _FETCH_BLOCK):
            shas = plan.updates[start : start + _FETCH_BLOCK]
            old = self.store.fetch(shas, with_vectors=True)
            order = old.column("sha256").to_pylist()
            vectors = (
                old.column("vector")
                .combine_chunks()
                .values.to_numpy(zero_copy_only=False)
                .reshape(-1, self.dim)
            )
            self.store.upsert(rows_from_vectors([plan.rows[s] for s in order], vectors, self.dim))
        if plan.deletes or plan.updates:
            logger.info(
                "%s: %d rows deleted, %d rows with changed paths",
                self.table,
                len(plan.deletes),
                len(plan.updates),
            )

    def _embed_images(
        self, plan: _Plan, shard: list[str], num_workers: int
    ) -> list[tuple[str, str]]:
        paths = [plan.rows[sha]["path"] for sha in shard]
        writer = _ChunkWriter(self.store, plan, self.dim, self.chunk_size)
        failures: list[tuple[str, str]] = []
        done = 0
        self.progress("embed", 0, len(shard))
        batches = embed_image_files(
            self.ckpt.retrieval_model,
            self.ckpt.preprocess,
            paths,
            batch_size=self.batch_size,
            num_workers=num_workers,
            device=self.device,
        )
        for batch in batches:
            writer.add([shard[p] for p in batch.positions], batch.vectors)
            failures.extend((shard[p], reason) for p, reason in batch.failures)
            done += len(batch.positions) + len(batch.failures)
            self.progress("embed", done, len(shard))
        writer.flush()
        return failures

    def _embed_texts(self, plan: _Plan, shard: list[str]) -> list[tuple[str, str]]:
        texts = [plan.rows[sha]["text"] for sha in shard]
        writer = _ChunkWriter(self.store, plan, self.dim, self.chunk_size)
        done = 0
        self.progress("embed", 0, len(shard))
        for vectors in embed_texts(
            self.ckpt.retrieval_model,
            self.ckpt.tokenizer,
            texts,
            batch_size=self.batch_size,
            device=self.device,
        ):
            writer.add(shard[done : done + len(vectors)], vectors)
            done += len(vectors)
            self.progress("embed", done, len(shard))
        writer.flush()
        return []


class _ChunkWriter:
    """Buffers new rows and appends them to the store every ``chunk_size`` rows."""

    def __init__(self, store: Store, plan: _Plan, dim: int, chunk_size: int) -> None:
        self.store, self.plan, self.dim, self.chunk_size = store, plan, dim, chunk_size
        self.shas: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.buffered = 0

    def add(self, shas: list[str], vectors: np.ndarray) -> None:
        if not shas:
            return
        self.shas.extend(shas)
        self.vectors.append(vectors)
        self.buffered += len(shas)
        if self.buffered >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self.shas:
            return
        vectors = np.concatenate(self.vectors)
        for start in range(0, len(self.shas), self.chunk_size):
            shas = self.shas[start : start + self.chunk_size]
            for sha in shas:
                row = self.plan.rows[sha]
                if row["modality"] == "image" and row.get("width") is None:
                    row.update(image_facts(row["path"]))  # the header only: no pixels
            rows = rows_from_vectors(
                [self.plan.rows[s] for s in shas],
                vectors[start : start + self.chunk_size],
                self.dim,
            )
            self.store.append(rows)
        self.shas, self.vectors, self.buffered = [], [], 0


def _plan(
    found: list[_Found],
    stored: list[dict[str, Any]],
    *,
    modality: str,
    model_id: str,
    in_scope: Callable[[str], bool],
    still_exists: Callable[[str], bool],
    refresh_mtime: bool,
) -> _Plan:
    """Compare what this run found (sorted by key) with the stored rows.

    A stored key that this run found again follows the file's current content; a stored key in
    the run's scope that was not found is removed; a stored key outside the scope is kept while
    it exists (another folder, indexed by another run).
    """
    plan = _Plan()
    stored_by_sha = {r["sha256"]: r for r in stored}
    stored_keys = {
        k: (r["sha256"], mt) for r in stored for k, mt in zip(r["paths"], r["mtimes"], strict=True)
    }
    target: dict[str, dict[str, float]] = {}
    first: dict[str, _Found] = {}
    found_keys = set()
    for item in found:
        found_keys.add(item.key)
        previous = stored_keys.get(item.key)
        mtime = item.mtime
        if previous is not None and previous[0] == item.sha:
            plan.unchanged += 1
            mtime = item.mtime if refresh_mtime else previous[1]
        elif item.sha in stored_by_sha or item.sha in target:
            plan.duplicates += 1
            if item.sha not in stored_by_sha:
                plan.new_duplicates.setdefault(item.sha, []).append(item.key)
        target.setdefault(item.sha, {})[item.key] = mtime
        first.setdefault(item.sha, item)
    for row in stored:
        for key, mtime in zip(row["paths"], row["mtimes"], strict=True):
            if key in found_keys:
                continue
            if in_scope(key) or not still_exists(key):
                plan.removed += 1
            else:
                target.setdefault(row["sha256"], {})[key] = mtime

    for sha, keys in target.items():
        paths = sorted(keys)
        mtimes = [keys[p] for p in paths]
        source = first.get(sha)
        old = stored_by_sha.get(sha)
        plan.rows[sha] = {
            "sha256": sha,
            "modality": modality,
            "path": paths[0] if modality == "image" else None,
            "paths": paths,
            "mtimes": mtimes,
            "text": source.text if source is not None else (old or {}).get("text"),
            "size": source.size if source is not None else (old or {}).get("size"),
            "mtime": mtimes[0],
            "model_id": model_id,
        }
        row = plan.rows[sha]
        if modality == "image":
            row["search_text"] = search_text(paths, row["text"])
            row["ext"] = row_facts(row, read_image=False)["ext"]
            for name in ("width", "height", "taken", "camera"):  # same content, same facts
                row[name] = (old or {}).get(name)
        else:
            row["search_text"] = row["text"] or ""
        if old is None:
            plan.to_embed.append(sha)
        elif (old["paths"], old["mtimes"], old.get("text")) != (
            paths,
            mtimes,
            plan.rows[sha]["text"],
        ):
            plan.updates.append(sha)
    plan.deletes = [sha for sha in stored_by_sha if sha not in target]
    return plan
