"""Difficulty predictor: CV model choice, scikit-learn conventions, input validation, and numpy inference equal
to scikit-learn's predict_proba for every candidate kind."""

from __future__ import annotations

import numpy as np
import pytest

from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.features import n_features
from avis_llamacpp.predictor import DifficultyPredictor, NumpyPredictor, binary_metrics

D = n_features(8)  # 35 features, the layout of an n_embd = 8 model


def _data(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features where a few directions (one nonlinear) drive P(correct)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, D))
    logit = 1.5 * X[:, 0] - X[:, 1] + 0.8 * X[:, 2] * X[:, 3]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return X, y


@pytest.mark.parametrize("candidates,kind", [(["logreg"], "logreg"), (["logreg_pca"], "logreg"), (["mlp"], "mlp")])
def test_numpy_inference_equals_sklearn(candidates, kind):
    X, y = _data()
    m = DifficultyPredictor(candidates=candidates, n_components=8, cv=3).fit(X, y)
    npred = m.to_numpy()
    assert npred.kind == kind and npred.n_features == D
    assert (npred.pca_components is not None) == (candidates != ["logreg"])
    X_new = np.random.default_rng(1).normal(size=(50, D)) * 3
    np.testing.assert_allclose(npred.predict_proba(X_new), m.predict_proba(X_new), rtol=0, atol=1e-12)
    assert npred.p_correct(X_new[0]) == pytest.approx(m.predict_proba(X_new[:1])[0, 1], abs=1e-12)
    np.testing.assert_allclose(npred.predict_proba(X_new).sum(axis=1), 1.0)


def test_cv_selection_is_recorded_and_informative():
    X, y = _data()
    m = DifficultyPredictor(cv=3).fit(X, y)
    sel = m.selection_
    assert m.chosen_ in sel["candidates"] and m.chosen_ in sel["reason"]
    assert any(k.startswith("mlp") for k in sel["candidates"]) and any("pca" in k for k in sel["candidates"])
    best = min(v["log_loss"] for v in sel["candidates"].values())
    assert sel["candidates"][m.chosen_]["log_loss"] <= best + m.tol
    assert m.oof_proba_.shape == (len(y),) and m.cv_metrics_["auc"] > 0.65  # held-out, better than chance
    assert list(m.classes_) == [0, 1] and m.n_features_in_ == D
    assert m.predict(X).shape == (len(y),) and 0.5 < m.score(X, y) <= 1.0


def test_sklearn_conventions():
    from sklearn.base import clone, is_classifier
    from sklearn.exceptions import NotFittedError

    m = DifficultyPredictor(Cs=(0.1,), cv=3)
    params = m.get_params()
    assert params["Cs"] == (0.1,) and params["cv"] == 3
    assert is_classifier(m)
    with pytest.raises(NotFittedError):
        m.predict_proba(np.zeros((1, D)))
    c = clone(m)
    assert c.get_params() == params and not hasattr(c, "chosen_")
    X, y = _data(120)
    m.fit(X, y)
    assert m.get_params() == params  # fitting leaves the parameters alone
    assert c.set_params(cv=4).cv == 4
    with pytest.raises(InvalidArgumentError, match="unknown parameter"):
        c.set_params(nope=1)
    # deterministic given random_state
    m2 = DifficultyPredictor(Cs=(0.1,), cv=3).fit(X, y)
    np.testing.assert_array_equal(m.predict_proba(X), m2.predict_proba(X))


def test_input_validation_messages():
    X, y = _data(60)
    m = DifficultyPredictor(candidates=["logreg"], cv=3)
    with pytest.raises(InvalidArgumentError, match="0/1"):
        m.fit(X, np.arange(60) % 3)
    with pytest.raises(InvalidArgumentError, match="vector of 60"):
        m.fit(X, y[:-1])
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        m.fit(bad, y)
    with pytest.raises(InvalidArgumentError, match="candidates"):
        DifficultyPredictor(candidates=["forest"]).fit(X, y)
    with pytest.raises(InvalidArgumentError, match="Cs"):
        DifficultyPredictor(Cs=(0.0,)).fit(X, y)
    m.fit(X, y.astype(bool))
    with pytest.raises(InvalidArgumentError, match=f"expects {D}"):
        m.predict_proba(np.zeros((2, D + 1)))
    with pytest.raises(InvalidArgumentError, match=f"expects {D}"):
        m.to_numpy().predict_proba(np.zeros((2, D - 3)))


def test_single_class_falls_back_to_a_constant():
    X, _ = _data(30)
    m = DifficultyPredictor().fit(X, np.zeros(30, dtype=int))
    assert m.chosen_ == "constant" and "base rate" in m.selection_["reason"]
    p = m.predict_proba(X)[:, 1]
    assert np.allclose(p, p[0]) and 0 < p[0] < 0.05
    np.testing.assert_allclose(m.to_numpy().predict_proba(X), m.predict_proba(X), atol=1e-12)
    # one example of the minority class: no CV possible, still fits
    y = np.zeros(30, dtype=int)
    y[0] = 1
    m1 = DifficultyPredictor().fit(X, y)
    assert m1.oof_proba_ is None and "no CV" in m1.selection_["reason"]


def test_numpy_predictor_validates_shapes():
    d = 5
    good = dict(scaler_mean=np.zeros(d), scaler_scale=np.ones(d), weights=(np.zeros((d, 1)),), biases=(np.zeros(1),))
    NumpyPredictor(**good)
    with pytest.raises(InvalidArgumentError, match="one output"):
        NumpyPredictor(**{**good, "weights": (np.zeros((d, 2)),), "biases": (np.zeros(2),)})
    with pytest.raises(InvalidArgumentError, match="layer 0"):
        NumpyPredictor(**{**good, "weights": (np.zeros((d + 1, 1)),)})
    with pytest.raises(InvalidArgumentError, match="non-zero"):
        NumpyPredictor(**{**good, "scaler_scale": np.zeros(d)})
    with pytest.raises(InvalidArgumentError, match="together"):
        NumpyPredictor(**good, pca_mean=np.zeros(d))
    with pytest.raises(InvalidArgumentError, match="activation"):
        NumpyPredictor(**good, activation="swish")


def test_binary_metrics_match_sklearn():
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = np.clip(np.round(rng.random(200), 2), 0.01, 0.99)  # ties on purpose
    m = binary_metrics(y, p)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["log_loss"] == pytest.approx(log_loss(y, p))
    assert binary_metrics(np.ones(4), np.full(4, 0.9))["auc"] is None
