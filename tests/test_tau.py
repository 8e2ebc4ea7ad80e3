"""Choosing tau per model (avis_llamacpp/tau.py): the label-free target-share rule against a brute-force oracle
built on kdv.select_tokens, encode-only calibration (nothing decoded) whose share the real pipeline reproduces,
the held-out acceptance on every native family's fixture, and the labelled search on a scripted model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from avis_llamacpp import VLM
from avis_llamacpp import tau as tau_mod
from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.kdv import select_tokens
from avis_llamacpp.tau import (TauCalibration, calibrate_tau, choose_tau_labelled, format_tau_table, image_scores,
                               mean_kept_share, tau_for_keep)


def _oracle_share(scores, tau: float) -> float:
    """Mean over images of kept / total, each chunk selected by kdv.select_tokens itself."""
    shares = []
    for chunks in scores:
        kept = sum(select_tokens(np.asarray(c), tau=tau).size for c in chunks)
        shares.append(kept / sum(len(c) for c in chunks))
    return float(np.mean(shares))


def _random_scores(rng: np.random.Generator, n_images: int) -> list[list[np.ndarray]]:
    """Images of 1-3 chunks of 5-60 tokens, scores in (-1, 1) with per-image offsets and a few exact ties."""
    out = []
    for _ in range(n_images):
        chunks = []
        for _ in range(int(rng.integers(1, 4))):
            c = np.tanh(rng.normal(rng.uniform(-1, 0.5), rng.uniform(0.05, 0.5), int(rng.integers(5, 61))))
            c[: int(rng.integers(0, 3))] = np.round(c[0], 2)  # ties
            chunks.append(c)
        out.append(chunks)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 0.9])
def test_tau_for_keep_is_the_best_achievable_share(seed, keep):
    scores = _random_scores(np.random.default_rng(seed), 7)
    cal = tau_for_keep(scores, keep)
    got = _oracle_share(scores, cal.tau)
    assert cal.kept_share == pytest.approx(got, abs=1e-12) and cal.method == "keep" and cal.keep == keep
    assert cal.threshold == pytest.approx(-math.cos(cal.tau))
    # oracle: every share any tau can give is reached at a threshold equal to some score (keep scores >= s)
    achievable = {_oracle_share(scores, math.acos(-float(s))) for im in scores for c in im for s in c if -1 < s < 1}
    best = min(abs(a - keep) for a in achievable)
    assert abs(got - keep) <= best + 1e-12
    assert mean_kept_share(scores, cal.tau) == pytest.approx(got, abs=1e-12)


def test_tau_for_keep_validation():
    with pytest.raises(InvalidArgumentError, match="keep"):
        tau_for_keep([[np.zeros(3)]], 0.0)
    with pytest.raises(InvalidArgumentError, match="keep"):
        tau_for_keep([[np.zeros(3)]], 1.5)
    with pytest.raises(InvalidArgumentError, match="no calibration images"):
        tau_for_keep([], 0.3)
    with pytest.raises(InvalidArgumentError, match="NaN"):
        tau_for_keep([[np.array([0.1, np.nan])]], 0.3)


def _images(folder, n: int, seed: int, size: int = 160) -> list:
    """Random-ish pictures: a noisy background of a random colour with 1-5 random ellipses and rectangles."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.integers(0, 255, 3)
        px = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(px)
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 6))):
            x, y = (int(v) for v in rng.integers(0, size - 40, 2))
            w, h = (int(v) for v in rng.integers(15, 40, 2))
            box, fill = [x, y, x + w, y + h], tuple(int(c) for c in rng.integers(0, 255, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
        path = folder / f"{i}.png"
        im.save(path)
        out.append(path)
    return out


def test_label_free_calibration_never_decodes_and_matches_the_pipeline(llava_fixture, tmp_path, monkeypatch):
    images = _images(tmp_path / "img", 4, seed=1)
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_seq_max=1, n_threads=1,
             n_threads_batch=1) as vlm:
        with monkeypatch.context() as m:
            def no_decode(*a, **k):
                raise AssertionError("label-free calibration decoded")
            for obj, name in ((vlm.ctx, "decode_tokens"), (vlm.ctx, "decode_embeddings"), (vlm, "ask"),
                              (vlm, "generate")):
                m.setattr(obj, name, no_decode)
            cal = calibrate_tau(vlm, images, keep=0.3)
        assert cal.n_images == 4 and cal.n_tokens == 4 * 196 and abs(cal.kept_share - 0.3) < 0.02
        # the real query path (encode, KDV at that tau, prefill) keeps the share calibration predicted
        kept = [vlm.ask(p, "What is this?", tau=cal.tau, max_tokens=1) for p in images]
        shares = [a.kept_tokens[0] / a.image_tokens[0] for a in kept]
        assert np.mean(shares) == pytest.approx(cal.kept_share, abs=1e-12)
        # and each image's kept set is the one the encode-only scores give at that tau
        for p, a in zip(images, kept):
            np.testing.assert_array_equal(a.images[0]["kept"], select_tokens(image_scores(vlm, p)[0], tau=cal.tau))


def _native_families() -> list[str]:
    from convert.fixtures import ALL_FAMILIES

    return list(ALL_FAMILIES)


def _noise(n: int, seed: int, size: int = 224) -> list[np.ndarray]:
    """n i.i.d. uniform-noise RGB images: one distribution for the calibration and the held-out set."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("family", _native_families())
def test_label_free_tau_holds_out_on_every_family(family):
    """Acceptance (issue 31): keep 0.3 on calibration images gives a tau whose mean kept share on 24 other images
    of the same kind is within 0.05 of 0.3 (random weights are fine; 24 images because one image's share
    varies by up to 0.13 (sd) on these fixtures, least tokens on lightonocr: 16)."""
    from convert.fixtures import make_fixture

    fx = make_fixture(family, "tiny")
    with VLM(fx.model, fx.mmproj, n_ctx=4096, n_seq_max=1, n_threads=1, n_threads_batch=1) as vlm:
        cal = calibrate_tau(vlm, _noise(24, seed=1), keep=0.3)
        held_share = mean_kept_share([image_scores(vlm, a) for a in _noise(24, seed=2)], cal.tau)
    assert abs(cal.kept_share - 0.3) <= 0.02, (family, cal)
    assert abs(held_share - 0.3) <= 0.05, (family, cal.tau, held_share)


class _ScriptedVLM:
    """A stand-in model for the labelled search: images are names of synthetic score sets; an item is answered
    right unless pruning keeps fewer of its tokens than its `needs` share (so the hand-computed accuracy of each
    tau follows from the scores alone)."""

    def __init__(self, scores: dict[str, np.ndarray], needs: dict[str, float]) -> None:
        self.scores, self.needs, self.calls = scores, needs, []

    def ask(self, image, question, *, k, options, answer_tags, max_tokens, tau, seed):
        s = self.scores[str(image)]
        n_kept = s.size if tau is None else select_tokens(s, tau=tau).size
        self.calls.append((str(image), tau))
        right = n_kept / s.size >= self.needs[str(image)]
        text = "<answer>A</answer>" if right else "<answer>B</answer>"
        return SimpleNamespace(rollouts=[SimpleNamespace(text=text)], kept_tokens=[n_kept], image_tokens=[s.size])


def test_labelled_search_picks_the_largest_pruning_within_tolerance(monkeypatch):
    rng = np.random.default_rng(3)
    names = [f"im{i}" for i in range(40)]
    scores = {n: np.tanh(rng.normal(-0.5, 0.3, 50)) for n in names}
    # 4 of 40 items need half their tokens, 6 more need a fifth: accuracy 1.0 down to 0.9 and 0.75
    needs = {n: (0.5 if i < 4 else 0.2 if i < 10 else 0.0) for i, n in enumerate(names)}
    vlm = _ScriptedVLM(scores, needs)
    monkeypatch.setattr(tau_mod, "image_scores", lambda v, image: [scores[str(image)]])
    items = [SimpleNamespace(image=n, question="q", options=("x", "y"), gold="A", media=lambda n=n: {"image": n})
             for n in names]
    keeps = (0.7, 0.5, 0.3, 0.2, 0.1)
    cal = choose_tau_labelled(vlm, items, keeps=keeps, tolerance=0.1, max_tokens=8)
    # oracle: the accuracy of each share by hand from the same rule, and the expected choice
    taus = {k: tau_for_keep([[scores[n]] for n in names], k).tau for k in keeps}
    acc = {k: np.mean([select_tokens(scores[n], tau=taus[k]).size / 50 >= needs[n] for n in names]) for k in keeps}
    ok = [k for k in sorted(keeps, reverse=True)]
    chosen = None
    for k in ok:
        if acc[k] - 1.0 < -0.1 - 1e-12:
            break
        chosen = k
    assert cal.method == "labelled" and cal.keep == chosen and cal.tau == pytest.approx(taus[chosen])
    rows = {r["keep"]: r for r in cal.table}
    assert rows[1.0]["accuracy"] == 1.0 and rows[1.0]["tau"] is None
    for k in keeps:
        assert rows[k]["accuracy"] == pytest.approx(acc[k]) and rows[k]["diff"] == pytest.approx(acc[k] - 1.0)
        lo, hi = rows[k]["diff_ci"]
        assert lo <= rows[k]["diff"] + 1e-12 and rows[k]["diff"] <= hi + 1e-12
    assert len(vlm.calls) == len(names) * (len(keeps) + 1)
    assert "chosen" in format_tau_table(cal) and f"{cal.tau:.4f}" in format_tau_table(cal)
    # no pruning passes a zero tolerance once an item breaks at the first share: tau None
    strict = choose_tau_labelled(_ScriptedVLM(scores, {n: 0.99 for n in names}), items, keeps=keeps, tolerance=0.0,
                                 max_tokens=8)
    assert strict.tau is None and strict.keep is None and "no pruning" in format_tau_table(strict)


def test_calibration_record_is_json():
    import json

    cal = tau_for_keep([[np.linspace(-1, 0, 20)]], 0.3)
    assert isinstance(cal, TauCalibration) and json.loads(json.dumps(cal.to_dict()))["tau"] == cal.tau


def _run_cli(argv: list[str]) -> int:
    import argparse

    from avis_llamacpp.calibrate import register_cli

    parser = argparse.ArgumentParser(prog="avis")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["calibrate", *argv])
    return args.func(args)


def test_calibrate_cli_label_free_and_labelled(llava_fixture, tmp_path, capsys):
    import json

    from avis_llamacpp.calibrate import POLICY_FILE, TAU_FILE, load_records
    from avis_llamacpp.features import n_features
    from avis_llamacpp.policy import AVISPolicy, KMap, load_policy
    from avis_llamacpp.predictor import NumpyPredictor

    model = ["--model", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "--threads", "1",
             "--threads-batch", "1", "--n-ctx", "1024", "--no-progress", "--quiet"]
    folder = tmp_path / "img"
    paths = _images(folder, 5, seed=4)
    base = tmp_path / "base.gguf"  # a K=1 policy for the fixture's 64-wide text model, to receive the tau
    d = n_features(64)
    AVISPolicy(NumpyPredictor(np.zeros(d), np.ones(d), (np.zeros((d, 1)),), (np.zeros(1),)), KMap((), (1,))).save(base)
    # label-free from a folder: tau.json, and the given policy rewritten with that tau
    assert _run_cli([*model, "--images", str(folder), "--out", str(tmp_path / "free"), "--keep", "0.4",
                     "--policy", str(base)]) == 0
    saved = json.loads((tmp_path / "free" / TAU_FILE).read_text())["calibration"]
    assert saved["method"] == "keep" and saved["keep"] == 0.4
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_seq_max=1, n_threads=1,
             n_threads_batch=1) as vlm:
        share = mean_kept_share([image_scores(vlm, p) for p in paths], saved["tau"])
    assert share == pytest.approx(saved["kept_share"]) and abs(share - 0.4) < 0.02
    pol = load_policy(tmp_path / "free" / POLICY_FILE)
    assert pol.calibrated_tau == pytest.approx(saved["tau"]) and pol.tau_calibration["keep"] == 0.4
    assert "tau " in capsys.readouterr().out
    # items without answers: label-free too
    items = tmp_path / "img" / "items.jsonl"
    items.write_text("".join(json.dumps({"image": p.name, "question": "q?"}) + "\n" for p in paths))
    assert _run_cli([*model, "--items", str(items), "--out", str(tmp_path / "free2"), "--keep", "0.4"]) == 0
    assert json.loads((tmp_path / "free2" / TAU_FILE).read_text())["calibration"]["tau"] == saved["tau"]
    assert not (tmp_path / "free2" / POLICY_FILE).exists()
    # with answers: the labelled search chooses tau, the records are made at it and the policy records it
    labelled = tmp_path / "img" / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"image": p.name, "question": "How many?", "options": ["1", "2"],
                                            "answer": "A"}) + "\n" for p in paths))
    out = tmp_path / "lab"
    assert _run_cli([*model, "--items", str(labelled), "--out", str(out), "--k-max", "2", "--max-tokens", "3",
                     "--limit", "3", "--cost", "k"]) == 0
    cal = json.loads((out / TAU_FILE).read_text())["calibration"]
    assert cal["method"] == "labelled" and len(cal["table"]) == 7 and cal["n_images"] == 3
    recs = load_records(out)
    pol = load_policy(out / POLICY_FILE)
    if cal["tau"] is not None:
        assert all(r["pruning"]["tau"] == cal["tau"] for r in recs) and pol.calibrated_tau == cal["tau"]
    else:
        assert all(r["pruning"]["tau"] is None for r in recs) and pol.tau is None
    assert "tolerance" in capsys.readouterr().out


@pytest.mark.parametrize("extra,msg", [(["--items", "X", "--images", "Y"], "one of them"),
                                       ([], "one of them"),
                                       (["--images", "IMG", "--tau", "0.5"], "only tau"),
                                       (["--images", "IMG", "--keep", "0"], "--keep"),
                                       (["--images", "IMG", "--tolerance", "1.5"], "--tolerance")])
def test_calibrate_cli_refuses_bad_tau_arguments(llava_fixture, tmp_path, extra, msg):
    _images(tmp_path / "img", 1, seed=0)
    extra = [str(tmp_path / "img") if x == "IMG" else x for x in extra]
    with pytest.raises(InvalidArgumentError, match=msg):
        _run_cli(["--model", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "--out",
                  str(tmp_path / "o"), *extra])


def test_tau_auto_through_the_pipeline(llava_fixture, demo_image, monkeypatch, caplog):
    """VLM.ask(tau="auto") prunes at the policy's calibrated tau (the kept set of asking with that number), and
    without a calibrated policy at pi/4 after one warning naming `avis calibrate`."""
    import logging

    from avis_llamacpp import policy as policy_mod
    from avis_llamacpp.features import n_features
    from avis_llamacpp.policy import AVISPolicy, KMap
    from avis_llamacpp.predictor import NumpyPredictor

    monkeypatch.setattr(policy_mod, "_WARNED", set())
    d = n_features(64)
    base = AVISPolicy(NumpyPredictor(np.zeros(d), np.ones(d), (np.zeros((d, 1)),), (np.zeros(1),)), KMap((), (1,)))
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_seq_max=1, n_threads=1,
             n_threads_batch=1) as vlm:
        cal = calibrate_tau(vlm, [demo_image], keep=0.4)
        pol = base.with_tau(cal.tau, cal.to_dict())
        auto = vlm.ask(demo_image, "What is this?", tau="auto", policy=pol, max_tokens=1)
        given = vlm.ask(demo_image, "What is this?", tau=cal.tau, max_tokens=1)
        assert auto.images[0]["kept"] == given.images[0]["kept"]
        assert auto.kept_tokens[0] / 196 == pytest.approx(cal.kept_share) and abs(cal.kept_share - 0.4) < 0.01
        with caplog.at_level(logging.WARNING, logger="avis_llamacpp.policy"):
            plain = [vlm.ask(demo_image, "What is this?", tau="auto", max_tokens=1) for _ in range(2)]
        pi4 = vlm.ask(demo_image, "What is this?", tau=math.pi / 4, max_tokens=1)
    assert plain[0].images[0]["kept"] == plain[1].images[0]["kept"] == pi4.images[0]["kept"]
    assert caplog.text.count("avis calibrate") == 1
