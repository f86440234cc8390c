"""Turn the `image_url` parts of an OpenAI chat request into PIL images, safely.

Used by `llava_ft.serve.app` for every image a client sends:

    loader = ImageLoader(image_dir="/data/imgs", allow_remote=False, max_bytes=20 << 20, max_pixels=64 << 20)
    pil = await loader.load(url)   # raises ApiError with the HTTP status the client should see

Accepted URLs: `data:image/...;base64,...` always; `http(s)://` only when remote images are allowed;
local paths (`file://...`, absolute, or relative to the image dir) only when an image dir is set, and only
if the real path (symlinks resolved) stays inside it. Sizes are checked before anything is decoded:
encoded bytes against `max_bytes` (413), the header's width x height against `max_pixels` (413, the
decompression-bomb guard), then the pixels are decoded (undecodable -> 400) and converted by
`llava_ft.data.images.normalize_image`, the function training uses. `video_url` parts (OneVision models)
go through `load_video`: the same URL kinds and folder rules, a larger byte limit, frames decoded as
training samples them.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from typing import Optional
from urllib.parse import unquote, urlparse

from llava_ft.data.images import normalize_image
from llava_ft.serve.errors import ApiError


class ImageLoader:
    def __init__(self, image_dir: Optional[str] = None, allow_remote: bool = False,
                 max_bytes: int = 20 * 1024 * 1024, max_pixels: int = 64 * 1024 * 1024,
                 remote_timeout_s: float = 10.0, max_video_bytes: int = 64 * 1024 * 1024):
        # realpath once: every later check compares real paths, so symlinks cannot escape the folder
        self.image_dir = os.path.realpath(image_dir) if image_dir else None
        self.allow_remote = allow_remote
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.remote_timeout_s = remote_timeout_s
        self.max_video_bytes = max_video_bytes

    # ---------------------------------------------------------------------------------------------
    # bytes from each kind of URL (`what`: "image" or "video", for the limits and the messages)

    def _limit(self, what: str) -> int:
        return self.max_video_bytes if what == "video" else self.max_bytes

    def _too_big(self, n: int, what: str = "image") -> ApiError:
        return ApiError(413, f"{what} is {n} bytes; the limit is {self._limit(what)} bytes",
                        code=f"{what}_too_large")

    def _data_url(self, url: str, what: str = "image") -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header.lower():
            example = "video/mp4" if what == "video" else "image/png"
            raise ApiError(400, f"data URLs must look like data:{example};base64,<data>", param=f"{what}_url")
        payload = payload.strip()
        # 4 base64 chars carry 3 bytes: refuse before decoding so a huge string costs no memory twice
        if len(payload) * 3 // 4 > self._limit(what):
            raise self._too_big(len(payload) * 3 // 4, what)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{what} data URL is not valid base64", param=f"{what}_url", code=f"invalid_{what}")

    async def _remote(self, url: str, what: str = "image") -> bytes:
        if not self.allow_remote:
            raise ApiError(403, f"remote {what} URLs are disabled on this server (start it with "
                                f"--allow-remote-images, or send the {what} as a base64 data: URL)",
                           param=f"{what}_url", code="remote_images_disabled")
        import httpx

        data = bytearray()
        try:
            async with httpx.AsyncClient(timeout=self.remote_timeout_s, follow_redirects=True,
                                         max_redirects=3) as client:
                async with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise ApiError(400, f"fetching the {what} failed: HTTP {resp.status_code}",
                                       param=f"{what}_url", code=f"invalid_{what}")
                    async for chunk in resp.aiter_bytes():
                        data.extend(chunk)
                        if len(data) > self._limit(what):  # stop reading at the limit, never buffer more
                            raise self._too_big(len(data), what)
        except httpx.HTTPError as err:
            raise ApiError(400, f"fetching the {what} failed: {type(err).__name__}", param=f"{what}_url",
                           code=f"invalid_{what}")
        return bytes(data)

    def resolve_local(self, url: str) -> str:
        """Real path of a local image reference, or ApiError 403 when it is outside the image dir."""
        if self.image_dir is None:
            raise ApiError(403, "local image paths are disabled on this server (start it with --image-dir DIR, "
                                "or send the image as a base64 data: URL)", param="image_url",
                           code="local_images_disabled")
        path = unquote(urlparse(url).path) if url.startswith("file:") else url
        if "\x00" in path:
            raise ApiError(400, "image path contains a NUL byte", param="image_url")
        real = os.path.realpath(os.path.join(self.image_dir, path))  # absolute `path` replaces the base
        if os.path.commonpath([real, self.image_dir]) != self.image_dir:
            raise ApiError(403, "image path is outside the server's image directory", param="image_url",
                           code="path_forbidden")
        return real

    def _local(self, url: str) -> bytes:
        real = self.resolve_local(url)
        if not os.path.isfile(real):
            raise ApiError(400, f"image not found: {url}", param="image_url", code="invalid_image")
        size = os.path.getsize(real)
        if size > self.max_bytes:
            raise self._too_big(size)
        with open(real, "rb") as f:
            return f.read()

    async def load_video(self, url: str, decode):
        """A `video_url` part -> what the model takes for a clip (LLaVA-OneVision models).

        A local path under the image dir (same 403 rules as images) stays a path: the model decodes its few
        sampled frames from the file. A base64 `data:` URL, or an http(s) URL when remote media are allowed,
        is read (at most `max_video_bytes`) into a temporary file, decoded here by `decode(path)` (the chat
        model's `load_clip`: the frames training would sample) and deleted: the model gets the frames."""
        if not isinstance(url, str) or not url:
            raise ApiError(400, "video_url.url must be a non-empty string", param="video_url")
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            data = self._data_url(url, "video")
        elif scheme in ("http", "https"):
            data = await self._remote(url, "video")
        elif scheme in ("", "file"):
            return self.video_path(url)
        else:
            raise ApiError(400, f"unsupported video URL scheme '{scheme}'", param="video_url", code="invalid_video")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self._decode_video, data, decode)  # decoding is CPU work: off the loop

    @staticmethod
    def _decode_video(data: bytes, decode):
        import tempfile

        from llava_ft.errors import UserError

        # PyAV reads containers from a file (it finds the format from the bytes, not the name)
        fd, path = tempfile.mkstemp(prefix="llava_ft_video_")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return decode(path)
        except UserError as err:
            reason = str(err).replace(path, "the video").removeprefix("the video: ")
            raise ApiError(400, f"video could not be used: {reason}", param="video_url", code="invalid_video")
        finally:
            os.unlink(path)

    def video_path(self, url: str) -> str:
        """A local `video_url` -> the clip's real path under the image dir (same 403 rules as images)."""
        from llava_ft.data.videos import VIDEO_SUFFIXES, is_video

        real = self.resolve_local(url)
        if not is_video(real):
            raise ApiError(400, f"not a video file name: {url} (expected one of {', '.join(VIDEO_SUFFIXES)})",
                           param="video_url", code="invalid_video")
        if not os.path.isfile(real):
            raise ApiError(400, f"video not found: {url}", param="video_url", code="invalid_video")
        return real

    # ---------------------------------------------------------------------------------------------

    def decode(self, data: bytes):
        """Bytes -> RGB PIL image, checking the pixel count from the header before decoding pixels."""
        from PIL import Image

        try:
            with warnings.catch_warnings():
                # PIL warns (and past 2x raises) on its own global limit; ours is checked explicitly below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                width, height = img.size
                if width * height > self.max_pixels or width <= 0 or height <= 0:
                    raise ApiError(413, f"image is {width}x{height} pixels; the limit is {self.max_pixels} "
                                        "pixels", param="image_url", code="image_too_large")
                img.load()
                # The training conversion (EXIF orientation, transparency on white, 16-bit grey rescaled),
                # so the server sees the pixels training and chat see; a bare convert("RGB") does not.
                return normalize_image(img)
        except ApiError:
            raise
        except Image.DecompressionBombError as err:
            raise ApiError(413, f"image rejected as a decompression bomb: {err}", param="image_url",
                           code="image_too_large")
        except Exception as err:  # PIL raises many types for bad data; all mean "not an image we can read"
            raise ApiError(400, f"image could not be decoded ({type(err).__name__})", param="image_url",
                           code="invalid_image")

    async def load_bytes(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise ApiError(400, "image_url.url must be a non-empty string", param="image_url")
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            return self._data_url(url)
        if scheme in ("http", "https"):
            return await self._remote(url)
        if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
            return self._local(url)
        raise ApiError(400, f"unsupported image URL scheme '{scheme}'", param="image_url", code="invalid_image")
