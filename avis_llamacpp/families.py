"""One registry of vision families, keyed by the mmproj's `clip.projector_type`.

Each entry owns everything family-specific: which encoder tensor holds the last block's keys, how captured
rows become one key per LLM image token (merge groups averaged, window order undone, pooling groups, tokens
that are always kept and never scored), the token grid, the encoder's work for FLOPs accounting, pre-flight
tensor requirements and the chat format. Capture, prefill, FLOPs and pre-flight read this module; nothing
else names a projector type. Pure numpy: no llama.cpp calls.

Adding a family: see README "Adding a model family" (entry here, fixture in convert/, reference test, README
row).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from .flops import VisionDims as EncoderDims
from .kdv import merge_groups, vit_keys_to_token_keys

logger = logging.getLogger(__name__)

# tensor-name prefixes the encoder graphs give attention keys with cb(); the later one in a block wins
KEY_NAMES_POST_ROPE_FIRST = ("Kcur_rope", "Kcur_pos", "Kcur")


@dataclass(frozen=True)
class VisionInfo:
    """What the key-to-token mapping needs from the mmproj's metadata (read by mtmd.read_vision_info)."""

    projector_type: str | None
    patch_size: int
    n_wa_pattern: int
    window_size: int
    spatial_merge: int
    n_layer: int = 0
    n_embd: int = 0
    n_ff: int = 0
    image_size: int = 0
    scale_factor: int = 0  # clip.vision.projector.scale_factor (gemma3 / idefics3 / internvl / gemma4v)
    window_modes: tuple[int, ...] = ()  # clip.vision.wa_pattern_mode (mimovl: per block -1 full, 0 row, 1 column)


@dataclass(frozen=True)
class ChunkGeometry:
    """One encoded image chunk: mtmd's token count and reported grid, and the preprocessed image size the
    encoder saw (read off the graph's raw-input tensor during the encode; None when it was not seen)."""

    n_tokens: int
    nx: int
    ny: int
    image_wh: tuple[int, int] | None = None


@dataclass(frozen=True)
class TokenKeys:
    """Keys for the scored LLM image tokens: `keys[i]` belongs to token `scored[i]`; tokens not in `scored`
    (e.g. pixtral's row breaks) are always kept and never scored."""

    keys: np.ndarray  # [n_scored, H, D]
    scored: np.ndarray  # int64, ascending, indices into the chunk's n_tokens
    n_tokens: int

    @property
    def always_kept(self) -> np.ndarray:
        mask = np.ones(self.n_tokens, dtype=bool)
        mask[self.scored] = False
        return np.flatnonzero(mask).astype(np.int64)


def _all_scored(keys: np.ndarray) -> TokenKeys:
    return TokenKeys(keys, np.arange(keys.shape[0], dtype=np.int64), keys.shape[0])


class Family:
    """The fallback family: no native key mapping (KDV scores the projected embeddings instead).

    Subclasses override what differs; every method is pure and tested without a model."""

    name = "fallback"
    projector_types: tuple[str, ...] = ()
    native = False
    key_names: tuple[str, ...] = KEY_NAMES_POST_ROPE_FIRST
    gated_ffn = False
    chat_format: str | None = None  # None: the GGUF's own template
    # tensors clip.cpp needs for this projector besides the ViT blocks (pre-flight)
    required_tensors: tuple[str, ...] = ()
    # tensors whose presence makes clip.cpp abort for this projector
    forbidden_tensors: tuple[str, ...] = ()
    uniform_blocks = False  # every ViT block has the same tensors (a block missing one is a broken file)
    standard_blocks = True  # clip.cpp loads v.blk.* ViT blocks for this projector (pre-flight checks q/k/v)

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        """(nx, ny) of the chunk's LLM tokens as an image grid; a 1-row report is made square when it can be."""
        if geom.ny == 1 and geom.nx > 1:
            side = math.isqrt(geom.nx)
            if side * side == geom.nx:
                return side, side
        return geom.nx, geom.ny

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        """Captured encoder keys [n_rows, H, D] -> keys per LLM token, or None when the rows do not match
        the family's rule (the caller then falls back to the projected embeddings)."""
        return None

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        """ViT positions the encoder processes for a chunk of n_tokens LLM tokens (FLOPs accounting)."""
        return n_tokens

    def blocks_run(self, info: VisionInfo) -> int:
        """ViT blocks the graph runs (FLOPs accounting)."""
        return info.n_layer

    def encoder_dims(self, info: VisionInfo) -> EncoderDims:
        """What the encoder's FLOPs depend on: blocks run, widths, gating and attention windows."""
        return EncoderDims(self.blocks_run(info), info.n_embd, info.n_ff, gated_ffn=self.gated_ffn)

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """The embedding size the projector outputs, as clip_n_mmproj_embd computes it, where known."""
        return None

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        """Non-block tensors clip.cpp needs for this projector (pre-flight: missing ones would crash mtmd)."""
        return list(self.required_tensors)

    def required_per_block(self, il: int) -> list[str]:
        """Tensors every ViT block il must have for this projector (only checked when uniform_blocks)."""
        return []

    def token_cells(self, n_tokens: int, grid: tuple[int, int]) -> np.ndarray:
        """The row-major cell (y * nx + x) of the nx x ny token grid that each LLM image token covers, in LLM
        token order (for drawing kept tokens over the image); row-major tokens unless the family says otherwise."""
        return np.arange(n_tokens, dtype=np.int64)

    # mmproj tensors that some LLM image-token rows copy verbatim (see constant_rows)
    constant_row_tensors: tuple[str, ...] = ()

    def constant_rows(self, geom: ChunkGeometry, info: VisionInfo, n_key_rows: int | None) -> dict[str, np.ndarray]:
        """Token rows the graph fills with one fixed mmproj embedding: tensor name -> token indices. The encode
        restores them from the file, so a corrupt value there (e.g. NaN from an uninitialised buffer) never
        reaches the model."""
        return {}


class LlavaFamily(Family):
    """LLaVA-1.5 / 1.6, Yi-VL, Granite Vision 3 (CLIP ViT + MLP). clip.cpp's llava graph runs n_layer - 1
    blocks and appends the class embedding; the projector is fed rows 1..N (clip.cpp PROJECTOR_TYPE_MLP)."""

    name = "llava"
    projector_types = ("mlp", "mlp_norm")
    native = True
    chat_format = "llava-1-5"
    required_tensors = ("v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight", "mm.0.bias")
    uniform_blocks = True

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        n = geom.n_tokens
        if keys.shape[0] == n + 1:
            return _all_scored(keys[1:n + 1])
        if keys.shape[0] == n:
            return _all_scored(keys)
        return None

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return n_tokens + 1  # + class token

    def blocks_run(self, info: VisionInfo) -> int:
        return max(info.n_layer - 1, 0)

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.2.weight" in tensors and "mm.3.weight" not in tensors:
            return int(tensors["mm.2.weight"][0][1])
        if "mm.3.bias" in tensors:  # Yi-style llava (clip.cpp switches it to mlp_norm)
            return int(tensors["mm.3.bias"][0][0])
        return None

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        need = list(self.required_tensors)
        if "mm.3.weight" in tensors:  # Yi-style llava (clip.cpp's mlp_norm graph)
            need += ["mm.1.weight", "mm.1.bias", "mm.3.bias", "mm.4.weight", "mm.4.bias"]
        else:
            need += ["mm.2.weight", "mm.2.bias"]
        return need


class LdpFamily(LlavaFamily):
    """MobileVLM (ldp / ldpv2, llava.cpp): the llava ViT (n_layer - 1 blocks, rows 1..N feed the projector), then
    a 24 x 24 -> 12 x 12 reduction clip.cpp hard-codes: ldpv2 a 2x2 average pool (exact groups), ldp a 3x3
    stride-2 depthwise conv (the 2x2 group under each output is its centre; its keys are averaged)."""

    name = "mobilevlm"
    projector_types = ("ldp", "ldpv2")
    uniform_blocks = False
    grid = 24  # llava.cpp: int n_patch = 24
    required_tensors = ()

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        n_patch = self.grid * self.grid
        half = self.grid // 2
        if geom.n_tokens != half * half or keys.shape[0] not in (n_patch, n_patch + 1):
            return None
        rows = keys[1:n_patch + 1] if keys.shape[0] == n_patch + 1 else keys
        return _all_scored(merge_groups(rows, self.grid, self.grid, 2))

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return 4 * n_tokens + 1

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        return []

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        for name in ("mm.model.peg.0.bias", "mm.model.mb_block.1.block.2.1.bias"):
            if name in tensors:
                return int(tensors[name][0][0])
        return None


class QwenMergerFamily(Family):
    """Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni: 2x2 merge of 4 consecutive ViT rows per LLM token; Qwen2.5-VL's
    window attention reorders the rows by 112 px windows (clip.cpp never reads clip.vision.window_size)."""

    name = "qwen2vl"
    projector_types = ("qwen2vl_merger", "qwen2.5vl_merger", "qwen2.5o")
    native = True
    gated_ffn = True
    required_tensors = ("v.patch_embd.weight", "v.patch_embd.weight.1")
    forbidden_tensors = ("v.patch_embd.bias", "v.class_embd")
    uniform_blocks = True
    merge = 2  # clip.cpp hard-codes merge_ratio = 2 for Qwen2/2.5-VL
    window_px = 112

    def windowed(self, info: VisionInfo) -> bool:
        return info.projector_type in ("qwen2.5vl_merger", "qwen2.5o") and info.n_wa_pattern > 0

    def encoder_dims(self, info: VisionInfo) -> EncoderDims:
        dims = super().encoder_dims(info)
        if not self.windowed(info) or not info.patch_size:
            return dims
        side = self.window_px // info.patch_size // self.merge * self.merge  # clip.cpp's window, in patches
        return replace(dims, window_rows=side * side, full_every=info.n_wa_pattern)

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        nx, ny = self.token_grid(geom, info)
        m = self.merge
        if keys.shape[0] != geom.n_tokens * m * m or nx * ny != geom.n_tokens:
            return None
        window = self.window_px // info.patch_size if self.windowed(info) else None
        return _all_scored(vit_keys_to_token_keys(keys, nx * m, ny * m, m, window))

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return n_tokens * self.merge * self.merge

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.2.bias" in tensors:
            return int(tensors["mm.2.bias"][0][0])
        return None

    def required_per_block(self, il: int) -> list[str]:
        return [f"v.blk.{il}.attn_{x}.bias" for x in "qkv"]


class Exaone45Family(QwenMergerFamily):
    """EXAONE 4.5 vision (exaone4_5.cpp): the Qwen2.5-VL layout (2x2 merge of 4 consecutive rows, rows reordered by
    112 px windows when n_wa_pattern > 0; clip.cpp reads no window size for it) with one fused QKV projection and
    grouped-query attention: the keys `Kcur_rope-<il>` have n_head_kv heads (FLOPs count full-width K / V)."""

    name = "exaone4_5"
    projector_types = ("exaone4_5",)
    required_tensors = ("v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.0.bias", "mm.2.weight",
                        "mm.2.bias")
    forbidden_tensors = ("v.patch_embd.bias", "v.class_embd")

    def windowed(self, info: VisionInfo) -> bool:
        return info.n_wa_pattern > 0

    def required_per_block(self, il: int) -> list[str]:
        return [f"v.blk.{il}.attn_qkv.weight"]  # exaone4_5.cpp asserts the fused projection


class MimoVLFamily(QwenMergerFamily):
    """MiMo-VL vision (mimovl.cpp): 4 consecutive rows per 2x2 unit as in Qwen2-VL, but each block runs on the units
    in row order, or in column order (wa_pattern_mode 1: unit c * h + r holds unit r * w + c) for a banded window,
    so the last block's keys `Kcur_rope-<il>` come in column order when its mode is 1: undone here. Fused biased
    grouped-query QKV (n_head_kv key heads); FLOPs count full attention in the windowed blocks too."""

    name = "mimovl"
    projector_types = ("mimovl",)
    required_tensors = ("v.patch_embd.weight", "v.patch_embd.weight.1", "mm.0.weight", "mm.2.weight")
    forbidden_tensors = ("v.class_embd",)

    def windowed(self, info: VisionInfo) -> bool:
        return False

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        nx, ny = self.token_grid(geom, info)
        m = self.merge
        if keys.shape[0] != geom.n_tokens * m * m or nx * ny != geom.n_tokens:
            return None
        if info.window_modes and info.window_modes[-1] == 1:  # column order of units -> row order
            units = keys.reshape(nx, ny, m * m, *keys.shape[1:])  # [c, r, ...]: unit c * ny + r
            keys = units.transpose(1, 0, *range(2, units.ndim)).reshape(keys.shape)
        return _all_scored(vit_keys_to_token_keys(keys, nx * m, ny * m, m, None))

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_1_w (mm.2.weight) ne[1]."""
        return int(tensors["mm.2.weight"][0][1]) if "mm.2.weight" in tensors else None

    def required_per_block(self, il: int) -> list[str]:
        return [f"v.blk.{il}.attn_qkv.weight", f"v.blk.{il}.attn_qkv.bias"]  # mimovl.cpp uses both unchecked


class MiniMaxM3Family(QwenMergerFamily):
    """MiniMax-M3 vision (minimax-m3.cpp): the input permute puts each 2x2 merge group in 4 consecutive rows
    (row-major block order, no windows), keys `Kcur_pos-<il>` under a 3-axis NEOX RoPE; mtmd reports the chunk as a
    1 x N grid, so the token grid comes from the encoder's input size (patches / 2 per side)."""

    name = "minimax_m3"
    projector_types = ("minimax_m3",)
    gated_ffn = False
    required_tensors = ("v.patch_embd.weight", "v.patch_embd.weight.1", "mm.1.weight", "mm.1.bias", "mm.2.weight",
                        "mm.2.bias", "mm.merger.fc1.weight", "mm.merger.fc1.bias", "mm.merger.fc2.weight",
                        "mm.merger.fc2.bias")
    forbidden_tensors = ("v.patch_embd.bias", "v.class_embd")

    def windowed(self, info: VisionInfo) -> bool:
        return False

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        if geom.image_wh is not None and info.patch_size > 0:
            side = info.patch_size * self.merge
            tw, th = geom.image_wh[0] // side, geom.image_wh[1] // side
            if tw * th == geom.n_tokens:
                return tw, th
        return super().token_grid(geom, info)

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_merger_fc2_b ne[0]."""
        return int(tensors["mm.merger.fc2.bias"][0][0]) if "mm.merger.fc2.bias" in tensors else None

    def required_per_block(self, il: int) -> list[str]:
        return []


class Qwen3VLFamily(QwenMergerFamily):
    """Qwen3-VL, Qwen3.5 / 3.6, Qwen3-Omni vision (qwen3vl.cpp): a fused QKV split into strided views, 2-D
    M-RoPE keys `Kcur_rope-<il>`, 4 consecutive rows = one 2x2 token in row-major block order, no windows;
    deepstack adds features to each token, not tokens."""

    name = "qwen3vl"
    projector_types = ("qwen3vl_merger",)
    gated_ffn = False
    required_tensors = ("v.patch_embd.weight", "v.patch_embd.weight.1", "v.patch_embd.bias", "v.position_embd.weight")
    forbidden_tensors = ("v.class_embd",)

    def windowed(self, info: VisionInfo) -> bool:
        return False

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.2.bias" not in tensors:
            return None
        n_deepstack = len({n.split(".")[1] for n in tensors if n.startswith("v.deepstack.")
                           and n.endswith("fc2.bias")})
        return int(tensors["mm.2.bias"][0][0]) * (1 + n_deepstack)

    def required_per_block(self, il: int) -> list[str]:
        return [f"v.blk.{il}.attn_qkv.weight", f"v.blk.{il}.attn_qkv.bias"]


class Ling3VLFamily(Qwen3VLFamily):
    """Ling-3-VL (ling3vl.cpp): "same vision tower as qwen3vl", built with build_vit, so its 2-D M-RoPE keys are
    `Kcur_pos-<il>`; 4 consecutive rows = one 2x2 token as in Qwen3-VL. The merger is a LayerNorm and an MLP over
    each group's rows (mm.0 / mm.2), no deepstack; the patch bias is optional."""

    name = "ling3vl"
    projector_types = ("ling3vl",)
    required_tensors = ("v.patch_embd.weight", "v.patch_embd.weight.1", "v.position_embd.weight",
                        "mm.input_norm.weight", "mm.input_norm.bias", "mm.0.weight", "mm.0.bias", "mm.2.weight",
                        "mm.2.bias")

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_1_b (mm.2.bias) ne[0]."""
        return int(tensors["mm.2.bias"][0][0]) if "mm.2.bias" in tensors else None

    def required_per_block(self, il: int) -> list[str]:
        return []


class GLM4VFamily(QwenMergerFamily):
    """GLM-4.1V-4.6V, GLM-OCR, GLM-5V vision (clip.cpp builds glm4v.cpp for both projector types): the input
    permute puts each 2x2 merge group in 4 consecutive rows (row-major block order, no windows), 2-D M-RoPE keys
    `Kcur_pos-<il>` (fused QKV: `Kcur` is a strided view), SwiGLU blocks (clamped in glm5v); a 2x2 stride-2 conv
    merges the 4 rows of a token, then the FC / SwiGLU projector."""

    name = "glm4v"
    projector_types = ("glm4v", "glm5v")
    gated_ffn = True
    required_tensors = ("v.patch_embd.weight", "v.patch_embd.weight.1", "v.patch_embd.bias", "mm.patch_merger.weight",
                        "mm.patch_merger.bias", "mm.model.fc.weight", "mm.post_norm.weight", "mm.up.weight",
                        "mm.gate.weight", "mm.down.weight")
    forbidden_tensors = ("v.class_embd",)

    def windowed(self, info: VisionInfo) -> bool:
        return False

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_ffn_down_w->ne[1]."""
        if "mm.down.weight" in tensors:
            return int(tensors["mm.down.weight"][0][1])
        return None

    def required_per_block(self, il: int) -> list[str]:
        return []


class NoViTBlocksFamily(Family):
    """Projectors clip.cpp loads without the standard ViT blocks (MobileNetV5, TTS encoders): fallback only."""

    name = "no-vit-blocks"
    projector_types = ("gemma3nv", "qwen3tts_spkenc", "pockettts_gen")
    standard_blocks = False


_REGISTRY: dict[str, Family] = {}
FALLBACK = Family()


def register(family: Family) -> Family:
    """Add a family under each of its projector types (later registrations replace earlier ones)."""
    for p in family.projector_types:
        _REGISTRY[p] = family
    return family


for _f in (LlavaFamily(), LdpFamily(), QwenMergerFamily(), Exaone45Family(), MimoVLFamily(), MiniMaxM3Family(),
           Qwen3VLFamily(), Ling3VLFamily(), GLM4VFamily(), NoViTBlocksFamily()):
    register(_f)


def family_for(projector_type: str | None) -> Family:
    """The registered family of a projector type; the embeddings fallback for unknown or missing types."""
    if projector_type is None:
        return FALLBACK
    return _REGISTRY.get(projector_type, FALLBACK)


def registered() -> dict[str, Family]:
    """Projector type -> family, for docs and tests."""
    return dict(_REGISTRY)


def native_types() -> list[str]:
    """Projector types with native KDV (keys of the last ViT block)."""
    return sorted(p for p, f in _REGISTRY.items() if f.native)


class Gemma3Family(Family):
    """Gemma 3 4B / 12B / 27B (SigLIP ViT, tools/mtmd/models/siglip.cpp PROJECTOR_TYPE_GEMMA3).

    Every image is resized (letterboxed) to the fixed image_size square (mtmd_image_preprocessor_fixed_size),
    so the patch grid is P x P with P = image_size / patch_size (64 x 64 on real models). build_vit runs all
    n_layer blocks; no RoPE, so the last block's keys are `Kcur-(L-1)` ([d_head, n_head, P*P], row y*P + x).
    The graph then transposes the ViT output to a [P, P, n_embd] image and average-pools it k x k, stride k
    (k = n_merge: clip.vision.projector.scale_factor, default 4), and reshapes row-major, so LLM token
    by*(P/k) + bx is the mean of patches (x, y) with x in [bx*k, bx*k+k), y in [by*k, by*k+k): the token's key
    is the mean of those k*k keys. mtmd reports the chunk as nx = n_tokens, ny = 1; the grid is square.
    mtmd decodes the image tokens with non-causal attention (mtmd_decode_use_non_causal)."""

    name = "gemma3"
    projector_types = ("gemma3",)
    native = True
    key_names = ("Kcur",)
    required_tensors = ("v.patch_embd.weight", "mm.input_projection.weight", "mm.soft_emb_norm.weight")
    uniform_blocks = True
    default_pool = 4  # clip.cpp: hparams.n_merge = 4 unless the GGUF has clip.vision.projector.scale_factor
    non_causal_image = True  # mtmd_decode_use_non_causal(): the image chunk is decoded without a causal mask

    def pool(self, info: VisionInfo) -> int:
        return info.scale_factor if info.scale_factor > 0 else self.default_pool

    def patch_side(self, geom: ChunkGeometry, info: VisionInfo, n_rows: int | None = None) -> int | None:
        """P: from the encoder's input size when seen, else the mmproj's image_size, else sqrt(rows)."""
        if geom.image_wh is not None and info.patch_size > 0:
            w, h = geom.image_wh
            if w != h:
                return None  # siglip.cpp asserts a square patch grid for gemma3
            return w // info.patch_size
        if info.image_size > 0 and info.patch_size > 0:
            return info.image_size // info.patch_size
        if n_rows is not None and math.isqrt(n_rows) ** 2 == n_rows:
            return math.isqrt(n_rows)
        return None

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        p = self.patch_side(geom, info)
        if p is not None:
            side = p // self.pool(info)
            if side * side == geom.n_tokens:
                return side, side
        return super().token_grid(geom, info)

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        p, k = self.patch_side(geom, info, keys.shape[0]), self.pool(info)
        if p is None or keys.shape[0] != p * p:
            return None
        t = p // k  # ggml_pool_2d drops a remainder of p % k patches
        if t * t != geom.n_tokens:
            return None
        grid = keys.reshape(p, p, *keys.shape[1:])[:t * k, :t * k]  # [y, x, H, D]
        pooled = grid.reshape(t, k, t, k, *keys.shape[1:]).mean(axis=(1, 3))  # [by, bx, H, D]
        return _all_scored(pooled.reshape(t * t, *keys.shape[1:]))

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return n_tokens * self.pool(info) ** 2

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.input_projection.weight" in tensors:  # clip_n_mmproj_embd: mm_input_proj_w->ne[0]
            return int(tensors["mm.input_projection.weight"][0][0])
        return None


register(Gemma3Family())


class InternVLFamily(Family):
    """InternVL 2.5 / 3 / 3.5 (tools/mtmd/models/internvl.cpp): InternViT with the class token appended LAST
    (`ggml_concat(inp, cls, 1)`), learned position embeddings by row, all n_layer blocks (`build_vit`, keys
    `Kcur-(L-1)`: separate biased q/k/v, no RoPE); the class row is cut off (`ggml_view_3d(..., n_patches)`)
    and an s x s pixel shuffle (s = clip.vision.projector.scale_factor, 1 when absent) turns s x s patch blocks
    into one token. Every chunk (each image_size tile, then the thumbnail) is a square image_size input,
    mapped on its own; mtmd reports it as a 1 x N grid (no M-RoPE), so the patch grid comes from the encoder's
    input size (or the square root of the row count)."""

    name = "internvl"
    projector_types = ("internvl",)
    native = True
    key_names = ("Kcur",)
    required_tensors = ("v.class_embd", "v.position_embd.weight", "v.patch_embd.weight",
                        "mm.model.mlp.0.weight", "mm.model.mlp.0.bias", "mm.model.mlp.1.weight",
                        "mm.model.mlp.1.bias", "mm.model.mlp.3.weight", "mm.model.mlp.3.bias")
    uniform_blocks = True

    @staticmethod
    def scale(info: VisionInfo) -> int:
        return info.scale_factor if info.scale_factor > 0 else 1  # clip_hparams.n_merge defaults to 1

    def patch_grid(self, geom: ChunkGeometry, info: VisionInfo, n_patches: int) -> tuple[int, int] | None:
        """(width, height) in patches of the chunk's encoder input."""
        if geom.image_wh is not None and info.patch_size > 0:
            w, h = geom.image_wh[0] // info.patch_size, geom.image_wh[1] // info.patch_size
            if w * h == n_patches:
                return w, h
        side = math.isqrt(n_patches)
        return (side, side) if side * side == n_patches else None

    @staticmethod
    def shuffle_groups(width: int, height: int, s: int) -> np.ndarray:
        """[n_tokens, s*s] patch rows of each LLM token: internvl.cpp's pixel shuffle (reshape_4d to
        [n_embd*s, height/s, width], permute(0,2,1,3), cont_4d to [n_embd*s*s, height/s, width/s],
        permute(0,2,1,3), cont_3d) replayed on patch indices (numpy axes = ggml ne reversed). On the square
        tiles mtmd feeds it, token ty*(width/s)+tx holds patches (ty*s+dy, tx*s+dx)."""
        idx = np.arange(width * height).reshape(width, height // s, s)  # ggml [s, height/s, width]
        idx = idx.transpose(1, 0, 2)  # permute(0, 2, 1, 3) swaps ggml dims 1 and 2
        idx = idx.reshape(width // s, height // s, s * s)  # cont_4d [s*s, height/s, width/s]
        idx = idx.transpose(1, 0, 2)  # permute(0, 2, 1, 3)
        return idx.reshape(-1, s * s)  # cont_3d [s*s, n_tokens]

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        s = self.scale(info)
        grid = self.patch_grid(geom, info, geom.n_tokens * s * s)
        if grid is not None and grid[0] % s == 0 and grid[1] % s == 0:
            return grid[0] // s, grid[1] // s
        return super().token_grid(geom, info)

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        s = self.scale(info)
        n_patches = geom.n_tokens * s * s
        if keys.shape[0] != n_patches + 1:  # patch rows, then the class token
            return None
        grid = self.patch_grid(geom, info, n_patches)
        if grid is None or grid[0] % s or grid[1] % s:
            return None
        groups = self.shuffle_groups(grid[0], grid[1], s)
        return _all_scored(keys[:n_patches][groups].mean(axis=1))

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return n_tokens * self.scale(info) ** 2 + 1  # + class token

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.model.mlp.3.weight" in tensors:  # clip_n_mmproj_embd: mm_3_w->ne[1]
            return int(tensors["mm.model.mlp.3.weight"][0][1])
        return None


register(InternVLFamily())


class PixtralFamily(Family):
    """Pixtral-12B, Mistral-Small-3.1 / 3.2 (`pixtral`), LightOnOCR (`lightonocr`): tools/mtmd/models/pixtral.cpp.

    The ViT runs every block with 2-D RoPE on Q and K, so the last block's keys are `Kcur_pos-(L-1)`, one row
    per patch in raster order (clip.cpp sets pos_h = i / n_patches_x, pos_w = i % n_patches_x). With a patch
    merger (Mistral-Small-3.1+) the rows are unfolded m x m (m = clip.vision.spatial_merge_size, clip.cpp
    default 1 when the key is absent): LLM token (c, r) merges patches (m*c + dx, m*r + dy), tokens row-major
    (ggml_im2col with stride m). `pixtral` then appends the `[IMG_BREAK]` embedding after every token row but
    the last, so token (c, r) sits at index r * (p_x + 1) + c and the breaks at r * (p_x + 1) + p_x; the
    breaks are always kept and never scored. `lightonocr` has no breaks. mtmd reports a 1 x N grid (1-D RoPE
    text model): the patch grid comes from the encoder's input size (image_wh), or, with breaks, from the
    captured row count.
    """

    name = "pixtral"
    projector_types = ("pixtral",)
    native = True
    key_names = ("Kcur_pos", "Kcur")
    gated_ffn = True  # clip.use_silu: SiLU-gated FFN (ffn_gate present)
    required_tensors = ("v.patch_embd.weight", "mm.1.weight", "mm.2.weight", "v.token_embd.img_break")
    uniform_blocks = True
    has_breaks = True  # clip.cpp loads v.token_embd.img_break for pixtral (required)

    def layout(self, geom: ChunkGeometry, info: VisionInfo,
               n_rows: int | None = None) -> tuple[int, int, int, int, bool] | None:
        """(p_x, p_y, m, patches per row, breaks) of a chunk, or None when it does not fit the graph's rule.

        m is whichever of the mmproj's spatial_merge (0 when the key is absent) and 1 (clip.cpp's default for
        these projectors) reproduces mtmd's token count; the two counts never coincide)."""
        n = geom.n_tokens
        ps = info.patch_size
        merges = [m for m in dict.fromkeys((info.spatial_merge, 1)) if m > 0]
        if geom.image_wh is not None and ps > 0:
            gx, gy = geom.image_wh[0] // ps, geom.image_wh[1] // ps
            if n_rows is not None and n_rows != gx * gy:
                return None
            for m in merges:
                px, py = gx // m, gy // m  # clip_n_output_tokens / im2col floor the same way
                if px < 1 or py < 1:
                    continue
                if n == px * py + (py - 1 if self.has_breaks else 0):
                    return px, py, m, gx, self.has_breaks and py > 1
            return None
        if n_rows is None or not self.has_breaks:
            return None
        # no input size seen: with breaks, n + 1 = p_y * (p_x + 1) and n_rows = m^2 * p_x * p_y fix the grid
        for m in merges:
            if n_rows % (m * m):
                continue
            cells = n_rows // (m * m)
            py = n + 1 - cells
            if py > 1 and cells % py == 0:
                return cells // py, py, m, m * (cells // py), True
        return None

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        """The LLM tokens' row-major layout: p_x + 1 columns with breaks (the last column holds the
        [IMG_BREAK] tokens; the last row has none), p_x without."""
        lay = self.layout(geom, info)
        if lay is None:
            return super().token_grid(geom, info)
        px, py, _, _, breaks = lay
        return (px + 1 if breaks else px), py

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        lay = self.layout(geom, info, keys.shape[0])
        if lay is None:
            return None
        px, py, m, gx, breaks = lay
        grid = keys.reshape(-1, gx, *keys.shape[1:])[:py * m, :px * m]  # [y, x, H, D]
        merged = grid.reshape(py, m, px, m, *keys.shape[1:]).mean(axis=(1, 3)).reshape(py * px, *keys.shape[1:])
        cells = np.arange(py * px, dtype=np.int64)
        scored = cells + cells // px if breaks else cells  # r * (p_x + 1) + c
        return TokenKeys(np.ascontiguousarray(merged), scored, geom.n_tokens)

    constant_row_tensors = ("v.token_embd.img_break",)

    def constant_rows(self, geom: ChunkGeometry, info: VisionInfo, n_key_rows: int | None) -> dict[str, np.ndarray]:
        # pixtral.cpp builds each break row as scale(uninitialised, 0) + img_break: NaN when the reused compute
        # buffer held NaN/Inf (seen on the tiny fixture in stock llama-cpp-python too); the row is img_break
        lay = self.layout(geom, info, n_key_rows)
        if lay is None or not lay[4]:
            return {}
        px, py = lay[0], lay[1]
        return {"v.token_embd.img_break": np.arange(py - 1, dtype=np.int64) * (px + 1) + px}

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        # breaks are not patches; without the grid their count (p_y - 1) is estimated for a square-ish image
        m = max(info.spatial_merge, 1)
        cells = n_tokens - max(math.isqrt(n_tokens) - 1, 0) if self.has_breaks else n_tokens
        return max(cells, 1) * m * m

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.2.weight" in tensors:  # clip_n_mmproj_embd: mm_2_w->ne[1]
            return int(tensors["mm.2.weight"][0][1])
        return None

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        need = list(self.required_tensors)
        if "mm.patch_merger.weight" in tensors:  # pixtral.cpp multiplies by mm_input_norm_w unchecked
            need.append("mm.input_norm.weight")
        return need


class LightOnOCRFamily(PixtralFamily):
    """LightOnOCR (`lightonocr`): the pixtral graph without [IMG_BREAK] tokens (clip.cpp never loads one)."""

    name = "lightonocr"
    projector_types = ("lightonocr",)
    required_tensors = ("v.patch_embd.weight", "mm.1.weight", "mm.2.weight")
    has_breaks = False
    constant_row_tensors = ()


register(PixtralFamily())
register(LightOnOCRFamily())


class Idefics3Family(Family):
    """SmolVLM / SmolVLM2 / Idefics3 (`idefics3`) and LFM2-VL (`lfm2`): the SigLIP graph (models/siglip.cpp)
    runs all n_layer blocks (keys `Kcur-(L-1)`, no class token, no RoPE; lfm2 resizes the learned position
    embeddings to the chunk's patch grid), then `build_patch_merge_permute` (clip.cpp): the W x H patch grid
    is zero-padded to multiples of s (s = clip.vision.projector.scale_factor) and each s x s block becomes one
    token, row-major over the ceil(W/s) x ceil(H/s) token grid. A token's key is the mean of its real patches
    (padding has no key). Tiles and the overview / thumbnail are separate chunks, each mapped on its own; mtmd
    reports a 1 x N grid (no M-RoPE), so the patch grid comes from the encoder's input size."""

    name = "idefics3"
    projector_types = ("idefics3", "lfm2")
    native = True
    key_names = ("Kcur",)
    required_tensors = ("v.patch_embd.weight",)
    uniform_blocks = True

    @staticmethod
    def scale(info: VisionInfo) -> int:
        return info.scale_factor if info.scale_factor > 0 else 1

    @staticmethod
    def patch_grid(geom: ChunkGeometry, info: VisionInfo, n_rows: int) -> tuple[int, int] | None:
        """(width, height) in patches of the chunk's encoder input (square when the input size is unknown)."""
        if geom.image_wh is not None and info.patch_size > 0:
            w, h = geom.image_wh[0] // info.patch_size, geom.image_wh[1] // info.patch_size
            if w * h == n_rows:
                return w, h
        side = math.isqrt(n_rows)
        return (side, side) if side * side == n_rows else None

    @staticmethod
    def merge_groups(width: int, height: int, s: int) -> np.ndarray:
        """[n_tokens, s*s] patch rows of each token (-1: padding), in the channel order of
        build_patch_merge_permute (dx fastest, then dy); token ty*ceil(W/s)+tx holds (tx*s+dx, ty*s+dy)."""
        tw, th = -(-width // s), -(-height // s)
        xs = (np.arange(tw)[:, None] * s + np.arange(s)[None, :])  # [tx, dx]
        ys = (np.arange(th)[:, None] * s + np.arange(s)[None, :])  # [ty, dy]
        x = np.broadcast_to(xs[None, :, None, :], (th, tw, s, s))
        y = np.broadcast_to(ys[:, None, :, None], (th, tw, s, s))
        rows = np.where((x < width) & (y < height), y * width + x, -1)
        return rows.reshape(tw * th, s * s)

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        s = self.scale(info)
        if geom.image_wh is not None and info.patch_size > 0:
            w, h = geom.image_wh[0] // info.patch_size, geom.image_wh[1] // info.patch_size
            tw, th = -(-w // s), -(-h // s)
            if tw * th == geom.n_tokens:
                return tw, th
        return super().token_grid(geom, info)

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        s = self.scale(info)
        grid = self.patch_grid(geom, info, keys.shape[0])
        if grid is None:
            return None
        groups = self.merge_groups(grid[0], grid[1], s)
        if groups.shape[0] != geom.n_tokens:
            return None
        real = groups >= 0
        picked = keys[np.where(real, groups, 0)] * real[:, :, None, None]
        return _all_scored(picked.sum(axis=1) / real.sum(axis=1)[:, None, None])

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return n_tokens * self.scale(info) ** 2  # padding ignored

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.model.fc.weight" in tensors:  # idefics3: clip_n_mmproj_embd = mm_fc_w->ne[1]
            return int(tensors["mm.model.fc.weight"][0][1])
        if "mm.2.weight" in tensors:  # lfm2: mm_2_w->ne[1]
            return int(tensors["mm.2.weight"][0][1])
        return None

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        if "mm.model.fc.weight" in tensors:
            return list(self.required_tensors)
        # lfm2: the projector MLP, and resize_position_embeddings reads the position table's size
        return list(self.required_tensors) + ["v.position_embd.weight", "mm.1.weight", "mm.1.bias",
                                              "mm.2.weight", "mm.2.bias"]


register(Idefics3Family())


class PaddleOCRFamily(Idefics3Family):
    """PaddleOCR-VL (paddleocr.cpp), dots.ocr (dotsocr.cpp), Kimi-VL and Kimi-K2.5 (kimivl.cpp, kimik25.cpp): a ViT
    on raster-ordered patches with 2-D RoPE (vision M-RoPE, or build_rope_2d for the Kimis; keys `Kcur_pos-<il>`),
    then the same `build_patch_merge_permute` as idefics3 / lfm2: token ty*ceil(W/s)+tx is the mean of its real
    s x s patches; s = 2 for paddleocr (clip.cpp fixes it), clip.vision.projector.scale_factor for the others. The
    patch grid comes from the encoder's input size when mtmd reports a 1 x N grid."""

    name = "paddleocr"
    projector_types = ("paddleocr", "dots_ocr", "kimivl", "kimik25")
    key_names = KEY_NAMES_POST_ROPE_FIRST
    required_tensors = ("v.patch_embd.weight", "v.position_embd.weight", "mm.input_norm.weight",
                        "mm.input_norm.bias", "mm.1.weight", "mm.1.bias", "mm.2.weight", "mm.2.bias")
    forbidden_tensors = ()

    @staticmethod
    def scale(info: VisionInfo) -> int:
        if info.projector_type in ("dots_ocr", "kimivl", "kimik25"):
            return info.scale_factor if info.scale_factor > 0 else 1
        return 2

    def encoder_dims(self, info: VisionInfo) -> EncoderDims:
        """dots.ocr's blocks run a SwiGLU MLP (three matrices), the others a plain one."""
        return replace(super().encoder_dims(info), gated_ffn=info.projector_type == "dots_ocr")

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_2_w ne[1]."""
        return int(tensors["mm.2.weight"][0][1]) if "mm.2.weight" in tensors else None

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        if "mm.0.weight" in tensors or "mm.post_norm.weight" in tensors:  # dots_ocr's projector and post-norm
            return ["v.patch_embd.weight", "mm.input_norm.weight", "mm.input_norm.bias", "mm.post_norm.weight",
                    "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias"]
        return list(self.required_tensors)


register(PaddleOCRFamily())


class SiglipMLPFamily(Idefics3Family):
    """Janus-Pro (`janus_pro`) and Phi-4 vision (`phi4`): the SigLIP graph (models/siglip.cpp) runs all n_layer
    blocks without RoPE (keys `Kcur-(L-1)`, raster patches) and its MLP projector keeps one LLM token per patch: the
    identity mapping (idefics3's with s = 1). Janus-Pro images are letterboxed to a fixed square; Phi-4 keeps each
    image's grid (its position table resized); mtmd reports a 1 x N grid, so the grid comes from the encoder input."""

    name = "siglip-mlp"
    projector_types = ("janus_pro", "phi4")
    required_tensors = ("v.patch_embd.weight", "mm.0.weight", "mm.0.bias")

    @staticmethod
    def scale(info: VisionInfo) -> int:
        return 1

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_1_b ne[0] (janus_pro), mm_2_w ne[1] (phi4)."""
        if "mm.1.bias" in tensors:
            return int(tensors["mm.1.bias"][0][0])
        return int(tensors["mm.2.weight"][0][1]) if "mm.2.weight" in tensors else None

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        """phi4 resizes its position table (siglip.cpp asserts it); janus_pro adds it only when present."""
        if "mm.1.weight" in tensors or "mm.2.weight" not in tensors:
            return list(self.required_tensors) + ["mm.1.weight", "mm.1.bias"]
        return list(self.required_tensors) + ["mm.2.weight", "mm.2.bias", "v.position_embd.weight"]


register(SiglipMLPFamily())


class NemotronVLFamily(Idefics3Family):
    """Nemotron Nano VL (nemotron-v2-vl.cpp): a ViT without RoPE at a fixed square size (keys `Kcur-(L-1)`) over R
    register tokens (v.class_embd rows) followed by the raster patches; the registers are dropped and the patches go
    through idefics3's s x s pixel unshuffle (s = clip.vision.projector.scale_factor)."""

    name = "nemotron"
    projector_types = ("nemotron_v2_vl",)
    required_tensors = ("v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "mm.model.mlp.0.weight",
                        "mm.model.mlp.1.weight", "mm.model.mlp.3.weight")

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        n_patches = geom.n_tokens * self.scale(info) ** 2
        if keys.shape[0] <= n_patches:
            return None
        return super().token_keys(keys[keys.shape[0] - n_patches:], geom, info)  # registers come first

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_3_w ne[1]."""
        return int(tensors["mm.model.mlp.3.weight"][0][1]) if "mm.model.mlp.3.weight" in tensors else None

    def required_for(self, tensors: Mapping[str, tuple]) -> list[str]:
        return list(self.required_tensors)


register(NemotronVLFamily())


class Llama4Family(Family):
    """Llama 4 vision (llama4.cpp): square tiles (llava-uhd slices and an overview, each a chunk of its own) of P x P
    raster patches with a class token appended last (dropped here), keys `Kcur_pos-(L-1)` (build_rope_2d); the
    pixel shuffle (reshape, permute, reshape) makes token t of the (P/s) x (P/s) grid the s x s block at column
    t // (P/s), row t % (P/s): tokens run column by column (s = clip.vision.projector.scale_factor)."""

    name = "llama4"
    projector_types = ("llama4",)
    native = True
    required_tensors = ("v.patch_embd.weight", "v.class_embd", "v.position_embd.weight", "mm.model.mlp.1.weight",
                        "mm.model.mlp.2.weight", "mm.model.fc.weight")
    uniform_blocks = True

    @staticmethod
    def scale(info: VisionInfo) -> int:
        return info.scale_factor if info.scale_factor > 0 else 1

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        side = math.isqrt(geom.n_tokens)
        return (side, side) if side * side == geom.n_tokens else super().token_grid(geom, info)

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        s, side = self.scale(info), math.isqrt(keys.shape[0] - 1)
        g = side // s
        if side * side != keys.shape[0] - 1 or g * s != side or g * g != geom.n_tokens:
            return None
        blocks = keys[:side * side].reshape(g, s, g, s, *keys.shape[1:])  # [ty, dy, tx, dx, ...]
        # token t = tx * g + ty (column by column), the mean of its s x s patches
        return _all_scored(blocks.mean(axis=(1, 3)).transpose(1, 0, *range(2, keys.ndim + 1))
                           .reshape(g * g, *keys.shape[1:]))

    def token_cells(self, n_tokens: int, grid: tuple[int, int]) -> np.ndarray:
        """Token t covers the cell at column t // g, row t % g (g = the grid's side)."""
        g = grid[0]
        t = np.arange(n_tokens, dtype=np.int64)
        return (t % g) * g + t // g

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return n_tokens * self.scale(info) ** 2 + 1  # + class token

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        """clip_n_mmproj_embd: mm_model_proj ne[1]."""
        return int(tensors["mm.model.fc.weight"][0][1]) if "mm.model.fc.weight" in tensors else None


register(Llama4Family())


class Gemma4VFamily(Family):
    """Gemma 4 vision (tools/mtmd/models/gemma4v.cpp, PROJECTOR_TYPE_GEMMA4V).

    Images keep their aspect ratio: the dyn-size preprocessor aligns each side to patch_size * k (k = n_merge:
    clip.vision.projector.scale_factor, default 3) within 70..1120 tokens, so the patch grid is Px x Py with
    (Px, Py) = encoder input size / patch_size (read from the graph's inp_raw; mtmd reports a 1 x N grid).
    build_vit runs all n_layer blocks with per-head q/k RMS norms and a 2-D NEOX RoPE (x on the first half of
    each head, y on the second), so the last block's keys are `Kcur_pos-(L-1)` ([d_head, n_head, Px*Py], row
    y*Px + x). The pooler views the output as a [Px, Py] image, average-pools k x k with stride k and reshapes
    row-major: LLM token by*(Px/k) + bx is the mean of patches x in [bx*k, bx*k+k), y in [by*k, by*k+k), so its
    key is the mean of those k*k keys. mtmd decodes the image non-causally unless the text n_embd is 1536 /
    2560 (E2B / E4B)."""

    name = "gemma4v"
    projector_types = ("gemma4v",)
    native = True
    key_names = ("Kcur_pos", "Kcur")
    gated_ffn = True  # GEGLU (ffn_gate, ffn_up, ffn_down)
    # position_embd is dereferenced unconditionally (pos table size); the input projection is required by clip.cpp
    required_tensors = ("v.patch_embd.weight", "v.position_embd.weight", "mm.input_projection.weight")
    uniform_blocks = False  # Gemma4ClippableLinear clamp scalars are optional per linear (clip.cpp defaults them)
    default_pool = 3  # clip.cpp: hparams.n_merge = 3 unless the GGUF has clip.vision.projector.scale_factor
    non_causal_image = True  # mtmd_decode_use_non_causal(), except text n_embd 1536 / 2560

    def pool(self, info: VisionInfo) -> int:
        return info.scale_factor if info.scale_factor > 0 else self.default_pool

    def patch_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int] | None:
        """(Px, Py) from the encoder's input size; None when it was not seen."""
        if geom.image_wh is None or info.patch_size <= 0:
            return None
        w, h = geom.image_wh
        return w // info.patch_size, h // info.patch_size

    def token_grid(self, geom: ChunkGeometry, info: VisionInfo) -> tuple[int, int]:
        g, k = self.patch_grid(geom, info), self.pool(info)
        if g is not None and (g[0] // k) * (g[1] // k) == geom.n_tokens:
            return g[0] // k, g[1] // k
        return super().token_grid(geom, info)

    def token_keys(self, keys: np.ndarray, geom: ChunkGeometry, info: VisionInfo) -> TokenKeys | None:
        g, k = self.patch_grid(geom, info), self.pool(info)
        if g is None:
            return None
        px, py = g
        tx, ty = px // k, py // k  # ggml_pool_2d drops a remainder (the preprocessor aligns it away)
        if keys.shape[0] != px * py or tx * ty != geom.n_tokens:
            return None
        grid = keys.reshape(py, px, *keys.shape[1:])[:ty * k, :tx * k]  # [y, x, H, D]
        pooled = grid.reshape(ty, k, tx, k, *keys.shape[1:]).mean(axis=(1, 3))  # [by, bx, H, D]
        return _all_scored(pooled.reshape(ty * tx, *keys.shape[1:]))

    def n_patches(self, n_tokens: int, info: VisionInfo) -> int:
        return n_tokens * self.pool(info) ** 2

    def projection_dim(self, tensors: Mapping[str, tuple]) -> int | None:
        if "mm.input_projection.weight" in tensors:  # clip_n_mmproj_embd: mm_input_proj_w->ne[1]
            return int(tensors["mm.input_projection.weight"][0][1])
        return None


register(Gemma4VFamily())
