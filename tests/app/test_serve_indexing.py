"""Serving while indexing: a real server answers a loop of queries while a `beit3 index`
process adds 2,000 images to the same database, is killed with SIGKILL once in the middle of its
run, and is then run again to completion, while a second writer is refused. No query may fail,
the served count never goes back, and the final index equals a clean build of the same folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.app.test_serve import REPO, Server, server_env
from tests.indexer.helpers import rows

pytestmark = pytest.mark.slow

SEED_IMAGES = 40
NEW_IMAGES = 2000


def write_noise_images(folder: Path, count: int, start: int) -> list[Path]:
    """``count`` distinct small PNGs (coloured blocks drawn from seed ``start + i``)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + count):
        blocks = np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(blocks).resize((32, 32), Image.NEAREST).save(path)
        out.append(path)
    return out


def index_command(folder: Path, db: Path, model: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "app.cli", "index", "images", str(folder), "--db", str(db)]
    command += ["--workers", "0", "--batch-size", "32"]
    return command + (["--model", str(model)] if model is not None else [])


def run_index(folder: Path, db: Path, model: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        index_command(folder, db, model),
        cwd=REPO,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def data_bytes(db: Path) -> int:
    """Bytes of table data on disk (grows with each chunk an indexing run writes)."""
    return sum(p.stat().st_size for p in db.rglob("*") if p.is_file() and "data" in p.parts)


class QueryLoop(threading.Thread):
    """Text and image queries and table listings in a loop; keeps every failure and the image
    counts seen, in order."""

    def __init__(self, url: str, image: bytes) -> None:
        super().__init__(daemon=True)
        from app.client import SearchClient

        self.client = SearchClient(url, timeout=60)
        self.image = image
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.counts: list[int] = []
        self.done = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                if n % 3 == 0:
                    tables = {t.name: t.count for t in self.client.tables()}
                    self.counts.append(tables["images"])
                elif n % 3 == 1:
                    hits = self.client.search("a red square", table="images", k=5).hits
                    assert len(hits) == 5, f"{len(hits)} hits"
                else:
                    hits = self.client.search_image(self.image, table="images", k=3).hits
                    assert hits and hits[0].score > 0.999, "the seed image is not its own top hit"
                self.done += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                self.failures.append(f"{type(exc).__name__}: {exc}")
            n += 1


@pytest.mark.timeout(300)
def test_queries_never_fail_while_an_indexer_adds_2000_images_and_is_killed(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    clock = time.perf_counter()

    def phase(name: str) -> None:
        print(f"{name}: {time.perf_counter() - clock:.1f} s", flush=True)

    folder = tmp_path / "photos"
    seeds = write_noise_images(folder, SEED_IMAGES, 0)
    db = tmp_path / "db"
    first = run_index(folder, db, tiny_checkpoint)
    assert first.returncode == 0, first.stderr
    write_noise_images(folder, NEW_IMAGES, SEED_IMAGES)

    phase("seed indexed, images written")
    server = Server(db, tmp_path / "server.log")
    try:
        server.wait_ready()
        loop = QueryLoop(server.url, seeds[0].read_bytes())
        loop.start()
        # Run 1: killed with SIGKILL once it has written some of its chunks (mid-run).
        phase("server ready")
        before = data_bytes(db)
        writer = subprocess.Popen(
            index_command(folder, db),
            cwd=REPO,
            env=server_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 240
        while data_bytes(db) <= before and writer.poll() is None:
            assert time.monotonic() < deadline, "the indexer wrote nothing in 240 s"
            time.sleep(0.05)
        assert writer.poll() is None, f"the indexer finished before the kill: {writer.stderr}"
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        assert writer.returncode == -signal.SIGKILL
        queries_at_kill = loop.done
        phase(f"killed ({queries_at_kill} queries)")
        time.sleep(1.0)  # serving on after the kill
        killed_counts = list(loop.counts)
        # Run 2: repairs and finishes.
        writer = subprocess.Popen(
            index_command(folder, db),
            cwd=REPO,
            env=server_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        holder = f"pid {writer.pid} "
        while writer.poll() is None and not any(
            holder in p.read_text(errors="replace") for p in db.iterdir() if p.is_file()
        ):
            time.sleep(0.05)
        other = run_index(folder, db)  # a second writer while run 2 holds the database
        assert writer.wait(240) == 0, writer.stderr.read() if writer.stderr else ""
        assert other.returncode == 2
        assert (
            other.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: {db} is being written by pid {writer.pid} ")
        ), other.stderr
        phase("second run done")
        deadline = time.monotonic() + 30
        while not loop.counts or loop.counts[-1] != SEED_IMAGES + NEW_IMAGES:
            assert time.monotonic() < deadline, f"served count stuck at {loop.counts[-1:]}"
            time.sleep(0.1)
        time.sleep(0.5)
        loop.stop.set()
        loop.join(60)
        new_image = folder / f"img_{SEED_IMAGES + 7:05d}.png"
        top = loop.client.search_image(new_image.read_bytes(), table="images", k=1).hits[0]
        metrics = loop.client.metrics()
    finally:
        server.stop()

    assert loop.failures == [], loop.failures[:5]
    assert loop.done > queries_at_kill > 0
    # readers saw the seed until the writer committed, then everything: never a part, never less
    assert set(killed_counts) <= {SEED_IMAGES}, sorted(set(killed_counts))
    assert set(loop.counts) == {SEED_IMAGES, SEED_IMAGES + NEW_IMAGES}
    assert loop.counts == sorted(loop.counts)
    assert top.path == str(new_image) and top.score > 0.999
    assert 'status="5' not in metrics
    assert "Traceback" not in server.output()

    phase(f"served ({loop.done} queries)")
    clean = tmp_path / "clean"
    built = run_index(folder, clean, tiny_checkpoint)
    assert built.returncode == 0, built.stderr
    served, expected = rows(db, "images"), rows(clean, "images")
    assert set(served) == set(expected)
    assert len(served) == SEED_IMAGES + NEW_IMAGES
    phase("clean build compared")
    for sha, row in expected.items():
        np.testing.assert_allclose(served[sha]["vector"], row["vector"], atol=1e-5)
        assert served[sha]["paths"] == row["paths"]
