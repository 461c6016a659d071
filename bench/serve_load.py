"""Load on `beit3 serve` over loopback: N concurrent clients, text and image queries mixed.

Starts a real server process (``python -m app.cli serve``) on an index, then for each client
count runs that many threads, each with its own httpx client, for ``--seconds``: 3 of 4 requests
are text searches (``POST /search``, the bench's fixed query list, images or texts table), 1 of 4
an image upload (``POST /search/image``, one of 64 indexed images, against the other table).
Prints requests/s, p50/p99 latency, errors (anything but 200, or a transport failure), the mean
wait for the server's model lock per forward and the share of the time it was held (from
/metrics), and the server's resident memory (VmRSS from /proc/<pid>/status) at the start, after
10,000 requests and at the end (when the rows make fewer than ``--soak`` requests, 8 more clients
run until they do).

Index: the bundled demo (``demo/model`` over ``demo/data/emoji``: 3,788 images and their names,
35 s to build on 2 cores), or ``--tiny`` (a random beit3-tiny over 512 drawn shapes, seconds),
or ``--db DIR`` (an existing index with ``images`` and ``texts`` tables).

    python bench/serve_load.py                          # demo index, 8 and 32 clients, 60 s each
    python bench/serve_load.py --tiny --seconds 10      # quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO = REPO / "demo" / "data" / "emoji" / "captions.jsonl"
MODEL = REPO / "demo" / "model"
QUERIES = REPO / "tests" / "fixtures" / "hybrid_queries.tsv"
RSS_AT = 10_000


def build_demo(db: Path) -> list[Path]:
    """Index the demo images and their names (as `beit3 demo` does); returns the image files."""
    from indexer import index_images, index_texts

    rows = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines()]
    names = db.parent / "names.txt"
    names.write_text("".join(f"{r['text']}\n" for r in rows), encoding="utf-8")
    print(index_images([DEMO], db, MODEL, device="cpu", num_workers=1), flush=True)
    print(index_texts(names, db, MODEL, device="cpu"), flush=True)
    return [DEMO.parent / r["image"] for r in rows]


def build_tiny(root: Path) -> list[Path]:
    """A random beit3-tiny (with a tokenizer trained on the captions) over 512 shapes images."""
    import torch

    from beit3 import create_model, save_checkpoint
    from beit3.tokenizer import TextTokenizer, train_sentencepiece
    from indexer import index_images, index_texts
    from tests.data import caption_corpus, write_shapes

    spm = train_sentencepiece(caption_corpus(), root / "spm" / "sentencepiece.bpe.model", 300)
    torch.manual_seed(1234)
    checkpoint = root / "tiny"
    save_checkpoint(
        create_model("beit3-tiny"), checkpoint, preset="beit3-tiny", tokenizer=TextTokenizer(spm)
    )
    pairs = write_shapes(root / "images", variants=16)
    captions = root / "captions.txt"
    captions.write_text("".join(f"{text}\n" for _, text in pairs))
    print(index_images([root / "images"], root / "db", checkpoint, device="cpu"), flush=True)
    print(index_texts(captions, root / "db", checkpoint, device="cpu"), flush=True)
    return [p for p, _ in pairs]


def text_queries() -> list[str]:
    out = []
    for line in QUERIES.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            out.append(line.split("\t")[1])
    return out + ["a red circle", "a blue square", "a smiling face", "a flag", "an animal"]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def start_server(db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--db", str(db), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    raise SystemExit(f"server not ready: {log.read_text()}")


class Load:
    """Counts requests across threads and reads the server's RSS when the total passes 10k."""

    def __init__(self, pid: int) -> None:
        self.pid, self.lock, self.total = pid, threading.Lock(), 0
        self.rss_at: float | None = None

    def count(self) -> None:
        with self.lock:
            self.total += 1
            if self.total == RSS_AT:
                self.rss_at = rss_mib(self.pid)


def run_clients(
    url: str,
    clients: int,
    seconds: float,
    images: list[bytes],
    load: Load,
    until_total: int | None = None,
) -> tuple[list[float], int, float, dict[str, int]]:
    """Latencies (s) of the successful requests, error count, elapsed time, requests by kind."""
    import httpx

    queries = text_queries()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    texts, uploads = [0] * clients, [0] * clients
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=url, timeout=60) as http:
            for n in itertools.count():
                if (
                    (time.monotonic() >= deadline)
                    if until_total is None
                    else (load.total >= until_total)
                ):
                    return
                start = time.perf_counter()
                table = rng.choice(("images", "texts"))
                try:
                    if n % 4 == 3:
                        uploads[i] += 1
                        response = http.post(
                            "/search/image",
                            files={"file": ("q.png", rng.choice(images))},
                            data={"params": json.dumps({"table": table, "k": 10})},
                        )
                    else:
                        texts[i] += 1
                        response = http.post(
                            "/search", json={"query": rng.choice(queries), "table": table}
                        )
                    ok = response.status_code == 200 and "hits" in response.json()
                except (httpx.HTTPError, ValueError):
                    ok = False
                if ok:
                    latencies[i].append(time.perf_counter() - start)
                else:
                    errors[i] += 1
                load.count()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = {"text": sum(texts), "image": sum(uploads)}
    return [x for lat in latencies for x in lat], sum(errors), time.perf_counter() - start, kinds


def lock_figures(url: str) -> tuple[float, float, float]:
    """(model forwards, lock wait s, lock held s) so far, from the server's /metrics."""
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("beit3_model_"):
            name, value = line.split()
            values[name] = float(value)
    return (
        values.get("beit3_model_forwards_total", 0.0),
        values.get("beit3_model_lock_wait_seconds_total", 0.0),
        values.get("beit3_model_lock_held_seconds_total", 0.0),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="an existing index (images and texts tables)")
    parser.add_argument("--tiny", action="store_true", help="a tiny-model index, not the demo")
    parser.add_argument("--seconds", type=float, default=60.0, help="per client count")
    parser.add_argument("--clients", default="8,32", help="comma-separated client counts")
    parser.add_argument(
        "--soak",
        type=int,
        default=RSS_AT,
        help="then keep 8 clients going until this many requests in all (0: no soak)",
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        if args.db is not None:
            db, files = args.db, []
        elif args.tiny or not MODEL.is_dir():
            files, db = build_tiny(root), root / "db"
        else:
            (root / "demo").mkdir()
            files, db = build_demo(root / "demo" / "db"), root / "demo" / "db"
        print(f"index ready in {time.perf_counter() - start:.0f} s: {db}", flush=True)
        images = [p.read_bytes() for p in random.Random(0).sample(files, min(64, len(files)))]
        if not images:  # --db: query with a few drawn images
            import io

            from tests.data import shape_image

            for color in ("red", "blue", "green", "black"):
                out = io.BytesIO()
                shape_image(color, "circle").save(out, format="PNG")
                images.append(out.getvalue())
        log = root / "server.log"
        process, url = start_server(db, log)
        try:
            rss_start = rss_mib(process.pid)
            load = Load(process.pid)
            rows = []
            for clients in (int(c) for c in args.clients.split(",")):
                locks = lock_figures(url)
                lat, errors, elapsed, kinds = run_clients(url, clients, args.seconds, images, load)
                forwards, wait, held = (
                    a - b for a, b in zip(lock_figures(url), locks, strict=True)
                )
                lat.sort()
                n = len(lat) + errors
                rows.append(
                    (
                        clients,
                        n,
                        n / elapsed,
                        1000 * statistics.median(lat) if lat else float("nan"),
                        1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else 0.0,
                        errors,
                        f"{kinds['text']}/{kinds['image']}",
                        1000 * wait / max(forwards, 1),
                        100 * held / elapsed,
                    )
                )
                print(f"{clients} clients done: {n} requests", flush=True)
            soak = ""
            if load.total < args.soak:
                start_soak, before = time.perf_counter(), load.total
                _, soak_errors, _, _ = run_clients(url, 8, 0, images, load, until_total=args.soak)
                soak = (
                    f"soak: {load.total - before} more requests by 8 clients in "
                    f"{time.perf_counter() - start_soak:.0f} s, {soak_errors} errors"
                )
            rss_end = rss_mib(process.pid)
        finally:
            process.terminate()
            process.wait(15)
        print(
            f"\nbeit3 serve on {db.name if args.db else ('tiny' if args.tiny else 'demo')} index,"
            f" loopback, {args.seconds:.0f} s per row, text/image = 3/1 ({os.cpu_count()} CPUs)"
        )
        print(
            f"{'clients':>7s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} "
            f"{'errors':>6s} {'text/image':>11s} {'lock wait ms':>12s} {'lock held':>10s}"
        )
        for clients, n, rate, p50, p99, errors, mix, wait_ms, held_pct in rows:
            print(
                f"{clients:7d} {n:8d} {rate:7.1f} {p50:7.1f} {p99:7.1f} {errors:6d} {mix:>11s} "
                f"{wait_ms:12.1f} {held_pct:9.0f}%"
            )
        at = f"{load.rss_at:.0f}" if load.rss_at is not None else f"n/a (< {RSS_AT} requests)"
        print(
            f"server RSS: start {rss_start:.0f} MiB, after {RSS_AT} requests {at} MiB, "
            f"end ({load.total} requests) {rss_end:.0f} MiB"
        )
        if soak:
            print(soak)
        if "Traceback" in log.read_text():
            print("server log has a traceback:\n" + log.read_text()[-3000:])


if __name__ == "__main__":
    main()
