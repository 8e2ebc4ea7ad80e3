"""Independent numpy oracle of the SigLIP encoder mtmd runs for the `idefics3` (SmolVLM / Idefics3), `lfm2`
(LFM2-VL), `janus_pro` (Janus-Pro) and `phi4` (Phi-4 vision) projectors (tools/mtmd/models/siglip.cpp + clip.cpp),
from the mmproj GGUF weights (numpy + gguf, no llama.cpp).

Mirrored from the vendored graph:

* ``build_inp``: conv patch embedding (+ bias), patch rows in raster order (x fastest), no class token;
* learned position embeddings added by row; lfm2 first resizes the n x n table to the chunk's W x H patch grid
  with ``ggml_interpolate`` in bilinear + antialias mode (pixel centres, triangle filter whose support widens
  when shrinking, weights normalised), x fastest in and out;
* ``build_vit`` over all n_layer blocks: LayerNorm, separate biased q/k/v, non-flash attention, ``up -> GELU ->
  down`` FFN, post LayerNorm;
* ``build_patch_merge_permute``: the W x H grid zero-padded to multiples of s, each s x s block concatenated
  into one token (channels c + n_embd*dx + n_embd*s*dy), tokens row-major; written here as a plain loop;
* idefics3: ``mm.model.fc`` (no bias); lfm2: LayerNorm(eps 1e-5) ``mm.input_norm`` -> ``mm.1`` -> GELU ->
  ``mm.2``; janus_pro / phi4: no merge (s = 1), ``mm.0`` -> GELU -> ``mm.1`` / ``mm.2`` (phi4 only at the
  position table's own grid: its resize is not mirrored).

    siglip_forward(path, image_rgb) -> dict(keys, embeddings, grid, scale, token_rows)
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from tests.reference_vit import (_W, _layer_norm, _linear, _ln_block, _patch_embed, _rms_norm, gelu, load_mmproj,
                                 read_scale_factor)

__all__ = ["siglip_forward", "merge_rows", "antialias_bilinear_weights"]


def antialias_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] row-normalised weights of ggml-cpu's upscale (GGML_SCALE_MODE_BILINEAR |
    GGML_SCALE_FLAG_ANTIALIAS) along one axis."""
    sf = float(np.float32(n_out) / np.float32(n_in))
    support = max(1.0, 1.0 / sf)
    invscale = 1.0 / support
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) / sf
        lo = max(int(x - support + 0.5), 0)  # C++ int64 cast truncates toward zero
        hi = min(int(x + support + 0.5), n_in)
        for sx in range(lo, hi):
            w[i, sx] = max(1.0 - abs((sx - x + 0.5) * invscale), 0.0)
    return w / w.sum(axis=1, keepdims=True)


def merge_rows(width: int, height: int, s: int) -> list[list[int]]:
    """Per LLM token (row-major over ceil(W/s) x ceil(H/s)), the patch rows of its s x s block in channel order
    (dx fastest, then dy); -1 marks a zero-padded position."""
    out = []
    for ty in range(math.ceil(height / s)):
        for tx in range(math.ceil(width / s)):
            rows = []
            for dy in range(s):
                for dx in range(s):
                    x, y = tx * s + dx, ty * s + dy
                    rows.append(y * width + x if x < width and y < height else -1)
            out.append(rows)
    return out


def _gelu_ffn(cur: np.ndarray, W: _W, il: int, hp: dict[str, Any], act: str) -> np.ndarray:
    """siglip's build_ffn: ffn_up -> GELU -> ffn_down (no gate, no up / down swap)."""
    b = f"v.blk.{il}"
    h = gelu(_linear(cur, W.req(f"{b}.ffn_up.weight"), W.get(f"{b}.ffn_up.bias")), act)
    return _linear(h, W.req(f"{b}.ffn_down.weight"), W.get(f"{b}.ffn_down.bias"))


def siglip_forward(path: str | os.PathLike, image_rgb: np.ndarray, *, act: str = "ggml") -> dict[str, Any]:
    """Run the siglip.cpp graph (idefics3 / lfm2) on one chunk's encoder input (the image as mtmd feeds it:
    no resize is mirrored). Returns keys (per block, [W*H, H, D]), embeddings ([n_tokens, proj_dim]),
    grid (W, H) in patches, scale, token_rows (merge_rows)."""
    weights, hp = load_mmproj(path)
    proj = hp["projector_type"]
    if proj not in ("idefics3", "lfm2", "janus_pro", "phi4", "nemotron_v2_vl"):
        raise ValueError(f"siglip_forward supports idefics3 / lfm2 / janus_pro / phi4 / nemotron_v2_vl, got {proj!r}")
    # janus_pro / phi4: one token per patch
    s = read_scale_factor(path, 1) if proj in ("idefics3", "lfm2", "nemotron_v2_vl") else 1
    W = _W(weights)
    eps = hp["eps"]
    x, gw, gh = _patch_embed(np.asarray(image_rgb), W, hp)
    n = gw * gh
    pos = W.get("v.position_embd.weight")
    if pos is not None:
        side = math.isqrt(pos.shape[0])
        if proj == "phi4" and (gw, gh) != (side, side):
            raise ValueError("phi4's position resize is not mirrored: use an image of the table's size")
        if proj == "lfm2" and (gw, gh) != (side, side):
            table = pos.reshape(side, side, -1)  # [y, x, e]
            wy, wx = antialias_bilinear_weights(side, gh), antialias_bilinear_weights(side, gw)
            pos = np.einsum("Yy,yxe,Xx->YXe", wy, table, wx).reshape(n, -1)
        x = x + pos[:n]
    registers = W.get("v.class_embd") if proj == "nemotron_v2_vl" else None
    if registers is not None:  # nemotron: register tokens prepended after the positions were added
        x = np.concatenate([registers.reshape(-1, x.shape[1]), x], axis=0)
    keys = []
    for il in range(hp["n_layer"]):
        x = _ln_block(x, W, il, hp, act, keys, ffn=_gelu_ffn)
    if registers is not None:
        x = x[len(registers):]
    if W.get("v.post_ln.weight") is not None:
        x = _layer_norm(x, W.get("v.post_ln.weight"), W.get("v.post_ln.bias"), eps)
    rows = merge_rows(gw, gh, s)
    zero = np.zeros(x.shape[1])
    merged = np.stack([np.concatenate([x[r] if r >= 0 else zero for r in token]) for token in rows])
    if proj == "idefics3":
        e = _linear(merged, W.req("mm.model.fc.weight"), None)
    elif proj == "nemotron_v2_vl":  # RMS norm (mm.model.mlp.0), up, squared ReLU, down
        m = _rms_norm(merged, W.req("mm.model.mlp.0.weight"), None, 1e-6)
        e = _linear(np.maximum(_linear(m, W.req("mm.model.mlp.1.weight"), None), 0.0) ** 2,
                    W.req("mm.model.mlp.3.weight"), None)
    elif proj in ("janus_pro", "phi4"):  # build_ffn(mm.0, mm.1 | mm.2, GELU)
        second = "mm.1" if proj == "janus_pro" else "mm.2"
        e = gelu(_linear(merged, W.req("mm.0.weight"), W.req("mm.0.bias")), act)
        e = _linear(e, W.req(f"{second}.weight"), W.req(f"{second}.bias"))
    else:
        if W.get("mm.input_norm.weight") is not None:
            merged = _layer_norm(merged, W.get("mm.input_norm.weight"), W.get("mm.input_norm.bias"), 1e-5)
        e = gelu(_linear(merged, W.req("mm.1.weight"), W.req("mm.1.bias")), act)
        e = _linear(e, W.req("mm.2.weight"), W.req("mm.2.bias"))
    return {"keys": keys, "embeddings": e, "grid": (gw, gh), "scale": s, "token_rows": rows, "hparams": hp}
