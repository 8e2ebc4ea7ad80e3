"""Flash attention "auto" (today's default) vs the old default (flash_attn=False, as stock llama-cpp-python):
time to first token and end to end for one question about one image, both VLMs on the same weights, queried
alternately in the same run after a warm-up query each.

    .venv/bin/python benchmarks/bench_flash_attn.py --family qwen25vl --size bench --threads 2 --repeat 3

Threads are pinned (n_threads = n_threads_batch = --threads) so both configurations get the same CPU.
--model / --mmproj run on given files instead of the generated fixture (the image is still the demo image at
the fixture's native size). The table records each row's flash_attn setting and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from common import DEMO_IMAGE, ROOT, bench_fixture, table
from PIL import Image

from avis_llamacpp import VLM
from avis_llamacpp.native import Model

Q = "How many shapes are in the image?"
CONFIGS = [("defaults", None), ("old defaults", False)]  # None: VLM's default ("auto")


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run(model_path: Path, mmproj_path: Path, image: Image.Image, *, threads: int, repeat: int, max_tokens: int,
        label: str) -> str:
    load_before, started = _load(), datetime.datetime.now(datetime.timezone.utc)
    model = Model(model_path)
    vlms: dict[str, VLM] = {}
    try:
        for name, fa in CONFIGS:
            kw = {} if fa is None else {"flash_attn": fa}
            vlms[name] = VLM(model, mmproj_path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, **kw)
        settings = {name: vlms[name].settings.flash_attn for name, _ in CONFIGS}
        for v in vlms.values():  # warm-up: graph allocation (and flash attention's auto check) happen here
            v.ask(image, Q, max_tokens=1)
        ttft: dict[str, list[float]] = {n: [] for n in vlms}
        e2e: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in vlms}
        texts: dict[str, set[str]] = {n: set() for n in vlms}
        n_tokens: dict[str, int] = {}
        for r in range(repeat):  # alternate the configurations (and their order) so drift hits both alike
            order = list(vlms) if r % 2 == 0 else list(vlms)[::-1]
            for name in order:
                v = vlms[name]
                t0 = time.perf_counter()
                v.ask(image, Q, max_tokens=1)
                ttft[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                a = v.ask(image, Q, max_tokens=max_tokens)
                wall = time.perf_counter() - t0
                t = a.timings
                e2e[name].append((wall, t["encode_s"], t["prefill_s"], t["decode_s"]))
                texts[name].add(a.text)
                n_tokens[name] = len(a.tokens)
    finally:
        for v in vlms.values():
            v.close()
        model.close()
    load_after = _load()
    base = "old defaults"
    med = {n: (statistics.median(ttft[n]), *[statistics.median(c) for c in zip(*e2e[n])]) for n in ttft}
    rows = []
    for name, _ in CONFIGS:
        tt, wall, enc, pre, dec = med[name]
        rows.append([name, repr(settings[name]), enc * 1000, pre * 1000, dec * 1000, tt * 1000, wall * 1000,
                     n_tokens[name], med[base][0] / tt, med[base][1] / wall,
                     "yes" if texts[name] == texts[base] else "no"])
    head = ["config", "flash_attn", "encode ms", "prefill ms", "decode ms", "TTFT ms", "end-to-end ms", "tokens",
            "TTFT speed-up vs old", "end-to-end speed-up vs old", "same text as old"]
    return (f"{label}: text {model_path.name} ({model_path.stat().st_size / 2**20:.0f} MiB), mmproj "
            f"{mmproj_path.stat().st_size / 2**20:.0f} MiB, {image.width}x{image.height} image, n_threads = "
            f"n_threads_batch = {threads}, {repeat} runs each (median), after one warm-up query each\n"
            f"{platform.machine()}, {os.cpu_count()} CPUs, started {started:%Y-%m-%d %H:%M} UTC, "
            f"load average (1/5/15 min) {load_before} before, {load_after} after\n\n" + table(head, rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen25vl", choices=["llava", "qwen25vl"])
    p.add_argument("--size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch")
    p.add_argument("--max-tokens", type=int, default=8, help="answer tokens for the end-to-end time")
    p.add_argument("--model", type=Path, default=None, help="text GGUF (default: the generated fixture)")
    p.add_argument("--mmproj", type=Path, default=None, help="mmproj GGUF (with --model)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    a = p.parse_args()
    if (a.model is None) != (a.mmproj is None):
        p.error("--model and --mmproj go together")
    if a.model is None:
        fx, image = bench_fixture(a.family, a.size)
        model_path, mmproj_path = fx.model, fx.mmproj
    else:
        from convert.fixtures import spec

        side = spec(a.family, a.size)[1].image_size
        image = Image.open(DEMO_IMAGE).convert("RGB").resize((side, side), Image.BICUBIC)
        model_path, mmproj_path = a.model, a.mmproj
    text = run(model_path, mmproj_path, image, threads=a.threads, repeat=a.repeat, max_tokens=a.max_tokens,
               label=f"{a.family} {a.size}")
    cmd = " ".join([".venv/bin/python", str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:])
    text = f"Command: `{cmd}`\n\n{text}"
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
