"""Open an image for inference from a path, an http(s) URL or a PIL image, converted as in training.

    img = open_image("cat.jpg")            # RGB PIL image; UserError naming the path when unreadable
    img = open_image("https://.../x.png")

EXIF orientation, mode conversion and pad-to-square are the training code's
(`llava_ft.data.images.normalize_image` / `expand2square`), so a chat image (a file, a URL or a PIL image
decoded elsewhere, e.g. eval's MMBench base64 column) is seen exactly as a training image was. Chat
prints a bad image as a one-line error and goes on, so every failure here is a UserError.
"""
from __future__ import annotations

import io
import os
import urllib.request

from llava_ft.data.images import expand2square, normalize_image
from llava_ft.errors import UserError

__all__ = ["open_image", "pad_to_square"]


def open_image(image):
    """RGB PIL image from a PIL image, a local path or an http(s) URL."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return normalize_image(image)
    source = os.fspath(image)
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as resp:
                img = Image.open(io.BytesIO(resp.read()))
        else:
            img = Image.open(os.path.expanduser(source))
        img.load()  # decode now, so a truncated file fails here with its name
        return normalize_image(img)
    except FileNotFoundError:
        raise UserError(f"image {source}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"image {source}: cannot be read as an image ({type(err).__name__}: {err})") from None


def pad_to_square(img, fill: tuple):
    """Centre `img` on a square canvas of colour `fill` (0-255 RGB), as training's pad_image_to_square."""
    return expand2square(img, fill)
