"""The HTTP search service (``beit3 serve``): :class:`indexer.Searcher` over FastAPI.

Endpoints (OpenAPI at ``/docs``)::

    GET  /healthz                       {"status": "ok", "model_id": ..., "tables": N}
    GET  /tables                        [{name, modality, count, model_id, version, ...}]
    POST /search                        JSON: query words (or the query syntax) | item id
    POST /search/image                  multipart: file (the image) + params (JSON options)
    GET  /items/{table}/{id}            an item's metadata
    GET  /items/{table}/{id}/image      the indexed file's bytes (nothing else on disk)
    GET  /metrics                       Prometheus text

Safe by default: ``serve`` binds 127.0.0.1; another address needs a token, and with a token
every request without ``Authorization: Bearer <token>`` gets 401. Every bad request gets a 4xx
with ``{"error": "<one line naming the field>"}``; anything unexpected is a 500 with a generic
line, and its traceback goes to the server log only.

Paging: an ``offset`` past the end of a table gives 200 with no hits (a page of a ranking that
is shorter than asked), as the library does: a client pages until a short page, and the table
may grow between two pages while an indexer runs.

Threads: uvicorn runs these sync endpoints in its thread pool. Model forwards (query embedding,
image decoding for it, reranking) run one at a time under a lock: on CPU, parallel forwards
only fight for the same cores (and Pillow's decompression-bomb guard in ``beit3.transforms``
uses ``warnings.catch_warnings``, which is process-global). Store reads run in parallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import mimetypes
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app._ui import DEFAULT_MAX_UPLOAD_MB
from beit3.errors import Beit3Error, CheckpointError, IndexMismatchError, InputDataError

__all__ = ["DEFAULT_MAX_UPLOAD_MB", "SearchService", "create_app", "run_server"]

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 256 * 1024  # any body but an upload
MULTIPART_SLACK = 64 * 1024  # form boundaries and the params part, beyond the image itself
MAX_QUERY_CHARS = 1000
MAX_K = 1000
MAX_OFFSET = 100_000
MAX_RERANK = 500
MAX_FEEDBACK = 100
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ID = re.compile(r"[0-9a-f]{64}")
_TABLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# The library's messages name CLI options; the API's fields have other names.
_FIELD_OF_OPTION = {
    "--mode": "mode",
    "--where": "where",
    "--type": "filters.types",
    "--camera": "filters.camera",
    "keyword_text": "keywords",
    **{
        f"--{name.replace('_', '-')}": f"filters.{name}"
        for name in (
            "modified_after",
            "modified_before",
            "taken_after",
            "taken_before",
            "min_width",
            "max_width",
            "min_height",
            "max_height",
        )
    },
}

Finite = Annotated[float, Field(allow_inf_nan=False)]
Id = Annotated[str, Field(max_length=64)]


class FilterFields(BaseModel):
    """:class:`indexer.Filters` as JSON (dates: ``YYYY-MM-DD[THH:MM[:SS]]`` or epoch seconds)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    under: list[Annotated[str, Field(max_length=4096)]] = Field([], max_length=50)
    types: list[Annotated[str, Field(max_length=16)]] = Field([], max_length=50)
    modified_after: Annotated[str, Field(max_length=64)] | Finite | None = None
    modified_before: Annotated[str, Field(max_length=64)] | Finite | None = None
    min_width: Annotated[int, Field(ge=0)] | None = None
    max_width: Annotated[int, Field(ge=0)] | None = None
    min_height: Annotated[int, Field(ge=0)] | None = None
    max_height: Annotated[int, Field(ge=0)] | None = None
    taken_after: Annotated[str, Field(max_length=64)] | Finite | None = None
    taken_before: Annotated[str, Field(max_length=64)] | Finite | None = None
    camera: Annotated[str, Field(max_length=200)] | None = None
    where: Annotated[str, Field(max_length=2000)] | None = None

    def to_filters(self) -> Any:
        from indexer import Filters

        values = self.model_dump()
        values["under"], values["types"] = tuple(self.under), tuple(self.types)
        return Filters(**values)


class SearchOptions(BaseModel):
    """What a search takes besides the query (the arguments of ``Searcher.search`` /
    ``run_query``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    table: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="default: images if the index has it, else its first table"
    )
    k: int = Field(10, ge=1, le=MAX_K)
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="past the end: 200, no hits")
    mode: Literal["vector", "keyword", "hybrid"] = "vector"
    filters: FilterFields | None = None
    where: Annotated[str, Field(max_length=2000)] | None = Field(
        None, description="raw SQL over the row columns, ANDed with filters"
    )
    keywords: Annotated[str, Field(max_length=MAX_QUERY_CHARS)] | None = Field(
        None, description="words for keyword / hybrid mode (default: the query's words)"
    )
    rerank: int = Field(0, ge=0, le=MAX_RERANK, description="re-score the top N (matcher)")
    min_match: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    collapse: Annotated[float, Field(gt=-1.0, le=1.0, allow_inf_nan=False)] | None = Field(
        None, description="fold hits closer than this cosine to a better one (0.95)"
    )
    relevant: list[Id] = Field([], max_length=MAX_FEEDBACK, description="more like these ids")
    non_relevant: list[Id] = Field([], max_length=MAX_FEEDBACK, description="less like these")


class SearchRequest(SearchOptions):
    """A text search (``query``: words, or the query syntax ``2:cat + @<id> - dog`` without
    file paths) or a search with an indexed item's stored vector (``item``)."""

    query: Annotated[str, Field(max_length=MAX_QUERY_CHARS)] | None = None
    item: Id | None = Field(None, description="an item id (64 hex digits)")
    item_table: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="the item's table (default: the searched table)"
    )


class _BadRequest(HTTPException):
    """A 4xx with a one-line reason (a subclass of FastAPI's, so that its body parser, which
    turns other exceptions into a generic 400, passes it through)."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(status_code=status_code, detail=_one_line(reason))


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _api_message(text: str) -> str:
    """A library message, with CLI option names replaced by the API's field names."""
    return re.sub(
        r"--[a-z-]+|keyword_text",
        lambda m: _FIELD_OF_OPTION.get(m.group(0), m.group(0)),
        _one_line(text),
    )


class SearchService:
    """One database opened once (model loaded and warmed), answering the endpoints' calls.

    Args:
        db: the directory ``beit3 index`` wrote.
        model: a checkpoint directory (default: the index's).
        device: ``auto``, ``cpu``, ``cuda``...
    """

    def __init__(self, db: str | Path, model: str | Path | None = None, device: str = "auto"):
        from indexer import Searcher

        self.searcher = Searcher(db, model=model, device=device)
        self._model_lock = threading.Lock()
        self.forwards = 0  # model calls, and seconds spent waiting for / holding the lock
        self.lock_wait_s = self.lock_held_s = 0.0
        self.started = time.time()

    @contextlib.contextmanager
    def model_lock(self) -> Iterator[None]:
        """One model forward at a time (see the module docstring), with its wait measured."""
        asked = time.perf_counter()
        with self._model_lock:
            got = time.perf_counter()
            try:
                yield
            finally:
                self.forwards += 1
                self.lock_wait_s += got - asked
                self.lock_held_s += time.perf_counter() - got

    # -- tables and items ------------------------------------------------------------------------

    def table_infos(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(info) for info in self.searcher.tables.values()]

    def check_table(self, table: str | None, field: str = "table") -> str:
        """A table of the index (default: images, or the first), or a 400/404 naming ``field``."""
        names = list(self.searcher.manifest.searchable())  # re-read when another process commits
        if table is None:
            if not names:
                raise _BadRequest(404, "the index has no finished tables yet; run beit3 index")
            return "images" if "images" in names else names[0]
        if not _TABLE.fullmatch(table):
            raise _BadRequest(
                400, f"{field}: {table!r} is not a table name (letters, digits, '_', '-')"
            )
        if table not in names:
            building = table in self.searcher.manifest.tables
            raise _BadRequest(
                404,
                f"{field}: table {table!r} is still being built (its first indexing run has not "
                "finished)"
                if building
                else f"{field}: no table {table!r}; tables: {', '.join(sorted(names)) or 'none'}",
            )
        return table

    def item(self, table: str, item_id: str) -> Any:
        table = self.check_table(table)
        _check_id(item_id, "id")
        hit = self.searcher.get(table, item_id)
        if hit is None:
            raise _BadRequest(404, f"id: table {table!r} has no item {item_id}")
        return hit

    def image_file(self, table: str, item_id: str) -> tuple[bytes, str]:
        """The bytes of an indexed image file whose content is still the item's (its id is the
        sha256 of the bytes), and its media type."""
        hit = self.item(table, item_id)
        if hit.modality != "image":
            raise _BadRequest(404, f"id: item {item_id} of {table!r} is a text; it has no image")
        for path in dict.fromkeys(p for p in (hit.path, *hit.paths) if p):
            try:
                data = Path(path).read_bytes()
            except OSError:
                continue
            if hashlib.sha256(data).hexdigest() == item_id:
                return data, mimetypes.guess_type(path)[0] or "application/octet-stream"
        raise _BadRequest(
            410, f"id: the files of item {item_id} are gone or changed since indexing; re-index"
        )

    # -- search ----------------------------------------------------------------------------------

    def search(self, request: SearchOptions, image: bytes | None = None) -> list[Any]:
        """Run one search; ``request`` is a :class:`SearchRequest` unless ``image`` is given."""
        from indexer import CompositeQuery, Term, parse_query, run_query
        from indexer.query import is_compositional

        searcher = self.searcher
        table = self.check_table(request.table)
        query = getattr(request, "query", None)
        item = getattr(request, "item", None)
        if image is None:
            if (query is None) == (item is None):
                raise _BadRequest(
                    400, "query/item: give exactly one: query (words) or item (an indexed id)"
                )
            if query is not None and not query.strip():
                raise _BadRequest(400, "query: empty; type a few words")
            if item is not None:
                _check_id(item, "item")
        for name in ("relevant", "non_relevant"):
            for given in getattr(request, name):
                _check_id(given, name)
        if request.keywords is not None and not request.keywords.strip():
            raise _BadRequest(400, "keywords: empty; give words or leave it out")
        filters = request.filters.to_filters() if request.filters is not None else None
        options: dict[str, Any] = {
            "mode": request.mode,
            "filters": filters,
            "where": request.where,
        }
        steered = bool(request.relevant or request.non_relevant) or request.collapse is not None
        plain_text = query is not None and not is_compositional(query)
        if request.rerank or request.min_match is not None:
            if steered or not (plain_text or image is not None):
                raise _BadRequest(
                    400,
                    "rerank: takes a plain text or image query, without collapse, relevant, "
                    "non_relevant, item or + / - terms",
                )
            with self.model_lock():
                return searcher.search(
                    image if image is not None else query,
                    table,
                    request.k,
                    request.offset,
                    request.rerank,
                    request.min_match,
                    keyword_text=request.keywords,
                    **options,
                )
        if request.mode == "keyword" and plain_text and not steered:  # no model needed
            return searcher.search(
                query, table, request.k, request.offset, keyword_text=request.keywords, **options
            )
        if image is not None:
            composite = CompositeQuery((Term.image(image),))
        elif item is not None:
            item_table = self.check_table(
                getattr(request, "item_table", None) or table, "item_table"
            )
            if searcher.get(item_table, item) is None:
                raise _BadRequest(404, f"item: table {item_table!r} has no item {item}")
            composite = CompositeQuery((Term.item(item, table=item_table),))
        elif plain_text:
            composite = CompositeQuery.of(query)
        else:  # the query syntax; never a file path on the server
            composite = parse_query(query, allow_paths=False)
        keywords = request.keywords if request.keywords is not None else composite.keyword_text
        # The vector is embedded (under the lock) apart from the store search (in parallel),
        # both for one table version read first: an activation in between cannot pair the
        # vector with another model's rows.
        version = searcher.version_of(table)
        with self.model_lock():
            vector = composite.embed(searcher, table, version)
        return run_query(
            searcher,
            vector,
            table,
            request.k,
            request.offset,
            keyword_text=keywords,
            relevant=request.relevant,
            non_relevant=request.non_relevant,
            collapse=request.collapse,
            version=version,
            **options,
        )

    def warm_up(self) -> float:
        """One text and one image query through every table (seconds taken): no cold first
        query for a client."""
        start = time.perf_counter()
        probe = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 128, 128)).save(probe, format="PNG")
        for table in self.searcher.tables:
            self.search(SearchRequest(query="warm up", table=table, k=1))
            self.search(SearchOptions(table=table, k=1), image=probe.getvalue())
        if not self.searcher.tables:
            with self.model_lock():
                self.searcher.embed_query("warm up")
        return time.perf_counter() - start


def _check_id(value: str, field: str) -> None:
    if not _ID.fullmatch(value):
        raise _BadRequest(
            400, f"{field}: {value[:80]!r} is not an item id (64 lower-case hex digits)"
        )


def _check_image(data: bytes) -> None:
    """Reject what is not an image, or an image over Pillow's pixel limit, from its header."""
    if not data:
        raise _BadRequest(400, "file: empty upload; send an image file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _BadRequest(413, f"file: image too large (decompression bomb limit): {exc}") from None
    except Image.UnidentifiedImageError:
        raise _BadRequest(400, "file: not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise _BadRequest(400, f"file: not a readable image ({_one_line(exc)})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise _BadRequest(
            413, f"file: image of {width} x {height} pixels is over the limit of {limit} pixels"
        )


def _hit_json(hit: Any) -> dict[str, Any]:
    data = hit.to_dict()
    for key in ("score", "match"):
        if isinstance(data[key], float) and not math.isfinite(data[key]):
            data[key] = None
    return data


# -- metrics -----------------------------------------------------------------------------------


class Metrics:
    """Request counters and latency histograms, in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, list[float]] = {}  # route -> bucket counts + [sum, count]

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.setdefault(route, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def render(self, service: SearchService) -> str:
        out = [
            "# HELP beit3_requests_total HTTP requests by route, method and status.",
            "# TYPE beit3_requests_total counter",
        ]
        with self._lock:
            requests = dict(self.requests)
            latency = {k: list(v) for k, v in self.latency.items()}
        for (route, method, status), n in sorted(requests.items()):
            out.append(
                f'beit3_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}'
            )
        out += [
            "# HELP beit3_request_errors_total Requests answered 4xx (client) or 5xx (server).",
            "# TYPE beit3_request_errors_total counter",
        ]
        for kind, low in (("client", 400), ("server", 500)):
            total = sum(n for (_, _, s), n in requests.items() if low <= s < low + 100)
            out.append(f'beit3_request_errors_total{{kind="{kind}"}} {total}')
        out += [
            "# HELP beit3_request_duration_seconds Time to answer a request, by route.",
            "# TYPE beit3_request_duration_seconds histogram",
        ]
        for route, hist in sorted(latency.items()):
            for bound, n in zip(LATENCY_BUCKETS, hist, strict=False):
                out.append(
                    f'beit3_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {n:g}'
                )
            out.append(
                f'beit3_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {hist[-1]:g}'
            )
            out.append(f'beit3_request_duration_seconds_sum{{route="{route}"}} {hist[-2]:.6f}')
            out.append(f'beit3_request_duration_seconds_count{{route="{route}"}} {hist[-1]:g}')
        searcher = service.searcher
        out += [
            "# HELP beit3_index_info The served index and the model answering queries.",
            "# TYPE beit3_index_info gauge",
            f'beit3_index_info{{db="{_label(searcher.db)}",model_id="{_label(searcher.model_id)}",'
            f'device="{searcher.device}"}} 1',
            "# HELP beit3_table_items Items per table (read at scrape), with the table's model id.",
            "# TYPE beit3_table_items gauge",
        ]
        for info in service.searcher.tables.values():
            version = getattr(info, "version", None)
            extra = f',version="{_label(version)}"' if version is not None else ""
            out.append(
                f'beit3_table_items{{table="{_label(info.name)}",modality="{info.modality}",'
                f'model_id="{_label(info.model_id)}"{extra}}} {info.count}'
            )
        out += [
            "# HELP beit3_model_forwards_total Model calls (query embedding, reranking).",
            "# TYPE beit3_model_forwards_total counter",
            f"beit3_model_forwards_total {service.forwards}",
            "# HELP beit3_model_lock_wait_seconds_total Time requests waited for the model lock.",
            "# TYPE beit3_model_lock_wait_seconds_total counter",
            f"beit3_model_lock_wait_seconds_total {service.lock_wait_s:.6f}",
            "# HELP beit3_model_lock_held_seconds_total Time the model lock was held.",
            "# TYPE beit3_model_lock_held_seconds_total counter",
            f"beit3_model_lock_held_seconds_total {service.lock_held_s:.6f}",
        ]
        out += [
            "# HELP beit3_uptime_seconds Seconds since the service opened the index.",
            "# TYPE beit3_uptime_seconds gauge",
            f"beit3_uptime_seconds {time.time() - service.started:.1f}",
        ]
        return "\n".join(out) + "\n"


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


# -- middleware (pure ASGI: they see every request, 401s and 413s included) -------------------


def _error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": _one_line(reason)}, status_code=status, headers=headers)


class _Guard:
    """Outermost layer: metrics for every request, then the bearer token, then body limits
    (the declared Content-Length first, then the bytes actually received while streaming)."""

    def __init__(
        self, app: Any, *, token: str | None, max_upload: int, metrics: Metrics, routes: Any
    ) -> None:
        self.app, self.token, self.max_upload = app, token, max_upload
        self.metrics, self.routes = metrics, routes

    def _route(self, scope: dict[str, Any]) -> str:
        from starlette.routing import Match

        for route in self.routes():
            if route.matches(scope)[0] != Match.NONE:
                return route.path
        return "unmatched"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        route = self._route(scope)

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            rejection = self._reject(scope)
            if rejection is not None:
                await rejection(scope, receive, send_status)
                return
            limit = self.max_upload if route == "/search/image" else MAX_JSON_BYTES
            await self.app(scope, _limited(receive, limit), send_status)
        finally:
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - start)

    def _reject(self, scope: dict[str, Any]) -> Response | None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.token is not None:
            given = headers.get("authorization", b"")
            expected = f"Bearer {self.token}".encode()
            if not given:
                return _error_response(
                    401,
                    "authorization: missing; send the header 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
            if not hmac.compare_digest(given, expected):
                return _error_response(
                    401, "authorization: wrong token", {"WWW-Authenticate": "Bearer"}
                )
        declared = headers.get("content-length")
        if declared is not None:
            limit = self.max_upload if self._route(scope) == "/search/image" else MAX_JSON_BYTES
            if not declared.isdigit():
                return _error_response(400, "content-length: not a number")
            if int(declared) > limit:
                return _error_response(
                    413, f"body: {int(declared)} bytes is over the limit of {limit} bytes"
                )
        return None


def _limited(receive: Any, limit: int) -> Callable[[], Any]:
    received = 0

    async def limited_receive() -> dict[str, Any]:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BadRequest(413, f"body: over the limit of {limit} bytes")
        return message

    return limited_receive


# -- the app -----------------------------------------------------------------------------------


def create_app(
    service: SearchService, *, token: str | None = None, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
) -> FastAPI:
    """The FastAPI app answering for ``service`` (see the module docstring)."""
    app = FastAPI(
        title="beit3-search",
        description="Cross-modal image/text search over one beit3 index.",
        version="1",
    )
    metrics = Metrics()
    max_upload = max_upload_mb * 1024 * 1024

    async def _http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException), "registered for HTTPException only"
        reason = exc.detail if isinstance(exc, _BadRequest) else None
        if reason is None and exc.status_code == 404:
            reason = f"no route {request.method} {request.url.path}; see /docs"
        elif reason is None and exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            reason = f"method {request.method} not allowed on {request.url.path}; use {allow}"
        elif reason is None:
            reason = str(exc.detail)
        return _error_response(exc.status_code, str(reason), exc.headers)

    # Starlette's class: routing's 404 / 405 too, not only the endpoints' errors.
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid", "type": ""}
        if first.get("type") == "json_invalid":
            return _error_response(400, f"body: invalid JSON ({first.get('msg', '')})")
        return _error_response(422, _validation_line(first, drop=("body",)))

    @app.exception_handler(Beit3Error)
    async def _library_error(request: Request, exc: Beit3Error) -> Response:
        status = 409 if isinstance(exc, IndexMismatchError) else 400
        if isinstance(exc, CheckpointError):
            status = 400
        return _error_response(status, _api_message(str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.error(
            "%s %s failed",
            request.method,
            request.url.path,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        return _error_response(500, "internal error; the server log has the details")

    def search_response(request: SearchOptions, hits: list[Any], start: float) -> dict[str, Any]:
        table = hits[0].table if hits else service.check_table(request.table)
        version = service.searcher.version_of(table)
        return {
            "table": table,
            "mode": request.mode,
            "k": request.k,
            "offset": request.offset,
            "model_id": version.model_id,
            "version": version.id,
            "took_ms": round(1000 * (time.perf_counter() - start), 2),
            "hits": [_hit_json(h) for h in hits],
        }

    @app.get("/healthz", summary="Liveness: the model is loaded and the index open")
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_id": service.searcher.model_id,
            "tables": len(service.searcher.manifest.searchable()),
        }

    @app.get("/tables", summary="The tables with their counts and model ids")
    def tables() -> list[dict[str, Any]]:
        return service.table_infos()

    @app.post("/search", summary="Search by text (or the query syntax) or by an indexed item")
    def search(request: SearchRequest) -> dict[str, Any]:
        start = time.perf_counter()
        hits = service.search(request)
        return search_response(request, hits, start)

    @app.post("/search/image", summary="Search with an uploaded image")
    def search_image(
        file: Annotated[UploadFile, File(description="the query image")],
        params: Annotated[
            str, Form(description="JSON: the options of /search without query / item")
        ] = "{}",
    ) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            raw = json.loads(params)
        except json.JSONDecodeError as exc:
            raise _BadRequest(400, f"params: invalid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise _BadRequest(422, "params: expected a JSON object of search options")
        try:
            options = SearchOptions.model_validate(raw)
        except ValidationError as exc:
            raise _BadRequest(422, _validation_line(exc.errors()[0], prefix="params")) from None
        data = file.file.read()
        _check_image(data)
        hits = service.search(options, image=data)
        return search_response(options, hits, start)

    @app.get("/items/{table}/{item_id}", summary="An item's metadata")
    def item(table: str, item_id: str) -> dict[str, Any]:
        hit = service.item(table, item_id)
        data = _hit_json(hit)
        for key in ("rank", "score", "match", "similar"):
            data.pop(key)
        return data

    @app.get(
        "/items/{table}/{item_id}/image",
        summary="The indexed image file's bytes",
        response_class=Response,
    )
    def item_image(table: str, item_id: str) -> Response:
        data, media_type = service.image_file(table, item_id)
        return Response(
            data,
            media_type=media_type,
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"},
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(
            metrics.render(service), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    app.add_middleware(
        _Guard,
        token=token,
        max_upload=max_upload + MULTIPART_SLACK,
        metrics=metrics,
        routes=lambda: app.router.routes,
    )
    return app


def _validation_line(error: Any, drop: tuple[str, ...] = (), prefix: str | None = None) -> str:
    loc = [str(p) for p in error.get("loc", ()) if str(p) not in drop]
    if prefix:
        loc.insert(0, prefix)
    where = ".".join(loc) or "body"
    message = error.get("msg", "invalid")
    if error.get("type") == "missing" and where == "body":
        message = "missing; send a JSON object"
    elif error.get("type") == "extra_forbidden":
        message = "unknown field; see /docs for the fields"
    return _one_line(f"{where}: {message}")


def run_server(
    db: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    model: str | Path | None = None,
    device: str = "auto",
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB,
    access_log: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Open ``db``, warm the model, and serve until interrupted.

    Raises:
        InputDataError: a non-loopback ``host`` without a ``token``, or a bad ``db``.
    """
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise InputDataError(
            f"--host {host}: serving beyond this machine needs --token (or BEIT3_TOKEN); "
            "without one, bind 127.0.0.1"
        )
    if token is not None and len(token) < 8:
        raise InputDataError("--token: use at least 8 characters")
    service = SearchService(db, model=model, device=device)
    seconds = service.warm_up()
    logger.info("warmed up in %.2f s (%s)", seconds, service.searcher.model_id)
    app = create_app(service, token=token, max_upload_mb=max_upload_mb)
    if on_ready is not None:
        on_ready(f"http://{host}:{port}")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )
