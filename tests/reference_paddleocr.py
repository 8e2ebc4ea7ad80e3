"""Numpy re-implementation of llama.cpp's PaddleOCR-VL vision graph (tools/mtmd/models/paddleocr.cpp), dots.ocr's
(dotsocr.cpp: the same with RMSNorm, no learned positions) and Kimi-VL's / Kimi-K2.5's (kimivl.cpp, kimik25.cpp:
build_rope_2d) up to the last block's keys, from the mmproj GGUF weights: an independent oracle for the keys the
capture reads (`Kcur_pos`, 2-D RoPE over raster-ordered patches).

Covers images mtmd's resize leaves alone; with a learned position table (paddleocr, the Kimis), only those whose grid
equals the table's side (no interpolation of the position embeddings), e.g. 224 x 224 with patch 14."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from tests.reference_pixtral import rope_2d
from tests.reference_vit import (_W, _attn_out, _ffn, _layer_norm, _patch_embed, _qkv, _qwen_grid_ok, _rms_norm,
                                 _rope_vision, load_mmproj)


def paddleocr_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run paddleocr.cpp's ViT on an image; returns per-layer keys after the vision M-RoPE ([n_patches, n_head,
    d_head], patch (x, y) at row y * W + x), the positions and the patch grid (W, H)."""
    weights, hp = load_mmproj(path)
    proj = hp["projector_type"]
    if proj not in ("paddleocr", "dots_ocr", "kimivl", "kimik25"):
        raise ValueError(f"paddleocr_forward supports paddleocr, dots_ocr, kimivl and kimik25, got {proj!r}")
    norm = _rms_norm if proj == "dots_ocr" else _layer_norm
    W = _W(weights)
    img = np.asarray(image_rgb)
    if not _qwen_grid_ok(img.shape[1], img.shape[0], hp):
        raise ValueError("mtmd would resize this image (its resize is not mirrored)")
    x, gw, gh = _patch_embed(img, W, hp)
    table = W.get("v.position_embd.weight")
    if table is not None and table.ndim == 3:  # kimik25: [H, W, C], rows h * W + w once flattened
        table = table.reshape(-1, table.shape[-1])
    if table is not None:
        if (gw, gh) != (math.isqrt(table.shape[0]),) * 2:
            raise ValueError("position-embedding interpolation is not mirrored: use an image of the table's size")
        x = x + table  # build_vit adds the learned positions first
    ys, xs = np.divmod(np.arange(gw * gh), gw)
    pos = np.stack([ys, xs, ys, xs])  # clip.cpp's PADDLEOCR "positions": (y, x, y, x) per raster row
    keys_rope = []
    eps = hp["eps"]
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        q, k, v = _qkv(norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps), W, b, hp)
        if proj in ("kimivl", "kimik25"):  # build_rope_2d(pos_w, pos_h, interleave_freq=false): width first
            q, k = (rope_2d(t, pos[1], pos[0], interleave_freq=False) for t in (q, k))
        else:
            q, k = _rope_vision(q, pos), _rope_vision(k, pos)
        keys_rope.append(k)
        x = x + _attn_out(q, k, v, W, b)
        x = x + _ffn(norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps), W, il, hp, act)
    return {"keys_rope": keys_rope, "positions": pos, "grid": (gw, gh), "hparams": hp}
