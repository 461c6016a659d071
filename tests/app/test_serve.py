"""`beit3 serve` as a real server process on the app test index (tiny model): the functional
checks against the library in-process, and a suite of hostile requests, each with its status and
reason. One server (with a token and a 1 MB upload limit) serves the whole module."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.indexer.helpers import png_bomb

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"
ABSENT_ID = "0" * 64

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        OMP_WAIT_POLICY="PASSIVE",
        OMP_NUM_THREADS="1",
    )


class Server:
    """``python -m app.cli serve`` in a subprocess; its log goes to ``log``."""

    def __init__(self, db: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--db", str(db), "--port", str(self.port)]
            + list(args),
            cwd=REPO,
            env=server_env(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, token: str | None = None, timeout: float = 90) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()


@pytest.fixture(scope="module")
def server(app_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server(app_db, log, "--token", TOKEN, "--max-upload-mb", "1")
    try:
        srv.wait_ready(TOKEN)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    from app.client import SearchClient

    with SearchClient(server.url, token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def images(app_db: Path) -> list[Path]:
    return sorted((app_db.parent / "images").glob("*.png"))


# -- functional ----------------------------------------------------------------------------------


def test_tables_list_names_counts_and_model(client, app_searcher) -> None:
    tables = {t.name: t for t in client.tables()}
    expected = app_searcher.tables
    assert set(tables) == set(expected) == {"images", "texts"}
    for name, info in expected.items():
        assert (tables[name].count, tables[name].modality) == (info.count, info.modality)
        assert tables[name].model_id == info.model_id == client.health().model_id


@pytest.mark.parametrize("table", ["images", "texts"])
@pytest.mark.parametrize("query", ["a red circle", "a blue square"])
def test_text_search_equals_searcher(client, app_searcher, table: str, query: str) -> None:
    result = client.search(query, table=table, k=7)
    expected = app_searcher.search(query, table, k=7)
    assert result.ids == [h.id for h in expected]
    assert [h.rank for h in result.hits] == list(range(1, 8))
    assert [h.score for h in result.hits] == pytest.approx([h.score for h in expected], abs=1e-5)


def test_pages_and_offset_past_the_end(client, app_searcher) -> None:
    page = client.search("a green cross", table="images", k=5, offset=5)
    assert page.ids == [h.id for h in app_searcher.search("a green cross", "images", 5, 5)]
    assert [h.rank for h in page.hits] == [6, 7, 8, 9, 10]
    last = client.search("a green cross", table="images", k=5, offset=30)
    assert len(last.hits) == 2  # 32 images
    beyond = client.search("a green cross", table="images", k=5, offset=500)
    assert beyond.hits == []


def test_image_upload_search_equals_searcher(client, app_searcher, images) -> None:
    for path in images[:2]:
        for table in ("texts", "images"):
            result = client.search_image(path, table=table, k=5)
            assert result.ids == [h.id for h in app_searcher.search(path, table, k=5)]
    # a file that is an image of the table: found first, at cosine 1
    own = client.search_image(images[3].read_bytes(), table="images", k=1).hits[0]
    assert own.path == str(images[3])
    assert own.score == pytest.approx(1.0, abs=1e-4)


def test_modes_filters_collapse_and_feedback_equal_the_library(client, app_searcher, images):
    from indexer import CompositeQuery, Filters, run_query

    keyword = client.search("red circle", table="images", k=4, mode="keyword")
    assert keyword.ids == [
        h.id for h in app_searcher.search("red circle", "images", k=4, mode="keyword")
    ]
    assert keyword.hits[0].path == str(images[0].parent / "red_circle_0.png")
    hybrid = client.search("red circle", table="images", k=4, mode="hybrid")
    assert hybrid.ids == [
        h.id for h in app_searcher.search("red circle", "images", k=4, mode="hybrid")
    ]
    filtered = client.search(
        "a shape",
        table="images",
        k=10,
        filters={"types": ["png"], "min_width": 64},
        where="path LIKE '%red%'",
    )
    assert len(filtered.hits) == 4 and all("red_" in h.path for h in filtered.hits)
    liked, disliked = keyword.ids[1], keyword.ids[2]
    steered = client.search(
        "a red circle",
        table="images",
        k=6,
        relevant=[liked],
        non_relevant=[disliked],
        collapse=0.99,
    )
    expected = run_query(
        app_searcher,
        CompositeQuery.of("a red circle"),
        "images",
        k=6,
        relevant=[liked],
        non_relevant=[disliked],
        collapse=0.99,
    )
    assert steered.ids == [h.id for h in expected]
    assert [h.similar for h in steered.hits] == [h.similar for h in expected]
    assert Filters(types=("png",)).to_sql()  # the same field names as the library's


def test_search_with_an_item_and_the_query_syntax(client, app_searcher, images) -> None:
    first = client.search_image(images[5], table="images", k=1).hits[0]
    by_item = client.search(item=first.id, table="images", k=3)
    assert by_item.hits[0].id == first.id
    assert by_item.hits[0].score == pytest.approx(1.0, abs=1e-4)
    cross = client.search(item=first.id, item_table="images", table="texts", k=3)
    assert cross.ids == [h.id for h in app_searcher.search(images[5], "texts", k=3)]
    syntax = client.search(f"2:a red circle - @{first.id}", table="images", k=5)
    from indexer import parse_query, run_query

    expected = run_query(app_searcher, parse_query(f"2:a red circle - @{first.id}"), "images", k=5)
    assert syntax.ids == [h.id for h in expected]


def test_item_metadata_and_image_bytes(client, images) -> None:
    hit = client.search_image(images[7], table="images", k=1).hits[0]
    item = client.item("images", hit.id)
    assert (item.id, item.path, item.modality) == (hit.id, str(images[7]), "image")
    assert client.image_bytes("images", hit.id) == images[7].read_bytes()
    text = client.search("a red circle", table="texts", k=1).hits[0]
    assert client.item("texts", text.id).text == text.text


def test_image_of_a_changed_file_is_not_served(client, app_db, tmp_path) -> None:
    """The id is the content's sha256: bytes that no longer hash to it are never sent."""
    from app.client import ServerError

    hit = client.search("a yellow triangle", table="images", k=1).hits[0]
    path = Path(hit.path)
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"changed")
        with pytest.raises(ServerError) as err:
            client.image_bytes("images", hit.id)
        assert err.value.status == 410 and "re-index" in err.value.reason
    finally:
        path.write_bytes(original)
    assert client.image_bytes("images", hit.id) == original


def _counter(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0].endswith(want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_errors_and_latency(client, server) -> None:
    from app.client import ServerError

    before = client.metrics()
    for _ in range(3):
        client.search("a cyan cross", table="images", k=2)
    with pytest.raises(ServerError):
        client.search("   ", table="images")
    after = client.metrics()
    ok = {"route": "/search", "method": "POST", "status": "200"}
    bad = {"route": "/search", "method": "POST", "status": "400"}
    assert (
        _counter(after, "beit3_requests_total", **ok)
        - _counter(before, "beit3_requests_total", **ok)
        == 3
    )
    assert (
        _counter(after, "beit3_requests_total", **bad)
        - _counter(before, "beit3_requests_total", **bad)
        == 1
    )
    count = 'beit3_request_duration_seconds_count{route="/search"}'
    delta = float(after.split(count)[1].split()[0]) - float(before.split(count)[1].split()[0])
    assert delta == 4
    assert _counter(after, "beit3_request_errors_total", kind="server") == 0
    model_id = client.health().model_id
    assert f'model_id="{model_id}"' in after
    assert re.search(r'beit3_table_items\{table="images",.*\} 32', after)


def test_openapi_docs_are_served(client) -> None:
    assert "swagger" in client.http.get("/docs").text.lower()
    paths = client.http.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/image", "/tables", "/items/{table}/{item_id}/image"} <= set(paths)


def test_token_is_required_on_every_route(server) -> None:
    for path in ("/healthz", "/tables", "/metrics", "/docs", "/openapi.json"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401, path
        assert response.json() == {
            "error": "authorization: missing; send the header 'Authorization: Bearer <token>'"
        }
    wrong = httpx.get(server.url + "/tables", headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]) == (401, "authorization: wrong token")


def test_binding_beyond_loopback_without_token_is_refused(app_db: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--db", str(app_db), "--host", "0.0.0.0"],
        cwd=REPO,
        env={k: v for k, v in server_env().items() if k != "BEIT3_TOKEN"},
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --host 0.0.0.0: serving beyond this machine needs --token (or BEIT3_TOKEN); "
        "without one, bind 127.0.0.1"
    ]


# -- hostile requests ----------------------------------------------------------------------------


def _png(size: tuple[int, int] = (40, 40)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def _noise_png(megabytes: float) -> bytes:
    """A valid PNG of about ``megabytes`` (random pixels do not compress)."""
    import numpy as np
    from PIL import Image

    side = int((megabytes * 1024 * 1024 / 3) ** 0.5) + 1
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=0)
    return out.getvalue()


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for lo in range(0, len(data), size):
        yield data[lo : lo + size]


def _multipart(file: bytes, params: str = "{}") -> tuple[bytes, str]:
    boundary = "beit3boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{params}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + file
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _search(body: Any) -> dict[str, Any]:
    return {"method": "POST", "path": "/search", "json": body}


def _raw(content: bytes | str, content_type: str = "application/json") -> dict[str, Any]:
    return {
        "method": "POST",
        "path": "/search",
        "content": content,
        "headers": {"Content-Type": content_type},
    }


def _upload(file: bytes | None, params: Any = None, **extra: Any) -> dict[str, Any]:
    files = {"file": ("q.png", file, "image/png")} if file is not None else None
    data = {"params": params if isinstance(params, str) else json.dumps(params or {})}
    return {"method": "POST", "path": "/search/image", "files": files, "data": data, **extra}


def _chunked_upload(file: bytes) -> dict[str, Any]:
    body, content_type = _multipart(file)
    return {
        "method": "POST",
        "path": "/search/image",
        "content": _chunks(body),  # a generator: sent chunked, no Content-Length
        "headers": {"Content-Type": content_type},
    }


def _get(path: str, **extra: Any) -> dict[str, Any]:
    return {"method": "GET", "path": path, **extra}


HOSTILE = {
    # query text
    "empty query": (_search({"query": ""}), 400, "query: empty"),
    "whitespace query": (_search({"query": " \n\t "}), 400, "query: empty"),
    "10k-char query": (_search({"query": "cat " * 2500}), 422, "query: String should have at most"),
    "query and item": (
        _search({"query": "cat", "item": ABSENT_ID}),
        400,
        "query/item: give exactly one",
    ),
    "neither query nor item": (_search({"k": 3}), 400, "query/item: give exactly one"),
    "file path in the query syntax": (
        _search({"query": "cat + ./secret.png"}),
        400,
        "names a file",
    ),
    "query syntax dangling operator": (_search({"query": "cat +"}), 400, "query 'cat +'"),
    # tables
    "unknown table": (_search({"query": "cat", "table": "nope"}), 404, "table: no table 'nope'"),
    "table name traversal": (
        _search({"query": "cat", "table": "../etc"}),
        400,
        "table: '../etc' is not a table name",
    ),
    # paging
    "k = 0": (_search({"query": "cat", "k": 0}), 422, "k: Input should be greater than or equal"),
    "k negative": (_search({"query": "cat", "k": -3}), 422, "k: Input should be greater than"),
    "k = 10^9": (_search({"query": "cat", "k": 10**9}), 422, "k: Input should be less than"),
    "offset negative": (_search({"query": "cat", "offset": -1}), 422, "offset: Input should be"),
    "offset 10^12": (_search({"query": "cat", "offset": 10**12}), 422, "offset: Input should be"),
    # body and types
    "bad JSON": (_raw("{bad"), 400, "body: invalid JSON"),
    "empty body": (_raw(""), 422, "body: missing; send a JSON object"),
    "JSON array body": (_raw("[1, 2]"), 422, "body: Input should be a valid dictionary"),
    "form body to the JSON route": (
        _raw("query=cat", "application/x-www-form-urlencoded"),
        422,
        "body: Input should be a valid dictionary",
    ),
    "k as a string": (_search({"query": "cat", "k": "10"}), 422, "k: Input should be a valid int"),
    "k as a float": (_search({"query": "cat", "k": 2.5}), 422, "k: Input should be a valid int"),
    "query as a number": (_search({"query": 42}), 422, "query: Input should be a valid string"),
    "NaN min_match": (_raw('{"query": "cat", "rerank": 5, "min_match": NaN}'), 422, "min_match:"),
    "unknown field": (_search({"query": "cat", "bogus": 1}), 422, "bogus: unknown field"),
    "JSON body over 256 KiB": (
        _search({"query": "cat", "where": "x" * 300_000}),
        413,
        "over the limit of 262144 bytes",
    ),
    # modes, filters, SQL
    "unknown mode": (
        _search({"query": "cat", "mode": "fuzzy"}),
        422,
        "mode: Input should be 'vector', 'keyword' or 'hybrid'",
    ),
    "unknown filter field": (
        _search({"query": "cat", "filters": {"colour": "red"}}),
        422,
        "filters.colour: unknown field",
    ),
    "bad date filter": (
        _search({"query": "cat", "filters": {"modified_after": "last tuesday"}}),
        400,
        "filters.modified_after: cannot read 'last tuesday' as a date",
    ),
    "negative width filter": (
        _search({"query": "cat", "filters": {"min_width": -5}}),
        422,
        "filters.min_width: Input should be greater than or equal to 0",
    ),
    "bad file type filter": (
        _search({"query": "cat", "filters": {"types": ["../png"]}}),
        400,
        "filters.types: '../png' is not a file extension",
    ),
    "where: SQL syntax error": (
        _search({"query": "cat", "where": "width >"}),
        400,
        "where: '(width >)' is not a valid filter: Error parsing statement",
    ),
    "where: unknown column": (
        _search({"query": "cat", "where": "secret = 1"}),
        400,
        "No field named secret",
    ),
    "where: statement injection": (
        _search({"query": "cat", "where": "1=1; DROP TABLE images"}),
        400,
        "is not a valid filter",
    ),
    "empty keywords": (
        _search({"query": "cat", "mode": "hybrid", "keywords": "  "}),
        400,
        "keywords: empty",
    ),
    # reranking and steering
    "rerank without a matcher": (
        _search({"query": "cat", "rerank": 8}),
        400,
        "has no matcher",
    ),
    "min_match without rerank": (
        _search({"query": "cat", "min_match": 0.5}),
        400,
        "min_match needs reranking",
    ),
    "rerank with collapse": (
        _search({"query": "cat", "rerank": 8, "collapse": 0.9}),
        400,
        "rerank: takes a plain text or image query",
    ),
    "collapse above 1": (
        _search({"query": "cat", "collapse": 2}),
        422,
        "collapse: Input should be less than or equal to 1",
    ),
    "non-hex item": (_search({"item": "xyz"}), 400, "item: 'xyz' is not an item id"),
    "unknown item": (
        _search({"item": ABSENT_ID}),
        404,
        f"item: table 'images' has no item {ABSENT_ID}",
    ),
    "unknown feedback item": (
        _search({"query": "cat", "relevant": [ABSENT_ID]}),
        400,
        "no item with this id",
    ),
    "non-hex feedback id": (
        _search({"query": "cat", "relevant": ["../../x"]}),
        400,
        "relevant: '../../x' is not an item id",
    ),
    # image uploads
    "non-image bytes": (_upload(b"this is not a picture"), 400, "file: not a readable image"),
    "empty file": (_upload(b""), 400, "file: empty upload"),
    "truncated PNG": (_upload(_png((64, 64))[:60]), 400, "not a readable image"),
    "decompression bomb": (_upload(png_bomb(40_000, 40_000)), 413, "decompression bomb"),
    "upload over the limit (Content-Length)": (
        _upload(_noise_png(1.5)),
        413,
        "over the limit of 1114112 bytes",
    ),
    "upload over the limit (chunked, streamed)": (
        _chunked_upload(_noise_png(1.5)),
        413,
        "body: over the limit of 1114112 bytes",
    ),
    "upload without a file": (_upload(None), 422, "file: Field required"),
    "upload params bad JSON": (_upload(_png(), "{k: 3"), 400, "params: invalid JSON"),
    "upload params unknown field": (
        _upload(_png(), {"query": "cat"}),
        422,
        "params.query: unknown field",
    ),
    "upload params k = 0": (_upload(_png(), {"k": 0}), 422, "params.k: Input should be greater"),
    "upload keyword mode without words": (
        _upload(_png(), {"mode": "keyword"}),
        400,
        "keyword search needs words: give a text query, or keywords",
    ),
    # items
    "item id not hex": (_get("/items/images/nothex"), 400, "id: 'nothex' is not an item id"),
    "item id '..'": (_get("/items/images/%2e%2e/image"), 400, "id: '..' is not an item id"),
    "item path traversal": (_get("/items/images/..%2F..%2Fetc%2Fpasswd/image"), 404, "no route"),
    "unknown item id": (_get(f"/items/images/{ABSENT_ID}"), 404, "has no item"),
    "item of an unknown table": (_get(f"/items/nope/{ABSENT_ID}"), 404, "table: no table 'nope'"),
    # routes, methods, auth
    "unknown route": (_get("/admin"), 404, "no route GET /admin"),
    "wrong method on /search": (_get("/search"), 405, "method GET not allowed on /search"),
    "wrong method on /tables": (
        {"method": "DELETE", "path": "/tables"},
        405,
        "method DELETE not allowed on /tables",
    ),
    "missing token": (
        _get("/tables", headers={"Authorization": ""}),
        401,
        "authorization: missing",
    ),
    "wrong token": (
        _get("/tables", headers={"Authorization": "Bearer " + "x" * len(TOKEN)}),
        401,
        "authorization: wrong token",
    ),
    "token without Bearer": (
        _get("/tables", headers={"Authorization": TOKEN}),
        401,
        "authorization: wrong token",
    ),
}


@pytest.mark.parametrize(("request_kw", "status", "reason"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_request_gets_its_status_and_reason(
    server: Server, request_kw: dict[str, Any], status: int, reason: str
) -> None:
    kw = dict(request_kw)
    headers = {"Authorization": f"Bearer {TOKEN}", **kw.pop("headers", {})}
    headers = {k: v for k, v in headers.items() if v}
    response = httpx.request(
        kw.pop("method"), server.url + kw.pop("path"), headers=headers, timeout=30, **kw
    )
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert reason in body["error"], body["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"]


def test_zz_no_server_errors_and_no_tracebacks(client, server) -> None:
    """Last in the module: nothing above made the server fail (no 500, no traceback logged)."""
    metrics = client.metrics()
    assert _counter(metrics, "beit3_request_errors_total", kind="server") == 0
    assert not re.search(r'status="5\d\d"', metrics)
    assert "Traceback" not in server.output()
    assert _counter(metrics, "beit3_request_errors_total", kind="client") >= len(HOSTILE)
