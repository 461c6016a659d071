"""The demo recipe's broad text (demo/corpora.py): WordNet's data files -> one text per synset."""

from __future__ import annotations

import pytest

from demo.corpora import wordnet_texts, write_wordnet

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
NOUNS = (
    "02009750 05 n 02 flamingo 0 Phoenicopterus_ruber 0 001 @ 02009508 n 0000 | large pink to "
    "scarlet web-footed wading bird with down-bent bill; inhabits brackish lakes  \n"
)
ADJS = "01386234 00 s 01 galore(ip) 0 001 & 01382086 a 0000 | in great numbers  \n"


def _wordnet(tmp_path, **parts):
    for part in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{part}").write_text(HEADER + parts.get(part, ""), encoding="latin-1")
    return tmp_path


def test_one_text_per_synset_lemmas_then_gloss(tmp_path):
    root = _wordnet(tmp_path, noun=NOUNS, adj=ADJS)
    assert list(wordnet_texts(root)) == [
        "flamingo, Phoenicopterus ruber: large pink to scarlet web-footed wading bird with "
        "down-bent bill; inhabits brackish lakes",
        "galore: in great numbers",  # the position marker (ip) is dropped
    ]
    out = write_wordnet(tmp_path / "out" / "wordnet.txt", root)
    assert out.read_text().splitlines() == list(wordnet_texts(root))


def test_missing_wordnet_names_the_package(tmp_path):
    with pytest.raises(SystemExit, match=r"data.noun.*apt-get install .*wordnet-base"):
        list(wordnet_texts(tmp_path))
