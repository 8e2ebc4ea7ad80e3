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

from tests.reference_qwen3vl import _merge_order, fused_qkv_rope_blocks, merger_tower_input
from tests.reference_vit import _rms_norm


def glm4v_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run glm4v.cpp's ViT on an image; returns per-layer keys before and after the vision M-RoPE
    ([n_patches, n_head, d_head], graph row order: each 2x2 merge group's 4 patches consecutive, groups row-major)
    and the merged token grid."""
    W, hp, conv, pos_embd, nx, ny = merger_tower_input(path, image_rgb, "glm4v")
    e_dim, eps = hp["n_embd"], hp["eps"]
    x = _merge_order(conv, nx, ny) + W.req("v.patch_embd.bias")
    x = _rms_norm(x, W.get("v.norm_embd.weight"), W.get("v.norm_embd.bias"), eps)  # the graph's RMS norm type
    x = x + _merge_order(pos_embd.reshape(ny, nx, e_dim), nx, ny)  # build_vit adds the learned positions first
    keys, keys_rope, pos = fused_qkv_rope_blocks(x, W, hp, nx, ny, _rms_norm, act)
    return {"keys": keys, "keys_rope": keys_rope, "grid": (nx // 2, ny // 2), "positions": pos, "hparams": hp}
