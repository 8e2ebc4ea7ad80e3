"""training/choose_temperature: scores calibration runs by K-vote accuracy and picks the best temperature."""

from __future__ import annotations

import json

from training.choose_temperature import choose, main, score_run


def _run(path, temperature, rollout_answers, gold="A", greedy_ok=True):
    path.mkdir()
    (path / "calibration.json").write_text(json.dumps({"temperature": temperature, "top_p": 0.9, "tau": 0.785}))
    recs = [{"id": f"i{i}", "gold": gold, "greedy": {"correct": greedy_ok},
             "rollouts": [{"answer": a, "correct": a == gold, "mean_logprob": 0.0} for a in answers]}
            for i, answers in enumerate(rollout_answers)]
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_scores_by_hand_and_choice(tmp_path, capsys):
    # all seven rollouts right: every K votes right; all wrong: every K votes wrong
    good = _run(tmp_path / "t07", 0.7, [["A"] * 7, ["A"] * 7])
    bad = _run(tmp_path / "t10", 1.0, [["B"] * 7, ["A"] * 7])
    s_good, s_bad = score_run(good), score_run(bad)
    assert s_good["accuracy_by_k"] == {"1": 1.0, "3": 1.0, "5": 1.0, "7": 1.0} and s_good["score"] == 1.0
    assert s_bad["accuracy_by_k"]["7"] == 0.5 and s_bad["score"] == 0.5 and s_bad["temperature"] == 1.0
    assert choose([s_bad, s_good]) is s_good
    tie = _run(tmp_path / "t03", 0.3, [["A"] * 7, ["A"] * 7])
    assert choose([s_good, score_run(tie)])["temperature"] == 0.3  # ties go to the lower temperature
    # item 0: greedy right, majority B (breaks it); item 1: greedy right, majority A
    assert s_bad["voting"] == {"greedy": 1.0, "sampled_rollout": 0.5, "majority_fixes_greedy_errors": None,
                               "majority_breaks_greedy_successes": 0.5, "any_rollout_right": 0.5}
    fix = score_run(_run(tmp_path / "t05", 0.5, [["A", "A", "B", "B", "A", "C", "D"]], greedy_ok=False))
    assert fix["voting"]["majority_fixes_greedy_errors"] == 1.0 and fix["voting"]["sampled_rollout"] == round(3 / 7, 4)
    out = tmp_path / "choice.json"
    assert main([str(bad), str(good), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["chosen"] == 0.7 and "<- chosen" in capsys.readouterr().out
