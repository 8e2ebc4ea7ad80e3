"""The AVIS query policy: how much to see (KDV tau or ratio) and how much to think (K rollouts) per query.

K comes from a piecewise-constant map of the difficulty predictor's p_hat (`KMap`), fitted on calibration
data by `fit_k_map`: quantile bins of p_hat, and in each bin the K in {1, 3, 5, 7} that maximises expected
accuracy - lambda * expected compute (or, with a budget, the assignment of K to bins that maximises accuracy
with mean compute <= budget); the number of bins is chosen by cross-validation. Nothing about the shape is
assumed: the paper's inverted U (few rollouts for easy and for hopeless queries) appears only when the
calibration data show it.

A policy is saved as a GGUF file (general.architecture = "avis-policy"): the `NumpyPredictor` arrays as F64
tensors, the K map, pruning, feature spec, model identity and creation info as KV metadata. `load_policy`
reads it with gguf's reader only (no pickle, no scikit-learn).

tau is per model: the share of image tokens a given angle keeps depends on each model's last-block key geometry,
so `avis calibrate` chooses it (calibrate.py) and the policy records how (`AVISPolicy.tau_calibration`; files
written before it have none and keep their tau as it was). `resolve_pruning` turns a query's knobs into the
(ratio, tau) it runs with: tau="auto" means the policy's calibrated tau."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import InvalidArgumentError, PolicyFileError
from .features import FEATURE_VERSION, N_EXTRA, n_features
from .kdv import DEFAULT_TAU
from .predictor import ACTIVATIONS, NumpyPredictor
from .voting import majority_vote

__all__ = ["ARCH", "AUTO_TAU", "FORMAT_VERSION", "K_CHOICES", "AVISPolicy", "FeatureSpec", "KMap",
           "expected_vote_accuracy", "fit_k_map", "load_policy", "read_policy_metadata", "resolve_pruning",
           "save_policy"]

logger = logging.getLogger(__name__)

ARCH = "avis-policy"
FORMAT_VERSION = 1
K_CHOICES: tuple[int, ...] = (1, 3, 5, 7)
_KEY = "avis.policy."
_TIE = 1e-12  # objective differences below this count as ties (-> fewer rollouts)
_ENUM_LIMIT = 250_000  # budget mode: enumerate K assignments up to this many, else a Lagrangian sweep
AUTO_TAU = "auto"  # tau="auto": the policy's calibrated tau (resolve_pruning)
TAU_METHODS = ("keep", "labelled")  # how `avis calibrate` chose a tau (label-free target share, or accuracy)


class _Unset:
    """Marks a keyword the caller did not give (tau's default depends on ratio)."""

    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT: Any = _Unset()


# ------------------------------------------------------------------------------------------------------------
# feature spec and K map
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """Which feature vectors a policy reads: features.FEATURE_VERSION layout for a text model of width n_embd."""

    n_embd: int
    n_features: int
    version: int = FEATURE_VERSION

    @classmethod
    def for_model(cls, n_embd: int) -> "FeatureSpec":
        """The spec of the current feature layout for a model with embedding width n_embd."""
        return cls(int(n_embd), n_features(int(n_embd)), FEATURE_VERSION)

    @classmethod
    def from_length(cls, n: int) -> "FeatureSpec":
        """The spec implied by a feature-vector length (3 * n_embd + N_EXTRA)."""
        if n <= N_EXTRA or (n - N_EXTRA) % 3:
            raise InvalidArgumentError(f"{n} features is not 3 * n_embd + {N_EXTRA} (FEATURE_VERSION {FEATURE_VERSION})")
        return cls.for_model((n - N_EXTRA) // 3)

    def check(self, features: Any) -> np.ndarray:
        """features as a finite float64 vector of this spec's length; PolicyFileError if it is another model's."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 1:
            raise InvalidArgumentError(f"features must be one vector, got shape {x.shape}")
        if x.shape[0] != self.n_features:
            got = f"n_embd {(x.shape[0] - N_EXTRA) // 3}" if (x.shape[0] - N_EXTRA) % 3 == 0 else "an unknown layout"
            raise PolicyFileError(f"the policy reads {self.n_features} features (n_embd {self.n_embd}, feature "
                                  f"version {self.version}) but the query has {x.shape[0]} ({got}): it was "
                                  f"calibrated for another model")
        if not np.all(np.isfinite(x)):
            raise InvalidArgumentError("features contain NaN or infinite values")
        return x


@dataclass(frozen=True)
class KMap:
    """Piecewise-constant p_hat -> K: bin b is [edges[b-1], edges[b]) (interior edges, ascending) and gets ks[b]."""

    edges: tuple[float, ...]
    ks: tuple[int, ...]

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.edges)
        ks = tuple(self.ks)
        if len(ks) != len(edges) + 1:
            raise InvalidArgumentError(f"a K map with {len(edges)} interior edges needs {len(edges) + 1} K values, "
                                       f"got {len(ks)}")
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise InvalidArgumentError(f"K values must be ints >= 1, got {ks}")
        if any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise InvalidArgumentError(f"bin edges must be finite and strictly increasing, got {edges}")
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "ks", tuple(int(k) for k in ks))

    @property
    def n_bins(self) -> int:
        """Number of bins (after merging equal neighbours)."""
        return len(self.ks)

    def bins(self, p: Any) -> np.ndarray:
        """Bin index of each p_hat."""
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), np.asarray(p, dtype=np.float64), side="right")

    def k_for(self, p_hat: float) -> int:
        """K for one p_hat."""
        return self.ks[int(self.bins(float(p_hat)))]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"edges": list(self.edges), "ks": list(self.ks)}

    def __str__(self) -> str:
        bounds = [0.0, *self.edges, 1.0]
        return ", ".join(f"[{lo:.3f},{hi:.3f})->K={k}" for lo, hi, k in zip(bounds, bounds[1:], self.ks))


# ------------------------------------------------------------------------------------------------------------
# expected accuracy of K-rollout majority votes
# ------------------------------------------------------------------------------------------------------------
def expected_vote_accuracy(answers: Sequence[str | None], gold: str, k: int, *,
                           logprobs: Sequence[float] | None = None, n_draws: int = 256,
                           rng: np.random.Generator | None = None) -> float:
    """Probability that a majority vote over k of the recorded rollouts' answers is `gold`.

    Exact (all C(n, k) subsets) when there are at most n_draws subsets, else the mean over n_draws random
    subsets. Votes use `voting.majority_vote`, with the rollouts' mean log-probs when given, so ties break as
    in the pipeline (higher mean log-prob, then lexicographic); without them ties break lexicographically.
    Answers must already be normalised; None abstains (an all-None subset is wrong)."""
    n = len(answers)
    if not (isinstance(k, int) and 1 <= k <= n):
        raise InvalidArgumentError(f"k must be an int in [1, {n}] (the recorded rollouts), got {k!r}")
    lps = [0.0] * n if logprobs is None else [float(x) for x in logprobs]
    if len(lps) != n:
        raise InvalidArgumentError(f"{n} answers but {len(lps)} log-probs")
    if all(a is None for a in answers):
        return 0.0
    if len({a for a in answers}) == 1:
        return float(answers[0] == gold)
    if math.comb(n, k) <= n_draws:
        subsets: Any = itertools.combinations(range(n), k)
    else:
        rng = rng if rng is not None else np.random.default_rng(0)
        subsets = (rng.choice(n, size=k, replace=False) for _ in range(n_draws))
    hits = total = 0
    for sub in subsets:
        v = majority_vote([answers[i] for i in sub], [lps[i] for i in sub])
        hits += v.winner == gold
        total += 1
    return hits / total


# ------------------------------------------------------------------------------------------------------------
# fitting the K map
# ------------------------------------------------------------------------------------------------------------
def _quantile_edges(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Interior edges at the j/n_bins quantiles (data values, deduplicated), so every bin holds data."""
    if n_bins <= 1 or p.size == 0:
        return np.empty(0)
    q = np.quantile(p, np.arange(1, n_bins) / n_bins, method="inverted_cdf")
    q = np.unique(q)
    return q[q > p.min()]


def _bin_tables(b: np.ndarray, n_bins: int, acc: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per bin: item count, mean accuracy and mean cost for each K."""
    counts = np.bincount(b, minlength=n_bins).astype(np.float64)
    a = np.zeros((n_bins, acc.shape[1]))
    c = np.zeros((n_bins, acc.shape[1]))
    np.add.at(a, b, acc)
    np.add.at(c, b, cost)
    nz = counts > 0
    a[nz] /= counts[nz, None]
    c[nz] /= counts[nz, None]
    return counts, a, c


def _first_best(obj: np.ndarray) -> int:
    """Index of the best value, ties (within _TIE) going to the lowest index (fewest rollouts)."""
    return int(np.flatnonzero(obj >= obj.max() - _TIE)[0])


def _choose_lambda(counts: np.ndarray, a: np.ndarray, c: np.ndarray, lam: float) -> list[int]:
    """Per bin, argmax of accuracy - lambda * cost (empty bins: the choice over all items)."""
    w = counts / max(counts.sum(), 1.0)
    overall = _first_best((w[:, None] * (a - lam * c)).sum(axis=0))
    return [(_first_best(a[i] - lam * c[i]) if counts[i] > 0 else overall) for i in range(len(counts))]


def _choose_budget(counts: np.ndarray, a: np.ndarray, c: np.ndarray, budget: float) -> list[int]:
    """The K assignment over bins with the highest accuracy whose mean cost is <= budget (else the cheapest)."""
    nb, nk = a.shape
    w = counts / max(counts.sum(), 1.0)
    if nk ** nb <= _ENUM_LIMIT:
        combos = np.array(list(itertools.product(range(nk), repeat=nb)), dtype=np.int64).reshape(-1, nb)
        acc = (w * a[np.arange(nb), combos]).sum(axis=1)
        cost = (w * c[np.arange(nb), combos]).sum(axis=1)
        ok = cost <= budget + 1e-9
        if not ok.any():
            logger.warning("compute budget %.4g is below the cheapest assignment (%.4g); using it", budget, cost.min())
            return combos[int(np.argmin(cost))].tolist()
        # best accuracy, then lower cost, then fewer rollouts (lexicographic order of the index tuple)
        idx = np.flatnonzero(ok)
        best = acc[idx].max()
        idx = idx[acc[idx] >= best - _TIE]
        idx = idx[cost[idx] <= cost[idx].min() + _TIE]
        return combos[int(idx[0])].tolist()
    # Lagrangian sweep: the feasible solution of max acc - lam * cost with the best accuracy
    best_choice, best_acc = None, -math.inf
    for lam in np.concatenate([[0.0], np.geomspace(1e-6, 1e3, 400)]):
        ch = _choose_lambda(counts, a, c, float(lam))
        cost = float((w * c[np.arange(nb), ch]).sum())
        acc = float((w * a[np.arange(nb), ch]).sum())
        if cost <= budget + 1e-9 and acc > best_acc + _TIE:
            best_choice, best_acc = ch, acc
    return best_choice if best_choice is not None else [int(np.argmin(c[i])) for i in range(nb)]


def _fit_once(p: np.ndarray, acc: np.ndarray, cost: np.ndarray, ks: Sequence[int], n_bins: int,
              lambda_: float | None, budget: float | None) -> KMap:
    """One map: quantile bins of p, each bin's K by the objective, equal neighbours merged."""
    edges = _quantile_edges(p, n_bins)
    nb = len(edges) + 1
    counts, a, c = _bin_tables(np.searchsorted(edges, p, side="right"), nb, acc, cost)
    choice = (_choose_lambda(counts, a, c, lambda_) if lambda_ is not None else _choose_budget(counts, a, c, budget))
    # merge neighbouring bins with the same K (same map, fewer edges)
    kept_edges, kept_ks = [], [ks[choice[0]]]
    for e, j in zip(edges, choice[1:]):
        if ks[j] != kept_ks[-1]:
            kept_edges.append(float(e))
            kept_ks.append(ks[j])
    return KMap(tuple(kept_edges), tuple(int(k) for k in kept_ks))


def _evaluate(km: KMap, p: np.ndarray, acc: np.ndarray, cost: np.ndarray, ks: Sequence[int]) -> tuple[float, float]:
    """Mean accuracy and mean cost of applying km to items with p_hat p."""
    col = np.array([list(ks).index(km.ks[b]) for b in km.bins(p)], dtype=np.int64)
    rows = np.arange(len(p))
    return float(acc[rows, col].mean()), float(cost[rows, col].mean())


def fit_k_map(p_hat: Any, acc: Any, cost: Any, ks: Sequence[int] = K_CHOICES, *, lambda_: float | None = None,
              budget: float | None = None, n_bins: Sequence[int] = (3, 4, 5, 6), cv: int = 5,
              seed: int = 0) -> tuple[KMap, dict[str, Any]]:
    """Fit the p_hat -> K map on calibration items.

    p_hat: (n,) predicted P(correct) per item (use out-of-fold predictions); acc: (n, len(ks)) expected
    accuracy of each item with each K; cost: (n, len(ks)) its compute (mean K, or FLOPs relative to vanilla).
    Exactly one of lambda_ (maximise accuracy - lambda_ * cost) and budget (maximise accuracy with mean cost
    <= budget). The number of quantile bins is picked from n_bins by `cv`-fold CV of the objective (ties: fewer
    bins); the map is then refitted on all items. Returns the map and a description of the fit."""
    ks = [int(k) for k in ks]
    if not ks or sorted(set(ks)) != ks or ks[0] < 1:
        raise InvalidArgumentError(f"ks must be distinct ascending ints >= 1, got {ks}")
    if (lambda_ is None) == (budget is None):
        raise InvalidArgumentError("give exactly one of lambda_ (accuracy - lambda * compute) and budget")
    if lambda_ is not None and not (lambda_ >= 0 and math.isfinite(lambda_)):
        raise InvalidArgumentError(f"lambda_ must be a finite number >= 0, got {lambda_!r}")
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise InvalidArgumentError(f"budget must be a finite number > 0, got {budget!r}")
    p = np.asarray(p_hat, dtype=np.float64).reshape(-1)
    acc = np.asarray(acc, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    n = p.shape[0]
    if n == 0:
        raise InvalidArgumentError("no calibration items")
    if acc.shape != (n, len(ks)) or cost.shape != (n, len(ks)):
        raise InvalidArgumentError(f"acc and cost must have shape ({n}, {len(ks)}), got {acc.shape} and {cost.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(acc)) and np.all(np.isfinite(cost))):
        raise InvalidArgumentError("p_hat, acc and cost must be finite")
    if np.any(acc < 0) or np.any(acc > 1) or np.any(cost < 0):
        raise InvalidArgumentError("acc must lie in [0, 1] and cost be >= 0")
    cands = sorted({int(b) for b in n_bins})
    if not cands or cands[0] < 1:
        raise InvalidArgumentError(f"n_bins must be ints >= 1, got {n_bins!r}")
    n_splits = min(cv, n // 10)
    cv_scores: dict[int, dict[str, float]] = {}
    if len(cands) > 1 and n_splits >= 2:
        rng = np.random.default_rng(seed)
        folds = np.array_split(rng.permutation(n), n_splits)
        for nb in cands:
            a_sum = c_sum = 0.0
            for f in range(n_splits):
                te = folds[f]
                tr = np.concatenate([folds[g] for g in range(n_splits) if g != f])
                km = _fit_once(p[tr], acc[tr], cost[tr], ks, nb, lambda_, budget)
                a, c = _evaluate(km, p[te], acc[te], cost[te], ks)
                a_sum += a * len(te)
                c_sum += c * len(te)
            a_cv, c_cv = a_sum / n, c_sum / n
            obj = a_cv - lambda_ * c_cv if lambda_ is not None else a_cv
            cv_scores[nb] = {"accuracy": a_cv, "cost": c_cv, "objective": obj}
        best = max(v["objective"] for v in cv_scores.values())
        chosen = min(nb for nb, v in cv_scores.items() if v["objective"] >= best - _TIE)
        why = f"{n_splits}-fold CV objective {cv_scores[chosen]['objective']:.4f}"
    else:
        chosen = cands[0]
        why = "too few items for CV" if len(cands) > 1 else "only candidate"
    km = _fit_once(p, acc, cost, ks, chosen, lambda_, budget)
    a_in, c_in = _evaluate(km, p, acc, cost, ks)
    edges = _quantile_edges(p, chosen)
    counts, a_tab, c_tab = _bin_tables(np.searchsorted(edges, p, side="right"), len(edges) + 1, acc, cost)
    bounds = [float(p.min()), *edges.tolist(), float(p.max())]
    bins = [{"p_lo": bounds[i], "p_hi": bounds[i + 1], "n": int(counts[i]), "k": km.k_for(bounds[i]),
             "accuracy_by_k": {str(k): float(a_tab[i, j]) for j, k in enumerate(ks)},
             "cost_by_k": {str(k): float(c_tab[i, j]) for j, k in enumerate(ks)}} for i in range(len(counts))]
    info = {"n_bins": chosen, "n_bins_reason": why, "cv": {str(k): v for k, v in cv_scores.items()},
            "cv_accuracy": cv_scores.get(chosen, {}).get("accuracy"), "cv_cost": cv_scores.get(chosen, {}).get("cost"),
            "accuracy": a_in, "cost": c_in, "quantile_bins": bins, "lambda": lambda_, "budget": budget}
    logger.info("K map: %s (%s)", km, why)
    return km, info


# ------------------------------------------------------------------------------------------------------------
# the policy
# ------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class AVISPolicy:
    """Per query: K from the difficulty predictor's p_hat through the K map; pruning fixed (tau or ratio).

    Implements pipeline.QueryPolicy. tau defaults to pi/4 (the paper's adaptive KDV angle) unless a ratio is
    given; tau=None and ratio=None keeps every visual token. `info` carries the model identity
    (model_id, model_file, mmproj_file), creation info and a calibration summary."""

    predictor: NumpyPredictor
    k_map: KMap
    tau: float | None = _DEFAULT
    ratio: float | None = None
    feature_spec: FeatureSpec | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tau_calibration: dict[str, Any] | None = None  # how tau was chosen for this model (None: not calibrated)

    def __post_init__(self) -> None:
        if self.tau is _DEFAULT:
            self.tau = DEFAULT_TAU if self.ratio is None else None
        if self.tau is not None and self.ratio is not None:
            raise InvalidArgumentError("give a KDV tau or a ratio, not both")
        from .kdv import validate_pruning
        validate_pruning(self.ratio, self.tau)
        tc = self.tau_calibration
        if tc is not None and (not isinstance(tc, dict) or tc.get("method") not in TAU_METHODS):
            raise InvalidArgumentError(f"tau_calibration must be a dict with 'method' in {TAU_METHODS}, got {tc!r}")
        if tc is not None and self.tau is None:
            raise InvalidArgumentError("tau_calibration describes a tau, but the policy prunes by ratio or not at all")
        if not isinstance(self.predictor, NumpyPredictor):
            raise InvalidArgumentError(f"predictor must be a NumpyPredictor (DifficultyPredictor.to_numpy()), "
                                       f"got {type(self.predictor).__name__}")
        if self.feature_spec is None:
            self.feature_spec = FeatureSpec.from_length(self.predictor.n_features)
        if self.feature_spec.n_features != self.predictor.n_features:
            raise InvalidArgumentError(f"feature spec says {self.feature_spec.n_features} features but the predictor "
                                       f"reads {self.predictor.n_features}")

    @property
    def calibrated_tau(self) -> float | None:
        """The tau `avis calibrate` chose for this model, or None (a ratio, no pruning, or a tau never calibrated:
        files written before tau calibration, or a tau given by hand)."""
        return float(self.tau) if self.tau is not None and self.tau_calibration is not None else None

    @property
    def sampling(self) -> dict[str, float] | None:
        """The K > 1 rollouts' sampling the policy was calibrated with ({"temperature", "top_p"}), if recorded: its
        K map holds for that sampling, so a query that gives none decodes with it."""
        s = self.info.get("sampling")
        return {"temperature": float(s["temperature"]), "top_p": float(s["top_p"])} if s else None

    def p_hat(self, features: Any) -> float:
        """Predicted P(single greedy answer correct) for one query's features."""
        return self.predictor.p_correct(self.feature_spec.check(features))

    def decide(self, features: np.ndarray) -> tuple[int, float | None]:
        """K (a plain int) and p_hat for one query's features (pipeline.QueryPolicy)."""
        p = self.p_hat(features)
        return int(self.k_map.k_for(p)), p

    def check_model(self, vlm: Any) -> None:
        """Refuse a model whose features do not fit; warn when calibrated on another model pair."""
        n_embd = int(vlm.model.n_embd_inp)
        if n_features(n_embd) != self.feature_spec.n_features:
            raise PolicyFileError(f"the policy reads {self.feature_spec.n_features} features (n_embd "
                                  f"{self.feature_spec.n_embd}) but this model gives {n_features(n_embd)} "
                                  f"(n_embd {n_embd}): calibrate a policy for this model")
        calibrated = self.info.get("model_id")
        if calibrated and calibrated != vlm.model_id:
            logger.warning("policy was calibrated on another model (%s / %s, id %s...), not %s / %s; its K "
                           "choices may not transfer", self.info.get("model_file"), self.info.get("mmproj_file"),
                           str(calibrated)[:12], Path(vlm.model.path).name, Path(vlm.projector.path).name)

    def save(self, path: str | os.PathLike) -> None:
        """Write this policy as a GGUF policy file."""
        save_policy(self, path)

    def with_tau(self, tau: float, calibration: dict[str, Any]) -> "AVISPolicy":
        """This policy pruning at a tau calibrated for its model (calibration: how it was chosen, with 'method' in
        TAU_METHODS); predictor and K map unchanged."""
        import dataclasses

        return dataclasses.replace(self, tau=float(tau), ratio=None, tau_calibration=dict(calibration))

    def __str__(self) -> str:
        prune_s = (f"tau={self.tau:.4f}" + (f" ({self.tau_calibration['method']})" if self.tau_calibration else "")
                   if self.tau is not None else
                   f"ratio={self.ratio}" if self.ratio is not None else "no pruning")
        return f"AVISPolicy({self.predictor.kind} on {self.feature_spec.n_features} features; {self.k_map}; {prune_s})"


# ------------------------------------------------------------------------------------------------------------
# policy files
# ------------------------------------------------------------------------------------------------------------
def save_policy(policy: AVISPolicy, path: str | os.PathLike) -> None:
    """Write a policy as GGUF: predictor arrays as F64 tensors, everything else as avis.policy.* metadata."""
    import gguf

    from . import __version__

    V = gguf.GGUFValueType
    pred, km, spec = policy.predictor, policy.k_map, policy.feature_spec
    info = dict(policy.info)
    w = gguf.GGUFWriter(os.fspath(path), ARCH)
    w.add_name("avis-policy")
    w.add_uint32(_KEY + "version", FORMAT_VERSION)
    w.add_uint32(_KEY + "feature.version", spec.version)
    w.add_uint32(_KEY + "feature.n_embd", spec.n_embd)
    w.add_uint32(_KEY + "feature.count", spec.n_features)
    # bin bounds including 0 and 1 (so never an empty array), K per bin
    w.add_key_value(_KEY + "k_map.bounds", [0.0, *km.edges, 1.0], V.ARRAY, sub_type=V.FLOAT64)
    w.add_key_value(_KEY + "k_map.ks", list(km.ks), V.ARRAY, sub_type=V.UINT32)
    w.add_string(_KEY + "pruning", "tau" if policy.tau is not None else "ratio" if policy.ratio is not None else "none")
    if policy.tau is not None:
        w.add_float64(_KEY + "tau", float(policy.tau))
    if policy.tau_calibration is not None:
        w.add_string(_KEY + "tau.calibration", json.dumps(policy.tau_calibration, default=float))
    if policy.ratio is not None:
        w.add_float64(_KEY + "ratio", float(policy.ratio))
    w.add_string(_KEY + "predictor.kind", pred.kind)
    w.add_string(_KEY + "predictor.activation", pred.activation)
    w.add_uint32(_KEY + "predictor.n_layers", len(pred.weights))
    w.add_bool(_KEY + "predictor.pca", pred.pca_components is not None)
    for key in ("model_id", "model_file", "mmproj_file"):
        w.add_string(_KEY + key, str(info.pop(key, "") or ""))
    w.add_string(_KEY + "created", str(info.pop("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))))
    w.add_string(_KEY + "creator", str(info.pop("creator", f"avis-llamacpp {__version__}")))
    w.add_string(_KEY + "info", json.dumps(info, default=str))
    for name, arr in pred.arrays().items():
        w.add_tensor("predictor." + name, np.ascontiguousarray(arr, dtype=np.float64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    logger.info("wrote policy %s: %s", path, policy)


def _field_value(f: Any) -> Any:
    """A gguf ReaderField's value (scalar, string or list), decoded by gguf-py itself."""
    if not f.types:
        raise ValueError("field without a type")
    return f.contents()


class _Reader:
    """Typed, error-wrapping access to a policy GGUF's fields and tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        import gguf

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise PolicyFileError(f"{self.path}: no such policy file")
        try:
            r = gguf.GGUFReader(self.path)
            self.fields = {k: v for k, v in r.fields.items()}
            self.tensors = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}
        except PolicyFileError:
            raise
        except Exception as e:  # gguf raises ValueError / struct / mmap errors on garbage
            raise PolicyFileError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _DEFAULT) -> Any:
        """A metadata value of the given type(s) (a tuple with list: an array of the others)."""
        f = self.fields.get(key)
        if f is None:
            if default is _DEFAULT:
                raise PolicyFileError(f"{self.path}: missing metadata {key!r}; not a complete AVIS policy file")
            return default
        try:
            v = _field_value(f)
        except Exception as e:
            raise PolicyFileError(f"{self.path}: unreadable metadata {key!r} ({e})") from e
        items = v if isinstance(v, list) else [v]
        if isinstance(kind, tuple) and list in kind:
            ok = isinstance(v, list) and all(isinstance(x, tuple(k for k in kind if k is not list)) for x in v)
        else:
            ok = not isinstance(v, list) and all(isinstance(x, kind) for x in items)
        if not ok:
            raise PolicyFileError(f"{self.path}: metadata {key!r} has the wrong type ({type(v).__name__})")
        return v

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float64, or PolicyFileError when absent."""
        t = self.tensors.get(name)
        if t is None:
            raise PolicyFileError(f"{self.path}: missing tensor {name!r}")
        return t


def read_policy_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The avis.policy.* metadata and tensor shapes of a policy file (for inspection; validates the header)."""
    r = _Reader(path)
    arch = r.get("general.architecture", str)
    if arch != ARCH:
        raise PolicyFileError(f"{r.path}: general.architecture is {arch!r}, expected {ARCH!r} (not a policy file)")
    meta: dict[str, Any] = {}
    for k, f in r.fields.items():
        if k.startswith(_KEY):
            try:
                meta[k[len(_KEY):]] = _field_value(f)
            except Exception:
                meta[k[len(_KEY):]] = "<unreadable>"
    if isinstance(meta.get("info"), str):
        try:
            meta["info"] = json.loads(meta["info"])
        except json.JSONDecodeError:
            pass
    meta["tensors"] = {k: list(v.shape) for k, v in r.tensors.items()}
    return meta


def load_policy(path: str | os.PathLike, vlm: Any = None, *, n_embd: int | None = None) -> AVISPolicy:
    """Read a GGUF policy file (gguf reader only: no pickle, no scikit-learn).

    With `vlm` (or `n_embd`), a feature size that does not fit the model raises PolicyFileError, and a policy
    calibrated on another model_id logs a warning. Any malformed, foreign, wrong-version or incomplete file
    raises PolicyFileError."""
    r = _Reader(path)
    arch = r.get("general.architecture", str)
    if arch != ARCH:
        raise PolicyFileError(f"{r.path}: general.architecture is {arch!r}, expected {ARCH!r} (not a policy file)")
    version = r.get(_KEY + "version", int)
    if version != FORMAT_VERSION:
        raise PolicyFileError(f"{r.path}: policy format version {version} is not supported (this avis-llamacpp "
                              f"reads version {FORMAT_VERSION}); recalibrate or upgrade")
    fver = r.get(_KEY + "feature.version", int)
    if fver != FEATURE_VERSION:
        raise PolicyFileError(f"{r.path}: calibrated on feature version {fver}, this avis-llamacpp computes "
                              f"version {FEATURE_VERSION}; recalibrate")
    spec = FeatureSpec(r.get(_KEY + "feature.n_embd", int), r.get(_KEY + "feature.count", int), fver)
    if spec.n_features != n_features(spec.n_embd):
        raise PolicyFileError(f"{r.path}: feature count {spec.n_features} does not match n_embd {spec.n_embd}")
    bounds = r.get(_KEY + "k_map.bounds", (list, float, int))
    ks = r.get(_KEY + "k_map.ks", (list, int))
    try:
        if len(bounds) < 2 or bounds[0] != 0.0 or bounds[-1] != 1.0:
            raise InvalidArgumentError(f"bounds {bounds} must start at 0 and end at 1")
        km = KMap(tuple(bounds[1:-1]), tuple(ks))
    except InvalidArgumentError as e:
        raise PolicyFileError(f"{r.path}: bad K map ({e})") from e
    pruning = r.get(_KEY + "pruning", str)
    if pruning not in ("tau", "ratio", "none"):
        raise PolicyFileError(f"{r.path}: unknown pruning mode {pruning!r}")
    tau = float(r.get(_KEY + "tau", (float, int))) if pruning == "tau" else None
    ratio = float(r.get(_KEY + "ratio", (float, int))) if pruning == "ratio" else None
    tau_cal = None  # absent in files written before tau calibration: their tau is kept as it was
    if _KEY + "tau.calibration" in r.fields:
        try:
            tau_cal = json.loads(r.get(_KEY + "tau.calibration", str))
        except json.JSONDecodeError as e:
            raise PolicyFileError(f"{r.path}: avis.policy.tau.calibration is not JSON ({e})") from e
    kind = r.get(_KEY + "predictor.kind", str)
    activation = r.get(_KEY + "predictor.activation", str)
    if activation not in ACTIVATIONS:
        raise PolicyFileError(f"{r.path}: unknown activation {activation!r}")
    n_layers = r.get(_KEY + "predictor.n_layers", int)
    has_pca = r.get(_KEY + "predictor.pca", bool)
    if not 1 <= n_layers <= 64:
        raise PolicyFileError(f"{r.path}: bad layer count {n_layers}")
    try:
        pred = NumpyPredictor(
            r.tensor("predictor.scaler.mean"), r.tensor("predictor.scaler.scale"),
            tuple(r.tensor(f"predictor.layer.{i}.weight") for i in range(n_layers)),
            tuple(r.tensor(f"predictor.layer.{i}.bias") for i in range(n_layers)),
            pca_mean=r.tensor("predictor.pca.mean") if has_pca else None,
            pca_components=r.tensor("predictor.pca.components") if has_pca else None,
            activation=activation, kind=kind)
    except InvalidArgumentError as e:
        raise PolicyFileError(f"{r.path}: inconsistent predictor tensors ({e})") from e
    if pred.n_features != spec.n_features:
        raise PolicyFileError(f"{r.path}: predictor reads {pred.n_features} features, metadata says {spec.n_features}")
    try:
        extra = json.loads(r.get(_KEY + "info", str, "{}"))
    except json.JSONDecodeError as e:
        raise PolicyFileError(f"{r.path}: avis.policy.info is not JSON ({e})") from e
    info = {"model_id": r.get(_KEY + "model_id", str, ""), "model_file": r.get(_KEY + "model_file", str, ""),
            "mmproj_file": r.get(_KEY + "mmproj_file", str, ""), "created": r.get(_KEY + "created", str, ""),
            "creator": r.get(_KEY + "creator", str, ""), **(extra if isinstance(extra, dict) else {})}
    try:
        policy = AVISPolicy(pred, km, tau=tau, ratio=ratio, feature_spec=spec, info=info, tau_calibration=tau_cal)
    except InvalidArgumentError as e:
        raise PolicyFileError(f"{r.path}: {e}") from e
    if n_embd is not None and n_features(int(n_embd)) != spec.n_features:
        raise PolicyFileError(f"{r.path}: the policy reads {spec.n_features} features (n_embd {spec.n_embd}) but the "
                              f"model has n_embd {n_embd} ({n_features(int(n_embd))} features): calibrate a policy "
                              f"for this model")
    if vlm is not None:
        policy.check_model(vlm)
    logger.info("loaded policy %s: %s", r.path, policy)
    return policy


# ------------------------------------------------------------------------------------------------------------
# a query's pruning
# ------------------------------------------------------------------------------------------------------------
_WARNED: set[str] = set()  # warnings already given in this process (each is given once)


def _warn_uncalibrated(tau: float, policy: Any) -> None:
    """The once-per-process warning that adaptive pruning runs at a tau nobody calibrated for this model."""
    key = "no-policy" if policy is None else "uncalibrated-policy"
    if key in _WARNED:
        return
    _WARNED.add(key)
    why = "no policy was given" if policy is None else "the policy's tau was not calibrated for its model"
    logger.warning("adaptive KDV pruning at tau=%.4g, but %s: the share of image tokens a tau keeps differs from "
                   "model to model. Run `avis calibrate --images DIR --out OUT` (or with --items) and pass its "
                   "policy.gguf to choose it for this model", tau, why)


def resolve_pruning(q: Any) -> tuple[float | None, float | None]:
    """(ratio, tau) a query runs with, from its knobs (a QuerySettings, or anything with ratio, tau and policy).

    The caller's ratio or numeric tau wins; tau="auto" is the policy's calibrated tau; neither given: the policy's
    pruning (a policy decides how much to see too), else none. Adaptive pruning whose tau was never calibrated for
    the model (tau="auto" without a calibrated policy, or a policy file written before calibration) warns once
    through logging, naming `avis calibrate`, and applies pi/4 (resp. the policy's tau, as before)."""
    ratio, tau, policy = getattr(q, "ratio", None), getattr(q, "tau", None), getattr(q, "policy", None)
    if isinstance(tau, str):
        if tau != AUTO_TAU:
            raise InvalidArgumentError(f"tau must be an angle in radians (0 < tau < pi) or {AUTO_TAU!r}, got {tau!r}")
        if ratio is not None:
            raise InvalidArgumentError(f"give a KDV ratio or tau={AUTO_TAU!r}, not both")
        calibrated = getattr(policy, "calibrated_tau", None)
        if calibrated is not None:
            return None, float(calibrated)
        _warn_uncalibrated(DEFAULT_TAU, policy)
        return None, DEFAULT_TAU
    if policy is not None and ratio is None and tau is None:
        p_ratio, p_tau = getattr(policy, "ratio", None), getattr(policy, "tau", None)
        if p_tau is not None and getattr(policy, "calibrated_tau", None) is None:
            _warn_uncalibrated(float(p_tau), policy)
        return p_ratio, p_tau
    return ratio, tau
