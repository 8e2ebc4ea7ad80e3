"""Numpy re-implementation of llama.cpp's GLM-4.1V / GLM-5V vision graph (tools/mtmd/models/glm4v.cpp, built for
both projector types; GLM-5V clamps its SwiGLU) up to the last block's keys, from the mmproj GGUF weights: an independent oracle for the keys the capture reads (`Kcur_pos`, 2-D
M-RoPE applied to a strided view of one fused QKV projection).

Covers images mtmd's resize leaves alone and whose patch grid equals the learned position table's side (no bicubic
interpolation of the position embeddings), e.g. 224 x 224 with patch 14 on the fixture.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from tests.reference_qwen3vl import _merge_order, fused_qkv_rope_blocks, merger_tower_input
from tests.reference_vit import _ffn, _linear, _rms_norm


def read_clip_kv(path: str | os.PathLike) -> dict[str, Any]:
    """The mmproj's clip.* metadata as plain values (gguf-py's reader)."""
    reader = gguf.GGUFReader(os.fspath(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("clip.")}


def _swiglu_clamped(x: np.ndarray, W: Any, il: int, limit: float) -> np.ndarray:
    """ggml_swiglu_clamp (ops.cpp): silu(min(gate, limit)) * clip(up, -limit, limit), then ffn_down."""
    b = f"v.blk.{il}"
    gate = np.minimum(_linear(x, W.req(f"{b}.ffn_gate.weight"), W.get(f"{b}.ffn_gate.bias")), limit)
    up = np.clip(_linear(x, W.req(f"{b}.ffn_up.weight"), W.get(f"{b}.ffn_up.bias")), -limit, limit)
    return _linear(gate / (1.0 + np.exp(-gate)) * up, W.req(f"{b}.ffn_down.weight"), W.get(f"{b}.ffn_down.bias"))


def glm4v_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml",
                  swiglu_clamp: float | None = None) -> dict[str, Any]:
    """Run glm4v.cpp's ViT on an image; returns per-layer keys before and after the vision M-RoPE
    ([n_patches, n_head, d_head], graph row order: each 2x2 merge group's 4 patches consecutive, groups row-major)
    and the merged token grid. swiglu_clamp: the SwiGLU clamp (None: the file's, 0: none)."""
    W, hp, conv, pos_embd, nx, ny = merger_tower_input(path, image_rgb, ("glm4v", "glm5v"))
    limit = float(read_clip_kv(path).get("clip.vision.swiglu_clamp", 0.0)) if swiglu_clamp is None else swiglu_clamp
    e_dim, eps = hp["n_embd"], hp["eps"]
    x = _merge_order(conv, nx, ny) + W.req("v.patch_embd.bias")
    x = _rms_norm(x, W.get("v.norm_embd.weight"), W.get("v.norm_embd.bias"), eps)  # the graph's RMS norm type
    x = x + _merge_order(pos_embd.reshape(ny, nx, e_dim), nx, ny)  # build_vit adds the learned positions first
    ffn = (lambda cur, W, il, hp, act: _swiglu_clamped(cur, W, il, limit)) if limit > 0 else _ffn
    keys, keys_rope, pos = fused_qkv_rope_blocks(x, W, hp, nx, ny, _rms_norm, act, ffn)
    return {"keys": keys, "keys_rope": keys_rope, "grid": (nx // 2, ny // 2), "positions": pos, "hparams": hp}
