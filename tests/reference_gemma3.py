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

from tests.reference_vit import (_W, _layer_norm, _ln_block, _patch_embed, _rms_norm, _square_image, avg_pool_rows,
                                 load_mmproj, read_scale_factor)

__all__ = ["gemma3_forward", "pool_factor"]

GEMMA3_DEFAULT_POOL = 4  # clip.cpp: hparams.n_merge = 4 for PROJECTOR_TYPE_GEMMA3 unless the GGUF says otherwise


def pool_factor(path: str | os.PathLike) -> int:
    """clip.vision.projector.scale_factor, or clip.cpp's default 4."""
    return read_scale_factor(path, GEMMA3_DEFAULT_POOL)


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
    eps = hp["eps"]
    x, side, _ = _patch_embed(_square_image(image_rgb, hp, "gemma3_forward"), W, hp)  # rows y * P + x
    n = side * side
    pos = W.get("v.position_embd.weight")
    if pos is not None:
        x = x + pos[:n]
    pre_w = W.get("v.pre_ln.weight")
    if pre_w is not None:
        x = _layer_norm(x, pre_w, W.get("v.pre_ln.bias"), eps)

    keys: list[np.ndarray] = []
    for il in range(hp["n_layer"]):
        x = _ln_block(x, W, il, hp, act, keys)
    post_w = W.get("v.post_ln.weight")
    if post_w is not None:
        x = _layer_norm(x, post_w, W.get("v.post_ln.bias"), eps)

    k_pool = pool_factor(path)
    e = _rms_norm(avg_pool_rows(x, side, side, k_pool), W.req("mm.soft_emb_norm.weight"), None, eps)
    e = e @ W.req("mm.input_projection.weight")  # numpy [n_embd, proj_dim]
    return {"keys": keys, "layers_run": hp["n_layer"], "patch_side": side, "pool": k_pool, "hidden": x,
            "embeddings": e, "hparams": hp}
