"""Cost of one decode step for a batch of K rollouts vs one rollout, on the bench-size text model.

This is the ceiling on what parallel self-consistency can gain over snapshot mode: snapshot decodes K rollouts
one token at a time (K steps of batch 1), parallel mode decodes them together (1 step of batch K). Where a step
of batch K costs about as much as a step of batch 1 (memory-bound decoding: GPUs, many cores) parallel mode is
up to K times faster; where it costs K times as much (compute-bound: few CPU threads), it gains nothing.

    .venv/bin/python benchmarks/bench_decode_batch.py --threads 1,2 --prompt 500
"""

from __future__ import annotations

import argparse
import time

from common import table

from avis_llamacpp.native import Context, ContextSettings, Model
from convert.fixtures import make_fixture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen25vl", choices=["llava", "qwen25vl"])
    p.add_argument("--size", default="bench", choices=["tiny", "bench", "real"],
                   help="fixture size; real: Qwen2.5-VL-3B dimensions, vocab 151,936, Q4_K_M "
                        "(qwen25vl only; written on first use, minutes)")
    p.add_argument("--threads", default="1", help="comma-separated thread counts (single-token and batch)")
    p.add_argument("--batches", default="1,2,4,7")
    p.add_argument("--prompt", type=int, default=500, help="tokens already in the KV cache (shared prefix)")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    a = p.parse_args()
    fx = make_fixture(a.family, a.size)
    model = Model(fx.model)
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for n_threads in (int(t) for t in a.threads.split(",")):
        ctx = Context(model, ContextSettings(n_ctx=a.prompt + a.steps + 64, n_seq_max=max(8, max(batches)),
                                             n_threads=n_threads, n_threads_batch=n_threads, kv_unified=True))
        ctx.decode_tokens([10 + (i % 300) for i in range(a.prompt)], 0, 0)
        one = None
        for k in batches:
            for s in range(1, k):
                ctx.seq_cp(0, s)
            ctx.decode_step([5] * k, [a.prompt] * k, list(range(k)))  # warm-up step
            t0 = time.perf_counter()
            for step in range(1, a.steps + 1):
                ctx.decode_step([5] * k, [a.prompt + step] * k, list(range(k)))
            ms = (time.perf_counter() - t0) / a.steps * 1000
            one = ms if k == 1 else one
            rows.append([n_threads, k, ms, ms / k, (k * one / ms) if one else 1.0])
            for s in range(k):
                ctx.seq_rm(s, a.prompt, -1)
            for s in range(1, k):
                ctx.seq_rm(s)
        ctx.close()
    print(f"{a.family} {a.size}: {fx.model.stat().st_size / 2**20:.0f} MiB text model, {a.prompt}-token shared prefix, "
          f"flash_attn={ContextSettings().flash_attn!r}\n")
    print(table(["threads", "batch K", "ms / step", "ms / token", "parallel gain over K single steps"], rows))


if __name__ == "__main__":
    main()
