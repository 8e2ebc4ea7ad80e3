"""Independent numpy oracle of the InternVL vision encoder mtmd runs (tools/mtmd/models/internvl.cpp), from
the mmproj GGUF weights (numpy + gguf only, no llama.cpp).

What the vendored graph computes, mirrored here:

* ``build_inp``: conv patch embedding (+ ``v.patch_embd.bias``), patch rows in raster order;
* the class embedding is concatenated AFTER the patch rows (``ggml_concat(inp, cls, 1)``) and the learned
  position embeddings are added by row index (patch i gets ``pos[i]``, the class token ``pos[n_patches]``);
* ``build_vit`` over all n_layer blocks with LayerNorm (RMS only for the 6B ViT: n_embd 3200, 45 layers),
  separate biased q/k/v (optional q/k norms), non-flash attention with scale 1/sqrt(d_head), layer scales
  ``ls1`` / ``ls2`` on the attention and FFN outputs, ``up -> act -> down`` FFN, no pre/post norm in InternViT;
* the class row is dropped, an s x s pixel shuffle groups each s x s patch block into one token (channels
  ordered c + n_embd*dx + n_embd*s*dy), then LayerNorm(eps 1e-5) -> mlp.1 -> GELU -> mlp.3.

The pixel shuffle here is a plain loop over (token row, token column, dy, dx), written from the meaning of the
graph on a square grid, not from its reshape/permute sequence.

    internvl_forward(path, image_rgb) -> dict(keys, hidden, embeddings, ...)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tests.reference_vit import (_W, _attn_out, _layer_norm, _linear, _patch_embed, _rms_norm, _square_image, gelu,
                                 gelu_quick, load_mmproj, read_scale_factor)

__all__ = ["internvl_forward", "shuffle_rows"]


def _act(x: np.ndarray, op: str, act: str) -> np.ndarray:
    if op == "gelu":
        return gelu(x, act)
    if op == "gelu_quick":
        return gelu_quick(x, act)
    return x / (1.0 + np.exp(-x))  # silu


def shuffle_rows(grid: int, s: int) -> list[list[int]]:
    """For each LLM token (row-major over the (grid/s) x (grid/s) token grid), the patch rows it holds, in
    channel order (dx fastest, then dy)."""
    t = grid // s
    out = []
    for ty in range(t):
        for tx in range(t):
            rows = []
            for dy in range(s):
                for dx in range(s):
                    rows.append((ty * s + dy) * grid + tx * s + dx)
            out.append(rows)
    return out


def internvl_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run the internvl.cpp graph on one image_size x image_size chunk (mtmd copies such an image unchanged).

    Returns keys (per block, K after projection + bias [n_patches + 1, H, D], class token LAST), hidden (ViT
    output), embeddings ([n_tokens, proj_dim], LLM token order), grid (patches per side), scale."""
    weights, hp = load_mmproj(path)
    if hp["projector_type"] != "internvl":
        raise ValueError(f"internvl_forward needs projector_type 'internvl', got {hp['projector_type']!r}")
    W = _W(weights)
    img = _square_image(image_rgb, hp, "internvl_forward")
    s = read_scale_factor(path, 1)
    eps, n_head, d_head, n_embd = hp["eps"], hp["n_head"], hp["d_head"], hp["n_embd"]
    norm = _rms_norm if (n_embd == 3200 and hp["n_layer"] == 45) else _layer_norm

    x, grid, _ = _patch_embed(img, W, hp)
    n_patches = grid * grid
    x = np.concatenate([x, W.req("v.class_embd")[None, :]], axis=0)  # class token LAST
    n_pos = n_patches + 1
    x = x + W.req("v.position_embd.weight")[:n_pos]
    if W.get("v.pre_ln.weight") is not None:
        x = norm(x, W.get("v.pre_ln.weight"), W.get("v.pre_ln.bias"), eps)

    keys = []
    for il in range(hp["n_layer"]):
        b = f"v.blk.{il}"
        cur = norm(x, W.get(f"{b}.ln1.weight"), W.get(f"{b}.ln1.bias"), eps)
        q = _linear(cur, W.req(f"{b}.attn_q.weight"), W.get(f"{b}.attn_q.bias"))
        k = _linear(cur, W.req(f"{b}.attn_k.weight"), W.get(f"{b}.attn_k.bias"))
        v = _linear(cur, W.req(f"{b}.attn_v.weight"), W.get(f"{b}.attn_v.bias"))
        if W.get(f"{b}.attn_q_norm.weight") is not None:  # InternViT-6B qk norm (over the whole row)
            q = norm(q, W.get(f"{b}.attn_q_norm.weight"), None, eps)
            k = norm(k, W.get(f"{b}.attn_k_norm.weight"), None, eps)
        q, k, v = (t.reshape(n_pos, n_head, d_head) for t in (q, k, v))
        keys.append(k)
        a = _attn_out(q, k, v, W, b)
        if W.get(f"{b}.ls1.weight") is not None:
            a = a * W.get(f"{b}.ls1.weight")
        x = x + a
        cur = norm(x, W.get(f"{b}.ln2.weight"), W.get(f"{b}.ln2.bias"), eps)
        h = _linear(cur, W.req(f"{b}.ffn_up.weight"), W.get(f"{b}.ffn_up.bias"))
        h = _linear(_act(h, hp["ffn_op"], act), W.req(f"{b}.ffn_down.weight"), W.get(f"{b}.ffn_down.bias"))
        if W.get(f"{b}.ls2.weight") is not None:
            h = h * W.get(f"{b}.ls2.weight")
        x = x + h
    if W.get("v.post_ln.weight") is not None:
        x = norm(x, W.get("v.post_ln.weight"), W.get("v.post_ln.bias"), eps)
    hidden = x

    patches = hidden[:n_patches]  # the class row is cut off
    merged = np.stack([np.concatenate([patches[r] for r in rows]) for rows in shuffle_rows(grid, s)])
    e = _layer_norm(merged, W.req("mm.model.mlp.0.weight"), W.req("mm.model.mlp.0.bias"), 1e-5)
    e = gelu(_linear(e, W.req("mm.model.mlp.1.weight"), W.req("mm.model.mlp.1.bias")), act)
    e = _linear(e, W.req("mm.model.mlp.3.weight"), W.req("mm.model.mlp.3.bias"))
    return {"keys": keys, "hidden": hidden, "embeddings": e, "grid": grid, "scale": s, "n_patches": n_patches,
            "hparams": hp}
