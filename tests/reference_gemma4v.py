"""Independent numpy oracle of the Gemma 4 vision encoder mtmd runs (projector_type ``gemma4v``), from the mmproj
GGUF weights only (numpy + gguf, no llama.cpp).

Mirrors ``tools/mtmd/models/gemma4v.cpp`` and ``clip_graph::build_vit`` (clip.cpp):

* ``inp_raw * 2 - 1``, then ``ggml_conv_2d`` with stride = patch size (F16 im2col, reference_vit._patch_conv),
  no bias; patch (x, y) is row ``y * Px + x``;
* position embeddings: ``v.position_embd.weight`` is [2, pos_size, n_embd] (x table, y table); row
  ``y * Px + x`` adds ``tbl_x[x] + tbl_y[y]``;
* blocks (NORM_TYPE_RMS): RMSNorm ln1; q / k / v through Gemma4ClippableLinear (input clamped to
  ``<w>.input_min/max``, output to ``<w>.output_min/max`` where those scalars exist); per-head RMSNorm with
  ``attn_q_norm`` / ``attn_k_norm``; 2-D NEOX RoPE, theta 100: dims [0, d/2) rotated by x (pairs i, i + d/4),
  dims [d/2, d) by y (ggml_rope_set_offset) -> ``Kcur_pos``; V RMS-normed without weight; softmax(QK^T) V
  with kq_scale 1; attn_out; attn_post_norm; residual; ln2; GEGLU (gelu(gate) * up) -> down; ffn_post_norm;
  residual; times ``out_scale``;
* pooler: the [Px*Py, n_embd] output as a Px x Py image, ``ggml_pool_2d`` AVG kernel = stride = k -> token
  ``by * (Px/k) + bx``; * sqrt(n_embd); optional (x - std_bias) * std_scale; RMSNorm; input projection.

Only images mtmd's dyn-size preprocessor leaves unchanged are accepted (both sides multiples of patch_size * k,
70..1120 tokens).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from tests.reference_vit import _W, _f16, _pixels, _rms_norm, avg_pool_rows, gelu, load_mmproj, read_scale_factor

__all__ = ["gemma4v_forward", "rope_2d_neox"]

ROPE_THETA = 100.0  # clip.cpp: hparams.rope_theta = 100 for PROJECTOR_TYPE_GEMMA4V
DEFAULT_POOL = 3
MIN_TOKENS, MAX_TOKENS = 70, 1120


def _clippable(x: np.ndarray, W: _W, name: str) -> np.ndarray:
    """Gemma4ClippableLinear: clamp(x) @ w.T, then clamp the output (bounds default to +-inf)."""
    def bound(suffix: str, default: float) -> float:
        a = W.get(name.replace(".weight", suffix))
        return float(a.reshape(-1)[0]) if a is not None else default
    x = np.clip(x, bound(".input_min", -np.inf), bound(".input_max", np.inf))
    y = x @ W.req(name).T
    return np.clip(y, bound(".output_min", -np.inf), bound(".output_max", np.inf))


def _neox_half(x: np.ndarray, pos: np.ndarray, offset: int, n_dims: int, theta: float) -> np.ndarray:
    """ggml_rope_ext NEOX on dims [offset, offset + n_dims) of x [n, H, D]: pairs (i, i + n_dims/2)."""
    out = x.copy()
    half = n_dims // 2
    inv = np.float32(theta) ** (-2.0 * np.arange(half, dtype=np.float64) / n_dims)
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # [n, half]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a = x[..., offset:offset + half]
    b = x[..., offset + half:offset + n_dims]
    out[..., offset:offset + half] = a * c - b * s
    out[..., offset + half:offset + n_dims] = a * s + b * c
    return out


def rope_2d_neox(x: np.ndarray, pos_x: np.ndarray, pos_y: np.ndarray, theta: float = ROPE_THETA) -> np.ndarray:
    """gemma4v.cpp add_pos: x positions on the first half of each head, y positions on the second."""
    d = x.shape[-1]
    return _neox_half(_neox_half(x, pos_x, 0, d // 2, theta), pos_y, d // 2, d // 2, theta)


def _attention_scale1(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = np.einsum("qhd,khd->hqk", q, k)  # kq_scale = 1.0
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", p, v)
    return out.reshape(out.shape[0], -1)


def gemma4v_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run the gemma4v graph on a uint8 RGB image whose sides are multiples of patch_size * k.

    Returns: keys / keys_pos (per block, [Px*Py, n_head, d_head], before / after the RoPE), layers_run,
    grid (Px, Py), pool k, hidden [Px*Py, n_embd], embeddings [(Px/k)*(Py/k), proj_dim]."""
    weights, hp = load_mmproj(path)
    if hp["projector_type"] != "gemma4v":
        raise ValueError(f"gemma4v_forward supports projector_type 'gemma4v', got {hp['projector_type']!r}")
    W = _W(weights)
    p, k_pool = hp["patch_size"], read_scale_factor(path, DEFAULT_POOL)
    img = np.asarray(image_rgb)
    h, w = img.shape[:2]
    a = p * k_pool
    if w % a or h % a or not MIN_TOKENS <= (w // a) * (h // a) <= MAX_TOKENS:
        raise ValueError(f"{w}x{h} would be resized by mtmd (its dyn-size resize is not mirrored)")
    eps, n_head, d_head, n_embd = hp["eps"], hp["n_head"], hp["d_head"], hp["n_embd"]

    px = _pixels(img, hp) * 2.0 - 1.0  # ggml_scale_bias(inp_raw, 2, -1), in f32
    px = px.astype(np.float32).astype(np.float64)
    kernel = _f16(W.req("v.patch_embd.weight"))
    c, ny_px, nx_px = px.shape
    gy, gx = ny_px // p, nx_px // p
    cols = _f16(px).reshape(c, gy, p, gx, p).transpose(1, 3, 0, 2, 4).reshape(gy * gx, c * p * p)
    x = cols @ kernel.reshape(kernel.shape[0], -1).T  # [Px*Py, n_embd], row y*Px + x
    n = gx * gy
    pos_x = np.arange(n) % gx
    pos_y = np.arange(n) // gx
    tbl = W.req("v.position_embd.weight")  # [2, pos_size, n_embd]
    x = x + tbl[0][pos_x] + tbl[1][pos_y]

    keys, keys_pos = [], []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        cur = _rms_norm(x, W.get(f"{b}.ln1.weight"), None, eps)
        q = _clippable(cur, W, f"{b}.attn_q.weight").reshape(n, n_head, d_head)
        k = _clippable(cur, W, f"{b}.attn_k.weight").reshape(n, n_head, d_head)
        v = _clippable(cur, W, f"{b}.attn_v.weight").reshape(n, n_head, d_head)
        if W.get(f"{b}.attn_q_norm.weight") is not None:
            q = _rms_norm(q, W.get(f"{b}.attn_q_norm.weight"), None, eps)
        if W.get(f"{b}.attn_k_norm.weight") is not None:
            k = _rms_norm(k, W.get(f"{b}.attn_k_norm.weight"), None, eps)
        keys.append(k)
        q, k = rope_2d_neox(q, pos_x, pos_y), rope_2d_neox(k, pos_x, pos_y)
        keys_pos.append(k)
        v = _rms_norm(v, None, None, eps)
        attn = _clippable(_attention_scale1(q, k, v), W, f"{b}.attn_out.weight")
        if W.get(f"{b}.attn_post_norm.weight") is not None:
            attn = _rms_norm(attn, W.get(f"{b}.attn_post_norm.weight"), None, eps)
        x = x + attn
        cur = _rms_norm(x, W.get(f"{b}.ln2.weight"), None, eps)
        up = _clippable(cur, W, f"{b}.ffn_up.weight")
        gate = _clippable(cur, W, f"{b}.ffn_gate.weight")
        ff = _clippable(gelu(gate, act) * up, W, f"{b}.ffn_down.weight")
        if W.get(f"{b}.ffn_post_norm.weight") is not None:
            ff = _rms_norm(ff, W.get(f"{b}.ffn_post_norm.weight"), None, eps)
        x = x + ff
        scale = W.get(f"{b}.out_scale.weight")
        if scale is not None:
            x = x * scale
    e = avg_pool_rows(x, gx, gy, k_pool) * math.sqrt(n_embd)
    if W.get("v.std_bias") is not None and W.get("v.std_scale") is not None:
        e = (e - W.get("v.std_bias")) * W.get("v.std_scale")
    e = _clippable(_rms_norm(e, None, None, eps), W, "mm.input_projection.weight")
    return {"keys": keys, "keys_pos": keys_pos, "layers_run": hp["n_layer"], "grid": (gx, gy), "pool": k_pool,
            "hidden": x, "embeddings": e, "hparams": hp}
