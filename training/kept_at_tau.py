"""How many image tokens adaptive KDV keeps on a trained shapes model: a selection check next to accuracy.

    .venv/bin/python -m training.kept_at_tau --model-dir /tmp/sq/out --items /tmp/cal400/items.jsonl --n 60

The AVIS row's FLOPs follow the kept share at tau = pi/4, and that share is a property of each trained ViT's key
geometry (it ranged from 46 to 156 of 256 tokens across runs of one recipe), so a candidate model is checked on
calibration items for it as well as for accuracy. Prints {"tau", "n_items", "mean_kept", "min", "max",
"image_tokens"} as JSON; torch-free (the plugin's own KDV through llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def kept_at_tau(model_dir: str | Path, items: str | Path, n: int = 60, tau: float = math.pi / 4,
                threads: int = 1) -> dict:
    """Kept image tokens per item when the plugin prunes at tau, over the first n records of an items JSONL."""
    from avis_llamacpp import VLM
    from avis_llamacpp.items import load_items

    records = load_items(items, limit=n)
    kept, totals = [], set()
    d = Path(model_dir)
    with VLM(d / "model.gguf", d / "mmproj.gguf", n_ctx=2048, n_threads=threads, n_threads_batch=threads) as vlm:
        for it in records:
            ans = vlm.ask(str(it.image), it.question, answer_tags=True, max_tokens=1, tau=tau)
            kept.append(len(ans.images[0]["kept"]))
            totals.update(ans.image_tokens)
    return {"tau": tau, "n_items": len(kept), "mean_kept": round(sum(kept) / len(kept), 2), "min": min(kept),
            "max": max(kept), "image_tokens": sorted(totals)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.kept_at_tau", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--items", required=True, help="items JSONL (convert.shapes_task --split calibration)")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--tau", type=float, default=math.pi / 4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(json.dumps(kept_at_tau(args.model_dir, args.items, args.n, args.tau, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
