"""Synthetic visual-reasoning task: coloured shapes on a 224x224 canvas, multiple-choice questions A-D.

Deterministic by (split, index): every item's generator is ``np.random.default_rng([split_code, index])``,
so the train / calibration / test splits draw from disjoint seed streams. numpy + PIL only (no torch).

Question kinds: ``count`` (how many X), ``exist`` (which of four shapes is present), ``colour`` (colour of
a unique shape or of the shape nearest a corner), ``compare`` (more X than Y) and ``spatial`` (where is X
relative to Y). A latent difficulty in [0, 1] drives the object count (1-12), object size, background
texture, colour jitter and speckle clutter, so items range from easy through hard to near hopeless.

Targets carry a short reasoning trace that ends by checking each option::

    <think>I count 3 red circles.
    A. 2: no
    B. 3: yes
    C. 4: no
    D. 5: no
    </think><answer>B</answer>

    python -m convert.shapes_task --split test --n 300 --out DIR     # DIR/items.jsonl + DIR/images/*.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE",
    "SHAPES",
    "COLOURS",
    "KINDS",
    "SPLITS",
    "LETTERS",
    "Obj",
    "Scene",
    "Question",
    "Item",
    "make_scene",
    "make_question",
    "compare_question",
    "grid_place",
    "make_item",
    "render",
    "format_question",
    "export",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 224
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
KINDS: tuple[str, ...] = ("count", "exist", "colour", "compare", "spatial")
LETTERS = "ABCD"
# Disjoint seed streams: rng = default_rng([SPLITS[split], index]).
SPLITS: dict[str, int] = {"train": 1, "calibration": 2, "test": 3}


@dataclass(frozen=True)
class Obj:
    """One shape: kind, colour name, centre (x, y) in pixels, radius in pixels."""

    shape: str
    colour: str
    x: float
    y: float
    r: float

    @property
    def name(self) -> str:
        """E.g. 'red circle'."""
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A rendered-to-be image: background, objects and clutter parameters."""

    difficulty: float
    objects: list[Obj]
    background: tuple[int, int, int]
    texture: str  # "plain" | "noise" | "stripes" | "grid"
    texture_amp: float
    colour_jitter: float
    specks: int
    seed: int

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        """Objects matching shape and/or colour."""
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour)
                   for o in self.objects)


@dataclass(frozen=True)
class Question:
    """A multiple-choice question with its answer letter and reasoning trace."""

    kind: str
    text: str
    options: list[str]
    answer: str  # "A".."D"
    think: str

    @property
    def target(self) -> str:
        """The training target: the reasoning trace, then every option checked against it (a line each), then
        the tagged answer letter. The option lines are there for the small model: copying an option and saying
        yes or no is learned far sooner than mapping a free-text conclusion straight to its letter."""
        checks = "".join(f"\n{L}. {o}: {'yes' if L == self.answer else 'no'}" for L, o in zip(LETTERS, self.options))
        return f"<think>{self.think}{checks}\n</think><answer>{self.answer}</answer>"


@dataclass
class Item:
    """One benchmark item: a scene and a question about it."""

    id: str
    scene: Scene
    question: Question
    extra: dict[str, Any] = field(default_factory=dict)


def _plural(shape: str) -> str:
    """'cross' -> 'crosses', 'circle' -> 'circles'."""
    return shape + ("es" if shape.endswith("s") else "s")


# --------------------------------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------------------------------
def make_scene(rng: np.random.Generator, difficulty: float | None = None) -> Scene:
    """Sample a scene; difficulty in [0, 1] (drawn uniformly when None) drives count, size and clutter."""
    d = float(rng.uniform()) if difficulty is None else float(difficulty)
    n_max = 1 + int(round(11 * d))
    n = int(rng.integers(max(1, n_max - 3), n_max + 1))
    r_hi = 30 - 16 * d
    r_lo = max(6.0, r_hi - 12)
    n_colours = int(rng.integers(2, 7)) if d > 0.2 else int(rng.integers(1, 4))
    palette = list(rng.choice(list(COLOURS), size=n_colours, replace=False))
    objects: list[Obj] = []
    for _ in range(n):
        r = float(rng.uniform(r_lo, r_hi))
        for _attempt in range(60):
            x, y = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
            if all(math.hypot(x - o.x, y - o.y) > r + o.r + 3 for o in objects):
                objects.append(Obj(str(rng.choice(SHAPES)), str(rng.choice(palette)), float(x), float(y), r))
                break
    tex_p = 0.15 + 0.7 * d
    texture = str(rng.choice(["noise", "stripes", "grid"])) if rng.uniform() < tex_p else "plain"
    base = int(rng.integers(200, 256))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    return Scene(
        difficulty=round(d, 4),
        objects=objects,
        background=background,  # type: ignore[arg-type]
        texture=texture,
        texture_amp=float(10 + 40 * d * rng.uniform()),
        colour_jitter=float(10 + 50 * d),
        specks=int(rng.integers(0, 1 + int(40 * d))),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _shape_polygon(o: Obj, rot: float) -> list[tuple[float, float]]:
    """Polygon vertices of a square, triangle or cross centred on o."""
    if o.shape == "square":
        s = o.r * 0.85
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif o.shape == "triangle":
        pts = [(o.r * math.cos(a), o.r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross
        a, b = o.r, o.r * 0.36
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
    c, s = math.cos(rot), math.sin(rot)
    return [(o.x + px * c - py * s, o.y + px * s + py * c) for px, py in pts]


def render(scene: Scene) -> Image.Image:
    """Draw the scene as a 224x224 RGB image (deterministic from scene.seed)."""
    rng = np.random.default_rng(scene.seed)
    bg = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    bg[:] = scene.background
    amp = scene.texture_amp
    if scene.texture == "noise":
        blocks = rng.normal(0, amp / 3, size=(IMAGE_SIZE // 8, IMAGE_SIZE // 8, 1)).round()
        bg += np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)
    elif scene.texture in ("stripes", "grid"):
        period = int(rng.integers(8, 24))
        yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
        wave = (xx // (period // 2)) % 2 if rng.uniform() < 0.5 else (yy // (period // 2)) % 2
        if scene.texture == "grid":
            wave = ((xx % period) < 2) | ((yy % period) < 2)
        bg -= amp * wave[..., None].astype(np.float32) * 0.5
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        jitter = rng.uniform(-scene.colour_jitter, scene.colour_jitter, size=3)
        fill = tuple(int(v) for v in np.clip(np.asarray(COLOURS[o.colour]) + jitter, 0, 255))
        if o.shape == "circle":
            draw.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=fill)
        else:
            rot = float(rng.uniform(-0.3, 0.3)) * scene.difficulty
            draw.polygon(_shape_polygon(o, rot), fill=fill)
    for _ in range(scene.specks):
        x, y = rng.uniform(0, IMAGE_SIZE, size=2)
        r = float(rng.uniform(1, 3))
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
    return img


# --------------------------------------------------------------------------------------------------
# questions
# --------------------------------------------------------------------------------------------------
def _mc(rng: np.random.Generator, correct: str, distractors: Sequence[str], shuffle: bool = True) -> tuple[list[str], str]:
    """Four options (correct + 3 distractors) and the correct letter."""
    opts = [correct] + list(distractors[:3])
    if shuffle:
        opts = [opts[i] for i in rng.permutation(4)]
    return opts, LETTERS[opts.index(correct)]


def _q_count(scene: Scene, rng: np.random.Generator) -> Question:
    """How many shapes / colour shapes / colour X shapes."""
    mode = rng.integers(3)
    o = scene.objects[int(rng.integers(len(scene.objects)))] if rng.uniform() < 0.8 else None
    shape = o.shape if o is not None else str(rng.choice(SHAPES))
    colour = o.colour if o is not None else str(rng.choice(list(COLOURS)))
    if mode == 0:
        n, what = scene.count(shape=shape), _plural(shape)
    elif mode == 1:
        n, what = scene.count(colour=colour), f"{colour} shapes"
    else:
        n, what = scene.count(shape=shape, colour=colour), f"{colour} {_plural(shape)}"
    lo = max(0, n - int(rng.integers(0, 4)))
    opts = [str(lo + i) for i in range(4)]
    return Question("count", f"How many {what} are in the image?", opts, LETTERS[opts.index(str(n))],
                    f"I count {n} {what}.")


def _q_exist(scene: Scene, rng: np.random.Generator) -> Question | None:
    """Which of four colour-shape pairs appears in the image."""
    present = {o.name for o in scene.objects}
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    # distractors share the colour or the shape of the answer half the time (harder)
    near = [a for a in absent if a.split()[0] == o.colour or a.split()[1] == o.shape]
    pool = near if near and rng.uniform() < 0.5 else absent
    if len(pool) < 3:
        pool = absent
    picks = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
    opts, letter = _mc(rng, o.name, picks)
    return Question("exist", "Which of these shapes is in the image?", opts, letter, f"I see a {o.name}.")


_CORNERS = {"top-left": (0, 0), "top-right": (IMAGE_SIZE, 0), "bottom-left": (0, IMAGE_SIZE),
            "bottom-right": (IMAGE_SIZE, IMAGE_SIZE)}


def _q_colour(scene: Scene, rng: np.random.Generator) -> Question | None:
    """Colour of the only X, or of the shape nearest a corner."""
    unique = [s for s in SHAPES if scene.count(shape=s) == 1]
    if unique and rng.uniform() < 0.5:
        shape = str(rng.choice(unique))
        o = next(o for o in scene.objects if o.shape == shape)
        text, think = f"What colour is the {shape}?", f"The {shape} is {o.colour}."
    else:
        corner = str(rng.choice(list(_CORNERS)))
        cx, cy = _CORNERS[corner]
        dist = sorted((math.hypot(o.x - cx, o.y - cy), i) for i, o in enumerate(scene.objects))
        if len(dist) > 1 and dist[1][0] - dist[0][0] < 12:
            return None  # ambiguous
        o = scene.objects[dist[0][1]]
        text = f"What colour is the shape closest to the {corner} corner?"
        think = f"The {o.shape} nearest the {corner} corner is {o.colour}."
    others = [c for c in COLOURS if c != o.colour]
    picks = [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    opts, letter = _mc(rng, o.colour, picks)
    return Question("colour", text, opts, letter, think)


def compare_question(scene: Scene, rng: np.random.Generator, second_present: bool = False) -> Question | None:
    """More colour-1 shapes than colour-2 shapes? Colour 1 is in the image; colour 2 is any other colour, or with
    second_present (a training curriculum, never used by the splits) another colour in the image (None when the
    image has one colour)."""
    colours = sorted({o.colour for o in scene.objects})
    if second_present and len(colours) < 2:
        return None
    c1 = str(rng.choice(colours))
    c2 = str(rng.choice([c for c in (colours if second_present else COLOURS) if c != c1]))
    n1, n2 = scene.count(colour=c1), scene.count(colour=c2)
    opts_all = [f"more {c1}", f"more {c2}", "the same number", f"no {c1} or {c2} shapes"]
    correct = opts_all[0] if n1 > n2 else opts_all[1] if n2 > n1 else opts_all[2]
    opts, letter = _mc(rng, correct, [o for o in opts_all if o != correct])
    return Question("compare", f"Are there more {c1} shapes or more {c2} shapes?", opts, letter,
                    f"{c1}: {n1}, {c2}: {n2}.")


def _q_spatial(scene: Scene, rng: np.random.Generator) -> Question | None:
    """Where is X relative to Y (left / right / above / below)."""
    names = [o.name for o in scene.objects]
    uniq = [o for o in scene.objects if names.count(o.name) == 1]
    if len(uniq) < 2:
        return None
    i, j = rng.choice(len(uniq), size=2, replace=False)
    a, b = uniq[int(i)], uniq[int(j)]
    dx, dy = a.x - b.x, a.y - b.y
    if max(abs(dx), abs(dy)) < 1.5 * min(abs(dx), abs(dy)) + 8:
        return None  # no dominant axis
    rel = ("right of" if dx > 0 else "left of") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
    opts_all = ["left of", "right of", "above", "below"]
    opts, letter = _mc(rng, rel, [o for o in opts_all if o != rel])
    return Question("spatial", f"Where is the {a.name} relative to the {b.name}?", opts, letter,
                    f"The {a.name} is {rel} the {b.name}.")


def grid_place(o: Obj, cell: float) -> tuple[int, int]:
    """(row, column) of the cell x cell pixel grid cell that holds o's centre."""
    n = int(IMAGE_SIZE // cell)
    return min(int(o.y // cell), n - 1), min(int(o.x // cell), n - 1)


_MAKERS = {"count": _q_count, "exist": _q_exist, "colour": _q_colour, "compare": compare_question,
           "spatial": _q_spatial}


def make_question(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> Question:
    """A question of `kind` (random when None; falls back to another kind if the scene does not allow it)."""
    kinds = [kind] if kind else []
    kinds += [str(k) for k in rng.permutation(list(KINDS))]
    for k in kinds:
        for _ in range(3):
            q = _MAKERS[k](scene, rng)
            if q is not None:
                return q
    return _q_count(scene, rng)


def format_question(q: Question) -> str:
    """Question text plus 'A. ...' option lines (what the model sees, before the answer-tag instruction);
    this is the JSONL record's "question" field."""
    return q.text + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(q.options))


def make_item(split: str, index: int, kind: str | None = None) -> Item:
    """Item `index` of `split` (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([SPLITS[split], index])
    scene = make_scene(rng)
    q = make_question(scene, rng, kind)
    return Item(id=f"{split}-{index:05d}", scene=scene, question=q)


def item_record(item: Item, image_rel: str) -> dict[str, Any]:
    """The JSONL record of an item (calibration / benchmark format)."""
    q = item.question
    return {"id": item.id, "image": image_rel, "question": format_question(q), "options": list(q.options),
            "answer": q.answer, "difficulty": item.scene.difficulty, "kind": q.kind,
            "n_objects": len(item.scene.objects), "target": q.target}


def export(split: str, n: int, out: str | Path, *, start: int = 0) -> Path:
    """Write DIR/items.jsonl and DIR/images/<id>.png for items start..start+n-1 of split; returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "items.jsonl"
    with path.open("w") as f:
        for i in range(start, start + n):
            item = make_item(split, i)
            rel = f"images/{item.id}.png"
            render(item.scene).save(out / rel, optimize=True)
            f.write(json.dumps(item_record(item, rel)) + "\n")
    logger.info("wrote %d %s items to %s", n, split, path)
    return path


def export_main(prog: str, doc: str | None, splits: Any, export_fn: Any, argv: list[str] | None = None) -> int:
    """The command line of a seeded task's exporter (this one and convert.video_task): --split, --n, --start, --out;
    prints the items file written."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=list(splits), required=True)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(export_fn(args.split, args.n, args.out, start=args.start))
    return 0


def main(argv: list[str] | None = None) -> int:
    return export_main("python -m convert.shapes_task", __doc__, SPLITS, export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
