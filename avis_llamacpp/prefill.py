"""Prefill one sequence from a tokenized multimodal prompt: text chunks as tokens, image chunks as their
(optionally pruned) embeddings at their decoder positions. Mirrors llama-cpp-python's stock handler
(Llama.eval for text, mtmd_helper_eval_chunk_single for images), so with nothing pruned the KV cache
and logits are the same as stock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ContextOverflowError
from .mtmd import ImageChunk, Projector, Prompt, TextChunk
from .native import Context

# Given an image chunk and its projected embeddings [n_tokens, n_embd], return the kept token indices
# (ascending) or None to keep all. Called after the chunk is encoded, before it is decoded. (kdv.TokenSelector
# chooses among one image's scored tokens; VLM.kdv_selector makes a ChunkSelector of it.)
ChunkSelector = Callable[[ImageChunk, np.ndarray], "np.ndarray | None"]


@dataclass(frozen=True)
class GroupSelector:
    """Kept tokens for image chunks selected together (one video's chunks): `score(chunk, embeddings)` runs right
    after each chunk's encode (while its keys are captured), `choose(scored)` once the whole group is encoded and
    returns each chunk's kept indices (ascending) or None to keep all."""

    score: Callable[[ImageChunk, np.ndarray], Any]
    choose: Callable[[list[Any]], "Sequence[np.ndarray | None]"]


@dataclass
class ImagePrefill:
    """What happened to one image during prefill."""

    index: int
    n_tokens: int
    n_kept: int
    grid: tuple[int, int]  # (nx, ny) of the LLM token grid
    kept: np.ndarray = field(repr=False)
    embeddings: np.ndarray = field(repr=False)  # all projected embeddings, before pruning
    meta: dict = field(default_factory=dict)  # what the selector recorded (key source, KDV summary, ...)

    @property
    def kept_fraction(self) -> float:
        return self.n_kept / self.n_tokens if self.n_tokens else 1.0

    def record(self, *, with_fraction: bool = False, drop: tuple[str, ...] = ()) -> dict:
        """The image as a JSON-able dict (index, counts, grid, kept indices, the selector's metadata): what
        Answer.images, snapshot files and prefix-cache files store. `drop` leaves out metadata keys."""
        out: dict = {"index": self.index, "n_tokens": self.n_tokens, "n_kept": self.n_kept}
        if with_fraction:
            out["kept_fraction"] = self.kept_fraction
        out.update(grid=list(self.grid), kept=self.kept.tolist())
        out.update({k: v for k, v in self.meta.items() if k not in drop})
        return out

    @classmethod
    def from_record(cls, meta: dict, embeddings: np.ndarray) -> "ImagePrefill":
        """The image back from its `record()` (snapshot and prefix-cache files) and its embeddings."""
        kept = np.asarray(meta["kept"], dtype=np.int64)
        im = cls(meta["index"], meta["n_tokens"], len(kept), tuple(meta["grid"]), kept, embeddings)
        im.meta = {k: v for k, v in meta.items()
                   if k not in ("index", "n_tokens", "n_kept", "kept_fraction", "grid", "kept")}
        return im


@dataclass
class PrefillResult:
    """State after prefill: next free position, tokens in the KV cache, per-image details, timings (s)."""

    n_past: int
    n_kv: int
    images: list[ImagePrefill]
    encode_s: float
    prefill_s: float
    # (first position, KV cells before it) of each chunk decoded here, from the resume chunk on (prefix cache)
    spans: list[tuple[int, int]] = field(default_factory=list)
    n_reused: int = 0  # KV cells taken from an earlier prompt (Resume.n_kv), not decoded


@dataclass
class Resume:
    """Where prefill continues on a sequence that already holds the prompt's first cells (prefix cache): chunk
    `chunk` from its token `offset` on (offset > 0 only for text), at position n_past with n_kv cells cached;
    `images` are the records of the image chunks before it (their kept sets, embeddings, metadata)."""

    chunk: int
    offset: int
    n_past: int
    n_kv: int
    images: list[ImagePrefill]


def count_prefill_tokens(prompt: Prompt) -> int:
    """KV-cache cells the unpruned prompt needs (image tokens + text tokens)."""
    return prompt.n_tokens


def prefill(ctx: Context, projector: Projector, prompt: Prompt, *, seq_id: int = 0, pos0: int = 0,
            select: ChunkSelector | GroupSelector | None = None, resume: Resume | None = None,
            groups: Sequence[Sequence[int]] = ()) -> PrefillResult:
    """Decode the whole prompt into sequence seq_id, leaving the last position's logits ready.

    M-RoPE models: kept image tokens keep their original positions and the following text continues
    after the image's full position span. 1-D RoPE models: kept tokens get consecutive positions.
    resume: the sequence already holds the prompt up to that point (the prefix cache); only the rest is
    decoded, continuing at its position and cell count (which differ after a pruned M-RoPE image).
    groups: chunk indices selected together by a GroupSelector (a video's chunks); every image chunk not named
    is a group of its own. A group's chunks are all encoded when its first is reached, then chosen at once.
    """
    if prompt.n_tokens > ctx.n_ctx:
        raise ContextOverflowError(f"prompt needs {prompt.n_tokens} tokens (text + image) but n_ctx is {ctx.n_ctx}; "
                                   "raise n_ctx or use smaller images")
    n_past = pos0 if resume is None else resume.n_past
    n_kv = 0 if resume is None else resume.n_kv
    images: list[ImagePrefill] = [] if resume is None else list(resume.images)
    first = 0 if resume is None else resume.chunk
    spans: list[tuple[int, int]] = []
    encode_s = 0.0
    t_start = time.perf_counter()
    last = len(prompt.chunks) - 1
    group_of = {ci: list(g) for g in groups for ci in g}
    chosen: dict[int, tuple[np.ndarray, "np.ndarray | None"]] = {}  # chunk -> (embeddings, kept) of its group
    for ci, chunk in enumerate(prompt.chunks):
        if ci < first:
            continue
        skip = resume.offset if resume is not None and ci == first else 0
        spans.append((n_past - skip, n_kv - skip))
        if isinstance(chunk, TextChunk):
            tokens = chunk.tokens[skip:]
            if tokens:
                ctx.decode_tokens(tokens, n_past, seq_id, logits_last=True)
                n_past += len(tokens)
                n_kv += len(tokens)
            continue
        if ci not in chosen:
            members = [g for g in group_of.get(ci, [ci]) if g >= ci]
            encoded = []
            for g in members:
                t0 = time.perf_counter()
                e = projector.encode(prompt.chunks[g])
                encode_s += time.perf_counter() - t0
                if isinstance(select, GroupSelector):
                    encoded.append((e, select.score(prompt.chunks[g], e)))
                else:
                    encoded.append((e, select(prompt.chunks[g], e) if select is not None else None))
            picks = (select.choose([sc for _, sc in encoded]) if isinstance(select, GroupSelector)
                     else [sc for _, sc in encoded])
            chosen.update((g, (e, p)) for g, (e, _), p in zip(members, encoded, picks))
        embd, pick = chosen.pop(ci)
        positions = projector.positions(chunk, n_past)
        kept = np.arange(chunk.n_tokens, dtype=np.int64) if pick is None else np.asarray(pick, dtype=np.int64)
        if projector.uses_mrope:
            pos = positions[kept]
            advance = chunk.n_pos  # text continues after the image's full span
        else:
            pos = (n_past + np.arange(len(kept), dtype=np.int32))[:, None]
            advance = len(kept)
        if projector.non_causal(chunk):  # as mtmd_helper_decode_image_chunk: bidirectional within the image
            ctx.decode_embeddings(embd[kept], pos, seq_id, logits_last=(ci == last), causal=False)
        else:
            ctx.decode_embeddings(embd[kept], pos, seq_id, logits_last=(ci == last))
        n_past += advance
        n_kv += len(kept)
        images.append(ImagePrefill(chunk.image_index, chunk.n_tokens, len(kept), (chunk.nx, chunk.ny), kept, embd))
    prefill_s = time.perf_counter() - t_start - encode_s
    return PrefillResult(n_past, n_kv, images, encode_s, prefill_s, spans, 0 if resume is None else resume.n_kv)
