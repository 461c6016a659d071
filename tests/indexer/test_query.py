"""Compositional queries, Rocchio feedback and near-duplicate collapse on a real tiny index."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3 import InputDataError
from indexer import (
    CompositeQuery,
    Searcher,
    Term,
    collapse_hits,
    index_images,
    index_texts,
    parse_query,
    rocchio,
    run_query,
)
from indexer.query import is_compositional
from tests.data import caption, pairs, write_shapes

DUPLICATES = 3  # re-encoded copies of one image


@pytest.fixture(scope="module")
def db(tmp_path_factory, tiny_checkpoint) -> tuple[Path, Path]:
    """32 shapes PNGs, 3 near-duplicate JPEG copies of red_circle, and the 32 captions."""
    root = tmp_path_factory.mktemp("query")
    write_shapes(root / "images")
    original = Image.open(root / "images" / "red_circle_0.png").convert("RGB")
    for i, quality in enumerate((95, 90, 85)[:DUPLICATES]):
        original.save(root / "images" / f"copy{i}.jpg", quality=quality)
    captions = root / "captions.txt"
    captions.write_text("\n".join(caption(c, s) for c, s in pairs()) + "\n")
    index_images([root / "images"], root / "db", tiny_checkpoint, num_workers=0)
    index_texts(captions, root / "db")
    return root / "db", root / "images"


@pytest.fixture(scope="module")
def searcher(db) -> Searcher:
    return Searcher(db[0])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# -- the combined vector ---------------------------------------------------------------------------


def test_embed_equals_normalised_weighted_sum(searcher, db):
    image = db[1] / "blue_square_0.png"
    query = parse_query(f"2:red circle + {image} - 0.5:green cross")
    assert [(t.kind, t.weight) for t in query.terms] == [
        ("text", 2.0),
        ("image", 1.0),
        ("text", -0.5),
    ]
    expected = _unit(
        2.0 * _unit(searcher.embed_query("red circle"))
        + _unit(searcher.embed_query(image))
        - 0.5 * _unit(searcher.embed_query("green cross"))
    )
    vector = query.embed(searcher)
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    # A stored item term is its stored vector: "@id" of an image equals embedding its file.
    item = searcher.search(image, "images", k=1)[0]
    by_id = parse_query(f"@{item.id} + red circle").embed(searcher, "images")
    np.testing.assert_allclose(
        by_id,
        _unit(
            _unit(searcher.get_vector("images", item.id))
            + _unit(searcher.embed_query("red circle"))
        ),
        atol=1e-5,
    )


def test_run_query_equals_search_vector_of_the_sum(searcher):
    query = CompositeQuery.of("red circle", Term.text("blue", -1.0))
    hits = run_query(searcher, query, "images", k=5)
    direct = searcher.search_vector(query.embed(searcher), "images", k=5)
    assert [h.id for h in hits] == [h.id for h in direct]
    assert [h.score for h in hits] == pytest.approx([h.score for h in direct], abs=1e-6)


def test_terms_that_cancel_are_an_error(searcher):
    with pytest.raises(InputDataError, match="cancel out"):
        parse_query("red circle - red circle").embed(searcher)


# -- the syntax ------------------------------------------------------------------------------------


def test_parse_syntax_cases(tmp_path):
    (tmp_path / "hat.jpg").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    q = parse_query("cat + ./hat.jpg - fruit", base=tmp_path)
    assert [(t.kind, t.value, t.weight) for t in q.terms] == [
        ("text", "cat", 1.0),
        ("image", tmp_path / "hat.jpg", 1.0),
        ("text", "fruit", -1.0),
    ]
    q = parse_query("2:golden retriever + beach")
    assert [(t.value, t.weight) for t in q.terms] == [("golden retriever", 2.0), ("beach", 1.0)]
    q = parse_query("0.5:./a.png", base=tmp_path)
    assert [(t.kind, t.weight) for t in q.terms] == [("image", 0.5)]
    q = parse_query("- 2:snow + red-green c++")  # a leading minus; - and + inside words stay
    assert [(t.value, t.weight) for t in q.terms] == [("snow", -2.0), ("red-green c++", 1.0)]
    q = parse_query('"salt + pepper" + "./not a path.png"')
    assert [(t.kind, t.value) for t in q.terms] == [
        ("text", "salt + pepper"),
        ("text", "./not a path.png"),
    ]
    assert parse_query("10:30 meeting").terms == (Term.text("10:30 meeting"),)
    assert str(parse_query("2:golden retriever - beach + x")) == "2:golden retriever - beach + x"


def test_is_compositional_only_with_syntax():
    assert is_compositional("cat + hat")
    assert is_compositional("cat - hat")
    assert is_compositional("2:cat")
    assert is_compositional("- cat")
    assert not is_compositional("a red circle")
    assert not is_compositional("red-green c++ 10:30")
    assert not is_compositional("./hat.jpg")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cat + + hat", "expected a term after '+' at character 5"),
        ("cat -", "expected a term after '-' at character 5"),
        ("cat + ./missing.png", "no image file './missing.png' (character 7"),
        ("cat + dog.jpg", "no image file 'dog.jpg' (character 7"),
        ('cat + "open', "the quote at character 7 is not closed"),
        ("0:cat", "weight '0:' at character 1 is 0"),
        ("cat + 2:", "weight '2:' at character 7 has no term"),
        ("./x.png big + y", "is followed by 'big' at character 9"),
        ("   ", "the query is empty"),
    ],
)
def test_parse_errors_point_at_the_token(tmp_path, text, message):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(InputDataError) as info:
        parse_query(text, base=tmp_path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# -- feedback --------------------------------------------------------------------------------------


def test_rocchio_is_the_normalised_formula():
    rng = np.random.default_rng(0)
    q, r1, r2, n1 = (_unit(rng.normal(size=16)).astype(np.float32) for _ in range(4))
    got = rocchio(q, [r1, r2], [n1], 1.0, 0.75, 0.25)
    np.testing.assert_allclose(got, _unit(q + 0.75 * (r1 + r2) / 2 - 0.25 * n1), atol=1e-6)
    np.testing.assert_allclose(rocchio(q), q, atol=1e-6)


def test_less_like_this_drops_the_item_out_of_the_top_k(searcher):
    query = CompositeQuery.of("a red circle")
    k = 5
    before = run_query(searcher, query, "images", k=k)
    disliked = before[0].id
    after = run_query(searcher, query, "images", k=k, non_relevant=[disliked])
    assert disliked not in [h.id for h in after]
    ranking = run_query(searcher, query, "images", k=40, non_relevant=[disliked])
    assert [h.id for h in ranking].index(disliked) >= k


def test_more_like_this_moves_a_relevant_item_up(searcher):
    query = CompositeQuery.of("a red circle")
    ranking = run_query(searcher, query, "images", k=40)
    liked = ranking[20]  # far down the ranking
    moved = run_query(searcher, query, "images", k=40, relevant=[liked.id])
    new_rank = [h.id for h in moved].index(liked.id) + 1
    assert new_rank < liked.rank
    assert new_rank <= 3


def test_feedback_uses_the_stored_vectors_in_order_from_any_table(searcher):
    query = CompositeQuery.of("a red circle")
    images = run_query(searcher, query, "images", k=4)
    text = searcher.search("a red circle", "texts", k=1)[0]  # an id of the other table
    up, down = [images[3].id, text.id], [images[0].id, images[1].id]
    vectors = {
        i: searcher.get_vector(t, i)
        for t, i in [("images", h.id) for h in images] + [("texts", text.id)]
    }
    want = rocchio(
        query.embed(searcher, "images"), [vectors[i] for i in up], [vectors[i] for i in down]
    )
    got = run_query(searcher, query, "images", k=10, relevant=up, non_relevant=down)
    assert [h.id for h in got] == [h.id for h in searcher.search_vector(want, "images", k=10)]


def test_unknown_feedback_id_is_one_line(searcher):
    with pytest.raises(InputDataError, match="no item with this id"):
        run_query(searcher, CompositeQuery.of("x"), "images", relevant=["0" * 64])


# -- collapse --------------------------------------------------------------------------------------


def test_collapse_folds_real_near_duplicates(searcher, db):
    original = db[1] / "red_circle_0.png"
    raw = searcher.search(original, "images", k=40)
    vectors = searcher.get_vectors("images", [h.id for h in raw])
    names = [Path(h.path).name for h in raw]
    group = {"red_circle_0.png", *(f"copy{i}.jpg" for i in range(DUPLICATES))}
    sims = vectors @ vectors[names.index("red_circle_0.png")]
    dup_floor = min(float(s) for s, n in zip(sims, names, strict=True) if n in group)
    other_max = max(float(s) for s, n in zip(sims, names, strict=True) if n not in group)
    assert dup_floor > other_max, (dup_floor, other_max)
    threshold = (dup_floor + other_max) / 2
    shown = collapse_hits(raw, vectors, threshold)
    first = shown[0]
    assert Path(first.path).name in group
    assert first.similar == DUPLICATES
    assert sum(1 + h.similar for h in shown) == len(raw)
    assert [h.rank for h in shown] == list(range(1, len(shown) + 1))
    assert not any(Path(h.path).name in group for h in shown[1:])


def test_collapsed_pages_are_consistent(searcher, db):
    query = CompositeQuery.of(Path(db[1] / "red_circle_0.png"))
    whole = run_query(searcher, query, "images", k=12, collapse=0.999)
    pages = [
        h
        for offset in (0, 4, 8)
        for h in run_query(searcher, query, "images", k=4, offset=offset, collapse=0.999)
    ]
    assert [h.id for h in pages] == [h.id for h in whole]
    assert [h.rank for h in pages] == list(range(1, 13))
    assert len({h.id for h in whole}) == 12


# -- the CLI ---------------------------------------------------------------------------------------


def test_cli_search_parses_a_compositional_query(searcher, db):
    from typer.testing import CliRunner

    from app.cli import cli

    image = db[1] / "blue_square_0.png"
    text = f"2:red circle + {image} - green"
    result = CliRunner().invoke(
        cli, ["search", text, "--db", str(db[0]), "--k", "5", "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    expected = run_query(searcher, parse_query(text), "images", k=5)
    assert [h["id"] for h in got] == [h.id for h in expected]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in expected], abs=1e-6)

    bad = CliRunner().invoke(cli, ["search", "red + ./nope.png", "--db", str(db[0])])
    assert bad.exit_code == 2
    assert "error: query 'red + ./nope.png': no image file './nope.png' (character 7" in bad.output

    collapsed = CliRunner().invoke(
        cli,
        [
            "search",
            str(db[1] / "red_circle_0.png"),
            "--image",
            "--db",
            str(db[0]),
            "--collapse",
            "0.999",
        ],
    )
    assert collapsed.exit_code == 0, collapsed.output
    assert "(+3 similar)" in collapsed.stdout.splitlines()[0]
    as_csv = CliRunner().invoke(
        cli,
        [
            "search",
            str(db[1] / "red_circle_0.png"),
            "--image",
            "--db",
            str(db[0]),
            "--collapse",
            "0.999",
            "--format",
            "csv",
        ],
    )
    assert as_csv.exit_code == 0, as_csv.output
    first = next(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert first["similar"] == "3"  # the folded copies travel with the export
