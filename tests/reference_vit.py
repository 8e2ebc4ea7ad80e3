"""Independent numpy oracles of the two vision encoders mtmd runs (numpy + gguf only, no llama.cpp).

They mirror what the vendored llama.cpp graphs compute, not what the HF reference models compute,
wherever the two differ:

* ``tools/mtmd/models/llava.cpp`` (CLIP ViT + ``mlp`` projector, projector_type ``mlp``):
  the class embedding is concatenated AFTER the patch rows (``ggml_concat(inp, class_embedding, 1)``)
  and position embeddings are added by row index (``positions[i] = i``), so patch ``i`` gets
  ``pos[i]`` and the class token gets ``pos[n_patches]`` (HF: class at row 0 with ``pos[0]``, patch
  ``i`` with ``pos[i + 1]``). The projector input is ``get_rows(patches)`` with
  ``patches[i] = i + 1`` (clip.cpp "skip the CLS row"), which with the class row LAST selects patches
  ``1 .. n_patches - 1`` plus the class token: patch 0 is dropped and the last LLM token is the
  projected class token. Without ``clip.vision.feature_layer`` only ``n_layer - 1`` blocks run.
* ``tools/mtmd/models/qwen2vl.cpp`` (projector_type ``qwen2.5vl_merger``): both temporal patch convs
  applied to the same frame and summed, 2x2 merge groups made contiguous, rows regrouped by window
  (``get_rows(inv_window_idx)`` on groups of 4), RMSNorm blocks, vision M-RoPE on Q/K, window mask
  on non-full layers, SwiGLU FFN, RMS post-norm, 4 rows -> ``mm.0`` -> GELU -> ``mm.2``, then
  ``get_rows(window_idx)`` back to raster order.

Activations follow ggml-cpu: ``ggml_gelu`` is the tanh approximation read from an f16 lookup table
(input rounded to f16, output stored as f16, ``x <= -10 -> 0``, ``x >= 10 -> x``), and
``ggml_gelu_quick`` the same table trick without the clamps (``GGML_GELU_FP16`` /
``GGML_GELU_QUICK_FP16`` in ggml-cpu/vec.h). Pass ``act="exact"`` to use the plain float formulas.
The patch-embedding convs mirror ggml_conv_2d, whose im2col is F16 for any non-bf16 kernel: pixels and
kernel are rounded to f16 before the (f32-accumulated) product, even in an all-f32 mmproj.
Everything else is computed in float64 (pixel preprocessing in float32, as clip.cpp does).

Public API::

    load_mmproj_weights(path) -> dict[str, np.ndarray]
    load_mmproj(path) -> (weights, hparams)
    llava_forward(path, image_rgb, *, act="ggml", hf_layout=False) -> dict
    qwen25vl_forward(path, image_rgb, *, act="ggml") -> dict
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

import gguf

from convert.gguf_tensors import read_tensors

__all__ = [
    "load_mmproj_weights",
    "load_mmproj",
    "read_hparams",
    "llava_forward",
    "qwen25vl_forward",
    "qwen25vl_window_index",
    "qwen25vl_positions",
    "gelu",
    "gelu_quick",
]

QWEN25VL_WINDOW_SIZE = 112  # clip.cpp: attn_window_size is not read for qwen2.5vl -> 112
QWEN25VL_MIN_TOKENS, QWEN25VL_MAX_TOKENS = 8, 4096  # clip.cpp set_limit_image_tokens(8, 4096)
ROPE_THETA = 10000.0  # ggml_rope_multi(..., freq_base=10000, ...) in qwen2vl.cpp


# ---------------------------------------------------------------------------------------------
# GGUF loading
# ---------------------------------------------------------------------------------------------
def load_mmproj_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an mmproj GGUF as float32 numpy arrays (shape = ggml ne reversed).

    A linear weight with ggml ne ``[n_in, n_out]`` becomes ``[n_out, n_in]`` (PyTorch layout), a conv
    kernel with ne ``[kw, kh, c_in, c_out]`` becomes ``[c_out, c_in, kh, kw]``.
    """
    return read_tensors(path)


def _field_value(field: Any) -> Any:
    if hasattr(field, "contents"):
        return field.contents()
    # older gguf-py: decode by hand
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode()
    if vtype == gguf.GGUFValueType.ARRAY:
        return [field.parts[i][0].item() for i in field.data]
    return field.parts[-1][0].item()


def read_hparams(path: str | os.PathLike) -> dict[str, Any]:
    """The clip.* hyper-parameters the two graphs use (with clip.cpp's defaults)."""
    reader = gguf.GGUFReader(os.fspath(path))
    kv = {k: _field_value(f) for k, f in reader.fields.items() if k.startswith("clip.")}
    n_embd = int(kv["clip.vision.embedding_length"])
    n_head = int(kv["clip.vision.attention.head_count"])
    hp = {
        "projector_type": kv.get("clip.projector_type", "mlp"),
        "image_size": int(kv["clip.vision.image_size"]),
        "patch_size": int(kv["clip.vision.patch_size"]),
        "n_embd": n_embd,
        "n_ff": int(kv.get("clip.vision.feed_forward_length", 0)),
        "n_layer": int(kv["clip.vision.block_count"]),
        "n_head": n_head,
        "d_head": int(kv.get("clip.vision.attention.head_dim", n_embd // n_head)),
        "proj_dim": int(kv.get("clip.vision.projection_dim", 0)),
        "eps": float(np.float32(kv.get("clip.vision.attention.layer_norm_epsilon", 1e-6))),
        "image_mean": np.asarray(kv["clip.vision.image_mean"], dtype=np.float32)[:3],
        "image_std": np.asarray(kv["clip.vision.image_std"], dtype=np.float32)[:3],
        "use_gelu": bool(kv.get("clip.use_gelu", False)),
        "use_silu": bool(kv.get("clip.use_silu", False)),
        "feature_layers": [int(v) for v in kv.get("clip.vision.feature_layer", [])],
        "has_llava_projector": bool(kv.get("clip.has_llava_projector", False)),
        "n_wa_pattern": int(kv.get("clip.vision.n_wa_pattern", 0)),
        "n_merge": int(kv.get("clip.vision.spatial_merge_size", 2)),
    }
    if hp["use_gelu"] and hp["use_silu"]:
        raise ValueError("both clip.use_gelu and clip.use_silu are set")
    hp["ffn_op"] = "gelu" if hp["use_gelu"] else "silu" if hp["use_silu"] else "gelu_quick"
    return hp


def load_mmproj(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(weights, hparams) of an mmproj GGUF."""
    return load_mmproj_weights(path), read_hparams(path)


# ---------------------------------------------------------------------------------------------
# ggml-like building blocks (float64 unless stated)
# ---------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)
_GELU_COEF_A = np.float32(0.044715)
_GELU_QUICK_COEF = np.float32(-1.702)


def _gelu_f32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        inner = _SQRT_2_OVER_PI * x * (np.float32(1.0) + _GELU_COEF_A * x * x)
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


def _gelu_quick_f32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        return x * (np.float32(1.0) / (np.float32(1.0) + np.exp(_GELU_QUICK_COEF * x)))


def _via_f16_table(fn: Any, x: np.ndarray) -> np.ndarray:
    """ggml_table_*_f16[fp16(x)]: evaluate fn at the f16-rounded input, store the result as f16."""
    with np.errstate(over="ignore", invalid="ignore"):
        x16 = x.astype(np.float16).astype(np.float32)
        return fn(x16).astype(np.float16).astype(np.float64)


def gelu(x: np.ndarray, act: str = "ggml") -> np.ndarray:
    """ggml_gelu (tanh approximation); act="ggml" mirrors the CPU f16 lookup table and its clamps."""
    if act == "exact":
        x = np.asarray(x, dtype=np.float64)
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * x * (1.0 + 0.044715 * x * x)))
    y = _via_f16_table(_gelu_f32, x)
    return np.where(x <= -10.0, 0.0, np.where(x >= 10.0, x, y))


def gelu_quick(x: np.ndarray, act: str = "ggml") -> np.ndarray:
    """ggml_gelu_quick x * sigmoid(1.702 x); act="ggml" mirrors the CPU f16 lookup table (no clamps)."""
    if act == "exact":
        x = np.asarray(x, dtype=np.float64)
        return x / (1.0 + np.exp(-1.702 * x))
    return _via_f16_table(_gelu_quick_f32, x)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _layer_norm(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    y = xc / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def _rms_norm(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x @ w.T.astype(np.float64)
    return y if b is None else y + b


class _W:
    """Weight lookup: float64 arrays, None for missing optional tensors."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.w = weights

    def get(self, name: str) -> np.ndarray | None:
        a = self.w.get(name)
        return None if a is None else a.astype(np.float64)

    def req(self, name: str) -> np.ndarray:
        a = self.get(name)
        if a is None:
            raise KeyError(f"mmproj lacks required tensor {name!r}")
        return a


def _ffn(x: np.ndarray, W: _W, il: int, hp: dict[str, Any], act: str) -> np.ndarray:
    """clip_graph::build_ffn for a ViT block (with clip.cpp's legacy up/down swap)."""
    p = f"v.blk.{il}"
    up_w, up_b = W.get(f"{p}.ffn_up.weight"), W.get(f"{p}.ffn_up.bias")
    gate_w, gate_b = W.get(f"{p}.ffn_gate.weight"), W.get(f"{p}.ffn_gate.bias")
    down_w, down_b = W.get(f"{p}.ffn_down.weight"), W.get(f"{p}.ffn_down.bias")
    # clip.cpp: for mlp / qwen projectors, ffn_up and ffn_down are swapped when ffn_down.ne[0] == n_embd
    if up_w is not None and down_w is not None and down_w.shape[1] == hp["n_embd"]:
        up_w, down_w, up_b, down_b = down_w, up_w, down_b, up_b
    tmp = x if up_w is None else _linear(x, up_w, up_b)
    cur = _linear(x, gate_w, gate_b) if gate_w is not None else tmp
    op = hp["ffn_op"]
    if op == "silu":
        cur = _silu(cur) * tmp if gate_w is not None else _silu(cur)  # swiglu_split(gate, up)
    elif op == "gelu":
        cur = gelu(cur, act) * tmp if gate_w is not None else gelu(cur, act)
    elif op == "gelu_quick":
        cur = gelu_quick(cur, act) * tmp if gate_w is not None else gelu_quick(cur, act)
    else:  # pragma: no cover
        raise ValueError(op)
    return cur if down_w is None else _linear(cur, down_w, down_b)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Non-flash build_attn: softmax(scale * K^T Q + mask) V; q/k/v [n, n_head, d_head] -> [n, n_head*d_head]."""
    d_head = q.shape[-1]
    scale = float(np.float32(1.0) / np.sqrt(np.float32(d_head)))  # kq_scale = 1.0f / sqrtf(d_head)
    s = np.einsum("qhd,khd->hqk", q, k) * scale
    if mask is not None:
        s = np.where(mask[None, :, :], s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p, v)
    return out.reshape(out.shape[0], -1)


def _pixels(image_rgb: np.ndarray, hp: dict[str, Any]) -> np.ndarray:
    """clip_image_f32::from_u8 + normalize (float32), returned planar [3, H, W] as float64."""
    img = np.asarray(image_rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError("image_rgb must be a uint8 array of shape [H, W, 3]")
    f = img.astype(np.float32) / np.float32(255.0)
    f = (f - hp["image_mean"]) / hp["image_std"]
    return np.ascontiguousarray(f.transpose(2, 0, 1)).astype(np.float64)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float64)


def _patch_conv(px: np.ndarray, kernel: np.ndarray, p: int) -> np.ndarray:
    """ggml_conv_2d(kernel, img, stride=p, pad=0): [3, H, W] -> [ny, nx, c_out] (no bias).

    ggml_conv_2d builds im2col as F16 for any non-bf16 kernel, and mul_mat then converts the (f32)
    kernel to the f16 vec_dot type too: pixels and kernel are both rounded to f16 (products summed in
    f32). Mirrored here, since it dominates the error budget (~3e-4 relative) otherwise.
    """
    px, kernel = _f16(px), _f16(kernel)
    c, h, w = px.shape
    ny, nx = h // p, w // p
    cols = px[:, : ny * p, : nx * p].reshape(c, ny, p, nx, p).transpose(1, 3, 0, 2, 4).reshape(ny * nx, c * p * p)
    out = cols @ kernel.reshape(kernel.shape[0], -1).astype(np.float64).T
    return out.reshape(ny, nx, kernel.shape[0])


def _square_image(image_rgb: np.ndarray, hp: dict[str, Any], who: str) -> np.ndarray:
    """The image as an array, refused unless image_size x image_size (fixed-size preprocessors copy such an
    image unchanged; their resize / letterbox is not mirrored)."""
    size = hp["image_size"]
    img = np.asarray(image_rgb)
    if img.shape[:2] != (size, size):
        raise ValueError(f"{who} needs a {size}x{size} image (no resize is mirrored), got {img.shape[:2]}")
    return img


def _patch_embed(img: np.ndarray, W: _W, hp: dict[str, Any]) -> tuple[np.ndarray, int, int]:
    """build_inp: the patch conv plus ``v.patch_embd.bias`` when present; (rows [nx*ny, n_embd] with patch (x, y)
    at row y * nx + x, nx, ny)."""
    conv = _patch_conv(_pixels(img, hp), W.req("v.patch_embd.weight"), hp["patch_size"])
    ny, nx = conv.shape[:2]
    x = conv.reshape(ny * nx, -1)
    pb = W.get("v.patch_embd.bias")
    return (x if pb is None else x + pb), nx, ny


def _qkv(cur: np.ndarray, W: _W, b: str, hp: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block ``b``'s separate q / k / v projections (+ biases when present), each [n, n_head, d_head]."""
    return tuple(  # type: ignore[return-value]
        _linear(cur, W.req(f"{b}.attn_{x}.weight"), W.get(f"{b}.attn_{x}.bias")).reshape(-1, hp["n_head"],
                                                                                          hp["d_head"])
        for x in "qkv")


def _attn_out(q: np.ndarray, k: np.ndarray, v: np.ndarray, W: _W, b: str) -> np.ndarray:
    """Unmasked non-flash attention of block ``b`` through its ``attn_out`` projection (+ bias)."""
    return _linear(_attention(q, k, v, None), W.req(f"{b}.attn_out.weight"), W.get(f"{b}.attn_out.bias"))


def _ln_block(x: np.ndarray, W: _W, il: int, hp: dict[str, Any], act: str, keys: list[np.ndarray],
              ffn: Any = None) -> np.ndarray:
    """One build_vit block with LayerNorm and no RoPE: ln1 -> separate q / k / v (K appended to ``keys``) ->
    attention -> attn_out, residual; ln2 -> ``ffn(cur, W, il, hp, act)`` (default _ffn), residual."""
    b, eps = f"v.blk.{il}", hp["eps"]
    q, k, v = _qkv(_layer_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps), W, b, hp)
    keys.append(k)
    x = x + _attn_out(q, k, v, W, b)
    cur = _layer_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
    return x + (ffn or _ffn)(cur, W, il, hp, act)


def read_scale_factor(path: str | os.PathLike, default: int) -> int:
    """clip.vision.projector.scale_factor of an mmproj, or the projector's clip.cpp default."""
    f = gguf.GGUFReader(os.fspath(path)).fields.get("clip.vision.projector.scale_factor")
    return int(f.contents()) if f is not None else default


def avg_pool_rows(rows: np.ndarray, px: int, py: int, k: int) -> np.ndarray:
    """ggml_pool_2d AVG, kernel = stride = k, over rows of a px x py grid (patch (x, y) at row y * px + x), by a
    plain loop: token by * (px/k) + bx = mean of patches x in [bx*k, bx*k+k), y in [by*k, by*k+k)."""
    tx, ty = px // k, py // k
    out = np.zeros((tx * ty,) + rows.shape[1:])
    for by in range(ty):
        for bx in range(tx):
            group = [y * px + x for y in range(by * k, by * k + k) for x in range(bx * k, bx * k + k)]
            out[by * tx + bx] = np.asarray(rows, dtype=np.float64)[group].mean(axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# LLaVA (CLIP ViT + mlp projector)
# ---------------------------------------------------------------------------------------------
def _llava_layers_run(hp: dict[str, Any]) -> int:
    """llava.cpp max_feature_layer: n_layer - 1, or the deepest explicit feature layer."""
    deepest = max(hp["feature_layers"], default=-1)
    return hp["n_layer"] - 1 if deepest < 0 else deepest


def llava_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml",
                  hf_layout: bool = False) -> dict[str, Any]:
    """Run the llava.cpp graph on an image that is already image_size x image_size (preprocessing is then
    /255 + mean/std only: mtmd's fixed-size preprocessor copies an image of the target size unchanged).

    Returns a dict with:
      keys:        list (one per block run) of K after projection + bias, [n_pos, n_head, d_head], rows in
                   graph order (patch rows in raster order, class token LAST)
      layers_run:  number of blocks the graph runs (n_layer - 1 for LLaVA-1.5 files)
      embeddings:  [n_patches, proj_dim] LLM embeddings (rows ``patches[i] = i + 1`` of the ViT output)
      rows:        the row indices fed to the projector
      hidden:      ViT output before the projector row selection, [n_pos, n_embd (x n_feature_layers)]

    hf_layout=True computes what the HF CLIP/LLaVA reference would (class token first with pos[0],
    patch i with pos[i + 1], projector on the n_patches patch rows), for comparison only.
    """
    weights, hp = load_mmproj(path)
    if hp["projector_type"] not in ("mlp", "ldp", "ldpv2"):  # ldp(v2): same ViT, keys only (no projector)
        raise ValueError(f"llava_forward supports projector_type 'mlp', got {hp['projector_type']!r}")
    if not hp["has_llava_projector"]:
        raise ValueError("mmproj has no llava projector")
    W = _W(weights)
    img = _square_image(image_rgb, hp, "llava_forward")
    eps = hp["eps"]

    x, nx, ny = _patch_embed(img, W, hp)
    n_patches = nx * ny
    cls = W.get("v.class_embd")
    pos = W.req("v.position_embd.weight")
    if cls is None:
        n_pos = n_patches
        x = x + pos[:n_pos]
    elif hf_layout:
        n_pos = n_patches + 1
        x = np.concatenate([cls[None, :], x], axis=0) + pos[:n_pos]
    else:
        n_pos = n_patches + 1
        x = np.concatenate([x, cls[None, :]], axis=0) + pos[:n_pos]  # ggml_concat(inp, class_embedding, 1)

    pre_w = W.get("v.pre_ln.weight")
    if pre_w is not None:
        x = _layer_norm(x, pre_w, W.get("v.pre_ln.bias"), eps)

    layers_run = _llava_layers_run(hp)
    feature_layers = hp["feature_layers"]
    stack: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    for il in range(layers_run):
        if il in feature_layers:
            stack.append(x)
        x = _ln_block(x, W, il, hp, act, keys)

    post_w = W.get("v.post_ln.weight")
    if post_w is not None:
        x = _layer_norm(x, post_w, W.get("v.post_ln.bias"), eps)
    hidden = x
    if layers_run in feature_layers:
        stack.append(x)
    if stack:
        hidden = np.concatenate(stack, axis=-1)

    offset = 1 if cls is not None else 0
    rows = np.arange(n_patches) + offset  # clip.cpp: patches[i] = i + patch_offset
    e = hidden[rows]
    if W.get("mm.0.weight") is None:  # MobileVLM projectors are not mirrored
        return {"keys": keys, "layers_run": layers_run, "embeddings": None, "rows": rows, "hidden": hidden,
                "n_pos": n_pos, "n_patches": n_patches, "hparams": hp}
    e = gelu(_linear(e, W.req("mm.0.weight"), W.req("mm.0.bias")), act)
    if W.get("mm.2.weight") is not None:
        e = _linear(e, W.req("mm.2.weight"), W.req("mm.2.bias"))
    return {
        "keys": keys,
        "layers_run": layers_run,
        "embeddings": e,
        "rows": rows,
        "hidden": hidden,
        "n_pos": n_pos,
        "n_patches": n_patches,
        "hparams": hp,
    }


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL
# ---------------------------------------------------------------------------------------------
def qwen25vl_window_index(nx: int, ny: int, patch_size: int, merge: int = 2,
                          window_size: int = QWEN25VL_WINDOW_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window_idx, inv_window_idx, mask) exactly as clip_image_batch_encode builds them for QWEN25VL.

    nx/ny are the patch-grid sizes (image / patch_size). Indices are over merged (2x2) tokens:
    ``window_idx[raster] = window-order position`` and ``inv_window_idx[window-order] = raster``
    (so inv_window_idx is what HF calls ``window_index``). mask is [n, n] boolean over ViT rows in
    window order (True = may attend).
    """
    pw, ph = nx // merge, ny // merge
    grid = window_size // patch_size // merge
    idx = np.zeros(ph * pw, dtype=np.int64)
    inv = np.zeros(ph * pw, dtype=np.int64)
    n = nx * ny
    mpow = merge * merge
    mask = np.zeros((n, n), dtype=bool)
    dst = 0
    mask_row = 0
    for y in range(0, ph, grid):
        for x in range(0, pw, grid):
            win_h, win_w = min(grid, ph - y), min(grid, pw - x)
            dst0 = dst
            for dy in range(win_h):
                for dx in range(win_w):
                    src = (y + dy) * pw + (x + dx)
                    idx[src] = dst
                    inv[dst] = src
                    dst += 1
            for _ in range(win_h * win_w * mpow):
                mask[mask_row, dst0 * mpow: dst * mpow] = True
                mask_row += 1
    return idx, inv, mask


def qwen25vl_positions(nx: int, ny: int, window_idx: np.ndarray, merge: int = 2) -> np.ndarray:
    """[4, n] M-RoPE positions (y, x, y, x) per ViT row in window order, as clip.cpp sets "positions"."""
    n = nx * ny
    mpow = merge * merge
    pos = np.zeros((4, n), dtype=np.int64)
    ptr = 0
    for y in range(0, ny, merge):
        for x in range(0, nx, merge):
            for dy in range(2):
                for dx in range(2):
                    remap = window_idx[ptr // mpow] * mpow + ptr % mpow
                    pos[:, remap] = (y + dy, x + dx, y + dy, x + dx)
                    ptr += 1
    return pos


def _rope_vision(x: np.ndarray, pos: np.ndarray, theta: float = ROPE_THETA) -> np.ndarray:
    """ggml_rope_multi(..., n_dims = d_head/2, sections = [d/4]*4, GGML_ROPE_TYPE_VISION) on [n, n_head, d].

    ggml-cpu: pair k (k < d/2) rotates (x[k], x[k + d/2]); theta_scale = base^(-2/n_dims); pairs
    k < d/4 use position component 0 (= y) with angle y * theta_scale^k, pairs d/4 <= k < d/2 use
    component 1 (= x) with angle x * theta_scale^(k - d/4) (independent sections: theta restarts).
    """
    d = x.shape[-1]
    n_dims = d // 2
    sec = d // 4
    theta_scale = float(np.float32(theta) ** np.float32(-2.0 / n_dims))
    k = np.arange(d // 2)
    expo = np.where(k < sec, k, k - sec).astype(np.float64)
    comp = np.where(k < sec, 0, 1)
    p = pos[comp, :].T.astype(np.float64)  # [n, d/2]
    ang = p * theta_scale ** expo[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)


def _qwen_grid_ok(w: int, h: int, hp: dict[str, Any]) -> bool:
    align = hp["patch_size"] * 2
    px = w * h
    area = align * align
    return w % align == 0 and h % align == 0 and QWEN25VL_MIN_TOKENS * area <= px <= QWEN25VL_MAX_TOKENS * area


def qwen25vl_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run the qwen2vl.cpp graph (qwen2.5vl_merger), or exaone4_5.cpp's (the same with a fused grouped-query QKV),
    on an image for which mtmd's smart resize is a no-op
    (both sides multiples of 2*patch_size and 8..4096 merged tokens, e.g. 224x224 with patch 14).

    Returns a dict with:
      keys:           per layer, K after projection + bias, [n_patches, n_head, d_head], ViT row order
                      (window-grouped, 2x2 merge groups contiguous)
      keys_rope:      per layer, K after the vision M-RoPE, same layout
      window_idx:     clip.cpp "window_idx" [n_tokens] (raster merged token -> window-order position)
      inv_window_idx: clip.cpp "inv_window_idx" (window-order position -> raster merged token; HF window_index)
      positions:      [4, n_patches] rope positions (y, x, y, x) per ViT row
      full_attn:      per layer, whether it used full attention
      embeddings:     [n_tokens, proj_dim] LLM embeddings in LLM (raster merged) token order
      grid:           (nx, ny) merged-token grid
    """
    weights, hp = load_mmproj(path)
    if hp["projector_type"] not in ("qwen2.5vl_merger", "exaone4_5"):
        raise ValueError(f"qwen25vl_forward supports 'qwen2.5vl_merger' and 'exaone4_5', got {hp['projector_type']!r}")
    if hp["n_merge"] != 2:
        raise ValueError("clip.cpp hard-codes a 2x2 merge for qwen2.5vl")
    W = _W(weights)
    img = np.asarray(image_rgb)
    h, w = img.shape[:2]
    if not _qwen_grid_ok(w, h, hp):
        raise ValueError(f"{w}x{h} would be resized by mtmd (smart resize is not mirrored)")
    eps, n_head, d_head, e_dim = hp["eps"], hp["n_head"], hp["d_head"], hp["n_embd"]
    p = hp["patch_size"]
    if W.get("v.patch_embd.bias") is not None:
        raise ValueError("qwen2vl.cpp asserts patch_bias == nullptr")

    px = _pixels(img, hp)
    conv = _patch_conv(px, W.req("v.patch_embd.weight"), p) + _patch_conv(px, W.req("v.patch_embd.weight.1"), p)
    ny, nx = conv.shape[:2]
    n = nx * ny
    # second conv dimension: rows ordered (y/2, x/2, dy, dx)
    x = conv.reshape(ny // 2, 2, nx // 2, 2, e_dim).transpose(0, 2, 1, 3, 4).reshape(n, e_dim)

    pre_w = W.get("v.pre_ln.weight")
    if pre_w is not None:
        x = _rms_norm(x, pre_w, W.get("v.pre_ln.bias"), eps)

    use_wa = hp["n_wa_pattern"] > 0
    if use_wa:
        widx, inv, mask = qwen25vl_window_index(nx, ny, p)
        x = x.reshape(n // 4, 4 * e_dim)[inv].reshape(n, e_dim)  # get_rows(inv_window_idx)
    else:
        widx = inv = np.arange(n // 4)
        mask = None
    pos = qwen25vl_positions(nx, ny, widx)

    keys, keys_rope, full = [], [], []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        full_attn = (il + 1) % hp["n_wa_pattern"] == 0 if use_wa else True
        full.append(full_attn)
        cur = _rms_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps)
        if W.get(f"{b}.attn_qkv.weight") is not None:  # exaone4_5: one projection, Q then K then V (n_kv heads each)
            qkv = _linear(cur, W.req(f"{b}.attn_qkv.weight"), W.get(f"{b}.attn_qkv.bias"))
            kv_dim = (qkv.shape[1] - e_dim) // 2
            q = qkv[:, :e_dim].reshape(n, n_head, d_head)
            k = qkv[:, e_dim:e_dim + kv_dim].reshape(n, kv_dim // d_head, d_head)
            v = qkv[:, e_dim + kv_dim:].reshape(n, kv_dim // d_head, d_head)
        else:
            q = _linear(cur, W.req(f"{b}.attn_q.weight"), W.req(f"{b}.attn_q.bias")).reshape(n, n_head, d_head)
            k = _linear(cur, W.req(f"{b}.attn_k.weight"), W.req(f"{b}.attn_k.bias")).reshape(n, n_head, d_head)
            v = _linear(cur, W.req(f"{b}.attn_v.weight"), W.req(f"{b}.attn_v.bias")).reshape(n, n_head, d_head)
        keys.append(k)
        q, k = _rope_vision(q, pos), _rope_vision(k, pos)
        keys_rope.append(k)
        group = n_head // k.shape[1]  # ggml_mul_mat broadcasts key head h // group to query head h
        attn = _attention(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1), None if full_attn else mask)
        x = x + _linear(attn, W.req(f"{b}.attn_out.weight"), W.get(f"{b}.attn_out.bias"))
        cur = _rms_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        x = x + _ffn(cur, W, il, hp, act)

    post_w = W.get("v.post_ln.weight")
    if post_w is not None:
        x = _rms_norm(x, post_w, W.get("v.post_ln.bias"), eps)
    hidden = x
    m = x.reshape(n // 4, 4 * e_dim)
    m = gelu(_linear(m, W.req("mm.0.weight"), W.req("mm.0.bias")), act)  # build_ffn(..., FFN_GELU)
    m = _linear(m, W.req("mm.2.weight"), W.req("mm.2.bias"))
    if use_wa:
        m = m[widx]  # get_rows(window_idx): back to raster merged-token order
    return {
        "keys": keys,
        "keys_rope": keys_rope,
        "window_idx": widx,
        "inv_window_idx": inv,
        "window_mask": mask,
        "positions": pos,
        "full_attn": full,
        "layers_run": hp["n_layer"],
        "embeddings": m,
        "hidden": hidden,
        "grid": (nx // 2, ny // 2),
        "hparams": hp,
    }
