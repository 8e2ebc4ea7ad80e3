"""Synthetic video task: coloured shapes moving, appearing and disappearing over short clips, questions A-D.

Deterministic by (split, index) as the image task (``convert/shapes_task.py``): every item's generator is
``np.random.default_rng([SPLITS[split], index])``, the split codes disjoint from the image task's, so the
train / calibration / test splits draw from disjoint seed streams. numpy + PIL only (no torch).

A clip is ``N_FRAMES`` (8) frames of ``FRAME_SIZE`` (112) px: Qwen2.5-VL's mtmd merges each pair of adjacent
frames into one temporal patch of 8 x 8 = 64 tokens, so a clip is 4 chunks, 256 visual tokens. Each clip holds
1-5 objects of distinct colours (so a colour names an object, and a frame can be read back by colour alone).

Question kinds, by what answering them needs:

- more than one frame: ``direction`` (which way X moves), ``moving`` (which shape moves), ``appear`` (which
  shape appears during the clip), ``disappear`` (which one disappears), ``order`` (which of two shapes appears
  first);
- any single frame: ``count`` (how many shapes / shapes of a colour) and ``colour`` (colour of a unique shape).

Content is uneven over time in a share of clips, as in real video: for QUIET_SHARE of the ``count``, ``colour``,
``direction`` and ``moving`` items the shapes are off screen for a *quiet stretch* of whole frame pairs at the start
or the end (background only; 3 of the 4 pairs for count / colour, 1 for direction / moving, so motion still spans
six frames). A quiet count / colour clip is also *crowded*: its one busy pair holds CROWD (5-6) objects, about 20
of the pair's 64 tokens, more than a quarter of them. Such clips are where one selection over the whole video (KDV
joint) and one per frame pair differ: at rho 0.75 a per-pair rule keeps 16 tokens of the busy pair and 48 of empty
background, a joint one can spend the empty pairs' share on the busy pair. Whether and how an item is quiet (and
its crowd) is drawn from its own stream (``[SPLITS[split], index, 1]``), so every other item, and every appear /
disappear / order item, is what it was before quiet stretches.

Targets carry the image task's trace form (a short reasoning line, every option checked, the tagged letter).

    python -m convert.video_task --split test --n 300 --out DIR    # DIR/items.jsonl + DIR/clips/<id>/f0.png ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from convert.shapes_task import COLOURS, LETTERS, SHAPES, Obj, Question, _plural, _shape_polygon, format_question

__all__ = ["FRAME_SIZE", "N_FRAMES", "KINDS", "TEMPORAL_KINDS", "QUIET_KINDS", "QUIET_SHARE", "CROWD", "CROWD_KINDS",
           "SPLITS", "DIRECTIONS", "Track", "Clip", "VideoItem", "check_quiet_share", "draw_quiet", "make_quiet",
           "crowd", "make_item", "render_clip", "item_record", "export"]

logger = logging.getLogger(__name__)

FRAME_SIZE = 112
N_FRAMES = 8
FPS = 2.0  # nominal frame rate written to the records (qwen-vl-utils' default sampling rate)
TEMPORAL_KINDS: tuple[str, ...] = ("direction", "moving", "appear", "disappear", "order")
KINDS: tuple[str, ...] = TEMPORAL_KINDS + ("count", "colour")
# Disjoint from the image task's codes (1, 2, 3): rng = default_rng([SPLITS[split], index]).
SPLITS: dict[str, int] = {"train": 11, "calibration": 12, "test": 13}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
GAP = 3.0  # minimum pixels between two visible objects' discs in every frame
QUIET_KINDS: tuple[str, ...] = ("count", "colour", "direction", "moving")  # kinds whose answer survives a quiet stretch
QUIET_SHARE = 0.5  # share of QUIET_KINDS items with a quiet stretch
QUIET_PAIRS: dict[str, tuple[int, int]] = {"count": (3, 3), "colour": (3, 3), "direction": (1, 1), "moving": (1, 1)}
QUIET_PAIRS_UNCROWDED: dict[str, tuple[int, int]] = {**QUIET_PAIRS, "count": (1, 3), "colour": (1, 3)}  # stage 5's task
CROWD_KINDS: tuple[str, ...] = ("count", "colour")  # quiet items of these kinds are crowded
CROWD: tuple[int, int] = (5, 6)  # objects in a crowded clip (at least, at most; as many as fit)


@dataclass(frozen=True)
class Track:
    """One object over the clip: shape, colour, radius, centre per frame and whether it is drawn in each frame."""

    shape: str
    colour: str
    r: float
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    visible: tuple[bool, ...]

    @property
    def name(self) -> str:
        """E.g. 'red circle'."""
        return f"{self.colour} {self.shape}"

    @property
    def moves(self) -> bool:
        """Whether the centre changes over the clip."""
        return len(set(zip(self.xs, self.ys))) > 1

    def at(self, t: int) -> Obj:
        """The object as drawn in frame t."""
        return Obj(self.shape, self.colour, self.xs[t], self.ys[t], self.r)


@dataclass
class Clip:
    """A clip to be rendered: tracks over a static (possibly textured, speckled) background."""

    difficulty: float
    tracks: list[Track]
    background: tuple[int, int, int]
    texture: str  # "plain" | "noise" | "stripes"
    texture_amp: float
    colour_jitter: float
    specks: int
    seed: int
    n_frames: int = N_FRAMES
    quiet: tuple[int, ...] = ()  # frames of the quiet stretch (every shape off screen), empty when none
    crowded: bool = False  # shapes added by crowd(): the dense busy pair of a quiet count / colour clip

    def visible_in(self, t: int) -> list[Track]:
        """Tracks drawn in frame t."""
        return [tr for tr in self.tracks if tr.visible[t]]


@dataclass
class VideoItem:
    """One benchmark item: a clip and a question about it."""

    id: str
    clip: Clip
    question: Question
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# clips
# --------------------------------------------------------------------------------------------------
def _fits(tr: Track, others: list[Track]) -> bool:
    """tr stays inside the frame and clear of every other track in every frame both are visible."""
    n = len(tr.xs)
    for t in range(n):
        if not tr.visible[t]:
            continue
        if not (tr.r + 1 <= tr.xs[t] <= FRAME_SIZE - tr.r - 1 and tr.r + 1 <= tr.ys[t] <= FRAME_SIZE - tr.r - 1):
            return False
        for o in others:
            if o.visible[t] and math.hypot(tr.xs[t] - o.xs[t], tr.ys[t] - o.ys[t]) <= tr.r + o.r + GAP:
                return False
    return True


def _path(rng: np.random.Generator, r: float, n: int, direction: str | None, speed: float) -> tuple[tuple, tuple]:
    """Centres over n frames: static when direction is None, else a straight line along the direction (total
    displacement speed * (n - 1)) with a small perpendicular drift (at most a quarter of it)."""
    x0, y0 = (float(v) for v in rng.uniform(r + 2, FRAME_SIZE - r - 2, size=2))
    if direction is None:
        return (x0,) * n, (y0,) * n
    ux, uy = DIRECTIONS[direction]
    total = speed * (n - 1)
    drift = float(rng.uniform(-0.25, 0.25)) * total
    dx, dy = ux * total + uy * drift, uy * total + ux * drift
    # start so the whole path fits: shift the start back along the motion
    x0 = float(rng.uniform(r + 2 + max(0.0, -dx), FRAME_SIZE - r - 2 - max(0.0, dx)))
    y0 = float(rng.uniform(r + 2 + max(0.0, -dy), FRAME_SIZE - r - 2 - max(0.0, dy)))
    ts = np.arange(n) / (n - 1)
    return tuple(float(v) for v in x0 + dx * ts), tuple(float(v) for v in y0 + dy * ts)


def _add_track(rng: np.random.Generator, tracks: list[Track], colour: str, d: float, n: int, *,
               direction: str | None = None, visible: tuple[bool, ...] | None = None) -> Track | None:
    """Draw a track of the given colour and motion that fits among `tracks` (None after 80 tries)."""
    r_hi = 14.0 - 4.0 * d
    speed_lo, speed_hi = 6.0 - 2.5 * d, 8.0 - 2.5 * d  # pixels per frame: 17-56 px over 8 frames
    vis = visible or (True,) * n
    for _ in range(80):
        r = float(rng.uniform(8.0, r_hi))
        xs, ys = _path(rng, r, n, direction, float(rng.uniform(speed_lo, speed_hi)))
        tr = Track(str(rng.choice(SHAPES)), colour, r, xs, ys, vis)
        if _fits(tr, tracks):
            tracks.append(tr)
            return tr
    return None


def _window(rng: np.random.Generator, n: int, appear: bool, lo: int = 2, hi: int | None = None) -> tuple[bool, ...]:
    """Visibility of an object that appears at frame k (absent before) or disappears at frame k (absent from k),
    k in [lo, hi]: at least two frames on each side, so one temporal patch shows the change."""
    k = int(rng.integers(lo, (hi if hi is not None else n - 2) + 1))
    return tuple((t >= k) if appear else (t < k) for t in range(n))


def make_clip(rng: np.random.Generator, kind: str, difficulty: float | None = None,
              n_frames: int = N_FRAMES) -> tuple[Clip, dict[str, Any]] | None:
    """A clip built for a question of `kind` and the facts the question needs (the target tracks); None when the
    draw does not fit (the caller draws again)."""
    d = float(rng.uniform()) if difficulty is None else float(difficulty)
    n = n_frames
    n_static = int(rng.integers(0, 2 + int(round(2 * d))))  # 0-1 (easy) to 0-3 (hard) static extras
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    tracks: list[Track] = []
    facts: dict[str, Any] = {}

    def add(**kw: Any) -> Track | None:
        return _add_track(rng, tracks, colours[len(tracks)], d, n, **kw)

    if kind == "direction":
        facts["direction"] = str(rng.choice(list(DIRECTIONS)))
        facts["target"] = add(direction=facts["direction"])
        if d > 0.5 and rng.uniform() < 0.5:  # a second mover in another direction
            add(direction=str(rng.choice([k for k in DIRECTIONS if k != facts["direction"]])))
    elif kind == "moving":
        facts["target"] = add(direction=str(rng.choice(list(DIRECTIONS))))
        n_static = max(n_static, 1)
    elif kind in ("appear", "disappear"):
        facts["target"] = add(visible=_window(rng, n, kind == "appear"))
        n_static = max(n_static, 1)
    elif kind == "order":
        k1 = int(rng.integers(1, 4))
        k2 = int(rng.integers(k1 + 2, n - 1))
        first = add(visible=tuple(t >= k1 for t in range(n)))
        second = add(visible=tuple(t >= k2 for t in range(n)))
        facts.update(first=first, second=second)
    elif kind in ("count", "colour"):
        n_static += int(rng.integers(1, 3))
        for _ in range(int(rng.integers(0, 2))):  # a mover or none: motion does not change the answer
            add(direction=str(rng.choice(list(DIRECTIONS))))
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if any(v is None for v in facts.values()):
        return None
    for _ in range(min(n_static, len(colours) - len(tracks))):
        add()
    if not tracks:
        return None
    order = rng.permutation(len(tracks))  # drawing order not tied to the role
    tracks = [tracks[i] for i in order]
    tex_p = 0.1 + 0.6 * d
    texture = str(rng.choice(["noise", "stripes"])) if rng.uniform() < tex_p else "plain"
    base = int(rng.integers(205, 256))
    tint = rng.integers(-10, 11, size=3)
    clip = Clip(difficulty=round(d, 4), tracks=tracks,
                background=tuple(int(np.clip(base + t, 0, 255)) for t in tint),  # type: ignore[arg-type]
                texture=texture, texture_amp=float(8 + 30 * d * rng.uniform()), colour_jitter=float(8 + 20 * d),
                specks=int(rng.integers(0, 1 + int(12 * d))), seed=int(rng.integers(0, 2**31 - 1)), n_frames=n)
    return clip, facts


def render_clip(clip: Clip) -> list[np.ndarray]:
    """The clip's frames as FRAME_SIZE x FRAME_SIZE x 3 uint8 arrays (deterministic from clip.seed): one static
    background (texture and specks), each object in one jittered fill colour throughout."""
    rng = np.random.default_rng(clip.seed)
    bg = np.empty((FRAME_SIZE, FRAME_SIZE, 3), dtype=np.float32)
    bg[:] = clip.background
    if clip.texture == "noise":
        blocks = rng.normal(0, clip.texture_amp / 3, size=(FRAME_SIZE // 8, FRAME_SIZE // 8, 1)).round()
        bg += np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    elif clip.texture == "stripes":
        period = int(rng.integers(8, 20))
        yy, xx = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
        wave = (xx // (period // 2)) % 2 if rng.uniform() < 0.5 else (yy // (period // 2)) % 2
        bg -= clip.texture_amp * wave[..., None].astype(np.float32) * 0.5
    base = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(base)
    for _ in range(clip.specks):
        x, y = rng.uniform(0, FRAME_SIZE, size=2)
        r = float(rng.uniform(1, 2))
        grey = int(rng.integers(60, 200))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey, grey, grey))
    fills = {}
    rots = {}
    for tr in clip.tracks:
        jitter = rng.uniform(-clip.colour_jitter, clip.colour_jitter, size=3)
        fills[tr.name] = tuple(int(v) for v in np.clip(np.asarray(COLOURS[tr.colour]) + jitter, 0, 255))
        rots[tr.name] = float(rng.uniform(-0.3, 0.3)) * clip.difficulty
    frames = []
    for t in range(clip.n_frames):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for tr in clip.visible_in(t):
            o = tr.at(t)
            if o.shape == "circle":
                draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fills[tr.name])
            else:
                draw.polygon(_shape_polygon(o, rots[tr.name]), fill=fills[tr.name])
        frames.append(np.asarray(img, dtype=np.uint8))
    return frames


# --------------------------------------------------------------------------------------------------
# questions
# --------------------------------------------------------------------------------------------------
def _absent_names(clip: Clip, rng: np.random.Generator) -> list[str]:
    """Colour-shape names of no object in the clip, shuffled (names whose colour is in the clip first: harder)."""
    present = {tr.name for tr in clip.tracks}
    colours_in = {tr.colour for tr in clip.tracks}
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    near = [nm for nm in names if nm.split()[0] in colours_in]
    far = [nm for nm in names if nm.split()[0] not in colours_in]
    return [near[i] for i in rng.permutation(len(near))] + [far[i] for i in rng.permutation(len(far))]


def _options(rng: np.random.Generator, correct: str, distractors: list[str]) -> tuple[list[str], str]:
    """Four options (correct first among the pool, then three distractors in order), shuffled, and the letter."""
    pool = [correct] + [x for x in dict.fromkeys(distractors) if x != correct][:3]
    if len(pool) < 4:
        raise ValueError("not enough distractors")
    opts = [pool[i] for i in rng.permutation(4)]
    return opts, LETTERS[opts.index(correct)]


def _name_options(rng: np.random.Generator, clip: Clip, correct: str, in_clip: list[str]) -> tuple[list[str], str]:
    """Options naming shapes: the answer, shapes of the clip that are wrong answers, then absent names."""
    others = [in_clip[i] for i in rng.permutation(len(in_clip))]
    return _options(rng, correct, others + _absent_names(clip, rng))


def make_question(clip: Clip, facts: dict[str, Any], kind: str, rng: np.random.Generator) -> Question | None:
    """The question of `kind` about a clip built by make_clip for it (None when the clip cannot pose it)."""
    names = [tr.name for tr in clip.tracks]
    if kind == "direction":
        tr, way = facts["target"], facts["direction"]
        opts, letter = _options(rng, way, [str(w) for w in rng.permutation(list(DIRECTIONS)) if w != way])
        return Question(kind, f"Which way does the {tr.name} move?", opts, letter, f"The {tr.name} moves {way}.")
    if kind == "moving":
        tr = facts["target"]
        opts, letter = _name_options(rng, clip, tr.name, [nm for nm in names if nm != tr.name])
        return Question(kind, "Which shape moves?", opts, letter, f"The {tr.name} moves; the others stay still.")
    if kind in ("appear", "disappear"):
        tr = facts["target"]
        opts, letter = _name_options(rng, clip, tr.name, [nm for nm in names if nm != tr.name])
        change = "is missing at first and then appears" if kind == "appear" else "is there at first and then is gone"
        return Question(kind, f"Which shape {'appears' if kind == 'appear' else 'disappears'} during the video?",
                        opts, letter, f"The {tr.name} {change}.")
    if kind == "order":
        a, b = facts["first"], facts["second"]
        # the second arrival first among the distractors; never a shape there from the start (it did not appear)
        absent = _absent_names(clip, rng)
        opts, letter = _options(rng, a.name, [b.name] + absent)
        return Question(kind, "Which shape appears first?", opts, letter,
                        f"The {a.name} appears before the {b.name}.")
    if kind == "count":
        if rng.uniform() < 0.5:
            n, what = len(clip.tracks), "shapes"
        else:
            shape = str(rng.choice(SHAPES))
            n, what = sum(tr.shape == shape for tr in clip.tracks), _plural(shape)
        lo = max(0, n - int(rng.integers(0, 4)))
        opts = [str(lo + i) for i in range(4)]
        return Question(kind, f"How many {what} are in the video?", opts, LETTERS[opts.index(str(n))],
                        f"I count {n} {what}.")
    if kind == "colour":
        unique = [s for s in SHAPES if sum(tr.shape == s for tr in clip.tracks) == 1]
        if not unique:
            return None
        shape = str(rng.choice(unique))
        tr = next(tr for tr in clip.tracks if tr.shape == shape)
        opts, letter = _options(rng, tr.colour, [str(c) for c in rng.permutation(list(COLOURS)) if c != tr.colour])
        return Question(kind, f"What colour is the {shape}?", opts, letter, f"The {shape} is {tr.colour}.")
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def check_quiet_share(share: float) -> None:
    """Raise ValueError unless share is a proportion (the share of QUIET_KINDS items given a quiet stretch)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"quiet_share must be in [0, 1], got {share}")


def draw_quiet(kind: str, rng: np.random.Generator, share: float = QUIET_SHARE, n_frames: int = N_FRAMES,
               crowded: bool = True) -> tuple[int, ...]:
    """The frames of a quiet stretch (whole frame pairs at the start or the end) for a share `share` of QUIET_KINDS
    items, else (). The answer of these kinds does not depend on it: counts and colours read off the busy pairs, a
    motion off the six frames left. crowded=False draws stage 5's stretches (1-3 pairs for count / colour)."""
    if kind not in QUIET_KINDS or rng.uniform() >= share:
        return ()
    lo, hi = (QUIET_PAIRS if crowded else QUIET_PAIRS_UNCROWDED)[kind]
    n_pairs = int(rng.integers(lo, hi + 1))
    span = range(2 * n_pairs) if rng.uniform() < 0.5 else range(n_frames - 2 * n_pairs, n_frames)
    return tuple(span)


def make_quiet(clip: Clip, quiet: tuple[int, ...]) -> Clip:
    """The clip with every shape off screen in the frames `quiet` (the clip unchanged when there are none)."""
    if not quiet:
        return clip
    tracks = [dataclasses.replace(tr, visible=tuple(v and t not in quiet for t, v in enumerate(tr.visible)))
              for tr in clip.tracks]
    return dataclasses.replace(clip, tracks=tracks, quiet=tuple(quiet))


def crowd(clip: Clip, rng: np.random.Generator) -> Clip:
    """The clip with static objects of unused colours added until it holds CROWD objects (a number drawn in that
    range; fewer only when no more fit): the dense busy pair of a quiet count / colour clip."""
    tracks = list(clip.tracks)
    colours = [str(c) for c in rng.permutation(list(COLOURS)) if c not in {tr.colour for tr in tracks}]
    target = int(rng.integers(CROWD[0], CROWD[1] + 1))
    for colour in colours[:max(0, target - len(tracks))]:
        _add_track(rng, tracks, colour, clip.difficulty, clip.n_frames)
    return dataclasses.replace(clip, tracks=tracks, crowded=True)


def make_item(split: str, index: int, kind: str | None = None, quiet_share: float = QUIET_SHARE,
              crowded: bool = True) -> VideoItem:
    """Item `index` of `split` (deterministic); the kind is drawn uniformly over KINDS unless given. quiet_share 0
    gives the task as it was before quiet stretches (what the bundled model's first four stages trained on);
    crowded=False the task of stage 5 (quiet stretches of 1-3 pairs for count / colour, no crowd)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    check_quiet_share(quiet_share)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng([SPLITS[split], index])
    k = kind or str(rng.choice(list(KINDS)))
    quiet_rng = np.random.default_rng([SPLITS[split], index, 1])  # the quiet stretch and the crowd: own stream
    quiet = draw_quiet(k, quiet_rng, quiet_share, crowded=crowded)
    for _ in range(100):
        built = make_clip(rng, k)
        if built is None:
            continue
        clip, facts = built
        if crowded and quiet and k in CROWD_KINDS:
            clip = crowd(clip, quiet_rng)
        q = make_question(clip, facts, k, rng)
        if q is not None:
            return VideoItem(id=f"video-{split}-{index:05d}", clip=make_quiet(clip, quiet), question=q)
    raise RuntimeError(f"no {k} clip fitted for {split} item {index}")  # pragma: no cover - never seen


def item_record(item: VideoItem, frame_paths: list[str]) -> dict[str, Any]:
    """The JSONL record of an item: the image task's fields with "video" (frame files, in order) for "image"."""
    q = item.question
    return {"id": item.id, "video": list(frame_paths), "fps": FPS, "question": format_question(q),
            "options": list(q.options), "answer": q.answer, "difficulty": item.clip.difficulty, "kind": q.kind,
            "temporal": q.kind in TEMPORAL_KINDS, "n_objects": len(item.clip.tracks),
            "n_frames": item.clip.n_frames, "quiet_frames": list(item.clip.quiet), "target": q.target}


def export(split: str, n: int, out: str | Path, *, start: int = 0, quiet_share: float = QUIET_SHARE,
           crowded: bool = True) -> Path:
    """Write DIR/items.jsonl and DIR/clips/<id>/f<t>.png for items start..start+n-1 of split; returns the JSONL.
    quiet_share 0 writes the task as it was before quiet stretches (the stage-4 model's records), crowded=False
    the task of stage 5 (its records)."""
    out = Path(out)
    path = out / "items.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(start, start + n):
            item = make_item(split, i, quiet_share=quiet_share, crowded=crowded)
            rels = []
            for t, frame in enumerate(render_clip(item.clip)):
                rel = f"clips/{item.id}/f{t}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(frame).save(out / rel, optimize=True)
                rels.append(rel)
            f.write(json.dumps(item_record(item, rels)) + "\n")
    logger.info("wrote %d %s clips to %s", n, split, path)
    return path


def write_demo_clip(png: str | Path, question_json: str | Path, split: str = "test", index: int = 0) -> VideoItem:
    """The bundled demo clip: item `index` of `split` as an animated PNG (lossless, 1 / FPS s a frame, so sampling
    at FPS takes every frame) and its question, options and answer as JSON (what `avis demo --video` asks)."""
    item = make_item(split, index)
    frames = [Image.fromarray(f) for f in render_clip(item.clip)]
    frames[0].save(png, save_all=True, append_images=frames[1:], duration=int(1000 / FPS), loop=0, optimize=True)
    q = item.question
    Path(question_json).write_text(json.dumps({"id": item.id, "question": q.text, "options": list(q.options),
                                               "answer": q.answer, "kind": q.kind}, indent=1) + "\n")
    return item


def main(argv: list[str] | None = None) -> int:
    from convert.shapes_task import export_main

    return export_main("python -m convert.video_task", __doc__, SPLITS, export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
