"""Shared helpers for the benchmark scripts: fixtures, images, timing, markdown tables."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from convert.fixtures import Fixture, make_fixture  # noqa: E402

DEMO_IMAGE = ROOT / "avis_llamacpp" / "data" / "shapes.png"


def bench_fixture(family: str, size: str, side: int | None = None) -> tuple[Fixture, Image.Image]:
    """The fixture pair and an image at the size its encoder takes natively (644x644 for qwen25vl bench:
    529 tokens; the llava tower always resizes to its image_size), or side x side when given (a smaller image
    for a quick smoke run of a benchmark on the real-size fixture, whose 644 px encode takes about a minute)."""
    fx = make_fixture(family, size)
    side = side or fx.vision.image_size
    return fx, Image.open(DEMO_IMAGE).convert("RGB").resize((side, side), Image.BICUBIC)


def median_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median wall time of fn over `repeat` runs (after one warm-up), and the last result."""
    fn()
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
