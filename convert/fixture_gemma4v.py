"""Seeded random-weight Gemma 4 VLM pair (text GGUF + mmproj GGUF, projector type ``gemma4v``) for tests.

Vision side, as llama.cpp's ``tools/mtmd/models/gemma4v.cpp`` and ``clip.cpp`` (PROJECTOR_TYPE_GEMMA4V) load it:
pixels scaled to [-1, 1] in the graph, a bias-free conv patch embedding, learned x / y position tables
(``v.position_embd.weight``, ggml ne [n_embd, pos_size, 2]), RMSNorm blocks with per-head q / k norms,
2-D NEOX RoPE (x on the first half of each head, y on the second, theta 100), RMS-normed V, kq_scale 1,
post-attention and post-FFN norms, GEGLU FFN, a per-block output scale, then a k x k average pool
(k = ``clip.vision.projector.scale_factor``, default 3), * sqrt(n_embd), RMSNorm and ``mm.input_projection``.
Every linear goes through Gemma4ClippableLinear: ``<weight>.input_min/max`` / ``.output_min/max`` scalars
clamp its input / output; the fixture gives the first block's q projection such clamps.
Images keep their aspect ratio (dyn-size preprocessor, aligned to patch_size * k, 70..1120 tokens).

Text side: mtmd does not check the text architecture for this projector, so the text model is
convert/text_model.py's ``llama`` arch with a Gemma 4 style turn template; mtmd wraps the image in
``<|image>`` ... ``<image|>`` text and, for a text n_embd other than 1536 / 2560, decodes it non-causally.

    python -m convert.fixtures --family gemma4v --out DIR      # or make_fixture("gemma4v")
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

__all__ = ["Gemma4VisionDims", "Gemma4Fixture", "GEMMA4_CHAT_TEMPLATE", "TINY_TEXT", "TINY_VISION",
           "make_gemma4v_fixture", "write_gemma4v_mmproj", "GEMMA4V_MIN_TOKENS", "GEMMA4V_MAX_TOKENS"]

GEMMA4V_MIN_TOKENS, GEMMA4V_MAX_TOKENS = 70, 1120  # clip.cpp: hparams.set_limit_image_tokens(70, 1120)

GEMMA4_CHAT_TEMPLATE: str = (
    _render_content_macro()
    + "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\\n' }}{{ render_content(message['content']) }}{{ '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Gemma4VisionDims:
    """Hyper-parameters of a tiny Gemma 4 vision tower + pooling projector."""

    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 4
    n_ff: int = 128
    patch_size: int = 8
    scale_factor: int = 3  # 3 x 3 pool: 24 px per LLM token
    pos_size: int = 64  # position-table rows per axis (images up to 512 px a side)
    proj_dim: int = 64  # = text n_embd
    image_size: int = 224  # metadata only (the converter writes 224; the dyn-size preprocessor ignores it)
    eps: float = 1e-6
    weight_std: float = 0.05

    @property
    def align(self) -> int:
        return self.patch_size * self.scale_factor

    def validate(self) -> None:
        d_head = self.n_embd // self.n_head
        if self.n_embd % self.n_head or d_head % 4:
            raise ValueError("head dim must be a multiple of 4 (two NEOX halves)")


# the code that decides the bytes (the cache key)
_SOURCES = ("fixture_gemma4v.py", "fixture_common.py", "mmproj.py", "text_model.py", "tokenizer.py")

TINY_TEXT = TINY_LLAMA_TEXT
TINY_VISION = Gemma4VisionDims()


class Gemma4Fixture(PairFixture):
    """Paths and facts of the generated pair (the shape of convert.fixtures.Fixture; .vision a Gemma4VisionDims)."""

    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(nx, ny) LLM-token grid for an image that mtmd's aligned size already fits (no min/max rescale)."""
        a = self.vision.align
        return max(1, round(width / a)), max(1, round(height / a))


def _tensors(d: Gemma4VisionDims, init: _Init) -> Iterator[tuple[str, np.ndarray]]:
    e, p, dh, normal = d.n_embd, d.patch_size, d.n_embd // d.n_head, init.normal

    def norm(name: str, n: int = e) -> tuple[str, np.ndarray]:
        return name, (1.0 + normal(n, std=0.1)).astype(np.float32)

    yield "v.patch_embd.weight", normal(e, 3, p, p, std=0.1)
    yield "v.position_embd.weight", normal(2, d.pos_size, e, std=0.5)  # ne [n_embd, pos_size, 2]: x table, y table
    for il in range(d.n_layer):
        b = f"v.blk.{il}"
        yield norm(f"{b}.ln1.weight")
        for x in "qkv":
            yield f"{b}.attn_{x}.weight", normal(e, e, std=0.15)
        if il == 0:  # Gemma4ClippableLinear scalars (1-element tensors), tight enough to clamp
            yield f"{b}.attn_q.input_max", np.array([1.5], dtype=np.float32)
            yield f"{b}.attn_q.input_min", np.array([-1.5], dtype=np.float32)
            yield f"{b}.attn_q.output_max", np.array([0.8], dtype=np.float32)
            yield f"{b}.attn_q.output_min", np.array([-0.8], dtype=np.float32)
        yield norm(f"{b}.attn_q_norm.weight", dh)
        yield norm(f"{b}.attn_k_norm.weight", dh)
        yield f"{b}.attn_out.weight", normal(e, e)
        yield norm(f"{b}.attn_post_norm.weight")
        yield norm(f"{b}.ln2.weight")
        yield f"{b}.ffn_gate.weight", normal(d.n_ff, e)
        yield f"{b}.ffn_up.weight", normal(d.n_ff, e)
        yield f"{b}.ffn_down.weight", normal(e, d.n_ff)
        yield norm(f"{b}.ffn_post_norm.weight")
        yield f"{b}.out_scale.weight", np.array([0.9], dtype=np.float32)
    yield "mm.input_projection.weight", normal(d.proj_dim, e, std=0.1)  # ne [n_embd, proj_dim]


def write_gemma4v_mmproj(path: str | os.PathLike, d: Gemma4VisionDims, *, seed: int, name: str) -> dict:
    """Write the random-weight gemma4v mmproj GGUF (f32); returns a summary."""
    d.validate()
    path = os.fspath(path)
    w = gguf.GGUFWriter(path, "clip")
    kv = [("clip.use_gelu", True),
          *clip_vision_kv(d.image_size, d.patch_size, d.n_embd, d.n_ff, d.n_layer, d.proj_dim, d.n_head, d.eps),
          ("clip.vision.projector.scale_factor", d.scale_factor),
          ("clip.vision.image_mean", [0.0, 0.0, 0.0]),  # the graph itself maps [0, 1] to [-1, 1]
          ("clip.vision.image_std", [1.0, 1.0, 1.0])]
    add_clip_kv(w, name, "random-weight gemma4v mmproj for tests", gguf.LlamaFileType.ALL_F32, kv, "gemma4v")
    n_params = write_tensors(w, _tensors(d, _Init(seed, d.weight_std)))
    return {"path": path, "n_params": n_params, "file_size": os.path.getsize(path)}


def make_gemma4v_fixture(out_dir: str | os.PathLike | None = None, *, seed: int = 0, force: bool = False,
                         text: TextModelDims = TINY_TEXT, vision: Gemma4VisionDims = TINY_VISION) -> Gemma4Fixture:
    """Write (or reuse from the cache) the tiny gemma4v pair; returns its paths."""
    model, mmproj = text_model_pair("gemma4v", out_dir, text, vision, GEMMA4_CHAT_TEMPLATE, write_gemma4v_mmproj,
                                    _SOURCES, seed=seed, force=force)
    return Gemma4Fixture("gemma4v", "tiny", seed, model, mmproj, text, vision)
