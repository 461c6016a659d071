"""The committed emoji demo dataset (demo/data/emoji/) and the script that builds it.

All tests but the last two read only the committed files: no font needed. Those two run
demo/build_dataset.py and skip when fonts-noto-color-emoji is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "demo" / "data" / "emoji"
SCRIPT = REPO / "demo" / "build_dataset.py"
SPLITS = ("train", "val", "test")


def _load_script():
    spec = importlib.util.spec_from_file_location("build_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None, f"cannot load {SCRIPT}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_dataset = _load_script()
needs_font = pytest.mark.skipif(
    not build_dataset.DEFAULT_FONT.is_file(),
    reason=f"no {build_dataset.DEFAULT_FONT}: apt-get install -y fonts-noto-color-emoji",
)


def _read_dataset(root: Path) -> tuple[dict, list[dict], dict[str, list[str]]]:
    record = json.loads((root / "build.json").read_text(encoding="utf-8"))
    with (root / "captions.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    splits = {name: (root / f"{name}.txt").read_text(encoding="utf-8").split() for name in SPLITS}
    return record, rows, splits


@pytest.fixture(scope="module")
def committed() -> tuple[dict, list[dict], dict[str, list[str]]]:
    return _read_dataset(DATA)


def test_counts_match_build_record(committed) -> None:
    record, rows, splits = committed
    assert record["limit"] is None, "the committed dataset must be a full build"
    assert record["kept"] + record["dropped"] == record["candidates"]
    assert len(rows) == record["kept"]
    assert len(list((DATA / "images").glob("*.png"))) == record["kept"]
    assert {name: len(paths) for name, paths in splits.items()} == record["splits"]
    assert sum(record["dropped_by_reason"].values()) == record["dropped"]
    dropped_lines = (DATA / "dropped.tsv").read_text(encoding="utf-8").splitlines()
    assert len(dropped_lines) - 1 == record["dropped"]  # minus the header
    assert len({row["group"] for row in rows}) == record["groups"]
    build_md = (DATA / "BUILD.md").read_text(encoding="utf-8")
    assert f"| kept | {record['kept']} |" in build_md
    assert f"| dropped | {record['dropped']} |" in build_md
    # The estimate, so a change of font or emoji package is noticed here first.
    assert 3700 <= record["kept"] <= 3900, record["kept"]


def test_dataset_stays_near_ten_megabytes() -> None:
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 15e6, f"demo/data/emoji is {total / 1e6:.1f} MB; the cap is 15 MB"


def test_every_image_is_a_nonblank_palette_png_of_the_recorded_size(committed) -> None:
    record, rows, _ = committed
    size = (record["image_size"], record["image_size"])
    for row in rows:
        path = DATA / row["image"]
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "P", size), path
            darkest, lightest = image.convert("L").getextrema()
        assert lightest - darkest > 32, f"{path} is blank or nearly so ({darkest}..{lightest})"


def test_captions_are_named_and_unique(committed) -> None:
    _, rows, _ = committed
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts), "two images share a caption"
    assert len({row["image"] for row in rows}) == len(rows)
    for row in rows:
        assert row["text"].strip() == row["text"] and row["text"], row
        assert "_" not in row["text"] and ":" not in row["text"].removeprefix("flag:").removeprefix(
            "keycap:"
        ), row["text"]
        assert all(isinstance(a, str) and a and a != row["text"] for a in row["aliases"]), row
        assert row["codepoints"] == " ".join(f"{ord(c):04X}" for c in row["emoji"])
        assert row["image"] == "images/" + "-".join(f"{ord(c):x}" for c in row["emoji"]) + ".png"
    by_emoji = {row["emoji"]: row["text"] for row in rows}
    # The queries the demo test types must find their emoji.
    assert by_emoji["\U0001f431"] == "cat face"
    assert by_emoji["\U0001f1ef\U0001f1f5"] == "flag: Japan"
    assert by_emoji["\u2764\ufe0f"] == "red heart"
    assert by_emoji["\U0001f355"] == "pizza"
    assert by_emoji["#\ufe0f\u20e3"] == "keycap: #"


def test_splits_are_disjoint_cover_every_image_and_are_near_80_10_10(committed) -> None:
    _, rows, splits = committed
    images = [row["image"] for row in rows]
    listed = [path for name in SPLITS for path in splits[name]]
    assert sorted(listed) == sorted(images), "split files must list every image exactly once"
    assert all(row["image"] in splits[row["split"]] for row in rows[:: len(rows) // 50])
    for name, fraction in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(len(splits[name]) / len(images) - fraction) < 0.02, (name, len(splits[name]))


def test_no_group_crosses_splits(committed) -> None:
    _, rows, _ = committed
    split_of_group = defaultdict(set)
    for row in rows:
        split_of_group[row["group"]].add(row["split"])
    crossing = {group: sorted(s) for group, s in split_of_group.items() if len(s) > 1}
    assert not crossing, f"groups in several splits: {crossing}"
    assert len(split_of_group) > 1500, "fewer groups than expected: is the grouping too coarse?"


def test_variants_of_one_emoji_share_group_and_split(committed) -> None:
    _, rows, _ = committed
    by_emoji = {row["emoji"]: row for row in rows}
    waving = [row for row in rows if row["emoji"].startswith("\U0001f44b")]
    assert len(waving) == 6, [row["text"] for row in waving]  # the base and five skin tones
    assert {(row["group"], row["split"]) for row in waving} == {("\U0001f44b", waving[0]["split"])}
    health_workers = [
        "\U0001f9d1\u200d\u2695\ufe0f",  # health worker
        "\U0001f468\u200d\u2695\ufe0f",  # man health worker
        "\U0001f469\U0001f3fd\u200d\u2695\ufe0f",  # woman health worker: medium skin tone
    ]
    assert len({(by_emoji[e]["group"], by_emoji[e]["split"]) for e in health_workers}) == 1
    runners = ["\U0001f3c3", "\U0001f3c3\U0001f3ff\u200d\u2640\ufe0f\u200d\u27a1\ufe0f"]
    assert len({(by_emoji[e]["group"], by_emoji[e]["split"]) for e in runners}) == 1


def test_pixel_identical_images_share_a_split(committed) -> None:
    _, rows, _ = committed
    splits_of_bytes = defaultdict(set)
    for row in rows:
        digest = hashlib.sha256((DATA / row["image"]).read_bytes()).hexdigest()
        splits_of_bytes[digest].add(row["split"])
    assert all(len(s) == 1 for s in splits_of_bytes.values())


def test_group_key_strips_tones_gender_hair_and_direction() -> None:
    expected = {
        "\U0001f44b\U0001f3fd": "\U0001f44b",  # waving hand: medium skin tone
        "\U0001f469\U0001f3fd\u200d\u2695\ufe0f": "\U0001f9d1\u200d\u2695",  # woman health worker
        "\U0001f469\u200d\U0001f9b0": "\U0001f9d1",  # woman: red hair
        "\U0001f3c3\U0001f3ff\u200d\u2640\ufe0f\u200d\u27a1\ufe0f": "\U0001f3c3",  # running right
        "\U0001f469\u200d\u2764\ufe0f\u200d\U0001f48b\u200d\U0001f468": "\U0001f48f",  # kiss
        "\U0001faf1\U0001f3fb\u200d\U0001faf2\U0001f3ff": "\U0001f91d",  # handshake, two tones
        "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466": (  # family: m, w, g, b
            "\U0001f9d1\u200d\U0001f9d1\u200d\U0001f9d2\u200d\U0001f9d2"
        ),
        "\u2764\ufe0f\u200d\U0001f525": "\u2764\u200d\U0001f525",  # heart on fire: no variant
        "\U0001f3f3\ufe0f\u200d\u26a7\ufe0f": "\U0001f3f3\u200d\u26a7",  # transgender flag
        "\u2640\ufe0f": "\u2640",  # the female sign on its own is an emoji, not a variant
    }
    actual = {chars: build_dataset.group_key(chars) for chars in expected}
    assert actual == expected


def _run_builder(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}
    command = [sys.executable, str(SCRIPT), "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=50)


@needs_font
def test_builder_limit_run_is_complete_deterministic_and_matches_committed(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = _run_builder(out, "--limit", "20")
        assert result.returncode == 0, result.stderr
    record, rows, splits = _read_dataset(first)
    assert record["candidates"] == 20
    assert record["kept"] == len(rows) > 10
    assert sorted(p.name for p in (first / "images").glob("*.png")) == sorted(
        Path(row["image"]).name for row in rows
    )
    assert sorted(sum(splits.values(), [])) == sorted(row["image"] for row in rows)
    assert (first / "LICENSE").is_file()

    # A second run gives the same bytes; only the recorded command names the other folder.
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        a, b = (first / rel).read_bytes(), (second / rel).read_bytes()
        if rel.name in ("build.json", "BUILD.md"):
            a = a.replace(str(first).encode(), str(second).encode())
        assert a == b, f"{rel} differs between two runs"

    # With the font the committed data was made from, the same emoji come out the same.
    committed_record, committed_rows, _ = _read_dataset(DATA)
    if committed_record["font_sha256"] != record["font_sha256"]:
        pytest.skip("the installed font is not the one demo/data/emoji was built with")
    committed_by_emoji = {row["emoji"]: row for row in committed_rows}
    for row in rows:
        committed_row = committed_by_emoji[row["emoji"]]
        assert (row["text"], row["aliases"], row["group"]) == (
            committed_row["text"],
            committed_row["aliases"],
            committed_row["group"],
        )
        with Image.open(first / row["image"]) as new, Image.open(DATA / row["image"]) as old:
            new_px, old_px = new.convert("RGB").tobytes(), old.convert("RGB").tobytes()
        mean_diff = sum(abs(x - y) for x, y in zip(new_px, old_px, strict=True)) / len(new_px)
        assert mean_diff < 2.0, f"{row['image']} differs from the committed one by {mean_diff:.2f}"


def test_builder_names_the_fix_when_the_font_is_missing(tmp_path: Path) -> None:
    result = _run_builder(tmp_path / "out", "--font", str(tmp_path / "missing.ttf"))
    assert result.returncode == 2
    assert "font not found at" in result.stderr
    assert "apt-get install -y fonts-noto-color-emoji" in result.stderr
