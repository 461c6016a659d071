"""Broad text and images for the demo recipe's tokenizer and pre-training, built offline.

    apt-get install -y --no-install-recommends wordnet-base
    python demo/corpora.py --out .cache/corpora/wordnet.txt     # 117,659 lines, ~1 s
    python demo/corpora.py --icons .cache/corpora/icons         # icon themes -> 64-px PNGs
    python demo/corpora.py --clipart .cache/corpora/clipart     # captioned clip art -> pairs.jsonl

WordNet 3.0 (Debian ``wordnet-base``; the WordNet 3.0 licence, Princeton University: use, copy,
modify and distribute with its copyright notice, see ``/usr/share/doc/wordnet-base/copyright``):
one line per synset, its lemmas then its gloss, e.g. ``flamingo: large pink to scarlet web-footed
wading bird with down-bent bill; inhabits brackish lakes``. Unlike the emoji names (the only text
the recipe saw before), it covers everyday English: function words, animals, objects, actions,
colours, so that a tokenizer trained on it spells the captions of other domains in whole words.

Icons (``--icons``): the Debian packages of six icon themes (:data:`ICON_THEMES`), fetched with
``apt-get download`` (no root: nothing is installed) and unpacked with ``dpkg-deb -x`` in
``<out>-debs``; one image per icon name and theme (a PNG of 64 px or more, else the SVG rendered
by ``rsvg-convert`` from Debian's ``librsvg2-bin``, else a 48-px PNG), on white, 64 x 64, as
the emoji are; symbolic (one-colour) icons, the dark variants of a theme, near-blank images and
exact duplicates left out. Their licences (``icons.json`` records each package's version and
licence): Tango public domain, Oxygen LGPL-3+, Moka CC-BY-SA-4.0 or GPL-3+, Faenza GPL-3+,
elementary GPL-3+, Papirus GPL-3; the images stay in the recipe's work directory, only a model
trained on them is bundled. None of them is emoji art or Tux Paint's stamps (the held-out peer
domain, bench/peer).

Clip art with captions (``--clipart``): the Open Clip Art Library of Debian's ``openclipart-svg``
(0.18; public domain, see its copyright file), each SVG rendered at 64 px on white and captioned
from its own metadata: its title (or, where the title names a collection shared by many files,
its file name), then up to three of its keywords, e.g. ``Ice Cream Cone, dessert, food``. Pairs,
not bare images: what ties broad pictures to words. Abstract and bulk categories are left out
(stars, gradients, patterns, jigsaw pieces, playing cards, maps, logos, flags, UI icon sets),
and so is every picture near-identical to a Tux Paint stamp (some stamps come from the same
library: the held-out peer domain stays unseen) or to an emoji image (16 x 16 colour thumbnails,
cosine above :data:`NEAR_DUPLICATE`).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import html
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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


# package -> the theme folder under usr/share/icons kept (the others are dark or panel variants)
ICON_THEMES = {
    "tango-icon-theme": "Tango",
    "oxygen-icon-theme": "oxygen",
    "moka-icon-theme": "Moka",
    "faenza-icon-theme": "Faenza",
    "elementary-icon-theme": "elementary",
    "papirus-icon-theme": "Papirus",
}
ICON_SIZE = 64
_SIZE_DIR = re.compile(r"^(\d+)(?:x\d+)?(?:@(\d)x)?$")  # 48, 48x48, 48x48@2x


def fetch_debs(packages: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` each package into ``dest`` (once) and unpack it beside; returns
    package -> unpacked root.

    Raises:
        SystemExit: apt-get could not fetch a package (its message, and the package).
    """
    dest.mkdir(parents=True, exist_ok=True)
    roots = {}
    for package in packages:
        root = dest / package
        if not (root / ".unpacked").exists():
            debs = sorted(dest.glob(f"{package}_*.deb"))
            if not debs:
                done = subprocess.run(
                    ["apt-get", "download", package], cwd=dest, capture_output=True, text=True
                )
                debs = sorted(dest.glob(f"{package}_*.deb"))
                if done.returncode != 0 or not debs:
                    raise SystemExit(
                        f"error: apt-get download {package} failed: "
                        f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}"
                    )
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
            (root / ".version").write_text(
                subprocess.run(
                    ["dpkg-deb", "-f", str(debs[-1]), "Version"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            )
            (root / ".unpacked").touch()
        roots[package] = root
    return roots


def icon_sources(theme_dir: Path) -> dict[str, Path]:
    """The best file of each icon name in one theme: a PNG of >= 64 px (the smallest such),
    else an SVG (any size: rendered at 64), else a PNG of 48 px; symbolic icons and symlinks
    (another name's file) left out."""
    best: dict[str, tuple[tuple, Path]] = {}
    for path in theme_dir.rglob("*"):
        if path.suffix not in (".png", ".svg") or path.is_symlink() or not path.is_file():
            continue
        parts = path.relative_to(theme_dir).parts
        name = path.stem
        if "symbolic" in name or any("symbolic" in p for p in parts):
            continue
        size = 0
        for part in parts[:-1]:
            m = _SIZE_DIR.match(part)
            if m:
                size = int(m.group(1)) * int(m.group(2) or 1)
        if path.suffix == ".png":
            if size >= ICON_SIZE:
                rank = (0, size)
            elif size >= 48:
                rank = (2, -size)
            else:
                continue
        else:
            rank = (1, -size)
        if name not in best or rank < best[name][0]:
            best[name] = (rank, path)
    return {name: path for name, (_, path) in sorted(best.items())}


def render_icon(path: Path, size: int = ICON_SIZE):
    """The icon as a ``size`` x ``size`` RGB image on white (an SVG through rsvg-convert)."""
    from PIL import Image

    if path.suffix == ".svg":
        png = subprocess.run(
            ["rsvg-convert", "-w", str(size), "-h", str(size), "-f", "png", str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
        image = Image.open(io.BytesIO(png))
    else:
        image = Image.open(path)
    image = image.convert("RGBA")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def _blank(image) -> bool:
    """Near-blank on white: under 3% of the pixels differ visibly from white."""
    import numpy as np

    arr = np.asarray(image, dtype=np.int16)
    return float(((255 - arr).max(axis=2) > 24).mean()) < 0.03


def build_icons(
    out: Path, themes: dict[str, str] = ICON_THEMES, debs: Path | None = None, workers: int = 2
) -> dict:
    """Fetch, pick, render and de-duplicate the icon themes into ``out/<theme>/<name>.png``
    (the packages in ``debs``, default ``<out>-debs`` beside it, so that ``out`` holds only the
    images); writes and returns ``out/icons.json`` (counts, versions, licences). Done once: an
    existing icons.json is returned as is."""
    summary_path = out / "icons.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    roots = fetch_debs(list(themes), debs or out.with_name(out.name + "-debs"))
    seen: set[str] = set()
    summary: dict = {"size": ICON_SIZE, "themes": {}, "images": 0}
    for package, theme in themes.items():
        root = roots[package]
        sources = icon_sources(root / "usr" / "share" / "icons" / theme)
        dest = out / theme
        dest.mkdir(parents=True, exist_ok=True)
        counts = {"names": len(sources), "kept": 0, "blank": 0, "duplicate": 0, "unreadable": 0}

        def load(item: tuple[str, Path]):
            try:
                return item[0], render_icon(item[1])
            except Exception:  # noqa: BLE001 - a broken icon file is counted, not fatal
                return item[0], None

        with ThreadPoolExecutor(workers) as pool:
            for name, image in pool.map(load, sources.items()):
                if image is None:
                    counts["unreadable"] += 1
                    continue
                if _blank(image):
                    counts["blank"] += 1
                    continue
                digest = hashlib.sha1(image.tobytes()).hexdigest()
                if digest in seen:
                    counts["duplicate"] += 1
                    continue
                seen.add(digest)
                image.save(dest / f"{name}.png", optimize=True)
                counts["kept"] += 1
        copyright_file = root / "usr" / "share" / "doc" / package / "copyright"
        licences = re.findall(r"^License: (.+)$", copyright_file.read_text(errors="replace"), re.M)
        summary["themes"][theme] = {
            "package": package,
            "version": (root / ".version").read_text(),
            "licences": sorted(set(licences)),
            **counts,
        }
        summary["images"] += counts["kept"]
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(summary_path)
    return summary


CLIPART_PACKAGE = "openclipart-svg"
STAMPS_PACKAGE = "tuxpaint-stamps-default"  # the peer domain's source, only to keep it out
EMOJI_IMAGES = Path(__file__).resolve().parent / "data" / "emoji" / "images"
# Categories left out: abstract shapes and bulk series (1,378 stars, 1,853 UI icons, 551 flags,
# decks of cards) whose titles say little about the picture.
CLIPART_SKIP = (
    "special/",
    "shapes/",
    "computer/icons/",
    "signs_and_symbols/flags/",
    "signs_and_symbols/led/",
    "recreation/games/cards/",
    "geography/",
    "logos/",
    "unsorted/",
)
NEAR_DUPLICATE = 0.9
_COLLECTION = 6  # a title shared by more files than this names a collection, not a picture
_GENERIC_WORDS = {
    "hash", "icon", "icons", "computer", "sign", "symbol", "signs and symbols", "clip art",
    "clipart", "image", "media", "svg", "png", "public domain", "externalsource", "unchecked",
    "unsorted", "mapsym", "map symbol", "networksym", "theme", "lemon theme icon",
}  # fmt: skip


def clipart_metadata(svg: str) -> dict:
    """Title, description, keywords and creator of an Open Clip Art SVG (its cc:Work RDF)."""
    work = re.search(r"<cc:Work.*?</cc:Work>", svg, re.S)
    text = work.group(0) if work else svg

    def first(pattern: str) -> str:
        m = re.search(pattern, text, re.S)
        return html.unescape(m.group(1)).strip() if m else ""

    subject = re.search(r"<dc:subject>(.*?)</dc:subject>", text, re.S)
    keywords = re.findall(r"<rdf:li>([^<]*)</rdf:li>", subject.group(1)) if subject else []
    return {
        "title": first(r"<dc:title>([^<]*)</dc:title>"),
        "keywords": [html.unescape(k).strip() for k in keywords],
        "creator": first(r"<dc:creator>.*?<dc:title>([^<]*)</dc:title>"),
    }


def _tidy(text: str) -> str:
    text = re.sub(r"\((?:b and w|black and white)\)", " ", text, flags=re.I)
    text = re.sub(r"(?<=[a-zA-Z])\d+\b|_", " ", text)  # "bee1" -> "bee"; file-name underscores
    return " ".join(text.split()).strip(" -:,.")


def clipart_caption(meta: dict, stem: str, title_counts: collections.Counter) -> str:
    """``"<title>, <keyword>, ..."``: the title (the file name where the title is a collection's,
    e.g. "Part of the Flat Icon Collection"; none where it is the creator's name), then up to
    three keywords that are neither generic, nor in the title, nor the creator's name."""
    title = meta["title"]
    if not title or title_counts[title.lower()] > _COLLECTION:
        title = re.sub(r"(?:_\d+[a-z]?)+$", "", stem)
    creator = set(meta["creator"].lower().split())
    if creator and set(title.lower().replace("_", " ").split()) <= creator:
        title = ""  # the creator's name as the title (or the file name): the keywords alone
    title = _tidy(title)
    keywords: list[str] = []
    for keyword in meta["keywords"]:
        k = _tidy(keyword).lower()
        if not k or k in _GENERIC_WORDS or k in title.lower() or k in keywords:
            continue
        if creator & set(k.split()):
            continue
        keywords.append(k)
    return ", ".join([title] + keywords[:3]) if title else ", ".join(keywords[:3])


def _thumbnail(image):
    """A 16 x 16 colour thumbnail on white, mean-centred and unit-length (for near-duplicate
    cosines)."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    small = Image.alpha_composite(background, image).convert("RGB")
    arr = np.asarray(small.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    arr -= arr.mean()
    norm = float(np.linalg.norm(arr))
    return arr / norm if norm > 0 else arr


def near_duplicates(images: list, references: list[Path], threshold: float = NEAR_DUPLICATE):
    """For each image, whether a reference image file's thumbnail is within ``threshold``
    cosine of its own (:func:`_thumbnail`)."""
    import numpy as np
    from PIL import Image

    if not images or not references:
        return [False] * len(images)
    ours = np.stack([_thumbnail(image) for image in images])
    theirs = np.stack([_thumbnail(Image.open(path)) for path in references])
    best = np.full(len(images), -1.0, dtype=np.float32)
    for lo in range(0, len(theirs), 2048):
        best = np.maximum(best, (ours @ theirs[lo : lo + 2048].T).max(axis=1))
    return [bool(b > threshold) for b in best]


def build_clipart(out: Path, debs: Path | None = None, workers: int = 2) -> dict:
    """Fetch, caption, render and filter the Open Clip Art Library into ``out/images/*.png`` and
    ``out/pairs.jsonl`` (image paths relative to it); writes and returns ``out/clipart.json``
    (counts, version, licence). The Tux Paint stamps package is fetched beside (not installed)
    to leave out its near-duplicates. Done once: an existing clipart.json is returned as is."""
    summary_path = out / "clipart.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    roots = fetch_debs([CLIPART_PACKAGE, STAMPS_PACKAGE], debs or out.with_name(out.name + "-debs"))
    svg_root = roots[CLIPART_PACKAGE] / "usr" / "share" / "openclipart" / "svg"
    paths = sorted(svg_root.rglob("*.svg"))
    metas = {p: clipart_metadata(p.read_text(errors="replace")) for p in paths}
    titles = collections.Counter(m["title"].lower() for m in metas.values())
    counts = {"files": len(paths), "skipped_category": 0, "uncaptioned": 0, "unreadable": 0}
    counts |= {"blank": 0, "duplicate": 0, "near_reference": 0, "kept": 0}
    chosen = []
    for path in paths:
        rel = path.relative_to(svg_root).as_posix()
        if rel.startswith(CLIPART_SKIP):
            counts["skipped_category"] += 1
            continue
        caption = clipart_caption(metas[path], path.stem, titles)
        if not caption:
            counts["uncaptioned"] += 1
            continue
        chosen.append((rel, path, caption))

    def load(item: tuple[str, Path, str]):
        try:
            return render_icon(item[1])
        except Exception:  # noqa: BLE001 - a broken SVG is counted, not fatal
            return None

    rendered = []
    seen: set[str] = set()
    with ThreadPoolExecutor(workers) as pool:
        for item, image in zip(chosen, pool.map(load, chosen), strict=True):
            if image is None:
                counts["unreadable"] += 1
            elif _blank(image):
                counts["blank"] += 1
            elif (digest := hashlib.sha1(image.tobytes()).hexdigest()) in seen:
                counts["duplicate"] += 1
            else:
                seen.add(digest)
                rendered.append((item, image))
    stamps = sorted(
        (roots[STAMPS_PACKAGE] / "usr" / "share" / "tuxpaint" / "stamps").rglob("*.png")
    )
    references = stamps + sorted(EMOJI_IMAGES.glob("*.png"))
    near = near_duplicates([image for _, image in rendered], references)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tmp = out / "pairs.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for ((rel, _, caption), image), is_near in zip(rendered, near, strict=True):
            if is_near:
                counts["near_reference"] += 1
                continue
            name = rel[: -len(".svg")].replace("/", "__") + ".png"
            image.save(out / "images" / name, optimize=True)
            f.write(json.dumps({"image": f"images/{name}", "text": caption}) + "\n")
            counts["kept"] += 1
    tmp.replace(out / "pairs.jsonl")
    root = roots[CLIPART_PACKAGE]
    summary = {
        "size": ICON_SIZE,
        "package": CLIPART_PACKAGE,
        "version": (root / ".version").read_text(),
        "licence": "public domain (usr/share/doc/openclipart-svg/copyright)",
        "references": {"tuxpaint_stamps": len(stamps), "emoji": len(references) - len(stamps)},
        **counts,
    }
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(summary_path)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write WordNet's texts to this file")
    target.add_argument("--icons", type=Path, help="build the icon images in this folder")
    target.add_argument("--clipart", type=Path, help="build the captioned clip art in this folder")
    parser.add_argument("--wordnet", type=Path, default=WORDNET)
    args = parser.parse_args()
    if args.icons is not None or args.clipart is not None:
        summary = build_icons(args.icons) if args.icons else build_clipart(args.clipart)
        print(json.dumps(summary, indent=2))
        return
    path = write_wordnet(args.out, args.wordnet)
    lines = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"{path}: {lines:,} texts from {args.wordnet}", file=sys.stderr)


if __name__ == "__main__":
    main()
