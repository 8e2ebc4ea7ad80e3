"""Numpy re-implementation of llama.cpp's MiniMax-M3 vision graph (tools/mtmd/models/minimax-m3.cpp) up to the last
block's keys, from the mmproj GGUF weights: an independent oracle for the keys the capture reads (`Kcur_pos`). Its
RoPE (apply_rope): of each head's d channels, axd = 2 * ((2 * (d / 2) / 3) / 2) per axis; channels [axd, 2 axd)
rotate NEOX-style by the patch's row, [2 axd, 3 axd) by its column (ggml_rope_ext at an offset set by
ggml_rope_set_offset, theta 10000), the rest unrotated. Covers images mtmd's resize leaves alone."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from tests.reference_qwen3vl import _merge_order
from tests.reference_vit import (_W, _attn_out, _layer_norm, _linear, _patch_conv, _pixels, _qkv, _qwen_grid_ok,
                                 load_mmproj)

ROPE_THETA = 10000.0


def rope_neox_at(x: np.ndarray, pos: np.ndarray, offset: int, n_dims: int, theta: float = ROPE_THETA) -> np.ndarray:
    """ggml_rope_ext(NEOX, n_dims) applied to channels [offset, offset + n_dims) of [n, n_head, d]: channel pair
    (offset + j, offset + j + n_dims / 2) turns by pos * theta^(-2 j / n_dims); other channels unchanged."""
    half = n_dims // 2
    ang = pos.astype(np.float64)[:, None] * float(theta) ** (-2.0 * np.arange(half) / n_dims)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    x0, x1 = x[..., offset:offset + half], x[..., offset + half:offset + n_dims]
    out[..., offset:offset + half] = x0 * cos - x1 * sin
    out[..., offset + half:offset + n_dims] = x0 * sin + x1 * cos
    return out


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    """ggml_gelu_erf (f32): 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def minimax_m3_forward(path: str | os.PathLike, image_rgb: np.ndarray) -> dict[str, Any]:
    """Run minimax-m3.cpp's ViT on an image; returns per-layer post-RoPE keys ([n_patches, n_head, d_head], rows in
    2x2 merge order) and the merged token grid."""
    weights, hp = load_mmproj(path)
    if hp["projector_type"] != "minimax_m3":
        raise ValueError(f"minimax_m3_forward supports 'minimax_m3', got {hp['projector_type']!r}")
    W = _W(weights)
    img = np.asarray(image_rgb)
    if not _qwen_grid_ok(img.shape[1], img.shape[0], hp):
        raise ValueError("mtmd would resize this image (its resize is not mirrored)")
    p, eps, d = hp["patch_size"], hp["eps"], hp["d_head"]
    px = _pixels(img, hp)
    conv = _patch_conv(px, W.req("v.patch_embd.weight"), p) + _patch_conv(px, W.req("v.patch_embd.weight.1"), p)
    ny, nx = conv.shape[:2]
    n = nx * ny
    x = _merge_order(conv, nx, ny)
    unit, k = np.divmod(np.arange(n), 4)  # clip.cpp: rows (bh, bw, mh, mw) -> (bh * 2 + mh, bw * 2 + mw)
    pos_h = (unit // (nx // 2)) * 2 + k // 2
    pos_w = (unit % (nx // 2)) * 2 + k % 2
    axd = 2 * ((2 * (d // 2) // 3) // 2)
    keys_rope = []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        q, k_, v = _qkv(_layer_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps), W, b, hp)
        q, k_ = (rope_neox_at(rope_neox_at(t, pos_h, axd, axd), pos_w, 2 * axd, axd) for t in (q, k_))
        keys_rope.append(k_)
        x = x + _attn_out(q, k_, v, W, b)
        cur = _layer_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        h = _gelu_erf(_linear(cur, W.req(f"{b}.ffn_up.weight"), W.get(f"{b}.ffn_up.bias")))
        x = x + _linear(h, W.req(f"{b}.ffn_down.weight"), W.get(f"{b}.ffn_down.bias"))
    return {"keys_rope": keys_rope, "grid": (nx // 2, ny // 2), "axd": axd, "hparams": hp}
