"""Early stopping of self-consistency rollouts on the bundled trained model: decode tokens and time it saves.

Every test item is answered twice with the same seed: K rollouts run to the end, and K rollouts with
``early_stop=True`` (the rest are cancelled once the leader cannot be overtaken). Per-rollout seeds make the
rollouts that do run token-identical, so the exact saving is the difference in decoded tokens; the table also
shows the pipeline's own estimate (``Answer.tokens_saved``) and checks the winner never changes.

    .venv/bin/python benchmarks/bench_early_stop.py --n 100 --k 7 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import table

from avis_llamacpp import VLM
from avis_llamacpp.defaults import default_model_paths
from avis_llamacpp.native import ContextSettings
from convert.shapes_task import format_question, make_item, render


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="test items")
    p.add_argument("--k", type=int, default=7, help="rollouts per item")
    p.add_argument("--modes", default="parallel,snapshot")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1, help="threads for single-token and batch decoding")
    a = p.parse_args()
    model, mmproj = default_model_paths()
    items = [make_item("test", i) for i in range(a.n)]
    images = [np.asarray(render(it.scene)) for it in items]
    rows = []
    with VLM(model, mmproj, n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads) as vlm:
        for mode in a.modes.split(","):
            stats = {"full_tok": 0, "fast_tok": 0, "est": 0, "full_s": 0.0, "fast_s": 0.0, "same": 0, "stopped": 0,
                     "cancelled": 0}
            for i, (it, img) in enumerate(zip(items, images)):
                q = it.question
                kw = dict(answer_tags=True, max_tokens=a.max_tokens, options=q.options, k=a.k, seed=1000 + i,
                          mode=mode)
                t0 = time.perf_counter()
                full = vlm.ask(img, format_question(q), **kw)
                t1 = time.perf_counter()
                fast = vlm.ask(img, format_question(q), early_stop=True, **kw)
                t2 = time.perf_counter()
                stats["full_s"] += t1 - t0
                stats["fast_s"] += t2 - t1
                stats["full_tok"] += sum(full.decode_tokens)
                stats["fast_tok"] += sum(fast.decode_tokens)
                stats["est"] += fast.tokens_saved
                stats["same"] += fast.answer == full.answer
                stats["stopped"] += fast.early_stopped > 0
                stats["cancelled"] += fast.early_stopped
            saved = stats["full_tok"] - stats["fast_tok"]
            rows.append([mode, a.n, f"{stats['same']}/{a.n}", f"{stats['stopped']}/{a.n}", stats["cancelled"],
                         stats["full_tok"], stats["fast_tok"], f"{saved} ({saved / max(1, stats['full_tok']):.0%})",
                         stats["est"], stats["full_s"], stats["fast_s"], stats["full_s"] / stats["fast_s"]])
    print(f"bundled shapes VLM, K={a.k}, temperature 0.7 / top-p 0.9, max {a.max_tokens} tokens, "
          f"{a.threads} thread(s), flash_attn={ContextSettings().flash_attn!r}\n")
    print(table(["mode", "items", "same winner", "items stopped early", "rollouts cancelled", "decode tokens (all K)",
                 "decode tokens (early stop)", "tokens saved (exact)", "tokens saved (estimate)", "time all K s",
                 "time early stop s", "speed-up"], rows))


if __name__ == "__main__":
    main()
