"""Numpy re-implementation of llama.cpp's Qwen3-VL vision graph (tools/mtmd/models/qwen3vl.cpp; Ling-3-VL's
ling3vl.cpp runs the same tower) from the mmproj GGUF weights: an independent oracle for the keys the capture
reads (which, in that graph, come out of one fused QKV projection as strided views).

Covers images mtmd's smart resize leaves alone and whose patch grid equals the learned position table's
side (no bilinear interpolation of the position embeddings), e.g. 224 x 224 with patch 14 on the fixture.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tests.reference_vit import (_W, _attn_out, _ffn, _layer_norm, _linear, _patch_conv, _pixels, _qwen_grid_ok,
                                 _rope_vision, load_mmproj, qwen25vl_positions)


def _merge_order(x: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """[ny, nx, e] patches -> rows ordered (y/2, x/2, dy, dx): qwen3vl.cpp's "spatial merge" permute."""
    e = x.shape[-1]
    return x.reshape(ny // 2, 2, nx // 2, 2, e).transpose(0, 2, 1, 3, 4).reshape(nx * ny, e)


def merger_tower_input(path: str | os.PathLike, image_rgb: np.ndarray, projector_types: tuple[str, ...]
                       ) -> tuple[_W, dict[str, Any], np.ndarray, np.ndarray, int, int]:
    """What the Qwen3-VL and GLM-4V graphs share before their blocks: the weights and hparams of an mmproj of one
    of `projector_types`, the two temporal patch convs summed ([ny, nx, e]) and the learned position table
    ([n, e], same grid: interpolation is not mirrored), with the patch grid (nx, ny)."""
    weights, hp = load_mmproj(path)
    if hp["projector_type"] not in projector_types:
        raise ValueError(f"this reference supports {projector_types}, got {hp['projector_type']!r}")
    W = _W(weights)
    img = np.asarray(image_rgb)
    h, w = img.shape[:2]
    if not _qwen_grid_ok(w, h, hp):
        raise ValueError(f"{w}x{h} would be resized by mtmd (its resize is not mirrored)")
    p = hp["patch_size"]
    px = _pixels(img, hp)
    conv = _patch_conv(px, W.req("v.patch_embd.weight"), p) + _patch_conv(px, W.req("v.patch_embd.weight.1"), p)
    ny, nx = conv.shape[:2]
    pos_embd = W.req("v.position_embd.weight")
    side = int(round(np.sqrt(pos_embd.shape[0])))
    if (nx, ny) != (side, side):
        raise ValueError("position-embedding interpolation is not mirrored: use an image of the table's size")
    return W, hp, conv, pos_embd, nx, ny


def fused_qkv_rope_blocks(x: np.ndarray, W: _W, hp: dict[str, Any], nx: int, ny: int, norm: Any, act: str,
                          ffn: Any = _ffn) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """build_vit's blocks as Qwen3-VL and GLM-4V run them: `norm` (LayerNorm or RMSNorm) -> one fused QKV
    projection (K is the middle third) -> 2-D vision M-RoPE on q and k (no windows) -> attention, residual; `norm` ->
    `ffn(cur, W, il, hp, act)`, residual. Returns the keys before and after RoPE per block and the positions."""
    e_dim, n_head, d_head, eps = hp["n_embd"], hp["n_head"], hp["d_head"], hp["eps"]
    n = nx * ny
    pos = qwen25vl_positions(nx, ny, np.arange(n // 4))  # no windows: identity block order
    keys, keys_rope = [], []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        cur = norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps)
        qkv = _linear(cur, W.req(f"{b}.attn_qkv.weight"), W.get(f"{b}.attn_qkv.bias"))
        q = qkv[:, :e_dim].reshape(n, n_head, d_head)
        k = qkv[:, e_dim:2 * e_dim].reshape(n, n_head, d_head)
        v = qkv[:, 2 * e_dim:].reshape(n, n_head, d_head)
        keys.append(k)
        q, k = _rope_vision(q, pos), _rope_vision(k, pos)
        keys_rope.append(k)
        x = x + _attn_out(q, k, v, W, b)
        cur = norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        x = x + ffn(cur, W, il, hp, act)
    return keys, keys_rope, pos


def qwen3vl_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run the qwen3vl.cpp graph on an image; returns per-layer keys before and after the vision M-RoPE
    ([n_patches, n_head, d_head], ViT row order: 2x2 merge groups contiguous, blocks row-major), the merged
    grid and the LLM embeddings (main merger only, deepstack slices not mirrored)."""
    W, hp, conv, pos_embd, nx, ny = merger_tower_input(path, image_rgb, ("qwen3vl_merger", "ling3vl"))
    e_dim, eps = hp["n_embd"], hp["eps"]
    x = _merge_order(conv, nx, ny) + W.req("v.patch_embd.bias")
    x = x + _merge_order(pos_embd.reshape(ny, nx, e_dim), nx, ny)
    pre_w = W.get("v.pre_ln.weight")
    if pre_w is not None:
        x = _layer_norm(x, pre_w, W.get("v.pre_ln.bias"), eps)
    keys, keys_rope, pos = fused_qkv_rope_blocks(x, W, hp, nx, ny, _layer_norm, act)
    return {"keys": keys, "keys_rope": keys_rope, "grid": (nx // 2, ny // 2), "positions": pos, "hparams": hp}
