"""A small typed client for ``beit3 serve`` (httpx)::

    from app.client import SearchClient

    with SearchClient("http://127.0.0.1:8000", token=None) as client:
        for hit in client.search("a red circle", table="images", k=5).hits:
            print(hit.rank, round(hit.score, 3), hit.path)
        page = client.search_image("query.jpg", table="texts", k=3)
        png = client.image_bytes("images", page.hits[0].id) if page.hits else None

A 4xx or 5xx raises :class:`ServerError` carrying the status and the server's one-line reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["Health", "Hit", "Item", "SearchClient", "SearchResult", "ServerError", "Table"]


class ServerError(Exception):
    """The server refused or failed a request: ``status`` and its one-line ``reason``."""

    def __init__(self, status: int, reason: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}")
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Health:
    status: str
    model_id: str
    tables: int


@dataclass(frozen=True)
class Table:
    name: str
    modality: str
    count: int
    backend: str
    model_id: str
    dim: int
    index_type: str | None = None
    version: str | None = None
    encoder: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # fields newer than this client


@dataclass(frozen=True)
class Hit:
    """One result (``indexer.Hit`` over the wire)."""

    rank: int
    score: float | None
    table: str
    modality: str
    id: str
    path: str | None
    text: str | None
    paths: tuple[str, ...] = ()
    match: float | None = None
    similar: int = 0


@dataclass(frozen=True)
class Item:
    table: str
    modality: str
    id: str
    path: str | None
    text: str | None
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchResult:
    table: str
    mode: str
    k: int
    offset: int
    model_id: str
    took_ms: float
    hits: list[Hit]
    version: str | None = None

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.hits]


class SearchClient:
    """Talks to one ``beit3 serve``.

    Args:
        base_url: ``http://127.0.0.1:8000``.
        token: the server's ``--token`` (sent as ``Authorization: Bearer``).
        timeout: seconds per request.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                reason = str(response.json()["error"])
            except (ValueError, KeyError, TypeError):
                reason = response.text[:200] or response.reason_phrase
            raise ServerError(response.status_code, reason, method, path)
        return response

    def health(self) -> Health:
        return Health(**_known(Health, self._call("GET", "/healthz").json()))

    def tables(self) -> list[Table]:
        known = set(Table.__dataclass_fields__) - {"extra"}
        out = []
        for row in self._call("GET", "/tables").json():
            extra = {k: v for k, v in row.items() if k not in known}
            out.append(Table(**{k: v for k, v in row.items() if k in known}, extra=extra))
        return out

    def search(
        self,
        query: str | None = None,
        *,
        item: str | None = None,
        item_table: str | None = None,
        **options: Any,
    ) -> SearchResult:
        """Search by words (or the query syntax) or by an indexed item's id.

        ``options``: table, k, offset, mode, filters (a dict of ``indexer.Filters`` fields),
        where, keywords, rerank, min_match, collapse, relevant, non_relevant.
        """
        body = {"query": query, "item": item, "item_table": item_table, **options}
        body = {k: v for k, v in body.items() if v is not None}
        return _result(self._call("POST", "/search", json=body).json())

    def search_image(self, image: str | Path | bytes, **options: Any) -> SearchResult:
        """Search with an image file (path) or its bytes; ``options`` as for :meth:`search`."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "query" if isinstance(image, bytes) else Path(image).name
        params = json.dumps({k: v for k, v in options.items() if v is not None})
        response = self._call(
            "POST", "/search/image", files={"file": (name, data)}, data={"params": params}
        )
        return _result(response.json())

    def item(self, table: str, item_id: str) -> Item:
        data = self._call("GET", f"/items/{table}/{item_id}").json()
        data["paths"] = tuple(data.get("paths") or ())
        return Item(**_known(Item, data))

    def image_bytes(self, table: str, item_id: str) -> bytes:
        return self._call("GET", f"/items/{table}/{item_id}/image").content

    def metrics(self) -> str:
        return self._call("GET", "/metrics").text


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` in ``data`` (a newer server may send more)."""
    return {k: v for k, v in data.items() if k in cls.__dataclass_fields__}


def _result(data: dict[str, Any]) -> SearchResult:
    hits = [Hit(**_known(Hit, {**h, "paths": tuple(h.get("paths") or ())})) for h in data["hits"]]
    return SearchResult(**_known(SearchResult, {**data, "hits": hits}))
