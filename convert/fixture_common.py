"""What every fixture generator (convert/fixtures.py, convert/fixture_*.py) shares: the cache folder, a cache key
from the generator source, writing a model + mmproj pair into it atomically with an info.json, the small
ChatML text model of the idefics3 / internvl fixtures, and the command line of a family's generator.

    folder = fixture_key("gemma3-tiny-s0", ("fixture_gemma3.py", "text_model.py"), dims, seed)
    model, mmproj = cached_pair(out_dir, folder, lambda m, p: {...write both, return info...})
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import gguf
import numpy as np

from .mmproj import _Init, write_tensors
from .text_model import CHATML_CHAT_TEMPLATE
from .tokenizer import TokenizerSpec, add_tokenizer

__all__ = ["default_cache_dir", "fixture_key", "cached_pair", "scalars", "write_chatml_text_model",
           "fixture_argparser"]

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent


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


def scalars(info: dict[str, Any]) -> dict[str, Any]:
    """The int / float / str entries of a writer's summary (what info.json keeps of it)."""
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str))}


def _text_tensors(d: Any, n_vocab: int, init: _Init, qkv_bias: bool) -> Iterator[tuple[str, np.ndarray]]:
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


def write_chatml_text_model(path: str | os.PathLike, d: Any, spec: TokenizerSpec, *, arch: str, seed: int,
                            name: str, rms_eps: float, rope_base: float, rope_dim: bool = False,
                            qkv_bias: bool = False) -> int:
    """A seeded random-weight f32 text GGUF (``arch`` llama or qwen2; context 4096) with ``spec``'s vocabulary
    and the ChatML template, from dims ``d`` with n_embd / n_layer / n_head / n_head_kv / n_ff (weights std
    0.02, norms 1); ``rope_dim`` writes the rope dimension count, ``qkv_bias`` adds q/k/v biases. Returns the
    parameter count."""
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


def fixture_argparser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A family generator's command line: --out, --seed, --force (add family options to it)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output root (default: the cache dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    return p
