"""Pick the K > 1 sampling temperature from calibration runs (calibration split only, never test).

    for T in 0.3 0.5 0.7 1.0; do
        avis calibrate -m M --mmproj P --items /tmp/cal400/items.jsonl --out /tmp/cal-T$T --k-max 7 \
            --answer-tags --max-tokens 96 --temperature $T --threads 1
    done
    python -m training.choose_temperature /tmp/cal-T0.3 /tmp/cal-T0.5 /tmp/cal-T0.7 /tmp/cal-T1.0 --out choice.json

Each run records greedy plus seven sampled rollouts per item; the score of a temperature is the mean expected
majority-vote accuracy at K = 3, 5 and 7 (votes of K of the seven recorded rollouts, calibrate.accuracy_matrix).
The highest score wins; a tie goes to the lower temperature. Each run also reports why voting helps or not
(vote_diagnostics: sampled-rollout accuracy against greedy, errors the majority fixes, successes it breaks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from avis_llamacpp.calibrate import RECORDS_FILE, SETTINGS_FILE, accuracy_matrix
from avis_llamacpp.items import read_records

KS = (1, 3, 5, 7)


def score_run(run_dir: Path) -> dict:
    """Temperature, item count and greedy / K-vote accuracies of one calibration run folder."""
    settings = json.loads((run_dir / SETTINGS_FILE).read_text())
    records = list(read_records(run_dir / RECORDS_FILE))
    acc = accuracy_matrix(records, KS, seed=0).mean(axis=0)
    by_k = {str(k): round(float(a), 4) for k, a in zip(KS, acc)}
    return {"run": str(run_dir), "temperature": settings.get("temperature", 0.7), "top_p": settings.get("top_p", 0.9),
            "n_items": len(records), "accuracy_by_k": by_k, "score": round(float(np.mean(acc[1:])), 4),
            "tau": settings.get("tau"), "ratio": settings.get("ratio"), "voting": vote_diagnostics(run_dir)}


def vote_diagnostics(run_dir: Path) -> dict:
    """Why voting helps or not, from one run's records: how often a sampled rollout is right (against greedy), how
    often the majority of all k_max rollouts fixes a greedy error or breaks a greedy success, any-rollout-right."""
    from collections import Counter

    records = list(read_records(run_dir / RECORDS_FILE))
    wrong = [r for r in records if not r["greedy"]["correct"]]
    right = [r for r in records if r["greedy"]["correct"]]

    def majority_right(r: dict) -> bool:
        return Counter(ro["answer"] for ro in r["rollouts"]).most_common(1)[0][0] == r["gold"]

    def share(flags: list[bool]) -> float | None:
        """Rounded share of True (None for no items)."""
        return round(float(np.mean(flags)), 4) if flags else None

    return {"greedy": share([r["greedy"]["correct"] for r in records]),
            "sampled_rollout": share([ro["correct"] for r in records for ro in r["rollouts"]]),
            "majority_fixes_greedy_errors": share([majority_right(r) for r in wrong]),
            "majority_breaks_greedy_successes": share([not majority_right(r) for r in right]),
            "any_rollout_right": share([any(ro["correct"] for ro in r["rollouts"]) for r in records])}


def choose(runs: list[dict]) -> dict:
    """The run with the highest score (ties: lower temperature)."""
    return sorted(runs, key=lambda r: (-r["score"], r["temperature"]))[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.choose_temperature", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="calibration output folders (records.jsonl + calibration.json)")
    p.add_argument("--out", default=None, help="write the scores and the choice here (JSON)")
    args = p.parse_args(argv)
    runs = [score_run(Path(r)) for r in args.runs]
    if len({r["n_items"] for r in runs}) > 1:
        print("warning: the runs cover different numbers of items", file=sys.stderr)
    best = choose(runs)
    for r in runs:
        print(f"T={r['temperature']:<4} n={r['n_items']} " + " ".join(f"K{k}={a:.3f}" for k, a in
                                                                     r["accuracy_by_k"].items())
              + f"  score {r['score']:.4f}" + ("  <- chosen" if r is best else ""))
        v = r["voting"]
        print(f"      a sampled rollout is right {v['sampled_rollout']:.3f} (greedy {v['greedy']:.3f}); "
              f"the majority of all rollouts fixes {v['majority_fixes_greedy_errors']} of greedy's errors and breaks "
              f"{v['majority_breaks_greedy_successes']} of its successes")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python -m training.choose_temperature "
                                              + " ".join(argv if argv is not None else sys.argv[1:]),
                                              "runs": runs, "chosen": best["temperature"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
