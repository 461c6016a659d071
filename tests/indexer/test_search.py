import math
from pathlib import Path

import numpy as np
import pytest
import torch

from beit3 import ImageTransform, InputDataError, load_checkpoint, load_image
from indexer import Searcher, index_images, index_texts
from tests.data import caption, pairs
from tests.indexer.helpers import rows


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_checkpoint):
    """The 32 shapes and their captions in a LanceDB and a FAISS flat database."""
    from tests.indexer.helpers import shapes

    root = tmp_path_factory.mktemp("search")
    images = shapes(root / "shapes")
    captions = root / "captions.txt"
    captions.write_text("\n".join(caption(c, s) for c, s in pairs()) + "\n")
    for backend in ("lancedb", "faiss"):
        index_images(
            [root / "shapes"], root / backend, tiny_checkpoint, backend=backend, num_workers=0
        )
        index_texts(captions, root / backend, backend=backend)
    return root, images, captions


def _truth(ckpt, images: list[Path], texts: list[str]):
    """Exact embeddings computed straight from the model, bypassing the indexer."""
    transform = ImageTransform(ckpt.preprocess)
    with torch.inference_mode():
        img = ckpt.model.encode_image(torch.stack([transform(load_image(p)) for p in images]))
        batch = ckpt.tokenizer(texts)
        txt = ckpt.model.encode_text(batch.text_ids, batch.padding_mask)
    return img.numpy(), txt.numpy()


def test_all_four_directions_rank_like_exact_model_scores(indexed, tiny_checkpoint):
    root, images, _ = indexed
    texts = [caption(c, s) for c, s in pairs()]
    img_vecs, txt_vecs = _truth(load_checkpoint(tiny_checkpoint), images, texts)
    searcher = Searcher(root / "lancedb", device="cpu")
    cases = [  # (query, its exact vector, table, the table's exact vectors, labels)
        (
            "a red circle",
            txt_vecs[texts.index("a red circle")],
            "images",
            img_vecs,
            [str(p) for p in images],
        ),
        (images[5], img_vecs[5], "texts", txt_vecs, texts),
        (images[7], img_vecs[7], "images", img_vecs, [str(p) for p in images]),
        ("a blue cross", txt_vecs[texts.index("a blue cross")], "texts", txt_vecs, texts),
    ]
    for query, vector, table, matrix, labels in cases:
        hits = searcher.search(query, table, k=5)
        scores = matrix @ vector
        order = np.argsort(-scores)[:5]
        assert [h.path or h.text for h in hits] == [labels[i] for i in order], query
        np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-4)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    same = searcher.search(images[7], "images", k=1)[0]
    assert same.path == str(images[7]) and same.score == pytest.approx(1.0, abs=1e-5)
    same = searcher.search("a blue cross", "texts", k=1)[0]
    assert same.text == "a blue cross" and same.score == pytest.approx(1.0, abs=1e-5)


def test_lancedb_and_faiss_flat_return_the_same_top_k(indexed):
    root, images, _ = indexed
    lance, faiss = Searcher(root / "lancedb"), Searcher(root / "faiss")
    assert lance.tables["images"].backend == "lancedb" and faiss.tables["images"].backend == "faiss"
    for query, table in [
        ("a red circle", "images"),
        ("a green square", "texts"),
        (images[3], "images"),
        (images[20], "texts"),
    ]:
        for offset in (0, 7):
            a = lance.search(query, table, k=10, offset=offset)
            b = faiss.search(query, table, k=10, offset=offset)
            assert [h.id for h in a] == [h.id for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
            assert [h.rank for h in a] == list(range(offset + 1, offset + 11))


def test_offset_pages_through_the_ranking(indexed):
    root, _, _ = indexed
    searcher = Searcher(root / "faiss")
    full = searcher.search("a red circle", "images", k=32)
    pages = [
        h
        for off in (0, 10, 20, 30)
        for h in searcher.search("a red circle", "images", k=10, offset=off)
    ]
    assert [h.id for h in pages] == [h.id for h in full] and len(full) == 32
    assert searcher.search("a red circle", "images", k=5, offset=40) == []


def test_search_similar_uses_the_stored_vector_and_skips_the_item_itself(indexed):
    root, images, _ = indexed
    searcher = Searcher(root / "lancedb")
    item = searcher.search(images[2], "images", k=1)[0]
    similar = searcher.search_similar("images", item.id, target="images", k=5)
    direct = searcher.search(images[2], "images", k=6)
    assert [h.id for h in similar] == [h.id for h in direct[1:]]
    assert [h.rank for h in similar] == [1, 2, 3, 4, 5] and item.id not in {h.id for h in similar}
    to_texts = searcher.search_similar("images", item.id, target="texts", k=3)
    assert [h.id for h in to_texts] == [h.id for h in searcher.search(images[2], "texts", k=3)]
    stored = rows(root / "lancedb", "images")[item.id]["vector"]
    np.testing.assert_allclose(searcher.get_vector("images", item.id), stored)


def test_get_returns_indexed_items_only(indexed):
    root, images, _ = indexed
    searcher = Searcher(root / "faiss")
    item = searcher.search(images[0], "images", k=1)[0]
    got = searcher.get("images", item.id)
    assert got is not None and got.path == str(images[0]) and got.paths == (str(images[0]),)
    assert got.rank == 0 and math.isnan(got.score)
    assert searcher.get("images", "0" * 64) is None
    assert searcher.get("images", "../../etc/passwd") is None
    with pytest.raises(InputDataError, match="has no item"):
        searcher.search_similar("images", "f" * 64, target="texts")


def test_query_errors_are_clear(indexed):
    root, _, _ = indexed
    searcher = Searcher(root / "lancedb")
    assert set(searcher.tables) == {"images", "texts"}
    info = searcher.tables["texts"]
    assert (info.modality, info.count, info.dim, info.model_id) == (
        "text",
        32,
        64,
        searcher.model_id,
    )
    with pytest.raises(InputDataError, match="has no table 'nope'; its tables: images, texts"):
        searcher.search("x", "nope")
    with pytest.raises(InputDataError, match="the text query is empty"):
        searcher.search("  ", "images")
    with pytest.raises(InputDataError, match="not a readable image"):
        searcher.search(b"not an image", "images")
    with pytest.raises(InputDataError, match="k must be >= 1"):
        searcher.search("x", "images", k=0)
    with pytest.raises(InputDataError, match="is not a beit3 index"):
        Searcher(root / "nowhere")
