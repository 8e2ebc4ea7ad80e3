"""Real-size fixture writers: a text model and a vision tower with a released VLM's dimensions, streamed to disk.

The ``real`` fixture size (convert/fixtures.py) has Qwen2.5-VL-3B's text model (hidden 2048, 36 layers, 16 / 2
heads, ffn 11008, vocab 151,936, tied output embeddings, as the released 3B) and its vision tower (32 blocks,
hidden 1280, 16 heads, ffn 3420, full attention in blocks 7 / 15 / 23 / 31, i.e. n_wa_pattern 8). Its purpose is
benchmarking at the sizes real models run at: a 3B Q4_K_M decode step is memory-bound where the 0.24B bench
model is compute-bound, and a 151,936-entry logits row makes every per-token full-vocabulary pass in Python
visible. The weights are seeded random numbers, so the text it writes is noise.

``gguf.GGUFWriter.add_tensor`` keeps every tensor in memory until the file is written (about 6 GiB of f16 for the
3B text model), so these writers declare all tensor infos first and then generate and write one tensor at a time
(the token embedding in row blocks): memory stays at one vision tensor or one block of rows. They draw the same
numbers in the same order as ``write_text_model`` / ``write_mmproj``, so at equal dims the files are byte-identical
(tests/test_fixture_real.py checks that on the tiny dims); the real text model is then quantized to Q4_K_M with
llama.cpp's own quantizer (``convert.fixtures.quantize_model``).

Generated on demand only (``python -m convert.fixtures --family qwen25vl --size real``), never by tests or CI.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

from . import mmproj as _mmproj
from . import text_model as _text
from . import tokenizer as _tok
from .mmproj import VisionDims
from .text_model import TextModelDims

__all__ = ["REAL_N_VOCAB", "write_text_model_streaming", "write_mmproj_streaming", "source_digest"]

logger = logging.getLogger(__name__)

# Qwen2.5-VL's (and Qwen2.5's / Qwen3-VL's) vocabulary size: config.json "vocab_size".
REAL_N_VOCAB = 151_936

# Elements generated per block when a tensor is drawn in row blocks (64 MiB of float32).
_CHUNK_ELEMS = 1 << 24


class _RowBlocks:
    """A 2-D tensor drawn from ``rng`` in row blocks as it is written: duck-types the ``nbytes`` and
    ``tofile`` that ``GGUFWriter.write_tensor_data`` uses, so the whole tensor never sits in memory.
    Row-block draws give the same numbers as one ``rng.standard_normal(shape)`` call (numpy's generators
    fill arrays element by element in C order)."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], std: float, dtype: np.dtype) -> None:
        self.rng, self.shape, self.std, self.dtype = rng, shape, np.float32(std), np.dtype(dtype)
        self.nbytes = shape[0] * shape[1] * self.dtype.itemsize

    def tofile(self, fout: Any) -> None:
        """Draw and write the rows block by block."""
        rows, cols = self.shape
        step = max(1, _CHUNK_ELEMS // cols)
        for r0 in range(0, rows, step):
            block = self.rng.standard_normal((min(step, rows - r0), cols), dtype=np.float32) * self.std
            block.astype(self.dtype, copy=False).tofile(fout)


def write_text_model_streaming(
    path: str | os.PathLike[str],
    dims: TextModelDims,
    *,
    seed: int,
    chat_template: str,
    name: str,
    n_vocab: int | None = None,
    tie_output: bool = False,
    weight_std: float = 0.02,
    ftype: str = "f16",
) -> dict[str, object]:
    """Write a seeded random-weight text GGUF one tensor at a time (memory: one block of rows).

    n_vocab: pad the fixtures' small BPE vocabulary to this many tokens (``tokenizer.pad_vocab``); None keeps
    it. tie_output: write no ``output.weight`` (llama.cpp then projects with ``token_embd``, as the released
    Qwen2.5-VL-3B does). With n_vocab None and tie_output False the file is byte-identical to
    ``write_text_model`` with the same arguments."""
    dims.validate()
    if ftype not in _text._FTYPES:
        raise ValueError(f"ftype must be one of {tuple(_text._FTYPES)}, got {ftype!r}")
    if weight_std <= 0:
        raise ValueError("weight_std must be positive")
    spec = _tok.build_vocab(family="llama" if dims.arch == "llama" else "qwen2vl")
    if n_vocab is not None:
        spec = _tok.pad_vocab(spec, n_vocab)
    mat_dtype = np.dtype(np.float16 if ftype == "f16" else np.float32)
    plan = [(tname, shape, is_norm) for tname, shape, is_norm in _text._tensor_shapes(dims, spec.n_vocab)
            if not (tie_output and tname == "output.weight")]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), dims.arch)
    n_params = 0
    rng = np.random.default_rng(seed)
    try:
        _text._add_hparams(writer, dims, name, _text._FTYPES[ftype])
        _tok.add_tokenizer(writer, spec, chat_template)
        for tname, shape, is_norm in plan:
            dtype = mat_dtype if len(shape) > 1 and not is_norm else np.dtype(np.float32)
            writer.add_tensor_info(tname, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (tname, shape, is_norm) in enumerate(plan):
            n_params += int(np.prod(shape))
            if is_norm:
                writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            elif len(shape) == 2:
                writer.write_tensor_data(_RowBlocks(rng, shape, weight_std, mat_dtype))  # type: ignore[arg-type]
            else:
                writer.write_tensor_data(rng.standard_normal(shape, dtype=np.float32) * np.float32(weight_std))
            if i % 32 == 0:
                logger.info("text model %s: tensor %d/%d (%s)", path.name, i + 1, len(plan), tname)
    finally:
        writer.close()
    info: dict[str, object] = {
        "path": str(path), "arch": dims.arch, "n_vocab": spec.n_vocab, "n_params": n_params,
        "file_size": path.stat().st_size, "tied_output": tie_output, "bos_id": spec.bos_id,
        "eos_id": spec.eos_id, "eot_id": spec.eot_id,
    }
    logger.info("wrote %s (%s, %d params, %d bytes)", path, dims.arch, n_params, info["file_size"])
    return info


class _ShapeInit:
    """Stands in for mmproj._Init to learn a tower's tensor names and shapes without drawing or allocating."""

    @staticmethod
    def normal(*shape: int, std: float | None = None) -> np.ndarray:
        return np.broadcast_to(np.float32(0), shape)

    @staticmethod
    def ones(n: int) -> np.ndarray:
        return np.broadcast_to(np.float32(1), (n,))

    @staticmethod
    def zeros(n: int) -> np.ndarray:
        return np.broadcast_to(np.float32(0), (n,))


def write_mmproj_streaming(
    path: str | os.PathLike[str],
    dims: VisionDims,
    *,
    seed: int,
    name: str,
    weight_std: float = 0.02,
    ftype: str = "f16",
) -> dict[str, object]:
    """Write a seeded random-weight mmproj GGUF one tensor at a time (memory: the largest tensor, about 100 MiB
    for the Qwen2.5-VL merger); byte-identical to ``write_mmproj`` with the same arguments."""
    dims.validate()
    if ftype not in _mmproj._FTYPES:
        raise ValueError(f"ftype must be one of {sorted(_mmproj._FTYPES)}, got {ftype!r}")
    gen = {"llava": _mmproj._llava_tensors, "qwen25vl": _mmproj._qwen25vl_tensors,
           "qwen3vl": _mmproj._qwen3vl_tensors, "ldpv2": _mmproj._ldpv2_tensors}[dims.family]
    path = os.fspath(path)
    writer = gguf.GGUFWriter(path, "clip")
    n_params = 0
    try:
        _mmproj._write_kv(writer, dims, name, ftype)
        for tname, arr in gen(dims, _ShapeInit()):  # type: ignore[arg-type]
            dtype = _mmproj._store_dtype(tname, np.zeros((1,) * arr.ndim, dtype=np.float32), ftype).dtype
            writer.add_tensor_info(tname, arr.shape, dtype, arr.size * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tname, arr in gen(dims, _mmproj._Init(seed, weight_std)):
            n_params += int(arr.size)
            writer.write_tensor_data(_mmproj._store_dtype(tname, arr, ftype))
    finally:
        writer.close()
    info = {"path": path, "family": dims.family, "file_size": os.path.getsize(path), "n_params": n_params,
            "n_image_tokens": _mmproj.expected_image_tokens(dims, dims.image_size, dims.image_size)}
    logger.info("wrote %s mmproj %s (%d params, %d bytes)", dims.family, path, n_params, info["file_size"])
    return info


def _sources() -> Iterator[str]:
    """The source of everything that decides the bytes of a real fixture."""
    yield inspect.getsource(inspect.getmodule(write_text_model_streaming))  # type: ignore[arg-type]
    for fn in (_text._tensor_shapes, _text._add_hparams, _text.TextModelDims, _text.default_rope_sections,
               _tok.build_vocab, _tok._learn_merges, _tok.pad_vocab, _tok._padding_tokens, _tok.add_tokenizer,
               _tok.bytes_to_unicode, _mmproj._qwen25vl_tensors, _mmproj._linear, _mmproj._Init,
               _mmproj._write_kv, _mmproj.clip_vision_kv, _mmproj.add_clip_kv, _mmproj._store_dtype,
               _mmproj.VisionDims):
        yield inspect.getsource(fn)
    yield repr((_tok.CONTROL_TOKENS, _tok.USER_DEFINED_TOKENS, _tok._CORPUS, _tok._PRETOKENIZE.pattern,
                _text.CHATML_CHAT_TEMPLATE, _text.LLAVA_CHAT_TEMPLATE))


def source_digest() -> str:
    """A hash of the generator code a real fixture depends on (not whole files): the cache key of the
    multi-GB real fixture changes when that code changes, not when another family is added to the same file."""
    h = hashlib.sha256()
    for src in _sources():
        h.update(src.encode())
    return h.hexdigest()
