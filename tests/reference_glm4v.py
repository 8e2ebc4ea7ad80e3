"""Numpy re-implementation of llama.cpp's GLM-4.1V vision graph (tools/mtmd/models/glm4v.cpp) up to the last
block's keys, from the mmproj GGUF weights: an independent oracle for the keys the capture reads (`Kcur_pos`, 2-D
M-RoPE applied to a strided view of one fused QKV projection).

Covers images mtmd's resize leaves alone and whose patch grid equals the learned position table's side (no bicubic
interpolation of the position embeddings), e.g. 224 x 224 with patch 14 on the fixture.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tests.reference_qwen3vl import _merge_order, merger_tower_input
from tests.reference_vit import _attn_out, _ffn, _linear, _rms_norm, _rope_vision, qwen25vl_positions


def glm4v_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run glm4v.cpp's ViT on an image; returns per-layer keys before and after the vision M-RoPE
    ([n_patches, n_head, d_head], graph row order: each 2x2 merge group's 4 patches consecutive, groups row-major)
    and the merged token grid."""
    W, hp, conv, pos_embd, nx, ny = merger_tower_input(path, image_rgb, "glm4v")
    e_dim, n_head, d_head, eps = hp["n_embd"], hp["n_head"], hp["d_head"], hp["eps"]
    n = nx * ny
    x = _merge_order(conv, nx, ny) + W.req("v.patch_embd.bias")
    x = _rms_norm(x, W.get("v.norm_embd.weight"), W.get("v.norm_embd.bias"), eps)  # the graph's RMS norm type
    x = x + _merge_order(pos_embd.reshape(ny, nx, e_dim), nx, ny)  # build_vit adds the learned positions first
    pos = qwen25vl_positions(nx, ny, np.arange(n // 4))  # no windows: identity block order
    keys, keys_rope = [], []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        cur = _rms_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps)
        qkv = _linear(cur, W.req(f"{b}.attn_qkv.weight"), W.get(f"{b}.attn_qkv.bias"))
        q = qkv[:, :e_dim].reshape(n, n_head, d_head)
        k = qkv[:, e_dim:2 * e_dim].reshape(n, n_head, d_head)
        v = qkv[:, 2 * e_dim:].reshape(n, n_head, d_head)
        keys.append(k)
        q, k = _rope_vision(q, pos), _rope_vision(k, pos)
        keys_rope.append(k)
        x = x + _attn_out(q, k, v, W, b)
        cur = _rms_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        x = x + _ffn(cur, W, il, hp, act)
    return {"keys": keys, "keys_rope": keys_rope, "grid": (nx // 2, ny // 2), "positions": pos, "hparams": hp}
