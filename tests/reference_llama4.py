"""Numpy re-implementation of llama.cpp's Llama 4 vision graph (tools/mtmd/models/llama4.cpp) on one square tile,
from the mmproj GGUF weights: an independent oracle for the keys the capture reads (`Kcur_pos`, build_rope_2d) and
for the projector output, whose pixel shuffle is written here as the graph's literal reshape / permute / reshape
sequence (ggml ne order reversed into numpy shapes), so the token order is not assumed."""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from tests.reference_pixtral import rope_2d
from tests.reference_vit import _W, _attn_out, _ffn, _layer_norm, _linear, _patch_conv, _pixels, _qkv, gelu, load_mmproj


def pixel_shuffle(x: np.ndarray, side: int, s: int) -> np.ndarray:
    """llama4.cpp's shuffle of [side*side, e] raster rows: reshape_4d(e*s, side/s, side, 1), permute(0, 2, 1, 3),
    cont_4d(e*s*s, side/s, side/s, 1), cont_2d -> [(side/s)^2, e*s*s] (numpy shapes are ggml's ne reversed)."""
    e = x.shape[1]
    t = x.reshape(1, side, side // s, e * s)  # ne (e*s, side/s, side, 1)
    t = t.transpose(0, 2, 1, 3)  # ggml_permute(0, 2, 1, 3): swap ne1 and ne2
    t = np.ascontiguousarray(t).reshape(1, side // s, side // s, e * s * s)
    return t.reshape(-1, e * s * s)


def llama4_forward(path: str | os.PathLike, tile_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run llama4.cpp's graph on one tile of the mmproj's image size; returns the last block's post-RoPE keys
    ([side*side + 1, n_head, d_head], class token last), the embeddings and the patch grid side."""
    weights, hp = load_mmproj(path)
    if hp["projector_type"] != "llama4":
        raise ValueError(f"llama4_forward supports 'llama4', got {hp['projector_type']!r}")
    s = int(gguf.GGUFReader(os.fspath(path)).fields["clip.vision.projector.scale_factor"].contents())
    W = _W(weights)
    img = np.asarray(tile_rgb)
    p, e, eps = hp["patch_size"], hp["n_embd"], hp["eps"]
    if img.shape[:2] != (hp["image_size"],) * 2:
        raise ValueError("one tile of the model's image size")
    kernel = W.req("v.patch_embd.weight").reshape(e, 3, p, p)  # the matrix is the conv kernel flattened (im2col)
    conv = _patch_conv(_pixels(img, hp), kernel, p)
    side = conv.shape[0]
    n = side * side
    x = np.concatenate([conv.reshape(n, e), W.req("v.class_embd")[None]], axis=0)  # class token appended last
    x = x + W.req("v.position_embd.weight")
    x = _layer_norm(x, W.get("v.pre_ln.weight"), W.get("v.pre_ln.bias"), eps)
    ys, xs = np.divmod(np.arange(n), side)
    pos_h = np.append(ys + 1, 0)  # clip.cpp: patches at (y + 1, x + 1), the class token at (0, 0)
    pos_w = np.append(xs + 1, 0)
    keys_rope = []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        q, k, v = _qkv(_layer_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps), W, b, hp)
        q, k = (rope_2d(t, pos_w, pos_h, interleave_freq=False) for t in (q, k))  # build_rope_2d(pos_w, pos_h)
        keys_rope.append(k)
        x = x + _attn_out(q, k, v, W, b)
        x = x + _ffn(_layer_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps), W, il, hp, act)
    x = _layer_norm(x, W.get("v.post_ln.weight"), W.get("v.post_ln.bias"), eps)
    m = pixel_shuffle(x[:n], side, s)
    m = gelu(_linear(m, W.req("mm.model.mlp.1.weight"), None), act)
    m = gelu(_linear(m, W.req("mm.model.mlp.2.weight"), None), act)
    return {"keys_rope": keys_rope, "embeddings": _linear(m, W.req("mm.model.fc.weight"), None), "side": side,
            "scale": s, "hparams": hp}
