"""The calibration tool end to end on a tiny random-weight model (answers are junk, the plumbing is real):
item validation, records, resume after an interruption, fit_policy -> policy.gguf -> load_policy -> ask, and
the `calibrate` subcommand."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from avis_llamacpp import VLM
from avis_llamacpp.calibrate import (POLICY_FILE, RECORDS_FILE, REPORT_FILE, accuracy_matrix, cost_matrix,
                                     fit_policy, format_report, load_items, load_records, register_cli,
                                     run_calibration)
from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.features import n_features
from avis_llamacpp.policy import load_policy

N_ITEMS = 5
K_MAX = 3
MAX_TOKENS = 6


def _pil_items(out: Path, n: int) -> Path:
    """A few coloured-shape items drawn with PIL (fallback when convert.shapes_task is unavailable)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        im = Image.new("RGB", (224, 224), "white")
        d = ImageDraw.Draw(im)
        count = int(rng.integers(1, 5))
        for _ in range(count):
            x, y = rng.integers(20, 180, 2)
            d.ellipse([x, y, x + 30, y + 30], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(out / "images" / f"{i}.png")
        lines.append({"id": f"pil-{i}", "image": f"images/{i}.png", "question": "How many circles are there?",
                      "options": ["1", "2", "3", "4"], "answer": "ABCD"[count - 1]})
    path = out / "items.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("items")
    try:
        from convert.shapes_task import export
    except ImportError:
        return _pil_items(out, N_ITEMS)
    return export("calibration", N_ITEMS, out)


@pytest.fixture(scope="module")
def vlm(llava_fixture):
    # one thread: spinning OpenMP barriers make 2-thread runs erratic on a loaded 2-core machine
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=2048, n_seq_max=4, n_threads=1, n_threads_batch=1) as v:
        yield v


class Counting:
    """Proxies a VLM, counting ask() calls; raises KeyboardInterrupt at call number fail_at (an interruption)."""

    def __init__(self, vlm: VLM, fail_at: int | None = None) -> None:
        self.vlm, self.calls, self.fail_at = vlm, 0, fail_at

    def ask(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt
        return self.vlm.ask(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.vlm, name)


def test_item_validation(tmp_path, items):
    loaded = load_items(items)
    assert len(loaded) == N_ITEMS and loaded[0].image.is_file() and loaded[0].gold in "ABCD"
    first_image = items.parent / json.loads(items.read_text().splitlines()[0])["image"]
    (tmp_path / "a.png").write_bytes(first_image.read_bytes())
    base = {"image": "a.png", "question": "q?", "options": ["x", "y"], "answer": "B"}
    bad = {
        "URL": {**base, "image": "https://example.com/a.png"},
        "URL ": {**base, "image": "data:image/png;base64,AAAA"},
        "not found": {**base, "image": "missing.png"},
        "missing field": {k: v for k, v in base.items() if k != "question"},
        "option letters": {**base, "answer": "D"},
    }
    for msg, rec in bad.items():
        p = tmp_path / "bad.jsonl"
        p.write_text(json.dumps(rec) + "\n")
        with pytest.raises(InvalidArgumentError, match=msg.strip()):
            load_items(p)
    p = tmp_path / "dup.jsonl"
    p.write_text("".join(json.dumps({**base, "id": "x"}) + "\n" for _ in range(2)))
    with pytest.raises(InvalidArgumentError, match="duplicate id"):
        load_items(p)
    p.write_text(json.dumps({**base, "answer": "y"}) + "\n")  # option text is normalised to its letter
    assert load_items(p)[0].gold == "B"


def test_calibration_end_to_end(tmp_path, items, vlm, llava_fixture, demo_image):
    out = tmp_path / "cal"
    kw = dict(k_max=K_MAX, max_tokens=MAX_TOKENS, seed=0, progress=False)
    # an interrupted run: the 5th model call (item 2's greedy call is the 5th) fails
    broken = Counting(vlm, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        run_calibration(broken, items, out, **kw)
    lines = (out / RECORDS_FILE).read_text().splitlines()
    assert len(lines) == 2
    # a write cut in half is dropped on resume
    with (out / RECORDS_FILE).open("a") as f:
        f.write(lines[0][: len(lines[0]) // 2])
    counting = Counting(vlm)
    records = run_calibration(counting, items, out, **kw)
    assert counting.calls == 2 * (N_ITEMS - 2)  # only the missing items were run
    assert [r["id"] for r in records] == [it.id for it in load_items(items)]
    assert load_records(out) == records and len((out / RECORDS_FILE).read_text().splitlines()) == N_ITEMS
    again = Counting(vlm)
    assert run_calibration(again, items, out, **kw) == records and again.calls == 0
    with pytest.raises(InvalidArgumentError, match="other settings.*start over with --no-resume"):
        run_calibration(vlm, items, out, **{**kw, "k_max": 5})

    r = records[0]
    assert len(r["features"]) == n_features(64) and len(r["rollouts"]) == K_MAX
    assert {"answer", "correct", "tokens"} <= set(r["greedy"]) and isinstance(r["greedy"]["correct"], bool)
    assert all({"answer", "tokens", "mean_logprob"} <= set(ro) for ro in r["rollouts"])
    assert all(0 <= ro["tokens"] <= MAX_TOKENS for x in records for ro in x["rollouts"])
    assert any(ro["tokens"] > 0 for x in records for ro in x["rollouts"])
    assert r["kept_tokens"][0] <= r["image_tokens"][0] == 196 and r["prompt_tokens"] > 0
    assert r["flops"]["k_max"]["total"] > 0 and r["model"]["model_id"] == vlm.model_id
    # a fresh call reproduces the recorded features (the predictor's input is deterministic)
    it = load_items(items)[0]
    fresh = vlm.ask(str(it.image), it.question, options=list(it.options), max_tokens=1)
    np.testing.assert_allclose(fresh.features, r["features"])

    acc = accuracy_matrix(records, (1, 3))
    assert acc[:, 0].tolist() == [float(x["greedy"]["correct"]) for x in records]
    fl = cost_matrix(records, (1, 3), "flops")
    assert np.all(fl[:, 1] > fl[:, 0]) and np.all(fl > 0)

    policy, report = fit_policy(records, seed=0)
    assert report["ks"] == [1, 3] and report["n_items"] == N_ITEMS and report["cost_unit"] == "flops"
    assert set(report["fixed"]) == {"1", "3"} and "AVIS policy" in format_report(report)
    json.dumps(report)
    path = tmp_path / "policy.gguf"
    policy.save(path)
    loaded = load_policy(path, vlm)  # same model: no warning, sizes fit
    assert loaded.info["model_id"] == vlm.model_id and loaded.info["model_file"] == llava_fixture.model.name
    ans = vlm.ask(demo_image, "How many shapes are there?", policy=loaded, max_tokens=MAX_TOKENS)
    # oracle: the fitted (pre-save) predictor's arrays run forward by hand, and the K map read by hand
    p_hat = _hand_p_hat(policy.predictor, ans.features)
    k = policy.k_map.ks[sum(p_hat >= e for e in policy.k_map.edges)]
    assert ans.p_hat == pytest.approx(p_hat, rel=1e-9)
    assert ans.k == k == len(ans.rollouts)
    if report["predictor"]["chosen"] == "constant":
        # a junk model gets every greedy answer wrong (or right): the predictor is the smoothed base rate
        n_right = sum(x["greedy"]["correct"] for x in records)
        assert ans.p_hat == pytest.approx((n_right + 0.5) / (len(records) + 1))


def _hand_p_hat(pred, x) -> float:
    """standardise -> optional PCA (sklearn's transform: (z - mean) @ components.T) -> dense layers with the
    hidden activation -> logistic, written out independently of predictor.py."""
    act = {"identity": lambda z: z, "relu": lambda z: np.maximum(z, 0), "tanh": np.tanh,
           "logistic": lambda z: 1 / (1 + np.exp(-z))}[pred.activation]
    z = (np.asarray(x, dtype=np.float64) - pred.scaler_mean) / pred.scaler_scale
    if pred.pca_components is not None:
        z = (z - pred.pca_mean) @ pred.pca_components.T
    for i, (w, b) in enumerate(zip(pred.weights, pred.biases)):
        z = z @ w + b
        if i < len(pred.weights) - 1:
            z = act(z)
    return float(1 / (1 + np.exp(-z[0])))


def test_calibrate_subcommand(tmp_path, items, llava_fixture):
    parser = argparse.ArgumentParser(prog="avis")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    out = tmp_path / "cli"
    args = parser.parse_args(["calibrate", "--model", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj),
                              "--items", str(items), "--out", str(out), "--k-max", "3", "--max-tokens", "4",
                              "--limit", "3", "--budget", "2.0", "--cost", "k", "--no-progress", "--quiet",
                              "--n-ctx", "1024", "--threads", "1"])
    assert args.func(args) == 0
    assert len((out / RECORDS_FILE).read_text().splitlines()) == 3
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["budget"] == 2.0 and report["cost_unit"] == "k" and report["policy"]["mean_k"] <= 2.0
    pol = load_policy(out / POLICY_FILE, n_embd=64)
    assert pol.tau is not None and pol.decide(np.zeros(n_features(64)))[0] in (1, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["calibrate", "--model", "m", "--mmproj", "p", "--items", "i", "--out", "o",
                           "--lambda", "0.1", "--budget", "2"])


def test_progress_falls_back_to_logging(tmp_path, items, vlm, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `from tqdm.auto import tqdm` now raises ImportError
    with caplog.at_level(logging.INFO, logger="avis_llamacpp.calibrate"):
        recs = run_calibration(vlm, items, tmp_path / "p", k_max=2, max_tokens=2, limit=2, log_every=1)
    assert len(recs) == 2
    assert "calibrated 1/2 items" in caplog.text and "calibrated 2/2 items" in caplog.text


def _boom(*a, **k):  # pragma: no cover - reached only if a check comes after loading the model
    raise AssertionError("the model was loaded before the arguments were checked")


def test_calibrate_checks_every_knob_before_loading_or_writing(tmp_path, items, llava_fixture, monkeypatch, capsys):
    """`avis calibrate` refuses a bad knob, file or items set in one line, before the model loads, and leaves no
    output folder behind; --rho and --ratio are one flag."""
    from avis_llamacpp import pipeline
    from avis_llamacpp.cli import main

    monkeypatch.setattr(pipeline.VLM, "__init__", _boom)
    out = tmp_path / "calib_out"
    base = ["calibrate", "-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "--items", str(items)]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    png = tmp_path / "shapes.png"
    Image.new("RGB", (8, 8)).save(png)
    cases = [(["--out", str(out), "--ratio", "1.5"], "ratio must satisfy 0 <= ratio < 1"), (["--out", str(out), "--rho", "1.5"], "ratio"),
             (["--out", str(out), "--k-max", "0"], "--k-max must be >= 1"),
             (["--out", str(out), "--max-tokens", "0"], "--max-tokens must be >= 1"),
             (["--out", str(out), "--top-p", "0"], "top_p"), (["--out", str(out), "--budget", "0"], "--budget"),
             (["--out", str(a_file)], "is an existing file"),
             (["--out", str(out), "--tau", "4"], "tau")]
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists(), extra
    bad_items = base[:-1] + [str(png), "--out", str(out)]
    assert main(bad_items) == 2 and "not a UTF-8 JSONL" in capsys.readouterr().err and not out.exists()
    ns = argparse.ArgumentParser()
    sub = ns.add_subparsers()
    register_cli(sub)
    assert ns.parse_args(base + ["--out", "o", "--ratio", "0.5"]).rho == 0.5
    assert ns.parse_args(base + ["--out", "o", "--rho", "0.5"]).rho == 0.5


def test_calibrate_help_is_for_users():
    parser = argparse.ArgumentParser(prog="avis")
    register_cli(parser.add_subparsers())
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    text = sub.choices["calibrate"].format_help()
    assert "run_calibration" not in text and "fit_policy" not in text
    for phrase in ("Items file", '"answer": "B"', "policy.gguf", "avis ask --policy", "--limit 20",
                   "--rho RHO, --ratio RHO", "--answer-tags, --no-answer-tags"):
        assert phrase in text, phrase
