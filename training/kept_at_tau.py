"""How many image tokens adaptive KDV keeps on a trained shapes model: a selection check next to accuracy.

    .venv/bin/python -m training.kept_at_tau --model-dir /tmp/sq/out --items /tmp/cal400/items.jsonl --n 60

The AVIS row's FLOPs follow the kept share at tau = pi/4, and that share is a property of each trained ViT's key
geometry (46 to 255 of 256 tokens across trained runs), so a candidate model is checked on
calibration items for it as well as for accuracy. Prints {"tau", "n_items", "mean_kept", "min", "max",
"image_tokens"} as JSON; torch-free (the plugin's own KDV through llama.cpp).

With --checkpoint (needs torch) it counts from a training run's state dict instead, mid-run: the trainer rewrites
WORK/ckpt.pt every 200 steps, and --model-dir WORK/init gives the run's architecture. The last block's keys come from
the PyTorch mirror and go through the plugin's KDV (avis_llamacpp.kdv); on a finished model both paths give the same
counts. This is how the kept share was followed along one run (README, Results). It also reports the keys'
common_key_energy_ratio (shared against per-token energy), which tracks the kept share.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


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
    return kept_summary(kept, tau, sorted(totals))


def kept_summary(kept: list[int], tau: float, image_tokens: list[int]) -> dict:
    """The printed record: tau, item count, mean / min / max kept tokens, the images' token counts."""
    return {"tau": tau, "n_items": len(kept), "mean_kept": round(sum(kept) / len(kept), 2), "min": min(kept),
            "max": max(kept), "image_tokens": image_tokens}


def common_key_energy_ratio(keys: np.ndarray) -> float:
    """|mean key|^2 / mean |key - mean key|^2 over one image's tokens, averaged over heads; keys [tokens, heads, d].
    A token's angle to the anchor is under pi/4 roughly when its deviation from the shared key is smaller than the
    shared key itself, so this ratio (above 1: most tokens pruned) tracks what tau = pi/4 keeps."""
    k = np.asarray(keys, dtype=np.float64)
    mean = k.mean(axis=0)
    common = (mean ** 2).sum(-1)
    residual = ((k - mean) ** 2).sum(-1).mean(axis=0)
    return float(np.mean(common / residual))


def kept_at_tau_checkpoint(init_dir: str | Path, checkpoint: str | Path, items: str | Path, n: int = 60,
                           tau: float = math.pi / 4, threads: int = 1) -> dict:
    """kept_at_tau for a train_shapes_qwen state dict (checkpoint) of the architecture exported in init_dir."""
    import torch

    from avis_llamacpp.items import load_items
    from avis_llamacpp.kdv import kdv_scores, select_tokens
    from training.data import load_rgb
    from training.qwen_torch import ShapesQwenVLM, dims_from_gguf
    from training.vlm_torch import pixels

    torch.set_num_threads(threads)
    d = Path(init_dir)
    model = ShapesQwenVLM(dims_from_gguf(d / "model.gguf", d / "mmproj.gguf")).eval()
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    kept, ratios = [], []
    for it in load_items(items, limit=n):
        with torch.no_grad():
            _, keys = model.vision(pixels(load_rgb(it.image)[None]))  # [1, tokens, heads, d_head]
        k = keys[0].double().numpy()
        kept.append(len(select_tokens(kdv_scores(k), tau=tau)))
        ratios.append(common_key_energy_ratio(k))
    return {**kept_summary(kept, tau, [int(keys.shape[1])]),
            "common_key_energy_ratio": round(float(np.mean(ratios)), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.kept_at_tau", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="exported GGUF pair (with --checkpoint: the run's WORK/init)")
    p.add_argument("--checkpoint", default=None, help="a train_shapes_qwen state dict (WORK/ckpt.pt); needs torch")
    p.add_argument("--items", required=True, help="items JSONL (convert.shapes_task --split calibration)")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--tau", type=float, default=math.pi / 4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.checkpoint:
        result = kept_at_tau_checkpoint(args.model_dir, args.checkpoint, args.items, args.n, args.tau, args.threads)
    else:
        result = kept_at_tau(args.model_dir, args.items, args.n, args.tau, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
