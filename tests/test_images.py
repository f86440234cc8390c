"""Tests for llava_ft.data.images: mode conversion, pad-to-square colour, pre-training image check.

Run: python -m pytest tests/test_images.py -x -q
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava_ft.errors import UserError
from llava_ft.data.images import BadImageError, expand2square, load_image, to_rgb, verify_images


def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "YCbCr"])
def test_modes_become_rgb(tmp_path, mode):
    src = Image.new("RGB", (6, 4), (200, 30, 60))
    img = src.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "YCbCr", "LA") else "PNG"
    if mode == "YCbCr":
        fmt = "JPEG"
    out = load_image(_save(img, tmp_path / f"x.{fmt.lower()}", format=fmt), "s1")
    assert out.mode == "RGB" and out.size == (6, 4)


def test_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    rgb = to_rgb(img)
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_16bit_grey_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    rgb = load_image(path)
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    path = _save(img, tmp_path / "rot.jpg", exif=exif)
    assert load_image(path).size == (2, 4)


def test_expand2square_uses_given_mean_colour():
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    sq = expand2square(img, (123, 117, 104))
    assert sq.size == (4, 4)
    assert sq.getpixel((0, 0)) == (123, 117, 104) and sq.getpixel((0, 3)) == (123, 117, 104)
    assert sq.getpixel((0, 1)) == (10, 20, 30) and sq.getpixel((3, 2)) == (10, 20, 30)
    tall = expand2square(Image.new("RGB", (1, 3), (1, 2, 3)), (9, 9, 9))
    assert tall.getpixel((0, 1)) == (9, 9, 9) and tall.getpixel((1, 1)) == (1, 2, 3)
    same = Image.new("RGB", (3, 3))
    assert expand2square(same, (0, 0, 0)) is same


def _jpeg(path, size=(64, 64)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    return str(path)


def test_bad_files_raise_named_errors(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    data = open(good, "rb").read()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match=r"sample 7: image .*trunc.jpg: cannot decode"):
        load_image(str(tmp_path / "trunc.jpg"), "7")
    with pytest.raises(UserError, match=r"sample 8: image .*junk.png"):
        load_image(str(tmp_path / "junk.png"), "8")
    with pytest.raises(UserError, match="file not found"):
        load_image(str(tmp_path / "missing.png"), "9")


def test_verify_images_finds_every_bad_file(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    data = open(good, "rb").read()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) - 100])
    png = _save(Image.new("RGB", (32, 32), (1, 2, 3)), tmp_path / "ok.png")
    png_bytes = open(png, "rb").read()
    (tmp_path / "trunc.png").write_bytes(png_bytes[:-20])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8garbage")
    rows = [
        {"id": "a", "images": [good]},
        {"id": "b", "images": [str(tmp_path / "trunc.jpg")]},
        {"id": "c", "images": []},
        {"id": "d", "images": [png, str(tmp_path / "trunc.png")]},
        {"id": "e", "images": [str(tmp_path / "junk.jpg")]},
        {"id": "f", "images": [str(tmp_path / "nope.jpg")]},
        {"id": "g", "images": [str(tmp_path / "trunc.jpg")]},
    ]
    problems = verify_images(rows, num_threads=4)
    found = {(p.sample_id, p.path.rsplit("/", 1)[-1]) for p in problems}
    assert found == {("b", "trunc.jpg"), ("d", "trunc.png"), ("e", "junk.jpg"), ("f", "nope.jpg")}
    by_file = {p.path.rsplit("/", 1)[-1]: p for p in problems}
    assert by_file["trunc.jpg"].other_samples == 1 and "and 1 more" in str(by_file["trunc.jpg"])
    assert "file not found" in by_file["nope.jpg"].reason
    assert verify_images([{"id": "a", "images": [good, png]}]) == []


def test_verify_images_reads_a_hf_dataset(tmp_path):
    import datasets

    good = _jpeg(tmp_path / "good.jpg")
    ds = datasets.Dataset.from_dict({"id": ["x", "y"], "images": [[good], [str(tmp_path / "gone.jpg")]],
                                     "input_ids": [[1], [2]]})
    assert [p.sample_id for p in verify_images(ds)] == ["y"]
