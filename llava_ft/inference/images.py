"""Open an image for inference from a path, an http(s) URL or a PIL image; pad it to square like training.

    img = open_image("cat.jpg")            # RGB PIL image; UserError naming the path when unreadable
    img = pad_to_square(img, (122, 116, 104))

Chat prints a bad image as a one-line error and goes on, so every failure here is a UserError.
"""
from __future__ import annotations

import io
import os
import urllib.request

from llava_ft.errors import UserError


def open_image(image):
    """RGB PIL image from a PIL image, a local path or an http(s) URL."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    source = os.fspath(image)
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as resp:
                data = resp.read()
            img = Image.open(io.BytesIO(data))
        else:
            img = Image.open(os.path.expanduser(source))
        img.load()
    except FileNotFoundError:
        raise UserError(f"image {source}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"image {source}: cannot be read as an image ({err.__class__.__name__}: {err})") from None
    return img.convert("RGB")


def pad_to_square(img, fill: tuple):
    """Centre `img` on a square canvas of colour `fill` (0-255 RGB), as LLaVA's `expand2square` does."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), tuple(int(round(c)) for c in fill))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
