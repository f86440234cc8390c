"""One image, the same pixels everywhere: training, chat, eval and serve decode a zoo of modes (RGBA, LA,
P with transparency, L, 16-bit grey, CMYK, EXIF-rotated JPEG) into identical tensors, because they all end in
`llava_ft.data.images.normalize_image`."""
from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from llava_ft import IMAGE_TOKEN_INDEX
from llava_ft.data.llava_dataset import LlavaDataset
from llava_ft.inference import load_chat_model
from llava_ft.inference.evaluate import load_qa
from llava_ft.testing.checkpoints import write_random_checkpoint
from llava_ft.serve.images import ImageLoader

ASK = [{"role": "user", "content": "<image>\nWhat is it?"}]


def _base(size=(24, 16)) -> Image.Image:
    """A wide image with distinct quadrants, so a rotation or a misplaced pad changes the tensor."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2, : size[0] // 2] = (200, 30, 60)
    arr[: size[1] // 2, size[0] // 2:] = (20, 180, 40)
    arr[size[1] // 2:, : size[0] // 2] = (10, 40, 220)
    arr[size[1] // 2:, size[0] // 2:] = (250, 240, 10)
    return Image.fromarray(arr)


def _zoo() -> dict:
    """name -> (encoded file bytes, file suffix)."""
    out = {}

    def save(name, img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[name] = (buf.getvalue(), fmt.lower())

    base = _base()
    rgba = base.convert("RGBA")
    alpha = Image.new("L", base.size, 255)
    alpha.paste(0, (0, 0, 8, 8))  # fully transparent corner: its hidden colour must not show
    rgba.putalpha(alpha)
    save("RGBA", rgba, "PNG")
    la = base.convert("L").convert("LA")
    la.putalpha(alpha)
    save("LA", la, "PNG")
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    save("P_transparent", pal, "PNG", transparency=int(np.asarray(pal)[0, 0]))
    save("L", base.convert("L"), "PNG")
    grey16 = np.full((16, 24), 3000, dtype=np.uint16)
    grey16[:, 12:] = 60000
    save("I;16", Image.fromarray(grey16), "PNG")
    save("CMYK", base.convert("CMYK"), "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    save("EXIF_rotated", base, "JPEG", quality=95, exif=exif)
    return out


ZOO = _zoo()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_llama, tiny_clip):
    raw = {"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True},
           "data": {"template": "chatml", "sources": [{"path": "unused.json"}], "pad_image_to_square": True}}
    return load_chat_model(write_random_checkpoint(tmp_path_factory.mktemp("zoo_run"), raw), device="cpu")


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name, (data, suffix) in ZOO.items():
        path = folder / f"{name.replace(';', '_')}.{suffix}"
        path.write_bytes(data)
        paths[name] = str(path)
    return paths


def _training(chat_model, path) -> torch.Tensor:
    ve = chat_model.model.visual_encoder
    ds = LlavaDataset([], visual_encoder=ve, pad_to_square=True)
    return ds.load_pixels({"id": "zoo", "input_ids": [IMAGE_TOKEN_INDEX], "images": [path]})


def _mmbench(tmp_path, name) -> object:
    """The image as eval reads it from an MMBench TSV's base64 column."""
    tsv = tmp_path / "mmbench.tsv"
    b64 = base64.b64encode(ZOO[name][0]).decode()
    tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n" f"0\tWhat is it?\tred\tblue\tA\t{b64}\n")
    return load_qa(str(tsv))[0].images[0]


@pytest.mark.parametrize("name", list(ZOO))
def test_training_chat_eval_and_serve_see_the_same_pixels(chat_model, zoo_files, tmp_path, name):
    path = zoo_files[name]
    training = _training(chat_model, path)
    chat = chat_model.encode(ASK, [path]).pixel_values
    eval_tsv = chat_model.encode(ASK, [_mmbench(tmp_path, name)]).pixel_values
    loader = ImageLoader()
    data_url = f"data:image/{ZOO[name][1]};base64," + base64.b64encode(ZOO[name][0]).decode()
    served = loader.decode(asyncio.run(loader.load_bytes(data_url)))
    serve = chat_model.encode(ASK, [served]).pixel_values
    assert training.shape == chat.shape == (1, 3, 32, 32)
    assert torch.equal(training, chat) and torch.equal(training, eval_tsv) and torch.equal(training, serve)


def test_what_the_shared_conversion_gives(zoo_files):
    """The pixel values the zoo must come out with (what training has always produced), read from serve."""
    loader = ImageLoader()
    rgba = loader.decode(ZOO["RGBA"][0])
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert rgba.getpixel((20, 2)) == (20, 180, 40)
    assert loader.decode(ZOO["LA"][0]).getpixel((1, 1)) == (255, 255, 255)
    assert loader.decode(ZOO["P_transparent"][0]).getpixel((0, 0)) == (255, 255, 255)
    grey = loader.decode(ZOO["I;16"][0])
    assert grey.getpixel((0, 0)) == (12, 12, 12) and grey.getpixel((23, 0)) == (233, 233, 233)  # 16-bit / 257
    assert loader.decode(ZOO["EXIF_rotated"][0]).size == (16, 24)  # upright, as viewers show it
