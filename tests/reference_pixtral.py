"""Independent numpy oracle of llama.cpp's pixtral / lightonocr vision graph (tools/mtmd/models/pixtral.cpp),
from the mmproj GGUF weights (numpy + gguf only, no llama.cpp).

What it mirrors, by source line of the vendored llama.cpp:

* ``clip_graph::build_inp`` (clip.cpp ~572): ggml_conv_2d patch embedding (f16 im2col, as in
  tests/reference_vit.py), rows in raster order ``i = y * n_patches_x + x``; optional patch bias.
* ``clip_graph::build_vit`` (clip.cpp ~337-565) with ``NORM_TYPE_RMS``, no learned position embedding:
  RMS pre-norm, per block RMS ln1 -> separate q / k / v (+ optional biases) -> 2-D RoPE on Q and K
  (``add_pos`` = ``build_rope_2d(pos_h, pos_w, rope_theta = 10000, interleave_freq = true)``; the roped keys
  are named ``Kcur_pos-<il>``) -> softmax attention (scale 1/sqrt(d_head), no mask) -> out proj, residual,
  RMS ln2 -> SiLU-gated FFN, residual; optional post-norm.
* ``build_rope_2d`` (clip.cpp ~824): two GGML_ROPE_TYPE_NORMAL ropes (adjacent pairs) of n_dims = d/2 each,
  theta_scale = base^(-2 / (d/2)); dims [0, d/2) rotate by pos_h (= i / n_patches_x, clip.cpp ~5974), dims
  [d/2, d) (ggml_rope_set_offset) by pos_w (= i % n_patches_x) with freq_scale = base^(-2/d).
* pixtral.cpp patch merger (Mistral-Small-3.1): RMS norm * mm.input_norm, m x m unfold (ggml_im2col, channel-major
  (c, ky, kx) per token, tokens row-major), mm.patch_merger; then mm.1 -> GELU -> mm.2; then the [IMG_BREAK]
  embedding after every token row but the last.

Public API::

    read_pixtral_hparams(path) -> dict
    pixtral_forward(path, image_rgb, *, act="ggml") -> dict
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

import gguf

from tests.reference_vit import (_W, _attn_out, _ffn, _linear, _patch_conv, _pixels, _qkv, _rms_norm, gelu,
                                 load_mmproj_weights, read_hparams)

__all__ = ["read_pixtral_hparams", "pixtral_forward", "rope_2d"]

ROPE_THETA = 10000.0  # clip.cpp PROJECTOR_TYPE_PIXTRAL / LIGHTONOCR: hparams.rope_theta = 10000


def read_pixtral_hparams(path: str | os.PathLike) -> dict[str, Any]:
    """read_hparams plus clip.cpp's pixtral defaults: n_merge = spatial_merge_size or 1 (not 2)."""
    hp = read_hparams(path)
    reader = gguf.GGUFReader(os.fspath(path))
    f = reader.fields.get("clip.vision.spatial_merge_size")
    hp["n_merge"] = int(f.contents()) if f is not None else 1
    return hp


def rope_2d(x: np.ndarray, pos_h: np.ndarray, pos_w: np.ndarray, theta: float = ROPE_THETA,
            interleave_freq: bool = True) -> np.ndarray:
    """build_rope_2d on [n, n_head, d]: pairs (2i, 2i+1) of the first half rotate by pos_h * s^i, pairs of the
    second half by pos_w * base^(-2/d) * s^i (by pos_w * s^i without interleave_freq), s = base^(-2/(d/2))
    (ggml-cpu rotate_pairs, NORMAL mode)."""
    d = x.shape[-1]
    half = d // 2
    s = float(theta) ** (-2.0 / half)
    i = np.arange(half // 2, dtype=np.float64)
    out = x.copy()
    odd = float(theta) ** (-2.0 / d) if interleave_freq else 1.0
    for offset, pos, fscale in ((0, pos_h, 1.0), (half, pos_w, odd)):
        ang = pos.astype(np.float64)[:, None] * fscale * s ** i[None, :]  # [n, half/2]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0 = x[..., offset: offset + half: 2]
        x1 = x[..., offset + 1: offset + half: 2]
        out[..., offset: offset + half: 2] = x0 * cos - x1 * sin
        out[..., offset + 1: offset + half: 2] = x0 * sin + x1 * cos
    return out


def pixtral_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run the pixtral.cpp graph on an image mtmd would not resize (both sides multiples of patch * merge,
    within the token limits). Returns a dict with:

      keys:        per block, K after projection (+ bias), [n_patches, n_head, d_head], raster patch order
      keys_pos:    per block, K after the 2-D RoPE (what the graph names Kcur_pos-<il>)
      grid:        (n_patches_x, n_patches_y)
      n_merge:     m
      embeddings:  [n_tokens, proj_dim] LLM embeddings, [IMG_BREAK] rows included (pixtral)
      layers_run:  blocks run (all of them)
    """
    weights, hp = load_mmproj_weights(path), read_pixtral_hparams(path)
    if hp["projector_type"] not in ("pixtral", "lightonocr"):
        raise ValueError(f"pixtral_forward supports pixtral / lightonocr, got {hp['projector_type']!r}")
    W = _W(weights)
    img = np.asarray(image_rgb)
    p, m = hp["patch_size"], hp["n_merge"]
    h, w = img.shape[:2]
    if w % (p * m) or h % (p * m):
        raise ValueError(f"{w}x{h} would be resized by mtmd (not mirrored): sides must be multiples of {p * m}")
    eps, e_dim = hp["eps"], hp["n_embd"]

    conv = _patch_conv(_pixels(img, hp), W.req("v.patch_embd.weight"), p)  # [gy, gx, e]
    gy, gx = conv.shape[:2]
    n = gx * gy
    x = conv.reshape(n, e_dim)
    if W.get("v.patch_bias") is not None:  # pragma: no cover - pixtral has none
        x = x + W.get("v.patch_bias")
    if W.get("v.pre_ln.weight") is not None:
        x = _rms_norm(x, W.get("v.pre_ln.weight"), W.get("v.pre_ln.bias"), eps)
    idx = np.arange(n)
    pos_h, pos_w = idx // gx, idx % gx

    keys, keys_pos = [], []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        q, k, v = _qkv(_rms_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps), W, b, hp)
        keys.append(k)
        q, k = rope_2d(q, pos_h, pos_w), rope_2d(k, pos_h, pos_w)
        keys_pos.append(k)
        x = x + _attn_out(q, k, v, W, b)
        cur = _rms_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        x = x + _ffn(cur, W, il, hp, act)
    if W.get("v.post_ln.weight") is not None:
        x = _rms_norm(x, W.get("v.post_ln.weight"), W.get("v.post_ln.bias"), eps)

    px_, py_ = gx, gy
    if W.get("mm.patch_merger.weight") is not None:
        cur = _rms_norm(x, W.req("mm.input_norm.weight"), None, eps).reshape(gy, gx, e_dim)
        px_, py_ = gx // m, gy // m
        rows = []
        for oy in range(py_):
            for ox in range(px_):
                blk = cur[oy * m:(oy + 1) * m, ox * m:(ox + 1) * m, :]  # [ky, kx, c]
                rows.append(blk.transpose(2, 0, 1).reshape(-1))  # im2col: (c, ky, kx)
        x = _linear(np.stack(rows), W.req("mm.patch_merger.weight"), None)
    e = gelu(_linear(x, W.req("mm.1.weight"), W.get("mm.1.bias")), act)
    e = _linear(e, W.req("mm.2.weight"), W.get("mm.2.bias"))
    brk = W.get("v.token_embd.img_break")
    if brk is not None:
        out = []
        for r in range(py_):
            out.extend(e[r * px_:(r + 1) * px_])
            if r < py_ - 1:
                out.append(brk)
        e = np.stack(out)
    return {"keys": keys, "keys_pos": keys_pos, "grid": (gx, gy), "n_merge": m, "token_rows": (px_, py_),
            "embeddings": e, "layers_run": hp["n_layer"], "hparams": hp}
