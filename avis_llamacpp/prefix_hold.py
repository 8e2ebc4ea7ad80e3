"""The prefix cache's hold on the live context: sequence 0 keeps the last prompt's KV cells (the live entry) for
the next query to reuse, and an optional PrefixStore keeps earlier prompts' KV states (prefix_cache.py).

What a cached prefix must match: the cache id (model files + the context settings that change the numbers), the
namespace (one per client on the server), and every chunk's key (text tokens; image digest, selection settings
and grid). Only the rest of a prompt is encoded and decoded."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from .errors import ContextOverflowError
from .mtmd import ImageChunk, Projector
from .native import Context, ContextSettings
from .prefill import ChunkSelector, GroupSelector, PrefillResult, Resume, prefill
from .prefix_cache import NO_MATCH, CachedChunk, ChunkKey, ImageKey, PrefixEntry, PrefixStore, TextKey
from .snapshot import image_digest

logger = logging.getLogger(__name__)


def cache_id_for(model_id: str, settings: ContextSettings) -> str:
    """What a cached prefix must have been computed with: the model files and the context settings that change
    the numbers (flash attention, batch sizes, KV layout)."""
    st = settings
    return hashlib.sha256(
        f"{model_id}|fa={st.flash_attn}|b={st.n_batch}|ub={st.n_ubatch}|u={st.kv_unified}".encode()).hexdigest()


def selection_key(ratio: float | None, tau: float | None, selector: Any, seed: int,
                  joint: bool = False) -> tuple[Any, ...]:
    """What decides an image's kept set besides its pixels (selection is deterministic in these); only the
    built-in selectors have one (generate does not cache queries with a selector callable). joint: the image's
    chunks were selected together (a video), which keeps another set than chunk by chunk."""
    if not isinstance(selector, str):
        raise TypeError("a selector callable has no prefix-cache key")
    if ratio is None and tau is None:
        return ("all",)
    key = (selector, None if ratio is None else float(ratio), None if tau is None else float(tau),
           int(seed) if selector == "random" else None)
    return key + ("joint",) if joint else key


def chunk_keys(prompt: Any, arrays: list[np.ndarray], selection: tuple[Any, ...]) -> list[ChunkKey]:
    """The prompt's chunk keys; an image chunk is named by its image's digest when chunks and images map one
    to one, else (an image split into several chunks, a video) by all images' digests and its ordinal."""
    digests = [image_digest(a) for a in arrays]
    image_chunks = [c for c in prompt.chunks if isinstance(c, ImageChunk)]
    one_to_one = len(image_chunks) == len(digests)
    combined = hashlib.sha256("".join(digests).encode()).hexdigest()
    keys: list[ChunkKey] = []
    for c in prompt.chunks:
        if isinstance(c, ImageChunk):
            d = digests[c.image_index] if one_to_one else f"{combined}:{c.image_index}"
            keys.append(ImageKey(d, selection, c.n_tokens, c.nx, c.ny, c.n_pos))
        else:
            keys.append(TextKey(tuple(int(t) for t in c.tokens)))
    return keys


class PrefixHold:
    """The live entry on sequence 0 of one context, and the store it spills into."""

    def __init__(self, ctx: Context, projector: Projector, n_seq_max: int, store: PrefixStore | None) -> None:
        self.ctx = ctx
        self.projector = projector
        self.n_seq_max = n_seq_max
        self.store = store
        self.live: PrefixEntry | None = None
        self._span: tuple[int, int] = (-1, -1)  # seq 0's (pos_min, pos_max) when the live entry was kept
        self._pending: PrefixEntry | None = None

    def intact(self) -> bool:
        """Whether the context still holds exactly the live entry: sequence 0's positions as they were kept and
        no other sequence (anything else touching the context invalidates it)."""
        if self.live is None:
            return False
        if (self.ctx.seq_pos_min(0), self.ctx.seq_pos_max(0)) != self._span:
            return False
        return all(self.ctx.seq_pos_max(i) == -1 for i in range(1, self.n_seq_max))

    def _store_live(self) -> None:
        """Copy the live entry's KV state into the prefix store (before its cells are dropped or cut)."""
        if self.store is None or not self.intact():
            return
        self.store.put(replace(self.live, state=self.ctx.seq_state(0)))

    def _spill(self) -> None:
        try:
            self._store_live()
        except Exception as e:  # noqa: BLE001 - keeping an old prefix must never fail a query
            logger.warning("prefix cache: could not store the previous prompt (%s)", e)

    def forget(self) -> None:
        """Clear the context; the live entry goes to the prefix store first, if there is one."""
        if self.live is not None:
            self._spill()
        self.live, self._pending = None, None
        self.ctx.clear()

    def clear(self) -> None:
        """Forget the live prompt (the store, if any, keeps what it has)."""
        self.live, self._pending = None, None
        self.ctx.clear()

    def end_query(self, keep: bool) -> None:
        """After a query: keep sequence 0's prompt cells as the live entry (generated tokens and the rollout
        sequences removed), or clear the context."""
        pending, self._pending = self._pending, None
        if keep and pending is not None:
            self.ctx.seq_rm(0, pending.n_past, -1)
            for i in range(1, self.n_seq_max):
                self.ctx.seq_rm(i)
            self.live = pending
            self._span = (self.ctx.seq_pos_min(0), self.ctx.seq_pos_max(0))
        else:
            self.live = None
            self.ctx.clear()

    def info(self) -> dict[str, Any]:
        """The live prompt's KV cells and bytes (KV state + image records), the store's entries and bytes."""
        live = self.live if self.intact() else None
        live_bytes = (self.ctx.seq_state_size(0) + live.nbytes) if live is not None else 0
        store = self.store
        return {"live_tokens": live.n_kv if live is not None else 0, "live_bytes": live_bytes,
                "store_entries": len(store) if store is not None else 0,
                "store_bytes": store.nbytes if store is not None else 0,
                "disk_bytes": store.disk_bytes if store is not None else 0}

    def _restore(self, entry: PrefixEntry, m: Any) -> Any:
        """Put a stored entry's KV state into sequence 0, cut to the match; NO_MATCH when it cannot be used."""
        self.ctx.clear()
        try:
            self.ctx.set_seq_state(entry.state, 0)
        except ContextOverflowError:
            logger.warning("prefix cache: a stored state did not fit this context; decoding cold")
            m = NO_MATCH
        if m.n_kv > 0 and (self.ctx.seq_pos_min(0), self.ctx.seq_pos_max(0)) != (0, entry.n_past - 1):
            logger.warning("prefix cache: a stored state covers the wrong positions; decoding cold")
            m = NO_MATCH
        self.ctx.seq_rm(0, m.n_past, -1)
        return m

    def prefill_cached(self, prompt: Any, keys: Sequence[ChunkKey], cache_id: str, namespace: str,
                       select: ChunkSelector | GroupSelector, groups: Sequence[Sequence[int]] = (),
                       **entry_info: Any) -> tuple[PrefillResult, Any, PrefixEntry | None]:
        """Prefill sequence 0 reusing the longest prefix that the live entry (cells still in the context) or the
        store holds for this cache id and namespace; only the rest is encoded and decoded. The prompt becomes
        the pending live entry (kept by end_query when the query succeeds). Returns the prefill, the match and
        the entry it resumed from (None when cold)."""
        live = self.live if self.intact() else None
        m = live.matches(cache_id, namespace, keys) if live is not None else NO_MATCH
        found = self.store.best_match(cache_id, namespace, keys) if self.store is not None else None
        entry = live
        if found is not None and found[1].n_kv > m.n_kv:
            stored = self.store.get(found[0])
            if stored is not None:
                entry, m = stored, found[1]
        if any(g[0] < m.chunk <= g[-1] or (m.chunk == g[0] and m.offset) for g in groups):
            m = NO_MATCH  # never resume inside a group selected together: its selection needs all its chunks
        if self.live is not None and not (entry is live and m.covers_entry):
            self._spill()  # its cells are about to be cut or replaced
        self.live = None  # until this query succeeds
        resume = None
        if m.n_kv > 0 and entry is live:
            self.ctx.seq_rm(0, m.n_past, -1)
        elif m.n_kv > 0:
            m = self._restore(entry, m)
        else:
            self.ctx.clear()
        if m.n_kv > 0:
            resume = Resume(m.chunk, m.offset, m.n_past, m.n_kv, list(entry.images[:m.n_images]))
            logger.debug("prefix cache: reusing %d cells (%d images)", m.n_kv, m.n_images)
        pre = prefill(self.ctx, self.projector, prompt, select=select, resume=resume, groups=groups)
        first = resume.chunk if resume is not None else 0
        records: list[CachedChunk] = list(entry.chunks[:first]) if resume is not None else []
        new_images = iter(pre.images[m.n_images if resume is not None else 0:])
        for ci, (n_past, n_kv) in zip(range(first, len(prompt.chunks)), pre.spans):
            c = prompt.chunks[ci]
            if isinstance(c, ImageChunk):
                n_cells = next(new_images).n_kept
                n_pos = c.n_pos if self.projector.uses_mrope else n_cells
            else:
                n_cells = n_pos = len(c.tokens)
            records.append(CachedChunk(keys[ci], n_past, n_kv, n_pos, n_cells))
        self._pending = PrefixEntry(cache_id, namespace, tuple(records), pre.n_past, pre.n_kv,
                                    images=list(pre.images), **entry_info)
        return pre, m, entry if resume is not None else None

    def set_pending_scores(self, scores: list[np.ndarray]) -> None:
        """The pending entry's per-image KDV scores (known once the new images' records are read)."""
        if self._pending is not None:
            self._pending.scores = list(scores)
