"""Write tiny, seeded, random-weight text-model GGUFs that stock llama.cpp loads.

Two architectures are supported:

* ``llama``   - Llama-2 style decoder with 1-D RoPE (the LLaVA-1.5 language model);
* ``qwen2vl`` - Qwen2 blocks (q/k/v biases) with M-RoPE sections (Qwen2-/2.5-VL);
* ``qwen3vl`` - Qwen3 blocks (no q/k/v biases, per-head RMS q/k norms) with interleaved M-RoPE sections and
  optional deepstack inputs (Qwen3-VL, Qwen3.5-style vision-language models).

The output is byte-for-byte deterministic for a given seed: the GGUF writer
stores no timestamps and tensors are drawn in a fixed order from
``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import gguf
import numpy as np

from .tokenizer import TokenizerSpec, add_tokenizer, build_vocab

__all__ = [
    "TextModelDims",
    "write_text_model",
    "write_text_model_weights",
    "text_tensor_shapes",
    "default_rope_sections",
    "LLAVA_CHAT_TEMPLATE",
    "CHATML_CHAT_TEMPLATE",
    "MEDIA_MARKER",
]

logger = logging.getLogger(__name__)

# What libmtmd (mtmd_default_marker()) splits the prompt on to insert image embeddings.
MEDIA_MARKER = "<__media__>"


def _render_content_macro(after_image: str = "") -> str:
    """Jinja macro rendering message content: text verbatim, images as the media marker + ``after_image``.

    MTMDChatHandler turns image_url parts into text parts holding exactly the
    marker, so such text parts are treated as images too; the image branch
    covers rendering raw OpenAI-style messages directly.
    """
    image = "{{ '" + MEDIA_MARKER + after_image + "' }}"
    return (
        "{%- macro render_content(content) -%}"
        "{%- if content is none -%}"
        "{%- elif content is string -%}{{ content }}"
        "{%- else -%}"
        "{%- for part in content -%}"
        "{%- if part['type'] == 'text' and part['text'] == '" + MEDIA_MARKER + "' -%}" + image +
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] in ['image', 'image_url'] -%}" + image +
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
    )


# LLaVA-1.5 ("USER: ... ASSISTANT:") with the Vicuna system line.  BOS is not
# rendered because llama.cpp adds it (add_bos_token = true).  The template has
# no literal newlines, so trim_blocks/lstrip_blocks settings do not change it.
# An image part renders as "<__media__>\n", mirroring LLaVA's "<image>\n" prefix.
LLAVA_CHAT_TEMPLATE: str = (
    _render_content_macro("\\n")
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ render_content(messages[0]['content']) }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{ \"A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.\" }}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '\\nUSER: ' }}{{ render_content(message['content']) }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '\\nASSISTANT: ' }}{{ render_content(message['content']) }}{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nASSISTANT:' }}{%- endif -%}"
)

# Qwen2.5-VL ChatML.  An image renders as the bare media marker: libmtmd itself
# wraps Qwen2-VL image embeddings in <|vision_start|> ... <|vision_end|>, so
# emitting those tokens here would duplicate them.
CHATML_CHAT_TEMPLATE: str = (
    _render_content_macro()
    + "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ render_content(message['content']) }}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_ARCHES = ("llama", "qwen2vl", "qwen3vl")
_FTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}


@dataclass(frozen=True)
class TextModelDims:
    """Hyper-parameters of a decoder-only text model."""

    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 4096
    rope_theta: float = 10000.0
    rope_sections: tuple[int, int, int, int] | None = None
    rms_eps: float = 1e-6
    n_deepstack: int = 0  # qwen3vl: extra embedding slices the projector appends (deepstack layers)

    @property
    def head_dim(self) -> int:
        """Per-head embedding size."""
        return self.n_embd // self.n_head

    def resolved_rope_sections(self) -> tuple[int, int, int, int]:
        """M-RoPE sections for qwen2vl: the explicit ones or the Qwen2.5-VL proportions."""
        return self.rope_sections if self.rope_sections is not None else default_rope_sections(self.head_dim)

    def validate(self) -> None:
        """Raise ValueError on shapes llama.cpp would reject."""
        if self.arch not in _ARCHES:
            raise ValueError(f"arch must be one of {_ARCHES}, got {self.arch!r}")
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be divisible by n_head_kv")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.arch == "llama":
            if self.rope_sections is not None:
                raise ValueError("rope_sections only applies to the M-RoPE archs 'qwen2vl' / 'qwen3vl'")
        else:
            sections = self.resolved_rope_sections()
            if len(sections) != 4 or any(s < 0 for s in sections):
                raise ValueError("rope_sections must be 4 non-negative ints")
            if sum(sections) != self.head_dim // 2:
                raise ValueError(
                    f"rope_sections {tuple(sections)} must sum to head_dim/2 = {self.head_dim // 2}"
                )


def default_rope_sections(head_dim: int) -> tuple[int, int, int, int]:
    """Split head_dim/2 rotary pairs as Qwen2.5-VL does ([16, 24, 24, 0] for head_dim 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h, 0)


def _tensor_shapes(dims: TextModelDims, n_vocab: int) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """Yield (name, numpy shape, is_norm) in file order; numpy shape is ggml ne reversed."""
    d_head = dims.head_dim
    n_q = dims.n_head * d_head
    n_kv = dims.n_head_kv * d_head
    yield "token_embd.weight", (n_vocab, dims.n_embd), False
    for i in range(dims.n_layer):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (dims.n_embd,), True
        yield p + "attn_q.weight", (n_q, dims.n_embd), False
        yield p + "attn_k.weight", (n_kv, dims.n_embd), False
        yield p + "attn_v.weight", (n_kv, dims.n_embd), False
        if dims.arch == "qwen2vl":
            yield p + "attn_q.bias", (n_q,), False
            yield p + "attn_k.bias", (n_kv,), False
            yield p + "attn_v.bias", (n_kv,), False
        if dims.arch == "qwen3vl":
            yield p + "attn_q_norm.weight", (d_head,), True
            yield p + "attn_k_norm.weight", (d_head,), True
        yield p + "attn_output.weight", (dims.n_embd, n_q), False
        yield p + "ffn_norm.weight", (dims.n_embd,), True
        yield p + "ffn_gate.weight", (dims.n_ff, dims.n_embd), False
        yield p + "ffn_up.weight", (dims.n_ff, dims.n_embd), False
        yield p + "ffn_down.weight", (dims.n_embd, dims.n_ff), False
    yield "output_norm.weight", (dims.n_embd,), True
    yield "output.weight", (n_vocab, dims.n_embd), False


def _add_hparams(writer: gguf.GGUFWriter, dims: TextModelDims, name: str, ftype: gguf.LlamaFileType) -> None:
    """Write general.* and <arch>.* metadata read by llama.cpp's loader."""
    writer.add_name(name)
    writer.add_file_type(int(ftype))
    writer.add_context_length(dims.n_ctx_train)
    writer.add_embedding_length(dims.n_embd)
    writer.add_block_count(dims.n_layer)
    writer.add_feed_forward_length(dims.n_ff)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_head_kv)
    writer.add_layer_norm_rms_eps(dims.rms_eps)
    writer.add_rope_freq_base(dims.rope_theta)
    writer.add_rope_dimension_count(dims.head_dim)
    if dims.arch in ("qwen2vl", "qwen3vl"):
        writer.add_rope_dimension_sections(list(dims.resolved_rope_sections()))
    if dims.arch == "qwen3vl" and dims.n_deepstack:
        writer.add_uint32(f"{dims.arch}.n_deepstack_layers", dims.n_deepstack)


def _write_gguf(path: str | os.PathLike[str], dims: TextModelDims, spec: TokenizerSpec, chat_template: str,
                name: str, ftype: str, tensors: Iterable[tuple[str, np.ndarray]]) -> tuple[Path, int]:
    """Write hyper-parameters, tokenizer and the given tensors (in order) as a text GGUF; (path, n_params)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), dims.arch)
    n_params = 0
    try:
        _add_hparams(writer, dims, name, _FTYPES[ftype])
        add_tokenizer(writer, spec, chat_template)
        for tname, data in tensors:
            n_params += data.size
            writer.add_tensor(tname, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path, n_params


def write_text_model(
    path: str | os.PathLike[str],
    dims: TextModelDims,
    *,
    seed: int,
    chat_template: str,
    name: str,
    weight_std: float = 0.02,
    ftype: str = "f32",
) -> dict[str, object]:
    """Write a seeded random-weight text GGUF to ``path`` and return a summary of what was written."""
    dims.validate()
    if ftype not in _FTYPES:
        raise ValueError(f"ftype must be one of {tuple(_FTYPES)}, got {ftype!r}")
    if weight_std <= 0:
        raise ValueError("weight_std must be positive")

    spec: TokenizerSpec = build_vocab(family="llama" if dims.arch == "llama" else "qwen2vl")
    n_vocab = spec.n_vocab
    rng = np.random.default_rng(seed)
    # Matrices are stored in f16 for ftype f16; 1-D tensors (norms, biases) stay f32 as llama.cpp expects.
    mat_dtype = np.float16 if ftype == "f16" else np.float32

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for tname, shape, is_norm in _tensor_shapes(dims, n_vocab):
            if is_norm:
                yield tname, np.ones(shape, dtype=np.float32)
            else:
                yield tname, (rng.standard_normal(shape, dtype=np.float32) * np.float32(weight_std)).astype(
                    mat_dtype if len(shape) > 1 else np.float32, copy=False)

    path, n_params = _write_gguf(path, dims, spec, chat_template, name, ftype, tensors())

    info: dict[str, object] = {
        "path": str(path),
        "arch": dims.arch,
        "n_vocab": n_vocab,
        "n_params": n_params,
        "file_size": path.stat().st_size,
        "bos_id": spec.bos_id,
        "eos_id": spec.eos_id,
        "eot_id": spec.eot_id,
        "add_bos": spec.add_bos,
        "special_ids": dict(spec.special_ids),
    }
    if dims.arch in ("qwen2vl", "qwen3vl"):
        info["rope_sections"] = dims.resolved_rope_sections()
    logger.info("wrote %s (%s, %d params, %d bytes)", path, dims.arch, n_params, info["file_size"])
    return info


def text_tensor_shapes(dims: TextModelDims, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Expected numpy (PyTorch-layout) shape of every tensor of a text model, in file order."""
    return {name: shape for name, shape, _ in _tensor_shapes(dims, n_vocab)}


def write_text_model_weights(
    path: str | os.PathLike[str],
    dims: TextModelDims,
    weights: dict[str, np.ndarray],
    *,
    spec: TokenizerSpec,
    chat_template: str,
    name: str,
    ftype: str = "f32",
) -> dict[str, object]:
    """Write given (trained) weights as a text GGUF that stock llama.cpp loads; returns a summary.

    ``weights`` maps GGUF tensor names to arrays in PyTorch layout ([n_out, n_in] for linears, [n_vocab, n_embd]
    for ``token_embd.weight``); every tensor of ``text_tensor_shapes`` is required except ``output.weight``,
    whose absence ties the output projection to the token embeddings (llama.cpp then reuses them). For the
    ``llama`` arch Q and K rows must already be in llama.cpp's RoPE NORM layout (adjacent pairs rotate).
    """
    dims.validate()
    if ftype not in _FTYPES:
        raise ValueError(f"ftype must be one of {tuple(_FTYPES)}, got {ftype!r}")
    expected = text_tensor_shapes(dims, spec.n_vocab)
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ValueError(f"unexpected tensors: {unknown}")
    mat_dtype = np.float16 if ftype == "f16" else np.float32

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for tname, shape in expected.items():
            if tname not in weights:
                if tname == "output.weight":
                    continue
                raise ValueError(f"missing tensor {tname!r}")
            data = np.asarray(weights[tname], dtype=np.float32)
            if data.shape != shape:
                raise ValueError(f"{tname}: shape {data.shape}, expected {shape}")
            yield tname, np.ascontiguousarray(data.astype(mat_dtype if data.ndim > 1 else np.float32, copy=False))

    path, n_params = _write_gguf(path, dims, spec, chat_template, name, ftype, tensors())
    info: dict[str, object] = {
        "path": str(path), "arch": dims.arch, "n_vocab": spec.n_vocab, "n_params": n_params,
        "file_size": path.stat().st_size, "tied_output": "output.weight" not in weights,
        "bos_id": spec.bos_id, "eos_id": spec.eos_id,
    }
    logger.info("wrote %s (%s, %d trained params, %d bytes)", path, dims.arch, n_params, info["file_size"])
    return info
