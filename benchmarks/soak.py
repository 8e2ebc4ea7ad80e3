"""Soak test: N mixed queries on one VLM, watching memory and output drift.

The mix (seeded): with and without KDV pruning (ratio / tau), K from 1 to 7, parallel and snapshot rollout
modes, prefix snapshots (VLM.snapshot + ask(snapshot=...)), streaming callbacks (some interrupted with
KeyboardInterrupt), a set of images including odd ones (CMYK, 16-bit, palette + transparency, EXIF-rotated,
animated, 1x1, a long strip, an array), and about 12% invalid inputs (corrupt image bytes, bad k / ratio / tau /
sampling, K above n_seq_max, a prompt longer than n_ctx, a media marker in the question, a mismatched snapshot),
each of which must raise its typed AVISError.

Reported: RSS (VmRSS from /proc/self/status, else ru_maxrss) after a warm-up, at the middle and at the end, plus
a least-squares slope over regular samples; live Python objects; duration; outcome counts; and whether a
canonical query run every `--check-every` queries still gives its first answer token for token.

    .venv/bin/python benchmarks/soak.py --queries 500 [--family llava] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DEMO_IMAGE = ROOT / "avis_llamacpp" / "data" / "shapes.png"


# -- queries as data (shared with tests/test_reliability.py's fresh-process oracle) ---------------------------
def run_spec(vlm: Any, spec: dict[str, Any], on_text: Any = None) -> dict[str, Any]:
    """Run one query described by a JSON-able dict on `vlm`; returns what identifies its output.

    spec keys: image (path, list of paths or None), question, max_tokens, k, mode, ratio, tau, seed,
    sampling (SamplingParams fields), snapshot (True: VLM.snapshot the images first, then ask with it)."""
    from avis_llamacpp.native import SamplingParams

    kw: dict[str, Any] = {"max_tokens": spec.get("max_tokens", 12), "k": spec.get("k", 1),
                          "mode": spec.get("mode", "parallel"), "seed": spec.get("seed", 0)}
    for name in ("ratio", "tau", "early_stop"):
        if spec.get(name) is not None:
            kw[name] = spec[name]
    if spec.get("sampling") is not None:
        kw["sampling"] = SamplingParams(**spec["sampling"])
    if on_text is not None:
        kw["on_text"] = on_text
    image = spec.get("image")
    if spec.get("snapshot"):
        snap = vlm.snapshot(image, ratio=spec.get("ratio"), tau=spec.get("tau"))
        ans = vlm.ask(None, spec["question"], snapshot=snap, **kw)
    else:
        ans = vlm.ask(image, spec["question"], **kw)
    return {"rollouts": [r.tokens for r in ans.rollouts], "text": ans.text, "answer": ans.answer,
            "finish": [r.finish_reason for r in ans.rollouts], "image_tokens": ans.image_tokens,
            "kept_tokens": ans.kept_tokens, "prompt_tokens": ans.prompt_tokens}


# -- memory ---------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


# -- images ---------------------------------------------------------------------------------------------------
def odd_images(folder: Path) -> dict[str, Any]:
    """A small zoo of images, written to `folder` (paths) or kept in memory (bytes / arrays)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, size=(160, 320, 3), dtype=np.uint8), "RGB")
    out: dict[str, Any] = {"demo": str(DEMO_IMAGE)}

    def save(name: str, img: Image.Image, fmt: str, **kw: Any) -> None:
        path = folder / f"{name}.{fmt.lower()}"
        img.save(path, format=fmt, **kw)
        out[name] = str(path)

    save("noise", rgb, "PNG")
    save("cmyk", rgb.convert("CMYK"), "JPEG", quality=90)
    pal = rgb.convert("P")
    save("palette_alpha", pal, "PNG", transparency=5)
    g16 = Image.fromarray((np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16))
    save("gray16", g16, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rot", rgb.resize((120, 60)), "JPEG", exif=exif.tobytes())
    frames = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=40, loop=0)
    out["anim"] = str(folder / "anim.gif")
    save("la", Image.new("LA", (50, 70), (120, 30)), "PNG")
    save("one_px", Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")
    save("strip", rgb.resize((900, 12)), "WEBP", quality=80)
    out["array"] = rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    buf = io.BytesIO()
    rgb.resize((64, 64)).save(buf, format="JPEG")
    out["jpeg_bytes"] = buf.getvalue()
    return out


CANONICAL = {"image": str(DEMO_IMAGE), "question": "What shapes do you see?", "max_tokens": 12, "k": 3,
             "mode": "parallel", "ratio": 0.5, "seed": 11}


def _invalid_query(vlm: Any, rng: random.Random, images: dict[str, Any]) -> tuple[str, Any]:
    """One query that must fail with a typed error: (its name, the callable)."""
    demo = images["demo"]
    corrupt = Path(demo).read_bytes()[: rng.randint(20, 400)]
    cases = {
        "corrupt_image": lambda: vlm.ask(corrupt, "q", max_tokens=4),
        "not_an_image": lambda: vlm.ask(b"GIF89a this is not really a gif", "q", max_tokens=4),
        "k0": lambda: vlm.ask(demo, "q", k=0),
        "k_over_n_seq_max": lambda: vlm.ask(demo, "q", k=vlm.settings.n_seq_max + 1),
        "ratio_1": lambda: vlm.ask(demo, "q", ratio=1.0),
        "tau_nan": lambda: vlm.ask(demo, "q", tau=float("nan")),
        "bad_sampling": lambda: vlm.ask(demo, "q", sampling={"temperature": 1.0}),
        "over_n_ctx": lambda: vlm.ask([demo] * 2, "word " * 1100, max_tokens=4),
        "marker_in_question": lambda: vlm.ask(demo, f"what is {vlm.projector.marker}?", max_tokens=4),
        "snapshot_mismatch": lambda: vlm.ask(images["noise"], "q", snapshot=vlm.snapshot(demo), max_tokens=4),
        "bad_mode": lambda: vlm.ask(demo, "q", mode="serial"),
    }
    name = rng.choice(sorted(cases))
    return name, cases[name]


def soak(model: str | os.PathLike, mmproj: str | os.PathLike, n_queries: int = 500, seed: int = 0,
         check_every: int = 50, n_threads: int = 1, workdir: Path | None = None, log: Any = None) -> dict[str, Any]:
    """Run the mixed workload; returns the report (see the module docstring)."""
    import tempfile

    from avis_llamacpp import VLM
    from avis_llamacpp.errors import AVISError

    rng = random.Random(seed)
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    folder = Path(tmp.name) if tmp is not None else Path(workdir)
    images = odd_images(folder)
    names = sorted(images)
    outcomes: Counter = Counter()
    errors: Counter = Counter()
    samples: list[tuple[int, float]] = []
    drift: list[int] = []
    t_start = time.perf_counter()
    rss_load0 = rss_mb()
    vlm = VLM(model, mmproj, n_ctx=1024, n_seq_max=8, n_threads=n_threads, n_threads_batch=n_threads)
    try:
        canonical = run_spec(vlm, CANONICAL)
        warmup = max(1, min(20, n_queries // 10))
        rss = {"before_load": rss_load0}
        n_objects = {}
        for i in range(n_queries):
            if i == warmup:
                gc.collect()
                rss["start"], n_objects["start"] = rss_mb(), len(gc.get_objects())
            if i == n_queries // 2:
                gc.collect()
                rss["middle"], n_objects["middle"] = rss_mb(), len(gc.get_objects())
            if i % 10 == 0:
                samples.append((i, rss_mb()))
            if check_every and i and i % check_every == 0:
                if run_spec(vlm, CANONICAL) != canonical:
                    drift.append(i)
            roll = rng.random()
            if roll < 0.12:
                name, fn = _invalid_query(vlm, rng, images)
                try:
                    fn()
                    outcomes["invalid_accepted"] += 1
                    errors[f"{name}: no error"] += 1
                except AVISError as e:
                    outcomes["typed_error"] += 1
                    errors[f"{name}: {type(e).__name__}"] += 1
                except Exception as e:  # an untyped error is a finding
                    outcomes["untyped_error"] += 1
                    errors[f"{name}: {type(e).__name__}: {e}"] += 1
                continue
            img_name = rng.choice(names)
            spec: dict[str, Any] = {"image": images[img_name], "question": rng.choice(
                ["What shapes do you see?", "How many circles?", "Describe the image.", "Which colour is largest?"]),
                "max_tokens": rng.randint(4, 20), "k": rng.randint(1, 7), "mode": rng.choice(["parallel", "snapshot"]),
                "seed": rng.randrange(1000)}
            prune = rng.random()
            if prune < 0.35:
                spec["ratio"] = rng.choice([0.25, 0.5, 0.75, 0.9])
            elif prune < 0.55:
                spec["tau"] = rng.choice([0.8, 1.2, 1.5])
            if rng.random() < 0.1 and not isinstance(spec["image"], np.ndarray):
                spec["snapshot"] = True
            if rng.random() < 0.15:
                spec["early_stop"] = True
            on_text = None
            interrupted = rng.random() < 0.04
            if interrupted:
                seen = []

                def on_text(piece: str, seen: list = seen) -> None:
                    seen.append(piece)
                    if len(seen) >= 2:
                        raise KeyboardInterrupt
            elif rng.random() < 0.2:
                on_text = [].append
            try:
                run_spec(vlm, spec, on_text=on_text)
                outcomes["ok"] += 1
            except KeyboardInterrupt:
                outcomes["interrupted"] += 1
            except AVISError as e:  # e.g. an odd image too big for n_ctx with many rollouts
                outcomes["typed_error"] += 1
                errors[f"valid-looking {img_name}: {type(e).__name__}: {str(e)[:80]}"] += 1
            if log is not None and (i + 1) % 50 == 0:
                print(f"[soak] {i + 1}/{n_queries} rss={rss_mb():.1f} MiB {dict(outcomes)}", file=log, flush=True)
        gc.collect()
        rss["end"], n_objects["end"] = rss_mb(), len(gc.get_objects())
        samples.append((n_queries, rss["end"]))
        final_same = run_spec(vlm, CANONICAL) == canonical
    finally:
        vlm.close()
        if tmp is not None:
            tmp.cleanup()
    xs = np.array([s[0] for s in samples if s[0] >= warmup], dtype=np.float64)
    ys = np.array([s[1] for s in samples if s[0] >= warmup], dtype=np.float64)
    slope = float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 2 else math.nan
    return {"queries": n_queries, "seconds": round(time.perf_counter() - t_start, 2),
            "rss_mib": {k: round(v, 2) for k, v in rss.items()},
            "rss_growth_start_to_end_mib": round(rss["end"] - rss["start"], 2),
            "rss_slope_kib_per_query": round(slope * 1024, 3),
            "python_objects": n_objects, "outcomes": dict(outcomes), "errors": dict(errors),
            "canonical_drift_at": drift, "canonical_same_at_end": final_same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", default="llava", choices=("llava", "qwen25vl"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    from convert.fixtures import make_fixture

    fx = make_fixture(args.family, "tiny")
    rep = soak(fx.model, fx.mmproj, args.queries, args.seed, args.check_every, args.threads, log=sys.stderr)
    rep = {"family": args.family, "command": " ".join([Path(sys.executable).name, *sys.argv]), **rep}
    text = json.dumps(rep, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    ok = (not rep["canonical_drift_at"] and rep["canonical_same_at_end"] and "untyped_error" not in rep["outcomes"]
          and "invalid_accepted" not in rep["outcomes"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
