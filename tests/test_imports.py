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
