"""Video in: decode a clip file (PyAV, the optional `[video]` extra), an animated image or a list of frames into
frames of one size, sampled the way Qwen2.5-VL's published video utilities (qwen-vl-utils) sample them.

Sampling (qwen-vl-utils `smart_nframes`, with FRAME_FACTOR generalised to `temporal_patch`):
    n = duration_s * fps, clamped to [ceil(min_frames), floor(max_frames)] and to the source's frame count, then
    rounded down to a multiple of temporal_patch; the frames taken are round(linspace(0, n_source - 1, n)).
    A source shorter than one temporal patch is padded by repeating its last frame (qwen-vl-utils does so for
    lists of frames and refuses such files).
Size (qwen-vl-utils `fetch_video`): each frame may have at most min(max_pixels, total_pixels * temporal_patch / n)
pixels, so the clip as a whole costs about total_pixels / PIXELS_PER_TOKEN LLM tokens on Qwen2.5-VL; bigger frames
are downscaled (bicubic, aspect ratio kept), long clips are downscaled rather than refused.

Defaults follow qwen-vl-utils (fps 2, min_frames 4, VIDEO_MAX_PIXELS = 768 * 28 * 28 per frame) except:
- max_frames 32 (qwen-vl-utils: 768) and total_pixels 4096 tokens' worth (qwen-vl-utils: ~115k tokens): a laptop's
  context and encoder time; pass total_pixels=pixel_budget(tokens) with what n_ctx leaves for the clip.
- the budget is a hard cap: where it would leave a frame under min_pixels (qwen-vl-utils' VIDEO_MIN_PIXELS floor,
  which overshoots the budget instead), fewer frames are taken, and only then do frames shrink further.
- frames are never upscaled and not rounded to the 28-pixel grid (mtmd resizes to its projector's grid itself).
- a clip's display rotation (phones store upright clips sideways) is applied, as load_image applies EXIF
  orientation; decord and torchvision, which qwen-vl-utils reads with, ignore it.
Decoding: frames are counted in decoding order (exact indices, as decord / torchvision count them); where samples
lie more than SEEK_MIN_GAP frames apart on average (long clips), each is reached by seeking to the keyframe before
its time instead, falling back to decoding in order if seeking fails.
Everything refused raises VideoError (an ImageError) naming the problem: unreadable, truncated or empty files,
audio-only files, and sources over the limits a server sets (bytes, pixels per frame, frame count, duration).
"""

from __future__ import annotations

import base64
import bisect
import io
import itertools
import logging
import math
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
from PIL import Image

from .errors import InvalidArgumentError, VideoError
from .images import ImageInput, _describe, _open_bytes, load_image

logger = logging.getLogger(__name__)

__all__ = ["Video", "VideoInput", "load_video", "pixel_budget", "sample_count", "sample_indices", "frame_size",
           "probe_video", "container_format", "is_video_file", "DEFAULT_FPS", "DEFAULT_MIN_FRAMES",
           "DEFAULT_MAX_FRAMES", "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "DEFAULT_TOTAL_PIXELS", "PIXELS_PER_TOKEN"]

PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: 14-pixel patches merged 2x2 (and 2 frames deep) make one LLM token
DEFAULT_FPS = 2.0  # qwen-vl-utils FPS
DEFAULT_MIN_FRAMES = 4  # qwen-vl-utils FPS_MIN_FRAMES
DEFAULT_MAX_FRAMES = 32  # qwen-vl-utils FPS_MAX_FRAMES is 768
DEFAULT_MAX_PIXELS = 768 * 28 * 28  # per frame, qwen-vl-utils VIDEO_MAX_PIXELS
DEFAULT_MIN_PIXELS = 128 * 28 * 28  # per frame, qwen-vl-utils VIDEO_MIN_PIXELS (see the module docstring)
DEFAULT_TOTAL_PIXELS = 4096 * PIXELS_PER_TOKEN  # whole clip; qwen-vl-utils VIDEO_TOTAL_PIXELS is ~115k tokens
MAX_SOURCE_PIXELS = 7680 * 4320  # refuse frames larger than 8K UHD before decoding any
MAX_VIDEO_BYTES = 4 * 1024 ** 3  # refuse files / payloads larger than this before reading them
SEEK_MIN_GAP = 120  # source frames between samples (on average) above which samples are reached by seeking

VideoInput = Union[str, os.PathLike, bytes, bytearray, "Image.Image", np.ndarray, Sequence[ImageInput], "Video"]

_EXTRA_HINT = "install the video extra: pip install 'avis-llamacpp[video]' (PyAV)"
_MOV_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")
_FORMAT_NAMES = {"mov": "MP4 / MOV", "matroska": "MKV / WebM", "avi": "AVI"}  # for messages


@dataclass(frozen=True)
class Video:
    """Sampled frames of one clip (HxWx3 uint8, all one size), each frame's time in seconds from the clip's start
    and source frame index, the source's frame rate and duration, and the sampling settings used (JSON-able)."""

    frames: list[np.ndarray]
    timestamps: list[float]
    source_fps: float
    duration: float
    indices: list[int] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of every frame."""
        h, w = self.frames[0].shape[:2]
        return w, h

    @property
    def sample_fps(self) -> float:
        """Frames taken per second of source (qwen-vl-utils' sample_fps: n / n_source * source_fps)."""
        n_src = int(self.settings.get("source_frames", len(self.frames)) or 1)
        return len(self.frames) / n_src * self.source_fps


# --------------------------------------------------------------------------- #
# the sampling rule (pure functions, tested against hand computations)
# --------------------------------------------------------------------------- #

def pixel_budget(n_tokens: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> int:
    """total_pixels for load_video that makes a clip cost about n_tokens LLM tokens (Qwen2.5-VL: 28x28 px each)."""
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise InvalidArgumentError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    return n_tokens * pixels_per_token


def sample_count(n_source: int, source_fps: float, *, fps: float = DEFAULT_FPS, min_frames: int = DEFAULT_MIN_FRAMES,
                 max_frames: int = DEFAULT_MAX_FRAMES, temporal_patch: int = 2) -> int:
    """How many frames to take from n_source frames at source_fps (qwen-vl-utils smart_nframes); sources with
    fewer frames than temporal_patch give n_source (the caller pads)."""
    tp = temporal_patch
    if n_source < tp:
        return n_source
    lo = math.ceil(min_frames / tp) * tp
    hi = math.floor(max_frames / tp) * tp
    n = n_source / source_fps * fps
    n = min(min(max(n, lo), hi), n_source)
    return max(tp, math.floor(n / tp) * tp)


def sample_indices(n_source: int, n: int) -> list[int]:
    """n source frame indices spread evenly over 0..n_source-1 (round(linspace), as qwen-vl-utils takes them)."""
    return [int(i) for i in np.linspace(0, n_source - 1, n).round().astype(int)]


def frame_size(width: int, height: int, n_frames: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               total_pixels: int = DEFAULT_TOTAL_PIXELS, temporal_patch: int = 2) -> tuple[int, int]:
    """(width, height) of every sampled frame: the source size, downscaled (aspect kept) to at most
    min(max_pixels, total_pixels * temporal_patch / n_frames) pixels; never upscaled."""
    cap = min(max_pixels, total_pixels * temporal_patch / n_frames)
    if width * height <= cap:
        return width, height
    s = math.sqrt(cap / (width * height))
    return max(1, math.floor(width * s)), max(1, math.floor(height * s))


def _plan(n_source: int, n: int, width: int, height: int, o: "_Opts") -> tuple[list[int], tuple[int, int]]:
    """Source indices for n wanted frames (padded to the temporal patch, fewer where the pixel budget would leave
    frames under min_pixels) and the output frame size."""
    tp = o.temporal_patch
    n = max(n, tp) if n % tp == 0 else n + (-n % tp)
    floor_px = min(o.min_pixels, width * height)
    if o.total_pixels * tp / n < floor_px and n > tp:  # fewer frames before frames smaller than min_pixels
        fewer = max(tp, math.floor(o.total_pixels * tp / floor_px / tp) * tp)
        logger.info("video: %d frames would leave each under %d pixels in a %d-pixel budget; taking %d",
                    n, floor_px, o.total_pixels, fewer)
        n = min(n, fewer)
    idx = sample_indices(n_source, min(n, n_source))
    idx += [idx[-1]] * (n - len(idx))  # a source shorter than one temporal patch: repeat its last frame
    return idx, frame_size(width, height, n, max_pixels=o.max_pixels, total_pixels=o.total_pixels, temporal_patch=tp)


@dataclass(frozen=True)
class _Opts:
    fps: float
    min_frames: int
    max_frames: int
    max_pixels: int
    min_pixels: int
    total_pixels: int
    temporal_patch: int
    max_bytes: int
    max_source_pixels: int
    max_duration_s: float | None
    max_source_frames: int | None
    allow_remote: bool

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps < math.inf:
            raise InvalidArgumentError(f"fps must be a finite number > 0, got {self.fps!r}")
        for name in ("min_frames", "max_frames", "max_pixels", "min_pixels", "total_pixels", "temporal_patch",
                     "max_bytes", "max_source_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")
        if self.max_frames < self.temporal_patch:
            raise InvalidArgumentError(f"max_frames ({self.max_frames}) must be at least temporal_patch "
                                       f"({self.temporal_patch})")
        if self.max_duration_s is not None and not (isinstance(self.max_duration_s, (int, float))
                                                    and 0 < self.max_duration_s < math.inf):
            raise InvalidArgumentError(f"max_duration_s must be a number > 0 or None, got {self.max_duration_s!r}")
        if self.max_source_frames is not None and (isinstance(self.max_source_frames, bool)
                                                   or not isinstance(self.max_source_frames, int)
                                                   or self.max_source_frames < 1):
            raise InvalidArgumentError(f"max_source_frames must be an int >= 1 or None, got {self.max_source_frames!r}")

    def sample_count(self, n_source: int, source_fps: float) -> int:
        return sample_count(n_source, source_fps, fps=self.fps, min_frames=self.min_frames,
                            max_frames=self.max_frames, temporal_patch=self.temporal_patch)

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("fps", "min_frames", "max_frames", "max_pixels", "min_pixels",
                                              "total_pixels", "temporal_patch")}

    def check_source(self, what: str, width: int, height: int, n_frames: int | None, duration: float | None) -> None:
        """The limits a server sets, from what a header says (before any frame is decoded)."""
        if width < 1 or height < 1:
            raise VideoError(f"{what}: the video stream has no valid frame size ({width}x{height}); the file is "
                             "corrupt or not a video")
        if width * height > self.max_source_pixels:
            raise VideoError(f"{what}: {width}x{height} frames have {width * height} pixels, over the "
                             f"{self.max_source_pixels}-pixel limit (refused before decoding); downscale the video")
        if n_frames is not None and self.max_source_frames is not None and n_frames > self.max_source_frames:
            raise VideoError(f"{what}: the video has {n_frames} frames, over the limit of {self.max_source_frames}; "
                             "send a shorter clip")
        if duration is not None and self.max_duration_s is not None and duration > self.max_duration_s:
            raise VideoError(f"{what}: the video lasts {duration:.1f} s, over the limit of {self.max_duration_s:g} s; "
                             "send a shorter clip")


def _finish(frames: list[np.ndarray], timestamps: list[float], idx: list[int], size: tuple[int, int],
            source_fps: float, n_source: int, source: str, o: _Opts, source_size: tuple[int, int],
            **extra: Any) -> Video:
    w, h = size
    out = []
    for f in frames:
        if f.shape[:2] != (h, w):
            f = np.asarray(Image.fromarray(f, "RGB").resize((w, h), Image.Resampling.BICUBIC))
        out.append(np.ascontiguousarray(f, dtype=np.uint8))
    settings = o.settings()
    settings.update(source=source, source_frames=n_source, source_size=list(source_size), size=[w, h],
                    frames=len(out), padded=len(idx) - len(set(idx)), **extra)
    return Video(out, [float(t) for t in timestamps], float(source_fps), float(n_source / source_fps), list(idx),
                 settings)


# --------------------------------------------------------------------------- #
# sources
# --------------------------------------------------------------------------- #

def container_format(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file's first bytes (mov for mp4 / mov, matroska for mkv / webm, avi), or None.
    Only these are opened: naming the demuxer keeps FFmpeg from probing playlists and other formats that open
    further files or URLs."""
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return "avi"
    if head[4:8] in _MOV_BOXES:
        return "mov"
    return None


def is_video_file(src: object) -> bool:
    """Whether src is a video container (mp4 / mov / webm / mkv / avi: a path, its bytes or a data:video/ URI), as
    opposed to an image or a list of frames; for callers choosing between load_video and images.load_frames."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return container_format(bytes(src[:16])) is not None
    if not isinstance(src, (str, os.PathLike)):
        return False
    s = os.fspath(src)
    s = os.fsdecode(s) if isinstance(s, bytes) else s
    if s[:11].lower() == "data:video/":
        return True
    if s[:5].lower() == "data:" or s[:7].lower() == "http://" or s[:8].lower() == "https://":
        return False
    try:
        with open(s[7:] if s[:7].lower() == "file://" else s, "rb") as f:
            return container_format(f.read(16)) is not None
    except (OSError, ValueError):
        return False


def _corrupt(what: str, fmt: str, detail: str) -> VideoError:
    return VideoError(f"{what}: the {_FORMAT_NAMES[fmt]} data is truncated or corrupt ({detail}); re-encode or "
                      "re-download the video")


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError(f"decoding video files needs PyAV, which is not installed; {_EXTRA_HINT}, or pass the "
                         "frames as a list of images") from None
    return av


def _probe(open_: Callable[[], Any], what: str, fmt: str, o: _Opts) -> dict[str, Any]:
    """Width, height, frame rate, frame count and duration of the first video stream, from the header (and, where
    the header has no frame count, from counting packets); no frame is decoded. Checks o's limits."""
    av = _import_av()
    try:
        container = open_()
    except VideoError:
        raise
    except Exception as e:
        raise _corrupt(what, fmt, _describe(e)) from None
    with container:
        if not container.streams.video:
            if container.streams.audio:
                raise VideoError(f"{what}: the file has audio but no video stream; pass a video file")
            raise VideoError(f"{what}: the file has no video stream; pass a video file")
        st = container.streams.video[0]
        w, h = int(st.codec_context.width or 0), int(st.codec_context.height or 0)
        tb = float(st.time_base) if st.time_base else 0.0
        header_s = (st.duration * tb if st.duration and tb else
                    container.duration / av.time_base if container.duration else None)
        rate = st.average_rate or st.guessed_rate
        o.check_source(what, w, h, int(st.frames) if st.frames else None, header_s)
        n, end_s = int(st.frames or 0), None
        if n <= 0:  # matroska / webm keep no frame count: count the packets (no decoding)
            start = st.start_time or 0
            try:
                for pkt in container.demux(st):
                    if pkt.size and pkt.pts is not None:
                        n += 1
                        t = (pkt.pts - start) * tb
                        end_s = t if end_s is None else max(end_s, t)
                        if o.max_source_frames is not None and n > o.max_source_frames:
                            raise VideoError(f"{what}: the video has more than {o.max_source_frames} frames, over "
                                             "the limit; send a shorter clip")
            except VideoError:
                raise
            except Exception as e:
                raise _corrupt(what, fmt, _describe(e)) from None
        if n <= 0:
            raise VideoError(f"{what}: the video stream has no frames; the file is empty or truncated")
        fps = float(rate) if rate else (n / header_s if header_s else 0.0)
        if not fps > 0:
            raise VideoError(f"{what}: the video stream has no frame rate; re-encode the video")
        if end_s is not None and header_s and end_s + 1 / fps < header_s - max(2 / fps, 0.05 * header_s):
            raise VideoError(f"{what}: the video is truncated: its header says {header_s:.2f} s but its frames end "
                             f"at {end_s + 1 / fps:.2f} s; re-encode or re-download the video")
        o.check_source(what, w, h, n, n / fps)
        return {"width": w, "height": h, "fps": fps, "frames": n, "duration": n / fps,
                "codec": st.codec_context.name}


def _quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns the stream's display matrix asks for (phone clips shot upright); 0 when
    PyAV is too old to say."""
    return int(round(float(getattr(frame, "rotation", 0) or 0) / 90)) % 4


def _rgb(frame: Any, size: tuple[int, int]) -> np.ndarray:
    """A decoded frame as HxWx3 RGB, turned upright and resized to `size` (given for the stored orientation)."""
    arr = frame.to_ndarray(format="rgb24")
    k = _quarter_turns(frame)
    if k:
        arr = np.ascontiguousarray(np.rot90(arr, k))
        size = size if k % 2 == 0 else (size[1], size[0])
    if arr.shape[:2] != (size[1], size[0]):
        arr = np.asarray(Image.fromarray(arr, "RGB").resize(size, Image.Resampling.BICUBIC))
    return arr


def _decode_in_order(container: Any, wanted: set[int], size: tuple[int, int], fps: float, done: list[int]
                     ) -> dict[int, tuple[np.ndarray, float]]:
    """Decode every frame up to the last wanted one, keeping the wanted ones: exact frame indices (by count);
    done[0] counts the frames decoded."""
    st = container.streams.video[0]
    st.thread_type = "AUTO"
    tb = float(st.time_base or 0)
    t0 = st.start_time * tb if st.start_time is not None and tb else None
    got: dict[int, tuple[np.ndarray, float]] = {}
    last, i = max(wanted), -1
    for frame in container.decode(st):
        i += 1
        done[0] = i + 1
        t = frame.time
        if t0 is None:
            t0 = t if t is not None else 0.0
        if i in wanted:
            got[i] = (_rgb(frame, size), (t - t0) if t is not None else i / fps)
        if i >= last:
            break
    return got


def _decode_by_seeking(container: Any, wanted: set[int], size: tuple[int, int], fps: float
                       ) -> dict[int, tuple[np.ndarray, float]]:
    """Reach each wanted frame by seeking to the keyframe before its time (index = time * fps, exact for constant
    frame rate) and decoding on from there; for long clips with few samples. Raises where that cannot work."""
    st = container.streams.video[0]
    st.thread_type = "AUTO"
    tb = st.time_base
    start = st.start_time or 0
    got: dict[int, tuple[np.ndarray, float]] = {}
    frames, pos = None, None
    for j in sorted(wanted):
        if frames is None or pos is None or j - pos > SEEK_MIN_GAP:
            container.seek(start + int(round(j / fps / tb)), stream=st, backward=True, any_frame=False)
            frames, pos = container.decode(st), None
        for frame in frames:
            if frame.pts is None:
                raise ValueError("frames without timestamps")
            pos = round(float((frame.pts - start) * tb) * fps)
            if pos >= j:
                got[j] = (_rgb(frame, size), float((frame.pts - start) * tb))
                break
        else:
            raise EOFError(f"the stream ended before frame {j}")
    return got


def _decode_container(open_: Callable[[], Any], what: str, fmt: str, o: _Opts) -> Video:
    info = _probe(open_, what, fmt, o)
    n_source, fps = info["frames"], info["fps"]
    idx, size = _plan(n_source, o.sample_count(n_source, fps), info["width"], info["height"], o)
    wanted = set(idx)
    got: dict[int, tuple[np.ndarray, float]] = {}
    mode = "seek" if n_source / len(wanted) > SEEK_MIN_GAP else "in order"
    if mode == "seek":
        try:
            with open_() as container:
                got = _decode_by_seeking(container, wanted, size, fps)
        except Exception as e:  # unseekable, no timestamps, damaged: decoding in order decides
            logger.info("%s: seeking failed (%s); decoding in order", what, _describe(e))
            mode, got = "in order", {}
    while mode == "in order":
        done = [0]
        try:
            with open_() as container:
                got = _decode_in_order(container, wanted, size, fps, done)
        except Exception as e:
            raise _corrupt(what, fmt, f"decoding frame {done[0] + 1} failed: {_describe(e)}") from None
        if max(wanted) in got:
            break
        if not 0 < n_source - done[0] <= max(2, n_source // 50):
            raise VideoError(f"{what}: the video is truncated or corrupt: its header counts {n_source} frames but "
                             f"only {done[0]} could be decoded; re-encode or re-download the video")
        # a header that overcounts by a frame or two (edit lists, a dropped last frame): sample what is there
        logger.info("%s: header counts %d frames, %d decode; sampling those", what, n_source, done[0])
        n_source = done[0]
        idx, size = _plan(n_source, o.sample_count(n_source, fps), info["width"], info["height"], o)
        wanted = set(idx)
    frames = [got[j][0] for j in idx]
    stamps = [got[j][1] for j in idx]
    upright = (frames[0].shape[1], frames[0].shape[0])  # size turned by the display rotation, if any
    return _finish(frames, stamps, idx, upright, fps, n_source, f"{fmt}:{info['codec']}", o,
                   (info["width"], info["height"]), decode=mode, rotated=upright != size)


_ANIMATION_MIN_STEP_MS = 10  # GIF timing resolution: the finest grid an animation's timeline is sampled on


def _from_animation(img: Image.Image, what: str, o: _Opts) -> Video:
    """Frames of an animated (or still) GIF / WebP / PNG, timed by each frame's duration: a frame shown for three
    steps counts three times, as the same clip saved frame by frame would."""
    n = int(getattr(img, "n_frames", 1) or 1)
    o.check_source(what, img.width, img.height, n, None)
    durations_ms: list[int] = []
    for k in range(n):
        try:
            img.seek(k)
            img.load()  # WebP fills in a frame's duration only once it is loaded
        except EOFError:
            n = k
            break
        except Exception as e:
            raise VideoError(f"{what}: frame {k + 1} of the animation is unreadable ({_describe(e)})") from None
        durations_ms.append(round(float(img.info.get("duration") or 0.0)))
    if n < 1:
        raise VideoError(f"{what}: the animation has no readable frames")
    total_ms = sum(durations_ms)
    if total_ms > 0:
        # frames may last different times (encoders merge identical frames into one long one, GIFs hold a frame):
        # sample the timeline, not the frame list, on a grid of the durations' common step (gcd skips zeros)
        step_ms = max(_ANIMATION_MIN_STEP_MS, math.gcd(*durations_ms))
        starts = list(itertools.accumulate(durations_ms[:-1], initial=0))
        n_grid = max(1, round(total_ms / step_ms))
        grid = [bisect.bisect_right(starts, g * step_ms) - 1 for g in range(n_grid)]  # the frame shown at step g
        src_fps = 1000.0 / step_ms
    else:  # no timing: every frame is one sample at the requested rate
        src_fps, grid, n_grid = o.fps, list(range(n)), n
    o.check_source(what, img.width, img.height, n, n_grid / src_fps)
    picks, size = _plan(n_grid, o.sample_count(n_grid, src_fps), img.width, img.height, o)
    idx = [grid[g] for g in picks]
    frames: dict[int, np.ndarray] = {}
    for k in sorted(set(idx)):
        try:
            img.seek(k)
            frames[k] = load_image(img.convert("RGB"))
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(f"{what}: frame {k + 1} of the animation is unreadable ({_describe(e)})") from None
    return _finish([frames[k] for k in idx], [g / src_fps for g in picks], idx, size, src_fps, n,
                   f"animation:{img.format or 'image'}", o, (img.width, img.height))


def _from_frames(src: Sequence[Any], o: _Opts) -> Video:
    """A list of frames taken at o.fps: all of them (evenly thinned to max_frames), padded to the temporal patch."""
    n = len(src)
    if n == 0:
        raise VideoError("a video needs at least one frame; got an empty list")
    o.check_source("frame list", 1, 1, n, n / o.fps)
    tp = o.temporal_patch
    first = load_image(src[0], allow_remote=o.allow_remote)
    h, w = first.shape[:2]
    o.check_source("frame list", w, h, n, None)
    idx, size = _plan(n, n if n <= o.max_frames else math.floor(o.max_frames / tp) * tp, w, h, o)
    loaded = {k: first if k == 0 else load_image(src[k], allow_remote=o.allow_remote) for k in sorted(set(idx))}
    return _finish([loaded[k] for k in idx], [k / o.fps for k in idx], idx, size, o.fps, n, "frames", o, (w, h))


def _data_uri(s: str, max_bytes: int) -> bytes:
    header, sep, payload = s.partition(",")
    if not sep or ";base64" not in header.lower():
        raise VideoError("data URI videos must be base64-encoded: data:video/mp4;base64,<data>")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise VideoError(f"data URI: payload over the {max_bytes}-byte limit; send a smaller video")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as e:
        raise VideoError(f"data URI: invalid base64 ({e}); encode the video bytes with base64") from None


def _from_bytes(data: bytes, what: str, o: _Opts) -> Video:
    if not data:
        raise VideoError(f"{what}: empty video data (0 bytes); pass a non-empty video file")
    if len(data) > o.max_bytes:
        raise VideoError(f"{what}: {len(data)} bytes is over the {o.max_bytes}-byte limit; send a smaller video")
    fmt = container_format(data[:16])
    if fmt is not None:
        av = _import_av()
        return _decode_container(lambda: av.open(io.BytesIO(data), format=fmt), what, fmt, o)
    try:
        img = _open_bytes(data, what)
    except Exception as e:
        raise VideoError(f"{what}: not a readable video ({e}); pass an mp4, mov, webm, mkv or avi file, an "
                         "animated GIF / WebP / PNG, or a list of frames") from None
    return _from_animation(img, what, o)


def _from_path(path: Path, o: _Opts) -> Video:
    what = str(path)[:300]
    try:
        if not path.is_file():
            raise VideoError(f"video file not found: {what!r}; pass the path of an existing file, video bytes, a "
                             "data: URI or a list of frames")
        size = path.stat().st_size
        if size == 0:
            raise VideoError(f"{what}: empty file (0 bytes); pass a non-empty video file")
        if size > o.max_bytes:
            raise VideoError(f"{what}: {size} bytes is over the {o.max_bytes}-byte limit; pass a smaller video")
        with open(path, "rb") as f:
            head = f.read(16)
    except VideoError:
        raise
    except (OSError, ValueError) as e:
        raise VideoError(f"cannot read video file {what!r} ({_describe(e)}); check the path and its "
                         "permissions") from None
    fmt = container_format(head)
    if fmt is None:
        return _from_bytes(path.read_bytes(), what, o)
    av = _import_av()
    return _decode_container(lambda: av.open(str(path), format=fmt), what, fmt, o)


def load_video(src: VideoInput, *, fps: float = DEFAULT_FPS, min_frames: int = DEFAULT_MIN_FRAMES,
               max_frames: int = DEFAULT_MAX_FRAMES, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_pixels: int = DEFAULT_MIN_PIXELS, total_pixels: int = DEFAULT_TOTAL_PIXELS,
               temporal_patch: int = 2, allow_remote: bool = False, max_bytes: int = MAX_VIDEO_BYTES,
               max_source_pixels: int = MAX_SOURCE_PIXELS, max_duration_s: float | None = None,
               max_source_frames: int | None = None) -> Video:
    """Decode and sample a clip: src is a file path (mp4, mov, webm, mkv, avi, or an animated GIF / WebP / PNG),
    its bytes, a data: URI, an http(s) URL (only with allow_remote), a PIL image, a list of frames (anything
    load_image takes, taken at `fps`; thinned evenly to max_frames) or a TxHxWx3 array. Sampling and sizes as in
    the module docstring; temporal_patch=1 for models that take frames one by one. max_bytes, max_source_pixels,
    max_duration_s and max_source_frames are the limits a server sets. Raises VideoError."""
    if isinstance(src, Video):
        return src
    o = _Opts(fps, min_frames, max_frames, max_pixels, min_pixels, total_pixels, temporal_patch, max_bytes,
              max_source_pixels, max_duration_s, max_source_frames, bool(allow_remote))
    if isinstance(src, np.ndarray) and src.ndim == 4:
        return _from_frames(list(src), o)
    if isinstance(src, (list, tuple)):
        return _from_frames(src, o)
    if isinstance(src, Image.Image):
        o.check_source("PIL image", src.width, src.height, None, None)
        return _from_animation(src, "PIL image", o)
    if isinstance(src, np.ndarray):
        return _from_frames([src], o)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(src), "video bytes", o)
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if isinstance(s, bytes):
            s = os.fsdecode(s)
        if s[:5].lower() == "data:":
            return _from_bytes(_data_uri(s, o.max_bytes), "data URI", o)
        if s[:7].lower() == "http://" or s[:8].lower() == "https://":
            if not o.allow_remote:
                raise VideoError(f"refusing to fetch {s[:200]!r}: remote videos are disabled (allow_remote=True "
                                 "enables them, or download the file and pass its path)")
            try:
                with urllib.request.urlopen(s, timeout=30) as r:  # noqa: S310 - opt-in by the caller
                    data = r.read(o.max_bytes + 1)
            except Exception as e:
                raise VideoError(f"could not fetch {s[:200]!r} ({_describe(e)})") from None
            return _from_bytes(data, s[:200], o)
        return _from_path(Path(s[7:] if s[:7].lower() == "file://" else s), o)
    raise VideoError(f"unsupported video type {type(src).__name__}; pass a path, bytes, a data: URI, a PIL image "
                     "or a list of frames")


def probe_video(src: str | os.PathLike | bytes, *, max_bytes: int = MAX_VIDEO_BYTES,
                max_source_pixels: int = MAX_SOURCE_PIXELS, max_duration_s: float | None = None,
                max_source_frames: int | None = None) -> dict[str, Any]:
    """A video file's width, height, fps, frame count, duration and codec from its header (no frame decoded),
    checked against the given limits; for a server's pre-flight. Raises VideoError."""
    o = _Opts(DEFAULT_FPS, DEFAULT_MIN_FRAMES, DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS,
              DEFAULT_TOTAL_PIXELS, 2, max_bytes, max_source_pixels, max_duration_s, max_source_frames, False)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise VideoError("empty video data (0 bytes)")
        if len(data) > max_bytes:
            raise VideoError(f"{len(data)} bytes is over the {max_bytes}-byte limit; send a smaller video")
        fmt = container_format(data[:16])
        what = "video bytes"
        opener: Callable[[], Any] = lambda: _import_av().open(io.BytesIO(data), format=fmt)  # noqa: E731
    else:
        path = Path(os.fspath(src))
        what = str(path)[:300]
        try:
            if path.stat().st_size == 0:
                raise VideoError(f"{what}: empty file (0 bytes)")
            if path.stat().st_size > max_bytes:
                raise VideoError(f"{what}: over the {max_bytes}-byte limit; send a smaller video")
            with open(path, "rb") as f:
                fmt = container_format(f.read(16))
        except OSError as e:
            raise VideoError(f"cannot read video file {what!r} ({_describe(e)})") from None
        opener = lambda: _import_av().open(str(path), format=fmt)  # noqa: E731
    if fmt is None:
        raise VideoError(f"{what}: not an mp4, mov, webm, mkv or avi file")
    return _probe(opener, what, fmt, o)
