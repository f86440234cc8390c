"""Video samples (LLaVA-OneVision): decode a clip into uniformly sampled RGB frames.

    frames = load_video_frames("clip.mp4", 8)                    # np.uint8 [8, H, W, 3], or BadVideoError
    reason = check_video_file("clip.mp4")                        # None when it opens and has frames
    is_video("clip.mp4")                                         # by suffix (the sample named it under "video")

A LLaVA-NeXT-style record names a clip with `"video": "clip.mp4"` and marks it `<video>` in its text; the
llava format reader turns both into an ordinary image entry and `<image>` marker (llava_ft.data.formats),
so placeholders, truncation, packing and collation treat a clip like an image whose token count is
`frames x ceil(side/2)^2 + 1` (llava_ft.model.released_anyres). Which entries are clips is then told by
their suffix. Decoding uses PyAV (`pip install av`, extra `video`): it is FFmpeg's maintained Python
binding, reads every container FFmpeg reads, seeks and decodes on the CPU without a GPU, and is what
transformers' own video loading uses by default. Frames are picked as transformers' video processors
sample them (`arange(0, total, total / n)`), so the frames equal what the checkpoint's processor would
see when given the same number of frames.
"""
from __future__ import annotations

import os

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpeg", ".mpg", ".gif")


class BadVideoError(ValueError):
    """A clip that is missing, undecodable or too short; `reason` says which (the dataset turns it into a
    BadImageError naming the sample, so skip_bad_samples treats it like a bad image)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def is_video(path) -> bool:
    return isinstance(path, str) and os.path.splitext(path)[1].lower() in VIDEO_SUFFIXES


def frame_indices(total: int, n: int) -> list[int]:
    """n indices spread uniformly over `total` frames (transformers' `sample_frames` rule)."""
    return [int(i) for i in np.arange(0, total, total / n).astype(int)][:n]


def _import_av():
    from llava_ft.errors import UserError

    try:
        import av
    except ImportError:
        raise UserError("video samples need PyAV: pip install 'llava_ft[video]' (or pip install av)") from None
    return av


def load_video_frames(path: str, n: int) -> np.ndarray:
    """[n, H, W, 3] uint8 RGB frames sampled uniformly; BadVideoError for a missing, undecodable or
    too-short clip (fewer than n frames)."""
    av = _import_av()
    if not os.path.isfile(path):
        raise BadVideoError("video file not found (check data.sources.*.image_folder)")
    try:
        with av.open(path) as container:
            total = container.streams.video[0].frames  # from the container's header; 0 when it does not say
        if not total:  # count by decoding (without converting frames), then pick
            with av.open(path) as container:
                total = sum(1 for _ in container.decode(video=0))
        if total < n:
            raise BadVideoError(f"video too short: {total} frame(s), data.video_frames={n}")
        wanted = frame_indices(total, n)
        picked: dict = {}
        with av.open(path) as container:  # keep only the sampled frames: a long clip never sits in memory
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    picked[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
    except BadVideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        raise BadVideoError(f"cannot decode video ({type(err).__name__}: {err})") from None
    if len(picked) < n:  # the header promised more frames than the stream holds
        raise BadVideoError(f"video too short: {len(picked)} decodable frame(s) of {total}, data.video_frames={n}")
    return np.stack([picked[i] for i in wanted])


def check_video_file(path: str):
    """None when the clip opens and holds a video stream with frames, else the reason (image verification)."""
    av = _import_av()
    if not os.path.isfile(path):
        return "video file not found (check data.sources.*.image_folder)"
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return "no video stream"
            next(container.decode(video=0))
    except StopIteration:
        return "video has no frames"
    except (av.error.FFmpegError, OSError, ValueError) as err:
        return f"cannot decode video ({type(err).__name__}: {err})"
    return None
