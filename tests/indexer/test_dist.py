"""torchrun with 2 CPU processes (gloo): each rank embeds its shard; the result equals 1 process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from indexer import index_images, index_texts
from tests.indexer.helpers import REPO, rows

_RANK_SCRIPT = """
import json, os, sys
from indexer import index_images, index_texts

images, texts, root, ckpt, out = sys.argv[1:6]
rank = os.environ["RANK"]
result = {}
for backend in ("lancedb", "faiss"):
    seen = []
    progress = lambda stage, done, total: seen.append((stage, done, total))
    db = f"{root}/{backend}"
    a = index_images([images], db, ckpt, backend=backend, num_workers=0, batch_size=4,
                     chunk_size=4, progress=progress)
    b = index_texts(texts, db, backend=backend, batch_size=4, chunk_size=4)
    result[backend] = {"images": [a.seen, a.indexed, a.duplicates], "texts": [b.seen, b.indexed],
                       "embedded_here": max((d for s, d, t in seen if s == "embed"), default=0)}
with open(f"{out}.{rank}", "w") as f:
    json.dump(result, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_ranks_shard_the_work_and_match_a_single_process(tmp_path, shapes_dir, tiny_checkpoint):
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(f"text number {i}" for i in range(20)) + "\ntext number 3\n")
    (shapes_dir / "dup.png").write_bytes((shapes_dir / "red_circle_0.png").read_bytes())
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            str(script),
            str(shapes_dir),
            str(texts),
            str(tmp_path / "dist"),
            str(tiny_checkpoint),
            str(tmp_path / "report"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report.{rank}").read_text()) for rank in (0, 1)]
    for backend in ("lancedb", "faiss"):
        ours, theirs = (r[backend] for r in reports)
        assert ours["images"] == theirs["images"] == [33, 32, 1]
        assert ours["texts"] == theirs["texts"] == [21, 20]
        assert ours["embedded_here"] == 16  # rank 0 embedded its half of the 32 new images

        single = tmp_path / f"single-{backend}"
        index_images([shapes_dir], single, tiny_checkpoint, backend=backend, num_workers=0)
        index_texts(texts, single, backend=backend)
        for table in ("images", "texts"):
            got, want = rows(tmp_path / "dist" / backend, table), rows(single, table)
            assert got.keys() == want.keys()
            for sha, row in want.items():
                assert got[sha]["paths"] == row["paths"]
                np.testing.assert_allclose(got[sha]["vector"], row["vector"], atol=1e-5)
