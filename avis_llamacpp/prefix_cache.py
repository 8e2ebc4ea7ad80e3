"""Prefix reuse across requests: which part of a prompt's KV cache an earlier prompt already computed.

Why: on CPU the vision encoder and the image prefill are most of time-to-first-token, and every chat turn,
regeneration or new question about the same image repeats them. The VLM keeps sequence 0's prompt cells of
its last query (the "live" entry) and, optionally, a bounded store of earlier prompts' KV states (PrefixStore:
in memory, and on disk as snapshot GGUF files). A new prompt reuses the longest prefix it shares with an entry
and decodes only the rest.

What must match for a chunk to be reused, compared chunk by chunk from the start of the prompt:
- text chunks: the tokens, token by token (a text chunk may be reused up to its first differing token);
- image chunks: the image digest (decoded pixels), the chunk's geometry and the token-selection settings
  (selector, ratio, tau, and the seed for the random baseline). Selection is deterministic in these, so the
  entry's kept sets are exactly what selection would choose again; they are stored and reused, not recomputed.
An entry also carries a cache id (model files + context settings that change the numbers) and a namespace
(whose conversation it is: the server gives every client its own), and is never matched across either.

This module is pure (no llama.cpp calls): the pipeline owns the KV cache operations."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from .errors import InvalidArgumentError, SnapshotMismatchError
from .prefill import ImagePrefill
from .snapshot import Snapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextKey:
    """A text chunk: its tokens."""

    tokens: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ImageKey:
    """An image chunk: what determines its embeddings, kept set and KV cells (given the same prefix before it)."""

    digest: str  # the image's pixels (or, when chunks do not map one to one onto images, all images + ordinal)
    selection: tuple[Any, ...]  # token selection settings, e.g. ("kdv", ratio, tau, None) or ("all",)
    n_tokens: int
    nx: int
    ny: int
    n_pos: int

    @property
    def size(self) -> int:
        return self.n_tokens


ChunkKey = Union[TextKey, ImageKey]


@dataclass(frozen=True)
class CachedChunk:
    """A chunk of a cached prompt and where it sits: first position (n_past), KV cells before it (n_kv), the
    positions it spans and the KV cells it holds (kept tokens of a pruned image; the tokens of text)."""

    key: ChunkKey
    n_past: int
    n_kv: int
    n_pos: int
    n_cells: int


@dataclass(frozen=True)
class Match:
    """Where a new prompt can resume on an entry: `chunk` whole chunks reused, then `offset` tokens of chunk
    `chunk` (a text chunk); decoding resumes at position n_past with n_kv cells already in the cache.
    n_images: image chunks reused. covers_entry: every cell of the entry is part of the match (nothing of it is
    lost by truncating to the match)."""

    chunk: int
    offset: int
    n_past: int
    n_kv: int
    n_images: int
    covers_entry: bool

    @property
    def tokens_skipped(self) -> int:
        """KV cells the new prompt does not compute again."""
        return self.n_kv


NO_MATCH = Match(0, 0, 0, 0, 0, False)


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _remaining(new: Sequence[ChunkKey], chunk: int, offset: int) -> int:
    """Tokens of the new prompt from (chunk, offset) on."""
    if chunk >= len(new):
        return 0
    return new[chunk].size - offset + sum(k.size for k in new[chunk + 1:])


def match_prefix(cached: Sequence[CachedChunk], new: Sequence[ChunkKey]) -> Match:
    """The longest prefix of `new` that `cached` holds, leaving at least one token of `new` to decode (its last
    logits start the answer): a prompt equal to the cached one, or a prefix of it, gives back its last text token
    (or its last image when the prompt ends with an image)."""
    i, offset = 0, 0
    n = min(len(cached), len(new))
    while i < n:
        c, k = cached[i].key, new[i]
        if isinstance(c, TextKey) and isinstance(k, TextKey):
            j = _common(c.tokens, k.tokens)
            if j == len(c.tokens) == len(k.tokens):
                i += 1
                continue
            offset = j
            break
        if c == k:
            i += 1
            continue
        break
    covers = i == len(cached) or (i == len(cached) - 1 and isinstance(cached[i].key, TextKey)
                                  and offset == cached[i].key.size)
    if _remaining(new, i, offset) == 0:  # the whole new prompt is cached: recompute its last token
        while True:
            if offset > 0:
                offset -= 1
                break
            if i == 0:
                break
            i -= 1
            k = new[i]
            if isinstance(k, ImageKey):
                offset = 0
                break
            offset = k.size
    if i == 0 and offset == 0:
        return Match(0, 0, 0, 0, 0, covers)
    if i < len(cached):
        n_past, n_kv = cached[i].n_past + offset, cached[i].n_kv + offset
    else:
        last = cached[-1]
        n_past, n_kv = last.n_past + last.n_pos, last.n_kv + last.n_cells
    n_images = sum(isinstance(c.key, ImageKey) for c in cached[:i])
    return Match(i, offset, n_past, n_kv, n_images, covers)


@dataclass
class PrefixEntry:
    """A prompt whose sequence-0 KV cells are kept: its chunks, next position, cells, per-image prefill records
    (kept sets, embeddings, selection metadata) and KDV scores; `state` is the KV state (llama_state_seq_get_data)
    for a stored entry, None for the live one (its cells are in the context)."""

    cache_id: str
    namespace: str
    chunks: tuple[CachedChunk, ...]
    n_past: int
    n_kv: int
    images: list[ImagePrefill] = field(default_factory=list, repr=False)
    scores: list[np.ndarray] = field(default_factory=list, repr=False)
    state: bytes | None = field(default=None, repr=False)
    prompt_text: str = ""
    model_id: str = ""

    @property
    def key(self) -> str:
        """The entry's identity: cache id, namespace and every chunk key."""
        h = hashlib.sha256(self.cache_id.encode())
        h.update(b"\0" + self.namespace.encode() + b"\0")
        h.update(json.dumps([_key_json(c.key) for c in self.chunks]).encode())
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        """Memory the entry holds: KV state (when stored) + embeddings + scores."""
        return (len(self.state or b"") + sum(int(im.embeddings.nbytes) for im in self.images)
                + sum(int(np.asarray(s).nbytes) for s in self.scores))

    def matches(self, cache_id: str, namespace: str, new: Sequence[ChunkKey]) -> Match:
        """The match of a new prompt on this entry (NO_MATCH across cache ids or namespaces)."""
        if cache_id != self.cache_id or namespace != self.namespace:
            return NO_MATCH
        return match_prefix(self.chunks, new)

    # -- GGUF (the existing snapshot format, prefix-cache details in its `extra` metadata) --------------------
    def to_snapshot(self) -> Snapshot:
        if self.state is None:
            raise InvalidArgumentError("only a stored entry (with its KV state) can be written as a snapshot")
        metas = [im.record(drop=("select_s",)) for im in self.images]
        extra = {"prefix_cache": {"cache_id": self.cache_id, "namespace": self.namespace,
                                  "chunks": [_chunk_json(c) for c in self.chunks],
                                  "arrays": _arrays_digest([im.embeddings for im in self.images], self.scores)}}
        sel = next((c.key.selection for c in self.chunks if isinstance(c.key, ImageKey)), ("all",))
        digests = [c.key.digest for c in self.chunks if isinstance(c.key, ImageKey)]  # one per image record
        return Snapshot(model_id=self.model_id, prefix_text=self.prompt_text, image_digests=digests,
                        pruning={"selection": list(sel)}, n_past=self.n_past, n_kv=self.n_kv, state=self.state,
                        images=metas, embeddings=[im.embeddings for im in self.images], scores=list(self.scores),
                        extra=extra)

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> "PrefixEntry":
        pc = snap.extra.get("prefix_cache")
        if not isinstance(pc, dict):
            raise SnapshotMismatchError("not a prefix-cache snapshot (no prefix_cache metadata)")
        if pc.get("arrays") != _arrays_digest(snap.embeddings, snap.scores):
            raise SnapshotMismatchError("the snapshot's image embeddings or scores were changed")
        images = [ImagePrefill.from_record(meta, emb) for meta, emb in zip(snap.images, snap.embeddings)]
        return cls(cache_id=str(pc["cache_id"]), namespace=str(pc["namespace"]),
                   chunks=tuple(_chunk_from_json(c) for c in pc["chunks"]), n_past=snap.n_past, n_kv=snap.n_kv,
                   images=images, scores=list(snap.scores), state=snap.state, prompt_text=snap.prefix_text,
                   model_id=snap.model_id)


def _arrays_digest(embeddings: Sequence[np.ndarray], scores: Sequence[np.ndarray]) -> str:
    """sha256 of the image arrays as a snapshot file stores them (float32), so a changed payload is refused."""
    h = hashlib.sha256()
    for a in (*embeddings, *scores):
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def _key_json(k: ChunkKey) -> list[Any]:
    if isinstance(k, TextKey):
        return ["t", list(k.tokens)]
    return ["i", k.digest, list(k.selection), k.n_tokens, k.nx, k.ny, k.n_pos]


def _chunk_json(c: CachedChunk) -> list[Any]:
    return [_key_json(c.key), c.n_past, c.n_kv, c.n_pos, c.n_cells]


def _chunk_from_json(raw: list[Any]) -> CachedChunk:
    k, n_past, n_kv, n_pos, n_cells = raw
    if k[0] == "t":
        key: ChunkKey = TextKey(tuple(int(t) for t in k[1]))
    else:
        key = ImageKey(str(k[1]), tuple(k[2]), int(k[3]), int(k[4]), int(k[5]), int(k[6]))
    return CachedChunk(key, int(n_past), int(n_kv), int(n_pos), int(n_cells))


_FILE_RE = re.compile(r"^prefix-([0-9a-f]{64})\.gguf$")


@dataclass
class _DiskEntry:
    path: Path
    cache_id: str
    namespace: str
    chunks: tuple[CachedChunk, ...]
    nbytes: int


class PrefixStore:
    """A bounded store of prefix entries (KV state + image records), least recently used evicted first.

    max_bytes caps the entries held in memory. directory (optional) also keeps every entry as a snapshot GGUF
    file named by the entry's key (prefix-<sha256>.gguf; capped by max_disk_bytes, oldest use removed first),
    so entries survive a restart: files of that name pattern already in the directory are indexed on creation.
    Nothing outside the store decides which file is read: lookups go by key, files are only those the store
    indexed in its own directory, and each is verified (digest, cache id) when loaded. Thread-safe."""

    def __init__(self, max_bytes: int = 1 << 30, directory: str | os.PathLike | None = None,
                 max_disk_bytes: int | None = None) -> None:
        for name, v in (("max_bytes", max_bytes), ("max_disk_bytes", max_disk_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidArgumentError(f"{name} must be an int >= 0 (bytes), got {v!r}")
        self.max_bytes = max_bytes
        self.max_disk_bytes = max_disk_bytes
        self.directory = Path(directory) if directory is not None else None
        self._mem: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._disk: OrderedDict[str, _DiskEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._index_directory()

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes the entries in memory hold."""
        with self._lock:
            return sum(e.nbytes for e in self._mem.values())

    @property
    def disk_bytes(self) -> int:
        with self._lock:
            return sum(d.nbytes for d in self._disk.values())

    def __len__(self) -> int:
        with self._lock:
            return len(set(self._mem) | set(self._disk))

    def clear(self) -> None:
        """Drop every entry (and delete the store's files)."""
        with self._lock:
            self._mem.clear()
            for d in self._disk.values():
                d.path.unlink(missing_ok=True)
            self._disk.clear()

    # -- put / find -----------------------------------------------------------------------------------
    def put(self, entry: PrefixEntry) -> None:
        """Keep an entry (it must carry its KV state); evicts least recently used entries past the caps."""
        if entry.state is None:
            raise InvalidArgumentError("a stored prefix entry needs its KV state")
        key = entry.key
        with self._lock:
            if entry.nbytes <= self.max_bytes:
                self._mem[key] = entry
                self._mem.move_to_end(key)
                while sum(e.nbytes for e in self._mem.values()) > self.max_bytes:
                    old, _ = self._mem.popitem(last=False)
                    logger.debug("prefix store: evicted %s from memory", old[:12])
            if self.directory is not None and key not in self._disk:
                self._write(key, entry)
            elif key in self._disk:
                self._disk.move_to_end(key)

    def best_match(self, cache_id: str, namespace: str, new: Sequence[ChunkKey]) -> tuple[str, Match] | None:
        """The entry key with the longest match (most KV cells reused) for a new prompt, or None."""
        best: tuple[str, Match] | None = None
        with self._lock:
            cands: dict[str, tuple[str, str, tuple[CachedChunk, ...]]] = {
                k: (d.cache_id, d.namespace, d.chunks) for k, d in self._disk.items()}
            cands.update({k: (e.cache_id, e.namespace, e.chunks) for k, e in self._mem.items()})
        for key, (cid, ns, chunks) in cands.items():
            if cid != cache_id or ns != namespace:
                continue
            m = match_prefix(chunks, new)
            if m.n_kv > 0 and (best is None or m.n_kv > best[1].n_kv):
                best = (key, m)
        return best

    def get(self, key: str) -> PrefixEntry | None:
        """The entry (loaded from its file when not in memory), marked as recently used; None if gone."""
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                if key in self._disk:
                    self._disk.move_to_end(key)
                self.hits += 1
                return entry
            disk = self._disk.get(key)
        if disk is None:
            return None
        try:
            entry = PrefixEntry.from_snapshot(Snapshot.load(disk.path))
        except (SnapshotMismatchError, OSError, KeyError, ValueError) as e:
            logger.warning("prefix store: dropping unreadable file %s (%s)", disk.path.name, e)
            with self._lock:
                self._disk.pop(key, None)
            return None
        if entry.key != key or entry.cache_id != disk.cache_id or entry.namespace != disk.namespace:
            logger.warning("prefix store: %s does not hold the entry its name says; ignored", disk.path.name)
            with self._lock:
                self._disk.pop(key, None)
            return None
        with self._lock:
            self._disk.move_to_end(key)
            self.hits += 1
            if entry.nbytes <= self.max_bytes:
                self._mem[key] = entry
                while sum(e.nbytes for e in self._mem.values()) > self.max_bytes:
                    self._mem.popitem(last=False)
        return entry

    # -- disk -----------------------------------------------------------------------------------------
    def _write(self, key: str, entry: PrefixEntry) -> None:
        assert self.directory is not None
        path = self.directory / f"prefix-{key}.gguf"
        tmp = path.with_suffix(".tmp")
        try:
            entry.to_snapshot().save(tmp)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("prefix store: could not write %s (%s)", path, e)
            tmp.unlink(missing_ok=True)
            return
        self._disk[key] = _DiskEntry(path, entry.cache_id, entry.namespace, entry.chunks, path.stat().st_size)
        if self.max_disk_bytes is not None:
            while self._disk and sum(d.nbytes for d in self._disk.values()) > self.max_disk_bytes:
                _, old = self._disk.popitem(last=False)
                old.path.unlink(missing_ok=True)

    def _index_directory(self) -> None:
        """Index the store's own files (by name pattern) from their metadata; the KV payload is read on use."""
        import gguf

        assert self.directory is not None
        files = sorted((p for p in self.directory.iterdir() if _FILE_RE.match(p.name) and p.is_file()),
                       key=lambda p: p.stat().st_mtime)
        for p in files:
            try:
                r = gguf.GGUFReader(os.fspath(p))
                f = r.fields["avis.snapshot.meta"]
                meta = json.loads(bytes(f.parts[f.data[0]]).decode())
                pc = meta["extra"]["prefix_cache"]
                chunks = tuple(_chunk_from_json(c) for c in pc["chunks"])
                d = _DiskEntry(p, str(pc["cache_id"]), str(pc["namespace"]), chunks, p.stat().st_size)
            except Exception as e:  # noqa: BLE001 - a broken file is skipped, never fatal
                logger.warning("prefix store: skipping %s (%s)", p.name, e)
                continue
            self._disk[_FILE_RE.match(p.name).group(1)] = d


__all__ = ["CachedChunk", "ChunkKey", "ImageKey", "Match", "PrefixEntry", "PrefixStore", "TextKey", "match_prefix"]
