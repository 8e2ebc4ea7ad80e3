"""benchmarks/video_rollout_paths.py's vote summaries against hand-counted votes, and --rows re-summarising a saved run
(no model: rows are written by hand)."""

from __future__ import annotations

import json

from benchmarks.video_rollout_paths import anchored_vote, main, summarise

# gold A everywhere; clips 1 and 3 greedy right, clip 2 greedy wrong
ROWS = [
    {"id": "c1", "kind": "count", "gold": "A", "greedy": "A", "answers": ["B", "B", "A", "A", "C", "A", "B"]},
    {"id": "c2", "kind": "order", "gold": "A", "greedy": "B", "answers": ["A", "A", "B", "B", "B", "A", "A"]},
    {"id": "c3", "kind": "colour", "gold": "A", "greedy": "A", "answers": ["B", "C", "B", "A", "A", "B", "A"]},
]


def test_anchored_vote_counts_greedy_once_and_wins_its_ties():
    assert anchored_vote("A", ["B", "B"]) == "B"      # two samples outnumber greedy
    assert anchored_vote("A", ["B", "C"]) == "A"      # a three-way tie goes to greedy
    assert anchored_vote("A", ["B", "B", "A"]) == "A"  # 2-2: greedy's answer, though a sample's reached 2 first
    assert anchored_vote(None, ["B"]) == "B"


def test_summary_matches_hand_counted_votes():
    s = summarise([{**r, "traces": ["x", "y"]} for r in ROWS], 7)
    assert s["greedy"] == 0.6667
    # plain vote of the first k samples (ties to the answer that reached the top count first), clips 1 / 2 / 3:
    # k=1: B, A, B; k=3: B (B2), A (A2), B (B2 C1); k=5: B (B2 A2 C1), B (B3 A2), B (B2 A2 C1);
    # k=7: B (B3 A3 C1), A (A4 B3), B (B3 A3 C1)
    assert [s["votes"][f"k={k}"]["accuracy"] for k in (1, 3, 5, 7)] == [0.3333, 0.3333, 0.0, 0.3333]
    # anchored: greedy + the first k-1 samples, ties to greedy. k=3: A+BB -> B, B+AA -> A, A+BC -> A;
    # k=5: A+BBAA -> A, B+AABB -> B, A+BCBA -> A; k=7: A+BBAACA -> A, B+AABBBA -> B, A+BCBAAB -> A
    assert [s["votes"][f"k={k}"]["anchored"]["accuracy"] for k in (3, 5, 7)] == [0.6667, 0.6667, 0.6667]
    assert "anchored" not in s["votes"]["k=1"]
    assert s["votes"]["k=5"]["minus_greedy"] == -0.6667
    assert s["distinct_traces"] == 2.0 and s["any_correct"] == 1.0


def test_rows_resummarises_a_saved_run_and_keeps_its_command(tmp_path, capsys):
    saved = tmp_path / "run.json"
    summary = {name: {"distinct_traces": 3.5} for name in ("all", "listed_kinds", "other_kinds")}
    saved.write_text(json.dumps({"command": "python benchmarks/video_rollout_paths.py --n 2",
                                 "models": {"M": {"summary": summary, "rows": ROWS}}}))
    out = tmp_path / "again.json"
    assert main(["--model-dir", "M", "--rows", str(saved), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["rows_from"] == "python benchmarks/video_rollout_paths.py --n 2"
    s = got["models"]["M"]["summary"]["all"]
    assert s == {**summarise(ROWS, 7), "distinct_traces": 3.5}  # the trace count comes from the saved run
    assert got["models"]["M"]["rows"] == ROWS
    # one subset per question kind, each its own clip: count's k=5 plain vote is B (wrong), order's greedy is wrong
    kinds = {name: v for name, v in got["models"]["M"]["summary"].items() if name.startswith("kind:")}
    assert sorted(kinds) == ["kind:colour", "kind:count", "kind:order"] and all(v["n"] == 1 for v in kinds.values())
    assert kinds["kind:count"]["greedy"] == 1.0 and kinds["kind:count"]["votes"]["k=5"]["accuracy"] == 0.0
    assert kinds["kind:order"]["greedy"] == 0.0 and kinds["kind:order"]["votes"]["k=7"]["accuracy"] == 1.0
    assert "anchored vote" in capsys.readouterr().out
