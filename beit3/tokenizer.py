"""Text tokenizer producing the official BEiT-3 ids from any sentencepiece model.

Id layout (XLM-R / fairseq, as ``beit3.spm`` is used by the official code):
``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, a normal piece = its sentencepiece id + 1,
``<mask>`` = number of pieces + 1 (64001 for ``beit3.spm``). A text becomes
``[0] + pieces[:max_len - 2] + [2]``; the padding mask is True at padding.

We call sentencepiece directly: under transformers 5, ``XLMRobertaTokenizer(vocab_file=...)``
silently maps everything to ``<unk>`` (see shared/reference/environment.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from beit3.errors import CheckpointError, ConfigError

__all__ = ["TextBatch", "TextTokenizer", "train_sentencepiece"]

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPM_FILENAME = "sentencepiece.bpe.model"  # the name XLMRobertaTokenizer.from_pretrained expects


class TextBatch(NamedTuple):
    """text_ids (B, L) long; padding_mask (B, L) bool, True = padding."""

    text_ids: Tensor
    padding_mask: Tensor


class TextTokenizer:
    """Sentencepiece model -> official ids.

    Args:
        model_file: a sentencepiece ``.model`` file, or a directory holding ``sentencepiece.bpe.model``.
        max_len: longest sequence including ``<s>`` and ``</s>`` (official: 64).
    """

    def __init__(self, model_file: str | Path, max_len: int = 64) -> None:
        import sentencepiece as spm

        path = Path(model_file)
        if path.is_dir():
            path = path / SPM_FILENAME
        if not path.is_file():
            raise CheckpointError(f"tokenizer model {path} does not exist")
        if max_len < 3:
            raise ConfigError(
                f"max_len must be >= 3 (room for <s>, a piece and </s>), got {max_len}"
            )
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a sentencepiece model: {exc}") from None
        if self.sp.unk_id() != 0:
            raise CheckpointError(
                f"{path}: sentencepiece unk id is {self.sp.unk_id()}, expected 0 (the XLM-R layout); "
                "retrain it with beit3.tokenizer.train_sentencepiece"
            )
        self.max_len = max_len
        self.num_pieces = self.sp.GetPieceSize()

    @property
    def mask_id(self) -> int:
        return self.num_pieces + 1

    @property
    def vocab_size(self) -> int:
        """Ids in use: pieces + ``<pad>`` + ``<mask>`` (64002 for beit3.spm; the model table may be larger)."""
        return self.num_pieces + 2

    def encode(self, text: str) -> list[int]:
        """One text -> ``[0, pieces..., 2]``, at most ``max_len`` ids."""
        pieces = self.sp.EncodeAsIds(text)[: self.max_len - 2]
        return [BOS_ID] + [i + 1 if i != 0 else UNK_ID for i in pieces] + [EOS_ID]

    def __call__(self, texts: str | Sequence[str], pad_to: int | None = None) -> TextBatch:
        """Tokenize and right-pad a batch.

        Args:
            texts: one text or a list of texts.
            pad_to: pad to this length (the official code pads to 64); default: the longest in
                the batch, which gives the same embeddings because padded keys are masked.
        """
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t) for t in texts]
        length = max((len(e) for e in encoded), default=2)
        if pad_to is not None:
            length = max(length, pad_to)
        ids = torch.full((len(encoded), length), PAD_ID, dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        return TextBatch(ids, ids.eq(PAD_ID))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; specials are dropped, ``<mask>`` becomes ``<mask>``."""
        words: list[str] = []
        pieces: list[int] = []
        for i in ids:
            i = int(i)
            if i in (BOS_ID, PAD_ID, EOS_ID):
                continue
            if i == self.mask_id:
                words.append(self.sp.DecodeIds(pieces))
                words.append("<mask>")
                pieces = []
            elif i == UNK_ID:
                pieces.append(0)
            elif 3 < i <= self.num_pieces:
                pieces.append(i - 1)
        words.append(self.sp.DecodeIds(pieces))
        return " ".join(w for w in words if w)

    def save(self, directory: str | Path) -> Path:
        """Copy the sentencepiece model into ``directory`` under its canonical name."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / SPM_FILENAME
        target.write_bytes(self.path.read_bytes())
        return target


def train_sentencepiece(
    texts: Iterable[str],
    output: str | Path,
    vocab_size: int = 8000,
    model_type: str = "unigram",
    lowercase: bool = False,
    seed_sentences: int = 2_000_000,
) -> Path:
    """Train a sentencepiece model with the id layout the tokenizer expects.

    Args:
        texts: training sentences (one per item).
        output: where to write the ``.model`` file (a directory gets ``sentencepiece.bpe.model``).
        vocab_size: number of pieces; a soft limit (smaller corpora give fewer pieces).
        model_type: ``unigram`` (as beit3.spm) or ``bpe``.
        lowercase: case-fold during normalisation (``nmt_nfkc_cf``); baked into the model file.
        seed_sentences: at most this many sentences are used.

    Returns:
        The path of the written model.
    """
    import sentencepiece as spm

    output = Path(output)
    if output.suffix != ".model":
        output.mkdir(parents=True, exist_ok=True)
        output = output / SPM_FILENAME
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        count = 0
        with corpus.open("w", encoding="utf-8") as f:
            for text in texts:
                line = " ".join(text.split())
                if line:
                    f.write(line + "\n")
                    count += 1
        if count == 0:
            raise ConfigError("train_sentencepiece got no non-empty text")
        spm.SentencePieceTrainer.Train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "spm"),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            hard_vocab_limit=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=seed_sentences,
            shuffle_input_sentence=True,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            minloglevel=2,
            num_threads=2,
        )
        output.write_bytes((Path(tmp) / "spm.model").read_bytes())
    return output
