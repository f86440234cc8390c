"""Image loading for LLaVA data: any file mode -> RGB, pad-to-square, and a fast pre-training check.

    img = load_image(path, sample_id="42")            # PIL RGB; BadImageError (a UserError) names id + path
    img = normalize_image(pil)                        # the same conversion for an image decoded elsewhere
    img = load_image_bytes(data, "org/ds[#3].images[0]", "42")   # same, for an image stored in a dataset
    img = expand2square(img, ve.image_mean)           # pad with the processor's mean colour (LLaVA-1.5)
    problems = verify_images(dataset, num_threads=16) # [ImageProblem(sample_id, path, reason)], no full decode

Mode conversion: palette / grey / CMYK / YCbCr -> RGB via PIL; images with transparency are composited on
white (a bare `.convert("RGB")` would expose whatever colour hides under transparent pixels, often black);
16/32-bit integer and float greyscale ("I;16", "I", "F") are rescaled to 8 bit instead of being clipped
to white. EXIF orientation is applied, so phone photos are upright as their viewers show them.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from llava_ft.errors import UserError

WHITE = (255, 255, 255)


class BadImageError(UserError):
    """An image file that is missing, truncated or not decodable; the message names sample id and path."""

    def __init__(self, sample_id, path, reason: str):
        self.sample_id, self.path, self.reason = sample_id, path, reason
        super().__init__(f"sample {sample_id}: image {path}: {reason}. Fix or remove the file, or set "
                         "data.skip_bad_samples=true to skip such samples (they are counted)")


def _high_bit_to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0  # full 16-bit range -> 0..255
    else:
        top = float(arr.max()) if arr.size else 0.0
        if top > 255.0:  # 32-bit ints / floats: stretch to the image's own range
            low = float(arr.min())
            arr = (arr - low) * (255.0 / max(top - low, 1e-12))
        elif img.mode == "F" and top <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))  # 2-D uint8 -> "L"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an opened image of any mode to RGB (see module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_bit_to_8bit(img).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def normalize_image(img: Image.Image) -> Image.Image:
    """THE conversion of a decoded image to what the model sees: EXIF orientation applied, then `to_rgb`.

    Training (`load_image`), chat and eval (`llava_ft.inference.images`) and serve (`serve.images`) all end
    here, so one file gives the same pixels everywhere (the orientation first: compositing makes a new
    image without the EXIF block)."""
    return to_rgb(ImageOps.exif_transpose(img))


def load_image(path: str, sample_id="?") -> Image.Image:
    """Open, fully decode and convert to RGB; any failure is a BadImageError naming sample and path."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file must fail here, not later inside the processor
            return normalize_image(img)
    except FileNotFoundError:
        raise BadImageError(sample_id, path, "file not found (check data.sources.*.image_folder)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(sample_id, path, f"cannot decode ({type(err).__name__}: {err})") from None


def load_image_bytes(data: bytes, name: str = "<bytes>", sample_id="?") -> Image.Image:
    """`load_image` for an encoded image held in memory (a datasets.Image stored in the dataset);
    `name` labels it in errors (e.g. `org/ds[#12].images[0]`)."""
    import io

    try:
        return load_image(io.BytesIO(data), sample_id)
    except BadImageError as err:
        raise BadImageError(sample_id, name, err.reason) from None


def expand2square(img: Image.Image, background=(0, 0, 0)) -> Image.Image:
    """Pad the shorter side, centring the image (LLaVA-1.5 `pad` aspect ratio); background is 0-255 RGB."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    out = Image.new(img.mode, (side, side), tuple(int(c) for c in background))
    out.paste(img, ((side - width) // 2, (side - height) // 2))
    return out


@dataclass(frozen=True)
class ImageProblem:
    sample_id: str
    path: str
    reason: str
    other_samples: int = 0  # how many more samples use the same file

    def __str__(self) -> str:
        more = f" (and {self.other_samples} more samples using it)" if self.other_samples else ""
        return f"sample {self.sample_id}: image {self.path}: {self.reason}{more}"


_PNG_END = b"IEND\xaeB`\x82"
_JPEG_EOI = b"\xff\xd9"
MISSING, TRUNCATED, UNREADABLE = "missing_image", "truncated_image", "unreadable_image"


def image_problem(source: Union[str, bytes]) -> Optional[tuple[str, str]]:
    """(kind, reason) when an image is unusable, else None; `source` is a file path or the encoded bytes
    of an image stored inside a dataset: both get the same check (training's and `data check`'s).

    Kinds: missing_image, truncated_image, unreadable_image. Header + structure check (PIL verify), no
    full decode, except where the end marker is missing: `verify()` walks a PNG's chunks but not a JPEG's
    entropy data, so a JPEG (or PNG) that does not end in its end marker (FFD9 / IEND) is decoded fully,
    as training will, to tell a cut file from one with harmless trailing bytes.
    """
    import io

    from llava_ft.data.videos import check_video_file, is_video

    if not isinstance(source, (bytes, bytearray)) and is_video(source):  # a clip (OneVision): PyAV opens it
        if not os.path.isfile(source):
            return MISSING, "file not found (check data.sources.*.image_folder)"
        reason = check_video_file(source)
        return (UNREADABLE, reason) if reason else None

    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        head, tail = data[:16], data[-64:]

        def opened():
            return Image.open(io.BytesIO(data))
    else:
        if not os.path.isfile(source):
            return MISSING, "file not found (check data.sources.*.image_folder)"
        try:
            with open(source, "rb") as fh:
                head = fh.read(16)
                fh.seek(max(os.path.getsize(source) - 64, 0))
                tail = fh.read()
        except OSError as err:
            return UNREADABLE, f"cannot read ({err})"

        def opened():
            return Image.open(source)
    cut = None
    if head.startswith(b"\x89PNG") and not tail.endswith(_PNG_END):
        cut = "PNG ends before its IEND chunk (file cut short?)"
    elif head.startswith(b"\xff\xd8") and not tail.rstrip(b"\x00").endswith(_JPEG_EOI):
        cut = "JPEG has no end-of-image marker (file cut short?)"
    try:
        with opened() as img:
            img.verify()
        if cut:
            with opened() as img:
                img.load()
    except Exception as err:  # PIL raises many types for broken files
        return (TRUNCATED, f"{cut}: {type(err).__name__}: {err}") if cut else \
            (UNREADABLE, f"cannot decode ({type(err).__name__}: {err})")
    return None


def check_image(source: Union[str, bytes]) -> Optional[str]:
    """Reason a file or in-dataset image (bytes) is unusable, or None: `image_problem` without the kind."""
    problem = image_problem(source)
    return None if problem is None else problem[1]


def _rows(rows) -> Iterable[dict]:
    # A datasets.Dataset: read only the columns needed instead of decoding input_ids too.
    if hasattr(rows, "select_columns") and hasattr(rows, "column_names"):
        return rows.select_columns([c for c in ("id", "images", "image_bytes") if c in rows.column_names])
    return rows


def verify_images(rows, num_threads: int = 16, progress: bool = False,
                  memo_dir: Optional[str] = None, memo_key: str = "") -> list[ImageProblem]:
    """Check every image of `rows` (dicts or a datasets.Dataset with `id` and `images`) before training.

    Each distinct path is checked once, in a thread pool (PIL releases the GIL while reading files).
    Returns the problems (empty list = all good), one per bad file, naming the first sample using it.
    With `memo_dir` (the data cache folder), files that passed an earlier check of the data named by
    `memo_key` and have not changed since are not read again (llava_ft.data.image_check_memo).
    """
    users: dict[str, list] = {}
    embedded: list = []  # ImageProblem for images stored in the dataset (bytes), checked here one by one
    for row in _rows(rows):
        paths = row.get("images") or []
        for path, blob in zip(paths, row.get("image_bytes") or [b""] * len(paths)):
            if blob:
                reason = check_image(blob)
                if reason is not None:
                    embedded.append(ImageProblem(str(row.get("id", "?")), path, reason))
                continue
            users.setdefault(path, []).append(row.get("id", "?"))
    paths: Sequence[str] = list(users)
    memo = known_good = None
    if memo_dir is not None and paths:
        from llava_ft.data.image_check_memo import ImageCheckMemo

        memo = ImageCheckMemo(memo_dir, memo_key, paths, num_threads)
        known_good = memo.known_good()
    to_check = paths if known_good is None else [p for p, good in zip(paths, known_good) if not good]
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = pool.map(check_image, to_check)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(to_check), desc="checking images", unit="img")
        found = dict(zip(to_check, results))
    if memo is not None:
        memo.save(np.array([found.get(p) is None for p in paths], dtype=bool))
    return embedded + [ImageProblem(str(users[p][0]), p, reason, len(users[p]) - 1)
                       for p, reason in found.items() if reason is not None]
