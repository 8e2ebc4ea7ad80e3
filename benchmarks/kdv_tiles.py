"""Tiled images (#30's question): should an image that mtmd splits into tiles + an overview (InternVL, LFM2-VL,
SmolVLM / Idefics3) be pruned as ONE KDV selection over all its tiles, as a video is, or tile by tile?

    PYTHONPATH=. .venv/bin/python benchmarks/kdv_tiles.py

For two 1024x768 images (left half blank + right half noise; the bundled shapes image upscaled) on each tiled
family's fixture, the keys of every tile are read by encoding the tiles one by one; then KDV rho 0.75 is applied
(a) jointly over the whole image and (b) per tile. Printed: how many tokens the joint selection keeps in each
chunk (LFM2-VL's last chunk is its smaller thumbnail), and the mean pairwise cosine of the kept keys (lower = less
redundant). Random fixture weights: this shows where the budget goes, not accuracy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from common import DEMO_IMAGE, table

from avis_llamacpp import VLM
from avis_llamacpp.kdv import kdv_scores, select_tokens
from avis_llamacpp.mtmd import ImageChunk
from convert.fixtures import make_fixture


def tile_keys(v: VLM, img: np.ndarray) -> list[np.ndarray]:
    out = []
    with v.projector.tokenize(v.render_question("q", 1), [img]) as p:
        for c in p.chunks:
            if isinstance(c, ImageChunk):
                out.append(v.token_keys(c, v.projector.encode(c))[0])
    return out


def redundancy(keys: np.ndarray) -> float:
    u = keys / np.linalg.norm(keys, axis=2, keepdims=True)
    sims = np.einsum("ahd,bhd->abh", u, u).mean(2)
    n = len(keys)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def main() -> None:
    rng = np.random.default_rng(0)
    half = np.full((768, 1024, 3), 200, np.uint8)
    half[:, 512:] = rng.integers(0, 255, (768, 512, 3))
    shapes = np.asarray(Image.open(DEMO_IMAGE).convert("RGB").resize((1024, 768)))
    rows = []
    for fam in ("internvl", "lfm2", "idefics3"):
        fx = make_fixture(fam, "tiny")
        with VLM(fx.model, fx.mmproj, n_ctx=8192, n_threads=1, n_threads_batch=1) as v:
            for name, img in (("half blank", half), ("shapes", shapes)):
                ks = tile_keys(v, img)
                allk, off = np.concatenate(ks), np.cumsum([0] + [len(k) for k in ks[:-1]])
                joint = select_tokens(kdv_scores(allk), ratio=0.75)
                per = np.concatenate([select_tokens(kdv_scores(k), ratio=0.75) + o for k, o in zip(ks, off)])
                counts = [int(((joint >= o) & (joint < o + len(k))).sum()) for k, o in zip(ks, off)]
                per_counts = sorted({int(select_tokens(kdv_scores(k), ratio=0.75).size) for k in ks})
                rows.append([fam, name, len(ks), f"{counts[-1]} of {len(ks[-1])}", " ".join(map(str, counts[:-1])),
                             "/".join(map(str, per_counts)), redundancy(allk[joint]), redundancy(allk[per])])
    print(table(["family", "image", "chunks", "last chunk kept (joint)", "other chunks kept (joint)", "per tile keeps",
                 "redundancy joint", "redundancy per tile"], rows))


if __name__ == "__main__":
    main()
