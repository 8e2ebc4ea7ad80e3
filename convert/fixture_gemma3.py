"""Seeded random-weight Gemma 3 VLM pair (text GGUF + mmproj GGUF, projector type ``gemma3``) for tests.

Vision side, as llama.cpp's ``tools/mtmd/models/siglip.cpp`` (PROJECTOR_TYPE_GEMMA3) and ``clip.cpp`` load it:
a SigLIP ViT (conv patch embedding with bias, learned position embeddings for the fixed
(image_size / patch_size)^2 grid, no pre-norm, LayerNorm blocks with biased q/k/v/out, GELU MLP, LayerNorm
post-norm), then an average pool of ``scale_factor`` x ``scale_factor`` patches per LLM token, RMSNorm with
``mm.soft_emb_norm.weight`` and the ``mm.input_projection.weight`` matrix (ggml ne [proj_dim, n_embd]).
clip.cpp defaults the pool to 4 (Gemma 3 4B/12B/27B: 896 px, patch 14, 64x64 -> 16x16 = 256 tokens) and
reads ``clip.vision.projector.scale_factor`` when present; the fixture writes it.

Text side: llama.cpp's mtmd does not check the text architecture for this projector (only that the
projection size equals the text model's n_embd), so the text model is convert/text_model.py's ``llama``
arch with a Gemma-style chat template (``<start_of_turn>user ... <end_of_turn>``). mtmd itself wraps the
image in ``<start_of_image>`` ... ``<end_of_image>`` text and decodes the image tokens with non-causal
attention (mtmd_decode_use_non_causal is true for gemma3), whatever the text architecture.

    python -m convert.fixtures --family gemma3 --out DIR      # or make_fixture("gemma3")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import gguf
import numpy as np

from .fixture_common import TINY_LLAMA_TEXT, PairFixture, text_model_pair
from .mmproj import _Init, add_clip_kv, clip_vision_kv, write_tensors
from .text_model import TextModelDims, _render_content_macro

__all__ = ["Gemma3VisionDims", "Gemma3Fixture", "GEMMA3_CHAT_TEMPLATE", "TINY_TEXT", "TINY_VISION",
           "make_gemma3_fixture", "write_gemma3_mmproj"]

# Gemma 3's turn format; an image part renders as the bare media marker (mtmd adds <start_of_image> /
# <end_of_image> around the image embeddings itself). BOS comes from llama.cpp (add_bos_token).
GEMMA3_CHAT_TEMPLATE: str = (
    _render_content_macro()
    + "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}{{ render_content(message['content']) }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# SigLIP normalisation of Gemma 3 (image_mean = image_std = 0.5)
_MEAN = [0.5, 0.5, 0.5]
_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class Gemma3VisionDims:
    """Hyper-parameters of a tiny Gemma 3 SigLIP tower + pooling projector."""

    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 4
    n_ff: int = 128
    patch_size: int = 8
    image_size: int = 192  # 24 x 24 patches
    scale_factor: int = 4  # 4 x 4 average pool -> 6 x 6 = 36 LLM tokens
    proj_dim: int = 64  # = text n_embd
    eps: float = 1e-6
    weight_std: float = 0.05

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return self.patches_per_side // self.scale_factor

    @property
    def n_tokens(self) -> int:
        return self.tokens_per_side ** 2

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.patches_per_side % self.scale_factor:
            raise ValueError("patches per side must be a multiple of scale_factor (ggml_pool_2d drops the rest)")
        if self.n_ff == self.n_embd:
            raise ValueError("n_ff must differ from n_embd (clip.cpp would swap ffn up/down for gemma3)")


# the code that decides the bytes (the cache key)
_SOURCES = ("fixture_gemma3.py", "fixture_common.py", "mmproj.py", "text_model.py", "tokenizer.py")

TINY_TEXT = TINY_LLAMA_TEXT
TINY_VISION = Gemma3VisionDims()


class Gemma3Fixture(PairFixture):
    """Paths and facts of the generated pair (the shape of convert.fixtures.Fixture; .vision a Gemma3VisionDims)."""

    def image_tokens(self, width: int, height: int) -> int:
        """Every image is resized (letterboxed) to image_size x image_size: a fixed token count."""
        return self.vision.n_tokens


def _tensors(d: Gemma3VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    e, p, normal = d.n_embd, d.patch_size, init.normal

    def linear(prefix: str, n_in: int, n_out: int) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{prefix}.weight", normal(n_out, n_in)
        yield f"{prefix}.bias", normal(n_out)

    def norm(prefix: str) -> Iterator[tuple[str, np.ndarray]]:
        yield f"{prefix}.weight", (1.0 + normal(e, std=0.1)).astype(np.float32)
        yield f"{prefix}.bias", normal(e, std=0.1)

    yield "v.patch_embd.weight", normal(e, 3, p, p, std=0.1)
    yield "v.patch_embd.bias", normal(e)
    yield "v.position_embd.weight", normal(d.patches_per_side ** 2, e, std=0.5)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield from norm(f"{b}.ln1")
        yield from linear(f"{b}.attn_q", e, e)
        yield from linear(f"{b}.attn_k", e, e)
        yield from linear(f"{b}.attn_v", e, e)
        yield from linear(f"{b}.attn_out", e, e)
        yield from norm(f"{b}.ln2")
        yield from linear(f"{b}.ffn_up", e, d.n_ff)
        yield from linear(f"{b}.ffn_down", d.n_ff, e)
    yield from norm("v.post_ln")
    yield "mm.soft_emb_norm.weight", normal(e, std=0.1)  # Gemma RMSNorm stores (weight - 1); clip.cpp multiplies
    # ggml ne [proj_dim, n_embd]: clip_n_mmproj_embd = ne[0]; siglip.cpp multiplies by its transpose
    yield "mm.input_projection.weight", normal(e, d.proj_dim, std=0.1)


def write_gemma3_mmproj(path: str | os.PathLike, d: Gemma3VisionDims, *, seed: int, name: str) -> dict:
    """Write the random-weight gemma3 mmproj GGUF (f32); returns a summary."""
    d.validate()
    path = os.fspath(path)
    w = gguf.GGUFWriter(path, "clip")
    kv = [("clip.use_gelu", True),
          *clip_vision_kv(d.image_size, d.patch_size, d.n_embd, d.n_ff, d.n_layer, d.proj_dim, d.n_head, d.eps),
          ("clip.vision.projector.scale_factor", d.scale_factor), ("clip.vision.image_mean", _MEAN),
          ("clip.vision.image_std", _STD)]
    add_clip_kv(w, name, "random-weight gemma3 mmproj for tests", gguf.LlamaFileType.ALL_F32, kv, "gemma3")
    n_params = write_tensors(w, _tensors(d, _Init(seed, d.weight_std)))
    return {"path": path, "n_params": n_params, "n_tokens": d.n_tokens, "file_size": os.path.getsize(path)}


def make_gemma3_fixture(out_dir: str | os.PathLike | None = None, *, seed: int = 0, force: bool = False,
                        text: TextModelDims = TINY_TEXT, vision: Gemma3VisionDims = TINY_VISION) -> Gemma3Fixture:
    """Write (or reuse from the cache) the tiny gemma3 pair; returns its paths."""
    model, mmproj = text_model_pair("gemma3", out_dir, text, vision, GEMMA3_CHAT_TEMPLATE, write_gemma3_mmproj,
                                    _SOURCES, seed=seed, force=force)
    return Gemma3Fixture("gemma3", "tiny", seed, model, mmproj, text, vision)
