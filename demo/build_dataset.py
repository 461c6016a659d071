"""Build the bundled emoji demo dataset from Debian's Noto Color Emoji font and CLDR names.

    apt-get install -y fonts-noto-color-emoji
    .venv/bin/python demo/build_dataset.py                      # writes demo/data/emoji/
    .venv/bin/python demo/build_dataset.py --out /tmp/e --limit 20   # a quick run

Every fully-qualified emoji of the PyPI ``emoji`` package is drawn with Pillow (raqm layout, so
ZWJ sequences, flags and keycaps are shaped), on white, then cropped to the font's square design
box, resized and saved as an 8-bit palette PNG. Emoji the font cannot draw are dropped and listed
with the reason in ``dropped.tsv``. The output directory gets:

    images/<codepoints>.png    one per kept emoji, e.g. images/1f44b-1f3fd.png (waving hand, medium)
    captions.jsonl             one row per image: image, text, aliases, group, codepoints, ...
    train.txt val.txt test.txt image paths, ~80/10/10, a variant group never crosses splits
    dropped.tsv                what was left out and why
    build.json, BUILD.md       how it was built (command, versions, counts), for tests and people
    LICENSE                    copied from demo/data/emoji/LICENSE when --out is elsewhere

The output is deterministic: a second run gives byte-identical files. The one exception is the
build date in BUILD.md / build.json, which is today's UTC date unless SOURCE_DATE_EPOCH is set.

This is a standalone script (Pillow + emoji only), not part of the packages: it runs before
anything else is installed, so it does not import ``beit3`` (and with it torch).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

logger = logging.getLogger("build_dataset")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "demo" / "data" / "emoji"
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
# CBDT bitmap fonts only render at their strike sizes; Noto Color Emoji has one, 109 px
# (glyph bitmaps of 136 x 128).
FONT_SIZE = 109
SPLIT_FRACTIONS = {"test": 0.1, "val": 0.1}  # the rest is train

# --- codepoints used by the grouping rule --------------------------------------------------------
ZWJ = 0x200D
VS16 = 0xFE0F
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))  # light .. dark
HAIR = frozenset(range(0x1F9B0, 0x1F9B4))  # red, curly, bald, white hair
GENDER_SIGNS = frozenset({0x2640, 0x2642})  # female, male sign (after a ZWJ)
RIGHT_ARROW = 0x27A1  # "facing right" variants (Emoji 15.1) are mirror images
# Gendered (and blond / bearded) people -> the gender-neutral emoji Unicode pairs them with.
NEUTRAL_PERSON = {
    0x1F468: 0x1F9D1,  # man -> person
    0x1F469: 0x1F9D1,  # woman -> person
    0x1F471: 0x1F9D1,  # person: blond hair -> person (a hair variant)
    0x1F9D4: 0x1F9D1,  # person: beard -> person (CLDR names it "person: beard")
    0x1F466: 0x1F9D2,  # boy -> child
    0x1F467: 0x1F9D2,  # girl -> child
    0x1F474: 0x1F9D3,  # old man -> older person
    0x1F475: 0x1F9D3,  # old woman -> older person
    0x1F934: 0x1FAC5,  # prince -> person with crown
    0x1F478: 0x1FAC5,  # princess -> person with crown
    0x1F930: 0x1FAC4,  # pregnant woman -> pregnant person
    0x1FAC3: 0x1FAC4,  # pregnant man -> pregnant person
    0x1F57A: 0x1F483,  # man dancing -> woman dancing (there is no neutral one)
}
# Whole sequences that, once neutralised, are another spelling of an older emoji.
SEQUENCE_BASE = {
    "\U0001f385": "\U0001f9d1\u200d\U0001f384",  # Santa Claus -> Mx Claus
    "\U0001f936": "\U0001f9d1\u200d\U0001f384",  # Mrs. Claus -> Mx Claus
    "\U0001f46b": "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1",  # woman and man holding hands
    "\U0001f46c": "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1",  # men holding hands
    "\U0001f46d": "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1",  # women holding hands
    "\U0001f9d1\u200d\u2764\u200d\U0001f48b\u200d\U0001f9d1": "\U0001f48f",  # -> kiss
    "\U0001f9d1\u200d\u2764\u200d\U0001f9d1": "\U0001f491",  # -> couple with heart
    "\U0001faf1\u200d\U0001faf2": "\U0001f91d",  # rightwards + leftwards hand -> handshake
    "\U0001f46a": "\U0001f9d1\u200d\U0001f9d1\u200d\U0001f9d2",  # family -> adult, adult, child
}

GROUPING_RULE = """\
An emoji's group is its base emoji, found by (1) removing VS16 (U+FE0F) and the skin-tone
modifiers U+1F3FB..U+1F3FF; (2) removing ZWJ parts that are a gender sign (U+2640, U+2642), a hair
component (U+1F9B0..U+1F9B3) or the "facing right" arrow (U+27A1); (3) replacing gendered people by
the neutral one Unicode pairs them with (man, woman, blond person, bearded person -> person; boy,
girl -> child; old man, old woman -> older person; prince, princess -> person with crown; pregnant
woman, man -> pregnant person; man dancing -> woman dancing), also inside ZWJ sequences, so that
e.g. all families of the same shape and all health workers share a group; (4) mapping a few
sequences to the older emoji they spell (Santa, Mrs. Claus -> Mx Claus; the three couples holding
hands -> people holding hands; kiss and couple-with-heart sequences -> kiss, couple with heart;
rightwards + leftwards hand -> handshake; family -> family: adult, adult, child). The group is
written as the fully-qualified emoji of that base. Splits are made of whole groups, and groups
whose images are pixel-identical (e.g. Norway and Bouvet Island) are kept in one split too."""


class BuildError(Exception):
    """The build cannot run (no font, no raqm, bad arguments); the message says how to fix it."""


@dataclass(frozen=True)
class Emoji:
    """One candidate: a fully-qualified emoji with its CLDR name from the emoji package."""

    chars: str
    name: str  # the package's 'en' name without colons, e.g. "waving_hand_medium_skin_tone"
    aliases: tuple[str, ...]
    emoji_version: float

    @property
    def stem(self) -> str:
        return "-".join(f"{ord(c):x}" for c in self.chars)

    @property
    def codepoints(self) -> str:
        return " ".join(f"{ord(c):04X}" for c in self.chars)


# --- candidates and names ------------------------------------------------------------------------


def load_candidates() -> list[Emoji]:
    """All fully-qualified emoji of the emoji package, sorted by codepoints."""
    try:
        import emoji
    except ImportError as exc:
        raise BuildError("the 'emoji' package is missing: .venv/bin/pip install emoji") from exc
    fully_qualified = emoji.STATUS["fully_qualified"]
    candidates = [
        Emoji(
            chars=chars,
            name=data["en"].strip(":"),
            aliases=tuple(alias.strip(":") for alias in data.get("alias", [])),
            emoji_version=float(data["E"]),
        )
        for chars, data in emoji.EMOJI_DATA.items()
        if data["status"] == fully_qualified
    ]
    return sorted(candidates, key=lambda e: [ord(c) for c in e.chars])


def is_flag(chars: str) -> bool:
    """A country flag (two regional indicators) or a subdivision flag (black flag + tags)."""
    codes = [ord(c) for c in chars]
    if len(codes) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in codes):
        return True
    return (
        len(codes) > 2 and codes[0] == 0x1F3F4 and all(0xE0020 <= c <= 0xE007F for c in codes[1:])
    )


def readable(name: str) -> str:
    return name.replace("_", " ").strip()


def caption_text(item: Emoji) -> str:
    """The CLDR name as words; CLDR's "flag: " and "keycap: " prefixes, which the package drops."""
    if is_flag(item.chars):
        return f"flag: {readable(item.name)}"
    if item.name.startswith("keycap_"):
        return f"keycap: {item.name.removeprefix('keycap_')}"
    return readable(item.name)


def caption_aliases(item: Emoji, text: str) -> list[str]:
    """The package's aliases as words, minus those that only restate the name."""

    def squash(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    seen = {squash(text), squash(item.name)}
    aliases = []
    for alias in item.aliases:
        words = readable(alias)
        if words and squash(words) not in seen:
            seen.add(squash(words))
            aliases.append(words)
    return aliases


# --- grouping ------------------------------------------------------------------------------------


def group_key(chars: str) -> str:
    """The base emoji (without VS16) that skin-tone, gender, hair and direction variants share."""
    parts = []
    for part in chars.split(chr(ZWJ)):
        codes = [ord(c) for c in part if ord(c) != VS16 and ord(c) not in SKIN_TONES]
        parts.append(codes)
    if len(parts) > 1:
        dropped = GENDER_SIGNS | HAIR | {RIGHT_ARROW}
        kept = [codes for codes in parts if not (len(codes) == 1 and codes[0] in dropped)]
        parts = kept or parts[:1]
    parts = [[NEUTRAL_PERSON.get(c, c) for c in codes] for codes in parts]
    key = chr(ZWJ).join("".join(chr(c) for c in codes) for codes in parts)
    return SEQUENCE_BASE.get(key, key)


def group_representatives(candidates: list[Emoji]) -> dict[str, str]:
    """Map each candidate to its group, written as the fully-qualified emoji of the base."""
    by_bare = {c.chars.replace(chr(VS16), ""): c.chars for c in candidates}
    return {c.chars: by_bare.get(group_key(c.chars), group_key(c.chars)) for c in candidates}


def _split_units(stems: list[str], groups: dict[str, str], image_hashes: dict[str, str]) -> dict:
    """Union of variant groups and pixel-identical images: the unit that goes to one split."""
    parent = {g: g for g in groups.values()}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first_group_of_hash: dict[str, str] = {}
    for stem in stems:
        group = groups[stem]
        other = first_group_of_hash.setdefault(image_hashes[stem], group)
        a, b = sorted((find(group), find(other)))
        parent[b] = a
    return {stem: find(groups[stem]) for stem in stems}


def assign_splits(
    stems: list[str], groups: dict[str, str], image_hashes: dict[str, str], seed: int
) -> dict[str, str]:
    """Deterministic ~80/10/10 split by whole units, in an order fixed by sha256(seed, unit).

    Units are visited in hash order; each goes to test while test has room for it, then to val,
    else to train, so the fractions come out close to exact whatever the unit sizes.
    """
    unit_of = _split_units(stems, groups, image_hashes)
    sizes: dict[str, int] = {}
    for stem in stems:
        sizes[unit_of[stem]] = sizes.get(unit_of[stem], 0) + 1
    targets = {name: round(frac * len(stems)) for name, frac in SPLIT_FRACTIONS.items()}
    filled = dict.fromkeys(targets, 0)
    split_of_unit = {}
    for unit in sorted(sizes, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest()):
        split_of_unit[unit] = "train"
        for name in ("test", "val"):
            if filled[name] + sizes[unit] <= targets[name]:
                split_of_unit[unit] = name
                filled[name] += sizes[unit]
                break
    return {stem: split_of_unit[unit_of[stem]] for stem in stems}


# --- rendering -----------------------------------------------------------------------------------


class Renderer:
    """Draws one emoji with Noto Color Emoji and says whether the font really drew it.

    The font shows its failures in three ways, each checked here:
    - a codepoint it lacks becomes .notdef, which in this font is an empty bitmap (blank);
    - a sequence it does not ligate (a ZWJ sequence, a skin tone on an emoji without tones) is laid
      out as several glyphs side by side, so the advance is a multiple of one emoji's;
    - a regional-indicator pair that is not a flag it knows becomes a white flag with a "?" (the
      placeholder), which is compared pixel for pixel with the drawing of the pair Z Z.
    """

    def __init__(self, font_path: Path, size: int) -> None:
        from PIL import ImageFont, features

        if not font_path.is_file():
            raise BuildError(
                f"font not found at {font_path}: apt-get install -y {FONT_PACKAGE} "
                "(or pass --font PATH to a NotoColorEmoji.ttf)"
            )
        if not features.check("raqm"):
            raise BuildError(
                "Pillow has no raqm text layout (PIL.features.check('raqm') is False), so ZWJ "
                "sequences, flags and keycaps would not be shaped. Pillow's wheels bundle raqm "
                "and HarfBuzz but load FriBiDi at run time: apt-get install -y libfribidi0 "
                "(a Pillow built from source needs libraqm0 / libraqm-dev instead)"
            )
        try:
            self.font = ImageFont.truetype(
                str(font_path), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM
            )
        except OSError as exc:
            raise BuildError(
                f"cannot load {font_path} at {FONT_SIZE} px ({exc}): is it the CBDT "
                f"NotoColorEmoji.ttf from {FONT_PACKAGE}?"
            ) from exc
        self.size = size
        reference = "\U0001f431"  # cat face: one glyph of this font
        self.advance = self.font.getlength(reference)
        left, top, right, bottom = self.font.getbbox(reference)
        self.cell = (right - left, bottom - top)  # (136, 128) for Noto Color Emoji
        # The design box is the largest centred square of the cell: (4, 0, 132, 128).
        side = min(self.cell)
        x0, y0 = (self.cell[0] - side) // 2, (self.cell[1] - side) // 2
        self.square = (x0, y0, x0 + side, y0 + side)
        self.placeholder_flag = self._draw("\U0001f1ff\U0001f1ff").tobytes()  # Z Z: no such flag
        saturation = self._draw(reference).convert("RGB").convert("HSV").getchannel("S")
        if saturation.getextrema()[1] < 64:
            raise BuildError(
                f"the font at {font_path} does not draw U+1F431 CAT FACE in colour: "
                f"use NotoColorEmoji.ttf from {FONT_PACKAGE}"
            )

    def _draw(self, chars: str) -> PILImage:
        """The emoji in one cell of the font, RGBA on transparent."""
        from PIL import Image, ImageDraw

        canvas = Image.new("RGBA", self.cell, (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), chars, font=self.font, embedded_color=True)
        return canvas

    def render(self, chars: str) -> tuple[PILImage | None, str]:
        """Return (palette image of size x size on white, "") or (None, reason it was dropped)."""
        from PIL import Image

        glyphs = self.font.getlength(chars) / self.advance
        if glyphs > 1.5:
            return None, f"not ligated: drawn as {round(glyphs)} glyphs side by side"
        drawn = self._draw(chars)
        content = drawn.getchannel("A").getbbox()
        if content is None:
            return None, "blank: the font has no glyph (.notdef)"
        if drawn.tobytes() == self.placeholder_flag:
            return None, "placeholder: unknown flag drawn as a white flag with '?'"
        box = self.square
        left, top, right, bottom = content
        inside = box[0] <= left and box[1] <= top and right <= box[2] and bottom <= box[3]
        if not inside:
            logger.warning("%s reaches outside the design box %s: %s", chars, box, content)
        white = Image.new("RGBA", drawn.size, (255, 255, 255, 255))
        white.alpha_composite(drawn)
        rgb = white.convert("RGB").crop(box)
        rgb = rgb.resize((self.size, self.size), Image.Resampling.LANCZOS)
        return rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT), ""


# --- build ---------------------------------------------------------------------------------------


def _package_version(package: str) -> str:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return "unknown (no dpkg-query)"
    return result.stdout.strip() or "unknown (not installed by dpkg)"


def _build_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (
        dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)
        if epoch
        else dt.datetime.now(dt.timezone.utc)
    )
    return now.date().isoformat()


def _sample(candidates: list[Emoji], limit: int | None) -> list[Emoji]:
    """With --limit N, N candidates evenly spaced over the sorted list (flags, people, objects)."""
    if limit is None or limit >= len(candidates):
        return candidates
    return [candidates[i * len(candidates) // limit] for i in range(limit)]


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def build(
    out: Path, size: int, limit: int | None, font_path: Path, seed: int, command: str
) -> dict:
    """Render, filter, caption and split the emoji into ``out``. Returns the build summary."""
    import emoji
    import PIL
    from PIL import features

    if size < 8:
        raise BuildError(f"--size {size} is too small to see an emoji: use 8 or more (default 64)")
    if limit is not None and limit < 1:
        raise BuildError(f"--limit {limit}: give a positive number of emoji, or leave it out")
    renderer = Renderer(font_path, size)
    all_candidates = load_candidates()
    candidates = _sample(all_candidates, limit)
    logger.info("rendering %d fully-qualified emoji with %s", len(candidates), font_path)

    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    kept: list[Emoji] = []
    dropped: list[tuple[Emoji, str]] = []
    image_hashes: dict[str, str] = {}
    for i, item in enumerate(candidates, 1):
        image, reason = renderer.render(item.chars)
        if image is None:
            dropped.append((item, reason))
        else:
            image.save(images_dir / f"{item.stem}.png", optimize=True)
            image_hashes[item.stem] = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
            kept.append(item)
        if i % 500 == 0 or i == len(candidates):
            logger.info(
                "%d/%d rendered, %d kept, %d dropped", i, len(candidates), len(kept), len(dropped)
            )
    if not kept:
        raise BuildError(
            f"the font at {font_path} drew none of {len(candidates)} emoji: is it Noto Color Emoji?"
        )

    wanted = {f"{item.stem}.png" for item in kept}
    stale = sorted(p for p in images_dir.glob("*.png") if p.name not in wanted)
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d images of an earlier build from %s", len(stale), images_dir)

    all_groups = group_representatives(all_candidates)
    groups = {item.stem: all_groups[item.chars] for item in kept}
    splits = assign_splits([item.stem for item in kept], groups, image_hashes, seed)

    rows = []
    for item in kept:
        text = caption_text(item)
        rows.append(
            {
                "image": f"images/{item.stem}.png",
                "text": text,
                "aliases": caption_aliases(item, text),
                "group": groups[item.stem],
                "emoji": item.chars,
                "codepoints": item.codepoints,
                "emoji_version": item.emoji_version,
                "split": splits[item.stem],
            }
        )
    _write_text(
        out / "captions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    for name in ("train", "val", "test"):
        _write_text(
            out / f"{name}.txt", "".join(r["image"] + "\n" for r in rows if r["split"] == name)
        )
    _write_text(
        out / "dropped.tsv",
        "codepoints\temoji\tname\temoji_version\treason\n"
        + "".join(
            f"{d.codepoints}\t{d.chars}\t{d.name}\t{d.emoji_version}\t{why}\n" for d, why in dropped
        ),
    )
    license_src = DEFAULT_OUT / "LICENSE"
    if license_src.is_file() and license_src.resolve() != (out / "LICENSE").resolve():
        shutil.copyfile(license_src, out / "LICENSE")

    reasons: dict[str, int] = {}
    for _, why in dropped:
        kind = why.split(":")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    identical: dict[str, list[str]] = {}
    for item in kept:
        identical.setdefault(image_hashes[item.stem], []).append(item.chars)
    summary = {
        "command": command,
        "date": _build_date(),
        "font": str(font_path),
        "font_sha256": hashlib.sha256(font_path.read_bytes()).hexdigest(),
        "font_package": f"{FONT_PACKAGE} {_package_version(FONT_PACKAGE)}",
        "emoji_package": f"emoji {emoji.__version__}",
        "pillow": f"Pillow {PIL.__version__}, raqm {features.version('raqm')}, "
        f"harfbuzz {features.version('harfbuzz')}, fribidi {features.version('fribidi')}",
        "python": platform.python_version(),
        "image_size": size,
        "seed": seed,
        "limit": limit,
        "candidates": len(candidates),
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": dict(sorted(reasons.items())),
        "splits": {
            name: sum(r["split"] == name for r in rows) for name in ("train", "val", "test")
        },
        "groups": len(set(groups.values())),
        "images_bytes": sum((images_dir / f"{item.stem}.png").stat().st_size for item in kept),
        "identical_images": [v for v in identical.values() if len(v) > 1],
    }
    _write_text(out / "build.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    _write_text(out / "BUILD.md", _build_markdown(summary, dropped))
    logger.info(
        "done in %.1f s: %d kept, %d dropped %s, splits %s, %d groups, images %.2f MB in %s",
        time.monotonic() - start, summary["kept"], summary["dropped"], summary["dropped_by_reason"],
        summary["splits"], summary["groups"], summary["images_bytes"] / 1e6, out,
    )  # fmt: skip
    return summary


def _build_markdown(summary: dict, dropped: list[tuple[Emoji, str]]) -> str:
    by_version: dict[float, int] = {}
    for item, _ in dropped:
        by_version[item.emoji_version] = by_version.get(item.emoji_version, 0) + 1
    identical = (
        "\n".join(f"- {' '.join(chars)}" for chars in summary["identical_images"]) or "- none"
    )
    splits = " / ".join(str(summary["splits"][name]) for name in ("train", "val", "test"))
    reasons = ", ".join(f"{k} {v}" for k, v in summary["dropped_by_reason"].items()) or "none"
    versions = ", ".join(f"E{k:g}: {v}" for k, v in sorted(by_version.items())) or "none"
    return f"""\
# The emoji demo dataset: how it was built

Written by `demo/build_dataset.py`; do not edit by hand. `build.json` holds the same facts for
programs (tests read it).

| | |
|---|---|
| command | `{summary["command"]}` |
| date (UTC) | {summary["date"]} |
| font | `{summary["font"]}` from `{summary["font_package"]}` |
| font sha256 | `{summary["font_sha256"]}` |
| names | {summary["emoji_package"]} (English CLDR names, fully-qualified emoji only) |
| rendering | {summary["pillow"]}, Python {summary["python"]} |
| image size | {summary["image_size"]} px, 8-bit palette PNG (256 colours, median cut) on white |
| seed | {summary["seed"]} |
| limit | {summary["limit"] or "none (all candidates)"} |
| candidates | {summary["candidates"]} |
| kept | {summary["kept"]} |
| dropped | {summary["dropped"]} |
| train / val / test images | {splits} |
| groups | {summary["groups"]} |
| images on disk | {summary["images_bytes"]:,} bytes |

## What was dropped

The font (Noto Color Emoji) is older than the emoji package's list, so the newest emoji are not
in it. Dropped by reason: {reasons}.
Dropped by Emoji version: {versions}.
Each one, with its reason, is in `dropped.tsv`. How each failure is detected:

- blank: a codepoint the font lacks is drawn as .notdef, an empty bitmap in this font;
- not ligated: a sequence the font has no ligature for is laid out as several glyphs side by side
  (its advance is a multiple of one emoji's), e.g. a new ZWJ sequence or skin tones on an emoji
  that had none;
- placeholder: a regional-indicator pair that is not a flag the font knows is drawn as a white
  flag with a "?", compared pixel for pixel with the drawing of the pair Z Z.

## Captions

`captions.jsonl` has one row per image: `image` (relative to the file), `text` (the English CLDR
name: the package's name with underscores as spaces, and CLDR's "flag: " and "keycap: " prefixes
restored, e.g. "flag: Japan", "keycap: #"), `aliases` (the package's other names, minus those
that only restate `text`), `group`, `emoji`, `codepoints`, `emoji_version` and `split`. The emoji
package has no CLDR category (group / subgroup), so there is none.

## Splits

`train.txt`, `val.txt`, `test.txt` list image paths (as in `captions.jsonl`), about 80/10/10 by
image count, deterministic for a seed.

{GROUPING_RULE}

Pixel-identical images (the font draws them the same; they stay in one split):

{identical}

## Licences

See `LICENSE`: images Apache-2.0 (Noto Emoji image resources), the font that drew them SIL OFL
1.1, names Unicode License v3 (CLDR) via the emoji package (BSD-3-Clause).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--size", type=int, default=64, help="image side in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="only N evenly spaced emoji (a quick run)"
    )
    parser.add_argument(
        "--font", type=Path, default=DEFAULT_FONT, help="NotoColorEmoji.ttf (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    shown_argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "demo/build_dataset.py", *shown_argv])
    try:
        build(args.out, args.size, args.limit, args.font, args.seed, command)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
