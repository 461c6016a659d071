"""A run killed with SIGKILL mid-way resumes to exactly the rows of a clean run."""

import numpy as np
import pytest

from indexer import index_images
from tests.indexer.helpers import open_table, rows, run_python

KILL_AFTER = 24  # images embedded (3 chunks of 8) before the process kills itself

_KILLED_RUN = """
import os, signal, sys
from indexer import index_images

def progress(stage, done, total):
    if stage == "embed" and done >= int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)

index_images([sys.argv[1]], sys.argv[2], sys.argv[3], backend=sys.argv[5], batch_size=8,
             chunk_size=8, num_workers=0, progress=progress)
raise SystemExit("not killed")
"""


@pytest.mark.parametrize("backend", ["lancedb", "faiss"])
def test_kill_and_resume_gives_the_rows_of_a_clean_run(
    tmp_path, shapes_dir, tiny_checkpoint, backend
):
    killed_db, clean_db = tmp_path / "killed", tmp_path / "clean"
    proc = run_python(
        _KILLED_RUN, str(shapes_dir), str(killed_db), str(tiny_checkpoint), str(KILL_AFTER), backend
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = open_table(killed_db, "images")
    store.recover()  # FAISS merges the chunks the killed run left in pending/
    assert store.count() == KILL_AFTER  # every completed chunk survived, nothing else

    resumed = index_images([shapes_dir], killed_db, num_workers=0, batch_size=8, chunk_size=8)
    assert (resumed.indexed, resumed.unchanged, resumed.seen) == (32 - KILL_AFTER, KILL_AFTER, 32)

    index_images([shapes_dir], clean_db, tiny_checkpoint, backend=backend, num_workers=0)
    got, want = rows(killed_db, "images"), rows(clean_db, "images")
    assert got.keys() == want.keys() and len(got) == 32
    for sha, row in want.items():
        for column in ("path", "paths", "mtimes", "size", "modality", "model_id"):
            assert got[sha][column] == row[column], column
        np.testing.assert_allclose(got[sha]["vector"], row["vector"], atol=1e-5)
