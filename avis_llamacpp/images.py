"""Turn what users pass as an image (path, bytes, data URI, PIL image, array) into an RGB uint8 array,
with PIL doing the decoding so EXIF rotation, palettes, alpha, 16-bit and CMYK are handled and
decompression bombs are refused before decoding."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageInput = Union[str, os.PathLike, bytes, bytearray, "Image.Image", np.ndarray]

MAX_PIXELS = 64_000_000  # refuse anything larger before decoding (PIL's bomb check uses this)


def _open_bytes(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ImageError(f"{what}: empty image data")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{what}: {w}x{h} image exceeds {MAX_PIXELS} pixels (decompression bomb?); "
                             "downscale it first")
        img.load()
        return img
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{what}: not a readable image ({type(e).__name__}: {e})") from e


def load_image(src: ImageInput, *, allow_remote: bool = False) -> np.ndarray:
    """Decode an image into an HxWx3 uint8 RGB array (EXIF orientation applied, alpha dropped as
    llama.cpp's own loader does). URLs are refused unless allow_remote=True."""
    if isinstance(src, np.ndarray):
        arr = src
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ImageError(f"array image must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ImageError(f"array image must be uint8, got {arr.dtype}")
        img = None
        arr = arr[:, :, :3]
    elif isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (bytes, bytearray)):
        img = _open_bytes(bytes(src), "image bytes")
    elif isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        if s.startswith("data:"):
            header, _, payload = s.partition(",")
            if ";base64" not in header:
                raise ImageError("data URI images must be base64-encoded")
            try:
                data = base64.b64decode(payload, validate=True)
            except ValueError as e:
                raise ImageError(f"data URI: invalid base64 ({e})") from e
            img = _open_bytes(data, "data URI")
        elif s.startswith(("http://", "https://")):
            if not allow_remote:
                raise ImageError(f"refusing to fetch {s!r}: remote images are disabled (allow_remote=True enables them)")
            import urllib.request
            with urllib.request.urlopen(s, timeout=30) as r:  # noqa: S310 - opt-in by the user
                img = _open_bytes(r.read(MAX_PIXELS * 4), s)
        else:
            path = Path(s[7:] if s.startswith("file://") else s)
            if not path.is_file():
                raise ImageError(f"image file not found: {str(path)!r}")
            img = _open_bytes(path.read_bytes(), str(path))
    else:
        raise ImageError(f"unsupported image type {type(src).__name__}; pass a path, bytes, PIL image or array")

    if img is not None:
        if getattr(img, "is_animated", False):
            img.seek(0)  # first frame of an animated image
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(img, dtype=np.float64)
            top = 65535.0 if a.max() > 255 else 255.0
            img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        arr = np.asarray(img.convert("RGB"))
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"image has zero size ({arr.shape[1]}x{arr.shape[0]})")
    return np.ascontiguousarray(arr, dtype=np.uint8)
