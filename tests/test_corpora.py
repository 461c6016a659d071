"""The demo recipe's broad corpora (demo/corpora.py): WordNet's data files -> one text per
synset; icon themes -> one 64-px image per icon."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.corpora import build_icons, icon_sources, render_icon, wordnet_texts, write_wordnet

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


# --- icons: a theme laid out as Debian's icon packages are, from real images -------------------

EMOJI = Path(__file__).resolve().parents[1] / "demo" / "data" / "emoji" / "images"
STAR_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">'
    '<rect x="2" y="2" width="12" height="12" fill="#ff0000"/></svg>'
)
needs_rsvg = pytest.mark.skipif(
    shutil.which("rsvg-convert") is None, reason="librsvg2-bin (make system-deps) not installed"
)


def _theme(root: Path) -> Path:
    def put(rel: str, source: Path | None = None, text: str | None = None) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            path.write_text(text)
        else:
            shutil.copy(source, path)

    cat, dog, frog = (EMOJI / f"{c}.png" for c in ("1f431", "1f436", "1f438"))
    put("48x48/apps/cat.png", cat)
    put("64x64/apps/cat.png", cat)  # >= 64 px wins over 48
    put("48x48/apps/dog.png", dog)  # only 48: kept
    put("32x32/apps/tiny.png", frog)  # only below 48: left out
    put("scalable/apps/star.svg", text=STAR_SVG)
    put("symbolic/apps/cat-symbolic.svg", text=STAR_SVG)  # one-colour icons: left out
    put("64x64/apps/frog.png", frog)
    put("64x64/apps/frog-again.png", frog)  # the same pixels under another name
    Image.new("RGB", (64, 64), "white").save(root / "64x64/apps/blank.png")
    (root / "64x64/apps/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (root / "64x64/apps/alias.png").symlink_to(root / "64x64/apps/cat.png")  # another name's file
    return root


def test_icon_sources_pick_one_file_per_name(tmp_path):
    theme = _theme(tmp_path / "Theme")
    picked = {name: str(path.relative_to(theme)) for name, path in icon_sources(theme).items()}
    assert picked == {
        "blank": "64x64/apps/blank.png",
        "broken": "64x64/apps/broken.png",
        "cat": "64x64/apps/cat.png",
        "dog": "48x48/apps/dog.png",
        "frog": "64x64/apps/frog.png",
        "frog-again": "64x64/apps/frog-again.png",
        "star": "scalable/apps/star.svg",
    }


@needs_rsvg
def test_render_icon_on_white_at_64(tmp_path):
    theme = _theme(tmp_path / "Theme")
    star = np.asarray(render_icon(theme / "scalable/apps/star.svg"))
    assert star.shape == (64, 64, 3)
    assert tuple(star[32, 32]) == (255, 0, 0) and tuple(star[1, 1]) == (255, 255, 255)
    dog = render_icon(theme / "48x48/apps/dog.png")  # a 48-px icon is scaled up to 64
    assert dog.size == (64, 64) and dog.mode == "RGB"


@needs_rsvg
def test_build_icons_counts_what_it_leaves_out(tmp_path):
    debs = tmp_path / "debs"
    unpacked = debs / "test-icon-theme"  # as fetch_debs leaves a package: nothing is downloaded
    _theme(unpacked / "usr/share/icons/Theme")
    (unpacked / "usr/share/doc/test-icon-theme").mkdir(parents=True)
    (unpacked / "usr/share/doc/test-icon-theme/copyright").write_text("License: CC0-1.0\n")
    (unpacked / ".version").write_text("1.0-1")
    (unpacked / ".unpacked").touch()
    out = tmp_path / "icons"
    summary = build_icons(out, {"test-icon-theme": "Theme"}, debs=debs)
    assert summary["themes"]["Theme"] == {
        "package": "test-icon-theme",
        "version": "1.0-1",
        "licences": ["CC0-1.0"],
        "names": 7,
        "kept": 4,  # cat, dog, frog, star
        "blank": 1,
        "duplicate": 1,
        "unreadable": 1,
    }
    assert sorted(p.name for p in (out / "Theme").iterdir()) == [
        "cat.png",
        "dog.png",
        "frog.png",  # the first name (in order) of the same pixels
        "star.png",
    ]
    assert build_icons(out, {"test-icon-theme": "Theme"}, debs=debs) == summary  # done once
