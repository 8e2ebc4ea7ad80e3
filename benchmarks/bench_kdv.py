"""KDV pruning cost and benefit on the bench-size model: prefill time and time-to-first-token at several
pruning ratios and adaptive tau, and the key capture + scoring overhead as a share of encode time, all as
ratios to vanilla (no capture, nothing pruned) measured in the same run.

    .venv/bin/python benchmarks/bench_kdv.py --family qwen25vl --repeat 3
"""

from __future__ import annotations

import argparse
import math
import statistics

from common import bench_fixture, table

from avis_llamacpp import VLM


def run(family: str, size: str, repeat: int, threads: int | None, image_side: int | None = None) -> str:
    fx, image = bench_fixture(family, size, image_side)
    q = "How many shapes are in the image?"
    configs = [("vanilla (no capture)", None, None, False), ("ratio 0", 0.0, None, True),
               ("ratio 0.5", 0.5, None, True), ("ratio 0.75", 0.75, None, True), ("ratio 0.9", 0.9, None, True),
               ("tau pi/4", None, math.pi / 4, True)]
    rows, base = [], None
    vlms = {cap: VLM(fx.model, fx.mmproj, n_ctx=4096, n_threads=threads, n_threads_batch=threads, capture_keys=cap)
            for cap in (False, True)}
    try:
        for v in vlms.values():  # warm-up both
            v.ask(image, q, max_tokens=1)
        results = {name: [] for name, *_ in configs}
        for _ in range(repeat):  # interleave configurations so drift hits all alike
            for name, ratio, tau, cap in configs:
                a = vlms[cap].ask(image, q, max_tokens=1, ratio=ratio, tau=tau)
                t = a.timings
                select_s = sum(im.get("select_s", 0.0) for im in a.images)
                results[name].append((t["encode_s"], t["prefill_s"] - select_s, select_s, t["total_s"], a.kept_tokens[0],
                                      a.image_tokens[0]))
        for name, *_ in configs:
            med = [statistics.median(col) for col in zip(*results[name])]
            enc, pre, sel, ttft, kept, n = med
            if base is None:
                base = (enc, pre, ttft)
            rows.append([name, f"{int(kept)}/{int(n)}", enc * 1000, pre * 1000, sel * 1000, ttft * 1000,
                         pre / base[1], ttft / base[2], (enc - base[0] + sel) / base[0]])
    finally:
        for v in vlms.values():
            v.close()
    head = ["config", "kept/total", "encode ms", "prefill ms", "scoring ms", "TTFT ms", "prefill vs vanilla",
            "TTFT vs vanilla", "capture+scoring overhead / encode"]
    return f"{family} {size}: text {fx.model.name} ({fx.model.stat().st_size / 2**20:.0f} MiB), " \
           f"{repeat} runs (median), flash_attn={vlms[True].settings.flash_attn!r}\n\n" + table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen25vl", choices=["llava", "qwen25vl"])
    p.add_argument("--size", default="bench", choices=["tiny", "bench", "real"],
                   help="fixture size; real: Qwen2.5-VL-3B dimensions, vocab 151,936, Q4_K_M "
                        "(qwen25vl only; written on first use, minutes)")
    p.add_argument("--image-side", type=int, default=None,
                   help="square image side in pixels (default: the encoder's native size, 644 for qwen25vl)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads for single-token AND batch decoding (avoid oversubscribing)")
    a = p.parse_args()
    print(run(a.family, a.size, a.repeat, a.threads, a.image_side))


if __name__ == "__main__":
    main()
