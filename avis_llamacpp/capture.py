"""Read the attention keys of the last vision-transformer block during mtmd's encode, through the encoder
graph's eval callback (`mtmd_context_params.cb_eval`), and map them to one key per LLM image token in the
order of `mtmd_get_output_embd`. Works on stock llama-cpp-python: the tensor is copied with
`ggml_backend_tensor_get`, so it also works when the encoder runs on a GPU backend."""

from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import CaptureError
from .families import KEY_NAMES_POST_ROPE_FIRST, ChunkGeometry, TokenKeys, VisionInfo, family_for

logger = logging.getLogger(__name__)

GGML_MAX_DIMS, GGML_MAX_OP_PARAMS, GGML_MAX_SRC, GGML_MAX_NAME = 4, 64, 10, 64
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class GGMLTensor(ctypes.Structure):
    """Mirror of `struct ggml_tensor` (ggml/include/ggml.h, ggml 0.25.x): the fields we read are
    type, ne, nb, name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _load_ggml_base() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
            break
        except OSError:
            continue
    else:  # pragma: no cover - depends on the install
        raise CaptureError(f"libggml-base not found in {lib_dir}; key capture needs llama-cpp-python's shared libraries")
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


_GGML: ctypes.CDLL | None = None


def _ggml() -> ctypes.CDLL:
    global _GGML
    if _GGML is None:
        _GGML = _load_ggml_base()
    return _GGML


_KEY_NAME = re.compile(r"^(Kcur_rope|Kcur_pos|Kcur)-(\d+)$")
_RAW_INPUT = b"inp_raw"


def _dtype_of(t: GGMLTensor) -> tuple[Any, int]:
    if t.type == GGML_TYPE_F32:
        return np.float32, 4
    if t.type == GGML_TYPE_F16:
        return np.float16, 2
    raise CaptureError(f"tensor {t.name.decode()} has ggml type {t.type}; only F32/F16 can be captured")


def tensor_nbytes(ne: Sequence[int], nb: Sequence[int], item_size: int) -> int:
    """Bytes spanned by a (possibly strided) tensor view, as ggml_nbytes computes it for block size 1."""
    if any(n <= 0 for n in ne):
        return 0
    return item_size + sum((n - 1) * b for n, b in zip(ne, nb))


def strided_to_array(buf: np.ndarray, ne: Sequence[int], nb: Sequence[int]) -> np.ndarray:
    """A tensor's elements, numpy-shaped (ne reversed), from the raw bytes it spans and its nb strides.
    Works for contiguous tensors and for views (e.g. K split out of a fused QKV projection)."""
    item = buf.dtype.itemsize
    if any(int(b) % item for b in nb):
        raise CaptureError(f"strides {list(nb)} are not multiples of the element size {item}")
    view = np.lib.stride_tricks.as_strided(buf, shape=tuple(int(n) for n in ne[::-1]),
                                           strides=tuple(int(b) for b in nb[::-1]), writeable=False)
    return np.ascontiguousarray(view)


def read_tensor(addr: int) -> tuple[str, np.ndarray]:
    """Copy a computed F32/F16 ggml tensor (any backend; contiguous or a strided view) into numpy, shaped
    like ggml's ne reversed, as float32."""
    t = GGMLTensor.from_address(addr)
    ne = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
    nb = [int(t.nb[i]) for i in range(GGML_MAX_DIMS)]
    dtype, size = _dtype_of(t)
    nbytes = tensor_nbytes(ne, nb, size)
    buf = np.empty(max(nbytes, size) // size + 1, dtype=dtype)
    if nbytes:
        _ggml().ggml_backend_tensor_get(addr, buf.ctypes.data, 0, nbytes)
    arr = strided_to_array(buf, ne, nb)
    return t.name.decode(), arr.astype(np.float32, copy=False)


class KeyCapture:
    """An eval callback that keeps the keys of the deepest attention block the encoder runs.

    The first encode asks for every key tensor and keeps the deepest (learning its name); later encodes ask
    only for that one tensor, so a single tensor is copied per image. Within a block, post-RoPE keys are
    preferred in the order of `key_names` (the family's). It also records the preprocessed image size from
    the graph's raw-input tensor (a shape read, no copy), which gives the patch grid of families whose
    mtmd grid is 1 x N.
    """

    def __init__(self, key_names: Sequence[str] = KEY_NAMES_POST_ROPE_FIRST) -> None:
        self.use_key_names(key_names)
        self.target: str | None = None
        self._best: tuple[int, int] | None = None
        self.name: str | None = None
        self.keys: np.ndarray | None = None  # [n_rows, n_head, d_head]
        self.image_wh: tuple[int, int] | None = None
        self.copies = 0  # tensors copied during the last encode

    def use_key_names(self, key_names: Sequence[str]) -> None:
        """The family's key tensor names, most preferred first (before the first encode)."""
        self.priority = {n: len(key_names) - i for i, n in enumerate(key_names)}

    def begin(self) -> None:
        """Forget the previous image's keys (call before each encode)."""
        self._best, self.name, self.keys, self.image_wh, self.copies = None, None, None, None, 0

    def end(self) -> None:
        """Fix the learned tensor name after the first successful encode."""
        if self.target is None and self.name is not None:
            self.target = self.name
            logger.debug("key capture: using tensor %s", self.name)

    def _see_raw_input(self, t: GGMLTensor) -> None:
        if self.image_wh is not None:
            return
        for i in range(GGML_MAX_SRC):
            src = t.src[i]
            if not src:
                continue
            s = GGMLTensor.from_address(src)
            if s.name == _RAW_INPUT:
                self.image_wh = (int(s.ne[0]), int(s.ne[1]))
                return

    def __call__(self, addr: int, ask: bool) -> bool:
        t = GGMLTensor.from_address(addr)
        if ask:
            self._see_raw_input(t)
        name = t.name.decode("utf-8", "replace")
        if self.target is not None:
            if name != self.target:
                return not ask  # ask: not interested; observe: continue the compute
        else:
            m = _KEY_NAME.match(name)
            if m is None or m.group(1) not in self.priority:
                return not ask
            rank = (int(m.group(2)), self.priority[m.group(1)])
            if self._best is not None and rank < self._best:
                return not ask
            if ask:
                return True
            self._best = rank
        if ask:
            return True
        self.name, arr = read_tensor(addr)
        self.copies += 1
        if arr.ndim < 3:
            raise CaptureError(f"{name}: expected [n_rows, n_head, d_head] keys, got shape {arr.shape}")
        self.keys = arr.reshape(-1, arr.shape[-2], arr.shape[-1]) if arr.ndim > 3 else arr
        return True


def read_vision_info(mmproj_path: str | os.PathLike) -> VisionInfo:
    """Read projector type, patch size, merge / window / pooling settings and ViT size from an mmproj GGUF."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(mmproj_path))

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    proj = get("clip.projector_type") or get("clip.vision.projector_type")
    return VisionInfo(projector_type=proj, patch_size=int(get("clip.vision.patch_size", 14)),
                      n_wa_pattern=int(get("clip.vision.n_wa_pattern", 0)),
                      window_size=int(get("clip.vision.window_size", 112)),
                      spatial_merge=int(get("clip.vision.spatial_merge_size", 0)),  # 0: absent (family default)
                      n_layer=int(get("clip.vision.block_count", 0)), n_embd=int(get("clip.vision.embedding_length", 0)),
                      n_ff=int(get("clip.vision.feed_forward_length", 0)),
                      image_size=int(get("clip.vision.image_size", 0)),
                      scale_factor=int(get("clip.vision.projector.scale_factor", 0)),
                      window_modes=tuple(int(v) for v in get("clip.vision.wa_pattern_mode", []) or []))


def read_constant_tensors(mmproj_path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named tensors of an mmproj GGUF as flat float32 arrays (dequantized when stored quantized)."""
    if not names:
        return {}
    import gguf

    reader = gguf.GGUFReader(os.fspath(mmproj_path))
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name in names:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            out[t.name] = np.asarray(data, dtype=np.float32).reshape(-1)
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"missing tensor(s) {missing}")
    return out


def keys_per_token(keys: np.ndarray, info: VisionInfo, geom: ChunkGeometry) -> TokenKeys | None:
    """Captured encoder keys [n_rows, H, D] -> keys per LLM image token by the projector family's rule, or None
    when the family has no native mapping or the rows do not fit it (the caller falls back to embeddings)."""
    return family_for(info.projector_type).token_keys(keys, geom, info)
