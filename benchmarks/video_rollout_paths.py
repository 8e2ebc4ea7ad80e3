"""Do sampled rollouts on clips take different routes, and does voting over them help? (issue #35, self-consistency)

For each of the first N test clips of the video task, one greedy answer and K sampled rollouts (one shared prefill,
temperature T, top-p 0.9, the answer-tag prompt) through the public pipeline. Per model it prints and writes:

* accuracy of greedy and of the majority vote over the first k rollouts (k = 1, 3, 5, 7; ties go to the first answer
  to reach the top count, as VLM.ask votes), with 95% paired-bootstrap intervals of vote - greedy;
* how much the rollouts differ: distinct reasoning traces (the text before <answer>) and distinct answers per clip,
  the share of clips whose rollouts disagree, and "any of K correct" (the most voting could recover);
* the same split by the kinds whose traces list shapes in every model since stage 2 (appear / disappear / order) and
  the rest, and by question kind (where votes win or lose).

    .venv/bin/python benchmarks/video_rollout_paths.py --model-dir DIR [--model-dir DIR2] --n 300 --k 7 \
        --temperature 0.7 --threads 1 --out benchmarks/results/shapes-qwen-video/rollout_paths.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avis_llamacpp import VLM  # noqa: E402
from avis_llamacpp.native import SamplingParams  # noqa: E402
from avis_llamacpp.voting import extract_answer, normalize_answer  # noqa: E402
from convert import video_task  # noqa: E402
from convert.shapes_task import format_question  # noqa: E402

LISTED = ("appear", "disappear", "order")


def vote(answers: list[str | None]) -> str | None:
    """Majority over the given answers (None ignored); ties to the answer that reached the top count first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def anchored_vote(greedy: str | None, samples: list[str | None]) -> str | None:
    """A vote rule aimed at rollouts that are worse than greedy: the greedy answer plus k-1 samples, ties to greedy
    (greedy is listed first), so samples overturn greedy only by outnumbering it."""
    return vote([greedy, *samples])


def trace(text: str) -> str:
    """The reasoning part of a rollout: everything before <answer>."""
    return text.split("<answer>", 1)[0].strip()


def run_model(model_dir: Path, n: int, k: int, temperature: float, threads: int, max_tokens: int,
              split: str = "test") -> list[dict]:
    """Per clip: kind, gold, greedy answer, the K sampled answers and traces."""
    rows = []
    with VLM(model_dir / "model.gguf", model_dir / "mmproj.gguf", n_threads=threads, n_threads_batch=threads) as vlm:
        for i in range(n):
            item = video_task.make_item(split, i)
            q = item.question
            opts = list(q.options)
            frames = video_task.render_clip(item.clip)
            text = format_question(q)
            greedy = vlm.ask(None, text, video=frames, answer_tags=True, max_tokens=max_tokens, options=opts)
            multi = vlm.ask(None, text, video=frames, answer_tags=True, max_tokens=max_tokens, options=opts, k=k,
                            sampling=SamplingParams(temperature=temperature, top_p=0.9), seed=i)
            answers = []
            for r in multi.rollouts:
                got = extract_answer(r.text, opts)
                answers.append(normalize_answer(got, opts) if got is not None else None)
            rows.append({"id": item.id, "kind": q.kind, "gold": q.answer, "greedy": greedy.answer,
                         "answers": answers, "traces": [trace(r.text) for r in multi.rollouts]})
    return rows


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    d = (a[idx] - b[idx]).mean(1)
    return [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)]


def summarise(rows: list[dict], k: int) -> dict:
    """Accuracy of greedy and of votes over the first k rollouts, and how much the rollouts differ."""
    gold = [r["gold"] for r in rows]
    greedy = np.array([r["greedy"] == g for r, g in zip(rows, gold)], dtype=float)
    out = {"n": len(rows), "greedy": round(float(greedy.mean()), 4), "votes": {}}

    def against_greedy(picked: list[str | None]) -> dict:
        right = np.array([a == g for a, g in zip(picked, gold)], dtype=float)
        return {"accuracy": round(float(right.mean()), 4),
                "minus_greedy": round(float(right.mean() - greedy.mean()), 4), "ci95": paired_ci(right, greedy)}

    for kk in sorted({1, 3, 5, k} & set(range(1, k + 1))):
        out["votes"][f"k={kk}"] = against_greedy([vote(r["answers"][:kk]) for r in rows])
        if kk > 1:
            out["votes"][f"k={kk}"]["anchored"] = against_greedy([anchored_vote(r["greedy"], r["answers"][:kk - 1])
                                                                  for r in rows])
    n_traces = [len(set(r["traces"])) if "traces" in r else r.get("n_traces") for r in rows]
    out["distinct_traces"] = (round(float(np.mean(n_traces)), 3) if None not in n_traces
                              else None)  # rows saved before n_traces was kept
    out["distinct_answers"] = round(float(np.mean([len({a for a in r["answers"] if a}) for r in rows])), 3)
    out["disagree_share"] = round(float(np.mean([len({a for a in r["answers"] if a}) > 1 for r in rows])), 4)
    out["any_correct"] = round(float(np.mean([g in r["answers"] for r, g in zip(rows, gold)])), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", action="append", required=True, help="model.gguf + mmproj.gguf (repeat to compare)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--split", default="test", choices=("calibration", "test"),
                   help="which split's clips (design vote rules on calibration, report on test)")
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON results (with every rollout's answer)")
    p.add_argument("--rows", default=None, metavar="JSON",
                   help="re-summarise the rows an earlier --out wrote (same --model-dir) instead of running the model")
    args = p.parse_args(argv)
    result = {"command": "python benchmarks/video_rollout_paths.py " + " ".join(argv or sys.argv[1:]), "models": {}}
    saved_run = json.loads(Path(args.rows).read_text()) if args.rows else {}
    saved = saved_run.get("models", {})
    if args.rows:
        result["rows_from"] = saved_run.get("rows_from", saved_run.get("command"))  # the run that made the rows
    for d in args.model_dir:
        t0 = time.perf_counter()
        if args.rows:
            if d not in saved:
                p.error(f"{args.rows} has no rows for {d} (it has {sorted(saved)})")
            rows = saved[d]["rows"]
        else:
            rows = run_model(Path(d), args.n, args.k, args.temperature, args.threads, args.max_tokens, args.split)
        summary = {"all": summarise(rows, args.k),
                   "listed_kinds": summarise([r for r in rows if r["kind"] in LISTED], args.k),
                   "other_kinds": summarise([r for r in rows if r["kind"] not in LISTED], args.k),
                   **{f"kind:{kind}": summarise([r for r in rows if r["kind"] == kind], args.k)
                      for kind in sorted({r["kind"] for r in rows})},  # where votes win or lose
                   "seconds": round(time.perf_counter() - t0, 1)}
        subsets = [name for name in summary if name != "seconds"]
        for name in subsets:  # rows saved without trace counts: the run's own figure
            if summary[name]["distinct_traces"] is None and args.rows:
                summary[name]["distinct_traces"] = saved[d]["summary"].get(name, {}).get("distinct_traces")
        result["models"][d] = {"summary": summary,
                               "rows": [{**{k: v for k, v in r.items() if k != "traces"},
                                         **({"n_traces": len(set(r["traces"]))} if "traces" in r else {})}
                                        for r in rows]}
        print(f"\n{d}  ({args.n} {args.split} clips, K={args.k}, T={args.temperature})")
        print("| subset | n | greedy | " + " | ".join(f"vote {v}" for v in summary["all"]["votes"])
              + " | distinct traces | distinct answers | disagree | any correct |")
        print("|---" * (7 + len(summary["all"]["votes"])) + "|")
        for name in subsets:
            s = summary[name]
            votes = " | ".join(f"{v['accuracy']:.3f} ({v['minus_greedy']:+.3f} [{v['ci95'][0]:+.3f}, "
                               f"{v['ci95'][1]:+.3f}])" for v in s["votes"].values())
            traces = "n/a" if s["distinct_traces"] is None else f"{s['distinct_traces']:.2f}"
            print(f"| {name} | {s['n']} | {s['greedy']:.3f} | {votes} | {traces} | "
                  f"{s['distinct_answers']:.2f} | {s['disagree_share']:.3f} | {s['any_correct']:.3f} |")
        print("anchored vote (greedy + k-1 samples, ties to greedy): " + ", ".join(
            f"{k} {a['accuracy']:.3f} ({a['minus_greedy']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}])"
            for k, v in summary["all"]["votes"].items() if (a := v.get("anchored"))))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
