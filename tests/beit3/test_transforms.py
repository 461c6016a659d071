import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from beit3 import ImageTransform, InputDataError, PreprocessConfig, TrainImageTransform, load_image


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_eval_transform_is_bicubic_squash_with_half_mean_std():
    cfg = PreprocessConfig(img_size=32)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 80, 3), dtype=np.uint8))  # 80 wide, 50 high
    out = ImageTransform(cfg)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Same numbers as torchvision's Resize((32, 32), BICUBIC) + ToTensor + Normalize(0.5, 0.5).
    resized = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32)
    expected = torch.from_numpy((resized / 255.0 - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(out, expected)
    white = ImageTransform(cfg)(Image.new("RGB", (10, 10), (255, 255, 255)))
    black = ImageTransform(cfg)(Image.new("RGB", (10, 10), (0, 0, 0)))
    assert torch.all(white == 1.0) and torch.all(black == -1.0)


def test_train_transform_crops_within_range_and_is_reproducible():
    cfg = PreprocessConfig(img_size=32)
    a = TrainImageTransform(cfg, rng=random.Random(3))
    b = TrainImageTransform(cfg, rng=random.Random(3))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    assert torch.equal(a(img), b(img))
    areas = []
    for _ in range(300):
        left, top, w, h = a.crop_box(120, 100)
        assert left >= 0 and left + w <= 120 and top >= 0 and top + h <= 100
        areas.append(w * h / 12000)
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert min(areas) >= 0.45 and max(areas) <= 1.0 and 0.65 < np.mean(areas) < 0.85


def test_flip_mirrors_the_image():
    cfg = PreprocessConfig(img_size=32)
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 32))  # white band on the left
    flip = TrainImageTransform(cfg, scale=(1, 1), ratio=(1, 1), hflip=1.0)(img)
    assert flip[0, :, -1].mean() > 0.9 and flip[0, :, 0].mean() < -0.9


def test_load_image_handles_modes(tmp_path):
    cmyk = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert load_image(cmyk).getpixel((4, 4))[0] > 200  # red
    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    img16 = _save(Image.fromarray(arr16), tmp_path / "g16.png")
    assert Image.open(img16).mode.startswith("I")
    assert load_image(img16).getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert load_image(_save(rgba, tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] * 256)
    assert load_image(_save(pal, tmp_path / "p.gif")).getpixel((1, 1)) == (0, 0, 255)
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    assert load_image(gif).getpixel((1, 1))[1] > 200  # the first frame: green


def test_load_image_applies_exif_rotation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "missing", "directory"])
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "truncated":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[:60])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello")
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(InputDataError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(InputDataError, match="decompression bomb"):
        load_image(path)


def test_load_image_tensor_drafts_jpegs_to_twice_the_input_size(tmp_path):
    from beit3.transforms import jpeg_draft_size, load_image_tensor

    cfg = PreprocessConfig(img_size=32)
    assert jpeg_draft_size(cfg) == 64
    pixels = np.random.default_rng(0).integers(0, 256, (260, 300, 3), dtype=np.uint8)
    jpeg = _save(Image.fromarray(pixels), tmp_path / "big.jpg", quality=90)
    drafted = load_image(jpeg, draft_size=64)
    assert drafted.size == (75, 65)  # 1/4 scale: the smallest that keeps both sides >= 64
    got = load_image_tensor(jpeg, cfg)
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    assert torch.equal(got, ImageTransform(cfg)(drafted))
    assert torch.equal(got, load_image_tensor(jpeg.read_bytes(), cfg))  # bytes decode the same
    assert not torch.equal(got, ImageTransform(cfg)(load_image(jpeg)))  # not a full decode
    png = _save(Image.fromarray(pixels), tmp_path / "big.png")  # drafts are for JPEGs only
    assert torch.equal(load_image_tensor(png, cfg), ImageTransform(cfg)(load_image(png)))
    decoded = Image.fromarray(pixels)  # a PIL image is taken as decoded
    assert torch.equal(load_image_tensor(decoded, cfg), ImageTransform(cfg)(decoded))


def test_the_pixel_limit_holds_in_every_thread(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    big = _save(Image.new("RGB", (90, 90)), tmp_path / "big.png")  # 8,100 px: 1.6x the limit
    small = _save(Image.new("RGB", (20, 20)), tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)

    def outcome(path):
        try:
            load_image(path)
            return "decoded"
        except InputDataError as exc:
            return "refused" if "decompression bomb" in str(exc) else str(exc)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(outcome, [big, small] * 100))
    assert got == ["refused", "decoded"] * 100
