"""Deterministic random-weight mmproj (vision projector) GGUF writer for stock llama.cpp mtmd.

Two families are supported, mirroring what llama.cpp's ``tools/mtmd/clip.cpp`` loader expects:

* ``"llava"``: LLaVA-1.5 style CLIP ViT (conv patch embedding, class token, learned position
  embeddings, pre-LayerNorm, LayerNorm blocks with separate biased q/k/v, quick-GELU MLP) and
  the ``mlp`` projector (``mm.0`` -> GELU -> ``mm.2``).  Like real LLaVA-1.5 files there is no
  ``clip.vision.feature_layer`` key and no post-LN, so the graph runs only ``n_layer - 1`` blocks
  (the output of the second-to-last layer feeds the projector).
* ``"qwen25vl"``: Qwen2.5-VL vision tower (``clip.projector_type = "qwen2.5vl_merger"``): two
  patch-embedding convs (temporal halves), RMSNorm blocks, biased q/k/v, 2-D M-RoPE inside the
  ViT, window attention with a full-attention layer every ``n_wa_pattern`` blocks, SwiGLU MLP,
  RMS post-norm (the merger's ``ln_q``), 2x2 spatial merge and the ``mm.0``/``mm.2`` merger MLP.
* ``"qwen3vl"``: Qwen3-VL / Qwen3.5 vision tower (``clip.projector_type = "qwen3vl_merger"``): two
  patch-embedding convs plus a patch bias, learned position embeddings, LayerNorm blocks with one fused
  QKV projection (so llama.cpp's ``Kcur`` is a strided view), 2-D M-RoPE, GELU MLP, no windows, 2x2
  merger and optional deepstack mergers (extra embedding slices for chosen blocks).
* ``"exaone4_5"``: EXAONE 4.5 vision (exaone4_5.cpp): the Qwen2.5-VL layout (two patch convs, RMSNorm, SwiGLU,
  112 px windows with full attention every ``n_wa_pattern`` blocks, ``mm.0`` / ``mm.2`` merger) with one fused
  QKV projection and grouped-query attention (``n_head_kv`` key heads), keys ``Kcur_rope``.
* ``"mimovl"``: MiMo-VL vision (mimovl.cpp): two patch convs, RMSNorm blocks with a fused biased grouped-query
  QKV, 2-D RoPE, per block full attention (-1) or a banded 1-D window over the rows in row (0) or column (1) order of
  the 2x2 units, with attention sinks; SwiGLU; LayerNorm post-norm and the bias-free ``mm.0`` / ``mm.2`` merger.
* ``"paddleocr"``: PaddleOCR-VL vision (paddleocr.cpp): a SigLIP-style ViT (biased patch conv, learned positions,
  LayerNorm blocks with biased q / k / v, GELU MLP) with 2-D M-RoPE keys ``Kcur_pos`` on raster-ordered patches,
  then a LayerNorm, the 2x2 pixel-unshuffle merge (``build_patch_merge_permute``) and the ``mm.1`` / ``mm.2`` MLP.
* ``"dots_ocr"``: dots.ocr vision (dotsocr.cpp): the same raster-order M-RoPE ViT as paddleocr but with RMSNorm
  blocks, a SwiGLU MLP and no learned positions, a post-trunk RMS norm (``mm.post_norm``), the s x s
  pixel-unshuffle merge (s = ``clip.vision.projector.scale_factor``) and the ``mm.0`` / ``mm.2`` MLP (erf GELU).
* ``"kimivl"``: Kimi-VL vision (kimivl.cpp): the paddleocr layout (raster patches, learned positions, LayerNorm
  blocks, GELU MLP, s x s pixel-unshuffle with s = ``clip.vision.projector.scale_factor``, per-patch LayerNorm,
  ``mm.1`` / ``mm.2``) with ``build_rope_2d`` keys (width angles in the first half, height in the second).
* ``"janus_pro"`` / ``"phi4"``: Janus-Pro / Phi-4 vision (siglip.cpp): a SigLIP ViT (biased patch conv, learned
  positions, LayerNorm blocks without RoPE, GELU MLP), one LLM token per patch, then a two-layer MLP (``mm.0`` /
  ``mm.1`` for janus_pro, ``mm.0`` / ``mm.2`` for phi4, whose positions are resized to each image's grid).
* ``"llama4"``: Llama 4 vision (llama4.cpp): patches embedded as one matrix product (im2col), a class token
  appended last, learned positions, pre-LayerNorm, LayerNorm blocks with ``build_rope_2d`` keys, then an s x s pixel
  shuffle (s = ``clip.vision.projector.scale_factor``) whose tokens run column by column, a GELU adapter MLP
  (``mm.model.mlp.1`` / ``.2``) and ``mm.model.fc``.
* ``"minimax_m3"``: MiniMax-M3 vision (minimax-m3.cpp): two patch convs, rows in 2x2 merge order, LayerNorm blocks
  with biased q / k / v and an erf-GELU MLP, keys under a 3-axis NEOX RoPE (height and width angles at channel
  offsets, the first axis unrotated), a per-patch MLP (``mm.1`` / ``mm.2``) and a merge MLP (``mm.merger.fc1`` /
  ``fc2``).
* ``"kimik25"``: Kimi-K2.5 vision (kimik25.cpp; GLM-5.2-V reuses it): kimivl's graph with the position table stored
  3-D ([H, W, C]) and added before the blocks.
* ``"nemotron_v2_vl"``: Nemotron Nano VL vision (nemotron-v2-vl.cpp): a ViT at a fixed square size whose learned
  positions are added to the patches, then register tokens (``v.class_embd``, [R, C]) prepended, LayerNorm blocks
  without RoPE, the s x s pixel unshuffle of the patches (registers dropped), RMS norm ``mm.model.mlp.0`` and a
  squared-ReLU MLP (``mm.model.mlp.1`` / ``.3``).
* ``"ling3vl"``: Ling-3-VL: the Qwen3-VL tower (clip.cpp's ling3vl.cpp says "same vision tower as qwen3vl") with
  a norm-only merger (``mm.input_norm``) and the ``mm.0`` / ``mm.2`` MLP over each 2x2 group; no deepstack.
* ``"glm4v"``: GLM-4.1V-4.6V / GLM-OCR vision tower (``clip.projector_type = "glm4v"``, glm4v.cpp): two
  patch-embedding convs plus a patch bias, an RMS norm after them (``v.norm_embd``), learned position
  embeddings, RMSNorm blocks with one fused QKV projection (no bias), 2-D M-RoPE keys ``Kcur_pos``, SwiGLU MLP,
  RMS post-norm, then a 2x2 conv patch merger and the FC / LayerNorm / GELU / SwiGLU projector.
* ``"glm5v"``: the same tower and graph (clip.cpp builds glm4v.cpp for it) with a clamped SwiGLU
  (``clip.vision.swiglu_clamp``) and its own resize: the canvas is ceil-aligned to 28 px and padded, not scaled.
* ``"ldpv2"``: MobileVLM-V2 (``clip.projector_type = "ldpv2"``): the LLaVA CLIP ViT, then an MLP, a 2x2
  average pool of the 24 x 24 patch grid clip.cpp hard-codes (so image_size / patch_size must be 24) and a
  depthwise-conv position generator ("peg").

All weights come from a seeded ``numpy.random.Generator`` and the writer emits no timestamps, so
the output is byte-for-byte reproducible for a given ``(dims, seed, name, weight_std, ftype)``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

import gguf

logger = logging.getLogger(__name__)

__all__ = [
    "VisionDims",
    "write_mmproj",
    "write_mmproj_weights",
    "expected_image_tokens",
    "expected_image_grid",
    "effective_pixel_limits",
    "QWEN25VL_MIN_TOKENS",
    "QWEN25VL_MAX_TOKENS",
]

# Token limits hard-coded by clip.cpp for PROJECTOR_TYPE_QWEN25VL (set_limit_image_tokens(8, 4096)).
# The GGUF keys clip.vision.image_{min,max}_pixels are NOT read for this projector; only
# mtmd_context_params.image_{min,max}_tokens override these.
QWEN25VL_MIN_TOKENS = 8
QWEN25VL_MAX_TOKENS = 4096
# Window size clip.cpp uses for qwen2.5vl window attention (clip.vision.window_size is not read).
QWEN25VL_WINDOW_SIZE = 112

# OpenAI CLIP normalisation constants (used by both LLaVA-1.5 and Qwen2.5-VL).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_FTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
_FAMILIES = ("llava", "qwen25vl", "exaone4_5", "mimovl", "paddleocr", "dots_ocr", "kimivl", "janus_pro", "phi4",
             "llama4", "minimax_m3", "kimik25", "nemotron_v2_vl", "qwen3vl", "ling3vl", "glm4v", "glm5v", "ldpv2")


@dataclass
class VisionDims:
    """Hyper-parameters of a tiny vision tower + projector."""

    family: str  # "llava" | "qwen25vl"
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    patch_size: int
    image_size: int
    proj_dim: int  # = text model n_embd
    n_wa_pattern: int = 0  # qwen25vl: every n_wa_pattern-th block (1-based) uses full attention
    window_size: int = 112  # qwen25vl: window in pixels (clip.cpp always uses 112)
    spatial_merge: int = 2  # qwen25vl: must be 2 (clip.cpp hard-codes a 2x2 merge)
    image_min_pixels: int | None = None  # metadata only (ignored by clip.cpp for qwen2.5vl)
    image_max_pixels: int | None = None  # metadata only (ignored by clip.cpp for qwen2.5vl)
    eps: float = 1e-6
    deepstack_layers: tuple[int, ...] = ()  # qwen3vl: blocks whose output feeds a deepstack merger
    window_modes: tuple[int, ...] = ()  # mimovl: per block -1 full, 0 row-order window, 1 column-order window
    window_rows: int = 0  # mimovl: the banded window's radius in rows (clip.vision.window_size)
    n_head_kv: int = 0  # exaone4_5 / mimovl: key/value heads of the ViT's grouped-query attention (0: n_head)
    swiglu_clamp: float = 0.0  # glm5v: gate <= clamp, |up| <= clamp in every SwiGLU (required key there)

    @property
    def n_output_dim(self) -> int:
        """Width of the embeddings mtmd outputs (the text model's n_embd_inp)."""
        return self.proj_dim * (1 + len(self.deepstack_layers))

    def validate(self) -> None:
        """Raise ValueError if the dims cannot produce a file that stock mtmd loads and runs."""
        if self.family not in _FAMILIES:
            raise ValueError(f"family must be one of {_FAMILIES}, got {self.family!r}")
        for field in ("n_embd", "n_layer", "n_head", "n_ff", "patch_size", "image_size", "proj_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if self.n_ff == self.n_embd:
            # clip.cpp swaps ffn_up/ffn_down when ffn_down.ne[0] == n_embd ("legacy naming" fix)
            raise ValueError("n_ff must differ from n_embd (clip.cpp would swap ffn up/down)")
        if self.family == "ldpv2" and self.image_size != 24 * self.patch_size:
            raise ValueError("ldpv2: clip.cpp hard-codes a 24 x 24 patch grid (image_size = 24 * patch_size)")
        if self.family in ("llava", "ldpv2", "janus_pro", "phi4", "llama4"):
            if self.image_size % self.patch_size:
                raise ValueError("llava: image_size must be a multiple of patch_size")
            if self.n_layer < 2:
                raise ValueError("llava: n_layer must be >= 2 (the last block is not run)")
        else:
            d_head = self.n_embd // self.n_head
            if d_head % 4:
                raise ValueError("qwen25vl: head dim must be divisible by 4 (M-RoPE sections)")
            if self.spatial_merge != 2 and self.family not in ("dots_ocr", "kimivl", "kimik25"):  # s from the file
                raise ValueError("qwen25vl: clip.cpp only supports spatial_merge == 2")
            if any(not 0 <= il < self.n_layer for il in self.deepstack_layers) or (
                    self.deepstack_layers and self.family != "qwen3vl"):
                raise ValueError("deepstack_layers: qwen3vl only, each a block index < n_layer")
            if self.n_wa_pattern < 0:
                raise ValueError("qwen25vl: n_wa_pattern must be >= 0")
            if self.window_size != QWEN25VL_WINDOW_SIZE:
                logger.warning(
                    "qwen25vl: window_size=%d is written as metadata but clip.cpp always uses %d",
                    self.window_size, QWEN25VL_WINDOW_SIZE,
                )


def effective_pixel_limits(
    dims: VisionDims, *, image_min_tokens: int = 0, image_max_tokens: int = 0
) -> tuple[int, int]:
    """Return the (min_pixels, max_pixels) clip.cpp uses for a qwen25vl projector."""
    patch_area = dims.patch_size * dims.patch_size * dims.spatial_merge * dims.spatial_merge
    n_min = image_min_tokens if image_min_tokens > 0 else QWEN25VL_MIN_TOKENS
    n_max = image_max_tokens if image_max_tokens > 0 else QWEN25VL_MAX_TOKENS
    return n_min * patch_area, n_max * patch_area


def _smart_resize(width: int, height: int, align: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Mirror img_tool::calc_size_preserved_ratio (float32 arithmetic as in C++)."""
    f32 = np.float32
    fa = f32(align)

    def round_by(x: np.float32) -> int:
        q = float(f32(x) / fa)
        return int(math.floor(q + 0.5)) * align  # std::round: half away from zero (x >= 0)

    def ceil_by(x: np.float32) -> int:
        return int(math.ceil(float(f32(x) / fa))) * align

    def floor_by(x: np.float32) -> int:
        return int(math.floor(float(f32(x) / fa))) * align

    if width <= 0 or height <= 0:
        return 0, 0
    w_bar = max(align, round_by(f32(width)))
    h_bar = max(align, round_by(f32(height)))
    if max_pixels > 0 and h_bar * w_bar > max_pixels:
        beta = np.sqrt(f32(height) * f32(width) / f32(max_pixels), dtype=np.float32)
        h_bar = max(align, floor_by(f32(height) / beta))
        w_bar = max(align, floor_by(f32(width) / beta))
    elif min_pixels > 0 and h_bar * w_bar < min_pixels:
        beta = np.sqrt(f32(min_pixels) / (f32(height) * f32(width)), dtype=np.float32)
        h_bar = ceil_by(f32(height) * beta)
        w_bar = ceil_by(f32(width) * beta)
    return w_bar, h_bar


def _glm5v_canvas(width: int, height: int, factor: int, min_px: int, max_px: int) -> tuple[int, int]:
    """Mirror mtmd_image_preprocessor_glm5v: the canvas ceil-aligned to `factor`, grown to min_px (content scaled
    up), or the largest content height whose aligned canvas fits max_px (binary search, as in C++)."""
    def align(v: int) -> int:
        return (v + factor - 1) // factor * factor

    canvas_h, canvas_w = align(height), align(width)
    if canvas_h * canvas_w < min_px:
        scale = math.sqrt(min_px / (height * width))
        canvas_h = align(max(1, math.ceil(height * scale)))
        canvas_w = align(max(1, math.ceil(width * scale)))
    if canvas_h * canvas_w > max_px:
        lo, hi, best_h, best_w = 1, height, factor, factor
        while lo <= hi:
            ch = (lo + hi) // 2
            cw = max(1, width * ch // height)
            if align(ch) * align(cw) <= max_px:
                best_h, best_w, lo = align(ch), align(cw), ch + 1
            else:
                hi = ch - 1
        canvas_h, canvas_w = best_h, best_w
    return canvas_w, canvas_h


def expected_image_grid(
    dims: VisionDims, width: int, height: int, *, image_min_tokens: int = 0, image_max_tokens: int = 0
) -> tuple[int, int]:
    """Return (nx, ny) of the LLM-token grid mtmd produces for an input image of width x height."""
    dims.validate()
    if dims.family in ("llava", "ldpv2", "janus_pro", "nemotron_v2_vl"):
        # fixed-size preprocessor: always resized/padded to image_size x image_size (ldpv2 / nemotron then merge)
        n = dims.image_size // dims.patch_size // (1 if dims.family in ("llava", "janus_pro") else 2)
        return n, n
    min_px, max_px = effective_pixel_limits(
        dims, image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens
    )
    align = dims.patch_size * dims.spatial_merge
    if dims.family == "glm5v":
        w, h = _glm5v_canvas(width, height, align, min_px, max_px)
    else:
        w, h = _smart_resize(width, height, align, min_px, max_px)
    return w // align, h // align


def expected_image_tokens(
    dims: VisionDims, width: int, height: int, *, image_min_tokens: int = 0, image_max_tokens: int = 0
) -> int:
    """Number of image tokens mtmd emits for a width x height image (resize/pad or smart-resize)."""
    nx, ny = expected_image_grid(
        dims, width, height, image_min_tokens=image_min_tokens, image_max_tokens=image_max_tokens
    )
    return nx * ny


class _Init:
    """Seeded weight factory."""

    def __init__(self, seed: int, std: float) -> None:
        """Create the RNG."""
        self.rng = np.random.default_rng(seed)
        self.std = std

    def normal(self, *shape: int, std: float | None = None) -> np.ndarray:
        """Gaussian weights (float32) in PyTorch (row-major) layout."""
        s = self.std if std is None else std
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(s)).astype(np.float32)

    @staticmethod
    def ones(n: int) -> np.ndarray:
        """Norm weight."""
        return np.ones(n, dtype=np.float32)

    @staticmethod
    def zeros(n: int) -> np.ndarray:
        """Norm bias."""
        return np.zeros(n, dtype=np.float32)


def _linear(init: _Init, prefix: str, n_in: int, n_out: int, bias: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yield weight [n_out, n_in] (ggml ne = [n_in, n_out]) and optional bias."""
    yield f"{prefix}.weight", init.normal(n_out, n_in)
    if bias:
        yield f"{prefix}.bias", init.normal(n_out)


def _llava_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a CLIP ViT + mlp projector (LLaVA-1.5 layout)."""
    e, p = d.n_embd, d.patch_size
    n_pos = (d.image_size // p) ** 2 + 1
    yield "v.class_embd", init.normal(e)
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.position_embd.weight", init.normal(n_pos, e)
    yield "v.pre_ln.weight", init.ones(e)
    yield "v.pre_ln.bias", init.zeros(e)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield from _linear(init, f"{b}.attn_q", e, e)
        yield from _linear(init, f"{b}.attn_k", e, e)
        yield from _linear(init, f"{b}.attn_v", e, e)
        yield from _linear(init, f"{b}.attn_out", e, e)
        yield f"{b}.ln1.weight", init.ones(e)
        yield f"{b}.ln1.bias", init.zeros(e)
        yield from _linear(init, f"{b}.ffn_up", e, d.n_ff)
        yield from _linear(init, f"{b}.ffn_down", d.n_ff, e)
        yield f"{b}.ln2.weight", init.ones(e)
        yield f"{b}.ln2.bias", init.zeros(e)
    yield from _linear(init, "mm.0", e, d.proj_dim)
    yield from _linear(init, "mm.2", d.proj_dim, d.proj_dim)


def _qwen25vl_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a Qwen2.5-VL vision tower + patch merger."""
    e, p = d.n_embd, d.patch_size
    merged = e * d.spatial_merge * d.spatial_merge
    # Conv3D (temporal kernel 2) split into two Conv2D kernels, no bias
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.patch_embd.weight.1", init.normal(e, 3, p, p)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", init.ones(e)
        yield from _linear(init, f"{b}.attn_q", e, e)
        yield from _linear(init, f"{b}.attn_k", e, e)
        yield from _linear(init, f"{b}.attn_v", e, e)
        yield from _linear(init, f"{b}.attn_out", e, e)
        yield f"{b}.ln2.weight", init.ones(e)
        yield from _linear(init, f"{b}.ffn_gate", e, d.n_ff)
        yield from _linear(init, f"{b}.ffn_up", e, d.n_ff)
        yield from _linear(init, f"{b}.ffn_down", d.n_ff, e)
    yield "v.post_ln.weight", init.ones(e)  # merger.ln_q (RMSNorm)
    yield from _linear(init, "mm.0", merged, merged)
    yield from _linear(init, "mm.2", merged, d.proj_dim)


def _ldpv2_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a MobileVLM-V2 projector on the LLaVA ViT (llava.cpp PROJECTOR_TYPE_LDPV2)."""
    for name, arr in _llava_tensors(d, init):
        if not name.startswith("mm."):
            yield name, arr
    yield from _linear(init, "mm.model.mlp.0", d.n_embd, d.proj_dim)
    yield from _linear(init, "mm.model.mlp.2", d.proj_dim, d.proj_dim)
    yield "mm.model.peg.0.weight", init.normal(d.proj_dim, 1, 3, 3)  # depthwise 3x3
    yield "mm.model.peg.0.bias", init.normal(d.proj_dim)


def _qwen3vl_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a Qwen3-VL vision tower (qwen3vl.cpp): fused QKV, LayerNorm, learned positions, deepstack."""
    e, p = d.n_embd, d.patch_size
    merged = e * d.spatial_merge * d.spatial_merge
    n_pos = (d.image_size // p) ** 2
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.patch_embd.weight.1", init.normal(e, 3, p, p)
    yield "v.patch_embd.bias", init.normal(e)
    yield "v.position_embd.weight", init.normal(n_pos, e)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", init.ones(e)
        yield f"{b}.ln1.bias", init.zeros(e)
        yield from _linear(init, f"{b}.attn_qkv", e, 3 * e)
        yield from _linear(init, f"{b}.attn_out", e, e)
        yield f"{b}.ln2.weight", init.ones(e)
        yield f"{b}.ln2.bias", init.zeros(e)
        yield from _linear(init, f"{b}.ffn_up", e, d.n_ff)
        yield from _linear(init, f"{b}.ffn_down", d.n_ff, e)
    if d.family == "ling3vl":  # ling3vl.cpp: LayerNorm per patch, then the MLP over each 2x2 group's 4 rows
        yield "mm.input_norm.weight", 1.0 + init.normal(e)
        yield "mm.input_norm.bias", init.normal(e)
        yield from _linear(init, "mm.0", merged, merged)
        yield from _linear(init, "mm.2", merged, d.proj_dim)
        return
    yield "v.post_ln.weight", init.ones(e)
    yield "v.post_ln.bias", init.zeros(e)
    yield from _linear(init, "mm.0", merged, merged)
    yield from _linear(init, "mm.2", merged, d.proj_dim)
    for il in d.deepstack_layers:
        b = f"v.deepstack.{il}"
        yield f"{b}.norm.weight", init.ones(merged)
        yield f"{b}.norm.bias", init.zeros(merged)
        yield from _linear(init, f"{b}.fc1", merged, merged)
        yield from _linear(init, f"{b}.fc2", merged, d.proj_dim)


def _fused_gqa_tower(d: VisionDims, init: _Init, *, sinks: bool) -> Iterator[tuple[str, np.ndarray]]:
    """Two patch convs and RMSNorm / SwiGLU blocks with one fused grouped-query QKV (EXAONE 4.5, MiMo-VL), with
    per-head attention sinks after each block's output projection when `sinks`."""
    e, p = d.n_embd, d.patch_size
    kv_dim = (d.n_head_kv or d.n_head) * (e // d.n_head)
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.patch_embd.weight.1", init.normal(e, 3, p, p)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", 1.0 + init.normal(e)
        yield from _linear(init, f"{b}.attn_qkv", e, e + 2 * kv_dim)
        yield from _linear(init, f"{b}.attn_out", e, e)
        if sinks:
            yield f"{b}.attn_sinks", init.normal(d.n_head, std=1.0)
        yield f"{b}.ln2.weight", 1.0 + init.normal(e)
        yield from _linear(init, f"{b}.ffn_gate", e, d.n_ff)
        yield from _linear(init, f"{b}.ffn_up", e, d.n_ff)
        yield from _linear(init, f"{b}.ffn_down", d.n_ff, e)


def _exaone4_5_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of an EXAONE 4.5 vision tower (exaone4_5.cpp): Qwen2.5-VL's with a fused, grouped-query QKV."""
    merged = d.n_embd * d.spatial_merge * d.spatial_merge
    yield from _fused_gqa_tower(d, init, sinks=False)
    yield "v.post_ln.weight", init.ones(d.n_embd)
    yield from _linear(init, "mm.0", merged, merged)
    yield from _linear(init, "mm.2", merged, d.proj_dim)


def _mimovl_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a MiMo-VL vision tower (mimovl.cpp; names as clip.cpp loads them)."""
    merged = d.n_embd * d.spatial_merge * d.spatial_merge
    yield from _fused_gqa_tower(d, init, sinks=True)
    yield "v.post_ln.weight", init.ones(d.n_embd)
    yield "v.post_ln.bias", init.zeros(d.n_embd)
    yield from _linear(init, "mm.0", merged, merged, bias=False)
    yield from _linear(init, "mm.2", merged, d.proj_dim, bias=False)


def _paddleocr_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a PaddleOCR-VL vision tower + projector (paddleocr.cpp; names as clip.cpp loads them)."""
    e, p = d.n_embd, d.patch_size
    merged = e * d.spatial_merge * d.spatial_merge
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.patch_embd.bias", init.normal(e)
    yield "v.position_embd.weight", init.normal((d.image_size // p) ** 2, e)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", 1.0 + init.normal(e)
        yield f"{b}.ln1.bias", init.normal(e)
        for x in "qkv":
            yield from _linear(init, f"{b}.attn_{x}", e, e)
        yield from _linear(init, f"{b}.attn_out", e, e)
        yield f"{b}.ln2.weight", 1.0 + init.normal(e)
        yield f"{b}.ln2.bias", init.normal(e)
        yield from _linear(init, f"{b}.ffn_up", e, d.n_ff)
        yield from _linear(init, f"{b}.ffn_down", d.n_ff, e)
    yield "v.post_ln.weight", init.ones(e)
    yield "v.post_ln.bias", init.zeros(e)
    yield "mm.input_norm.weight", init.ones(e)
    yield "mm.input_norm.bias", init.zeros(e)
    yield from _linear(init, "mm.1", merged, merged)
    yield from _linear(init, "mm.2", merged, d.proj_dim)


def _dots_ocr_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a dots.ocr vision tower + projector (dotsocr.cpp; names as clip.cpp loads them)."""
    e, p = d.n_embd, d.patch_size
    merged = e * d.spatial_merge * d.spatial_merge
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.patch_embd.bias", init.normal(e)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", 1.0 + init.normal(e)
        for x in "qkv":
            yield from _linear(init, f"{b}.attn_{x}", e, e, bias=False)
        yield from _linear(init, f"{b}.attn_out", e, e)
        yield f"{b}.ln2.weight", 1.0 + init.normal(e)
        yield from _linear(init, f"{b}.ffn_gate", e, d.n_ff, bias=False)
        yield from _linear(init, f"{b}.ffn_up", e, d.n_ff, bias=False)
        yield from _linear(init, f"{b}.ffn_down", d.n_ff, e, bias=False)
    yield "mm.post_norm.weight", 1.0 + init.normal(e)
    yield "mm.input_norm.weight", init.ones(e)
    yield "mm.input_norm.bias", init.zeros(e)
    yield from _linear(init, "mm.0", merged, merged)
    yield from _linear(init, "mm.2", merged, d.proj_dim)


def _siglip_mlp_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a Janus-Pro / Phi-4 SigLIP tower + MLP projector (siglip.cpp; names as clip.cpp loads them)."""
    e = d.n_embd
    for name, arr in _paddleocr_tensors(d, init):  # the same SigLIP tower (patch bias, positions, LN blocks)
        if not name.startswith("mm."):
            yield name, arr
    yield from _linear(init, "mm.0", e, d.proj_dim)
    yield from _linear(init, "mm.1" if d.family == "janus_pro" else "mm.2", d.proj_dim, d.proj_dim)


def _llama4_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a Llama 4 vision tower + adapter (llama4.cpp; names as clip.cpp loads them)."""
    e, p = d.n_embd, d.patch_size
    merged = e * d.spatial_merge * d.spatial_merge
    yield "v.patch_embd.weight", init.normal(e, 3 * p * p)  # a matrix: the graph multiplies im2col rows by it
    yield "v.class_embd", init.normal(e)
    yield "v.position_embd.weight", init.normal((d.image_size // p) ** 2 + 1, e)  # the class token's row last
    yield "v.pre_ln.weight", 1.0 + init.normal(e)
    yield "v.pre_ln.bias", init.normal(e)
    for name, arr in _paddleocr_tensors(d, init):  # LayerNorm blocks with biased q / k / v, GELU MLP
        if name.startswith("v.blk."):
            yield name, arr
    yield "v.post_ln.weight", init.ones(e)
    yield "v.post_ln.bias", init.zeros(e)
    yield "mm.model.mlp.1.weight", init.normal(2 * d.proj_dim, merged)
    yield "mm.model.mlp.2.weight", init.normal(d.proj_dim, 2 * d.proj_dim)
    yield "mm.model.fc.weight", init.normal(d.proj_dim, d.proj_dim)


def _minimax_m3_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a MiniMax-M3 vision tower + projector (minimax-m3.cpp; names as clip.cpp loads them)."""
    e, p = d.n_embd, d.patch_size
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.patch_embd.weight.1", init.normal(e, 3, p, p)
    for name, arr in _paddleocr_tensors(d, init):  # LayerNorm blocks with biased q / k / v, an up / down MLP
        if name.startswith("v.blk."):
            yield name, arr
    yield from _linear(init, "mm.1", e, 2 * e)
    yield from _linear(init, "mm.2", 2 * e, e)
    yield from _linear(init, "mm.merger.fc1", 4 * e, 4 * e)
    yield from _linear(init, "mm.merger.fc2", 4 * e, d.proj_dim)


def _kimik25_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a Kimi-K2.5 vision tower (kimik25.cpp): kimivl's, with the position table stored [H, W, C]."""
    side = d.image_size // d.patch_size
    for name, arr in _paddleocr_tensors(d, init):
        yield name, (arr.reshape(side, side, d.n_embd) if name == "v.position_embd.weight" else arr)


def _nemotron_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a Nemotron Nano VL vision tower + projector (nemotron-v2-vl.cpp; names as clip.cpp loads them)."""
    e = d.n_embd
    merged = e * d.spatial_merge * d.spatial_merge
    for name, arr in _paddleocr_tensors(d, init):  # biased patch conv, positions, LayerNorm blocks, GELU MLP
        if not name.startswith("mm."):
            yield name, arr
    yield "v.class_embd", init.normal(4, e)  # 4 register tokens, prepended
    yield "mm.model.mlp.0.weight", 1.0 + init.normal(merged)
    yield "mm.model.mlp.1.weight", init.normal(2 * d.proj_dim, merged)
    yield "mm.model.mlp.3.weight", init.normal(d.proj_dim, 2 * d.proj_dim)


def _glm4v_tensors(d: VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of a GLM-4.1V vision tower + projector (glm4v.cpp; tensor names as clip.cpp loads them)."""
    e, p, m = d.n_embd, d.patch_size, d.spatial_merge
    n_pos = (d.image_size // p) ** 2
    yield "v.patch_embd.weight", init.normal(e, 3, p, p)
    yield "v.patch_embd.weight.1", init.normal(e, 3, p, p)
    yield "v.patch_embd.bias", init.normal(e)
    yield "v.norm_embd.weight", 1.0 + init.normal(e)
    yield "v.position_embd.weight", init.normal(n_pos, e)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", 1.0 + init.normal(e)
        yield from _linear(init, f"{b}.attn_qkv", e, 3 * e, bias=False)
        yield from _linear(init, f"{b}.attn_out", e, e, bias=False)
        yield f"{b}.ln2.weight", 1.0 + init.normal(e)
        yield from _linear(init, f"{b}.ffn_gate", e, d.n_ff, bias=False)
        yield from _linear(init, f"{b}.ffn_up", e, d.n_ff, bias=False)
        yield from _linear(init, f"{b}.ffn_down", d.n_ff, e, bias=False)
    yield "v.post_ln.weight", 1.0 + init.normal(e)
    yield "mm.patch_merger.weight", init.normal(d.proj_dim, e, m, m)  # Conv2d(e, proj, m, stride m)
    yield "mm.patch_merger.bias", init.normal(d.proj_dim)
    yield from _linear(init, "mm.model.fc", d.proj_dim, d.proj_dim, bias=False)
    yield "mm.post_norm.weight", init.ones(d.proj_dim)
    yield "mm.post_norm.bias", init.zeros(d.proj_dim)
    yield from _linear(init, "mm.gate", d.proj_dim, 2 * d.proj_dim, bias=False)
    yield from _linear(init, "mm.up", d.proj_dim, 2 * d.proj_dim, bias=False)
    yield from _linear(init, "mm.down", 2 * d.proj_dim, d.proj_dim, bias=False)


def clip_vision_kv(image_size: int, patch_size: int, n_embd: int, n_ff: int, n_layer: int, proj_dim: int,
                   n_head: int, eps: float) -> list[tuple[str, object]]:
    """The clip.vision.* sizes every projector's loader reads, in the order every mmproj here writes them."""
    return [("clip.vision.image_size", image_size), ("clip.vision.patch_size", patch_size),
            ("clip.vision.embedding_length", n_embd), ("clip.vision.feed_forward_length", n_ff),
            ("clip.vision.block_count", n_layer), ("clip.vision.projection_dim", proj_dim),
            ("clip.vision.attention.head_count", n_head), ("clip.vision.attention.layer_norm_epsilon", eps)]


def add_clip_kv(w: gguf.GGUFWriter, name: str, description: str, file_type: int,
                kv: Iterable[tuple[str, object]], projector_type: str | None = None) -> None:
    """An mmproj's metadata: general.* and the encoder flags, then (when given) clip.projector_type, then ``kv`` in
    order, each written by its Python type (bool, int -> uint32, float -> float32, str, list -> array)."""
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_description(description)
    w.add_file_type(int(file_type))
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    if projector_type is not None:
        w.add_string("clip.projector_type", projector_type)
    for key, value in kv:
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))


def write_tensors(w: gguf.GGUFWriter, tensors: Iterable[tuple[str, np.ndarray]],
                  store: Callable[[str, np.ndarray], np.ndarray] | None = None) -> int:
    """Add ``tensors`` in order (through ``store``, e.g. a dtype cast), write the file and close the writer;
    returns the number of parameters."""
    n_params = 0
    try:
        for tname, arr in tensors:
            n_params += int(arr.size)
            w.add_tensor(tname, np.ascontiguousarray(store(tname, arr) if store is not None else arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return n_params


def _write_kv(w: gguf.GGUFWriter, d: VisionDims, name: str, ftype: str, description: str | None = None) -> None:
    """Write the clip.* metadata the loader reads."""
    kv = clip_vision_kv(d.image_size, d.patch_size, d.n_embd, d.n_ff, d.n_layer, d.proj_dim, d.n_head, d.eps)
    kv += [("clip.vision.image_mean", _CLIP_MEAN), ("clip.vision.image_std", _CLIP_STD)]
    if d.family in ("llava", "ldpv2"):
        # neither use_gelu nor use_silu -> quick-GELU in the ViT MLP, as CLIP ViT-L/14
        kv += [("clip.projector_type", "mlp" if d.family == "llava" else "ldpv2"),
               ("clip.has_llava_projector", True), ("clip.use_gelu", False)]
    elif d.family == "exaone4_5":  # clip.cpp requires the pixel limits for it
        min_px, max_px = effective_pixel_limits(d)
        kv += [("clip.projector_type", "exaone4_5"), ("clip.use_silu", True),
               ("clip.vision.n_wa_pattern", d.n_wa_pattern), ("clip.vision.spatial_merge_size", d.spatial_merge),
               ("clip.vision.attention.head_count_kv", d.n_head_kv or d.n_head),
               ("clip.vision.image_min_pixels", min_px), ("clip.vision.image_max_pixels", max_px)]
    elif d.family == "mimovl":  # clip.cpp requires every one of these for it
        min_px, max_px = effective_pixel_limits(d)
        kv += [("clip.projector_type", "mimovl"), ("clip.use_silu", True),
               ("clip.vision.spatial_merge_size", d.spatial_merge),
               ("clip.vision.attention.head_count_kv", d.n_head_kv or d.n_head),
               ("clip.vision.window_size", d.window_rows), ("clip.vision.wa_pattern_mode", list(d.window_modes)),
               ("clip.vision.image_min_pixels", min_px), ("clip.vision.image_max_pixels", max_px)]
    elif d.family == "paddleocr":  # clip.cpp requires the pixel limits; it fixes the 2x2 merge itself
        min_px, max_px = effective_pixel_limits(d)
        kv += [("clip.projector_type", "paddleocr"), ("clip.use_gelu", True),
               ("clip.vision.image_min_pixels", min_px), ("clip.vision.image_max_pixels", max_px)]
    elif d.family in ("janus_pro", "phi4"):
        kv += [("clip.projector_type", d.family), ("clip.use_gelu", True)]
        if d.family == "phi4":  # clip.cpp requires the pixel limits for it (no merge: spatial_merge 1)
            min_px, max_px = effective_pixel_limits(d)
            kv += [("clip.vision.image_min_pixels", min_px), ("clip.vision.image_max_pixels", max_px)]
    elif d.family == "nemotron_v2_vl":
        kv += [("clip.projector_type", "nemotron_v2_vl"), ("clip.use_gelu", True),
               ("clip.vision.projector.scale_factor", d.spatial_merge)]
    elif d.family == "minimax_m3":
        kv += [("clip.projector_type", "minimax_m3"), ("clip.vision.spatial_merge_size", d.spatial_merge)]
    elif d.family == "llama4":
        kv += [("clip.projector_type", "llama4"), ("clip.use_gelu", True),
               ("clip.vision.projector.scale_factor", d.spatial_merge)]
    elif d.family in ("kimivl", "kimik25"):
        kv += [("clip.projector_type", d.family), ("clip.use_gelu", True),
               ("clip.vision.projector.scale_factor", d.spatial_merge)]
    elif d.family == "dots_ocr":  # clip.cpp requires all three for it
        min_px, max_px = effective_pixel_limits(d)
        kv += [("clip.projector_type", "dots_ocr"), ("clip.use_silu", True),
               ("clip.vision.projector.scale_factor", d.spatial_merge),
               ("clip.vision.image_min_pixels", min_px), ("clip.vision.image_max_pixels", max_px)]
    elif d.family in ("qwen3vl", "ling3vl"):
        kv += [("clip.projector_type", "qwen3vl_merger" if d.family == "qwen3vl" else "ling3vl"),
               ("clip.use_gelu", True),
               ("clip.vision.spatial_merge_size", d.spatial_merge)]
    elif d.family in ("glm4v", "glm5v"):
        kv += [("clip.projector_type", d.family), ("clip.use_silu", True),
               ("clip.vision.spatial_merge_size", d.spatial_merge)]
        if d.family == "glm5v":  # clip.cpp requires all three for glm5v
            min_px, max_px = effective_pixel_limits(d)
            kv += [("clip.vision.swiglu_clamp", float(d.swiglu_clamp)), ("clip.vision.image_min_pixels", min_px),
                   ("clip.vision.image_max_pixels", max_px)]
    else:
        kv += [("clip.projector_type", "qwen2.5vl_merger"), ("clip.use_silu", True),
               ("clip.vision.n_wa_pattern", d.n_wa_pattern), ("clip.vision.window_size", d.window_size),
               ("clip.vision.spatial_merge_size", d.spatial_merge)]
        if d.image_min_pixels is not None:
            kv.append(("clip.vision.image_min_pixels", d.image_min_pixels))
        if d.image_max_pixels is not None:
            kv.append(("clip.vision.image_max_pixels", d.image_max_pixels))
    add_clip_kv(w, name, description if description is not None else f"random-weight {d.family} mmproj for tests",
                _FTYPES[ftype], kv)


def _store_dtype(name: str, arr: np.ndarray, ftype: str) -> np.ndarray:
    """Cast matrices/convs to f16 for ftype f16; keep 1-D tensors and embeddings in f32."""
    if ftype == "f16" and arr.ndim >= 2 and name not in ("v.position_embd.weight",):
        return arr.astype(np.float16)
    if name == "mm.model.peg.0.weight":  # ggml's CPU depthwise conv (im2col) needs an f16 kernel
        return arr.astype(np.float16)
    return arr


def write_mmproj(
    path: str | os.PathLike,
    dims: VisionDims,
    *,
    seed: int,
    name: str,
    weight_std: float = 0.02,
    ftype: str = "f32",
) -> dict:
    """Write a deterministic random-weight mmproj GGUF and return info about it."""
    dims.validate()
    if ftype not in _FTYPES:
        raise ValueError(f"ftype must be one of {sorted(_FTYPES)}, got {ftype!r}")
    path = os.fspath(path)
    init = _Init(seed, weight_std)
    gen = {"llava": _llava_tensors, "qwen25vl": _qwen25vl_tensors, "qwen3vl": _qwen3vl_tensors,
           "ling3vl": _qwen3vl_tensors, "exaone4_5": _exaone4_5_tensors, "mimovl": _mimovl_tensors,
           "paddleocr": _paddleocr_tensors, "dots_ocr": _dots_ocr_tensors, "kimivl": _paddleocr_tensors,
           "janus_pro": _siglip_mlp_tensors, "phi4": _siglip_mlp_tensors, "llama4": _llama4_tensors,
           "minimax_m3": _minimax_m3_tensors, "kimik25": _kimik25_tensors, "nemotron_v2_vl": _nemotron_tensors,
           "glm4v": _glm4v_tensors, "glm5v": _glm4v_tensors, "ldpv2": _ldpv2_tensors}[dims.family]

    writer = gguf.GGUFWriter(path, "clip")
    _write_kv(writer, dims, name, ftype)
    n_params = write_tensors(writer, gen(dims, init), lambda tname, arr: _store_dtype(tname, arr, ftype))

    info = {
        "path": path,
        "family": dims.family,
        "n_image_tokens": expected_image_tokens(dims, dims.image_size, dims.image_size),
        "image_grid": expected_image_grid(dims, dims.image_size, dims.image_size),
        "file_size": os.path.getsize(path),
        "n_params": n_params,
        "n_blocks_run": dims.n_layer - 1 if dims.family in ("llava", "ldpv2") else dims.n_layer,
    }
    logger.info("wrote %s mmproj %s (%d params, %d bytes)", dims.family, path, n_params, info["file_size"])
    return info


# Tensors clip.cpp treats as optional for the llava graph.
_LLAVA_OPTIONAL = {"v.class_embd", "v.pre_ln.weight", "v.pre_ln.bias", "v.patch_embd.bias"}


def write_mmproj_weights(
    path: str | os.PathLike,
    dims: VisionDims,
    weights: dict[str, np.ndarray],
    *,
    name: str,
    description: str = "trained llava mmproj",
    ftype: str = "f32",
) -> dict:
    """Write given (trained) weights (PyTorch layout, GGUF tensor names) as an mmproj GGUF (llava or qwen25vl).

    llava: the tensors ``write_mmproj`` writes, except the optional ``v.class_embd`` and ``v.pre_ln.*``; without
    ``v.class_embd`` clip.cpp feeds all patch rows 0..N-1 to the projector and ``v.position_embd.weight`` needs
    N rows (N + 1 with a class embedding). qwen25vl: exactly the tensors ``write_mmproj`` writes. Tensors are
    written in the order given.
    """
    dims.validate()
    if dims.family not in ("llava", "qwen25vl"):
        raise ValueError("write_mmproj_weights supports the llava and qwen25vl families only")
    if ftype not in _FTYPES:
        raise ValueError(f"ftype must be one of {sorted(_FTYPES)}, got {ftype!r}")
    gen = _llava_tensors if dims.family == "llava" else _qwen25vl_tensors
    reference = {n: a.shape for n, a in gen(dims, _Init(0, 1.0))}
    optional: set[str] = set()
    has_cls = False
    if dims.family == "llava":
        reference["v.patch_embd.bias"] = (dims.n_embd,)
        n_patches = (dims.image_size // dims.patch_size) ** 2
        has_cls = "v.class_embd" in weights
        reference["v.position_embd.weight"] = (n_patches + int(has_cls), dims.n_embd)
        optional = _LLAVA_OPTIONAL
    missing = sorted(set(reference) - set(weights) - optional)
    unknown = sorted(set(weights) - set(reference))
    if missing or unknown:
        raise ValueError(f"missing tensors {missing}, unexpected tensors {unknown}")
    path = os.fspath(path)
    arrays = {tname: np.asarray(arr, dtype=np.float32) for tname, arr in weights.items()}
    for tname, arr in arrays.items():
        if arr.shape != reference[tname]:
            raise ValueError(f"{tname}: shape {arr.shape}, expected {reference[tname]}")
    writer = gguf.GGUFWriter(path, "clip")
    _write_kv(writer, dims, name, ftype, description)
    n_params = write_tensors(writer, arrays.items(), lambda tname, arr: _store_dtype(tname, arr, ftype))
    info = {"path": path, "family": dims.family,
            "n_image_tokens": expected_image_tokens(dims, dims.image_size, dims.image_size),
            "file_size": os.path.getsize(path), "n_params": n_params,
            "n_blocks_run": dims.n_layer - 1 if dims.family == "llava" else dims.n_layer, "class_embd": has_cls}
    logger.info("wrote trained %s mmproj %s (%d params, %d bytes)", dims.family, path, n_params, info["file_size"])
    return info
