"""Keyword and hybrid search, prefilters, EXIF facts and old-index migration (issue 13), on real
LanceDB and FAISS tables built by the real indexer with the tiny model."""

from __future__ import annotations

import datetime
import shutil

import lancedb
import numpy as np
import pytest
from PIL import Image

from beit3.errors import InputDataError
from indexer import Filters, Searcher, index_images
from indexer.facts import image_facts, keyword_query, path_words
from indexer.stores import META_COLUMNS, rows_from_vectors
from indexer.stores.lance_store import LanceStore
from tests.data import shape_image
from tests.indexer.helpers import shapes


@pytest.fixture
def named_dir(tmp_path):
    """The 32 shapes plus two photos with names people type: 2024/Holiday Rome/IMG_2041.png
    and 2023/Paris/DSC0042.png."""
    folder = tmp_path / "photos"
    shapes(folder / "shapes")
    for sub, name, color in (
        ("2024/Holiday Rome", "IMG_2041.png", "red"),
        ("2023/Paris", "DSC0042.png", "blue"),
    ):
        (folder / sub).mkdir(parents=True)
        shape_image(color, "circle", seed=7).save(folder / sub / name)
    return folder


def _index(folder, db, ckpt, **kw):
    return index_images([folder], db, ckpt, num_workers=0, **kw)


def test_path_words_split_names_and_folders():
    assert path_words("/home/u/2024/Holiday Rome/IMG_2041.jpg") == [
        *("2024", "holidayrome", "holiday", "rome", "img2041", "img", "2041")
    ]
    assert path_words("x/emoji/1f355.png") == ["x", "emoji", "1f355"]
    assert path_words("a/b/DSC0042.JPG") == ["a", "b", "dsc0042", "dsc", "0042"]
    assert path_words("a/b/23-fe0f-20e3.png")[2:] == ["23fe0f20e3", "23", "fe0f", "20e3"]
    assert keyword_query("IMG_2041 rome") == "IMG_2041 rome img2041"


def test_keyword_finds_a_file_by_a_file_name_word(named_dir, tmp_path, tiny_checkpoint):
    _index(named_dir, tmp_path / "db", tiny_checkpoint)
    searcher = Searcher(tmp_path / "db", device="cpu")
    for words, name in (
        ("2041", "IMG_2041.png"),
        ("holiday rome", "IMG_2041.png"),
        ("dsc0042", "DSC0042.png"),
        ("paris", "DSC0042.png"),
    ):
        hits = searcher.search(words, "images", k=3, mode="keyword")
        assert hits[0].path.endswith(name), (words, [h.path for h in hits])
        assert len(hits) == 1  # no other file has these words
    assert searcher.search("nothingmatches", "images", mode="keyword") == []
    # filters apply to keyword and hybrid rankings too, before ranking
    paris_only = Filters(under=[named_dir / "2023"])
    for mode in ("keyword", "hybrid"):
        hits = searcher.search("2041 paris", "images", k=5, mode=mode, filters=paris_only)
        assert [h.path.rsplit("/", 1)[-1] for h in hits] == ["DSC0042.png"], mode


def test_hybrid_is_reciprocal_rank_fusion_of_both_rankings(named_dir, tmp_path, tiny_checkpoint):
    _index(named_dir, tmp_path / "db", tiny_checkpoint)
    searcher = Searcher(tmp_path / "db", device="cpu")
    query, k = "a red circle 2041 paris", 6
    vector = searcher.search(query, "images", k=k, mode="vector")
    keyword = searcher.search(query, "images", k=k, mode="keyword")
    assert len(keyword) == k and {h.id for h in vector} != {h.id for h in keyword}
    fused: dict[str, float] = {}
    for ranking in (vector, keyword):
        for hit in ranking:  # LanceDB's RRF: the sum of 1 / (K + rank), rank from 1
            fused[hit.id] = fused.get(hit.id, 0.0) + 1.0 / (60 + hit.rank)
    hybrid = searcher.search(query, "images", k=k, mode="hybrid")
    assert [h.score for h in hybrid] == pytest.approx(sorted(fused.values(), reverse=True)[:k])
    for hit in hybrid:
        assert hit.score == pytest.approx(fused[hit.id])
    # an item in both rankings (within k) beats any item in one of them
    both = {h.id for h in vector} & {h.id for h in keyword}
    assert both
    flags = [h.id in both for h in hybrid]
    assert flags == sorted(flags, reverse=True)
    assert [h.rank for h in hybrid] == list(range(1, k + 1))
    page = searcher.search(query, "images", k=3, offset=3, mode="hybrid")
    assert [h.id for h in page] == [h.id for h in hybrid[3:6]]


def test_keyword_index_follows_reindex_adds_changes_and_deletions(
    named_dir, tmp_path, tiny_checkpoint
):
    db = tmp_path / "db"
    _index(named_dir, db, tiny_checkpoint)
    searcher = Searcher(db, device="cpu")
    rome = named_dir / "2024/Holiday Rome/IMG_2041.png"

    def found(words):
        return sorted(
            h.path.rsplit("/", 1)[-1]
            for h in searcher.search(words, "images", k=10, mode="keyword")
        )

    shape_image("green", "cross", seed=3).save(named_dir / "2024/Holiday Rome/IMG_3000.png")
    rome.rename(rome.with_name("IMG_2042.png"))  # renamed: the old word goes, the new one comes
    shutil.rmtree(named_dir / "2023")  # deleted
    report = _index(named_dir, db, tiny_checkpoint)
    assert report.indexed == 1 and report.removed == 2  # the new file; DSC0042 and IMG_2041
    assert found("3000") == ["IMG_3000.png"]
    assert found("2042") == ["IMG_2042.png"]
    assert found("2041") == []
    assert found("paris") == [] and found("dsc0042") == []
    assert found("holiday") == ["IMG_2042.png", "IMG_3000.png"]
    # changed content under the same name: the row is replaced, the word still finds it once
    shape_image("yellow", "square", seed=5).save(named_dir / "2024/Holiday Rome/IMG_3000.png")
    report = _index(named_dir, db, tiny_checkpoint)
    assert report.indexed == 1
    hits = searcher.search("3000", "images", k=10, mode="keyword")
    assert len(hits) == 1
    assert np.allclose(
        searcher.get_vector("images", hits[0].id),
        searcher.embed_query(named_dir / "2024/Holiday Rome/IMG_3000.png"),
        atol=1e-5,
    )


def _store_with_widths(tmp_path, index_type, n=6000, dim=64):
    """n rows whose ``width`` is row % 100, so ``max_width=w-1`` keeps w% of them."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    meta = [
        {
            "sha256": f"{i:064x}",
            "modality": "image",
            "path": f"/x/{i}.png",
            "paths": [f"/x/{i}.png"],
            "mtimes": [1.0],
            "size": 1,
            "mtime": 1.0,
            "model_id": "m@1",
            "search_text": f"img {i}",
            "ext": "png",
            "width": i % 100,
            "height": 10,
        }
        for i in range(n)
    ]
    store = LanceStore(tmp_path, "t", dim=dim, create=True, index_type=index_type)
    store.append(rows_from_vectors(meta, vectors, dim))
    store.commit()
    return store, vectors


@pytest.mark.parametrize("index_type", ["exact", "ivf_flat"])
@pytest.mark.parametrize("percent", [1, 10, 50])
def test_filtered_top_k_equals_brute_force_over_matching_rows(tmp_path, index_type, percent):
    store, vectors = _store_with_widths(tmp_path, index_type)
    assert store.has_vector_index() == (index_type == "ivf_flat")
    where = Filters(max_width=percent - 1).to_sql()
    widths = np.arange(len(vectors)) % 100
    matching = np.flatnonzero(widths < percent)
    assert len(matching) == len(vectors) * percent // 100
    queries = np.random.default_rng(1).normal(size=(5, vectors.shape[1])).astype(np.float32)
    for query in queries / np.linalg.norm(queries, axis=1, keepdims=True):
        truth = matching[np.argsort(-(vectors[matching] @ query))[:20]]
        for exact_rows in (store.exact_filter_rows, 0):  # 0: IVF with the prefilter
            store.exact_filter_rows = exact_rows
            if exact_rows == 0 and index_type == "ivf_flat":
                store.nprobes = 1_000  # every partition: the ANN path is exact too
            found = store.search(query[None], k=10, offset=10, where=where)[0]
            assert [int(m.row["sha256"], 16) for m in found] == truth[10:20].tolist()
            assert all(m.row["width"] < percent for m in found)
            assert [m.score for m in found] == pytest.approx(
                vectors[truth[10:20]] @ query, abs=1e-5
            )


def test_image_facts_read_exif_date_and_camera_from_a_jpeg(tmp_path, tiny_checkpoint):
    folder = tmp_path / "cam"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS R5"
    exif[0x0112] = 6  # rotated: shown 48 wide, 80 tall
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 13:30:00"
    shape_image("red", "circle", size=48).resize((80, 48)).save(folder / "canon.jpg", exif=exif)
    shape_image("blue", "square", size=64).save(folder / "plain.jpg")
    facts = image_facts(str(folder / "canon.jpg"))
    taken = datetime.datetime(2024, 5, 1, 13, 30, tzinfo=datetime.timezone.utc).timestamp()
    assert facts == {"width": 48, "height": 80, "taken": taken, "camera": "Canon EOS R5"}
    assert image_facts(str(folder / "plain.jpg")) == {
        "width": 64,
        "height": 64,
        "taken": None,
        "camera": None,
    }
    _index(folder, tmp_path / "db", tiny_checkpoint)
    searcher = Searcher(tmp_path / "db", device="cpu")

    def names(**kw):
        return sorted(
            h.path.rsplit("/", 1)[-1]
            for h in searcher.search("x", "images", k=5, filters=Filters(**kw))
        )

    assert names(camera="eos r5") == ["canon.jpg"]
    assert names(taken_after="2024-05-01", taken_before="2024-05-02") == ["canon.jpg"]
    assert names(taken_after="2024-05-02") == []
    assert names(min_height=70) == ["canon.jpg"]
    assert names(min_width=60, types=("jpeg",)) == ["plain.jpg"]
    assert names(types=("png",)) == []
    assert names(under=[folder]) == ["canon.jpg", "plain.jpg"]
    assert names(under=[tmp_path / "elsewhere"]) == []
    assert names(modified_after="2000-01-01", where="size > 0") == ["canon.jpg", "plain.jpg"]
    for bad, reason in [
        ("width >", "Error parsing statement"),
        ("nosuchcol = 1", "No field named nosuchcol"),
    ]:
        for mode in ("vector", "keyword", "hybrid"):
            with pytest.raises(
                InputDataError, match=rf"^--where: .* is not a valid filter: .*{reason}"
            ):
                searcher.search("x", "images", mode=mode, where=bad)
    with pytest.raises(InputDataError, match=r"^--taken-after: cannot read 'May 1st' as a date"):
        names(taken_after="May 1st")
    with pytest.raises(InputDataError, match=r"^--type: '\*\.jpg' is not a file extension"):
        names(types=("*.jpg",))


def test_old_index_says_reindex_then_is_migrated_without_reembedding(
    named_dir, tmp_path, tiny_checkpoint
):
    db = tmp_path / "db"
    _index(named_dir, db, tiny_checkpoint)
    # Rewrite the table as the code before issue 13 wrote it: no search_text, ext, width,
    # height, taken, camera columns, no full-text index.
    old_columns = META_COLUMNS[: META_COLUMNS.index("search_text")]
    conn = lancedb.connect(str(db / "lancedb"))
    full = conn.open_table("images").to_arrow()
    old = full.select(["sha256", "vector", *old_columns[1:]])
    conn.create_table("images", data=old, mode="overwrite")
    vectors = {r["sha256"]: r["vector"] for r in old.to_pylist()}

    searcher = Searcher(db, device="cpu")
    assert len(searcher.search("a red circle", "images", k=5)) == 5  # vector search still works
    message = r"^table 'images' was indexed before keyword search existed .*re-run beit3 index"
    with pytest.raises(InputDataError, match=message):
        searcher.search("2041", "images", mode="keyword")
    with pytest.raises(InputDataError, match="re-run beit3 index"):
        searcher.search("x", "images", filters=Filters(min_width=10))

    report = _index(named_dir, db, tiny_checkpoint)
    assert report.indexed == 0 and report.unchanged == 34  # migrated, nothing re-embedded
    migrated = conn.open_table("images").to_arrow()
    assert set(migrated.column_names) == {"vector", *META_COLUMNS}
    assert {r["sha256"]: r["vector"] for r in migrated.to_pylist()} == vectors
    searcher = Searcher(db, device="cpu")
    assert searcher.search("2041", "images", mode="keyword")[0].path.endswith("IMG_2041.png")
    assert len(searcher.search("x", "images", k=50, filters=Filters(min_width=64))) == 34


def test_faiss_refuses_keyword_hybrid_and_filters_with_the_way_out(
    named_dir, tmp_path, tiny_checkpoint
):
    _index(named_dir, tmp_path / "db", tiny_checkpoint, backend="faiss")
    searcher = Searcher(tmp_path / "db", device="cpu")
    assert len(searcher.search("a red circle", "images", k=3)) == 3
    for kw, what in (
        ({"mode": "keyword"}, "keyword search"),
        ({"mode": "hybrid"}, "hybrid search"),
        ({"filters": Filters(types=("png",))}, "filters"),
        ({"where": "size > 0"}, "filters"),
    ):
        with pytest.raises(InputDataError, match=rf"faiss table, which has no {what} .*LanceDB"):
            searcher.search("2041", "images", **kw)
    with pytest.raises(InputDataError, match=r"^--mode: unknown mode 'fuzzy'"):
        searcher.search("x", "images", mode="fuzzy")


def test_search_vector_takes_mode_filters_and_keyword_text(named_dir, tmp_path, tiny_checkpoint):
    _index(named_dir, tmp_path / "db", tiny_checkpoint)
    searcher = Searcher(tmp_path / "db", device="cpu")
    vector = searcher.embed_query("a blue circle")
    plain = searcher.search("a blue circle", "images", k=5, mode="hybrid", keyword_text="paris")
    assert [
        h.id
        for h in searcher.search_vector(vector, "images", 5, mode="hybrid", keyword_text="paris")
    ] == [h.id for h in plain]
    hits = searcher.search_vector(vector, "images", 5, filters=Filters(under=[named_dir / "2024"]))
    assert [h.path.rsplit("/", 1)[-1] for h in hits] == ["IMG_2041.png"]
    with pytest.raises(InputDataError, match="keyword search needs words"):
        searcher.search_vector(vector, "images", 5, mode="keyword")


def test_filtered_hybrid_on_an_ivf_table_fuses_the_exact_vector_ranking(tmp_path):
    # At 1% selectivity IVF with the prefilter loses half the vector ranking (recall 0.50 in
    # bench/search_speed.py); hybrid must fuse the exact ranking over the matching rows.
    store, vectors = _store_with_widths(tmp_path, "ivf_flat")
    where = Filters(max_width=0).to_sql()
    matching = np.flatnonzero(np.arange(len(vectors)) % 100 < 1)
    query = np.random.default_rng(2).normal(size=vectors.shape[1]).astype(np.float32)
    query /= np.linalg.norm(query)
    text = f"img {matching[3]}"
    k = 8
    by_vector = matching[np.argsort(-(vectors[matching] @ query))[:k]]
    by_keyword = [int(m.row["sha256"], 16) for m in store.search_keyword(text, k, 0, where)]
    assert by_keyword and by_keyword[0] == matching[3]
    fused: dict[int, float] = {}
    for ranking in (by_vector.tolist(), by_keyword):
        for rank, row in enumerate(ranking, 1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (60 + rank)
    found = store.search_hybrid(query, text, k, 0, where)
    assert [m.score for m in found] == pytest.approx(sorted(fused.values(), reverse=True)[:k])
    assert {int(m.row["sha256"], 16) for m in found} <= set(matching.tolist())
    assert set(by_vector[:4].tolist()) <= {int(m.row["sha256"], 16) for m in found}


def test_folder_filter_finds_a_content_by_any_of_its_copies(named_dir, tmp_path, tiny_checkpoint):
    # A copy of the Rome photo in a later folder: one row (one content) whose representative
    # path is the first; --under the copy's folder must still find it, and only it.
    copies = named_dir / "2025" / "copies"
    copies.mkdir(parents=True)
    shutil.copy(named_dir / "2024" / "Holiday Rome" / "IMG_2041.png", copies / "rome.png")
    _index(named_dir, tmp_path / "db", tiny_checkpoint)
    searcher = Searcher(tmp_path / "db", device="cpu")
    hits = searcher.search("a red circle", "images", k=5, filters=Filters(under=[copies]))
    assert len(hits) == 1 and str(copies / "rome.png") in hits[0].paths
    assert (
        searcher.search(
            "a red circle", "images", filters=Filters(under=[named_dir / "2025" / "cop"])
        )
        == []
    )
