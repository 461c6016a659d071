"""The demo recipe's broad corpora (demo/corpora.py): WordNet's data files -> one text per
synset; icon themes -> one 64-px image per icon; clip art -> captioned 64-px pairs."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit3.data import read_pairs
from demo.corpora import (
    build_clipart,
    build_icons,
    clipart_caption,
    clipart_metadata,
    icon_sources,
    render_icon,
    wordnet_texts,
    write_wordnet,
)

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


# --- clip art: Open Clip Art SVGs with their RDF metadata -> captioned pairs -------------------


def _clipart_svg(title: str, keywords: list[str], creator: str, shape: str) -> str:
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:cc="http://web.resource.org/cc/" '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" width="16" height="16">'
        f"<metadata><rdf:RDF><cc:Work><dc:title>{title}</dc:title>"
        f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
        f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>"
        "</cc:Work></rdf:RDF></metadata>"
        f"{shape}</svg>"
    )


def test_clipart_caption_title_then_telling_keywords():
    meta = clipart_metadata(
        _clipart_svg(
            "Baseball Glove (B and W)",
            ["sports", "hash", "baseball", "glove", "gerald g", "equipment", "extra"],
            "Gerald G.",
            "",
        )
    )
    assert meta["title"] == "Baseball Glove (B and W)" and meta["creator"] == "Gerald G."
    titles = collections.Counter({"baseball glove (b and w)": 1, "part of a collection": 50})
    # generic ("hash"), already in the title ("baseball", "glove"), the creator's name: left out
    assert clipart_caption(meta, "baseball_glove_bw_ganson", titles) == (
        "Baseball Glove, sports, equipment, extra"
    )
    shared = {"title": "Part of a Collection", "keywords": ["icons", "bee"], "creator": ""}
    assert clipart_caption(shared, "bumble_bee1_01", titles) == "bumble bee"  # the file name
    signed = {"title": "Jean Victor", "keywords": ["bird", "jean"], "creator": "Jean Victor"}
    assert clipart_caption(signed, "jean_victor_01", titles) == "bird"  # no name as the title


@needs_rsvg
def test_build_clipart_pairs_leave_out_bulk_blank_and_the_peer_domain(tmp_path):
    debs = tmp_path / "debs"
    svg = debs / "openclipart-svg" / "usr/share/openclipart/svg"
    red = '<rect x="2" y="2" width="12" height="12" fill="#ff0000"/>'
    disc = '<circle cx="8" cy="8" r="5" fill="#0000ff"/>'
    bar = '<rect x="1" y="6" width="14" height="3" fill="#00aa00"/>'
    files = {
        "food/fruit/apple.svg": _clipart_svg("Apple", ["food", "fruit"], "A", red),
        "animals/blue_ball.svg": _clipart_svg("Blue Ball", ["toy"], "B", disc),
        "animals/zebra.svg": _clipart_svg("Zebra", [], "B", disc),  # the same pixels, later
        "tools/stick.svg": _clipart_svg("Stick", ["wood"], "C", bar),  # a stamp's twin
        "shapes/stars/star.svg": _clipart_svg("Star", [], "D", red),  # a bulk category
        "people/blank.svg": _clipart_svg("Nothing", [], "E", ""),
        "people/broken.svg": "<svg not closed",
    }
    for rel, text in files.items():
        (svg / rel).parent.mkdir(parents=True, exist_ok=True)
        (svg / rel).write_text(text)
    stamps = debs / "tuxpaint-stamps-default" / "usr/share/tuxpaint/stamps/things"
    stamps.mkdir(parents=True)
    render_icon(svg / "tools/stick.svg").save(stamps / "stick.png")
    for package in ("openclipart-svg", "tuxpaint-stamps-default"):
        (debs / package / ".version").write_text("1.0-1")
        (debs / package / ".unpacked").touch()
    out = tmp_path / "clipart"
    summary = build_clipart(out, debs=debs)
    assert {k: summary[k] for k in ("files", "skipped_category", "kept", "near_reference")} == {
        "files": 7,
        "skipped_category": 1,
        "kept": 2,
        "near_reference": 1,
    }
    assert (summary["blank"], summary["duplicate"], summary["unreadable"]) == (1, 1, 1)
    pairs = read_pairs(out / "pairs.jsonl")
    assert sorted(p.text for p in pairs) == ["Apple, food, fruit", "Blue Ball, toy"]
    assert all(Path(p.image).is_file() and Image.open(p.image).size == (64, 64) for p in pairs)
    assert build_clipart(out, debs=debs) == summary  # done once
