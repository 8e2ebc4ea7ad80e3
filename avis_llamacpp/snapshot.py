"""A prefilled prompt prefix (system text + images, KDV already applied) saved as a GGUF file, so one image
prefill can answer several questions, in this process or after a restart.

The file holds the sequence's KV state (llama_state_seq_get_data), the prefill's next position and the
per-image embeddings/scores (for the predictor's features), plus the identity of the model pair and a
digest of the prefix; loading into another model, or asking with other images, is refused."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SnapshotMismatchError

ARCH = "avis-snapshot"
VERSION = 1


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 over a file's size, first and last MiB: cheap and specific enough to tell model files apart."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with p.open("rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return h.hexdigest()


def image_digest(rgb: np.ndarray) -> str:
    """sha256 of an image's decoded RGB pixels and shape."""
    h = hashlib.sha256(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


@dataclass
class Snapshot:
    """The state after prefilling a prompt prefix on sequence 0."""

    model_id: str  # fingerprint of text model + mmproj
    prefix_text: str  # rendered prompt text up to the question (contains the media markers)
    image_digests: list[str]
    pruning: dict[str, Any]  # {"ratio": r, "tau": t}
    n_past: int  # next position after the prefix
    n_kv: int  # KV cells the prefix occupies
    state: bytes = field(repr=False)
    images: list[dict[str, Any]] = field(default_factory=list)  # per-image metadata (kept, grid, ...)
    embeddings: list[np.ndarray] = field(default_factory=list, repr=False)
    scores: list[np.ndarray] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON metadata of other users (e.g. the prefix cache)

    @property
    def digest(self) -> str:
        """What identifies the prefix: model, prefix text, images and pruning."""
        h = hashlib.sha256(self.model_id.encode())
        h.update(self.prefix_text.encode())
        for d in self.image_digests:
            h.update(d.encode())
        h.update(json.dumps(self.pruning, sort_keys=True).encode())
        if self.extra:  # absent from older files, whose digests stay as they were
            h.update(json.dumps(self.extra, sort_keys=True).encode())
        h.update(hashlib.sha256(self.state).digest())  # a corrupted KV payload fails the check on load
        return h.hexdigest()

    def check(self, model_id: str, prefix_text: str, image_digests: list[str] | None) -> None:
        """Refuse to continue a prompt this snapshot does not belong to."""
        if model_id != self.model_id:
            raise SnapshotMismatchError("this snapshot was made with a different text model or mmproj file")
        if prefix_text != self.prefix_text:
            raise SnapshotMismatchError("this snapshot's prompt prefix differs from the prompt being asked "
                                        "(chat format, system prompt or number of images changed)")
        if image_digests is not None and image_digests != self.image_digests:
            raise SnapshotMismatchError("the images passed differ from the snapshot's images; pass the same "
                                        "images or none")

    def save(self, path: str | os.PathLike) -> None:
        """Write the snapshot as a GGUF file (metadata as KV pairs, state and arrays as tensors)."""
        import gguf

        w = gguf.GGUFWriter(os.fspath(path), ARCH)
        w.add_uint32("avis.snapshot.version", VERSION)
        w.add_string("avis.snapshot.model_id", self.model_id)
        w.add_string("avis.snapshot.prefix_text", self.prefix_text)
        w.add_string("avis.snapshot.meta", json.dumps({"image_digests": self.image_digests, "pruning": self.pruning,
                                                        "n_past": self.n_past, "n_kv": self.n_kv,
                                                        "images": self.images, "digest": self.digest,
                                                        **({"extra": self.extra} if self.extra else {})}))
        w.add_tensor("state", np.frombuffer(self.state, dtype=np.int8).copy())
        for i, (e, s) in enumerate(zip(self.embeddings, self.scores)):
            w.add_tensor(f"image.{i}.embeddings", np.ascontiguousarray(e, dtype=np.float32))
            w.add_tensor(f"image.{i}.scores", np.ascontiguousarray(s, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Snapshot":
        """Read a snapshot GGUF; a file that is not one (or of another version) raises SnapshotMismatchError."""
        import gguf

        try:
            r = gguf.GGUFReader(os.fspath(path))
        except Exception as e:  # gguf raises ValueError/struct errors on garbage
            raise SnapshotMismatchError(f"{path}: not a readable GGUF snapshot ({e})") from e

        def s(key: str) -> str:
            f = r.fields.get(key)
            if f is None:
                raise SnapshotMismatchError(f"{path}: missing {key}; not an avis snapshot")
            return str(f.contents())

        arch = s("general.architecture")
        if arch != ARCH:
            raise SnapshotMismatchError(f"{path}: general.architecture is {arch!r}, expected {ARCH!r}")
        ver = r.fields.get("avis.snapshot.version")
        if ver is None or int(ver.contents()) != VERSION:
            raise SnapshotMismatchError(f"{path}: unsupported snapshot version")
        meta = json.loads(s("avis.snapshot.meta"))
        tensors = {t.name: np.asarray(t.data) for t in r.tensors}
        n_images = len(meta["image_digests"])
        snap = cls(model_id=s("avis.snapshot.model_id"), prefix_text=s("avis.snapshot.prefix_text"),
                   image_digests=list(meta["image_digests"]), pruning=dict(meta["pruning"]), n_past=int(meta["n_past"]),
                   n_kv=int(meta["n_kv"]), state=tensors["state"].astype(np.int8).tobytes(),
                   images=list(meta["images"]),
                   embeddings=[tensors[f"image.{i}.embeddings"].astype(np.float32) for i in range(n_images)],
                   scores=[tensors[f"image.{i}.scores"].astype(np.float64) for i in range(n_images)],
                   extra=dict(meta.get("extra") or {}))
        if snap.digest != meta.get("digest"):
            raise SnapshotMismatchError(f"{path}: digest mismatch (file edited or corrupted)")
        return snap
