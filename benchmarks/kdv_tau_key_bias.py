"""How adaptive KDV's kept count at a fixed tau depends on a key bias that barely changes the model.

Adds `shift` to the last vision block's key bias in each head's lowest-frequency 2-D RoPE pairs (one y pair, one
x pair). Those pairs barely turn across the image, so the shift adds almost the same vector to every key; in that
block's attention it adds almost the same logit to a query's whole row, which softmax removes. The model's
unpruned answers therefore hardly change, but every key moves toward one direction, and KDV's angle to the anchor
(hence the set kept at tau) follows. Prints, per shift, the kept tokens at tau, the unpruned accuracy and its
answers' agreement with the unshifted model, and the accuracy at tau.

    .venv/bin/python benchmarks/kdv_tau_key_bias.py --items /tmp/cal400/items.jsonl --n 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
from common import table

from avis_llamacpp import VLM
from avis_llamacpp.items import load_items
from convert.key_bias import shift_last_key_bias

BUNDLED = Path(__file__).resolve().parents[1] / "avis_llamacpp" / "data" / "shapes-qwen"


def run(model_dir: Path, items: Path, n: int, shifts: list[float], threads: int, max_tokens: int,
        tau: float = math.pi / 4) -> list[dict]:
    """One row per shift: kept tokens at tau, unpruned accuracy and agreement with shift 0, accuracy at tau."""
    records = load_items(items, limit=n)
    base_answers: list[str] | None = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shift in [0.0] + [s for s in shifts if s != 0]:
            mmproj = Path(tmp) / f"mmproj-{shift}.gguf"
            shift_last_key_bias(model_dir / "mmproj.gguf", mmproj, shift)
            full, pruned, kept = [], [], []
            with VLM(model_dir / "model.gguf", mmproj, n_ctx=2048, n_threads=threads, n_threads_batch=threads) as vlm:
                for it in records:
                    a = vlm.ask(str(it.image), it.question, answer_tags=True, max_tokens=max_tokens,
                                options=it.options)
                    b = vlm.ask(str(it.image), it.question, answer_tags=True, max_tokens=max_tokens, tau=tau,
                                options=it.options)
                    full.append(a.answer)
                    pruned.append(b.answer)
                    kept.append(len(b.images[0]["kept"]))
            truth = [it.gold for it in records]
            base_answers = base_answers or full
            rows.append({"shift": shift, "kept_at_tau": float(np.mean(kept)),
                         "unpruned_accuracy": float(np.mean([x == y for x, y in zip(full, truth)])),
                         "unpruned_same_answer": float(np.mean([x == y for x, y in zip(full, base_answers)])),
                         "tau_accuracy": float(np.mean([x == y for x, y in zip(pruned, truth)]))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=BUNDLED)
    p.add_argument("--items", type=Path, required=True, help="items JSONL (python -m convert.shapes_task ...)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--shifts", type=float, nargs="+", default=[-3.0, -1.0, 1.0, 3.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = run(args.model_dir, args.items, args.n, args.shifts, args.threads, args.max_tokens)
    print(table(["key-bias shift", "kept at tau=pi/4 (of 256)", "unpruned accuracy", "unpruned answers unchanged",
                 "accuracy at tau=pi/4"],
                [[r["shift"], round(r["kept_at_tau"], 1), r["unpruned_accuracy"], r["unpruned_same_answer"],
                  r["tau_accuracy"]] for r in rows]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
