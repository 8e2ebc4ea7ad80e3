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

    python -m convert.fixture_idefics3 --variant lfm2 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from .fixture_internvl import _rng_normal
from .text_model import CHATML_CHAT_TEMPLATE
from .tokenizer import add_tokenizer, build_vocab, bytes_to_unicode

VARIANTS = ("idefics3", "lfm2")
_SIGLIP_MEAN = [0.5, 0.5, 0.5]
_SIGLIP_STD = [0.5, 0.5, 0.5]
# tokens mtmd.cpp looks up by their text for these projectors (a missing one would be decoded as token -1)
_EXTRA_CONTROL = ["<fake_token_around_image>", "<global-img>", "<|img_thumbnail|>"]


@dataclass(frozen=True)
class SiglipDims:
    """Sizes of one tiny pair."""

    variant: str = "idefics3"
    # text (llama)
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 160
    # vision
    v_embd: int = 64
    v_layer: int = 3
    v_head: int = 4
    v_ff: int = 128
    patch_size: int = 8
    image_size: int = 128  # idefics3: tile size; both: the position table is (image_size / patch_size)^2
    scale_factor: int = 4
    proj_ff: int = 96  # lfm2: mm.1 width
    eps: float = 1e-6

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}")
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % self.scale_factor:
            raise ValueError("image_size / patch_size must be a multiple of scale_factor")
        if self.scale_factor < 2:
            raise ValueError("build_patch_merge_permute asserts scale_factor > 1")


DEFAULT_DIMS = {"idefics3": SiglipDims("idefics3"), "lfm2": SiglipDims("lfm2", scale_factor=2)}


@dataclass(frozen=True)
class SiglipFixture:
    """Paths and facts of one generated pair (Fixture-like: .model, .mmproj)."""

    family: str
    seed: int
    model: Path
    mmproj: Path
    dims: SiglipDims


def _vision_tensors(d: SiglipDims, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    e, p, s = d.v_embd, d.patch_size, d.scale_factor
    n_pos = (d.image_size // p) ** 2
    yield "v.patch_embd.weight", _rng_normal(rng, e, 3, p, p, std=0.05)
    yield "v.patch_embd.bias", _rng_normal(rng, e)
    yield "v.position_embd.weight", _rng_normal(rng, n_pos, e, std=0.5)
    for il in range(d.v_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", 1.0 + _rng_normal(rng, e, std=0.1)
        yield f"{b}.ln1.bias", _rng_normal(rng, e)
        for x in "qkv":
            yield f"{b}.attn_{x}.weight", _rng_normal(rng, e, e, std=0.2)
            yield f"{b}.attn_{x}.bias", _rng_normal(rng, e)
        yield f"{b}.attn_out.weight", _rng_normal(rng, e, e, std=0.1)
        yield f"{b}.attn_out.bias", _rng_normal(rng, e)
        yield f"{b}.ln2.weight", 1.0 + _rng_normal(rng, e, std=0.1)
        yield f"{b}.ln2.bias", _rng_normal(rng, e)
        yield f"{b}.ffn_up.weight", _rng_normal(rng, d.v_ff, e, std=0.1)
        yield f"{b}.ffn_up.bias", _rng_normal(rng, d.v_ff)
        yield f"{b}.ffn_down.weight", _rng_normal(rng, e, d.v_ff, std=0.1)
        yield f"{b}.ffn_down.bias", _rng_normal(rng, e)
    yield "v.post_ln.weight", 1.0 + _rng_normal(rng, e, std=0.1)
    yield "v.post_ln.bias", _rng_normal(rng, e)
    m = e * s * s
    if d.variant == "idefics3":
        yield "mm.model.fc.weight", _rng_normal(rng, d.n_embd, m, std=0.05)
    else:
        yield "mm.input_norm.weight", 1.0 + _rng_normal(rng, m, std=0.1)
        yield "mm.input_norm.bias", _rng_normal(rng, m)
        yield "mm.1.weight", _rng_normal(rng, d.proj_ff, m, std=0.05)
        yield "mm.1.bias", _rng_normal(rng, d.proj_ff)
        yield "mm.2.weight", _rng_normal(rng, d.n_embd, d.proj_ff, std=0.05)
        yield "mm.2.bias", _rng_normal(rng, d.n_embd)


def write_siglip_mmproj(path: str | os.PathLike, d: SiglipDims, *, seed: int, name: str) -> None:
    d.validate()
    w = gguf.GGUFWriter(os.fspath(path), "clip")
    try:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(name)
        w.add_description(f"random-weight {d.variant} mmproj for tests")
        w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool("clip.has_vision_encoder", True)
        w.add_string("clip.projector_type", d.variant)
        w.add_uint32("clip.vision.image_size", d.image_size)
        w.add_uint32("clip.vision.patch_size", d.patch_size)
        w.add_uint32("clip.vision.embedding_length", d.v_embd)
        w.add_uint32("clip.vision.feed_forward_length", d.v_ff)
        w.add_uint32("clip.vision.block_count", d.v_layer)
        w.add_uint32("clip.vision.projection_dim", d.n_embd)
        w.add_uint32("clip.vision.attention.head_count", d.v_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", d.eps)
        w.add_array("clip.vision.image_mean", list(_SIGLIP_MEAN))
        w.add_array("clip.vision.image_std", list(_SIGLIP_STD))
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", d.scale_factor)
        for tname, arr in _vision_tensors(d, np.random.default_rng(seed)):
            w.add_tensor(tname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


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
    spec = _vocab()
    rng = np.random.default_rng(seed)
    hd = d.n_embd // d.n_head
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    try:
        w.add_name(name)
        w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        w.add_context_length(4096)
        w.add_embedding_length(d.n_embd)
        w.add_block_count(d.n_layer)
        w.add_feed_forward_length(d.n_ff)
        w.add_head_count(d.n_head)
        w.add_head_count_kv(d.n_head_kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(hd)
        add_tokenizer(w, spec, CHATML_CHAT_TEMPLATE)
        w.add_tensor("token_embd.weight", _rng_normal(rng, spec.n_vocab, d.n_embd))
        for i in range(d.n_layer):
            p = f"blk.{i}."
            w.add_tensor(p + "attn_norm.weight", np.ones(d.n_embd, np.float32))
            w.add_tensor(p + "attn_q.weight", _rng_normal(rng, d.n_head * hd, d.n_embd))
            w.add_tensor(p + "attn_k.weight", _rng_normal(rng, d.n_head_kv * hd, d.n_embd))
            w.add_tensor(p + "attn_v.weight", _rng_normal(rng, d.n_head_kv * hd, d.n_embd))
            w.add_tensor(p + "attn_output.weight", _rng_normal(rng, d.n_embd, d.n_head * hd))
            w.add_tensor(p + "ffn_norm.weight", np.ones(d.n_embd, np.float32))
            w.add_tensor(p + "ffn_gate.weight", _rng_normal(rng, d.n_ff, d.n_embd))
            w.add_tensor(p + "ffn_up.weight", _rng_normal(rng, d.n_ff, d.n_embd))
            w.add_tensor(p + "ffn_down.weight", _rng_normal(rng, d.n_embd, d.n_ff))
        w.add_tensor("output_norm.weight", np.ones(d.n_embd, np.float32))
        w.add_tensor("output.weight", _rng_normal(rng, spec.n_vocab, d.n_embd))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _key(d: SiglipDims, seed: int) -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for fname in ("fixture_idefics3.py", "fixture_internvl.py", "tokenizer.py"):
        h.update((here / fname).read_bytes())
    h.update(CHATML_CHAT_TEMPLATE.encode())
    h.update(repr((d, seed)).encode())
    return f"{d.variant}-tiny-s{seed}-{h.hexdigest()[:12]}"


def make_idefics3_fixture(out_dir: str | os.PathLike | None = None, variant: str = "idefics3", *, seed: int = 0,
                          dims: SiglipDims | None = None, force: bool = False) -> SiglipFixture:
    """Write (or reuse, keyed by the generator source) a tiny idefics3 or lfm2 pair; returns its paths."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    d = dims or DEFAULT_DIMS[variant]
    d.validate()
    if out_dir is None:
        from .fixture_internvl import default_cache_dir
        out_dir = default_cache_dir()
    folder = Path(out_dir) / _key(d, seed)
    fx = SiglipFixture(d.variant, seed, folder / "model.gguf", folder / "mmproj.gguf", d)
    info = folder / "info.json"
    if info.exists() and fx.model.exists() and fx.mmproj.exists() and not force:
        return fx
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp_model, tmp_mmproj = folder / "model.gguf.tmp", folder / "mmproj.gguf.tmp"
    write_llama_text_model(tmp_model, d, seed=seed, name=f"avis-{d.variant}-tiny")
    write_siglip_mmproj(tmp_mmproj, d, seed=seed + 1, name=f"avis-{d.variant}-tiny-mmproj")
    os.replace(tmp_model, fx.model)
    os.replace(tmp_mmproj, fx.mmproj)
    info.write_text(json.dumps({"family": d.variant, "seed": seed, "dims": asdict(d),
                                "seconds": round(time.perf_counter() - t0, 3)}, indent=2))
    return fx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.fixture_idefics3", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, default="idefics3")
    p.add_argument("--out", default=None, help="output root (default: the cache dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    fx = make_idefics3_fixture(args.out, args.variant, seed=args.seed, force=args.force)
    print(json.dumps({"model": str(fx.model), "mmproj": str(fx.mmproj)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
