"""Choosing KDV's adaptive angle tau for one model (what `avis calibrate` does before it records anything).

tau prunes a token whose mean-over-heads cosine to the anchor key exceeds cos(tau) (kdv.select_tokens keeps the
tokens with score >= -cos(tau), at least one per chunk). How many tokens that keeps is a property of each model's
last-block key geometry, not of the image alone, so the paper's pi/4 means something else on every model. Two ways
to choose it, both keeping per-image adaptivity (tau is fixed per model; the kept share still varies per image):

* label-free (`calibrate_tau`): the tau whose mean kept share over calibration images equals a target share
  (`keep`, default 0.3). Needs only the vision encoder: each image is encoded once, its last-block keys captured
  and scored; nothing is decoded, so it finishes in encode time. The tau is read off the pooled scores directly
  (`tau_for_keep`): the kept share is a step function of the threshold, evaluated exactly.
* labelled (`choose_tau_labelled`): greedy answers unpruned and at the taus of a grid of target shares; the
  largest pruning whose paired accuracy difference to unpruned stays within a tolerance (a small table of tau,
  kept share and accuracy with intervals)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import InvalidArgumentError
from .images import load_image
from .kdv import kdv_scores

__all__ = ["DEFAULT_KEEP", "DEFAULT_KEEPS", "DEFAULT_TOLERANCE", "TauCalibration", "calibrate_tau",
           "choose_tau_labelled", "clip_scores", "format_tau_table", "image_scores", "item_scores", "list_images",
           "mean_kept_share", "tau_for_keep"]

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 0.3  # the paper's operating region (KDV at 70-75% pruning)
DEFAULT_KEEPS = (0.7, 0.5, 0.3, 0.2, 0.1, 0.05)  # labelled search: target kept shares tried, largest first
DEFAULT_TOLERANCE = 0.02  # labelled search: accuracy (absolute) a pruning may lose against unpruned
_TAU_MIN, _TAU_MAX = 1e-6, math.pi - 1e-6

# KDV scores of one image: one array per chunk (a chunk is one selection; tiled images have several)
ImageScores = Sequence[np.ndarray]


@dataclass(frozen=True)
class TauCalibration:
    """A tau chosen for one model and how: method "keep" (label-free, target share `keep`) or "labelled" (the
    largest pruning within `tolerance` of unpruned accuracy; `table` has one row per share tried). kept_share is
    the mean share of image tokens kept on the calibration images at tau; tau None: no share passed."""

    method: str
    tau: float | None
    keep: float | None
    kept_share: float
    n_images: int
    n_tokens: int
    threshold: float | None = None  # -cos(tau): the lowest score kept
    share_quantiles: dict[str, float] = field(default_factory=dict)  # per-image kept share: q10, q50, q90
    tolerance: float | None = None
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what the policy file records as avis.policy.tau.calibration)."""
        return asdict(self)


def _chunk_keys(vlm: Any, frames: Sequence[np.ndarray], video: bool = False) -> list[np.ndarray]:
    """Each image chunk's scored keys, from the encode alone: the projector encodes each chunk while the last ViT
    block's keys are captured and the family's rule maps them to LLM tokens. Nothing is decoded."""
    scorer = getattr(vlm, "scorer", vlm)  # the image scorer (VLM.scorer), or a VLM that scores keys itself
    out = []
    with vlm.projector.tokenize(vlm.render_question("", len(frames)), frames, video=video) as prompt:
        for chunk in prompt.images:
            emb = vlm.projector.encode(chunk)
            tk, _ = scorer.scored_keys(chunk, emb)  # read now: the capture holds only the last encode's keys
            out.append(tk.keys)
    return out


def image_scores(vlm: Any, image: Any) -> list[np.ndarray]:
    """KDV scores of one image's chunks (each chunk its own selection), from the encode alone (no text-model call)."""
    arr = load_image(image, allow_remote=bool(getattr(vlm, "allow_remote_images", False)))
    return [kdv_scores(k) for k in _chunk_keys(vlm, [arr])]


def clip_scores(vlm: Any, video: Any) -> list[np.ndarray]:
    """KDV scores of one video as the plugin selects it (one selection per video): the clip sampled as VLM.ask samples
    it, every chunk encoded, the keys of all chunks scored against ONE anchor. One array (the whole clip is one
    selection), so a tau is calibrated on the shares the query path will keep."""
    from .query import load_clip

    clip = load_clip(video, vlm.projector, vlm.settings.n_ctx,
                     allow_remote=bool(getattr(vlm, "allow_remote_images", False)))
    return [kdv_scores(np.concatenate(_chunk_keys(vlm, clip.frames, video=True)))]


def item_scores(vlm: Any, item: Any) -> list[np.ndarray]:
    """KDV scores of a labelled item's picture: an image's per chunk (image_scores), a clip's as one (clip_scores)."""
    if getattr(item, "is_video", False):
        return clip_scores(vlm, item.media_path)
    return image_scores(vlm, item.image)


def _check_scores(scores: Sequence[ImageScores]) -> list[list[np.ndarray]]:
    """Scores as a list (images) of lists (chunks) of finite 1-D float arrays, none empty."""
    out = []
    for i, chunks in enumerate(scores):
        arrs = [np.asarray(c, dtype=np.float64).reshape(-1) for c in ([chunks] if isinstance(chunks, np.ndarray)
                                                                        else chunks)]
        if not arrs or any(a.size == 0 for a in arrs):
            raise InvalidArgumentError(f"image {i} has no scored tokens")
        if not all(np.all(np.isfinite(a)) for a in arrs):
            raise InvalidArgumentError(f"image {i} has NaN or infinite scores")
        out.append(arrs)
    if not out:
        raise InvalidArgumentError("no calibration images")
    return out


def _per_image_shares(sorted_chunks: list[list[np.ndarray]], threshold: float) -> np.ndarray:
    """Each image's kept share at a threshold: kdv.select_tokens keeps scores >= threshold, at least 1 per chunk."""
    shares = np.empty(len(sorted_chunks))
    for i, chunks in enumerate(sorted_chunks):
        kept = sum(max(1, c.size - int(np.searchsorted(c, threshold, side="left"))) for c in chunks)
        shares[i] = kept / sum(c.size for c in chunks)
    return shares


def mean_kept_share(scores: Sequence[ImageScores], tau: float) -> float:
    """Mean over images of the share of image tokens KDV keeps at tau (tokens of all an image's chunks pooled)."""
    chunks = [[np.sort(c) for c in im] for im in _check_scores(scores)]
    return float(_per_image_shares(chunks, -math.cos(float(tau))).mean())


def tau_for_keep(scores: Sequence[ImageScores], keep: float = DEFAULT_KEEP) -> TauCalibration:
    """The tau whose mean kept share over these images is closest to `keep` (label-free calibration).

    The mean share is a non-increasing step function of the threshold -cos(tau) that changes only at score values,
    so it is evaluated exactly at each distinct pooled score (binary search); the threshold is set halfway to the
    next lower score, so float rounding in -cos(arccos(.)) cannot move a token across it. Ties: the larger share."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise InvalidArgumentError(f"keep (target kept share) must be in (0, 1], got {keep!r}")
    chunks = [[np.sort(c) for c in im] for im in _check_scores(scores)]
    u = np.unique(np.concatenate([c for im in chunks for c in im]))  # ascending distinct scores

    def f(j: int) -> float:
        return float(_per_image_shares(chunks, float(u[j])).mean())

    lo, hi = 0, len(u) - 1  # f is non-increasing in j; find the first j with f(j) <= keep
    if f(hi) > keep:
        lo = hi
    else:
        while lo < hi:
            mid = (lo + hi) // 2
            if f(mid) <= keep:
                hi = mid
            else:
                lo = mid + 1
    best = min((j for j in (lo - 1, lo) if 0 <= j < len(u)), key=lambda j: (abs(f(j) - keep), j))
    threshold = float(u[best] + u[best - 1]) / 2 if best > 0 else float(u[0]) - 1e-9
    tau = float(np.clip(math.acos(float(np.clip(-threshold, -1.0, 1.0))), _TAU_MIN, _TAU_MAX))
    if tau in (_TAU_MIN, _TAU_MAX):
        logger.warning("the target share %.3g needs a tau at the edge of (0, pi); clipped to %.3g", keep, tau)
    shares = _per_image_shares(chunks, -math.cos(tau))
    q10, q50, q90 = np.quantile(shares, [0.1, 0.5, 0.9])
    return TauCalibration("keep", tau, float(keep), float(shares.mean()), len(chunks),
                          int(sum(c.size for im in chunks for c in im)), -math.cos(tau),
                          {"q10": float(q10), "q50": float(q50), "q90": float(q90)})


def calibrate_tau(vlm: Any, images: Sequence[Any], keep: float = DEFAULT_KEEP, *,
                  progress: bool = False) -> TauCalibration:
    """Label-free calibration: encode each image (no decoding) and choose the tau that keeps `keep` of the image
    tokens on average (tau_for_keep)."""
    from .items import progress as progress_bar

    if not images:
        raise InvalidArgumentError("no calibration images")
    scores = []
    with progress_bar(len(images), desc="encoded", enabled=progress, log=logger) as bar:
        for im in images:
            scores.append(image_scores(vlm, im))
            bar.update(1)
    cal = tau_for_keep(scores, keep)
    logger.info("tau %.4f keeps %.3f of the image tokens on %d images (target %.3f)", cal.tau, cal.kept_share,
                cal.n_images, keep)
    return cal


def list_images(folder: str | os.PathLike) -> list[str]:
    """The image files of a folder (sorted, by extension), for `avis calibrate --images DIR`."""
    from pathlib import Path

    d = Path(folder)
    if not d.is_dir():
        raise InvalidArgumentError(f"{d}: not a folder of images")
    exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    out = sorted(str(p) for p in d.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not out:
        raise InvalidArgumentError(f"{d}: no image files ({', '.join(sorted(exts))})")
    return out


def _paired_ci(diff: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% paired-bootstrap interval of the mean of per-item differences."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))
    means = diff[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def choose_tau_labelled(vlm: Any, items: Sequence[Any], *, keeps: Sequence[float] = DEFAULT_KEEPS,
                        tolerance: float = DEFAULT_TOLERANCE, max_tokens: int = 256, answer_tags: bool = False,
                        seed: int = 0, n_boot: int = 2000, progress: bool = False) -> TauCalibration:
    """Labelled calibration: the largest pruning whose greedy accuracy stays within `tolerance` of unpruned.

    items: items.Item (image, question, options, gold). The images are encoded once (no decoding) to turn each
    target share in `keeps` into a tau (tau_for_keep); then every item is answered greedily unpruned and at each
    tau. Chosen: the smallest share such that it and every larger share tried lose at most `tolerance` accuracy
    against unpruned (mean paired difference; its 95% paired-bootstrap interval is in the table). None passes:
    tau None (do not prune)."""
    from .items import progress as progress_bar
    from .voting import extract_answer, normalize_answer

    if not items:
        raise InvalidArgumentError("no calibration items")
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < 1.0):
        raise InvalidArgumentError(f"tolerance must be in [0, 1), got {tolerance!r}")
    keeps = sorted({float(k) for k in keeps}, reverse=True)
    scores = [item_scores(vlm, it) for it in items]
    cals = [tau_for_keep(scores, k) for k in keeps]
    settings: list[float | None] = [None] + [c.tau for c in cals]
    correct = np.zeros((len(settings), len(items)))
    share = np.zeros((len(settings), len(items)))
    with progress_bar(len(items), desc="tau search", enabled=progress, log=logger) as bar:
        for i, it in enumerate(items):
            opts = list(it.options) or None
            for s, tau in enumerate(settings):
                a = vlm.ask(question=it.question, **it.media(), k=1, options=opts, answer_tags=answer_tags,
                            max_tokens=max_tokens, tau=tau, seed=seed)
                text = a.rollouts[0].text if a.rollouts else ""
                got = extract_answer(text, opts)
                correct[s, i] = float(got is not None and normalize_answer(got, opts) == it.gold)
                share[s, i] = sum(a.kept_tokens) / max(sum(a.image_tokens), 1)
            bar.update(1)
    base = correct[0]
    table = [{"keep": 1.0, "tau": None, "kept_share": float(share[0].mean()), "accuracy": float(base.mean()),
              "diff": 0.0, "diff_ci": [0.0, 0.0], "passes": True}]
    for s, (k, cal) in enumerate(zip(keeps, cals), start=1):
        d = correct[s] - base
        table.append({"keep": k, "tau": cal.tau, "kept_share": float(share[s].mean()),
                      "accuracy": float(correct[s].mean()), "diff": float(d.mean()),
                      "diff_ci": list(_paired_ci(d, n_boot, seed)), "passes": bool(d.mean() >= -tolerance - 1e-12)})
    chosen = 0
    for s in range(1, len(table)):
        if not table[s]["passes"]:
            break
        chosen = s
    row = table[chosen]
    if chosen == 0:
        logger.warning("no pruning tried keeps accuracy within %.3g of unpruned; tau None (no pruning)", tolerance)
    per_image = share[chosen]
    q10, q50, q90 = np.quantile(per_image, [0.1, 0.5, 0.9])
    return TauCalibration("labelled", row["tau"], row["keep"] if chosen else None, float(per_image.mean()),
                          len(items), int(sum(c.size for im in scores for c in im)),
                          None if row["tau"] is None else -math.cos(row["tau"]),
                          {"q10": float(q10), "q50": float(q50), "q90": float(q90)}, float(tolerance), table)


def format_tau_table(cal: TauCalibration) -> str:
    """The calibration as readable text (labelled: the table of tau, kept share and accuracy)."""
    head = (f"tau {cal.tau:.4f} ({cal.method}" if cal.tau is not None else "no pruning (labelled") + (
        f", target share {cal.keep:g}): keeps {cal.kept_share:.3f} of the image tokens on {cal.n_images} images"
        if cal.keep is not None else f"): keeps {cal.kept_share:.3f} on {cal.n_images} images")
    if cal.share_quantiles:
        q = cal.share_quantiles
        head += f" (per image: 10% {q['q10']:.3f}, median {q['q50']:.3f}, 90% {q['q90']:.3f})"
    if not cal.table:
        return head
    lines = [head, f"  tolerance {cal.tolerance:g} (greedy accuracy vs unpruned, paired)",
             f"  {'target':>7s}{'tau':>9s}{'kept':>8s}{'accuracy':>10s}{'vs unpruned (95% CI)':>30s}"]
    for r in cal.table:
        tau = "-" if r["tau"] is None else f"{r['tau']:.4f}"
        lo, hi = r["diff_ci"]
        mark = "  <- chosen" if r["tau"] == cal.tau and (r["tau"] is not None or cal.tau is None) else ""
        lines.append(f"  {r['keep']:7.2f}{tau:>9s}{r['kept_share']:8.3f}{r['accuracy']:10.3f}"
                     f"{r['diff']:+13.3f} ({lo:+.3f} to {hi:+.3f}){'' if r['passes'] else '  fails'}{mark}")
    return "\n".join(lines)
