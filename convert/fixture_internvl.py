"""Seeded random-weight InternVL pair (text GGUF + mmproj GGUF) that stock llama.cpp (llama-cpp-python 0.3.36)
loads and encodes, for the `internvl` family tests.

Vision side (``clip.projector_type = "internvl"``, tools/mtmd/models/internvl.cpp), laid out as the vendored
converter writes InternViT-300M (conversion/internvl.py): conv patch embedding with bias, class embedding
(the graph appends it LAST), learned position embeddings added by row, LayerNorm blocks with separate biased
q/k/v (the converter splits the fused qkv), layer scales ``ls1`` / ``ls2``, GELU MLP, no pre/post norm; then
the ``scale_factor`` x ``scale_factor`` pixel shuffle and the ``mm.model.mlp.{0,1,3}`` projector (LayerNorm,
linear, GELU, linear). Tiles are ``image_size`` squares (``preproc_min/max_tiles``), thumbnail last.

Text side: arch ``qwen2`` (what real InternVL 2.5 / 3 / 3.5 ship; 1-D NEOX RoPE, q/k/v biases) with the shared
test vocabulary and a ChatML template. Written here rather than in text_model.py so that module stays as is.

    python -m convert.fixtures --family internvl --out DIR      # or make_fixture("internvl")
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from .fixture_common import (DimsFixture, TinyPairDims, cached_pair, fixture_key,
                             ln_attention_tensors, ln_ffn_tensors, write_chatml_text_model)
from .mmproj import _Init, add_clip_kv, clip_vision_kv, write_tensors
from .tokenizer import build_vocab

# InternVL's ChatML; an image renders as the bare media marker (mtmd wraps it in "<img>" ... "</img>").
from .text_model import CHATML_CHAT_TEMPLATE  # noqa: E402

# the code that decides the bytes (the cache key)
_SOURCES = ("fixture_internvl.py", "fixture_common.py", "mmproj.py", "tokenizer.py")
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class InternVLDims(TinyPairDims):
    """Sizes of the tiny pair: text (qwen2) and vision (InternViT + mlp projector) as TinyPairDims, plus these."""

    patch_size: int = 14
    image_size: int = 224  # tile size (448 in real models)
    scale_factor: int = 2  # 1 / downsample_ratio
    min_tiles: int = 1
    max_tiles: int = 6

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size // self.scale_factor
        return side * side

    def validate(self) -> None:
        g = self.image_size // self.patch_size
        if self.image_size % self.patch_size or g % self.scale_factor:
            raise ValueError("image_size / patch_size must be a multiple of scale_factor")
        if self.v_embd % self.v_head or self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("embedding sizes must divide by the head counts")


class InternVLFixture(DimsFixture):
    """Paths and facts of one generated InternVL pair (Fixture-like: .model, .mmproj, .image_tokens; .dims an
    InternVLDims)."""

    def chunks(self, width: int, height: int) -> int:
        """Image chunks mtmd makes of a width x height image whose best tile layout is exact (no resize):
        one chunk when it fits a tile, else the tiles plus a thumbnail."""
        s = self.dims.image_size
        if width <= s and height <= s:
            return 1
        return -(-width // s) * -(-height // s) + 1

    def image_tokens(self, width: int, height: int) -> int:
        """LLM image tokens for an image that tiles exactly (sides multiples of image_size, or <= one tile)."""
        return self.chunks(width, height) * self.dims.tokens_per_tile


def _vision_tensors(d: InternVLDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    e, p, s, n = d.v_embd, d.patch_size, d.scale_factor, init.normal
    n_pos = (d.image_size // p) ** 2 + 1
    yield "v.class_embd", n(e, std=0.5)
    yield "v.patch_embd.weight", n(e, 3, p, p)
    yield "v.patch_embd.bias", n(e)
    yield "v.position_embd.weight", n(n_pos, e)
    for il in range(d.v_layer):
        b = f"v.blk.{il}"
        yield from ln_attention_tensors(init, b, e)
        yield f"{b}.ls1.weight", 0.5 + n(e, std=0.1)
        yield from ln_ffn_tensors(init, b, e, d.v_ff)
        yield f"{b}.ls2.weight", 0.5 + n(e, std=0.1)
    m = e * s * s
    yield "mm.model.mlp.0.weight", 1.0 + n(m, std=0.1)
    yield "mm.model.mlp.0.bias", n(m)
    yield "mm.model.mlp.1.weight", n(d.n_embd, m)
    yield "mm.model.mlp.1.bias", n(d.n_embd)
    yield "mm.model.mlp.3.weight", n(d.n_embd, d.n_embd)
    yield "mm.model.mlp.3.bias", n(d.n_embd)


def write_internvl_mmproj(path: str | os.PathLike, d: InternVLDims, *, seed: int, name: str) -> None:
    """The vision tower + projector as an f32 mmproj GGUF."""
    d.validate()
    w = gguf.GGUFWriter(os.fspath(path), "clip")
    kv = [*clip_vision_kv(d.image_size, d.patch_size, d.v_embd, d.v_ff, d.v_layer, d.n_embd, d.v_head, d.eps),
          ("clip.vision.image_mean", _IMAGENET_MEAN), ("clip.vision.image_std", _IMAGENET_STD),
          ("clip.use_gelu", True), ("clip.vision.projector.scale_factor", d.scale_factor),
          ("clip.vision.preproc_min_tiles", d.min_tiles), ("clip.vision.preproc_max_tiles", d.max_tiles)]
    add_clip_kv(w, name, "random-weight internvl mmproj for tests", gguf.LlamaFileType.ALL_F32, kv, "internvl")
    write_tensors(w, _vision_tensors(d, _Init(seed, 0.02)))


def write_qwen2_text_model(path: str | os.PathLike, d: InternVLDims, *, seed: int, name: str) -> None:
    """A qwen2 (1-D NEOX RoPE, q/k/v biases) text GGUF with the shared test vocabulary and ChatML roles."""
    spec = build_vocab(family="qwen2vl")  # ChatML roles: no BOS, <|im_end|> ends a turn
    write_chatml_text_model(path, d, spec, arch="qwen2", seed=seed, name=name, rms_eps=1e-6, rope_base=1000000.0,
                            qkv_bias=True)


def make_internvl_fixture(out_dir: str | os.PathLike | None = None, *, seed: int = 0,
                          dims: InternVLDims | None = None, force: bool = False) -> InternVLFixture:
    """Write (or reuse, keyed by this generator's source) the tiny InternVL pair; returns its paths."""
    d = dims or InternVLDims()
    d.validate()

    def write(tmp_model: Path, tmp_mmproj: Path) -> dict:
        write_qwen2_text_model(tmp_model, d, seed=seed, name="avis-internvl-tiny")
        write_internvl_mmproj(tmp_mmproj, d, seed=seed + 1, name="avis-internvl-tiny-mmproj")
        return {"family": "internvl", "seed": seed, "dims": asdict(d)}

    key = fixture_key(f"internvl-tiny-s{seed}", _SOURCES, CHATML_CHAT_TEMPLATE, d, seed)
    model, mmproj = cached_pair(out_dir, key, write, force=force)
    return InternVLFixture("internvl", seed, model, mmproj, d)
