"""KDV (Key Diversity Visual) token pruning from AVIS, plus Qwen2.5-VL patch/token order helpers.

Scoring (per image, O(N*H*D)):

* per head, every token key is L2-normalised (an all-zero key stays zero);
* the per-head anchor is the mean of those normalised keys, normalised again
  (an all-zero anchor stays zero, so its cosine with anything is 0);
* ``score = -mean_over_heads(cos(key, anchor))``.

A high score means a key that points away from the average key, i.e. a
diverse, non-redundant visual token; KDV keeps high-scoring tokens.

Selection has two modes:

* ratio mode keeps the ``floor((1 - ratio) * N)`` highest scores (at least 1);
* adaptive (tau) mode prunes exactly the tokens with ``score < -cos(tau)``,
  i.e. tokens whose *mean over heads* cosine to the anchor exceeds
  ``cos(tau)``.  Because the mean of per-head cosines is not the cosine of a
  single angle, ``tau`` is an angle only for one head; with several heads it is
  a threshold on the mean cosine.  A larger ``tau`` prunes more tokens.

Qwen2.5-VL order conventions (mirroring llama.cpp ``tools/mtmd``):

* ``merge_groups`` averages keys given in row-major *patch* order over each
  ``merge x merge`` block, giving one row per LLM image token in row-major
  order over the merged grid (the order in which LLM image tokens appear).
* Inside llama.cpp's Qwen2-VL / Qwen2.5-VL vision encoder the patch rows are
  *not* row-major: ``clip_graph_qwen2vl::build`` reorders them so that each
  ``2 x 2`` merge block is ``merge*merge`` consecutive rows (top-left,
  top-right, bottom-left, bottom-right), blocks in row-major order over the
  merged grid; ``merge_consecutive`` averages such blocks.
* With window attention (Qwen2.5-VL, ``n_wa_pattern > 0``) the blocks are
  additionally permuted into window-grouped order before the first layer
  (``ggml_get_rows(inpL, inv_window_idx)``) and restored after the projector
  (``ggml_get_rows(embeddings, window_idx)``).  ``clip.cpp`` builds
  ``window_idx[src] = dst`` and ``inv_window_idx[dst] = src``, where ``src`` is
  a merged cell's row-major index and ``dst`` its position in window-grouped
  order.  ``qwen25vl_window_index`` returns llama.cpp's ``window_idx``;
  ``undo_window_order(x, window_idx)`` is ``x[window_idx]``, i.e.
  ``out[src] = x[window_idx[src]]`` (equivalently
  ``out[inv_window_idx[i]] = x[i]``).  Note that HF transformers'
  ``window_index`` is llama.cpp's ``inv_window_idx``, not its ``window_idx``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol

import numpy as np

from .errors import InvalidArgumentError, SelectorError

__all__ = [
    "DEFAULT_TAU",
    "ImageTokens",
    "KDVSelection",
    "SELECTORS",
    "TokenSelector",
    "angle_to_anchor",
    "apply_window_order",
    "check_kept",
    "kdv_scores",
    "make_selector",
    "merge_consecutive",
    "merge_groups",
    "n_keep_for_ratio",
    "prune",
    "qwen25vl_inv_window_index",
    "qwen25vl_window_index",
    "random_subset",
    "select_tokens",
    "uniform_subset",
    "validate_pruning",
    "undo_window_order",
    "vit_keys_to_token_keys",
]

#: Default adaptive angle (radians) used when neither ratio nor tau is given.
DEFAULT_TAU: float = math.pi / 4

# Absorbs float error in (1 - ratio) * N, e.g. (1 - 0.9) * 20 = 1.9999999999999996.
_RATIO_EPS = 1e-9


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #


def _real(value: Any, name: str) -> float:
    """Return ``value`` as a float, rejecting bools and non-numbers with a named error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _int(value: Any, name: str, minimum: int) -> int:
    """Return ``value`` as an int >= minimum, rejecting bools, floats and smaller values."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    ivalue = int(value)
    if ivalue < minimum:
        raise InvalidArgumentError(f"{name} must be >= {minimum}, got {ivalue}")
    return ivalue


def _float_array(x: Any, name: str) -> np.ndarray:
    """Convert to a float64 array, turning conversion failures into a named InvalidArgumentError."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{name} must be a numeric array: {exc}") from None
    return arr


def _check_scores(scores: Any) -> np.ndarray:
    """Validate KDV scores: finite, 1-D, non-empty; returns float64."""
    s = _float_array(scores, "scores")
    if s.ndim != 1:
        raise InvalidArgumentError(f"scores must be 1-D, got shape {s.shape}")
    if s.size < 1:
        raise InvalidArgumentError("scores must contain at least one token")
    if not np.all(np.isfinite(s)):
        raise InvalidArgumentError("scores must be finite (found NaN or inf)")
    return s


def _check_ratio(ratio: Any) -> float:
    """Validate the pruning ratio: 0 <= ratio < 1."""
    r = _real(ratio, "ratio")
    if not (0.0 <= r < 1.0):
        raise InvalidArgumentError(f"ratio must satisfy 0 <= ratio < 1, got {ratio!r}")
    return r


def _check_tau(tau: Any) -> float:
    """Validate the adaptive angle: 0 < tau < pi."""
    t = _real(tau, "tau")
    if not (0.0 < t < math.pi):
        raise InvalidArgumentError(f"tau must satisfy 0 < tau < pi, got {tau!r}")
    return t


# --------------------------------------------------------------------------- #
# scoring and selection
# --------------------------------------------------------------------------- #


def kdv_scores(keys: np.ndarray) -> np.ndarray:
    """Score each token as minus its mean-over-heads cosine to the per-head mean key (higher = more diverse)."""
    k = _float_array(keys, "keys")
    if k.ndim != 3:
        raise InvalidArgumentError(
            f"keys must have shape [n_tokens, n_heads, d_head], got shape {k.shape}"
        )
    n_tokens, n_heads, d_head = k.shape
    if n_tokens < 1:
        raise InvalidArgumentError("keys must contain at least one token (n_tokens >= 1)")
    if n_heads < 1 or d_head < 1:
        raise InvalidArgumentError(
            f"keys must have n_heads >= 1 and d_head >= 1, got shape {k.shape}"
        )
    if not np.all(np.isfinite(k)):
        raise InvalidArgumentError("keys must be finite (found NaN or inf)")

    # Pre-scale by the max-abs entry so squaring cannot overflow or underflow.
    peak = np.max(np.abs(k), axis=2, keepdims=True)
    k = k / np.where(peak > 0.0, peak, 1.0)
    norms = np.sqrt(np.einsum("nhd,nhd->nh", k, k))[..., None]
    unit = k / np.where(norms > 0.0, norms, 1.0)  # zero keys stay zero

    anchor = unit.mean(axis=0)  # [H, D]
    a_norm = np.sqrt(np.einsum("hd,hd->h", anchor, anchor))[:, None]
    anchor = anchor / np.where(a_norm > 0.0, a_norm, 1.0)  # zero anchor stays zero

    cos = np.einsum("nhd,hd->nh", unit, anchor)
    np.clip(cos, -1.0, 1.0, out=cos)
    return -cos.mean(axis=1)


def n_keep_for_ratio(n_total: int, ratio: float) -> int:
    """Number of tokens ratio mode keeps: max(1, floor((1 - ratio) * n_total)), tolerant to float error."""
    n = _int(n_total, "n_total", 1)
    r = _check_ratio(ratio)
    return min(n, max(1, math.floor((1.0 - r) * n + _RATIO_EPS)))


def select_tokens(
    scores: np.ndarray, ratio: Optional[float] = None, tau: Optional[float] = None
) -> np.ndarray:
    """Return ascending int64 indices of kept tokens, by fixed ratio or adaptive angle (default tau=pi/4)."""
    s = _check_scores(scores)
    if ratio is not None and tau is not None:
        raise InvalidArgumentError("give at most one of ratio and tau, not both")
    if ratio is not None:
        n_keep = n_keep_for_ratio(s.size, ratio)
        # Stable sort on -score: among equal scores the lower index ranks first.
        order = np.argsort(-s, kind="stable")
        kept = np.sort(order[:n_keep])
    else:
        t = DEFAULT_TAU if tau is None else _check_tau(tau)
        threshold = -math.cos(t)
        kept = np.flatnonzero(~(s < threshold))
        if kept.size == 0:
            kept = np.array([int(np.argmax(s))])  # argmax: first index among ties
    return kept.astype(np.int64, copy=False)


def angle_to_anchor(scores: np.ndarray) -> np.ndarray:
    """arccos(-score) per token: an exact angle for one head, a mean-cosine 'angle' for several."""
    s = _float_array(scores, "scores")
    if not np.all(np.isfinite(s)):
        raise InvalidArgumentError("scores must be finite (found NaN or inf)")
    return np.arccos(np.clip(-s, -1.0, 1.0))


@dataclass(frozen=True, eq=False)
class KDVSelection:
    """Result of KDV pruning on one image: kept indices plus summary statistics for logging."""

    kept: np.ndarray
    n_total: int
    n_kept: int
    kept_fraction: float
    mode: str  # "ratio" or "tau"
    param: float  # the ratio or tau that was used
    threshold: float  # tau mode: -cos(tau); ratio mode: lowest kept score
    score_summary: Mapping[str, float] = field(default_factory=dict)
    scores: np.ndarray | None = field(default=None, repr=False)  # every token's score, for features/plots

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (plain ints, floats and lists)."""
        return {
            "kept": [int(i) for i in self.kept],
            "n_total": int(self.n_total),
            "n_kept": int(self.n_kept),
            "kept_fraction": float(self.kept_fraction),
            "mode": self.mode,
            "param": float(self.param),
            "threshold": float(self.threshold),
            "score_summary": {k: float(v) for k, v in self.score_summary.items()},
        }


def _summary(scores: np.ndarray) -> dict[str, float]:
    """min / mean / max / 10-50-90 quantiles of the scores."""
    q10, q50, q90 = np.quantile(scores, [0.1, 0.5, 0.9])
    return {
        "min": float(scores.min()),
        "mean": float(scores.mean()),
        "max": float(scores.max()),
        "q10": float(q10),
        "q50": float(q50),
        "q90": float(q90),
    }


def validate_pruning(ratio: Any = None, tau: Any = None) -> None:
    """Check pruning arguments without any keys: at most one of ratio (0 <= ratio < 1) and tau (0 < tau < pi)."""
    if ratio is not None and tau is not None:
        raise InvalidArgumentError("give at most one of ratio and tau, not both")
    if ratio is not None:
        _check_ratio(ratio)
    if tau is not None:
        _check_tau(tau)


def prune(
    keys: np.ndarray, ratio: Optional[float] = None, tau: Optional[float] = None
) -> KDVSelection:
    """Score keys and select tokens in one call, returning a KDVSelection."""
    if ratio is not None and tau is not None:
        raise InvalidArgumentError("give at most one of ratio and tau, not both")
    scores = kdv_scores(keys)
    kept = select_tokens(scores, ratio=ratio, tau=tau)
    if ratio is not None:
        mode, param = "ratio", _check_ratio(ratio)
        threshold = float(scores[kept].min())
    else:
        mode = "tau"
        param = DEFAULT_TAU if tau is None else _check_tau(tau)
        threshold = -math.cos(param)
    n_total = int(scores.size)
    return KDVSelection(
        kept=kept,
        n_total=n_total,
        n_kept=int(kept.size),
        kept_fraction=kept.size / n_total,
        mode=mode,
        param=param,
        threshold=threshold,
        score_summary=_summary(scores),
        scores=scores,
    )


# --------------------------------------------------------------------------- #
# Qwen2.5-VL patch -> LLM token mapping
# --------------------------------------------------------------------------- #


def _merged_grid(grid_w: Any, grid_h: Any, merge: Any) -> tuple[int, int, int]:
    """Validate a patch grid divisible by merge; return (merged_w, merged_h, merge)."""
    gw = _int(grid_w, "grid_w", 1)
    gh = _int(grid_h, "grid_h", 1)
    m = _int(merge, "merge", 1)
    if gw % m:
        raise InvalidArgumentError(f"grid_w ({gw}) must be a multiple of merge ({m})")
    if gh % m:
        raise InvalidArgumentError(f"grid_h ({gh}) must be a multiple of merge ({m})")
    return gw // m, gh // m, m


def merge_groups(keys_per_patch: np.ndarray, grid_w: int, grid_h: int, merge: int) -> np.ndarray:
    """Average row-major patch rows over each merge x merge block, giving rows in LLM image-token order."""
    pw, ph, m = _merged_grid(grid_w, grid_h, merge)
    x = _float_array(keys_per_patch, "keys_per_patch")
    if x.ndim < 1 or x.shape[0] != grid_w * grid_h:
        raise InvalidArgumentError(
            f"keys_per_patch must have grid_w*grid_h = {grid_w * grid_h} rows, got shape {x.shape}"
        )
    rest = x.shape[1:]
    blocks = x.reshape((ph, m, pw, m) + rest)
    return blocks.mean(axis=(1, 3)).reshape((ph * pw,) + rest)


def merge_consecutive(keys: np.ndarray, merge: int) -> np.ndarray:
    """Average each run of merge*merge consecutive rows (llama.cpp's in-ViT merge-block order)."""
    m = _int(merge, "merge", 1)
    x = _float_array(keys, "keys")
    group = m * m
    if x.ndim < 1 or x.shape[0] % group:
        raise InvalidArgumentError(
            f"keys must have a multiple of merge*merge = {group} rows, got shape {x.shape}"
        )
    rest = x.shape[1:]
    return x.reshape((x.shape[0] // group, group) + rest).mean(axis=1)


def qwen25vl_window_index(
    grid_w: int, grid_h: int, merge: int, window_size_patches: int
) -> np.ndarray:
    """llama.cpp's Qwen2.5-VL ``window_idx``: idx[src] = dst, src row-major merged cell, dst window-grouped slot.

    ``grid_w``/``grid_h`` are in patches, ``window_size_patches`` is the
    attention window in patches (llama.cpp: ``attn_window_size / patch_size``,
    112 px / 14 = 8 by default); the window in merged cells is
    ``window_size_patches // merge``.  Windows are visited row-major, edge
    windows are truncated, and cells inside a window are row-major.
    """
    pw, ph, m = _merged_grid(grid_w, grid_h, merge)
    wsp = _int(window_size_patches, "window_size_patches", 1)
    g = wsp // m
    if g < 1:
        raise InvalidArgumentError(
            f"window_size_patches ({wsp}) must be >= merge ({m}) so a window holds a merged cell"
        )
    y = np.arange(ph)[:, None]
    x = np.arange(pw)[None, :]
    wy, dy = y // g, y % g
    wx, dx = x // g, x % g
    win_h = np.minimum(g, ph - wy * g)
    win_w = np.minimum(g, pw - wx * g)
    # cells in earlier window rows + cells in earlier windows of this row + local row-major offset
    dst = wy * g * pw + win_h * (wx * g) + dy * win_w + dx
    return dst.reshape(-1).astype(np.int64)


def qwen25vl_inv_window_index(
    grid_w: int, grid_h: int, merge: int, window_size_patches: int
) -> np.ndarray:
    """llama.cpp's ``inv_window_idx``: inv[dst] = src (the inverse permutation of window_idx)."""
    idx = qwen25vl_window_index(grid_w, grid_h, merge, window_size_patches)
    inv = np.empty_like(idx)
    inv[idx] = np.arange(idx.size, dtype=np.int64)
    return inv


def _check_permutation(x: np.ndarray, window_index: Any) -> np.ndarray:
    """Validate that window_index is a permutation of range(len(x))."""
    idx = np.asarray(window_index)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise InvalidArgumentError(
            f"window_index must be a 1-D integer array, got dtype {idx.dtype} shape {idx.shape}"
        )
    if x.ndim < 1 or x.shape[0] != idx.size:
        raise InvalidArgumentError(
            f"x must have len(window_index) = {idx.size} rows, got shape {x.shape}"
        )
    if idx.size and not np.array_equal(np.sort(idx), np.arange(idx.size)):
        raise InvalidArgumentError("window_index must be a permutation of range(len(window_index))")
    return idx.astype(np.int64, copy=False)


def undo_window_order(x: np.ndarray, window_index: np.ndarray) -> np.ndarray:
    """Window-grouped rows -> row-major rows: out = x[window_idx] (out[src] = x[window_idx[src]]), as llama.cpp does."""
    arr = np.asarray(x)
    idx = _check_permutation(arr, window_index)
    return arr[idx]


def apply_window_order(x: np.ndarray, window_index: np.ndarray) -> np.ndarray:
    """Row-major rows -> window-grouped rows: out[window_idx[src]] = x[src] (inverse of undo_window_order)."""
    arr = np.asarray(x)
    idx = _check_permutation(arr, window_index)
    out = np.empty_like(arr)
    out[idx] = arr
    return out


def vit_keys_to_token_keys(
    keys: np.ndarray,
    grid_w: int,
    grid_h: int,
    merge: int,
    window_size_patches: Optional[int] = None,
) -> np.ndarray:
    """Map per-patch rows captured inside llama.cpp's Qwen2(.5)-VL ViT to one row per LLM image token.

    The captured rows are merge blocks of ``merge*merge`` consecutive patches,
    in window-grouped block order when window attention is on
    (``window_size_patches`` given) else row-major block order.  Returns
    ``[grid_w*grid_h/merge**2, ...]`` in LLM token order.
    """
    pw, ph, m = _merged_grid(grid_w, grid_h, merge)
    x = _float_array(keys, "keys")
    if x.ndim < 1 or x.shape[0] != grid_w * grid_h:
        raise InvalidArgumentError(
            f"keys must have grid_w*grid_h = {grid_w * grid_h} rows, got shape {x.shape}"
        )
    blocks = merge_consecutive(x, m)
    if window_size_patches is None:
        return blocks
    idx = qwen25vl_window_index(grid_w, grid_h, m, window_size_patches)
    return undo_window_order(blocks, idx)


def random_subset(n_total: int, n_keep: int, seed: int, image_index: int = 0) -> np.ndarray:
    """The random-pruning baseline: n_keep of n_total token indices (ascending), drawn from a generator seeded
    by (seed, image_index) so every image of a query gets its own, reproducible subset."""
    n_total, n_keep = _int(n_total, "n_total", 1), _int(n_keep, "n_keep", 0)
    if n_keep > n_total:
        raise InvalidArgumentError(f"n_keep ({n_keep}) must be <= n_total ({n_total})")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(image_index)])
    return np.sort(rng.choice(n_total, size=n_keep, replace=False)).astype(np.int64)


def uniform_subset(n_total: int, n_keep: int) -> np.ndarray:
    """The uniform-pruning baseline: n_keep token indices evenly spread over n_total (floor(i * n / k))."""
    n_total, n_keep = _int(n_total, "n_total", 1), _int(n_keep, "n_keep", 0)
    if n_keep > n_total:
        raise InvalidArgumentError(f"n_keep ({n_keep}) must be <= n_total ({n_total})")
    return np.floor(np.arange(n_keep) * n_total / max(n_keep, 1)).astype(np.int64)


# --------------------------------------------------------------------------- #
# token selectors: which of an image's tokens to keep, given how many
# --------------------------------------------------------------------------- #

#: The built-in selectors' names (make_selector): KDV and the baselines compared with it.
SELECTORS = ("kdv", "embeddings", "random", "uniform")


@dataclass(frozen=True, eq=False)
class ImageTokens:
    """What a token selector sees of one image: row i of keys / scores / embeddings is scored token i.

    keys: [n, n_heads, d_head] (the last ViT block's keys, or the projected embeddings as one head when the
    family has no key mapping); scores: [n] KDV scores (higher = more diverse); embeddings: [n, n_embd]
    projected embeddings; image_index: the image's place in the prompt (random selectors seed per image)."""

    keys: np.ndarray = field(repr=False)
    scores: np.ndarray = field(repr=False)
    embeddings: np.ndarray = field(repr=False)
    image_index: int = 0

    @property
    def n_tokens(self) -> int:
        """Scored tokens the selector chooses among."""
        return int(self.scores.shape[0])


class TokenSelector(Protocol):
    """Chooses the tokens of one image to keep: ``selector(image, n_keep)`` returns kept indices into
    ``image``'s scored tokens (integers in [0, image.n_tokens), no duplicates, at least one, any order).

    n_keep is what KDV keeps at the query's ratio (or tau): the built-in selectors keep exactly n_keep so the
    baselines compare at the same cost; a user's selector may keep another count. A bad return value raises
    SelectorError (the query fails, the VLM stays usable)."""

    def __call__(self, image: ImageTokens, n_keep: int) -> Any:
        """Kept indices (a sequence or array of ints)."""
        ...


def _top(scores: np.ndarray, n_keep: int) -> np.ndarray:
    """Ascending indices of the n_keep highest scores (among equal scores the lower index first)."""
    return np.sort(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n_keep]).astype(np.int64)


def make_selector(name: str, *, seed: int = 0) -> TokenSelector:
    """The built-in selector `name`: "kdv" (the n_keep highest KDV scores: what prune keeps at the same ratio or
    tau), "embeddings" (KDV scores of the projected embeddings instead of the keys), "random" (seeded by seed and
    the image's index) or "uniform" (evenly spread). Pure functions of their input, so testable without a model."""
    if name == "kdv":
        return lambda image, n_keep: _top(image.scores, n_keep)
    if name == "embeddings":
        return lambda image, n_keep: _top(kdv_scores(np.asarray(image.embeddings)[:, None, :]), n_keep)
    if name == "random":
        seed = _int(seed, "seed", -(2**63))
        return lambda image, n_keep: random_subset(image.n_tokens, n_keep, seed, image.image_index)
    if name == "uniform":
        return lambda image, n_keep: uniform_subset(image.n_tokens, n_keep)
    raise InvalidArgumentError(f"selector must be one of {SELECTORS} or a TokenSelector callable, got {name!r}")


def check_kept(kept: Any, n_total: int) -> np.ndarray:
    """A selector's return value as ascending int64 indices; SelectorError unless it is 1-D integers in
    [0, n_total), without duplicates and not empty (a bad kept set must never reach llama_decode)."""
    try:
        arr = np.asarray(kept)
    except Exception as e:  # noqa: BLE001 - whatever the user's object does, the error is typed
        raise SelectorError(f"the selector returned {type(kept).__name__}, not kept indices ({e})") from None
    if arr.ndim == 1 and arr.size == 0:
        raise SelectorError("the selector kept no token; keep at least one")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise SelectorError(f"the selector must return integer token indices, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise SelectorError(f"the selector must return a 1-D array of indices, got shape {arr.shape}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_total:
        raise SelectorError(f"the selector returned index {lo if lo < 0 else hi}, outside [0, {n_total})")
    out = np.sort(arr.astype(np.int64))
    if np.any(out[1:] == out[:-1]):
        raise SelectorError(f"the selector returned duplicate index {int(out[1:][out[1:] == out[:-1]][0])}")
    return out
