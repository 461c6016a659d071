"""Reranking search hits with the fusion-encoder matcher (Searcher and `beit3 search`)."""

import json
import shutil

import pytest
import torch

from beit3 import CheckpointError, InputDataError, create_model, load_checkpoint, save_checkpoint
from indexer import Searcher, index_images, index_texts
from tests.data import caption, pairs


@pytest.fixture(scope="module")
def matcher_index(tmp_path_factory, tokenizer):
    """The 32 shapes + captions indexed with a random beit3-tiny that carries a matcher."""
    from tests.indexer.helpers import shapes

    root = tmp_path_factory.mktemp("rerank")
    torch.manual_seed(5)
    model = create_model("beit3-tiny", "retrieval-itm", vocab_size=tokenizer.vocab_size)
    model.calibrate_(3.0, 0.0)  # spread the random logits over (0, 1)
    ckpt = root / "itm"
    save_checkpoint(model, ckpt, preset="beit3-tiny", tokenizer=tokenizer)
    images = shapes(root / "shapes")
    captions = root / "captions.txt"
    captions.write_text("\n".join(caption(c, s) for c, s in pairs()) + "\n")
    index_images([root / "shapes"], root / "db", ckpt, num_workers=0)
    index_texts(captions, root / "db")
    return root, ckpt, images


def _probabilities(ckpt_dir, images, text):
    """Match probabilities computed straight from the model, bypassing the Searcher."""
    from beit3.transforms import load_image_tensor

    ckpt = load_checkpoint(ckpt_dir)
    pixels = torch.stack([load_image_tensor(p, ckpt.preprocess) for p in images])
    batch = ckpt.tokenizer([text] * len(images))
    with torch.inference_mode():
        probs = ckpt.matcher.match_probability(pixels, batch.text_ids, batch.padding_mask)
    return {str(p): float(v) for p, v in zip(images, probs, strict=True)}


def test_text_query_hits_are_ordered_by_the_matchers_probability(matcher_index):
    root, ckpt, images = matcher_index
    searcher = Searcher(root / "db", device="cpu")
    plain = searcher.search("a red circle", "images", k=12)
    hits = searcher.search("a red circle", "images", k=12, rerank=12)
    assert {h.id for h in hits} == {h.id for h in plain}  # the same 12 candidates
    assert all(h.match is None for h in plain)
    truth = _probabilities(ckpt, [h.path for h in hits], "a red circle")
    for hit in hits:
        assert hit.match == pytest.approx(truth[hit.path], abs=1e-5)
        assert hit.score == pytest.approx(next(p.score for p in plain if p.id == hit.id))
    assert [h.match for h in hits] == sorted((h.match for h in hits), reverse=True)
    assert [h.rank for h in hits] == list(range(1, 13))
    # Pages are cut from the one reranked list; past the candidates there is nothing.
    page = searcher.search("a red circle", "images", k=5, offset=5, rerank=12)
    assert [h.id for h in page] == [h.id for h in hits[5:10]] and page[0].rank == 6
    assert searcher.search("a red circle", "images", k=5, offset=12, rerank=12) == []
    # min_match keeps exactly the hits at or above the cutoff, in the same order.
    cutoff = hits[4].match
    kept = searcher.search("a red circle", "images", k=12, rerank=12, min_match=cutoff)
    assert [h.id for h in kept] == [h.id for h in hits if h.match >= cutoff]


def test_image_query_reranks_texts_and_same_modality_is_refused(matcher_index):
    root, _, images = matcher_index
    searcher = Searcher(root / "db", device="cpu")
    hits = searcher.search(images[0], "texts", k=4, rerank=8)
    assert len(hits) == 4 and all(0.0 <= h.match <= 1.0 for h in hits)
    with open(images[0], "rb") as f:  # a file object is read once, for both passes
        assert [h.id for h in searcher.search(f, "texts", k=4, rerank=8)] == [h.id for h in hits]
    with pytest.raises(InputDataError, match="image-text pairs"):
        searcher.search("a red circle", "texts", k=4, rerank=8)
    with pytest.raises(InputDataError, match="min_match needs reranking"):
        searcher.search("a red circle", "images", k=4, min_match=0.5)


def test_a_vanished_candidate_is_skipped_with_a_warning(matcher_index, tmp_path, caplog):
    root, _, _ = matcher_index
    db = tmp_path / "db"
    shutil.copytree(root / "db", db)
    searcher = Searcher(db, model=root / "itm", device="cpu")
    before = searcher.search("a blue square", "images", k=8, rerank=8)
    gone = before[0].path
    moved = tmp_path / "moved.png"
    shutil.move(gone, moved)
    try:
        after = searcher.search("a blue square", "images", k=8, rerank=8)
    finally:
        shutil.move(moved, gone)
    assert gone not in {h.path for h in after} and len(after) == 7
    assert any("rerank: skipped" in r.message and gone in r.message for r in caplog.records)


def test_a_model_without_a_matcher_says_how_to_get_one(tmp_path, tiny_checkpoint):
    from tests.indexer.helpers import shapes

    shapes(tmp_path / "shapes")
    index_images([tmp_path / "shapes"], tmp_path / "db", tiny_checkpoint, num_workers=0)
    searcher = Searcher(tmp_path / "db", device="cpu")
    with pytest.raises(CheckpointError, match="no matcher: fine-tune it with --itm"):
        searcher.search("a red circle", "images", k=3, rerank=8)


def test_cli_search_rerank_prints_and_returns_match(matcher_index):
    from typer.testing import CliRunner

    from app.cli import cli

    root, _, _ = matcher_index
    runner = CliRunner()
    args = ["search", "a red circle", "--db", str(root / "db"), "--k", "3", "--rerank", "8"]
    out = runner.invoke(cli, [*args, "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert len(rows) == 3 and all(0.0 <= r["match"] <= 1.0 for r in rows)
    text = runner.invoke(cli, args)
    assert text.exit_code == 0 and "match" in text.stdout
    none = runner.invoke(cli, [*args, "--min-match", "1.0"])
    assert none.exit_code == 0 and "no confident match" in none.output


@pytest.mark.parametrize("mode", ["keyword", "hybrid"])
def test_rerank_reorders_the_candidates_of_keyword_and_hybrid_modes(matcher_index, mode):
    root, ckpt, _ = matcher_index
    searcher = Searcher(root / "db", device="cpu")
    plain = searcher.search("red circle", "images", k=8, mode=mode)
    hits = searcher.search("red circle", "images", k=8, rerank=8, mode=mode)
    assert {h.id for h in hits} == {h.id for h in plain}  # that mode's 8 candidates
    truth = _probabilities(ckpt, [h.path for h in hits], "red circle")
    assert [h.match for h in hits] == pytest.approx(
        sorted((truth[h.path] for h in hits), reverse=True), abs=1e-5
    )
    kept = searcher.search("red circle", "images", k=8, rerank=8, mode=mode, min_match=0.5)
    assert all(h.match >= 0.5 for h in kept) and len(kept) == sum(v >= 0.5 for v in truth.values())


def test_the_matcher_behind_lancedbs_own_reranker_interface(matcher_index, tiny_checkpoint):
    # LanceDB's query builder, on the table our indexer wrote, with MatcherReranker: the same
    # order and probabilities as Searcher.search(rerank=K).
    import lancedb

    from indexer.lance_reranker import MatcherReranker

    root, ckpt_dir, _ = matcher_index
    ckpt = load_checkpoint(ckpt_dir)
    batch = ckpt.tokenizer(["a red circle"])
    with torch.inference_mode():
        vector = ckpt.retrieval_model.encode_text(batch.text_ids, batch.padding_mask)[0].numpy()
    conn = lancedb.connect(str(root / "db" / "lancedb"))
    names = conn.list_tables().tables
    name = next(n for n in names if n.startswith("images"))
    table = conn.open_table(name)
    reranker = MatcherReranker(ckpt_dir)
    out = table.search(vector).limit(12).rerank(reranker, query_string="a red circle").to_arrow()
    ours = Searcher(root / "db", device="cpu").search("a red circle", "images", k=12, rerank=12)
    assert out["path"].to_pylist() == [h.path for h in ours]
    assert out["_relevance_score"].to_pylist() == pytest.approx([h.match for h in ours], abs=1e-5)
    assert "_distance" not in out.column_names
    full = MatcherReranker(ckpt, return_score="all")
    kept = table.search(vector).limit(4).rerank(full, query_string="a red circle").to_arrow()
    assert "_distance" in kept.column_names and len(kept) == 4
    texts = conn.open_table(next(n for n in names if n.startswith("texts")))
    with pytest.raises(InputDataError, match="text query against an image table"):
        texts.search(vector).limit(4).rerank(reranker, query_string="a red circle").to_arrow()
    with pytest.raises(CheckpointError, match="no matcher: fine-tune it with --itm"):
        MatcherReranker(tiny_checkpoint)
