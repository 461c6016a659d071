"""The indexer imports LanceDB and FAISS only when a store of that kind is opened."""

from tests.indexer.helpers import run_python


def test_importing_indexer_loads_no_vector_store():
    code = (
        "import sys, indexer; from indexer import Searcher, index_images; "
        "print(','.join(m for m in ('lancedb', 'faiss', 'streamlit', 'typer') "
        "if m in sys.modules))"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
