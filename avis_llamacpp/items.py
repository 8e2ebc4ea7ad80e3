"""Labelled question sets (JSONL) and result-record files: one reader, one validation, one resume rule and one
progress helper for `avis calibrate` and `avis bench`.

Items file: one JSON object per line, `{"id", "image" (path relative to the file) or "video" (a clip file, an
animated image, or a list of frame files in order; relative to the file), "question", "options", "answer"}`; extra fields (difficulty, kind, ...) are kept. Record files are append-only JSONL; a truncated last
line (an interrupted write) is dropped when the file is read back for resuming."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

from .errors import InvalidArgumentError
from .voting import normalize_answer

logger = logging.getLogger(__name__)

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:(//|[^\\/])")  # scheme://... or data:..., not C:\ or C:/
T = TypeVar("T")

__all__ = ["Item", "load_items", "media_args", "read_records", "progress", "iterate"]


@dataclass(frozen=True)
class Item:
    """One labelled question: id, resolved image path, question text, options and the gold answer (normalised:
    an option letter when there are options)."""

    id: str
    index: int
    image: Path
    image_field: str | list[str]  # as the file has it
    question: str
    options: tuple[str, ...]
    gold: str
    answer: str = ""  # as written in the file
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    is_video: bool = False  # `image` is a clip (the item's "video" field)
    frames: tuple[Path, ...] = ()  # a clip given as frame files: all of them (`image` is the first)

    @property
    def media_path(self) -> str | list[str]:
        """The picture as VLM.ask's `image` / `video` takes it: one resolved path, or a clip's frame paths."""
        return [str(f) for f in self.frames] if self.frames else str(self.image)

    def media(self) -> dict[str, Any]:
        """What VLM.ask takes for this item's picture: {"image": path} or {"image": None, "video": path(s)}."""
        return media_args(self.media_path, self.is_video)

    def as_dict(self) -> dict[str, Any]:
        """The item as the file had it, plus `image_path` (resolved) and the normalised `gold`."""
        d = dict(self.extra)
        d.update({"video" if self.is_video else "image": self.image_field}, id=self.id, image_path=self.media_path,
                 is_video=self.is_video, question=self.question,
                 options=list(self.options) or None, answer=self.answer, gold=self.gold)
        return d


def load_items(path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """Read and validate an items JSONL: local images that exist (URLs refused), non-empty questions, options as
    strings, an answer that is one of the option letters when there are options, unique ids (default
    `item-<line number, 6 digits>`). `limit` keeps the first items."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no such items file")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"limit must be a positive int, got {limit!r}")
    items: list[Item] = []
    seen: set[str] = set()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{path}: not a UTF-8 JSONL items file (one JSON object per line: image, "
                                   f"question, options, answer)") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{where}: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise InvalidArgumentError(f"{where}: each line must be a JSON object")
        if ("image" in d) == ("video" in d):
            raise InvalidArgumentError(f"{where}: give exactly one of 'image' and 'video'")
        is_video = "video" in d
        media = "video" if is_video else "image"
        missing = [k for k in ("question", "answer") if k not in d]
        if missing:
            raise InvalidArgumentError(f"{where}: missing field(s) {missing}")
        image, question = d[media], d["question"]
        paths = image if is_video and isinstance(image, list) else [image]
        if not paths or not all(isinstance(x, str) and x for x in paths):
            raise InvalidArgumentError(f"{where}: '{media}' must be a path string"
                                       + (" or a non-empty list of frame paths" if is_video else ""))
        for x in paths:
            if _URL_RE.match(x):
                raise InvalidArgumentError(f"{where}: '{media}' must be a local path relative to the JSONL, not a "
                                           f"URL ({x[:60]!r}); remote files are not fetched")
        if not isinstance(question, str) or not question.strip():
            raise InvalidArgumentError(f"{where}: 'question' must be a non-empty string")
        options = d.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, (str, int, float)) for o in options):
            raise InvalidArgumentError(f"{where}: 'options' must be a list of strings")
        options_t = tuple(str(o) for o in options)
        if not isinstance(d["answer"], (str, int, float)) or not str(d["answer"]).strip():
            raise InvalidArgumentError(f"{where}: 'answer' must be a non-empty string")
        gold = normalize_answer(str(d["answer"]), options_t or None)
        if options_t:
            letters = "".join(chr(ord("A") + i) for i in range(min(len(options_t), 26)))
            if gold not in letters:
                raise InvalidArgumentError(f"{where}: answer {d['answer']!r} is not one of the option letters {letters}")
        item_id = str(d.get("id", f"item-{lineno:06d}"))
        if item_id in seen:
            raise InvalidArgumentError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        resolved = [(path.parent / x).resolve() for x in paths]
        for x, img in zip(paths, resolved):
            if not img.is_file():
                raise InvalidArgumentError(f"{where}: {media} {x!r} not found (looked for {img})")
        extra = {k: v for k, v in d.items() if k not in ("id", "image", "video", "question", "options", "answer")}
        frames = tuple(resolved) if isinstance(image, list) else ()
        items.append(Item(item_id, len(items), resolved[0], image, question, options_t, gold, str(d["answer"]),
                          extra, is_video, frames))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InvalidArgumentError(f"{path}: no items")
    return items


def media_args(path: str | list[str], is_video: bool) -> dict[str, Any]:
    """VLM.ask's keywords for a picture file: {"image": path}, or {"image": None, "video": path} for a clip (a file,
    or its frame files in order)."""
    return {"image": None, "video": path} if is_video else {"image": path}


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records from an append-only JSONL results file (empty when it does not exist). A truncated last line
    (the write was interrupted) is dropped from the file so appending resumes cleanly; a corrupt line elsewhere
    is an error."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write was interrupted
                logger.warning("%s: dropping a truncated last record (interrupted run)", path)
                path.write_bytes(b"\n".join(lines[:-1]) + (b"\n" if i else b""))
                break
            raise InvalidArgumentError(f"{path}:{i + 1}: corrupt record ({e})") from None
    return out


class _Progress:
    """A progress bar (tqdm when importable, else periodic log lines) over a known number of steps."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every: int | None = None,
                 log: logging.Logger | None = None) -> None:
        self.total, self.n, self.desc, self.enabled = total, initial, desc, enabled
        self.log = log or logger
        self._bar = None
        self._every = every or max(1, total // 20)
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, initial=initial, desc=desc, unit="item", file=sys.stderr)

    def update(self, n: int = 1, note: Any = "") -> None:
        """Advance by n; `note` (a string or a callable returning one) is logged with the periodic line."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (self.n % self._every == 0 or self.n == self.total):
            text = note() if callable(note) else note
            self.log.info("%s %d/%d items%s", self.desc, self.n, self.total, f" ({text})" if text else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, *, initial: int = 0, desc: str = "items", enabled: bool = True,
             every: int | None = None, log: logging.Logger | None = None) -> _Progress:
    """The one progress helper: `with progress(n) as bar: ...; bar.update()` (tqdm if installed, else a log
    line every `every` steps, default a twentieth of the total)."""
    return _Progress(total, initial, desc, enabled, every, log)


def iterate(seq: Sequence[T], *, desc: str = "items", enabled: bool = True) -> Iterator[T]:
    """Iterate a sequence with the progress helper."""
    with progress(len(seq), desc=desc, enabled=enabled) as bar:
        for x in seq:
            yield x
            bar.update()
