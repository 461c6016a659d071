"""Files for indexer tests: good images in every format and mode, and the bad inputs of issue 3."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from tests.data import shape_image, write_shapes

REPO = Path(__file__).resolve().parents[2]


def write_odd_images(folder: Path) -> list[Path]:
    """Usable images that need care: formats, modes, EXIF rotation, an upper-case extension."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    def save(img: Image.Image, name: str, **kw: object) -> None:
        img.save(folder / name, **kw)
        out.append(folder / name)

    save(shape_image("red", "circle", seed=11).convert("CMYK"), "cmyk.jpg", quality=95)
    gray = np.asarray(shape_image("blue", "square", seed=12).convert("L"), dtype=np.uint16) * 257
    save(Image.fromarray(gray), "gray16.png")
    save(
        shape_image("green", "cross", seed=13).convert("P", palette=Image.Palette.ADAPTIVE),
        "palette.png",
        transparency=0,
    )
    rgba = shape_image("purple", "triangle", seed=14).convert("RGBA")
    rgba.putalpha(128)
    save(rgba, "alpha.png")
    save(exif_rotated_source(), "rotated.jpg", exif=_orientation(6), quality=95)
    save(shape_image("orange", "circle", seed=15), "UPPER.PNG")
    frames = [shape_image("cyan", "square", seed=16), shape_image("black", "cross", seed=17)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    out.append(folder / "anim.gif")
    save(shape_image("yellow", "triangle", seed=18), "photo.webp", quality=90)
    save(shape_image("red", "square", seed=19), "scan.bmp")
    save(shape_image("green", "circle", seed=20), "scan.tiff")
    return out


def exif_rotated_source() -> Image.Image:
    """A wide image with a marker on the left; EXIF orientation 6 turns it upright (tall)."""
    img = Image.new("RGB", (64, 32), (240, 240, 240))
    img.paste((200, 20, 20), (0, 0, 16, 32))
    return img


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def write_bad_images(folder: Path) -> dict[str, str]:
    """Unusable files; returns file name -> the start of the reason the indexer must report."""
    folder.mkdir(parents=True, exist_ok=True)
    shape_image("red", "circle", seed=30).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "whole.png").unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a picture\n")
    (folder / "bomb.png").write_bytes(png_bomb(40_000, 40_000))
    os.symlink(folder / "gone.png", folder / "dangling.png")
    return {
        "truncated.png": "not a readable image",
        "empty.jpg": "empty file",
        "notes.jpg": "not a readable image",
        "bomb.png": "image too large (decompression bomb",
        "dangling.png": "no such file",
    }


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (over Pillow's bomb limit)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def shapes(folder: Path, variants: int = 1) -> list[Path]:
    return [p for p, _ in write_shapes(folder, variants=variants)]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def open_table(db: Path, table: str):
    """The store of ``table``, opened as the Searcher opens it."""
    from indexer.manifest import DbManifest
    from indexer.stores import open_store

    manifest = DbManifest.read(db)
    assert manifest is not None
    entry = manifest.tables[table]
    versions = manifest.table_versions(table)
    version = manifest.active(table) or versions[-1]  # a first build not finished yet: its rows
    return open_store(
        db, version.store, entry["backend"], dim=version.dim, index_type=entry.get("index_type")
    )


def rows(db: Path, table: str) -> dict[str, dict]:
    """sha256 -> row of a table (metadata, and the vector as float32 numpy)."""
    store = open_table(db, table)
    meta = store.read_meta()
    if meta.num_rows == 0:
        return {}
    full = store.fetch(meta.column("sha256").to_pylist(), with_vectors=True)
    assert full.schema.field("vector").type == pa.list_(pa.float32(), store.dim)
    out = {}
    for row in full.to_pylist():
        row["vector"] = np.asarray(row["vector"], dtype=np.float32)
        out[row["sha256"]] = row
    return out


def run_python(code: str, *args: str, timeout: float = 50) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter at the repository root."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
