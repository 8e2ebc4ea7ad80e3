"""What every fixture generator (convert/fixtures.py, convert/fixture_*.py) shares: the cache folder, a cache key
from the generator source, writing a model + mmproj pair into it atomically with an info.json, and the small
ChatML text model of the idefics3 / internvl fixtures. Which families exist: convert/fixtures.py (REGISTRY).

    folder = fixture_key("gemma3-tiny-s0", ("fixture_gemma3.py", "text_model.py"), dims, seed)
    model, mmproj = cached_pair(out_dir, folder, lambda m, p: {...write both, return info...})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import gguf
import numpy as np

from .mmproj import _Init, write_tensors
from .text_model import CHATML_CHAT_TEMPLATE, TextModelDims, write_text_model
from .tokenizer import TokenizerSpec, add_tokenizer

__all__ = ["default_cache_dir", "fixture_key", "cached_pair", "scalars", "write_chatml_text_model", "TinyPairDims",
           "PairFixture", "DimsFixture", "TINY_LLAMA_TEXT", "ln_attention_tensors", "ln_ffn_tensors", "text_model_pair"]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent


# the tiny llama text model of the llava fixture, reused by the families whose text side is a plain llama
TINY_LLAMA_TEXT = TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160)


@dataclass(frozen=True, kw_only=True)
class TinyPairDims:
    """Sizes every one-dims-object pair (idefics3 / lfm2, internvl) starts from, keyword-only: a tiny text model
    (n_*) and a tiny ViT (v_*); a family's subclass adds its patch / tile / projector sizes."""

    # text
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
    eps: float = 1e-6


@dataclass(frozen=True)
class PairFixture:
    """Paths and facts of one generated VLM pair with a text model and vision dims of its own."""

    family: str
    size: str
    seed: int
    model: Path
    mmproj: Path
    text: TextModelDims
    vision: Any


@dataclass(frozen=True)
class DimsFixture:
    """Paths and facts of one generated VLM pair whose text and vision sizes are one dims object."""

    family: str
    seed: int
    model: Path
    mmproj: Path
    dims: TinyPairDims

    @property
    def size(self) -> str:
        """Always "tiny" (the registry's size name for these pairs)."""
        return "tiny"


def default_cache_dir() -> Path:
    """$AVIS_CACHE_DIR or $XDG_CACHE_HOME/avis-llamacpp (~/.cache/avis-llamacpp), then fixtures/."""
    base = os.environ.get("AVIS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "avis-llamacpp")
    return Path(base) / "fixtures"


def fixture_key(prefix: str, sources: Iterable[str], *parts: object) -> str:
    """``prefix-<12 hex>``: a hash of the named files of convert/ (the code that decides the bytes) and of
    ``repr(parts)`` (dims, template, seed, ...), so an edited generator never serves a stale file."""
    h = hashlib.sha256()
    for name in sources:
        h.update((_HERE / name).read_bytes())
    h.update(repr(parts).encode())
    return f"{prefix}-{h.hexdigest()[:12]}"


def cached_pair(out_dir: str | os.PathLike | None, key: str, write: Callable[[Path, Path], dict[str, Any]], *,
                force: bool = False, finish_model: Callable[[Path, Path], None] = os.replace,
                sizes: bool = False) -> tuple[Path, Path]:
    """(model, mmproj) paths under ``out_dir`` (default: the cache dir) / ``key``. Unless the folder is complete
    (both files and info.json) and not ``force``: ``write(tmp_model, tmp_mmproj)`` writes temporary files and
    returns the info, ``finish_model(tmp, final)`` (default os.replace) and os.replace put them in place, and
    the info plus "seconds" (and, with ``sizes``, "model_bytes" / "mmproj_bytes") goes to info.json last."""
    folder = (Path(out_dir) if out_dir is not None else default_cache_dir()) / key
    model, mmproj, info_path = folder / "model.gguf", folder / "mmproj.gguf", folder / "info.json"
    if info_path.exists() and model.exists() and mmproj.exists() and not force:
        return model, mmproj
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp_model, tmp_mmproj = folder / "model.gguf.tmp", folder / "mmproj.gguf.tmp"
    info = write(tmp_model, tmp_mmproj)
    finish_model(tmp_model, model)
    os.replace(tmp_mmproj, mmproj)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    if sizes:
        info.update(model_bytes=model.stat().st_size, mmproj_bytes=mmproj.stat().st_size)
    info_path.write_text(json.dumps(info, indent=2, default=str))
    logger.info("wrote fixture %s in %.2f s", folder, info["seconds"])
    return model, mmproj


def text_model_pair(family: str, out_dir: str | os.PathLike | None, text: TextModelDims, vision: Any,
                    chat_template: str, write_mmproj: Callable[..., dict[str, Any]], sources: Iterable[str], *,
                    seed: int, force: bool = False) -> tuple[Path, Path]:
    """A tiny pair of a text_model.py text model (f32, ``chat_template``) and the mmproj
    ``write_mmproj(path, vision, seed=seed + 1, name=...)`` writes, cached under ``family-tiny-s<seed>-<hash of
    sources, dims, template, seed>``; returns (model, mmproj)."""
    if vision.proj_dim != text.n_embd:
        raise ValueError("vision.proj_dim must equal text.n_embd")
    key = fixture_key(f"{family}-tiny-s{seed}", sources, text, vision, chat_template, seed)

    def write(tmp_model: Path, tmp_mmproj: Path) -> dict[str, Any]:
        text_info = write_text_model(tmp_model, text, seed=seed, chat_template=chat_template,
                                     name=f"avis-{family}-tiny", ftype="f32")
        vision_info = write_mmproj(tmp_mmproj, vision, seed=seed + 1, name=f"avis-{family}-tiny-mmproj")
        return {"family": family, "size": "tiny", "seed": seed, "text": scalars(text_info), "vision": vision_info,
                "text_dims": asdict(text), "vision_dims": asdict(vision)}

    return cached_pair(out_dir, key, write, force=force)


def scalars(info: dict[str, Any]) -> dict[str, Any]:
    """The int / float / str entries of a writer's summary (what info.json keeps of it)."""
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str))}


def ln_attention_tensors(init: _Init, b: str, e: int) -> Iterator[tuple[str, np.ndarray]]:
    """A LayerNorm ViT block's ln1 and biased q / k / v / out (the SigLIP / InternViT fixtures' draws)."""
    yield f"{b}.ln1.weight", 1.0 + init.normal(e, std=0.1)
    yield f"{b}.ln1.bias", init.normal(e)
    for x in "qkv":
        yield f"{b}.attn_{x}.weight", init.normal(e, e, std=0.2)
        yield f"{b}.attn_{x}.bias", init.normal(e)
    yield f"{b}.attn_out.weight", init.normal(e, e, std=0.1)
    yield f"{b}.attn_out.bias", init.normal(e)


def ln_ffn_tensors(init: _Init, b: str, e: int, n_ff: int) -> Iterator[tuple[str, np.ndarray]]:
    """The same block's ln2 and biased ffn_up / ffn_down."""
    yield f"{b}.ln2.weight", 1.0 + init.normal(e, std=0.1)
    yield f"{b}.ln2.bias", init.normal(e)
    yield f"{b}.ffn_up.weight", init.normal(n_ff, e, std=0.1)
    yield f"{b}.ffn_up.bias", init.normal(n_ff)
    yield f"{b}.ffn_down.weight", init.normal(e, n_ff, std=0.1)
    yield f"{b}.ffn_down.bias", init.normal(e)


def _text_tensors(d: TinyPairDims, n_vocab: int, init: _Init, qkv_bias: bool) -> Iterator[tuple[str, np.ndarray]]:
    hd = d.n_embd // d.n_head
    nq, nkv = d.n_head * hd, d.n_head_kv * hd
    yield "token_embd.weight", init.normal(n_vocab, d.n_embd)
    for i in range(d.n_layer):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", init.ones(d.n_embd)
        yield p + "attn_q.weight", init.normal(nq, d.n_embd)
        yield p + "attn_k.weight", init.normal(nkv, d.n_embd)
        yield p + "attn_v.weight", init.normal(nkv, d.n_embd)
        if qkv_bias:
            yield p + "attn_q.bias", init.normal(nq)
            yield p + "attn_k.bias", init.normal(nkv)
            yield p + "attn_v.bias", init.normal(nkv)
        yield p + "attn_output.weight", init.normal(d.n_embd, nq)
        yield p + "ffn_norm.weight", init.ones(d.n_embd)
        yield p + "ffn_gate.weight", init.normal(d.n_ff, d.n_embd)
        yield p + "ffn_up.weight", init.normal(d.n_ff, d.n_embd)
        yield p + "ffn_down.weight", init.normal(d.n_embd, d.n_ff)
    yield "output_norm.weight", init.ones(d.n_embd)
    yield "output.weight", init.normal(n_vocab, d.n_embd)


def write_chatml_text_model(path: str | os.PathLike, d: TinyPairDims, spec: TokenizerSpec, *, arch: str, seed: int,
                            name: str, rms_eps: float, rope_base: float, rope_dim: bool = False,
                            qkv_bias: bool = False) -> int:
    """A seeded random-weight f32 text GGUF (``arch`` llama or qwen2; context 4096) with ``spec``'s vocabulary
    and the ChatML template, from the text sizes of ``d`` (weights std 0.02, norms 1); ``rope_dim`` writes the
    rope dimension count, ``qkv_bias`` adds q/k/v biases. Returns the parameter count."""
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_name(name)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(4096)
    w.add_embedding_length(d.n_embd)
    w.add_block_count(d.n_layer)
    w.add_feed_forward_length(d.n_ff)
    w.add_head_count(d.n_head)
    w.add_head_count_kv(d.n_head_kv)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_freq_base(rope_base)
    if rope_dim:
        w.add_rope_dimension_count(d.n_embd // d.n_head)
    add_tokenizer(w, spec, CHATML_CHAT_TEMPLATE)
    return write_tensors(w, _text_tensors(d, spec.n_vocab, _Init(seed, 0.02), qkv_bias))

