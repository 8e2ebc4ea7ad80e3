"""Read the attention keys of the last vision-transformer block during mtmd's encode, through the encoder
graph's eval callback (`mtmd_context_params.cb_eval`), and map them to one key per LLM image token in the
order of `mtmd_get_output_embd`. Works on stock llama-cpp-python: the tensor is copied with
`ggml_backend_tensor_get`, so it also works when the encoder runs on a GPU backend."""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CaptureError
from .kdv import vit_keys_to_token_keys

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


# Attention-key tensors the encoder graphs name with cb(): post-RoPE variants are preferred (the paper
# scores keys after RoPE where the encoder applies it).
_KEY_NAME = re.compile(r"^(Kcur_rope|Kcur_pos|Kcur)-(\d+)$")
_PRIORITY = {"Kcur": 0, "Kcur_pos": 1, "Kcur_rope": 2}


def read_tensor(addr: int) -> tuple[str, np.ndarray]:
    """Copy a computed F32/F16 ggml tensor (any backend) into numpy, shaped like ggml's ne reversed."""
    t = GGMLTensor.from_address(addr)
    ne = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
    if t.type == GGML_TYPE_F32:
        dtype, size = np.float32, 4
    elif t.type == GGML_TYPE_F16:
        dtype, size = np.float16, 2
    else:
        raise CaptureError(f"tensor {t.name.decode()} has ggml type {t.type}; only F32/F16 can be captured")
    n = int(np.prod(ne))
    if int(t.nb[0]) != size or int(t.nb[1]) != size * ne[0] or int(t.nb[2]) != size * ne[0] * ne[1]:
        raise CaptureError(f"tensor {t.name.decode()} is not contiguous (nb={list(t.nb)})")
    out = np.empty(n, dtype=dtype)
    _ggml().ggml_backend_tensor_get(addr, out.ctypes.data, 0, n * size)
    return t.name.decode(), out.reshape(ne[::-1]).astype(np.float32, copy=False)


class KeyCapture:
    """An eval callback that keeps the keys of the deepest attention block the encoder runs.

    The first encode asks for every key tensor and keeps the deepest (learning its name); later encodes ask
    only for that one tensor, so a single tensor is copied per image.
    """

    def __init__(self) -> None:
        self.target: str | None = None
        self._best: tuple[int, int] | None = None
        self.name: str | None = None
        self.keys: np.ndarray | None = None  # [n_rows, n_head, d_head]
        self.copies = 0  # tensors copied during the last encode

    def begin(self) -> None:
        """Forget the previous image's keys (call before each encode)."""
        self._best, self.name, self.keys, self.copies = None, None, None, 0

    def end(self) -> None:
        """Fix the learned tensor name after the first successful encode."""
        if self.target is None and self.name is not None:
            self.target = self.name
            logger.debug("key capture: using tensor %s", self.name)

    def __call__(self, addr: int, ask: bool) -> bool:
        t = GGMLTensor.from_address(addr)
        name = t.name.decode("utf-8", "replace")
        if self.target is not None:
            if name != self.target:
                return not ask  # ask: not interested; observe: continue the compute
        else:
            m = _KEY_NAME.match(name)
            if m is None:
                return not ask
            rank = (int(m.group(2)), _PRIORITY[m.group(1)])
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


@dataclass(frozen=True)
class VisionInfo:
    """What the key-to-token mapping needs from the mmproj's metadata."""

    projector_type: str | None
    patch_size: int
    n_wa_pattern: int
    window_size: int
    spatial_merge: int
    n_layer: int = 0
    n_embd: int = 0
    n_ff: int = 0


def read_vision_info(mmproj_path: str | os.PathLike) -> VisionInfo:
    """Read projector type, patch size and window-attention settings from an mmproj GGUF."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(mmproj_path))

    def get(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return default
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        return f.parts[f.data[0]].tolist()[0]

    proj = get("clip.projector_type") or get("clip.vision.projector_type")
    return VisionInfo(projector_type=proj, patch_size=int(get("clip.vision.patch_size", 14)),
                      n_wa_pattern=int(get("clip.vision.n_wa_pattern", 0)),
                      window_size=int(get("clip.vision.window_size", 112)),
                      spatial_merge=int(get("clip.vision.spatial_merge_size", 2)),
                      n_layer=int(get("clip.vision.block_count", 0)), n_embd=int(get("clip.vision.embedding_length", 0)),
                      n_ff=int(get("clip.vision.feed_forward_length", 0)))


# Projector types whose encoder graph we know how to map to LLM tokens.
LLAVA_LIKE = {"mlp", "mlp_norm", "ldp", "ldpv2"}
QWEN_LIKE = {"qwen2vl_merger", "qwen2.5vl_merger"}
QWEN25VL_WINDOW_PX = 112


def keys_per_token(keys: np.ndarray, info: VisionInfo, nx: int, ny: int) -> np.ndarray | None:
    """Captured encoder keys [n_rows, H, D] -> one key per LLM image token [nx*ny, H, D], or None when the
    projector's row-to-token mapping is unknown (the caller then falls back to the projected embeddings)."""
    n_tokens = nx * ny
    if info.projector_type in LLAVA_LIKE:
        # llama.cpp's llava graph appends the class embedding after the patches and feeds the projector rows
        # patches[i] = i + 1 when a class embedding exists (clip.cpp, PROJECTOR_TYPE_MLP inputs).
        if keys.shape[0] == n_tokens + 1:
            return keys[1:n_tokens + 1]
        if keys.shape[0] == n_tokens:
            return keys
        return None
    if info.projector_type in QWEN_LIKE:
        merge = 2  # clip.cpp hard-codes merge_ratio = 2 for Qwen2/2.5-VL
        if keys.shape[0] != n_tokens * merge * merge:
            return None
        window = None
        if info.projector_type == "qwen2.5vl_merger" and info.n_wa_pattern > 0:
            # clip.cpp never reads clip.vision.window_size for Qwen2.5-VL: attn_window_size stays 0 -> 112 px
            window = QWEN25VL_WINDOW_PX // info.patch_size
        return vit_keys_to_token_keys(keys, nx * merge, ny * merge, merge, window)
    return None
