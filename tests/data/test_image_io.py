"""Every PIL mode loads as an 8-bit RGB picture: 16/32-bit samples rescaled (not clipped), alpha dropped,
palettes and CMYK converted, EXIF orientation applied."""

import numpy as np
import pytest
from PIL import Image

from part_distillation.data.image_io import read_image


def _ramp():
    return np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # 8×64, values 0..252


@pytest.mark.parametrize(
    "mode,make",
    [
        ("I;16", lambda g: Image.fromarray(g.astype(np.uint16) * 257)),
        ("I", lambda g: Image.fromarray(g.astype(np.int32) * 257, mode="I")),
        ("F", lambda g: Image.fromarray(g.astype(np.float32) / 255.0, mode="F")),
        ("L", lambda g: Image.fromarray(g)),
        ("LA", lambda g: Image.fromarray(np.dstack([g, np.zeros_like(g)]), mode="LA")),
        ("P", lambda g: Image.fromarray(g).convert("P")),
        ("1", None),
    ],
)
def test_gray_modes_load_as_their_8_bit_values(tmp_path, mode, make):
    gray = _ramp()
    if mode == "1":
        img = Image.fromarray(gray >= 128)
        expected = np.where(gray >= 128, 255, 0)
    else:
        img = make(gray)
        expected = gray
    assert img.mode.startswith(mode[0])
    path = str(tmp_path / "x.png") if mode not in ("F", "I") else str(tmp_path / "x.tiff")
    img.save(path)
    out = read_image(path, "RGB")
    assert out.dtype == np.uint8 and out.shape == (8, 64, 3)
    tol = 2 if mode == "P" else 1
    assert np.abs(out[..., 0].astype(int) - expected).max() <= tol
    assert (out[..., 0] == out[..., 2]).all()


def test_16bit_png_is_not_white(tmp_path):
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(tmp_path / "g.png")
    out = read_image(str(tmp_path / "g.png"), "BGR")
    assert (out == round(30000 / 257)).all()


def test_rgba_cmyk_and_transparent_palette(tmp_path):
    rgb = np.random.RandomState(0).randint(0, 256, (6, 5, 3)).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((6, 5), 7, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_image(str(tmp_path / "a.png"), "RGB"), rgb)  # alpha dropped, colours kept
    assert np.array_equal(read_image(str(tmp_path / "a.png"), "BGR"), rgb[..., ::-1])
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert np.abs(read_image(str(tmp_path / "c.jpg"), "RGB").astype(int) - rgb).mean() < 12
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert read_image(str(tmp_path / "p.png"), "RGB").shape == (6, 5, 3)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :5] = 255  # a white band on the left of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(stored).save(tmp_path / "e.jpg", exif=exif.tobytes(), quality=100)
    out = read_image(str(tmp_path / "e.jpg"), "RGB")
    assert out.shape[:2] == (20, 10)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now at the top
