"""K map fitting (the inverted U must come from the data), expected vote accuracy, AVISPolicy.decide and
GGUF policy files (round trip; malformed, foreign, wrong-version, incomplete and mismatched files)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avis_llamacpp import VLM
from avis_llamacpp.calibrate import accuracy_matrix, cost_matrix, fit_policy
from avis_llamacpp.errors import InvalidArgumentError, PolicyFileError
from avis_llamacpp.features import n_features
from avis_llamacpp.kdv import DEFAULT_TAU
from avis_llamacpp.predictor import DifficultyPredictor, NumpyPredictor
from avis_llamacpp.policy import (ARCH, AVISPolicy, FeatureSpec, KMap, _field_value, expected_vote_accuracy,
                                  fit_k_map, load_policy, read_policy_metadata, save_policy)
from avis_llamacpp.voting import majority_vote

N_EMBD = 4
D = n_features(N_EMBD)  # 23
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------
# synthetic calibration records
# ------------------------------------------------------------------------------------------------------------
def _q_tiers(p: float) -> float:
    """Single-rollout accuracy: hopeless below 0.3 (votes spread over 4 options), mid, easy above 0.7."""
    return 0.1 if p < 0.3 else 0.55 if p < 0.7 else 0.99


def synth_records(n: int = 500, seed: int = 0, q_of_p=_q_tiers, k_max: int = 7, greedy_right=None) -> list[dict]:
    """Records like run_calibration's: per item a latent p (feature 0 tracks it), k_max sampled answers that are
    right with probability q(p) and otherwise spread uniformly over the 3 wrong letters, a greedy answer drawn
    the same way (or always right / wrong when greedy_right is given)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = float(rng.uniform())
        q = q_of_p(p)

        def draw() -> str:
            return "A" if rng.uniform() < q else str(rng.choice(list("BCD")))

        feats = rng.normal(size=D)
        feats[0] = 4 * p + 0.3 * rng.normal()
        g = draw() if greedy_right is None else "A" if greedy_right else "B"
        out.append({"id": f"s{i}", "gold": "A", "features": feats.tolist(), "p": p,
                    "greedy": {"answer": g, "correct": g == "A"},
                    "rollouts": [{"answer": draw(), "mean_logprob": float(-rng.uniform())} for _ in range(k_max)]})
    return out


def _unimodal(ks: tuple[int, ...]) -> bool:
    peak = ks.index(max(ks))
    return all(a <= b for a, b in zip(ks[:peak], ks[1:peak + 1])) and all(a >= b for a, b in zip(ks[peak:], ks[peak + 1:]))


@pytest.fixture(scope="module")
def tiers():
    recs = synth_records()
    p = np.array([r["p"] for r in recs])
    return recs, p, accuracy_matrix(recs), cost_matrix(recs)


# ------------------------------------------------------------------------------------------------------------
# expected vote accuracy
# ------------------------------------------------------------------------------------------------------------
def test_expected_vote_accuracy_exact_and_tie_breaks():
    ans = ["A", "A", "B"]
    assert expected_vote_accuracy(ans, "A", 1) == pytest.approx(2 / 3)
    assert expected_vote_accuracy(ans, "A", 3) == 1.0
    # pairs: AA -> A; two A/B ties. Without log-probs ties go lexicographically (A), with them to the better one
    assert expected_vote_accuracy(ans, "A", 2) == 1.0
    assert expected_vote_accuracy(ans, "A", 2, logprobs=[-1.0, -1.0, -0.1]) == pytest.approx(1 / 3)
    assert expected_vote_accuracy(ans, "A", 2, logprobs=[-0.1, -0.1, -1.0]) == 1.0
    # the same answer as the pipeline's vote over the full set
    lps = [-0.5, -0.2, -0.9, -0.1, -0.3]
    five = ["B", "C", "B", "C", None]
    assert expected_vote_accuracy(five, majority_vote(five, lps).winner, 5, logprobs=lps) == 1.0
    assert expected_vote_accuracy([None, None, None], "A", 3) == 0.0
    with pytest.raises(InvalidArgumentError, match="k must be"):
        expected_vote_accuracy(ans, "A", 4)


def test_expected_vote_accuracy_sampled_is_deterministic_and_close():
    rng = np.random.default_rng(5)
    ans = [str(x) for x in rng.choice(list("ABCD"), size=11, p=[0.4, 0.2, 0.2, 0.2])]
    exact = expected_vote_accuracy(ans, "A", 5, n_draws=10**6)  # C(11, 5) = 462 subsets
    a = expected_vote_accuracy(ans, "A", 5, n_draws=300, rng=np.random.default_rng(0))
    b = expected_vote_accuracy(ans, "A", 5, n_draws=300, rng=np.random.default_rng(0))
    assert a == b and abs(a - exact) < 0.08


# ------------------------------------------------------------------------------------------------------------
# the K map
# ------------------------------------------------------------------------------------------------------------
def test_inverted_u_emerges_from_the_data(tiers):
    recs, p, acc, cost = tiers
    # voting helps the mid tier only; more rollouts hurt the hopeless tier (spread votes)
    mid, hopeless, easy = (p >= 0.3) & (p < 0.7), p < 0.3, p >= 0.7
    assert acc[mid, 3].mean() > acc[mid, 0].mean() + 0.15
    assert acc[hopeless, 3].mean() < acc[hopeless, 0].mean() + 0.02
    assert acc[easy, 3].mean() < acc[easy, 0].mean() + 0.03
    km, info = fit_k_map(p, acc, cost, lambda_=0.01, seed=0)
    assert _unimodal(km.ks), km
    assert km.ks[0] < max(km.ks) and km.ks[-1] < max(km.ks) and max(km.ks) >= 5, km
    assert km.k_for(0.05) == 1 and km.k_for(0.97) == 1 and km.k_for(0.5) >= 5
    assert info["n_bins"] in (3, 4, 5, 6) and set(info["cv"]) == {"3", "4", "5", "6"}
    assert info["accuracy"] > acc[:, 0].mean() + 0.05  # better than K=1 everywhere
    assert info["cost"] < 7


def test_no_inverted_u_without_the_data(tiers):
    recs, p, acc, cost = tiers
    km, _ = fit_k_map(p, acc, cost, lambda_=1.0)  # compute far too expensive
    assert set(km.ks) == {1} and km.n_bins == 1
    easy = synth_records(300, seed=1, q_of_p=lambda p: 0.97, greedy_right=True)
    pe = np.array([r["p"] for r in easy])
    km_easy, _ = fit_k_map(pe, accuracy_matrix(easy), cost_matrix(easy), lambda_=0.01)
    assert set(km_easy.ks) == {1}
    # monotone difficulty where voting always helps: more rollouts for harder items, no U
    mono = synth_records(400, seed=2, q_of_p=lambda p: 0.45 + 0.5 * p)
    pm = np.array([r["p"] for r in mono])
    km_mono, _ = fit_k_map(pm, accuracy_matrix(mono), cost_matrix(mono), lambda_=0.01)
    assert list(km_mono.ks) == sorted(km_mono.ks, reverse=True) and km_mono.ks[0] > 1, km_mono


def test_budget_mode(tiers):
    recs, p, acc, cost = tiers
    km, info = fit_k_map(p, acc, cost, budget=3.0)
    assert info["cost"] <= 3.0 + 1e-9 and info["budget"] == 3.0
    fixed3 = acc[:, 1].mean()
    assert info["accuracy"] > fixed3  # spending the same mean K adaptively beats K=3 everywhere
    km1, info1 = fit_k_map(p, acc, cost, budget=1.0)
    assert set(km1.ks) == {1}
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        fit_k_map(p, acc, cost, lambda_=0.1, budget=2.0)
    with pytest.raises(InvalidArgumentError, match="shape"):
        fit_k_map(p, acc[:, :2], cost, lambda_=0.01)


def test_k_map_semantics_and_validation():
    km = KMap((0.2, 0.6), (1, 7, 3))
    assert [km.k_for(x) for x in (0.0, 0.19, 0.2, 0.59, 0.6, 1.0)] == [1, 1, 7, 7, 3, 3]
    assert all(type(k) is int for k in km.ks)
    with pytest.raises(InvalidArgumentError):
        KMap((0.6, 0.2), (1, 3, 1))
    with pytest.raises(InvalidArgumentError):
        KMap((0.5,), (1,))
    with pytest.raises(InvalidArgumentError):
        KMap((), (0,))


def test_fit_policy_end_to_end_on_synthetic_records(tiers):
    recs = tiers[0]
    pol, rep = fit_policy(recs, lambda_=0.01, seed=0, predictor_params={"cv": 3})
    assert rep["cost_unit"] == "k" and rep["predictor"]["held_out"]["auc"] > 0.75
    assert _unimodal(pol.k_map.ks) and pol.k_map.ks[0] < max(pol.k_map.ks) > pol.k_map.ks[-1]
    assert rep["policy"]["accuracy"] > rep["fixed"]["1"]["accuracy"]
    assert rep["policy"]["mean_k"] < 7 and pol.tau == DEFAULT_TAU
    k, p_hat = pol.decide(np.array(recs[0]["features"]))
    assert type(k) is int and k in (1, 3, 5, 7) and 0 < p_hat < 1


# ------------------------------------------------------------------------------------------------------------
# AVISPolicy and policy files
# ------------------------------------------------------------------------------------------------------------
def _fitted_policy(kind: str, **kw) -> AVISPolicy:
    recs = synth_records(160, seed=3)
    X = np.array([r["features"] for r in recs])
    y = np.array([r["greedy"]["correct"] for r in recs])
    cands = {"logreg": ["logreg"], "pca": ["logreg_pca"], "mlp": ["mlp"]}[kind]
    pred = DifficultyPredictor(candidates=cands, n_components=6, cv=3).fit(X, y).to_numpy()
    return AVISPolicy(pred, KMap((0.3, 0.55, 0.8), (1, 5, 7, 3)), info={"model_id": "abc", "model_file": "m.gguf",
                                                                          "mmproj_file": "p.gguf"}, **kw)


@pytest.mark.parametrize("kind,prune", [("logreg", {}), ("pca", {"ratio": 0.5}), ("mlp", {"tau": None})])
def test_policy_file_round_trip(tmp_path, kind, prune):
    pol = _fitted_policy(kind, **prune)
    path = tmp_path / "policy.gguf"
    pol.save(path)
    back = load_policy(path)
    assert (back.tau, back.ratio) == (pol.tau, pol.ratio)
    assert back.k_map == pol.k_map and back.feature_spec == pol.feature_spec
    assert back.info["model_id"] == "abc" and back.info["model_file"] == "m.gguf" and back.info["created"]
    X = np.random.default_rng(0).normal(size=(200, D)) * 2
    X[:, 0] = np.linspace(-1, 5, 200)
    before = [pol.decide(x) for x in X]
    after = [back.decide(x) for x in X]
    assert before == after  # same K and bit-identical p_hat (F64 tensors)
    assert len({k for k, _ in before}) > 1
    meta = read_policy_metadata(path)
    assert meta["version"] == 1 and meta["feature.count"] == D and meta["k_map.ks"] == [1, 5, 7, 3]
    assert meta["tensors"]["predictor.scaler.mean"] == [D]


def test_policy_defaults_and_validation():
    pred = NumpyPredictor(np.zeros(D), np.ones(D), (np.zeros((D, 1)),), (np.zeros(1),))
    km = KMap((), (3,))
    assert AVISPolicy(pred, km).tau == DEFAULT_TAU
    assert AVISPolicy(pred, km, ratio=0.5).tau is None
    with pytest.raises(InvalidArgumentError, match="not both"):
        AVISPolicy(pred, km, tau=0.5, ratio=0.5)
    with pytest.raises(InvalidArgumentError):
        AVISPolicy(pred, km, ratio=1.5)
    with pytest.raises(InvalidArgumentError, match="feature spec"):
        AVISPolicy(pred, km, feature_spec=FeatureSpec.for_model(8))
    pol = AVISPolicy(pred, km)
    assert pol.decide(np.zeros(D)) == (3, 0.5)
    with pytest.raises(PolicyFileError, match="another model"):
        pol.decide(np.zeros(n_features(8)))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        pol.decide(np.full(D, np.nan))


def _rewrite(src: Path, dst: Path, *, drop_tensor: str | None = None, kv: dict | None = None,
             arch: str | None = None) -> None:
    """Copy a policy GGUF with one tensor dropped and/or metadata values replaced (same value types)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or ARCH)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = (kv or {}).get(key, _field_value(f))
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, val, f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name != drop_tensor:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_policy_files_raise_policy_file_error(tmp_path, llava_fixture):
    good = tmp_path / "good.gguf"
    _fitted_policy("pca").save(good)
    cases = {
        "missing": (tmp_path / "nope.gguf", "no such"),
        "garbage": (tmp_path / "garbage.gguf", "not a readable GGUF"),
        "empty": (tmp_path / "empty.gguf", "not a readable GGUF"),
        "truncated": (tmp_path / "trunc.gguf", "not a readable GGUF"),
        "model": (llava_fixture.model, "architecture"),
        "arch": (tmp_path / "arch.gguf", "architecture"),
        "version": (tmp_path / "v2.gguf", "version 2 is not supported"),
        "feature_version": (tmp_path / "fv.gguf", "feature version 9"),
        "tensor": (tmp_path / "notensor.gguf", "missing tensor 'predictor.pca.components'"),
        "layers": (tmp_path / "layers.gguf", "missing tensor 'predictor.layer.1.weight'"),
        "kmap": (tmp_path / "kmap.gguf", "bad K map"),
        "count": (tmp_path / "count.gguf", "does not match n_embd"),
    }
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "trunc.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _rewrite(good, tmp_path / "arch.gguf", arch="llama")
    _rewrite(good, tmp_path / "v2.gguf", kv={"avis.policy.version": 2})
    _rewrite(good, tmp_path / "fv.gguf", kv={"avis.policy.feature.version": 9})
    _rewrite(good, tmp_path / "notensor.gguf", drop_tensor="predictor.pca.components")
    _rewrite(good, tmp_path / "layers.gguf", kv={"avis.policy.predictor.n_layers": 2})
    _rewrite(good, tmp_path / "kmap.gguf", kv={"avis.policy.k_map.ks": [1, 3, 7]})
    _rewrite(good, tmp_path / "count.gguf", kv={"avis.policy.feature.count": D + 1})
    for name, (path, msg) in cases.items():
        with pytest.raises(PolicyFileError, match=msg):
            load_policy(path)
    assert load_policy(good).k_map.ks == (1, 5, 7, 3)  # the source itself is fine
    with pytest.raises(PolicyFileError, match="n_embd 64"):
        load_policy(good, n_embd=64)


def test_policy_against_a_model(tmp_path, llava_fixture, demo_image, caplog):
    d = n_features(64)
    assert FeatureSpec.for_model(64).n_features == d
    pred = NumpyPredictor(np.zeros(d), np.ones(d), (np.zeros((d, 1)),), (np.zeros(1),))  # p_hat = 0.5
    pol = AVISPolicy(pred, KMap((0.3, 0.7), (1, 3, 1)), info={"model_id": "someone-else", "model_file": "x.gguf"})
    path = tmp_path / "p.gguf"
    save_policy(pol, path)
    small = tmp_path / "small.gguf"
    _fitted_policy("logreg").save(small)
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_threads=1, n_threads_batch=1) as vlm:
        assert vlm.model.n_embd_inp == 64
        with pytest.raises(PolicyFileError, match="calibrate a policy for this model"):
            load_policy(small, vlm)
        with caplog.at_level(logging.WARNING, logger="avis_llamacpp.policy"):
            loaded = load_policy(path, vlm)
        assert "calibrated on another model" in caplog.text and "x.gguf" in caplog.text
        ans = vlm.ask(demo_image, "How many shapes?", policy=loaded, max_tokens=4, seed=1)
        assert ans.k == 3 and len(ans.rollouts) == 3 and ans.p_hat == 0.5
        assert ans.kept_tokens[0] < ans.image_tokens[0]  # the policy's tau pruned


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _hand_k(edges, ks, p: float) -> int:
    """K of the bin holding p: bins are [0, e1), [e1, e2), ..., [e_last, 1]."""
    return ks[sum(p >= e for e in edges)]


def test_k_follows_p_hat_the_right_way_round():
    """An asymmetric K map (low p_hat -> 1, middle -> 7, high -> 3) and a predictor whose p_hat is
    sigmoid(feature 0): each query gets the K of its own p_hat's bin, not of 1 - p_hat's."""
    w = np.zeros((D, 1))
    w[0, 0] = 1.0
    pred = NumpyPredictor(np.zeros(D), np.ones(D), (w,), (np.zeros(1),))
    edges, ks = (0.3, 0.7), (1, 7, 3)
    pol = AVISPolicy(pred, KMap(edges, ks))
    for p in (0.02, 0.1, 0.29, 0.31, 0.5, 0.69, 0.71, 0.9, 0.98):
        x = np.zeros(D)
        x[0] = _logit(p)
        k, p_hat = pol.decide(x)
        assert p_hat == pytest.approx(p, abs=1e-12)
        assert k == _hand_k(edges, ks, p), (p, k)
    # the ends differ, so reading the map from the wrong side cannot pass
    assert _hand_k(edges, ks, 0.1) != _hand_k(edges, ks, 0.9)


def test_policy_direction_through_the_pipeline(llava_fixture, demo_image):
    """In a real query: a predictor that reads only the question-length feature (log1p of its characters),
    p_hat = sigmoid(4 * (log1p(len(q)) - log1p(20))), computed here by hand; a short question is 'hard'
    (K = 1), a long one 'easy' (K = 3), one of 20 characters sits in the middle (K = 2)."""
    d = n_features(64)
    w = np.zeros((d, 1))
    w[d - 1, 0] = 4.0  # the last feature: log1p(question characters)
    pred = NumpyPredictor(np.zeros(d), np.ones(d), (w,), (np.array([-4.0 * math.log1p(20)]),))
    edges, ks = (0.3, 0.7), (1, 2, 3)
    pol = AVISPolicy(pred, KMap(edges, ks))
    questions = ["Shapes?", "How many shapes now?", "Looking at every part of this picture carefully, "
                 "how many distinct coloured shapes can you count in total?"]
    assert len(questions[1]) == 20
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_threads=1, n_threads_batch=1) as vlm:
        for q, want_k in zip(questions, (1, 2, 3)):
            p = 1 / (1 + math.exp(-4.0 * (math.log1p(len(q)) - math.log1p(20))))
            assert _hand_k(edges, ks, p) == want_k
            ans = vlm.ask(demo_image, q, policy=pol, max_tokens=2, seed=1)
            assert ans.p_hat == pytest.approx(p, rel=1e-9)
            assert ans.k == want_k == len(ans.rollouts), (q, p, ans.k)


def test_loading_a_policy_does_not_import_sklearn(tmp_path):
    path = tmp_path / "p.gguf"
    _fitted_policy("mlp").save(path)
    code = ("import sys, numpy as np; from avis_llamacpp.policy import load_policy; "
            f"p = load_policy({str(path)!r}); k, ph = p.decide(np.zeros({D})); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'; print(k, ph)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    k, p = out.stdout.split()
    assert int(k) in (1, 3, 5, 7) and 0 < float(p) < 1 and math.isfinite(float(p))


def test_policy_with_nan_weights_is_refused(tmp_path):
    import gguf

    path = tmp_path / "nan.gguf"
    _fitted_policy("pca").save(path)
    r = gguf.GGUFReader(path, "r+")
    t = next(t for t in r.tensors if t.name == "predictor.layer.0.weight")
    t.data.reshape(-1)[0] = np.nan
    del r
    with pytest.raises(PolicyFileError, match="NaN"):
        load_policy(path)


def test_policy_decodes_with_its_calibration_sampling(tmp_path, llava_fixture, demo_image):
    """A policy calibrated at another temperature samples its K > 1 rollouts at that temperature (saved in the
    file); K = 1 stays greedy; a caller's own sampling wins."""
    from avis_llamacpp import SamplingParams
    from avis_llamacpp.policy import load_policy

    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_threads=1, n_threads_batch=1) as vlm:
        d = n_features(vlm.model.n_embd_inp)
        pred = NumpyPredictor(np.zeros(d), np.ones(d), (np.zeros((d, 1)),), (np.zeros(1),))
        path = tmp_path / "p.gguf"
        AVISPolicy(pred, KMap((), (3,)), tau=None, info={"sampling": {"temperature": 1.7, "top_p": 0.5}}).save(path)
        pol = load_policy(path, vlm)
        assert pol.sampling == {"temperature": 1.7, "top_p": 0.5}
        kw = dict(max_tokens=6, seed=5)
        by_policy = vlm.ask(demo_image, "Describe.", policy=pol, **kw)
        explicit = vlm.ask(demo_image, "Describe.", k=3, sampling=SamplingParams(temperature=1.7, top_p=0.5), **kw)
        default = vlm.ask(demo_image, "Describe.", k=3, **kw)
        assert by_policy.k == 3 and [r.tokens for r in by_policy.rollouts] == [r.tokens for r in explicit.rollouts]
        assert [r.tokens for r in default.rollouts] != [r.tokens for r in explicit.rollouts]
        caller = vlm.ask(demo_image, "Describe.", policy=pol, sampling=SamplingParams(temperature=0.7, top_p=0.9),
                         **kw)
        assert [r.tokens for r in caller.rollouts] == [r.tokens for r in default.rollouts]
        greedy_pol = AVISPolicy(pred, KMap((), (1,)), tau=None, info={"sampling": {"temperature": 1.7, "top_p": 0.5}})
        assert vlm.ask(demo_image, "Describe.", policy=greedy_pol, **kw).tokens == \
            vlm.ask(demo_image, "Describe.", **kw).tokens
