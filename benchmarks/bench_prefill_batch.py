"""Cost of decoding a batch of n prompt tokens, per n, with flash attention on and off (llama.cpp's CPU kernels).

Why a pruned prefill can be slower than the unpruned one on a small model: a frame pair of the clip model is 64
tokens, and pruning leaves it 16-63. On CPU with flash attention on, a batch of under 64 tokens takes another
attention path whose time grows faster than the batch (measured here: 63 tokens cost more than 64), so pruning a
chunk from 64 to 45 tokens can cost time instead of saving it. With flash attention off the time is about linear
in n. Each batch is decoded after a fixed prefix (as an image chunk after the text before it), median of --repeat.

    .venv/bin/python benchmarks/bench_prefill_batch.py --threads 1
    .venv/bin/python benchmarks/bench_prefill_batch.py --model other.gguf --prefix 500 --sizes 32,63,64,128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import ROOT, table

from avis_llamacpp.native import Context, ContextSettings, Model

DEFAULT_MODEL = ROOT / "avis_llamacpp" / "data" / "shapes-qwen-video" / "model.gguf"


def batch_ms(ctx: Context, n: int, prefix: int, repeat: int) -> float:
    """Median milliseconds to decode n tokens at positions prefix.. after a prefix already in the cache."""
    times = []
    for _ in range(repeat + 2):
        ctx.seq_rm(0, prefix, -1)
        t0 = time.perf_counter()
        ctx.decode_tokens([5 + (i % 50) for i in range(n)], prefix, 0)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])  # first two: warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="text model GGUF (default: the bundled clip model)")
    p.add_argument("--threads", type=int, default=1, help="n_threads = n_threads_batch")
    p.add_argument("--prefix", type=int, default=80, help="tokens in the cache before the batch")
    p.add_argument("--sizes", default="8,16,32,45,48,56,63,64,65,96,128")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--no-repack", action="store_true", help="no CPU extra buffer types (a host whose AMX faults)")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    model = Model(a.model, repack=not a.no_repack)
    cols = {}
    for fa in (True, False):
        ctx = Context(model, ContextSettings(n_ctx=a.prefix + max(sizes) + 64, n_threads=a.threads,
                                             n_threads_batch=a.threads, flash_attn=fa))
        ctx.decode_tokens([10 + (i % 300) for i in range(a.prefix)], 0, 0)
        cols[fa] = [batch_ms(ctx, n, a.prefix, a.repeat) for n in sizes]
        ctx.close()
    on64 = cols[True][sizes.index(64)] if 64 in sizes else None
    rows = [[n, on, on / n, off, off / n, (on / on64) if on64 else "-"]
            for n, on, off in zip(sizes, cols[True], cols[False])]
    print(f"{a.model}: {a.prefix}-token prefix, {a.threads} thread(s), load {os.getloadavg()[0]:.2f}\n")
    print(table(["batch n", "ms, flash on", "ms / token", "ms, flash off", "ms / token", "flash on, vs n = 64"],
                rows))


if __name__ == "__main__":
    main()
