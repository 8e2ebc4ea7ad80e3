"""Linear probes on a Qwen2.5-VL-style shapes model's image embeddings: what each image token tells the text model.

    .venv/bin/python -m training.probe_embeddings --model-dir avis_llamacpp/data/shapes-qwen

Fits a logistic regression per target (colour and shape on object tokens, object centre, row, column on all
tokens) on the embeddings of training-split-style scenes (a seed stream of their own) and scores it on held-out
scenes. Low probe accuracy says the ViT does not deliver that property; high accuracy with low task accuracy says
the text model does not use it.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np


def probe(model_dir: str, n_images: int = 240, held_out: float = 0.25, threads: int = 1) -> dict:
    """{target: {"accuracy", "majority", "n"}} of linear probes on the model's image embeddings."""
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from convert.shapes_task import make_scene, render
    from training.qwen_torch import dims_from_gguf, load_from_gguf
    from training.train_shapes_qwen import CELL, GRID, patch_labels, token_places
    from training.vlm_torch import pixels

    torch.set_num_threads(threads)
    model, mmproj = f"{model_dir}/model.gguf", f"{model_dir}/mmproj.gguf"
    m = load_from_gguf(model, mmproj, dims_from_gguf(model, mmproj))
    scenes = [make_scene(np.random.default_rng([7, i])) for i in range(n_images)]
    places = token_places().numpy()
    y = np.stack([np.concatenate([patch_labels(s, GRID, CELL), places]) for s in scenes])
    with torch.no_grad():
        x = np.concatenate([m.vision(pixels(np.stack([np.asarray(render(s)) for s in scenes[i:i + 16]])))[0].numpy()
                            for i in range(0, n_images, 16)])
    cut = int(round(n_images * (1 - held_out)))
    out = {}
    for j, name in enumerate(("colour", "shape", "centre", "row", "column")):
        xtr, ytr = x[:cut].reshape(-1, x.shape[-1]), y[:cut, j].reshape(-1)
        xte, yte = x[cut:].reshape(-1, x.shape[-1]), y[cut:, j].reshape(-1)
        if name in ("colour", "shape"):  # object tokens only (0 is background)
            xtr, ytr, xte, yte = xtr[ytr > 0], ytr[ytr > 0], xte[yte > 0], yte[yte > 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(max_iter=300).fit(xtr[:20000], ytr[:20000])
        out[name] = {"accuracy": round(float(clf.score(xte, yte)), 3),
                     "majority": round(float(np.bincount(yte).max() / len(yte)), 3), "n": int(len(yte))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.probe_embeddings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="avis_llamacpp/data/shapes-qwen")
    p.add_argument("--n-images", type=int, default=240)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(json.dumps(probe(args.model_dir, args.n_images, threads=args.threads), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
