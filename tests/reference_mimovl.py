"""Numpy re-implementation of llama.cpp's MiMo-VL vision graph (tools/mtmd/models/mimovl.cpp) up to the last block's
keys, from the mmproj GGUF weights: an independent oracle for the keys the capture reads. Each block runs on the
2x2 units in row order, or in column order for a column window (wa_pattern_mode 1), with full attention (-1) or a
banded window over the rows (radius clip.vision.window_size) plus per-head attention sinks; the fused, biased QKV
has n_head_kv key heads (grouped-query attention).

Covers images mtmd's resize leaves alone (sides multiples of 28 px within the token limits)."""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from tests.reference_qwen3vl import _merge_order
from tests.reference_vit import (_W, _ffn, _linear, _patch_conv, _pixels, _qwen_grid_ok, _rms_norm, _rope_vision,
                                 load_mmproj)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray | None,
               sinks: np.ndarray | None) -> np.ndarray:
    """softmax(scale * q.k + mask) v with key heads broadcast to query heads (head h uses key head h // group), and
    each head's sink logit added to the softmax's denominator (ggml_soft_max_add_sinks)."""
    n_head, group = q.shape[1], q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = float(np.float32(1.0) / np.sqrt(np.float32(q.shape[-1])))
    s = np.einsum("qhd,khd->hqk", q, k) * scale
    if allowed is not None:
        s = np.where(allowed[None], s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        top = np.maximum(top, sinks.reshape(n_head, 1, 1))
    p = np.exp(s - top)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(sinks.reshape(n_head, 1, 1) - top)
    out = np.einsum("hqk,khd->qhd", p / denom, v)
    return out.reshape(out.shape[0], -1)


def column_unit_order(llm_w: int, llm_h: int) -> np.ndarray:
    """mimovl's idx_col: position u_col = c * llm_h + r of the column order holds row-order unit r * llm_w + c."""
    idx = np.zeros(llm_w * llm_h, dtype=np.int64)
    for r in range(llm_h):
        for c in range(llm_w):
            idx[c * llm_h + r] = r * llm_w + c
    return idx


def mimovl_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run mimovl.cpp's ViT on an image; returns per-layer post-RoPE keys ([n_patches, n_head_kv, d_head], rows
    in that block's unit order), the block modes and the merged token grid."""
    weights, hp = load_mmproj(path)
    if hp["projector_type"] != "mimovl":
        raise ValueError(f"mimovl_forward supports 'mimovl', got {hp['projector_type']!r}")
    kv = {k: f.contents() for k, f in gguf.GGUFReader(os.fspath(path)).fields.items() if k.startswith("clip.")}
    modes = [int(m) for m in kv["clip.vision.wa_pattern_mode"]]
    radius = int(kv["clip.vision.window_size"])
    n_head, n_kv = hp["n_head"], int(kv["clip.vision.attention.head_count_kv"])
    W = _W(weights)
    img = np.asarray(image_rgb)
    h, w = img.shape[:2]
    if not _qwen_grid_ok(w, h, hp):
        raise ValueError(f"{w}x{h} would be resized by mtmd (its resize is not mirrored)")
    p, e_dim, eps = hp["patch_size"], hp["n_embd"], hp["eps"]
    px = _pixels(img, hp)
    conv = _patch_conv(px, W.req("v.patch_embd.weight"), p) + _patch_conv(px, W.req("v.patch_embd.weight.1"), p)
    ny, nx = conv.shape[:2]
    n, llm_w, llm_h = nx * ny, nx // 2, ny // 2
    x = _merge_order(conv, nx, ny)
    ys, xs = np.divmod(np.arange(n) // 4, llm_w)  # unit (row, column) of each row, then its 2x2 offset
    pos_row = np.zeros((4, n), dtype=np.int64)
    pos_row[0] = ys * 2 + (np.arange(n) % 4) // 2
    pos_row[1] = xs * 2 + np.arange(n) % 2
    col = column_unit_order(llm_w, llm_h)
    to_col = (col[:, None] * 4 + np.arange(4)[None]).reshape(-1)  # row-order row -> column-order position
    pos_col = pos_row[:, to_col]
    band = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= radius
    keys_rope, prev = [], -1
    for il, mode in enumerate(modes):
        b = f"v.blk.{il}"
        if mode == 1 and prev != 1:
            x = x[to_col]
        elif mode != 1 and prev == 1:
            x = x[np.argsort(to_col)]
        cur = _rms_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps)
        qkv = _linear(cur, W.req(f"{b}.attn_qkv.weight"), W.req(f"{b}.attn_qkv.bias"))
        d_head = qkv.shape[1] // (n_head + 2 * n_kv)
        q = qkv[:, :n_head * d_head].reshape(n, n_head, d_head)
        k = qkv[:, n_head * d_head:(n_head + n_kv) * d_head].reshape(n, n_kv, d_head)
        v = qkv[:, (n_head + n_kv) * d_head:].reshape(n, n_kv, d_head)
        pos = pos_col if mode == 1 else pos_row
        q, k = _rope_vision(q, pos), _rope_vision(k, pos)
        keys_rope.append(k)
        full = mode == -1
        attn = _attention(q, k, v, None if full else band, None if full else W.req(f"{b}.attn_sinks"))
        x = x + _linear(attn, W.req(f"{b}.attn_out.weight"), W.get(f"{b}.attn_out.bias"))
        cur = _rms_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        x = x + _ffn(cur, W, il, hp, act)
        prev = mode
    return {"keys_rope": keys_rope, "modes": modes, "grid": (llm_w, llm_h), "to_col": to_col, "hparams": hp}
