"""The image scorer: one image chunk's captured keys -> one key per LLM token (by the projector family's rule)
-> KDV or baseline selection -> the per-chunk records that Answer.images reports.

A selection covers a *group* of chunks: one chunk for a still image, every chunk of a video (one anchor, one
top-k or one threshold over all of the video's tokens, as the AVIS reference scores a video). Each chunk is
scored right after its encode, while its keys are captured; the group is chosen once all of it is scored."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .capture import KeyCapture
from .families import ChunkGeometry, Family, TokenKeys, family_for
from .flops import encoder_flops
from .kdv import ImageTokens, KDVSelection, TokenSelector, check_kept, kdv_scores, make_selector, prune
from .mtmd import ImageChunk, Projector
from .prefill import ChunkSelector, GroupSelector

logger = logging.getLogger(__name__)

# image index -> what the selector recorded for that chunk (grid, key source, scores, KDV summary, timing)
ImageMeta = dict[int, dict[str, Any]]

_BASELINE_SOURCE = {"embeddings": "projected_embeddings", "random": "random", "uniform": "uniform"}


@dataclass
class ScoredChunk:
    """One encoded chunk, ready for selection: its scored tokens' keys and where they came from."""

    chunk: ImageChunk
    keys: TokenKeys
    source: str
    embeddings: np.ndarray = field(repr=False)
    score_s: float = 0.0


class ImageScorer:
    """Keys and token selection for the chunks one projector encodes (its family's rules, its key capture)."""

    def __init__(self, projector: Projector, key_capture: KeyCapture | None) -> None:
        self.projector = projector
        self.key_capture = key_capture
        self._capture_warned = False

    @property
    def family(self) -> Family:
        """The vision family of the loaded mmproj (families.py): key tensor, token mapping, FLOPs rules."""
        return family_for(self.projector.vision_info.projector_type)

    def geometry(self, chunk: ImageChunk) -> ChunkGeometry:
        cap = self.key_capture
        return ChunkGeometry(chunk.n_tokens, chunk.nx, chunk.ny, cap.image_wh if cap is not None else None)

    def token_grid(self, chunk: ImageChunk) -> tuple[int, int]:
        """(nx, ny) of an image's LLM tokens, by the family's rule (a 1-row mtmd grid made 2-D where known)."""
        return self.family.token_grid(self.geometry(chunk), self.projector.vision_info)

    def scored_keys(self, chunk: ImageChunk, embeddings: np.ndarray) -> tuple[TokenKeys, str]:
        """Keys of the scored LLM tokens of the chunk just encoded: the last ViT block's captured keys when the
        family's mapping applies, else the projected embeddings as a single head (the fallback; a failed
        capture also falls back, with one warning, so a model llama.cpp runs always gets an answer)."""
        cap = self.key_capture
        if self.projector.capture_error is not None:
            if not self._capture_warned:
                logger.warning("key capture failed (%s); scoring projected embeddings instead",
                               self.projector.capture_error)
                self._capture_warned = True
            source = "projected_embeddings:capture_failed"
        elif cap is not None and cap.keys is not None:
            tk = self.family.token_keys(cap.keys, self.geometry(chunk), self.projector.vision_info)
            if tk is not None and tk.n_tokens == chunk.n_tokens and tk.keys.shape[0] == tk.scored.shape[0]:
                return tk, f"vit_keys:{cap.name}"
            source = "projected_embeddings"
        else:
            source = "projected_embeddings"
        emb = embeddings[:, None, :]
        return TokenKeys(emb, np.arange(chunk.n_tokens, dtype=np.int64), chunk.n_tokens), source

    def recorder(self, image_meta: ImageMeta) -> ChunkSelector:
        """A selector that keeps every token and records the grid and KDV scores (for the features)."""
        def record(chunk: ImageChunk, embeddings: np.ndarray) -> None:
            tk, source = self.scored_keys(chunk, embeddings)
            image_meta[chunk.image_index] = {"grid": list(self.token_grid(chunk)), "key_source": source,
                                             "scores": kdv_scores(tk.keys)}
            return None
        return record

    def score(self, chunk: ImageChunk, embeddings: np.ndarray) -> ScoredChunk:
        """The chunk just encoded, with its scored keys (read now: the capture holds only the last encode)."""
        t0 = time.perf_counter()
        tk, source = self.scored_keys(chunk, embeddings)
        return ScoredChunk(chunk, tk, source, embeddings, time.perf_counter() - t0)

    def chooser(self, ratio: float | None, tau: float | None, image_meta: ImageMeta,
                selector: str | TokenSelector = "kdv", seed: int = 0):
        """choose(group) -> kept token indices per chunk: one KDV selection over all the group's scored tokens
        (one anchor, one top-k for ratio or one threshold for tau), or another selector given the count KDV keeps;
        records each chunk's grid, key source, scores and the selection's summary in image_meta."""
        choose = None if selector == "kdv" else make_selector(selector, seed=seed) if isinstance(selector, str) \
            else selector
        name = selector if isinstance(selector, str) else "custom"

        def choose_group(group: Sequence[ScoredChunk]) -> list[np.ndarray]:
            t0 = time.perf_counter()
            keys = group[0].keys.keys if len(group) == 1 else np.concatenate([s.keys.keys for s in group])
            sel = prune(keys, ratio=ratio, tau=tau)  # indices into the scored tokens; the features use its scores
            source = None
            if choose is not None:
                emb = np.concatenate([s.embeddings[s.keys.scored] for s in group])
                image = ImageTokens(keys, sel.scores, emb, group[0].chunk.image_index)
                kept = check_kept(choose(image, sel.n_kept), sel.n_total)
                sel = KDVSelection(kept=kept, n_total=sel.n_total, n_kept=int(kept.size),
                                   kept_fraction=kept.size / sel.n_total, mode=name,
                                   param=float(ratio if ratio is not None else tau), threshold=float("nan"),
                                   score_summary=sel.score_summary, scores=sel.scores)
                source = _BASELINE_SOURCE.get(name)
            summary = {k: v for k, v in sel.to_dict().items() if k != "kept"}
            select_s = time.perf_counter() - t0
            out, start = [], 0
            for s in group:
                n = s.keys.keys.shape[0]
                mine = sel.kept[(sel.kept >= start) & (sel.kept < start + n)] - start
                kdv = summary
                if len(group) > 1:  # this chunk's share of the video's selection, and the whole selection's
                    kdv = {**summary, "n_total": n, "n_kept": int(mine.size), "kept_fraction": mine.size / n,
                           "group": {"chunks": len(group), "n_total": sel.n_total, "n_kept": sel.n_kept}}
                always = s.keys.always_kept  # e.g. pixtral's row breaks: kept, never scored
                image_meta[s.chunk.image_index] = {
                    "grid": list(self.token_grid(s.chunk)), "key_source": source or s.source,
                    "scores": sel.scores[start:start + n], "always_kept": int(always.size), "kdv": kdv,
                    "select_s": s.score_s + select_s / len(group)}
                out.append(mine.astype(np.int64) if always.size == 0
                           else np.union1d(s.keys.scored[mine], always).astype(np.int64))
                start += n
            return out
        return choose_group

    def group_selector(self, ratio: float | None, tau: float | None, image_meta: ImageMeta,
                       selector: str | TokenSelector = "kdv", seed: int = 0) -> GroupSelector:
        """The prefill hook for chunks selected together (a video): score each after its encode, choose jointly."""
        return GroupSelector(self.score, self.chooser(ratio, tau, image_meta, selector, seed))

    def kdv_selector(self, ratio: float | None, tau: float | None, image_meta: ImageMeta,
                     selector: str | TokenSelector = "kdv", seed: int = 0) -> ChunkSelector:
        """A prefill token selector that keeps each image's tokens chosen by KDV (fixed ratio or adaptive tau),
        or by another selector (a built-in baseline's name or a TokenSelector callable, kdv.py) given the count
        KDV keeps at that setting."""
        choose = self.chooser(ratio, tau, image_meta, selector, seed)
        return lambda chunk, embeddings: choose([self.score(chunk, embeddings)])[0]

    def encoder_flops(self, n_tokens: int) -> float:
        """Vision-encoder FLOPs of one chunk of n_tokens LLM tokens (0 when the mmproj lacks the dimensions)."""
        info = self.projector.vision_info
        if not info.n_layer or not info.n_embd:
            return 0.0
        fam = self.family
        return encoder_flops(fam.encoder_dims(info), fam.n_patches(n_tokens, info))


class ScorerViews:
    """The public face of an object's ImageScorer (VLM's family, token_grid, scored_keys, token_keys and
    kdv_selector), kept with the scorer so the session class stays small."""

    scorer: ImageScorer

    @property
    def family(self) -> Family:
        """The vision family of the loaded mmproj (families.py): key tensor, token mapping, FLOPs rules."""
        return self.scorer.family

    def token_grid(self, chunk: ImageChunk) -> tuple[int, int]:
        """(nx, ny) of an image's LLM tokens, by the family's rule (a 1-row mtmd grid made 2-D where known)."""
        return self.scorer.token_grid(chunk)

    def scored_keys(self, chunk: ImageChunk, embeddings: np.ndarray) -> tuple[TokenKeys, str]:
        """Keys of the scored LLM tokens of the chunk just encoded, and where they came from (scorer.py)."""
        return self.scorer.scored_keys(chunk, embeddings)

    def token_keys(self, chunk: ImageChunk, embeddings: np.ndarray) -> tuple[np.ndarray, str]:
        """Keys of the scored tokens only (see scored_keys), and where they came from."""
        tk, source = self.scorer.scored_keys(chunk, embeddings)
        return tk.keys, source

    def kdv_selector(self, ratio: float | None, tau: float | None, image_meta: ImageMeta,
                     selector: str | TokenSelector = "kdv", seed: int = 0) -> ChunkSelector:
        """A prefill token selector keeping each image's tokens chosen by KDV (or a baseline), see scorer.py."""
        return self.scorer.kdv_selector(ratio, tau, image_meta, selector, seed)
