"""Seeded random-weight SmolVLM-style (`idefics3`) and LFM2-VL-style (`lfm2`) pairs (text GGUF + mmproj GGUF)
that stock llama.cpp (llama-cpp-python 0.3.36) loads and encodes, for the `idefics3` family tests.

Vision side: the SigLIP tower clip.cpp runs for both (models/siglip.cpp): conv patch embedding with bias,
learned position embeddings (no class token; lfm2 resizes them to the chunk's patch grid), LayerNorm blocks
with separate biased q/k/v, GELU (tanh) MLP, post LayerNorm; then the s x s pixel (un)shuffle and
* idefics3: one bias-free linear ``mm.model.fc``;
* lfm2: LayerNorm ``mm.input_norm`` -> ``mm.1`` -> GELU -> ``mm.2``.

idefics3 images become image_size tiles (rounded to whole tiles) plus an overview chunk, overview last; lfm2
images become one dynamic-size chunk (64..256 tokens) unless they are large enough to tile (512 px tiles).

Text side: ``llama`` (SmolVLM's SmolLM2 is llama; LFM2's hybrid arch is not needed to exercise the vision side)
with the shared test vocabulary plus the special tokens mtmd looks up for these projectors (``\\n\\n``,
``<fake_token_around_image>``, ``<global-img>``, ``<|img_thumbnail|>``) and a ChatML template.

    python -m convert.fixtures --family lfm2 --out DIR      # or make_fixture("lfm2")
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from .fixture_common import (DimsFixture, TinyPairDims, cached_pair, fixture_key,
                             ln_attention_tensors, ln_ffn_tensors, write_chatml_text_model)
from .mmproj import _Init, add_clip_kv, clip_vision_kv, write_tensors
from .text_model import CHATML_CHAT_TEMPLATE
from .tokenizer import build_vocab, bytes_to_unicode

VARIANTS = ("idefics3", "lfm2")
# the code that decides the bytes (the cache key)
_SOURCES = ("fixture_idefics3.py", "fixture_common.py", "mmproj.py", "tokenizer.py")
_SIGLIP_MEAN = [0.5, 0.5, 0.5]
_SIGLIP_STD = [0.5, 0.5, 0.5]
# tokens mtmd.cpp looks up by their text for these projectors (a missing one would be decoded as token -1)
_EXTRA_CONTROL = ["<fake_token_around_image>", "<global-img>", "<|img_thumbnail|>"]


@dataclass(frozen=True)
class SiglipDims(TinyPairDims):
    """Sizes of one tiny pair: text (llama) and vision as TinyPairDims, plus these."""

    variant: str = "idefics3"
    patch_size: int = 8
    image_size: int = 128  # idefics3: tile size; both: the position table is (image_size / patch_size)^2
    scale_factor: int = 4
    proj_ff: int = 96  # lfm2: mm.1 width

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % self.scale_factor:
            raise ValueError("image_size / patch_size must be a multiple of scale_factor")
        if self.scale_factor < 2:
            raise ValueError("build_patch_merge_permute asserts scale_factor > 1")


DEFAULT_DIMS = {"idefics3": SiglipDims("idefics3"), "lfm2": SiglipDims("lfm2", scale_factor=2)}


class SiglipFixture(DimsFixture):
    """Paths and facts of one generated pair (Fixture-like: .model, .mmproj; .dims a SiglipDims)."""


def _vision_tensors(d: SiglipDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    e, p, s, n = d.v_embd, d.patch_size, d.scale_factor, init.normal
    n_pos = (d.image_size // p) ** 2
    yield "v.patch_embd.weight", n(e, 3, p, p, std=0.05)
    yield "v.patch_embd.bias", n(e)
    yield "v.position_embd.weight", n(n_pos, e, std=0.5)
    for il in range(d.v_layer):
        yield from ln_attention_tensors(init, f"v.blk.{il}", e)
        yield from ln_ffn_tensors(init, f"v.blk.{il}", e, d.v_ff)
    yield "v.post_ln.weight", 1.0 + n(e, std=0.1)
    yield "v.post_ln.bias", n(e)
    m = e * s * s
    if d.variant == "idefics3":
        yield "mm.model.fc.weight", n(d.n_embd, m, std=0.05)
    else:
        yield "mm.input_norm.weight", 1.0 + n(m, std=0.1)
        yield "mm.input_norm.bias", n(m)
        yield "mm.1.weight", n(d.proj_ff, m, std=0.05)
        yield "mm.1.bias", n(d.proj_ff)
        yield "mm.2.weight", n(d.n_embd, d.proj_ff, std=0.05)
        yield "mm.2.bias", n(d.n_embd)


def write_siglip_mmproj(path: str | os.PathLike, d: SiglipDims, *, seed: int, name: str) -> None:
    d.validate()
    w = gguf.GGUFWriter(os.fspath(path), "clip")
    kv = [*clip_vision_kv(d.image_size, d.patch_size, d.v_embd, d.v_ff, d.v_layer, d.n_embd, d.v_head, d.eps),
          ("clip.vision.image_mean", _SIGLIP_MEAN), ("clip.vision.image_std", _SIGLIP_STD),
          ("clip.use_gelu", True), ("clip.vision.projector.scale_factor", d.scale_factor)]
    add_clip_kv(w, name, f"random-weight {d.variant} mmproj for tests", gguf.LlamaFileType.ALL_F32, kv, d.variant)
    write_tensors(w, _vision_tensors(d, _Init(seed, 0.02)))


def _vocab():
    """The shared ChatML-role vocabulary plus the tokens mtmd looks up for idefics3 / lfm2."""
    spec = build_vocab(family="qwen2vl")
    extra = [(t, int(gguf.TokenType.CONTROL)) for t in _EXTRA_CONTROL]
    nl2 = bytes_to_unicode()[10] * 2  # "\n\n" as one byte-level token (SmolLM2 has it)
    if nl2 not in spec.tokens:
        extra.append((nl2, int(gguf.TokenType.NORMAL)))
    tokens = spec.tokens + [t for t, _ in extra]
    types = spec.token_types + [k for _, k in extra]
    special = dict(spec.special_ids)
    special.update({t: spec.n_vocab + i for i, (t, k) in enumerate(extra) if k == int(gguf.TokenType.CONTROL)})
    return replace(spec, tokens=tokens, token_types=types, special_ids=special)


def write_llama_text_model(path: str | os.PathLike, d: SiglipDims, *, seed: int, name: str) -> None:
    write_chatml_text_model(path, d, _vocab(), arch="llama", seed=seed, name=name, rms_eps=1e-5, rope_base=10000.0,
                            rope_dim=True)


def make_idefics3_fixture(out_dir: str | os.PathLike | None = None, variant: str = "idefics3", *, seed: int = 0,
                          dims: SiglipDims | None = None, force: bool = False) -> SiglipFixture:
    """Write (or reuse, keyed by the generator source) a tiny idefics3 or lfm2 pair; returns its paths."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    d = dims or DEFAULT_DIMS[variant]
    d.validate()

    def write(tmp_model: Path, tmp_mmproj: Path) -> dict:
        write_llama_text_model(tmp_model, d, seed=seed, name=f"avis-{d.variant}-tiny")
        write_siglip_mmproj(tmp_mmproj, d, seed=seed + 1, name=f"avis-{d.variant}-tiny-mmproj")
        return {"family": d.variant, "seed": seed, "dims": asdict(d)}

    key = fixture_key(f"{d.variant}-tiny-s{seed}", _SOURCES, CHATML_CHAT_TEMPLATE, d, seed)
    model, mmproj = cached_pair(out_dir, key, write, force=force)
    return SiglipFixture(d.variant, seed, model, mmproj, d)
