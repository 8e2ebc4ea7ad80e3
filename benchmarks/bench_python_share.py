"""Python share of a parallel-mode decode step at a 152k vocabulary (#15): K = 1..7 rollouts decoded as one
batch per step (rollouts.run_parallel) on the `real` fixture (Qwen2.5-VL-3B text model, Q4_K_M, vocab 151,936).
Each step's wall time is split into the time inside llama_decode, inside llama.cpp's sampler
(llama_sampler_sample: its own copy of the logits row, top-p, dist) and the rest, which is Python (batch filling,
the sampled token's log-probability, detokenization, stop-string search, bookkeeping). The current per-token
work and the pre-#15 one (float64 log-softmax on a copied row, text re-joined and re-decoded from all pieces:
the oracle `OldStream` of tests/test_rollouts_pertoken.py) run side by side in the same process, interleaved,
on the same prefilled prompt, with the same seeds (so they decode the same tokens).

Goal: Python <= 3% of the step at K = 7 on the real fixture.

    python -m convert.fixtures --family qwen25vl --size real       # once: writes the fixture (minutes)
    .venv/bin/python benchmarks/bench_python_share.py --size real --ks 1,2,3,4,5,6,7 --tokens 64 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from common import ROOT, table  # noqa: F401  (puts the repository on sys.path)

import llama_cpp

from avis_llamacpp import rollouts
from avis_llamacpp.native import Context, ContextSettings, Model, SamplingParams
from convert.fixtures import SIZES, make_fixture

logger = logging.getLogger("bench_python_share")


@dataclass
class Clock:
    """Seconds spent inside each wrapped llama.cpp function."""

    spent: dict[str, float] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t0
        return timed


@contextlib.contextmanager
def timed_llama(clock: Clock) -> Iterator[None]:
    """Route llama_decode and llama_sampler_sample (as avis_llamacpp.native calls them, through the llama_cpp
    module) through timers for the duration."""
    names = ("llama_decode", "llama_sampler_sample")
    saved = {n: getattr(llama_cpp, n) for n in names}
    try:
        for n in names:
            setattr(llama_cpp, n, clock.wrap(n, saved[n]))
        yield
    finally:
        for n in names:
            setattr(llama_cpp, n, saved[n])


def old_stream_class() -> type:
    """The pre-#15 Stream: the test's oracle copy (one implementation of 'before', shared with the test)."""
    from tests.test_rollouts_pertoken import OldStream
    return OldStream


def restore_prompt(ctx: Context, prompt: list[int]) -> None:
    """Leave sequence 0 holding exactly the prompt with the prompt's last logits at output -1: drop what the
    last run generated and re-decode the prompt's last token."""
    ctx.seq_rm(0, len(prompt) - 1, -1)
    ctx.decode_tokens(prompt[-1:], len(prompt) - 1, 0)


def run_once(ctx: Context, model: Model, prompt: list[int], k: int, tokens: int, seed: int,
             stream_cls: type) -> dict[str, float]:
    """One run_parallel of K rollouts with the given Stream implementation; seconds per part and counts."""
    restore_prompt(ctx, prompt)
    params = rollouts.rollout_params(k, SamplingParams(temperature=0.7, top_p=0.9, seed=seed))
    clock = Clock()
    saved = rollouts.Stream
    rollouts.Stream = stream_cls
    try:
        with timed_llama(clock):
            t0 = time.perf_counter()
            out = rollouts.run_parallel(ctx, model, len(prompt), params, max_tokens=tokens)
            total = time.perf_counter() - t0
    finally:
        rollouts.Stream = saved
    decode = clock.spent.get("llama_decode", 0.0)
    sample = clock.spent.get("llama_sampler_sample", 0.0)
    n_tok = sum(len(r.tokens) for r in out)
    return {"total": total, "decode": decode, "sample": sample, "python": total - decode - sample,
            "steps": max(len(r.tokens) for r in out) - 1, "tokens": n_tok,
            "sig": hash(tuple(tuple(r.tokens) for r in out))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen25vl", choices=["llava", "qwen25vl"])
    p.add_argument("--size", default="real", choices=list(SIZES))
    p.add_argument("--ks", default="1,2,3,4,5,6,7")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per rollout")
    p.add_argument("--prompt", type=int, default=560,
                   help="prompt tokens in the KV cache (560: a 644 px image's 529 tokens plus the template)")
    p.add_argument("--repeat", type=int, default=2, help="runs per (K, implementation), interleaved; medians")
    p.add_argument("--threads", type=int, default=2, help="n_threads and n_threads_batch (pinned)")
    a = p.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    fx = make_fixture(a.family, a.size)
    model = Model(fx.model)
    # a fixed, in-vocabulary prompt (byte-level tokens of plain text), as long as an image prompt's KV
    words = model.tokenize("Describe the image in detail. " * (a.prompt // 4 + 1))
    prompt = words[:a.prompt]
    settings = ContextSettings(n_ctx=a.prompt + max(ks) * a.tokens + 64, n_batch=512, n_seq_max=max(8, max(ks)),
                               n_threads=a.threads, n_threads_batch=a.threads)
    ctx = Context(model, settings)
    t0 = time.perf_counter()
    ctx.decode_tokens(prompt, 0, 0)
    prefill_s = time.perf_counter() - t0
    impls = {"new": rollouts.Stream, "pre-#15": old_stream_class()}
    run_once(ctx, model, prompt, 1, 2, 0, impls["new"])  # warm-up
    rows = []
    for k in ks:
        res: dict[str, list[dict[str, float]]] = {name: [] for name in impls}
        for rep in range(a.repeat):
            for name, cls in impls.items():  # interleaved so drift hits both alike
                res[name].append(run_once(ctx, model, prompt, k, a.tokens, seed=rep, stream_cls=cls))
        med = {name: {key: statistics.median(r[key] for r in runs) for key in ("total", "decode", "sample", "python")}
               for name, runs in res.items()}
        same = all(x["sig"] == y["sig"] for x, y in zip(res["new"], res["pre-#15"]))
        steps = max(1, int(statistics.median(r["steps"] for r in res["new"])))
        for name in impls:
            m = med[name]
            rows.append([k, name, m["total"] / steps * 1e3, m["decode"] / steps * 1e3, m["sample"] / steps * 1e3,
                         m["python"] / steps * 1e3, f"{100 * m['python'] / m['total']:.2f}%",
                         f"{100 * (m['total'] - m['decode']) / m['total']:.2f}%",
                         m["python"] / med["new"]["python"], "yes" if same else "NO"])
    print(f"{a.family} {a.size}: text model {fx.model.stat().st_size / 2**30:.2f} GiB, vocab {model.n_vocab}, "
          f"{len(prompt)}-token prompt (prefill {prefill_s:.1f} s), {a.tokens} tokens per rollout, threads "
          f"{a.threads}/{a.threads}, flash_attn={settings.flash_attn!r}, median of {a.repeat} interleaved runs; "
          f"per-step times average over the {steps} decode steps of a run\n")
    print(table(["K", "per-token work", "step ms", "llama_decode ms", "llama.cpp sampler ms", "Python ms",
                 "Python share", "outside llama_decode", "Python vs new", "same tokens"], rows))
    ctx.close()
    model.close()


if __name__ == "__main__":
    main()
