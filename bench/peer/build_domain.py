"""Build the peer benchmark's held-out domain from Debian's Tux Paint stamps.

    apt-get install -y --no-install-recommends tuxpaint-stamps-default librsvg2-bin
    .venv/bin/python bench/peer/build_domain.py              # writes .cache/peer-domain/
    .venv/bin/python bench/peer/build_domain.py --out /tmp/d --limit 50   # a quick run

Tux Paint's stamps are clip art for children (animals, food, vehicles, letters, coins, ...), each
with a human-written English description in a same-named ``.txt`` file ("A frog.", "A Canadian
two dollar coin ($2.00) called a toonie."). No stage of the demo recipe sees them (the demo trains
on emoji from fonts-noto-color-emoji). Every stamp image (``.png``, or ``.svg`` rasterised with
rsvg-convert when there is no ``.png`` of the same name) is composited on white, cropped to its
drawn pixels, padded to a square and resized to 64 x 64. Its caption is the first sentence of
the description (a hand-drawn ``_mirror`` image takes its original's). The output directory gets:

    images/<path with / as __>.png   one per kept stamp, e.g. images/animals__birds__owl.png
    captions.jsonl                   one row per image: image, text, split, group, source
    train.jsonl, test.jsonl          {"image": relpath, "text": caption}: ``beit3 finetune`` reads
                                     these (paths relative to the manifest)
    train.csv, test.csv              tab-separated ``filepath`` (absolute) and ``title`` columns:
                                     open_clip_train's --dataset-type csv reads these
    dropped.tsv                      what was left out and why
    build.json, BUILD.md, LICENSE    how it was built (command, versions, counts) and the licence

The split is grouped (see GROUPING_RULE) and deterministic for a given --seed; a second run gives
byte-identical files except the build date (today's UTC date unless SOURCE_DATE_EPOCH is set) and
the absolute paths in the CSVs. A standalone script (Pillow only, plus rsvg-convert): it does not
import ``beit3``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("build_domain")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / ".cache" / "peer-domain"
PACKAGE = "tuxpaint-stamps-default"
DEFAULT_STAMPS = Path("/usr/share/tuxpaint/stamps")
COPYRIGHT = Path("/usr/share/doc") / PACKAGE / "copyright"
RSVG_PACKAGE = "librsvg2-bin"
IMG_SIZE = 64
SVG_RENDER_SIZE = 256  # rendered larger, then cropped and resized like the PNGs
TEST_FRACTION = 0.2  # the rest is train
MIRROR_SUFFIX = "_mirror"  # Tux Paint's hand-drawn mirror image of a stamp (no .txt of its own)

GROUPING_RULE = """\
Stamps are joined into one unit (which goes wholly to train or to test) when any of these holds:
(1) the same base name, anywhere in the tree: the file name, lower-cased, without Tux Paint's
"_mirror" suffix and without a trailing number ("frog-1", "snail2", "flower10", "sunglasses_02",
"yen500" -> "frog", "snail", "flower", "sunglasses", "yen"); (2) the same first word of the name
in the same folder ("apple_fuji", "apple_red" in food/fruit; "gnu-baby", "gnu-stand"); (3) the
same caption, ignoring case and punctuation ("The letter A." and "The letter a.", filled and
outlined); (4) pixel-identical 64 px images. Units are visited in the order of sha256(seed, unit)
and each goes to test while test has room for it (20% of the images), else to train."""


class BuildError(Exception):
    """The build cannot run (no stamps, no rsvg-convert); the message says how to fix it."""


@dataclass(frozen=True)
class Stamp:
    """One stamp image and the description file its caption comes from."""

    image: Path  # absolute source path (.png or .svg)
    rel: str  # path under the stamps root without suffix, e.g. "animals/birds/owl"
    text_file: Path | None

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        return self.rel.rsplit("/", 1)[0] if "/" in self.rel else ""

    @property
    def out_name(self) -> str:
        return self.rel.replace("/", "__") + ".png"


# --- candidates and captions ---------------------------------------------------------------------


def find_stamps(root: Path) -> list[Stamp]:
    """Every stamp under root, sorted by path: a .png, else its .svg; its .txt (or, for a
    ``_mirror`` image, its original's)."""
    by_stem: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix in (".png", ".svg") and path.is_file():
            by_stem.setdefault(path.with_suffix(""), []).append(path)
    stamps = []
    for stem, paths in sorted(by_stem.items()):
        image = next((p for p in paths if p.suffix == ".png"), paths[0])
        text_file = stem.with_suffix(".txt")
        if not text_file.is_file() and stem.name.endswith(MIRROR_SUFFIX):
            text_file = stem.with_name(stem.name[: -len(MIRROR_SUFFIX)] + ".txt")
        stamps.append(
            Stamp(
                image=image,
                rel=stem.relative_to(root).as_posix(),
                text_file=text_file if text_file.is_file() else None,
            )
        )
    return stamps


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’)]?\s+(?=[A-Z“\"(])")


def caption_of(text_file: Path) -> str:
    """The first sentence of the English description (the file's first line)."""
    first_line = text_file.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    text = " ".join(first_line.split())
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


# --- grouping and split --------------------------------------------------------------------------

_TRAILING_NUMBER = re.compile(r"[-_ ]?\d+$")
_FIRST_WORD = re.compile(r"[-_ ]")


def base_name(name: str) -> str:
    """'frog-1' -> 'frog', 'tugboat_mirror' -> 'tugboat', 'yen500' -> 'yen', '3' -> '3'."""
    name = name.lower().removesuffix(MIRROR_SUFFIX)
    return _TRAILING_NUMBER.sub("", name) or name


def first_word(name: str) -> str:
    return _FIRST_WORD.split(base_name(name), maxsplit=1)[0]


def caption_key(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def split_units(stamps: list[Stamp], captions: dict[str, str], hashes: dict[str, str]) -> dict:
    """Union-find over the four rules of GROUPING_RULE: stamp rel -> its unit's representative
    (the smallest rel in the unit)."""
    parent = {s.rel: s.rel for s in stamps}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_of: dict[tuple[str, str], str] = {}
    for s in stamps:
        for key in (
            ("base", base_name(s.name)),
            ("word", f"{s.folder}/{first_word(s.name)}"),
            ("caption", caption_key(captions[s.rel])),
            ("pixels", hashes[s.rel]),
        ):
            other = first_of.setdefault(key, s.rel)
            a, b = sorted((find(s.rel), find(other)))
            parent[b] = a
    return {s.rel: find(s.rel) for s in stamps}


def assign_splits(units: dict[str, str], seed: int) -> dict[str, str]:
    """Deterministic grouped split: stamp rel -> "train" | "test" (see GROUPING_RULE)."""
    sizes: dict[str, int] = {}
    for unit in units.values():
        sizes[unit] = sizes.get(unit, 0) + 1
    target = round(TEST_FRACTION * len(units))
    filled = 0
    split_of_unit = {}
    for unit in sorted(sizes, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest()):
        if filled + sizes[unit] <= target:
            split_of_unit[unit] = "test"
            filled += sizes[unit]
        else:
            split_of_unit[unit] = "train"
    return {rel: split_of_unit[unit] for rel, unit in units.items()}


# --- rendering -----------------------------------------------------------------------------------


def _rsvg() -> str:
    exe = shutil.which("rsvg-convert")
    if exe is None:
        raise BuildError(
            f"rsvg-convert not found (needed for the .svg stamps): "
            f"apt-get install -y --no-install-recommends {RSVG_PACKAGE}"
        )
    return exe


def load_rgba(path: Path):
    """The stamp as an RGBA Pillow image (SVGs rendered by rsvg-convert)."""
    from PIL import Image

    if path.suffix == ".svg":
        png = subprocess.run(
            [
                _rsvg(),
                "--width",
                str(SVG_RENDER_SIZE),
                "--height",
                str(SVG_RENDER_SIZE),
                "--keep-aspect-ratio",
                str(path),
            ],
            check=True,
            capture_output=True,
        ).stdout
        return Image.open(io.BytesIO(png)).convert("RGBA")
    with Image.open(path) as image:
        return image.convert("RGBA")


def render(path: Path, size: int = IMG_SIZE):
    """(size x size RGB image on white, "") or (None, why it was dropped).

    Composited on white, cropped to the pixels with any opacity, centred on a white square
    (the longer side plus 4% margin), resized with Lanczos.
    """
    from PIL import Image

    try:
        rgba = load_rgba(path)
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"unreadable: {exc}"
    box = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None:
        return None, "fully transparent"
    rgba = rgba.crop(box)
    side = round(max(rgba.size) * 1.04)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS), ""


# --- output --------------------------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _build_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)
        if epoch
        else dt.datetime.now(dt.timezone.utc)
    )
    return when.date().isoformat()


def _write_manifests(out: Path, rows: list[dict]) -> None:
    with (out / "captions.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for split in ("train", "test"):
        part = [r for r in rows if r["split"] == split]
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for row in part:
                f.write(
                    json.dumps({"image": row["image"], "text": row["text"]}, ensure_ascii=False)
                )
                f.write("\n")
        with (out / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["filepath", "title"])
            for row in part:
                writer.writerow([str((out / row["image"]).resolve()), row["text"]])


def _build_md(info: dict) -> str:
    c = info["counts"]
    return f"""# Peer benchmark domain: Tux Paint stamps

Built by `{info["command"]}` on {info["date"]}.

- Source: Debian package `{PACKAGE}` {info["versions"][PACKAGE]} (`{info["stamps_root"]}`),
  SVGs rasterised with `rsvg-convert` from `{RSVG_PACKAGE}` {info["versions"][RSVG_PACKAGE]};
  Pillow {info["versions"]["Pillow"]}, Python {info["versions"]["python"]}.
- Licence: GPL-2+ (stamps: Copyright 2002-2022 Bill Kendrick and the Tux Paint contributors);
  see LICENSE, copied from the package's copyright file. The images are derived works: keep them
  out of the repository (this folder is git-ignored) and redistribute only under the GPL.
- Images: {c["images"]} kept of {c["candidates"]} stamp files ({c["from_svg"]} rasterised from
  SVG), {IMG_SIZE} x {IMG_SIZE} RGB PNG on white; {c["dropped"]} dropped (dropped.tsv).
- Captions: the first sentence of each stamp's English description, {c["distinct_captions"]}
  distinct.
- Split (seed {info["seed"]}): train {c["train"]} images ({c["train_captions"]} distinct captions),
  test {c["test"]} images ({c["test_captions"]} distinct captions); {c["units"]} units, the
  largest of {c["largest_unit"]} images.

## Grouping rule

{GROUPING_RULE}
"""


def build(stamps_root: Path, out: Path, seed: int, limit: int | None) -> dict:
    if not stamps_root.is_dir():
        raise BuildError(
            f"no stamps at {stamps_root}: apt-get install -y --no-install-recommends {PACKAGE} "
            "(or pass --stamps DIR)"
        )
    stamps = find_stamps(stamps_root)
    if limit is not None:
        stamps = stamps[:limit]
    if not stamps:
        raise BuildError(f"{stamps_root} holds no .png or .svg stamps")
    out = out.resolve()
    images_dir = out / "images"
    if images_dir.exists():
        shutil.rmtree(images_dir)
    images_dir.mkdir(parents=True)
    kept: list[Stamp] = []
    dropped: list[tuple[str, str]] = []
    captions: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for i, stamp in enumerate(stamps):
        if stamp.text_file is None:
            dropped.append((stamp.rel, "no description (.txt) file"))
            continue
        caption = caption_of(stamp.text_file)
        if not caption:
            dropped.append((stamp.rel, f"empty description in {stamp.text_file.name}"))
            continue
        image, reason = render(stamp.image)
        if image is None:
            dropped.append((stamp.rel, reason))
            continue
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        (images_dir / stamp.out_name).write_bytes(buffer.getvalue())
        captions[stamp.rel] = caption
        hashes[stamp.rel] = hashlib.sha256(image.tobytes()).hexdigest()
        kept.append(stamp)
        if (i + 1) % 200 == 0:
            logger.info("rendered %d / %d stamps", i + 1, len(stamps))
    if not kept:
        raise BuildError(f"no stamp under {stamps_root} could be used (see {out}/dropped.tsv)")
    units = split_units(kept, captions, hashes)
    splits = assign_splits(units, seed)
    rows = [
        {
            "image": f"images/{s.out_name}",
            "text": captions[s.rel],
            "split": splits[s.rel],
            "group": units[s.rel],
            "source": f"{s.rel}{s.image.suffix}",
        }
        for s in kept
    ]
    _write_manifests(out, rows)
    with (out / "dropped.tsv").open("w", encoding="utf-8") as f:
        f.write("stamp\treason\n")
        for rel, reason in dropped:
            f.write(f"{rel}\t{reason}\n")
    unit_sizes: dict[str, int] = {}
    for unit in units.values():
        unit_sizes[unit] = unit_sizes.get(unit, 0) + 1

    def count(split: str) -> tuple[int, int]:
        part = [r for r in rows if r["split"] == split]
        return len(part), len({r["text"] for r in part})

    (n_train, c_train), (n_test, c_test) = count("train"), count("test")
    from PIL import __version__ as pillow_version

    info = {
        "command": shlex.join(["python", *sys.argv]),
        "date": _build_date(),
        "stamps_root": str(stamps_root),
        "seed": seed,
        "img_size": IMG_SIZE,
        "versions": {
            PACKAGE: package_version(PACKAGE),
            RSVG_PACKAGE: package_version(RSVG_PACKAGE),
            "Pillow": pillow_version,
            "python": platform.python_version(),
        },
        "counts": {
            "candidates": len(stamps),
            "images": len(kept),
            "from_svg": sum(s.image.suffix == ".svg" for s in kept),
            "dropped": len(dropped),
            "distinct_captions": len(set(captions.values())),
            "train": n_train,
            "train_captions": c_train,
            "test": n_test,
            "test_captions": c_test,
            "units": len(unit_sizes),
            "largest_unit": max(unit_sizes.values()),
        },
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "BUILD.md").write_text(_build_md(info))
    if COPYRIGHT.is_file():
        shutil.copyfile(COPYRIGHT, out / "LICENSE")
    else:
        logger.warning("%s not found: LICENSE not written", COPYRIGHT)
    logger.info(
        "kept %d images (train %d, test %d), dropped %d; wrote %s",
        len(kept),
        n_train,
        n_test,
        len(dropped),
        out,
    )
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stamps", type=Path, default=DEFAULT_STAMPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N stamps only (a test)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        info = build(args.stamps, args.out, args.seed, args.limit)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(info["counts"]))


if __name__ == "__main__":
    main()
