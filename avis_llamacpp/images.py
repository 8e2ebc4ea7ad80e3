"""Turn what users pass as an image (path, bytes, data URI, PIL image, array) into an RGB uint8 array,
with PIL doing the decoding.

What is accepted and how it is normalised (every refusal is an ImageError naming the problem and the fix):

- formats: PNG, JPEG (incl. MPO), GIF, WebP, BMP, TIFF, PPM/PGM/PBM, TGA, ICO (and AVIF where Pillow has it);
  other formats PIL could open (EPS, PSD, FITS, ...) are refused, since some plugins run external programs or
  rarely-exercised decoders on untrusted bytes.
- size: images over MAX_PIXELS pixels are refused before any pixel is decoded (decompression bombs); files
  over MAX_FILE_BYTES are refused before being read; an image whose longer side exceeds MAX_SIDE is
  downscaled (bicubic, aspect ratio kept) to MAX_SIDE: no supported projector uses more (LLaVA resizes to its
  image_size, Qwen2.5-VL caps an image at 4096 tokens = about 1792x1792 px), and it bounds the encoder's
  memory. Zero-size images are refused; 1x1 and other tiny images are passed on (the projector upsamples).
- EXIF orientation is applied (a photo shot in portrait stays upright); an unreadable EXIF block is ignored.
- modes: palette (with or without transparency), L, LA, RGBA, CMYK, YCbCr, 1-bit and 16/32-bit integer and
  float greyscale (I;16, I, F) become RGB; alpha is dropped, not composited, as llama.cpp's own loader does.
- animated images (GIF, APNG, WebP) and multi-page files (TIFF, MPO): the first frame is used.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import io
import logging
import os
import stat
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, InvalidArgumentError

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, bytes, bytearray, "Image.Image", np.ndarray]

MAX_PIXELS = 64_000_000  # refuse anything larger before decoding (decompression bombs)
MAX_SIDE = 4096  # downscale images whose longer side is larger than this
MAX_FILE_BYTES = 512 * 1024 * 1024  # refuse image files / payloads larger than this before reading them

_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "AVIF")


def _allowed_formats() -> list[str]:
    Image.init()
    return [f for f in _FORMATS if f in Image.OPEN]


def supported_formats() -> list[str]:
    """Image formats load_image decodes (those of _FORMATS this Pillow build has)."""
    return _allowed_formats()


def _check_size(w: int, h: int, what: str) -> None:
    if w < 1 or h < 1:
        raise ImageError(f"{what}: image has zero size ({w}x{h}); pass an image at least 1x1 pixels")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{what}: {w}x{h} image has {w * h} pixels, over the {MAX_PIXELS} limit (refused before "
                         "decoding as a possible decompression bomb); downscale it first")


def _open_bytes(data: bytes, what: str) -> Image.Image:
    """Decode encoded image bytes (first frame), refusing bombs before any pixel is decoded."""
    if not data:
        raise ImageError(f"{what}: empty image data (0 bytes); pass a non-empty image file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{what}: {len(data)} bytes is over the {MAX_FILE_BYTES}-byte limit; pass a smaller image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what}: refused as a possible decompression bomb ({e}); downscale it first") from None
    except Exception as e:  # UnidentifiedImageError and whatever a plugin raises on garbage
        fmt = _sniff(data)
        if fmt is not None:
            raise ImageError(f"{what}: the {fmt} data is truncated or corrupt ({_describe(e)}); re-save or "
                             "re-download the image") from None
        raise ImageError(f"{what}: not a readable image ({_describe(e)}); pass a PNG, JPEG, GIF, WebP, BMP, "
                         "TIFF, PPM, TGA or ICO file (re-save it with an image editor if it is damaged)") from None
    _check_size(img.width, img.height, what)
    try:
        img.load()  # decodes the first frame only
    except Exception as e:
        raise ImageError(f"{what}: the {img.format} data is truncated or corrupt ({_describe(e)}); "
                         "re-save or re-download the image") from None
    return img


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _sniff(data: bytes) -> str | None:
    """The format a file's magic bytes claim (for error messages), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for sig, name in _SIGNATURES:
        if data.startswith(sig):
            return name
    return None


def _describe(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__


def _to_rgb(img: Image.Image, what: str) -> np.ndarray:
    """A decoded PIL image (any mode) -> HxWx3 uint8, EXIF orientation applied, first frame."""
    try:
        # the first frame of an animation / the first page; counting frames parses the rest of the file,
        # which may be corrupt even though the first frame decoded: then the first frame is what we have
        if img.tell() != 0 and (getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1):
            img.seek(0)
    except Exception:
        pass
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block must not make a readable image unusable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", what, _describe(e))
    try:
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            a = np.asarray(img, dtype=np.float64)
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
            peak = float(a.max()) if a.size else 0.0
            top = 1.0 if mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
            img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        elif mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha dropped below
        elif mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr", "RGBX", "RGBa", "La", "PA"):
            img = img.convert("RGBA") if "A" in mode else img.convert("RGB")
        arr = np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"{what}: cannot convert a {img.mode!r} image to RGB ({_describe(e)}); "
                         "convert it to RGB first") from None
    return arr


def _limit_side(arr: np.ndarray, what: str) -> np.ndarray:
    h, w = arr.shape[:2]
    side = max(h, w)
    if side <= MAX_SIDE:
        return arr
    s = MAX_SIDE / side
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    logger.info("%s: downscaling %dx%d to %dx%d (MAX_SIDE=%d)", what, w, h, nw, nh, MAX_SIDE)
    return np.asarray(Image.fromarray(arr, "RGB").resize((nw, nh), Image.Resampling.BICUBIC))


def _from_array(src: np.ndarray) -> np.ndarray:
    arr = src
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"array image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {src.shape}")
    if arr.dtype != np.uint8:
        raise ImageError(f"array image must be uint8 (0-255), got {arr.dtype}; convert it with "
                         "np.clip(a, 0, 255).astype(np.uint8) (or scale floats in [0, 1] by 255 first)")
    _check_size(arr.shape[1], arr.shape[0], "array image")
    return arr[:, :, :3]


def load_image(src: ImageInput, *, allow_remote: bool = False) -> np.ndarray:
    """Decode an image into an HxWx3 uint8 RGB array (see the module docstring for what is accepted and how
    it is normalised). URLs are refused unless allow_remote=True. Raises ImageError."""
    img: Image.Image | None = None
    what = "image"
    if isinstance(src, np.ndarray):
        arr = _from_array(src)
        what = "array image"
    elif isinstance(src, Image.Image):
        what = "PIL image"
        _check_size(src.width, src.height, what)  # before load(): a lazily opened image may be a bomb
        try:
            src.load()
        except Exception as e:
            raise ImageError(f"{what}: could not decode it ({_describe(e)}); re-save or re-download the "
                             "image") from None
        img = src
    elif isinstance(src, (bytes, bytearray, memoryview)):
        what = "image bytes"
        img = _open_bytes(bytes(src), what)
    elif isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if isinstance(s, bytes):
            s = os.fsdecode(s)
        if s.startswith("data:"):
            what = "data URI"
            header, sep, payload = s.partition(",")
            if not sep or ";base64" not in header:
                raise ImageError("data URI images must be base64-encoded: data:image/png;base64,<data>")
            if len(payload) > MAX_FILE_BYTES * 4 // 3 + 4:
                raise ImageError(f"data URI: payload over the {MAX_FILE_BYTES}-byte limit; pass a smaller image")
            try:
                data = base64.b64decode(payload, validate=True)
            except ValueError as e:
                raise ImageError(f"data URI: invalid base64 ({e}); encode the image bytes with base64") from None
            img = _open_bytes(data, what)
        elif s.startswith(("http://", "https://")):
            what = s[:200]
            if not allow_remote:
                raise ImageError(f"refusing to fetch {s[:200]!r}: remote images are disabled "
                                 "(allow_remote_images=True enables them, or download the file and pass its path)")
            import urllib.request
            try:
                with urllib.request.urlopen(s, timeout=30) as r:  # noqa: S310 - opt-in by the user
                    data = r.read(MAX_FILE_BYTES + 1)
            except Exception as e:
                raise ImageError(f"could not fetch {s[:200]!r} ({_describe(e)})") from None
            img = _open_bytes(data, what)
        else:
            path = Path(s[7:] if s.startswith("file://") else s)
            what = str(path)
            hint = ("; if this string is base64 image data, pass it as 'data:image/png;base64,<data>'"
                    if len(s) > 100 and "/" not in s and "\\" not in s else "")
            try:
                if not path.is_file():
                    raise ImageError(f"image file not found: {str(path)[:300]!r}; pass the path of an existing "
                                     f"file, image bytes, a data: URI, a PIL image or an array{hint}")
                size = path.stat().st_size
                if size > MAX_FILE_BYTES:
                    raise ImageError(f"{what}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit; "
                                     "pass a smaller image")
                data = path.read_bytes()
            except ImageError:
                raise
            except (OSError, ValueError) as e:  # permissions, a NUL in the path, too long a name, ...
                raise ImageError(f"cannot read image file {str(path)[:300]!r} ({_describe(e)}); check the path "
                                 f"and its permissions{hint}") from None
            img = _open_bytes(data, what)
    else:
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, bytes, a data: URI, "
                         "a PIL image or a uint8 array")

    if img is not None:
        arr = _to_rgb(img, what)
    _check_size(arr.shape[1], arr.shape[0], what)
    arr = _limit_side(np.ascontiguousarray(arr, dtype=np.uint8), what)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def load_frames(src: ImageInput | list[ImageInput] | tuple[ImageInput, ...], *, max_frames: int = 16,
                allow_remote: bool = False) -> list[np.ndarray]:
    """Frames of a video as RGB arrays of one size: a list of images, or the frames of an animated GIF / WebP /
    PNG evenly sampled down to max_frames. Frames of another size are resized to the first frame's."""
    if not isinstance(max_frames, int) or max_frames < 1:
        raise ImageError(f"max_frames must be an int >= 1, got {max_frames!r}")
    if isinstance(src, (list, tuple)):
        if not src:
            raise ImageError("a video needs at least one frame")
        idx = np.unique(np.linspace(0, len(src) - 1, min(max_frames, len(src))).round().astype(int))
        frames = [load_image(src[i], allow_remote=allow_remote) for i in idx]
    else:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, (bytes, bytearray, memoryview)):
            img = _open_bytes(bytes(src), "video bytes")
        elif isinstance(src, (str, os.PathLike)) and not str(src).startswith(("data:", "http://", "https://")):
            path = Path(os.fspath(src))
            if not path.is_file():
                raise ImageError(f"video file not found: {str(path)[:300]!r}")
            img = _open_bytes(path.read_bytes(), str(path))
        else:
            return [load_image(src, allow_remote=allow_remote)]
        n = int(getattr(img, "n_frames", 1) or 1)
        idx = np.unique(np.linspace(0, n - 1, min(max_frames, n)).round().astype(int))
        frames = []
        for i in idx:
            try:
                img.seek(int(i))
            except EOFError:
                break
            frames.append(load_image(img.convert("RGB")))
        if not frames:
            raise ImageError("the animation has no readable frames")
    h, w = frames[0].shape[:2]
    return [f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC))
            for f in frames]


# --------------------------------------------------------------------------- #
# images named by network clients (the server): where they may come from
# --------------------------------------------------------------------------- #

# set by the server for the duration of one request: image URL -> the bytes its policy fetched; the chat
# handler takes images from here (and nowhere else) while it is set, so a request cannot make the handler open
# a file or URL the policy did not allow
_REQUEST_IMAGES: contextvars.ContextVar[Mapping[str, bytes] | None] = contextvars.ContextVar(
    "avis_request_images", default=None)

_REQUEST_VIDEOS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("avis_request_videos",
                                                                                 default=frozenset())

# the one answer for a local image outside the directory, missing, or unreadable: no file facts leak
LOCAL_IMAGE_UNAVAILABLE = ("local image not available: a path or file:// URL must name a readable image file "
                           "inside the server's image directory")


@dataclass(frozen=True)
class ImageSourcePolicy:
    """Where images named in a network request may come from, and how large they may be (the server's rules;
    the Python library reads local paths as given).

    image_dir: local paths and file:// URLs resolve inside this directory (relative paths against it) and may
    not leave it (`..`, symlinks); None refuses them. allow_remote: fetch http(s) URLs (off: request forgery).
    max_bytes: encoded bytes per image; max_pixels: width x height per image (and per video frame), checked from
    the header. Videos (video_url parts) come from the same places; max_video_bytes, max_video_seconds and
    max_video_frames (source frames) bound them, checked from the container header by the server."""

    image_dir: str | None = None
    allow_remote: bool = False
    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    remote_timeout: float = 10.0
    max_video_bytes: int = 64 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_video_frames: int = 36_000

    def __post_init__(self) -> None:
        if self.image_dir is not None:
            real = os.path.realpath(self.image_dir)
            if not os.path.isdir(real):
                raise InvalidArgumentError(f"image directory {self.image_dir!r} is not a directory")
            object.__setattr__(self, "image_dir", real)
        for name in ("max_bytes", "max_pixels", "max_video_bytes", "max_video_frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")
        v = self.max_video_seconds
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise InvalidArgumentError(f"max_video_seconds must be a number > 0, got {v!r}")


@contextlib.contextmanager
def request_images(resolved: Mapping[str, bytes], videos: Iterable[str] = ()) -> Iterator[None]:
    """Within the block, the chat handler takes images (and videos) only from `resolved` (URL -> encoded bytes);
    `videos`: the URLs that came as video_url parts (the server hands them on as image_url parts, since
    llama_cpp.server's request model knows no video_url)."""
    token = _REQUEST_IMAGES.set(dict(resolved))
    token_v = _REQUEST_VIDEOS.set(frozenset(videos))
    try:
        yield
    finally:
        _REQUEST_VIDEOS.reset(token_v)
        _REQUEST_IMAGES.reset(token)


def request_video_urls() -> frozenset[str]:
    """The URLs of the current server request that are videos (empty outside a server request)."""
    return _REQUEST_VIDEOS.get()


def request_image(url: str) -> ImageInput:
    """What the chat handler loads for an image_url: the URL itself (library use), or, inside a server request,
    the bytes the server's policy fetched for it (ImageError if it fetched none)."""
    resolved = _REQUEST_IMAGES.get()
    if resolved is None:
        return url
    data = resolved.get(url)
    if data is None:
        raise ImageError("image was not fetched under the server's image policy")
    return data


def fetch_request_image(url: str, policy: ImageSourcePolicy) -> bytes:
    """The encoded bytes of an image named in a request, under `policy`: data URIs always, http(s) URLs when
    allowed, local paths / file:// URLs only inside policy.image_dir. Checks the byte limit, the format and the
    pixel count from the header (nothing is decoded). Raises ImageError with a message safe to show a client."""
    data = fetch_request_bytes(url, policy)
    check_image_header(data, policy.max_pixels)
    return data


def fetch_request_bytes(url: str, policy: ImageSourcePolicy, *, video: bool = False) -> bytes:
    """The bytes a request's image (or, with video=True, video) URL names, under `policy`'s source rules and its
    byte limit (max_bytes, or max_video_bytes); nothing is decoded or checked beyond that. Raises ImageError with
    a message safe to show a client (the same one answer for every unavailable local file, image or video)."""
    what, example = ("video", "data:video/mp4;base64,...") if video else ("image", "data:image/png;base64,...")
    max_bytes = policy.max_video_bytes if video else policy.max_bytes
    if not isinstance(url, str) or not url:
        raise ImageError(f"{what} URL must be a non-empty string")
    if url[:5].lower() == "data:":
        return _data_uri_bytes(url, max_bytes, what)
    if url[:7].lower() == "http://" or url[:8].lower() == "https://":
        if not policy.allow_remote:
            raise ImageError(f"remote {what} URLs are disabled on this server; send the {what} as a data URI "
                             f"({example})")
        return _fetch_remote(url, policy, max_bytes, what)
    if "://" in url[:16] and url[:7].lower() != "file://":
        raise ImageError(f"unsupported {what} URL scheme {url.split('://', 1)[0][:16]!r}; send a data URI "
                         f"({example})")
    if policy.image_dir is None:
        raise ImageError(f"local {what} paths and file:// URLs are disabled on this server; send the {what} as a "
                         f"data URI ({example})")
    return _read_local(url, policy, max_bytes, what)


def check_image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Width and height from an encoded image's header (no pixels decoded); ImageError if it is not an image
    of a supported format or has more than max_pixels pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_allowed_formats()) as img:
                w, h = img.size
    except Image.DecompressionBombError:
        raise ImageError(f"image has more than {max_pixels} pixels; downscale it first") from None
    except Exception as e:
        fmt = _sniff(data) if data else None
        what = (f"the {fmt} data is truncated or corrupt" if fmt else "not a readable image") + (
            "" if isinstance(e, UnidentifiedImageError) else f" ({_describe(e)[:120]})")
        raise ImageError(f"{what}; send a PNG, JPEG, GIF, WebP, BMP, TIFF, PPM, TGA or ICO image") from None
    if w < 1 or h < 1:
        raise ImageError(f"image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels, over this server's limit of {max_pixels}; "
                         "downscale it first")
    return w, h


def _too_big(what: str, max_bytes: int) -> ImageError:
    return ImageError(f"{what} is over this server's limit of {max_bytes} bytes; send a smaller {what}")


def _data_uri_bytes(url: str, max_bytes: int, what: str = "image") -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header.lower():
        example = "data:video/mp4;base64,<data>" if what == "video" else "data:image/png;base64,<data>"
        raise ImageError(f"data URI {what}s must be base64-encoded: {example}")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise _too_big(what, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise ImageError(f"data URI: invalid base64; encode the {what} bytes with standard base64") from None
    if not data:
        raise ImageError(f"data URI: empty {what} data")
    if len(data) > max_bytes:
        raise _too_big(what, max_bytes)
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) (urllib would also follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's API
        if not newurl.lower().startswith(("http://", "https://")):
            raise ImageError("remote image redirected to a non-http(s) URL; refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_remote(url: str, policy: ImageSourcePolicy, max_bytes: int, what: str = "image") -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    try:
        with opener.open(url, timeout=policy.remote_timeout) as r:
            data = r.read(max_bytes + 1)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"could not fetch the {what} URL ({type(e).__name__})") from None
    if len(data) > max_bytes:
        raise _too_big(what, max_bytes)
    if not data:
        raise ImageError(f"the {what} URL returned no data")
    return data


def _read_local(url: str, policy: ImageSourcePolicy, max_bytes: int, what: str = "image") -> bytes:
    """A regular file inside policy.image_dir, else ImageError(LOCAL_IMAGE_UNAVAILABLE) whatever the reason."""
    root = policy.image_dir
    assert root is not None
    try:
        if url[:7].lower() == "file://":
            parsed = urllib.parse.urlsplit(url)
            if parsed.netloc not in ("", "localhost"):
                raise ValueError("remote file host")
            rel = urllib.request.url2pathname(parsed.path)
        else:
            rel = url
        if "\x00" in rel:
            raise ValueError("NUL in path")
        real = os.path.realpath(os.path.join(root, rel))  # an absolute `rel` replaces root; checked below
        if os.path.commonpath([root, real]) != root or real == root:
            raise PermissionError("outside the image directory")
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PermissionError("not a regular file")
            if st.st_size > max_bytes:
                raise _too_big(what, max_bytes)
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(max_bytes + 1)
        finally:
            os.close(fd)
    except ImageError:
        raise
    except (OSError, ValueError) as e:
        logger.info("refused local image %r: %s", url[:200], _describe(e))
        raise ImageError(LOCAL_IMAGE_UNAVAILABLE) from None
    if not data or len(data) > max_bytes:
        raise ImageError(LOCAL_IMAGE_UNAVAILABLE) if not data else _too_big(what, max_bytes)
    return data
