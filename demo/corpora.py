"""Broad English text for the demo recipe's tokenizer and text pre-training, built offline.

    apt-get install -y --no-install-recommends wordnet-base
    python demo/corpora.py --out .cache/corpora/wordnet.txt     # 117,659 lines, ~1 s

WordNet 3.0 (Debian ``wordnet-base``; the WordNet 3.0 licence, Princeton University: use, copy,
modify and distribute with its copyright notice, see ``/usr/share/doc/wordnet-base/copyright``):
one line per synset, its lemmas then its gloss, e.g. ``flamingo: large pink to scarlet web-footed
wading bird with down-bent bill; inhabits brackish lakes``. Unlike the emoji names (the only text
the recipe saw before), it covers everyday English: function words, animals, objects, actions,
colours, so that a tokenizer trained on it spells the captions of other domains in whole words.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
_PARTS = ("noun", "verb", "adj", "adv")
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: "galore(ip)"


def wordnet_texts(root: Path = WORDNET) -> Iterator[str]:
    """One ``"lemma, lemma: gloss"`` text per synset of the WordNet data files under ``root``.

    Raises:
        SystemExit: the data files are missing (with the apt-get line that installs them).
    """
    missing = [p for p in _PARTS if not (root / f"data.{p}").is_file()]
    if missing:
        raise SystemExit(
            f"error: {root}: no WordNet data files ({', '.join('data.' + p for p in missing)}); "
            "apt-get install -y --no-install-recommends wordnet-base"
        )
    for part in _PARTS:
        with open(root / f"data.{part}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                count = int(fields[3], 16)
                lemmas = [
                    _MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(count)
                ]
                yield ", ".join(dict.fromkeys(lemmas)) + ": " + " ".join(gloss.split())


def write_wordnet(out: Path, root: Path = WORDNET) -> Path:
    """Write :func:`wordnet_texts` to ``out`` (one per line), atomically; returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for text in wordnet_texts(root):
            f.write(text + "\n")
    tmp.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wordnet", type=Path, default=WORDNET)
    args = parser.parse_args()
    path = write_wordnet(args.out, args.wordnet)
    lines = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"{path}: {lines:,} texts from {args.wordnet}", file=sys.stderr)


if __name__ == "__main__":
    main()
