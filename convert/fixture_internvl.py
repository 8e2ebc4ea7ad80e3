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

    python -m convert.fixture_internvl --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from .tokenizer import add_tokenizer, build_vocab

# InternVL's ChatML; an image renders as the bare media marker (mtmd wraps it in "<img>" ... "</img>").
from .text_model import CHATML_CHAT_TEMPLATE  # noqa: E402

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class InternVLDims:
    """Sizes of the tiny pair (text + vision)."""

    # text (qwen2)
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 160
    # vision (InternViT + mlp projector)
    v_embd: int = 64
    v_layer: int = 3
    v_head: int = 4
    v_ff: int = 128
    patch_size: int = 14
    image_size: int = 224  # tile size (448 in real models)
    scale_factor: int = 2  # 1 / downsample_ratio
    min_tiles: int = 1
    max_tiles: int = 6
    eps: float = 1e-6

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


@dataclass(frozen=True)
class InternVLFixture:
    """Paths and facts of one generated InternVL pair (Fixture-like: .model, .mmproj, .image_tokens)."""

    family: str
    seed: int
    model: Path
    mmproj: Path
    dims: InternVLDims

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


def _rng_normal(rng: np.random.Generator, *shape: int, std: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


def _vision_tensors(d: InternVLDims, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    e, p, s = d.v_embd, d.patch_size, d.scale_factor
    n_pos = (d.image_size // p) ** 2 + 1
    yield "v.class_embd", _rng_normal(rng, e, std=0.5)
    yield "v.patch_embd.weight", _rng_normal(rng, e, 3, p, p)
    yield "v.patch_embd.bias", _rng_normal(rng, e)
    yield "v.position_embd.weight", _rng_normal(rng, n_pos, e)
    for il in range(d.v_layer):
        b = f"v.blk.{il}"
        yield f"{b}.ln1.weight", 1.0 + _rng_normal(rng, e, std=0.1)
        yield f"{b}.ln1.bias", _rng_normal(rng, e)
        for x in "qkv":
            yield f"{b}.attn_{x}.weight", _rng_normal(rng, e, e, std=0.2)
            yield f"{b}.attn_{x}.bias", _rng_normal(rng, e)
        yield f"{b}.attn_out.weight", _rng_normal(rng, e, e, std=0.1)
        yield f"{b}.attn_out.bias", _rng_normal(rng, e)
        yield f"{b}.ls1.weight", 0.5 + _rng_normal(rng, e, std=0.1)
        yield f"{b}.ln2.weight", 1.0 + _rng_normal(rng, e, std=0.1)
        yield f"{b}.ln2.bias", _rng_normal(rng, e)
        yield f"{b}.ffn_up.weight", _rng_normal(rng, d.v_ff, e, std=0.1)
        yield f"{b}.ffn_up.bias", _rng_normal(rng, d.v_ff)
        yield f"{b}.ffn_down.weight", _rng_normal(rng, e, d.v_ff, std=0.1)
        yield f"{b}.ffn_down.bias", _rng_normal(rng, e)
        yield f"{b}.ls2.weight", 0.5 + _rng_normal(rng, e, std=0.1)
    m = e * s * s
    yield "mm.model.mlp.0.weight", 1.0 + _rng_normal(rng, m, std=0.1)
    yield "mm.model.mlp.0.bias", _rng_normal(rng, m)
    yield "mm.model.mlp.1.weight", _rng_normal(rng, d.n_embd, m)
    yield "mm.model.mlp.1.bias", _rng_normal(rng, d.n_embd)
    yield "mm.model.mlp.3.weight", _rng_normal(rng, d.n_embd, d.n_embd)
    yield "mm.model.mlp.3.bias", _rng_normal(rng, d.n_embd)


def write_internvl_mmproj(path: str | os.PathLike, d: InternVLDims, *, seed: int, name: str) -> None:
    """The vision tower + projector as an f32 mmproj GGUF."""
    d.validate()
    w = gguf.GGUFWriter(os.fspath(path), "clip")
    try:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(name)
        w.add_description("random-weight internvl mmproj for tests")
        w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool("clip.has_vision_encoder", True)
        w.add_string("clip.projector_type", "internvl")
        w.add_uint32("clip.vision.image_size", d.image_size)
        w.add_uint32("clip.vision.patch_size", d.patch_size)
        w.add_uint32("clip.vision.embedding_length", d.v_embd)
        w.add_uint32("clip.vision.feed_forward_length", d.v_ff)
        w.add_uint32("clip.vision.block_count", d.v_layer)
        w.add_uint32("clip.vision.projection_dim", d.n_embd)
        w.add_uint32("clip.vision.attention.head_count", d.v_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", d.eps)
        w.add_array("clip.vision.image_mean", list(_IMAGENET_MEAN))
        w.add_array("clip.vision.image_std", list(_IMAGENET_STD))
        w.add_bool("clip.use_gelu", True)
        w.add_uint32("clip.vision.projector.scale_factor", d.scale_factor)
        w.add_uint32("clip.vision.preproc_min_tiles", d.min_tiles)
        w.add_uint32("clip.vision.preproc_max_tiles", d.max_tiles)
        for tname, arr in _vision_tensors(d, np.random.default_rng(seed)):
            w.add_tensor(tname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _text_tensors(d: InternVLDims, n_vocab: int, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
    hd = d.n_embd // d.n_head
    nq, nkv = d.n_head * hd, d.n_head_kv * hd
    yield "token_embd.weight", _rng_normal(rng, n_vocab, d.n_embd)
    for i in range(d.n_layer):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", np.ones(d.n_embd, np.float32)
        yield p + "attn_q.weight", _rng_normal(rng, nq, d.n_embd)
        yield p + "attn_k.weight", _rng_normal(rng, nkv, d.n_embd)
        yield p + "attn_v.weight", _rng_normal(rng, nkv, d.n_embd)
        yield p + "attn_q.bias", _rng_normal(rng, nq)
        yield p + "attn_k.bias", _rng_normal(rng, nkv)
        yield p + "attn_v.bias", _rng_normal(rng, nkv)
        yield p + "attn_output.weight", _rng_normal(rng, d.n_embd, nq)
        yield p + "ffn_norm.weight", np.ones(d.n_embd, np.float32)
        yield p + "ffn_gate.weight", _rng_normal(rng, d.n_ff, d.n_embd)
        yield p + "ffn_up.weight", _rng_normal(rng, d.n_ff, d.n_embd)
        yield p + "ffn_down.weight", _rng_normal(rng, d.n_embd, d.n_ff)
    yield "output_norm.weight", np.ones(d.n_embd, np.float32)
    yield "output.weight", _rng_normal(rng, n_vocab, d.n_embd)


def write_qwen2_text_model(path: str | os.PathLike, d: InternVLDims, *, seed: int, name: str) -> None:
    """A qwen2 (1-D NEOX RoPE, q/k/v biases) text GGUF with the shared test vocabulary and ChatML roles."""
    spec = build_vocab(family="qwen2vl")  # ChatML roles: no BOS, <|im_end|> ends a turn
    w = gguf.GGUFWriter(os.fspath(path), "qwen2")
    try:
        w.add_name(name)
        w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        w.add_context_length(4096)
        w.add_embedding_length(d.n_embd)
        w.add_block_count(d.n_layer)
        w.add_feed_forward_length(d.n_ff)
        w.add_head_count(d.n_head)
        w.add_head_count_kv(d.n_head_kv)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(1000000.0)
        add_tokenizer(w, spec, CHATML_CHAT_TEMPLATE)
        for tname, arr in _text_tensors(d, spec.n_vocab, np.random.default_rng(seed)):
            w.add_tensor(tname, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def _key(d: InternVLDims, seed: int) -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("fixture_internvl.py", "tokenizer.py"):
        h.update((here / name).read_bytes())
    h.update(CHATML_CHAT_TEMPLATE.encode())
    h.update(repr((d, seed)).encode())
    return f"internvl-tiny-s{seed}-{h.hexdigest()[:12]}"


def default_cache_dir() -> Path:
    base = os.environ.get("AVIS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "avis-llamacpp")
    return Path(base) / "fixtures"


def make_internvl_fixture(out_dir: str | os.PathLike | None = None, *, seed: int = 0,
                          dims: InternVLDims | None = None, force: bool = False) -> InternVLFixture:
    """Write (or reuse, keyed by this generator's source) the tiny InternVL pair; returns its paths."""
    d = dims or InternVLDims()
    d.validate()
    root = Path(out_dir) if out_dir is not None else default_cache_dir()
    folder = root / _key(d, seed)
    fx = InternVLFixture("internvl", seed, folder / "model.gguf", folder / "mmproj.gguf", d)
    info = folder / "info.json"
    if info.exists() and fx.model.exists() and fx.mmproj.exists() and not force:
        return fx
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp_model, tmp_mmproj = folder / "model.gguf.tmp", folder / "mmproj.gguf.tmp"
    write_qwen2_text_model(tmp_model, d, seed=seed, name="avis-internvl-tiny")
    write_internvl_mmproj(tmp_mmproj, d, seed=seed + 1, name="avis-internvl-tiny-mmproj")
    os.replace(tmp_model, fx.model)
    os.replace(tmp_mmproj, fx.mmproj)
    info.write_text(json.dumps({"family": "internvl", "seed": seed, "dims": asdict(d),
                                "seconds": round(time.perf_counter() - t0, 3)}, indent=2))
    return fx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.fixture_internvl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output root (default: the cache dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    fx = make_internvl_fixture(args.out, seed=args.seed, force=args.force)
    print(json.dumps({"model": str(fx.model), "mmproj": str(fx.mmproj),
                      "tokens_per_tile": fx.dims.tokens_per_tile}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
