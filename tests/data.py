"""Synthetic data for tests: coloured shapes on a plain background, with captions.

A known set: each (colour, shape) pair has one caption, so recall can be measured exactly.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "black": (20, 20, 20),
    "cyan": (20, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def shape_image(color: str, shape: str, size: int = 64, seed: int = 0) -> Image.Image:
    """Draw one shape of ``color`` on a light background, jittered by ``seed``."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    margin = size // 8 + rng.randint(-2, 2)
    box = (margin, margin, size - margin, size - margin)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(size // 2, margin), (margin, size - margin), (size - margin, size - margin)],
            fill=fill,
        )
    elif shape == "cross":
        w = size // 6
        draw.rectangle((size // 2 - w, margin, size // 2 + w, size - margin), fill=fill)
        draw.rectangle((margin, size // 2 - w, size - margin, size // 2 + w), fill=fill)
    else:
        raise ValueError(shape)
    return img


def pairs() -> list[tuple[str, str]]:
    return list(itertools.product(COLORS, SHAPES))


def caption_corpus() -> list[str]:
    extra = ["a photo of", "an image showing", "the big small round shape", "with a white border"]
    return [caption(c, s) for c, s in pairs()] * 3 + extra * 3


def write_shapes(folder: Path, size: int = 64, variants: int = 1) -> list[tuple[Path, str]]:
    """Write every (colour, shape) image as PNG; returns (path, caption) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for v in range(variants):
        for color, shape in pairs():
            path = folder / f"{color}_{shape}_{v}.png"
            shape_image(color, shape, size, seed=v).save(path)
            out.append((path, caption(color, shape)))
    return out
