"""Write small video files for tests and benchmarks: seeded moving-shapes clips encoded with PyAV (the `[video]`
extra) into mp4 / mov (h264 or mpeg4), webm (vp8 / vp9), mkv and avi, plus an audio-only file.

    python -m convert.video_files --out clip.mp4 --frames 16 --size 128x96 --fps 8 --seed 0
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CONTAINERS", "moving_shapes_clip", "pick_codec", "write_video", "write_audio_only", "huge_header_avi",
           "malformed_videos"]

# file suffix -> (FFmpeg muxer, video encoders to try in order)
CONTAINERS: dict[str, tuple[str, tuple[str, ...]]] = {
    ".mp4": ("mp4", ("libx264", "h264", "mpeg4")),
    ".mov": ("mov", ("libx264", "h264", "mpeg4")),
    ".mkv": ("matroska", ("libx264", "h264", "mpeg4")),
    ".webm": ("webm", ("libvpx", "libvpx-vp9")),
    ".avi": ("avi", ("mpeg4", "mjpeg")),
}

# high-quality settings per encoder so decoded frames stay close to what was drawn (tests compare them)
_QUALITY: dict[str, dict[str, str]] = {
    "libx264": {"crf": "12", "preset": "veryfast"},
    "libvpx": {"crf": "4", "b:v": "4M", "deadline": "realtime", "cpu-used": "8"},
    "libvpx-vp9": {"crf": "10", "b:v": "0", "deadline": "realtime", "cpu-used": "8"},
}
_BIT_RATE: dict[str, int] = {"mpeg4": 8_000_000, "mjpeg": 8_000_000}  # encoders without a crf: a high bit rate


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    w, h = (size, size) if isinstance(size, int) else size
    if w < 8 or h < 8:
        raise ValueError(f"clip size must be at least 8x8, got {w}x{h}")
    return int(w), int(h)


def moving_shapes_clip(n_frames: int, size: int | tuple[int, int] = 64, seed: int = 0) -> list[np.ndarray]:
    """n_frames HxWx3 uint8 frames (size = side or (width, height)) of three coloured shapes (disc, square,
    triangle) moving at seeded constant velocities and bouncing off the edges over a seeded gradient background.
    Shapes move several pixels a frame, so neighbouring frames differ clearly (tests match frames by content)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    w, h = _size(size)
    rng = np.random.default_rng(seed)
    c0, c1 = rng.integers(150, 256, 3), rng.integers(150, 256, 3)
    ramp = np.linspace(0.0, 1.0, w)[None, :, None]
    background = np.broadcast_to((c0 * (1 - ramp) + c1 * ramp).astype(np.uint8), (h, w, 3))
    colours = [(220, 30, 30), (30, 60, 220), (20, 160, 40)]
    r = max(3, min(w, h) // 6)  # half side of each shape
    shapes = []
    for kind, colour in zip(("disc", "square", "triangle"), colours):
        pos = rng.uniform([r, r], [w - r, h - r])
        speed = rng.uniform(0.06, 0.12) * min(w, h)
        angle = rng.uniform(0, 2 * math.pi)
        shapes.append([kind, colour, pos, np.array([math.cos(angle), math.sin(angle)]) * speed])
    frames = []
    for _ in range(n_frames):
        img = Image.fromarray(np.ascontiguousarray(background))
        draw = ImageDraw.Draw(img)
        for kind, colour, (x, y), _v in shapes:
            box = (x - r, y - r, x + r, y + r)
            if kind == "disc":
                draw.ellipse(box, fill=colour)
            elif kind == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        frames.append(np.asarray(img, dtype=np.uint8).copy())
        for s in shapes:  # move, bouncing off the walls
            pos, vel = s[2], s[3]
            pos += vel
            for axis, hi in ((0, w - r), (1, h - r)):
                if pos[axis] < r or pos[axis] > hi:
                    vel[axis] = -vel[axis]
                    pos[axis] = min(max(pos[axis], r), hi)
    return frames


def pick_codec(suffix: str) -> str:
    """The first encoder this PyAV build has for a container suffix (.mp4, .mov, .mkv, .webm, .avi)."""
    import av

    try:
        _, encoders = CONTAINERS[suffix.lower()]
    except KeyError:
        raise ValueError(f"unsupported video suffix {suffix!r}; use one of {sorted(CONTAINERS)}") from None
    for name in encoders:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise RuntimeError(f"this PyAV build has none of the encoders {encoders} for {suffix}")


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: float, codec: str | None = None,
                gop: int | None = None) -> Path:
    """Encode HxWx3 uint8 frames (one size, even width and height) at `fps` frames per second into `path`; the
    container follows the suffix and codec=None picks one the PyAV wheel has (h264 else mpeg4; vp8 else vp9).
    gop: frames between keyframes (the encoder's default when None)."""
    import av

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CONTAINERS:
        raise ValueError(f"unsupported video suffix {suffix!r}; use one of {sorted(CONTAINERS)}")
    if not frames:
        raise ValueError("write_video needs at least one frame")
    h, w = frames[0].shape[:2]
    if any(f.shape != (h, w, 3) or f.dtype != np.uint8 for f in frames):
        raise ValueError("frames must all be HxWx3 uint8 arrays of one size")
    if h % 2 or w % 2:
        raise ValueError(f"frames must have even width and height for 4:2:0 video, got {w}x{h}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    codec = codec or pick_codec(suffix)
    muxer = CONTAINERS[suffix][0]
    with av.open(str(path), "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=_QUALITY.get(codec, {}))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec in _BIT_RATE:
            stream.bit_rate = _BIT_RATE[codec]
        if gop is not None:
            stream.codec_context.gop_size = gop
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())
    return path


def write_audio_only(path: str | Path, seconds: float = 0.5, rate: int = 8000) -> Path:
    """A file with one audio stream (a 440 Hz tone) and no video; the suffix picks the container (.mka, .wav,
    .mp4, .webm, ...). Tests use it as the audio-only case a video loader must refuse."""
    import av

    path = Path(path)
    codec = {".webm": "libopus", ".mp4": "aac", ".mka": "pcm_s16le", ".wav": "pcm_s16le", ".mkv": "pcm_s16le"}.get(
        path.suffix.lower(), "pcm_s16le")
    if codec == "libopus":
        rate = 48000
    t = np.arange(int(seconds * rate)) / rate
    pcm = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, len(pcm), 960):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + 960], format="s16", layout="mono")
            frame.sample_rate = rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def huge_header_avi(width: int = 12000, height: int = 12000) -> bytes:
    """A rawvideo AVI whose headers claim width x height frames over two 16x16 frames of data: a loader must
    refuse it from the header (FFmpeg itself accepts up to about 16k x 16k)."""
    import io
    import struct

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as out:
        st = out.add_stream("rawvideo", rate=10)
        st.width, st.height, st.pix_fmt = 16, 16, "rgb24"
        for _ in range(2):
            out.mux(st.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")))
        out.mux(st.encode())
    d = bytearray(buf.getvalue())
    i = d.find(b"avih")
    struct.pack_into("<II", d, i + 8 + 32, width, height)  # AVIMAINHEADER dwWidth, dwHeight
    i = d.find(b"strf")
    struct.pack_into("<ii", d, i + 8 + 4, width, height)  # BITMAPINFOHEADER biWidth, biHeight
    return bytes(d)


def malformed_videos(work_dir: str | Path, seed: int = 0) -> dict[str, bytes]:
    """Broken video files a loader must refuse with a clear error: empty, truncated mp4 / mkv / webm / avi, a
    header only, garbage after an mp4 header, plain garbage, audio-only mka / mp4, a 12000x12000 header."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    clip = moving_shapes_clip(30, (64, 48), seed)
    f = {ext: write_video(clip, work / f"base{ext}", 10).read_bytes() for ext in (".mp4", ".mkv", ".webm", ".avi")}
    rng = np.random.default_rng(seed)
    return {
        "zero-length": b"",
        "truncated-mp4": f[".mp4"][:len(f[".mp4"]) * 6 // 10],
        "truncated-mkv": f[".mkv"][:len(f[".mkv"]) * 6 // 10],
        "truncated-webm": f[".webm"][:len(f[".webm"]) // 2],
        "truncated-avi": f[".avi"][:len(f[".avi"]) * 6 // 10],
        "header-only-mkv": f[".mkv"][:200],
        "mp4-magic-garbage": f[".mp4"][:32] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "garbage": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "audio-only-mka": write_audio_only(work / "audio.mka").read_bytes(),
        "audio-only-mp4": write_audio_only(work / "audio.mp4").read_bytes(),
        "huge-resolution": huge_header_avi(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output file; the suffix picks the container")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", default="128x96", help="WIDTHxHEIGHT (even numbers)")
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codec", default=None)
    a = ap.parse_args(argv)
    w, h = (int(x) for x in a.size.lower().split("x"))
    out = write_video(moving_shapes_clip(a.frames, (w, h), a.seed), a.out, a.fps, a.codec)
    print(f"wrote {out} ({a.frames} frames, {w}x{h}, {a.fps} fps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
