"""Package boundaries: beit3 stays a plain model library."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_importing_beit3_loads_no_front_end_or_store():
    code = (
        "import sys, beit3; "
        "bad = [m for m in ('streamlit', 'lancedb', 'faiss', 'typer', 'transformers', 'timm', "
        "'torchvision', 'indexer', 'training', 'app') if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_help_imports_no_torch():
    code = "import sys; import app.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_layers_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed")
    out = subprocess.run([exe], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("beit3", "training", "indexer", "app")


def _callers(pattern: str) -> set[str]:
    """Modules of the shipped packages whose code (not comments) contains ``pattern``."""
    found = set()
    for package in _PACKAGES:
        for path in (_ROOT / package).rglob("*.py"):
            code = [line.split("#")[0] for line in path.read_text().splitlines()]
            if any(pattern in line for line in code):
                found.add(path.relative_to(_ROOT).as_posix())
    return found


@pytest.mark.parametrize(
    ("pattern", "owner"),
    [
        ("init_process_group(", "beit3/run/process.py"),  # one process-group setup
        ('torch.autocast("cuda"', "beit3/run/precision.py"),  # one precision policy
        ("torch.optim.AdamW(", "beit3/run/optim.py"),  # one AdamW / parameter-group builder
        ("def param_groups(", "beit3/run/optim.py"),
        ("torch.save(", "beit3/run/state.py"),  # one writer of step checkpoints
        ("DistributedDataParallel(", "beit3/run/wrap.py"),  # one wrapper
        ("fully_shard(", "beit3/run/wrap.py"),
    ],
)
def test_each_piece_of_the_run_kit_exists_once(pattern, owner):
    assert _callers(pattern) == {owner}
