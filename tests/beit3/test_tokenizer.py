import pytest
import torch

from beit3 import CheckpointError, TextTokenizer
from beit3.tokenizer import SPM_FILENAME

TEXTS = [
    "a red circle",
    "A Blue SQUARE!",
    "",
    "zebra xylophone quokka 42 ünïcödé 🍕",
    "a green triangle " * 30,
]


def test_ids_equal_xlm_roberta_tokenizer(spm_path, tmp_path):
    """transformers' XLMRobertaTokenizer is what the official code uses on beit3.spm."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / SPM_FILENAME).write_bytes(spm_path.read_bytes())
    hf = transformers.XLMRobertaTokenizer.from_pretrained(str(tmp_path))
    ours = TextTokenizer(spm_path, max_len=64)
    for text in TEXTS:
        expected = hf.convert_tokens_to_ids(hf.tokenize(text))[:62]
        assert ours.encode(text) == [0, *expected, 2], text
    assert ours.mask_id == hf.convert_tokens_to_ids("<mask>") == ours.num_pieces + 1


def test_batch_layout_padding_and_truncation(tokenizer):
    batch = tokenizer(TEXTS)
    ids, pad = batch
    assert ids.dtype == torch.long and pad.dtype == torch.bool
    assert ids.shape[1] == 64  # the long text fills max_len
    assert (ids[:, 0] == 0).all()
    assert ids[2].tolist()[:3] == [0, 2, 1]  # empty text: <s> </s> then padding
    assert pad[2].tolist()[:3] == [False, False, True]
    assert torch.equal(pad, ids.eq(1))
    lengths = (~pad).sum(1)
    assert (ids[torch.arange(len(TEXTS)), lengths - 1] == 2).all()  # </s> ends every row
    assert tokenizer(["a red circle"], pad_to=64).text_ids.shape == (1, 64)


def test_unknown_characters_map_to_unk_and_decode_round_trips(tokenizer):
    assert tokenizer.decode(tokenizer.encode("a red circle")) == "a red circle"
    ids = tokenizer.encode("a red ☃")
    assert 3 in ids  # the snowman never appeared in the training text
    masked = tokenizer.encode("a red circle")
    masked[2] = tokenizer.mask_id
    assert "<mask>" in tokenizer.decode(masked)


def test_missing_or_bad_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TextTokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a sentencepiece model"):
        TextTokenizer(bad)


def test_lowercase_option_folds_case(tmp_path):
    from beit3 import train_sentencepiece
    from tests.data import caption_corpus

    path = train_sentencepiece(caption_corpus(), tmp_path / "cf", vocab_size=200, lowercase=True)
    tok = TextTokenizer(path)
    assert tok.encode("A RED Circle") == tok.encode("a red circle")
