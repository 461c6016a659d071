"""The embedded default: the bundled model on a slice of the bundled data, through the same path
as `make demo` (app.demo.build_demo_index -> LanceDB -> Searcher)."""

import json
from pathlib import Path

import pytest

from app.demo import DEMO_CAPTIONS, DEMO_MODEL, build_demo_index
from indexer import Searcher

# query -> the caption of an emoji that must be in the top 5
QUERIES = {
    "cat face": "cat face",
    "flag of Japan": "flag: Japan",
    "red heart": "red heart",
    "pizza": "pizza",
}
# Issue 16's common-names list; the full-index figure (all 3,788 images) is measured by
# demo/measure_model.py into demo/model/metrics.json.
COMMON_NAMES = [
    line.strip()
    for line in (Path(__file__).parent / "fixtures" / "common_emoji_names.txt")
    .read_text()
    .splitlines()
    if line.strip() and not line.startswith("#")
]
# On this slice (~260 images) the bundled model puts 55 of the 69 in the top 5 (2026-12-01); on
# the whole set 39 (metrics.json), short of issue 16's 90%.
COMMON_NAMES_IN_TOP_5 = 53


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory):
    rows = [json.loads(line) for line in DEMO_CAPTIONS.read_text().splitlines() if line]
    wanted = set(QUERIES.values()) | set(COMMON_NAMES)
    picked = [r for i, r in enumerate(rows) if i % 20 == 0 or r["text"] in wanted]
    folder = tmp_path_factory.mktemp("demo")
    captions = folder / "captions.jsonl"
    captions.write_text(
        "".join(
            json.dumps({**r, "image": str(DEMO_CAPTIONS.parent / r["image"])}) + "\n"
            for r in picked
        )
    )
    db, images, texts = build_demo_index(
        folder / "db", captions=captions, device="cpu", num_workers=0
    )
    assert images.indexed + images.duplicates == len(picked)
    assert texts.indexed == len(picked)
    return db, captions, len(picked)


def test_bundled_model_finds_typical_queries_in_the_top_5(demo_db):
    db, _, count = demo_db
    searcher = Searcher(db, device="cpu")
    assert searcher.tables["images"].count >= count - 5  # pixel-identical emoji share a row
    assert searcher.model_id == json.loads((DEMO_MODEL / "config.json").read_text())["model_id"]
    for query, caption in QUERIES.items():
        top = [hit.text for hit in searcher.search(query, "images", k=5)]
        assert caption in top, (query, top)


def test_an_emoji_image_finds_its_name(demo_db):
    db, _, _ = demo_db
    searcher = Searcher(db, device="cpu")
    image = next(DEMO_CAPTIONS.parent.glob("images/1f355.png"))  # pizza
    assert "pizza" in [hit.text for hit in searcher.search(image, "texts", k=5)]


def test_second_run_embeds_nothing(demo_db):
    db, captions, _ = demo_db
    _, images, texts = build_demo_index(db, captions=captions, device="cpu", num_workers=0)
    assert images.indexed == texts.indexed == 0


def test_common_emoji_names_find_their_image_in_the_top_5(demo_db):
    db, _, _ = demo_db
    searcher = Searcher(db, device="cpu")
    misses = {}
    for name in COMMON_NAMES:
        top = [hit.text for hit in searcher.search(name, "images", k=5)]
        if name not in top:
            misses[name] = top
    found = len(COMMON_NAMES) - len(misses)
    print(f"common names in the top 5: {found} of {len(COMMON_NAMES)}")
    assert found >= COMMON_NAMES_IN_TOP_5, misses
