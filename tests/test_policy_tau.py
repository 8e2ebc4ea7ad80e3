"""A policy records the tau calibrated for its model (issue 31): round trip, files written before it (no
avis.policy.tau.calibration) load and decide as before, fit_policy carries a calibration, and resolve_pruning
(the one place a query's (ratio, tau) is decided) with tau="auto" and its once-only warning."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from avis_llamacpp import policy as policy_mod
from avis_llamacpp.calibrate import fit_policy
from avis_llamacpp.errors import InvalidArgumentError, PolicyFileError
from avis_llamacpp.kdv import DEFAULT_TAU
from avis_llamacpp.options import QuerySettings
from avis_llamacpp.policy import (ARCH, AVISPolicy, KMap, _field_value, load_policy, read_policy_metadata,
                                  resolve_pruning)
from avis_llamacpp.predictor import NumpyPredictor
from tests.test_policy import D, synth_records

CAL = {"method": "keep", "tau": 0.61, "keep": 0.3, "kept_share": 0.301, "n_images": 24, "n_tokens": 1536}


def _policy(**kw) -> AVISPolicy:
    w = np.linspace(-1, 1, D)[:, None]
    pred = NumpyPredictor(np.zeros(D), np.ones(D), (w,), (np.zeros(1),))
    return AVISPolicy(pred, KMap((0.4, 0.6), (1, 3, 5)), info={"model_id": "abc"}, **kw)


def _copy_without(src: Path, dst: Path, drop_key: str) -> None:
    """Copy a policy GGUF leaving one metadata key out (what a file written before that key looks like)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), ARCH)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", drop_key):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, _field_value(f), f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-process warnings afresh."""
    monkeypatch.setattr(policy_mod, "_WARNED", set())


def test_calibrated_tau_round_trips(tmp_path):
    pol = _policy().with_tau(0.61, CAL)
    assert pol.calibrated_tau == pol.tau == 0.61 and pol.ratio is None and "(keep)" in str(pol)
    pol.save(tmp_path / "p.gguf")
    back = load_policy(tmp_path / "p.gguf")
    assert back.calibrated_tau == 0.61 and back.tau_calibration == CAL
    assert read_policy_metadata(tmp_path / "p.gguf")["tau.calibration"]  # stored as JSON text
    x = np.linspace(-3, 3, D)
    assert back.decide(x) == pol.decide(x)


def test_a_file_without_tau_calibration_loads_and_behaves_as_before(tmp_path, fresh_warnings, caplog):
    calibrated = tmp_path / "new.gguf"
    _policy(tau=0.9).with_tau(0.9, {**CAL, "tau": 0.9}).save(calibrated)
    old = tmp_path / "old.gguf"
    _copy_without(calibrated, old, "avis.policy.tau.calibration")
    assert "tau.calibration" not in read_policy_metadata(old)
    pol = load_policy(old)
    assert pol.tau == 0.9 and pol.tau_calibration is None and pol.calibrated_tau is None
    X = np.random.default_rng(0).normal(size=(50, D)) * 3
    assert [pol.decide(x) for x in X] == [_policy(tau=0.9).decide(x) for x in X]
    # its tau still prunes a query that gives none (as before), with one warning that it was never calibrated
    q = QuerySettings(policy=pol)
    with caplog.at_level(logging.WARNING, logger="avis_llamacpp.policy"):
        assert resolve_pruning(q) == (None, 0.9)
        assert resolve_pruning(q) == (None, 0.9)
    assert caplog.text.count("avis calibrate") == 1
    # tau="auto" on it: no calibrated tau, so pi/4 (the same warning family, given once per kind)
    assert resolve_pruning(QuerySettings(policy=pol, tau="auto")) == (None, DEFAULT_TAU)


def test_resolve_pruning(fresh_warnings, caplog):
    cal = _policy().with_tau(0.61, CAL)
    with caplog.at_level(logging.WARNING, logger="avis_llamacpp.policy"):
        # the caller's numbers win; nothing given and no policy: no pruning; none of these warn
        assert resolve_pruning(QuerySettings(tau=0.5, policy=cal)) == (None, 0.5)
        assert resolve_pruning(QuerySettings(ratio=0.75, policy=cal)) == (0.75, None)
        assert resolve_pruning(QuerySettings()) == (None, None)
        assert resolve_pruning(QuerySettings(policy=cal)) == (None, 0.61)
        assert resolve_pruning(QuerySettings(tau="auto", policy=cal)) == (None, 0.61)
        assert resolve_pruning(QuerySettings(policy=_policy(ratio=0.5))) == (0.5, None)
        assert resolve_pruning(QuerySettings(policy=_policy(tau=None))) == (None, None)
        assert caplog.text == ""
        # tau="auto" with nothing calibrated: pi/4, and one warning naming the command
        for _ in range(3):
            assert resolve_pruning(QuerySettings(tau="auto")) == (None, math.pi / 4)
    assert caplog.text.count("WARNING") == 1 and "avis calibrate" in caplog.text
    with pytest.raises(InvalidArgumentError, match="auto"):
        resolve_pruning(type("Q", (), {"ratio": None, "tau": "pi/4", "policy": None})())


def test_query_settings_accept_auto_only():
    assert QuerySettings(tau="auto").tau == "auto"
    with pytest.raises(InvalidArgumentError, match="auto"):
        QuerySettings(tau="automatic")
    with pytest.raises(InvalidArgumentError, match="not both"):
        QuerySettings(tau="auto", ratio=0.5)
    with pytest.raises(InvalidArgumentError):
        QuerySettings(tau=4.0)


def test_bad_tau_calibration_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="method"):
        _policy(tau=0.6, tau_calibration={"method": "guess"})
    with pytest.raises(InvalidArgumentError, match="ratio"):
        _policy(ratio=0.5, tau=None, tau_calibration=CAL)
    good = tmp_path / "good.gguf"
    _policy().with_tau(0.61, CAL).save(good)
    from tests.test_policy import _rewrite

    bad = tmp_path / "bad.gguf"
    _rewrite(good, bad, kv={"avis.policy.tau.calibration": "{not json"})
    with pytest.raises(PolicyFileError, match="tau.calibration"):
        load_policy(bad)


def test_fit_policy_records_the_calibration():
    recs = synth_records(120, seed=1)
    for r in recs:
        r["pruning"] = {"tau": 0.61, "ratio": None}
    pol, report = fit_policy(recs, seed=0, tau_calibration=CAL)
    assert pol.calibrated_tau == 0.61 and report["tau_calibration"] == CAL
    pol2, report2 = fit_policy(recs, seed=0)
    assert pol2.calibrated_tau is None and report2["tau_calibration"] is None and pol2.tau == 0.61
    with pytest.raises(InvalidArgumentError, match="calibrated tau"):
        fit_policy(recs, seed=0, tau_calibration={**CAL, "tau": 0.9})


def test_policy_file_set_tau(tmp_path, capsys):
    import json

    from convert.policy_file import main

    src = tmp_path / "p.gguf"
    _policy(tau=0.9).save(src)
    (tmp_path / "tau.json").write_text(json.dumps({"settings": {}, "calibration": CAL}))
    assert main(["set-tau", str(src), "--calibration", str(tmp_path / "tau.json"),
                 "--out", str(tmp_path / "q.gguf")]) == 0
    pol, before = load_policy(tmp_path / "q.gguf"), load_policy(src)
    assert pol.calibrated_tau == 0.61 and pol.tau_calibration == CAL and before.calibrated_tau is None
    x = np.linspace(-2, 2, D)
    assert pol.decide(x) == before.decide(x) and pol.k_map == before.k_map
    (tmp_path / "bad.json").write_text(json.dumps({"calibration": {**CAL, "tau": None}}))
    assert main(["set-tau", str(src), "--calibration", str(tmp_path / "bad.json"),
                 "--out", str(tmp_path / "r.gguf")]) == 1
    assert "no calibrated tau" in capsys.readouterr().err and not (tmp_path / "r.gguf").exists()


def test_server_avis_body_and_operator_flag_take_auto():
    from avis_llamacpp.server import RequestError, validate_chat_request
    from tests.test_server_guard import LIMITS, _body

    assert validate_chat_request(_body(avis={"tau": "auto"}), LIMITS, 512).overrides == {"tau": "auto"}
    for bad in ({"tau": "Auto!"}, {"tau": "auto", "ratio": 0.5}):
        with pytest.raises(RequestError, match="tau"):
            validate_chat_request(_body(avis=bad), LIMITS, 512)
    from avis_llamacpp.cli_args import parse_tau

    assert parse_tau("auto") == "auto" and parse_tau("pi/4") == pytest.approx(math.pi / 4)
