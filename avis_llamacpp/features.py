"""Per-query features for the difficulty predictor (pure numpy), available right after prefill and before any
rollout: pooled statistics of the projected visual embeddings, KDV score statistics and token counts.

Layout (FEATURE_VERSION 1), for a text model of embedding size d:
  [0, d)        mean over all image tokens of the projected embeddings
  [d, 2d)       standard deviation over image tokens
  [2d, 3d)      maximum over image tokens
  3d + 0..6     KDV: fraction kept at tau = pi/4, mean, min, q10, q50, q90, max of the scores
  3d + 7..10    log1p(image tokens), number of images, log1p(text tokens), log1p(question characters)
Queries without images get zeros for the visual and KDV parts."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FEATURE_VERSION = 1
N_EXTRA = 11
DEFAULT_TAU = math.pi / 4


def feature_names(n_embd: int) -> list[str]:
    """Names of the feature vector's entries, in order."""
    names = [f"emb_mean_{i}" for i in range(n_embd)] + [f"emb_std_{i}" for i in range(n_embd)]
    names += [f"emb_max_{i}" for i in range(n_embd)]
    names += ["kdv_kept_frac_pi4", "kdv_mean", "kdv_min", "kdv_q10", "kdv_q50", "kdv_q90", "kdv_max"]
    names += ["log_image_tokens", "n_images", "log_text_tokens", "log_question_chars"]
    return names


def n_features(n_embd: int) -> int:
    return 3 * n_embd + N_EXTRA


def query_features(embeddings: Sequence[np.ndarray], scores: Sequence[np.ndarray], *, n_embd: int,
                   n_text_tokens: int, question: str) -> np.ndarray:
    """The feature vector of one query (float64, length 3 * n_embd + 11); `embeddings` are each image's
    projected embeddings [n_tokens, n_embd] before pruning, `scores` their KDV scores."""
    out = np.zeros(n_features(n_embd), dtype=np.float64)
    if embeddings:
        x = np.concatenate([np.asarray(e, dtype=np.float64) for e in embeddings], axis=0)
        if x.shape[1] != n_embd:
            raise ValueError(f"embeddings have width {x.shape[1]}, expected {n_embd}")
        out[:n_embd] = x.mean(axis=0)
        out[n_embd:2 * n_embd] = x.std(axis=0)
        out[2 * n_embd:3 * n_embd] = x.max(axis=0)
    if scores:
        s = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in scores])
        q10, q50, q90 = np.quantile(s, [0.1, 0.5, 0.9])
        kept = float(np.mean(s >= -math.cos(DEFAULT_TAU)))
        out[3 * n_embd:3 * n_embd + 7] = [kept, s.mean(), s.min(), q10, q50, q90, s.max()]
    n_img_tokens = sum(int(np.asarray(e).shape[0]) for e in embeddings)
    out[3 * n_embd + 7:] = [math.log1p(n_img_tokens), len(embeddings), math.log1p(n_text_tokens),
                            math.log1p(len(question))]
    return out
