"""indexer: image and text collections into LanceDB or FAISS, searched in all four directions.

Public surface::

    from indexer import index_images, index_texts, Searcher
    report = index_images(["photos/"], "idx", model="ckpt/beit3-base")   # IndexReport
    report = index_texts("captions.txt", "idx")                           # model from the index
    searcher = Searcher("idx")
    searcher.search("a red circle", table="images", k=10)                 # list[Hit]
    searcher.search(Path("query.jpg"), table="texts")
    searcher.search_similar("images", hit.id, target="images")
    searcher.search("IMG 2041", table="images", mode="hybrid",                # keyword + vector
                    filters=Filters(under=["photos/2024"], types=("jpg",)))
    query = parse_query("2:golden retriever + ./beach.jpg - snow")       # CompositeQuery
    run_query(searcher, query, "images", k=10, collapse=0.95)             # hits, duplicates folded
    report = index_images(["photos/"], "idx", model="ckpt/v2")  # another model: version v2 beside
    activate_version("idx", report.version)                       # searches switch atomically

LanceDB and FAISS are imported only when a store is opened (``indexer.stores``).
"""

from indexer.build import ProgressFn, index_images, index_texts
from indexer.filters import Filters
from indexer.manifest import TableInfo
from indexer.query import CompositeQuery, Term, collapse_hits, parse_query, rocchio, run_query
from indexer.report import IndexReport
from indexer.search import Hit, Searcher
from indexer.versions import (
    VersionInfo,
    activate_version,
    list_versions,
    remove_version,
    version_paths,
)

__all__ = [
    "CompositeQuery",
    "Filters",
    "Hit",
    "IndexReport",
    "ProgressFn",
    "Searcher",
    "TableInfo",
    "Term",
    "VersionInfo",
    "activate_version",
    "collapse_hits",
    "index_images",
    "index_texts",
    "list_versions",
    "parse_query",
    "remove_version",
    "rocchio",
    "run_query",
    "version_paths",
]
