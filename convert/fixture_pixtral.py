"""Seeded random-weight Pixtral-family VLM pair (text GGUF + mmproj GGUF) for tests, written in about a second.

The mmproj mirrors what llama.cpp's ``tools/mtmd/clip.cpp`` loads for ``clip.projector_type = "pixtral"``
(Pixtral-12B, Mistral-Small-3.1 / 3.2) and ``"lightonocr"`` (LightOnOCR), run by ``tools/mtmd/models/pixtral.cpp``:

* conv patch embedding without bias, RMS pre-norm (``v.pre_ln``), RMSNorm blocks with separate bias-free
  q / k / v / out projections, 2-D RoPE on Q and K inside every block (keys named ``Kcur_pos-<il>``),
  SiLU-gated FFN (``clip.use_silu``), no learned position embedding, no post-norm;
* the Mistral-Small-3.1 patch merger (``mm.input_norm`` RMSNorm + an ``m x m`` unfold, m =
  ``clip.vision.spatial_merge_size``, + ``mm.patch_merger``), then ``mm.1`` -> GELU -> ``mm.2``;
* ``pixtral`` only: the ``[IMG_BREAK]`` embedding ``v.token_embd.img_break`` the graph appends after every
  token row but the last.

The text side is a tiny ``llama`` model (Mistral-Small / Pixtral-12B GGUFs use the ``llama`` architecture;
newer Ministral-3 ones ``mistral3``, also 1-D RoPE) with a Mistral ``[INST] ... [/INST]`` chat template.
Files are cached under a key that includes this generator's source and the helpers it calls.

    python -m convert.fixtures --family pixtral --out DIR      # or make_fixture("pixtral"); lightonocr likewise
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from .fixture_common import TINY_LLAMA_TEXT, text_model_pair
from .mmproj import _CLIP_MEAN, _CLIP_STD, _Init, _smart_resize, add_clip_kv, clip_vision_kv, write_tensors
from .text_model import TextModelDims, _render_content_macro

__all__ = ["PixtralVisionDims", "PixtralFixture", "make_pixtral_fixture", "write_pixtral_mmproj",
           "MISTRAL_CHAT_TEMPLATE", "PIXTRAL_MIN_TOKENS", "PIXTRAL_MAX_TOKENS"]

# clip.cpp PROJECTOR_TYPE_PIXTRAL: hparams.set_limit_image_tokens(8, 1024) (merged tokens, breaks not counted)
PIXTRAL_MIN_TOKENS, PIXTRAL_MAX_TOKENS = 8, 1024

# Mistral instruct format. No bos_token: llama.cpp adds BOS (add_bos_token), as for the other fixtures.
MISTRAL_CHAT_TEMPLATE: str = (
    _render_content_macro()
    + "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' }}{{ render_content(message['content']) }}"
    "{{ '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' }}{{ render_content(message['content']) }}{{ '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ render_content(message['content']) }}{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class PixtralVisionDims:
    """Hyper-parameters of a tiny Pixtral vision tower + projector."""

    projector: str = "pixtral"  # "pixtral" | "lightonocr"
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_ff: int = 48
    patch_size: int = 8
    spatial_merge: int | None = 2  # None: key not written (clip.cpp default 1, no merger: Pixtral-12B)
    proj_dim: int = 64  # = text n_embd
    image_size: int = 1024  # pixtral: metadata; lightonocr: the longest edge images are resized to
    eps: float = 1e-5
    img_break: bool = True  # pixtral only (clip.cpp requires v.token_embd.img_break for pixtral)

    @property
    def merge(self) -> int:
        """The n_merge clip.cpp uses (spatial_merge_size, default 1 for both projector types)."""
        return self.spatial_merge if self.spatial_merge is not None else 1

    def validate(self) -> None:
        if self.projector not in ("pixtral", "lightonocr"):
            raise ValueError(f"projector must be 'pixtral' or 'lightonocr', got {self.projector!r}")
        if self.projector == "pixtral" and not self.img_break:
            raise ValueError("clip.cpp requires v.token_embd.img_break for a pixtral projector")
        if self.projector == "lightonocr" and self.img_break:
            raise ValueError("clip.cpp never reads v.token_embd.img_break for lightonocr")
        d_head = self.n_embd // self.n_head
        if self.n_embd % self.n_head or d_head % 4:
            raise ValueError("head dim must be divisible by 4 (2-D RoPE on two halves of pairs)")
        if self.n_ff == self.n_embd:
            raise ValueError("n_ff must differ from n_embd")


@dataclass(frozen=True)
class PixtralFixture:
    """Paths and facts of one generated Pixtral-family VLM pair."""

    family: str
    seed: int
    model: Path
    mmproj: Path
    text: TextModelDims
    vision: PixtralVisionDims = field(default_factory=PixtralVisionDims)

    @property
    def size(self) -> str:
        """Always "tiny" (the registry's size name for these pairs)."""
        return "tiny"

    def preprocessed_size(self, width: int, height: int) -> tuple[int, int]:
        """The (w, h) mtmd resizes an image to (img_tool::calc_size_preserved_ratio, aligned to patch * merge)."""
        v = self.vision
        align = v.patch_size * v.merge
        if v.projector == "pixtral":
            area = align * align
            return _smart_resize(width, height, align, PIXTRAL_MIN_TOKENS * area, PIXTRAL_MAX_TOKENS * area)
        scale = min(np.float32(v.image_size) / np.float32(width), np.float32(v.image_size) / np.float32(height))
        return (int(np.ceil(np.float32(width * scale) / np.float32(align))) * align,
                int(np.ceil(np.float32(height * scale) / np.float32(align))) * align)

    def token_rows(self, width: int, height: int) -> tuple[int, int]:
        """(p_x, p_y): merged tokens per row and rows, for a width x height input image."""
        w, h = self.preprocessed_size(width, height)
        a = self.vision.patch_size * self.vision.merge
        return w // a, h // a

    def image_tokens(self, width: int, height: int) -> int:
        """LLM image tokens mtmd produces: p_x * p_y, plus one [IMG_BREAK] per row but the last (pixtral)."""
        px, py = self.token_rows(width, height)
        return px * py + (py - 1 if self.vision.img_break else 0)


def _tensors(d: PixtralVisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors in PyTorch layout ([n_out, n_in] for linears, [c_out, c_in, kh, kw] for the conv)."""
    e, p, w = d.n_embd, d.patch_size, init.normal

    def norm_weight(n: int) -> np.ndarray:
        # not all ones, so a norm weight that is skipped or misapplied shows in the reference test
        return (1.0 + w(n, std=0.2)).astype(np.float32)

    yield "v.patch_embd.weight", w(e, 3, p, p, std=0.05)
    yield "v.pre_ln.weight", norm_weight(e)
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", norm_weight(e)
        for x in ("q", "k", "v"):
            yield f"{b}.attn_{x}.weight", w(e, e, std=0.2)
        yield f"{b}.attn_out.weight", w(e, e, std=0.1)
        yield f"{b}.ln2.weight", norm_weight(e)
        yield f"{b}.ffn_gate.weight", w(d.n_ff, e, std=0.1)
        yield f"{b}.ffn_up.weight", w(d.n_ff, e, std=0.1)
        yield f"{b}.ffn_down.weight", w(e, d.n_ff, std=0.1)
    if d.merge > 1:
        yield "mm.input_norm.weight", norm_weight(e)
        yield "mm.patch_merger.weight", w(e, e * d.merge * d.merge, std=0.1)
    yield "mm.1.weight", w(d.proj_dim, e, std=0.1)
    yield "mm.1.bias", w(d.proj_dim, std=0.1)
    yield "mm.2.weight", w(d.proj_dim, d.proj_dim, std=0.1)
    yield "mm.2.bias", w(d.proj_dim, std=0.1)
    if d.img_break:
        yield "v.token_embd.img_break", w(d.proj_dim, std=0.5)


def write_pixtral_mmproj(path: str | os.PathLike, d: PixtralVisionDims, *, seed: int, name: str,
                         weight_std: float = 0.02) -> dict:
    """Write a deterministic random-weight pixtral / lightonocr mmproj GGUF (all f32)."""
    d.validate()
    wr = gguf.GGUFWriter(os.fspath(path), "clip")
    kv = [("clip.use_silu", True),
          *clip_vision_kv(d.image_size, d.patch_size, d.n_embd, d.n_ff, d.n_layer, d.proj_dim, d.n_head, d.eps),
          ("clip.vision.image_mean", _CLIP_MEAN), ("clip.vision.image_std", _CLIP_STD)]
    if d.spatial_merge is not None:
        kv.append(("clip.vision.spatial_merge_size", d.spatial_merge))
    add_clip_kv(wr, name, f"random-weight {d.projector} mmproj for tests", gguf.LlamaFileType.ALL_F32, kv,
                d.projector)
    n_params = write_tensors(wr, _tensors(d, _Init(seed, weight_std)))
    return {"path": os.fspath(path), "projector": d.projector, "n_params": n_params,
            "file_size": os.path.getsize(path)}


TINY_TEXT = TINY_LLAMA_TEXT


# the code that decides the bytes (the cache key)
_SOURCES = ("fixture_pixtral.py", "fixture_common.py", "text_model.py", "mmproj.py", "tokenizer.py")


def make_pixtral_fixture(out_dir: str | os.PathLike | None = None, *, projector: str = "pixtral", seed: int = 0,
                         vision: PixtralVisionDims | None = None, text: TextModelDims = TINY_TEXT,
                         force: bool = False) -> PixtralFixture:
    """Write (or reuse from the cache) a tiny pixtral / lightonocr VLM pair; returns its paths and dims."""
    if vision is None:
        vision = PixtralVisionDims(projector=projector, img_break=projector == "pixtral",
                                   image_size=1024 if projector == "pixtral" else 64)
    model, mmproj = text_model_pair(vision.projector, out_dir, text, vision, MISTRAL_CHAT_TEMPLATE,
                                    write_pixtral_mmproj, _SOURCES, seed=seed, force=force)
    return PixtralFixture(vision.projector, seed, model, mmproj, text, vision)
