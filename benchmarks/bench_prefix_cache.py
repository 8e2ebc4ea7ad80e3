"""Prefix cache (#18): time to first token of a second turn about the same image, as a ratio to the first turn
measured in the same run, and the memory the cache holds.

    .venv/bin/python benchmarks/bench_prefix_cache.py --family qwen25vl --size bench --threads 2 --repeat 3

One VLM with prefix_cache=True (threads pinned: n_threads = n_threads_batch = --threads). Each repeat:
  turn 1        a new conversation about the image (the cache cleared first: encode + full prefill);
  turn 2        the follow-up turn (turn 1's prompt + its answer + a new question): reuses turn 1's prefix;
  turn 2, off   the same request with reuse_prefix=False (what every turn costs without the cache);
  question 2    a new single-turn question about the same image (reuses up to the question);
  store         (with --store-bytes) turn 2 of a conversation that another conversation displaced from the
                context, restored from the in-memory prefix store.
TTFT is the wall time of a query with max_tokens=1 (load, digest, match, encode, prefill, first token).
Every reused answer is checked token for token against the cache-off run of the same prompt (column `same`).
Memory: the live prompt's KV bytes (llama_state_seq_get_size) + its image records, and the store's bytes.
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

from common import ROOT, bench_fixture, table

from avis_llamacpp import VLM
from avis_llamacpp.prefix_cache import PrefixStore

Q1 = "What is in the image?"
Q2 = "How many shapes are there, and which colours?"
URL = "avis-image://0"


def _turns(*texts: str) -> list[dict]:
    msgs: list[dict] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}},
                                                     {"type": "text", "text": texts[0]}]}]
    for i, t in enumerate(texts[1:]):
        msgs.append({"role": "assistant" if i % 2 == 0 else "user", "content": t})
    return msgs


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen25vl")
    p.add_argument("--size", default="bench")
    p.add_argument("--threads", type=int, default=2, help="n_threads = n_threads_batch")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--answer-tokens", type=int, default=16, help="length of turn 1's answer (part of turn 2)")
    p.add_argument("--tau", type=float, default=None, help="KDV pruning for every query (default: none)")
    p.add_argument("--store-bytes", type=int, default=0, help="also measure a restore from a PrefixStore this big")
    p.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = p.parse_args(argv)
    fa = {"auto": "auto", "on": True, "off": False}[args.flash_attn]
    fx, image = bench_fixture(args.family, args.size)
    other = image.transpose(0)  # another image of the same size (mirrored)
    load_before = _load()
    store = PrefixStore(args.store_bytes) if args.store_bytes > 0 else None
    pr = {"tau": args.tau} if args.tau is not None else {}
    rows_t: dict[str, list[float]] = {k: [] for k in ("turn 1", "turn 2", "turn 2, off", "question 2", "store")}
    skipped: dict[str, int] = {}
    same: dict[str, bool] = {}
    mem: dict[str, int] = {}
    with VLM(fx.model, fx.mmproj, n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads,
             flash_attn=fa, prefix_cache=True, prefix_store=store) as v:
        setting = v.settings.flash_attn
        v.ask(image, Q1, max_tokens=1, reuse_prefix=False)  # warm-up: graph allocation
        for r in range(args.repeat):
            v.clear_prefix_cache()
            if store is not None:
                store.clear()
            p1 = v.render_messages(_turns(Q1), [URL])
            t0 = time.perf_counter()
            v.generate(p1, [image], max_tokens=1, **pr)
            rows_t["turn 1"].append(time.perf_counter() - t0)
            skipped["turn 1"] = 0
            a1 = v.generate(p1, [image], max_tokens=args.answer_tokens, **pr)  # turn 1's answer (not timed)
            p2 = v.render_messages(_turns(Q1, a1.text, Q2), [URL])
            t0 = time.perf_counter()
            a2 = v.generate(p2, [image], max_tokens=1, **pr)
            rows_t["turn 2"].append(time.perf_counter() - t0)
            skipped["turn 2"] = a2.tokens_skipped
            info = v.prefix_cache_info()
            mem["live KV + image records"] = info["live_bytes"]
            t0 = time.perf_counter()
            off = v.generate(p2, [image], max_tokens=1, reuse_prefix=False, **pr)
            rows_t["turn 2, off"].append(time.perf_counter() - t0)
            skipped["turn 2, off"] = off.tokens_skipped
            same["turn 2"] = a2.tokens == off.tokens
            v.generate(p1, [image], max_tokens=1, **pr)  # the conversation's first prompt is live again
            pq = v.render_messages(_turns(Q2), [URL])
            t0 = time.perf_counter()
            q2 = v.generate(pq, [image], max_tokens=1, **pr)
            rows_t["question 2"].append(time.perf_counter() - t0)
            skipped["question 2"] = q2.tokens_skipped
            same["question 2"] = q2.tokens == v.generate(pq, [image], max_tokens=1, reuse_prefix=False, **pr).tokens
            if store is not None:
                v.generate(p2, [image], max_tokens=1, **pr)  # turn 2 live ...
                v.generate(v.render_messages(_turns(Q1), [URL]), [other], max_tokens=1, **pr)  # ... displaced
                t0 = time.perf_counter()
                st = v.generate(p2, [image], max_tokens=1, **pr)
                rows_t["store"].append(time.perf_counter() - t0)
                skipped["store"] = st.tokens_skipped
                same["store"] = st.tokens == off.tokens
                mem["store (memory)"] = store.nbytes
        n_prompt = off.prompt_tokens
    base = statistics.median(rows_t["turn 1"])
    rows = []
    for name, ts in rows_t.items():
        if not ts:
            continue
        med = statistics.median(ts)
        rows.append([name, round(med * 1000, 1), round(med / base, 3), skipped.get(name, 0),
                     {True: "yes", False: "NO"}.get(same.get(name), "-")])
    cmd = "python benchmarks/bench_prefix_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# bench_prefix_cache.py on {args.family} {args.size} ({datetime.date.today()})", "",
             f"Command: `{cmd}`", "",
             (f"threads {args.threads} (n_threads = n_threads_batch), flash_attn {setting!r}, repeat {args.repeat} "
              f"(median), pruning {pr or 'none'}, turn-2 prompt {n_prompt} KV cells, load average before/after "
              f"{load_before} / {_load()}, {platform.machine()} {os.cpu_count()} CPUs"), "",
             table(["query", "TTFT ms", "vs turn 1", "tokens skipped", "same tokens as cache off"], rows), "",
             table(["cache memory", "MiB"], [[k, round(b / 2 ** 20, 2)] for k, b in mem.items()]), "",
             "Goal: turn 2 <= 0.1x turn 1."]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
