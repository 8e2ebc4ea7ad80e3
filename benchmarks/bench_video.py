"""Video (#30): a 16-frame clip through a Qwen2.5-VL fixture, vanilla vs KDV rho 0.75 as one selection over the
whole clip (joint) vs KDV rho 0.75 frame pair by frame pair (per chunk): time to first token, FLOPs, kept tokens;
then a second question about the same clip through the prefix cache, as a ratio to the first's TTFT.

    .venv/bin/python benchmarks/bench_video.py --size bench --threads 2 --repeat 5

The clip is an mp4 written by convert.video_files (moving shapes), decoded and sampled by the plugin (16 frames:
8 s at 2 fps). TTFT is the wall time of ask(max_tokens=1) (decode + sample + encode + select + prefill + first
token), median of --repeat runs after one warm-up, all rows in one process, interleaved per repeat, so their
ratios are measured side by side. FLOPs are the plugin's accounting (encoder + prefill + one decoded token),
relative to vanilla. Prefix cache: question 1 cold (cache cleared), question 2 about the same clip reusing it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import table

from avis_llamacpp import VLM
from avis_llamacpp.native import Model
from convert.fixtures import make_fixture
from convert.video_files import moving_shapes_clip, write_video

Q1 = "Which shape moves, and in which direction?"
Q2 = "How many shapes are in the clip?"
ROWS = [("vanilla", {}), ("kdv rho=0.75 joint", {"ratio": 0.75}),
        ("kdv rho=0.75 per-chunk", {"ratio": 0.75, "video_selection": "per_chunk"})]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="bench", choices=("tiny", "bench", "real"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--side", type=int, default=336, help="frame side in pixels (336: 144 tokens per frame pair)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown result here")
    ap.add_argument("--no-repack", action="store_true", help="load the text model without llama.cpp's CPU weight "
                    "repacking (AMX, interleaved layouts): for a host whose AMX faults on quantized models")
    args = ap.parse_args(argv)
    fx = make_fixture("qwen25vl", args.size)
    tmp = Path(tempfile.mkdtemp())
    clip = write_video(moving_shapes_clip(80, size=args.side, seed=0), tmp / "clip.mp4", fps=10)  # 8 s
    vk = dict(n_ctx=8192, n_threads=args.threads, n_threads_batch=args.threads)
    times: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    last = {}
    cache = {"first": [], "second": []}
    model = Model(fx.model, repack=not args.no_repack)  # one copy of the weights for both VLMs
    try:
        with VLM(model, fx.mmproj, **vk) as vlm, VLM(model, fx.mmproj, prefix_cache=True, **vk) as cached:
            for i in range(args.repeat + 1):
                for name, kw in ROWS:
                    t0 = time.perf_counter()
                    a = vlm.ask(None, Q1, video=str(clip), max_tokens=1, **kw)
                    if i:  # the first round is the warm-up
                        times[name].append(time.perf_counter() - t0)
                    last[name] = a
                cached.clear_prefix_cache()
                t0 = time.perf_counter()
                first = cached.ask(None, Q1, video=str(clip), max_tokens=1, ratio=0.75)
                t1 = time.perf_counter()
                second = cached.ask(None, Q2, video=str(clip), max_tokens=1, ratio=0.75)
                t2 = time.perf_counter()
                assert second.prefix_reused and not first.prefix_reused
                if i:
                    cache["first"].append(t1 - t0)
                    cache["second"].append(t2 - t1)
    finally:
        model.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    van = last["vanilla"]
    rows = []
    for name, _ in ROWS:
        a = last[name]
        rows.append([name, f"{sum(a.kept_tokens)}/{sum(a.image_tokens)}", med[name], med[name] / med["vanilla"],
                     f"{min(times[name]):.3f}-{max(times[name]):.3f}", a.flops["total"] / van.flops["total"]])
    c1, c2 = statistics.median(cache["first"]), statistics.median(cache["second"])
    clip_rec = van.video
    text = "\n".join([
        f"# Video: {clip_rec['frames']} frames ({clip_rec['size'][0]}x{clip_rec['size'][1]}, "
        f"{len(van.image_tokens)} chunks) through qwen25vl {args.size}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_video.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.machine()}, "
        f"{os.cpu_count()} cores, load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"threads {args.threads}; median of {args.repeat} after one warm-up",
        "",
        table(["config", "kept / visual tokens", "TTFT s", "TTFT / vanilla", "spread s", "FLOPs / vanilla"], rows),
        "",
        "Prefix cache (KDV rho 0.75 joint): question 1 cold, question 2 about the same clip",
        "",
        table(["", "TTFT s", "spread s"], [["question 1 (cold)", c1, f"{min(cache['first']):.3f}-{max(cache['first']):.3f}"],
                                          ["question 2 (cached clip)", c2,
                                           f"{min(cache['second']):.3f}-{max(cache['second']):.3f}"],
                                          ["ratio", c2 / c1, ""]]),
        "",
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
