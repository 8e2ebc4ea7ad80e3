"""The AVIS difficulty predictor: p_hat = P(the single greedy answer is correct) from a query's features.

Two forms:

* `DifficultyPredictor`, a scikit-learn classifier used at calibration time. It standardises the features
  (`features.query_features`: pooled visual-embedding statistics, KDV score statistics, token counts), and
  chooses by stratified cross-validation between a few candidates: L2 logistic regression on all features,
  logistic regression after PCA, and a one-hidden-layer MLP after PCA. Selection minimises the
  cross-validated log-loss (a proper scoring rule: p_hat feeds an accuracy-vs-compute trade-off, so it must be
  calibrated, not only ranked); the simplest candidate within `tol` of the best wins, so the MLP is taken only
  when it clearly helps. AUC and Brier score are recorded next to it.
* `NumpyPredictor`, the same function as plain arrays (scaler mean/scale, optional PCA mean/components,
  dense layers), exported with `DifficultyPredictor.to_numpy()`. Policy files store this form, and
  inference never imports scikit-learn.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["ACTIVATIONS", "CANDIDATES", "DifficultyPredictor", "NumpyPredictor", "binary_metrics"]

logger = logging.getLogger(__name__)

CANDIDATES = ("logreg", "logreg_pca", "mlp")
ACTIVATIONS = ("identity", "relu", "tanh", "logistic")
_EPS = 1e-15


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (what sklearn's expit computes)."""
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def _activate(name: str, z: np.ndarray) -> np.ndarray:
    """Hidden-layer activation, named as in MLPClassifier."""
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    if name == "logistic":
        return _sigmoid(z)
    return z


def _check_matrix(X: Any, n_features: int | None, what: str = "X") -> np.ndarray:
    """2-D finite float64 array with the expected width, or a clear InvalidArgumentError."""
    try:
        arr = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} must be numeric features, got {type(X).__name__} ({e})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidArgumentError(f"{what} must be 2-D (queries x features), got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise InvalidArgumentError(f"{what} has {arr.shape[1]} features per query but the predictor expects "
                                   f"{n_features} (features from another model or FEATURE_VERSION?)")
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(f"{what} contains NaN or infinite values")
    return arr


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """Log-loss, Brier score and ROC AUC (None with a single class) of probabilities p for 0/1 labels y."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    ll = float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
    brier = float(np.mean((p - y) ** 2))
    auc = None
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos and n_neg:
        # Mann-Whitney U with average ranks for ties
        order = np.argsort(p, kind="mergesort")
        ranks = np.empty(len(p))
        sp = p[order]
        i = 0
        while i < len(sp):
            j = i
            while j + 1 < len(sp) and sp[j + 1] == sp[i]:
                j += 1
            ranks[order[i:j + 1]] = (i + j) / 2 + 1
            i = j + 1
        auc = float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return {"log_loss": ll, "brier": brier, "auc": auc}


@dataclass(frozen=True, eq=False)
class NumpyPredictor:
    """The fitted predictor as arrays: standardise -> optional PCA -> dense layers -> sigmoid (numpy only).

    weights[i] has shape (in, out), biases[i] (out,); hidden layers use `activation`, the last layer has one
    output, the logit of P(correct). Logistic regression is a single layer."""

    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    activation: str = "identity"
    kind: str = "logreg"

    def __post_init__(self) -> None:
        f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
        object.__setattr__(self, "scaler_mean", f64(self.scaler_mean).reshape(-1))
        object.__setattr__(self, "scaler_scale", f64(self.scaler_scale).reshape(-1))
        object.__setattr__(self, "weights", tuple(f64(w) for w in self.weights))
        object.__setattr__(self, "biases", tuple(f64(b).reshape(-1) for b in self.biases))
        d = self.scaler_mean.shape[0]
        if d == 0 or self.scaler_scale.shape != (d,):
            raise InvalidArgumentError(f"scaler mean/scale must be equal-length non-empty vectors, got "
                                       f"{self.scaler_mean.shape} and {self.scaler_scale.shape}")
        if np.any(self.scaler_scale == 0) or not np.all(np.isfinite(self.scaler_scale)):
            raise InvalidArgumentError("scaler scale must be finite and non-zero")
        width = d
        if (self.pca_mean is None) != (self.pca_components is None):
            raise InvalidArgumentError("pca_mean and pca_components must be given together")
        if self.pca_components is not None:
            object.__setattr__(self, "pca_mean", f64(self.pca_mean).reshape(-1))
            object.__setattr__(self, "pca_components", f64(self.pca_components))
            if self.pca_mean.shape != (d,) or self.pca_components.ndim != 2 or self.pca_components.shape[1] != d:
                raise InvalidArgumentError(f"PCA mean {self.pca_mean.shape} / components "
                                           f"{self.pca_components.shape} do not fit {d} features")
            width = self.pca_components.shape[0]
        if not self.weights or len(self.weights) != len(self.biases):
            raise InvalidArgumentError("weights and biases must be non-empty and of equal count")
        arrays = [self.scaler_mean, *self.weights, *self.biases]
        if self.pca_components is not None:
            arrays += [self.pca_mean, self.pca_components]
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise InvalidArgumentError("predictor weights contain NaN or infinite values")
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise InvalidArgumentError(f"layer {i}: weight {w.shape} / bias {b.shape} do not take {width} inputs")
            width = w.shape[1]
        if width != 1:
            raise InvalidArgumentError(f"the last layer must have one output (the logit), has {width}")
        if self.activation not in ACTIVATIONS:
            raise InvalidArgumentError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        arrays = [self.scaler_mean, *self.weights, *self.biases]
        if self.pca_components is not None:
            arrays += [self.pca_mean, self.pca_components]
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise InvalidArgumentError("predictor weights contain NaN or infinite values")

    @property
    def n_features(self) -> int:
        """Length of the feature vectors this predictor reads."""
        return int(self.scaler_mean.shape[0])

    def decision_function(self, X: Any) -> np.ndarray:
        """Logit of P(correct) for each row of X."""
        h = (_check_matrix(X, self.n_features) - self.scaler_mean) / self.scaler_scale
        if self.pca_components is not None:
            h = (h - self.pca_mean) @ self.pca_components.T
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = _activate(self.activation, h)
        return h[:, 0]

    def predict_proba(self, X: Any) -> np.ndarray:
        """[P(wrong), P(correct)] per row, like scikit-learn's predict_proba."""
        p = _sigmoid(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def p_correct(self, features: Any) -> float:
        """P(correct) of one query's feature vector."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 1:
            raise InvalidArgumentError(f"features must be one vector, got shape {x.shape}")
        return float(_sigmoid(self.decision_function(x[None, :]))[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Named arrays (what a policy file stores as tensors)."""
        out = {"scaler.mean": self.scaler_mean, "scaler.scale": self.scaler_scale}
        if self.pca_components is not None:
            out["pca.mean"] = self.pca_mean
            out["pca.components"] = self.pca_components
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"layer.{i}.weight"] = w
            out[f"layer.{i}.bias"] = b
        return out


def _candidate_configs(candidates: Sequence[str], Cs: Sequence[float], n_components: int | None,
                       n_features: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, config) per candidate, simplest first; PCA candidates only when PCA reduces the width."""
    pca = n_components is not None and n_components < n_features
    out: list[tuple[str, dict[str, Any]]] = []
    if "logreg" in candidates:
        out += [(f"logreg(C={c:g})", {"kind": "logreg", "C": float(c), "pca": None}) for c in Cs]
    if "logreg_pca" in candidates and pca:
        out += [(f"logreg_pca(n={n_components},C={c:g})", {"kind": "logreg", "C": float(c), "pca": n_components})
                for c in Cs]
    if "mlp" in candidates:
        out.append((f"mlp(pca={n_components if pca else 'none'})", {"kind": "mlp", "pca": n_components if pca else None}))
    return out


def _select_by_cv(configs: list[tuple[str, dict]], X: np.ndarray, y: np.ndarray, n_splits: int, random_state: Any,
                  tol: float, fit: Any) -> tuple[str, dict[str, dict[str, Any]], np.ndarray, str]:
    """Stratified n_splits-fold CV of every candidate (fit(cfg, X, y) -> a fitted model): the simplest candidate
    (first in `configs`) whose out-of-fold log-loss is within tol of the best; returns its label, every
    candidate's metrics, its out-of-fold probabilities and the reason, in words."""
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=random_state).split(X, y))
    oofs: dict[str, np.ndarray] = {}
    scores: dict[str, dict[str, Any]] = {}
    for label, cfg in configs:
        oof = np.empty(len(y))
        for tr, te in folds:
            oof[te] = fit(cfg, X[tr], y[tr]).predict_proba(X[te])[:, 1]
        oofs[label] = oof
        scores[label] = binary_metrics(y, oof)
        logger.debug("predictor candidate %s: %s", label, scores[label])
    best = min(scores, key=lambda k: scores[k]["log_loss"])
    label = next(lbl for lbl, _ in configs if scores[lbl]["log_loss"] <= scores[best]["log_loss"] + tol)
    s = scores[label]
    auc = "n/a" if s["auc"] is None else f"{s['auc']:.3f}"
    reason = (f"{label}: lowest {n_splits}-fold CV log-loss {s['log_loss']:.4f} (AUC {auc}, Brier "
              f"{s['brier']:.4f})" + ("" if label == best else f", the simplest within {tol:g} of the best ({best})"))
    return label, scores, oofs[label], reason


class DifficultyPredictor:
    """scikit-learn classifier of P(greedy answer correct) from query features, choosing its model by CV.

    Parameters (scikit-learn style, stored as given; nothing is computed before `fit`):
      candidates: subset of CANDIDATES, or "auto" for all.
      Cs: inverse L2 strengths tried for the logistic-regression candidates.
      n_components: PCA width, or "auto" = min(32, n_features, smallest CV training fold - 1).
      hidden_layer_sizes, alpha: the MLP candidate (one small hidden layer, L2 alpha, lbfgs solver).
      cv: folds of the stratified selection CV; tol: log-loss margin the simpler candidate is preferred by.
      blas_threads: BLAS / OpenMP threads while fitting (1, the default, is much faster at calibration sizes than
      oversubscribed multi-threading; None leaves the process default).
    Labels are 0/1 correctness; `classes_` is always [0, 1] so predict_proba[:, 1] is P(correct).

    Fitted attributes: pipeline_ (sklearn Pipeline, None for the constant fallback), chosen_ (label),
    selection_ (per-candidate CV metrics and the reason for the choice), oof_proba_ (out-of-fold P(correct)
    of the chosen candidate, None without CV), cv_metrics_, n_features_in_, classes_."""

    _estimator_type = "classifier"

    def __init__(self, candidates: str | Sequence[str] = "auto", Cs: Sequence[float] = (0.01, 0.1, 1.0),
                 n_components: int | str | None = "auto", hidden_layer_sizes: tuple[int, ...] = (32,),
                 alpha: float = 10.0, cv: int = 5, tol: float = 1e-3, max_iter: int = 300,
                 random_state: int | None = 0, blas_threads: int | None = 1) -> None:
        self.candidates = candidates
        self.Cs = Cs
        self.n_components = n_components
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.cv = cv
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.blas_threads = blas_threads

    # -- scikit-learn estimator protocol ------------------------------------------------------------------
    _PARAMS = ("candidates", "Cs", "n_components", "hidden_layer_sizes", "alpha", "cv", "tol", "max_iter",
               "random_state", "blas_threads")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters (scikit-learn protocol)."""
        return {k: getattr(self, k) for k in self._PARAMS}

    def set_params(self, **params: Any) -> "DifficultyPredictor":
        """Set constructor parameters (scikit-learn protocol)."""
        for k, v in params.items():
            if k not in self._PARAMS:
                raise InvalidArgumentError(f"unknown parameter {k!r}; valid: {self._PARAMS}")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != type(self)().get_params()[k]}
        return f"DifficultyPredictor({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def __sklearn_tags__(self) -> Any:  # scikit-learn >= 1.6
        from sklearn.base import BaseEstimator, ClassifierMixin

        class _T(ClassifierMixin, BaseEstimator):
            pass
        return _T().__sklearn_tags__()

    # -- validation ---------------------------------------------------------------------------------------
    def _check_params(self) -> tuple[tuple[str, ...], list[float]]:
        """Validated candidates and Cs (parameters are checked at fit time, as scikit-learn does)."""
        cands = CANDIDATES if self.candidates == "auto" else tuple(self.candidates)
        bad = [c for c in cands if c not in CANDIDATES]
        if bad or not cands:
            raise InvalidArgumentError(f"candidates must be 'auto' or a non-empty subset of {CANDIDATES}, "
                                       f"got {self.candidates!r}")
        Cs = [float(c) for c in self.Cs]
        if not Cs or any(not (c > 0 and math.isfinite(c)) for c in Cs):
            raise InvalidArgumentError(f"Cs must be positive finite numbers, got {self.Cs!r}")
        if not (isinstance(self.cv, int) and self.cv >= 2):
            raise InvalidArgumentError(f"cv must be an int >= 2, got {self.cv!r}")
        nc = self.n_components
        if not (nc is None or nc == "auto" or (isinstance(nc, int) and nc >= 1)):
            raise InvalidArgumentError(f"n_components must be None, 'auto' or an int >= 1, got {nc!r}")
        return cands, Cs

    @staticmethod
    def _check_y(y: Any, n: int) -> np.ndarray:
        """0/1 int labels of length n, or a clear InvalidArgumentError."""
        arr = np.asarray(y)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise InvalidArgumentError(f"y must be a vector of {n} correctness labels, got shape {arr.shape}")
        if arr.dtype == bool:
            return arr.astype(np.int64)
        try:
            f = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"y must hold 0/1 (or bool) correctness labels, got dtype {arr.dtype}") from None
        if not np.all((f == 0) | (f == 1)):
            raise InvalidArgumentError(f"y must hold 0/1 (or bool) correctness labels, got values "
                                       f"{sorted(set(np.unique(f).tolist()))[:5]}")
        return f.astype(np.int64)

    # -- fitting ------------------------------------------------------------------------------------------
    def _make(self, cfg: dict[str, Any]) -> Any:
        """The sklearn Pipeline of one candidate config."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        steps: list[tuple[str, Any]] = [("scale", StandardScaler())]
        if cfg["pca"] is not None:
            steps.append(("pca", PCA(n_components=cfg["pca"], random_state=self.random_state)))
        if cfg["kind"] == "logreg":
            steps.append(("clf", LogisticRegression(C=cfg["C"], max_iter=self.max_iter)))
        else:
            steps.append(("clf", MLPClassifier(hidden_layer_sizes=tuple(self.hidden_layer_sizes), alpha=self.alpha,
                                               solver="lbfgs", max_iter=self.max_iter,
                                               random_state=self.random_state)))
        return Pipeline(steps)

    def _fit_quiet(self, model: Any, X: np.ndarray, y: np.ndarray) -> Any:
        """Fit without ConvergenceWarnings (small CV folds often stop at max_iter; CV log-loss judges them)."""
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.fit(X, y)

    def fit(self, X: Any, y: Any) -> "DifficultyPredictor":
        """Choose a candidate by stratified CV log-loss, then refit it on all of (X, y)."""
        # load sklearn/scipy (and their BLAS / OpenMP runtimes) first: threadpoolctl only limits loaded libraries
        import scipy.optimize  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        import sklearn.neural_network  # noqa: F401
        if self.blas_threads is None:
            return self._fit(X, y)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=int(self.blas_threads)):
            return self._fit(X, y)

    def _fit(self, X: Any, y: Any) -> "DifficultyPredictor":
        """fit's body (runs inside the thread limit)."""
        cands, Cs = self._check_params()
        X = _check_matrix(X, None)
        if X.shape[0] < 2:
            raise InvalidArgumentError(f"need at least 2 labelled queries to fit, got {X.shape[0]}")
        y = self._check_y(y, X.shape[0])
        n, d = X.shape
        n_pos = int(y.sum())
        n_min = min(n_pos, n - n_pos)
        self.n_features_in_ = d
        self.classes_ = np.array([0, 1])
        self.oof_proba_ = None
        self.cv_metrics_ = None
        self.pipeline_ = None
        self.const_p_ = None
        if n_min == 0:
            p = (n_pos + 0.5) / (n + 1.0)
            self.const_p_ = p
            self.chosen_ = "constant"
            self.selection_ = {"reason": f"all {n} labels are {int(n_pos > 0)}: predicting the smoothed base "
                                         f"rate {p:.4f} for every query", "candidates": {}}
            logger.warning("difficulty predictor: %s", self.selection_["reason"])
            return self
        n_splits = min(self.cv, n_min)
        if self.n_components == "auto":
            n_train = n - math.ceil(n / n_splits) if n_splits >= 2 else n
            nc: int | None = max(1, min(32, d, n_train - 1))
        else:
            nc = self.n_components if self.n_components is None else min(int(self.n_components), d, n - 1)
        self.n_components_ = nc
        configs = _candidate_configs(cands, Cs, nc, d)
        if not configs:
            raise InvalidArgumentError(f"no usable candidate among {cands} (PCA needs n_components < {d} features)")
        scores: dict[str, dict[str, Any]] = {}
        if n_splits < 2:
            label, cfg = configs[len(Cs) // 2] if configs[0][1]["kind"] == "logreg" else configs[0]
            reason = f"only {n_min} example(s) of one class: no CV, using {label}"
        else:
            label, scores, oof, reason = _select_by_cv(configs, X, y, n_splits, self.random_state, self.tol,
                                                       lambda cfg, Xt, yt: self._fit_quiet(self._make(cfg), Xt, yt))
            cfg = dict(configs)[label]
            self.oof_proba_ = oof
            self.cv_metrics_ = dict(scores[label], n_folds=n_splits)
        self.pipeline_ = self._fit_quiet(self._make(cfg), X, y)
        self.chosen_ = label
        self.selection_ = {"reason": reason, "candidates": scores, "n_components": nc}
        logger.info("difficulty predictor: %s", reason)
        return self

    # -- inference ----------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        """NotFittedError before fit, as scikit-learn estimators do."""
        if not hasattr(self, "chosen_"):
            from sklearn.exceptions import NotFittedError
            raise NotFittedError("this DifficultyPredictor is not fitted yet; call fit(X, y) first")

    def predict_proba(self, X: Any) -> np.ndarray:
        """[P(wrong), P(correct)] per row."""
        self._check_fitted()
        X = _check_matrix(X, self.n_features_in_)
        if self.pipeline_ is None:
            p = np.full(X.shape[0], self.const_p_)
        else:
            p = self.pipeline_.predict_proba(X)[:, 1]
        return np.column_stack([1.0 - p, p])

    def decision_function(self, X: Any) -> np.ndarray:
        """Logit of P(correct)."""
        p = np.clip(self.predict_proba(X)[:, 1], _EPS, 1 - _EPS)
        return np.log(p) - np.log1p(-p)

    def predict(self, X: Any) -> np.ndarray:
        """1 where P(correct) >= 0.5."""
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(np.int64)

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of `predict` (scikit-learn's ClassifierMixin convention)."""
        self._check_fitted()
        X = _check_matrix(X, self.n_features_in_)
        return float(np.mean(self.predict(X) == self._check_y(y, X.shape[0])))

    def to_numpy(self) -> NumpyPredictor:
        """The fitted pipeline as a NumpyPredictor (same probabilities, no scikit-learn needed)."""
        self._check_fitted()
        d = self.n_features_in_
        if self.pipeline_ is None:
            p = self.const_p_
            return NumpyPredictor(np.zeros(d), np.ones(d), (np.zeros((d, 1)),), (np.array([math.log(p / (1 - p))]),),
                                  kind="constant")
        steps = dict(self.pipeline_.named_steps)
        sc, clf, pca = steps["scale"], steps["clf"], steps.get("pca")
        kw: dict[str, Any] = {}
        if pca is not None:
            if getattr(pca, "whiten", False):
                raise InvalidArgumentError("whitened PCA is not supported by NumpyPredictor")
            kw = {"pca_mean": pca.mean_, "pca_components": pca.components_}
        if hasattr(clf, "coefs_"):
            if clf.out_activation_ != "logistic":
                raise InvalidArgumentError(f"unexpected MLP output activation {clf.out_activation_!r}")
            return NumpyPredictor(sc.mean_, sc.scale_, tuple(clf.coefs_), tuple(clf.intercepts_),
                                  activation=clf.activation, kind="mlp", **kw)
        return NumpyPredictor(sc.mean_, sc.scale_, (clf.coef_.T.copy(),), (clf.intercept_.copy(),),
                              kind="logreg", **kw)
