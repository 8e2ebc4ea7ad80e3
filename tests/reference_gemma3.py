"""Independent numpy oracle of the Gemma 3 vision encoder mtmd runs (projector_type ``gemma3``), from the
mmproj GGUF weights only (numpy + gguf, no llama.cpp).

Mirrors ``tools/mtmd/models/siglip.cpp`` (PROJECTOR_TYPE_GEMMA3) and ``clip_graph::build_vit`` / ``build_inp``
in ``tools/mtmd/clip.cpp``:

* patches: ``ggml_conv_2d`` with stride = patch size (F16 im2col, as reference_vit._patch_conv), row
  ``y * P + x`` for patch (x, y), plus ``v.patch_embd.bias``; learned position embeddings added by row;
* ``build_vit`` with NORM_TYPE_NORMAL (LayerNorm), optional pre-LN, all ``n_layer`` blocks: LayerNorm,
  biased q/k/v (no RoPE: the keys are ``Kcur-<il>``), softmax(QK^T / sqrt(d_head)) V, attn_out, residual,
  LayerNorm, ``ffn_up`` -> ggml_gelu -> ``ffn_down``, residual; post-LN;
* projector: the [n_embd, P*P] output viewed as a P x P image, ``ggml_pool_2d`` AVG with kernel = stride =
  k (``clip.vision.projector.scale_factor``, default 4) -> token ``by * (P/k) + bx``; ``ggml_rms_norm`` *
  ``mm.soft_emb_norm.weight``; times ``mm.input_projection.weight`` (ggml ne [proj_dim, n_embd]).

Only images that are already image_size x image_size are accepted (mtmd's fixed-size preprocessor then
copies them unchanged; letterboxing of other sizes is not mirrored, pad them yourself).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tests.reference_vit import (_W, _attention, _ffn, _layer_norm, _linear, _patch_conv, _pixels, _rms_norm,
                                 load_mmproj)

import gguf

__all__ = ["gemma3_forward", "pool_factor"]

GEMMA3_DEFAULT_POOL = 4  # clip.cpp: hparams.n_merge = 4 for PROJECTOR_TYPE_GEMMA3 unless the GGUF says otherwise


def pool_factor(path: str | os.PathLike) -> int:
    """clip.vision.projector.scale_factor, or clip.cpp's default 4."""
    f = gguf.GGUFReader(os.fspath(path)).fields.get("clip.vision.projector.scale_factor")
    return int(f.contents()) if f is not None else GEMMA3_DEFAULT_POOL


def gemma3_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run the gemma3 graph on an image_size x image_size uint8 RGB image.

    Returns a dict with:
      keys:        per block, K after projection + bias, [P*P, n_head, d_head], rows y * P + x
      layers_run:  blocks run (all n_layer)
      patch_side:  P = image_size / patch_size
      pool:        k
      hidden:      ViT output after post-LN, [P*P, n_embd]
      embeddings:  [(P/k)^2, proj_dim] LLM embeddings, token by * (P/k) + bx
    """
    weights, hp = load_mmproj(path)
    if hp["projector_type"] != "gemma3":
        raise ValueError(f"gemma3_forward supports projector_type 'gemma3', got {hp['projector_type']!r}")
    W = _W(weights)
    size, p = hp["image_size"], hp["patch_size"]
    img = np.asarray(image_rgb)
    if img.shape[:2] != (size, size):
        raise ValueError(f"gemma3_forward needs a {size}x{size} image (no resize is mirrored), got {img.shape[:2]}")
    eps, n_head, d_head = hp["eps"], hp["n_head"], hp["d_head"]

    grid = _patch_conv(_pixels(img, hp), W.req("v.patch_embd.weight"), p)  # [P, P, n_embd], [y, x]
    side = grid.shape[0]
    n = side * side
    x = grid.reshape(n, -1)
    pb = W.get("v.patch_embd.bias")
    if pb is not None:
        x = x + pb
    pos = W.get("v.position_embd.weight")
    if pos is not None:
        x = x + pos[:n]
    pre_w = W.get("v.pre_ln.weight")
    if pre_w is not None:
        x = _layer_norm(x, pre_w, W.get("v.pre_ln.bias"), eps)

    keys: list[np.ndarray] = []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        cur = _layer_norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps)
        q = _linear(cur, W.req(f"{b}.attn_q.weight"), W.get(f"{b}.attn_q.bias")).reshape(n, n_head, d_head)
        k = _linear(cur, W.req(f"{b}.attn_k.weight"), W.get(f"{b}.attn_k.bias")).reshape(n, n_head, d_head)
        v = _linear(cur, W.req(f"{b}.attn_v.weight"), W.get(f"{b}.attn_v.bias")).reshape(n, n_head, d_head)
        keys.append(k)
        x = x + _linear(_attention(q, k, v, None), W.req(f"{b}.attn_out.weight"), W.get(f"{b}.attn_out.bias"))
        cur = _layer_norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        x = x + _ffn(cur, W, il, hp, act)
    post_w = W.get("v.post_ln.weight")
    if post_w is not None:
        x = _layer_norm(x, post_w, W.get("v.post_ln.bias"), eps)

    k_pool = pool_factor(path)
    t = side // k_pool
    pooled = np.zeros((t * t, x.shape[1]))
    for by in range(t):
        for bx in range(t):
            rows = [yy * side + xx for yy in range(by * k_pool, by * k_pool + k_pool)
                    for xx in range(bx * k_pool, bx * k_pool + k_pool)]
            pooled[by * t + bx] = x[rows].mean(axis=0)
    e = _rms_norm(pooled, W.req("mm.soft_emb_norm.weight"), None, eps)
    e = e @ W.req("mm.input_projection.weight")  # numpy [n_embd, proj_dim]
    return {"keys": keys, "layers_run": hp["n_layer"], "patch_side": side, "pool": k_pool, "hidden": x,
            "embeddings": e, "hparams": hp}
