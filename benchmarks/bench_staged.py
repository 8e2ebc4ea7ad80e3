"""Staged self-consistency vs fixed K on the bundled trained model: decode tokens, wall clock and accuracy.

Every test item is answered by every configuration in turn, with the same seed (1000 + item index): fixed K = 7
in parallel mode (the reference), and ``mode="staged"`` with K_max = 7 for each stopping rule (the posterior rule
at several thresholds, ESC-style unanimity) and wave size. Per-rollout seeds depend on the rollout index only,
so a staged run's rollouts are the first rollouts of the fixed-K run; the table checks that (token-identical
rollouts) and measures the decode tokens saved exactly, as the difference to the fixed-K run on the same items.
Accuracy has a 95% bootstrap interval, and the change in accuracy a paired bootstrap interval over items.
Times are the sum of each configuration's VLM.ask wall clock, measured side by side on every item (ratios are
to fixed K in the same run).

Items: the shapes test split generated in memory (items 0..N-1 of ``convert.shapes_task`` split "test", the
300-item set of benchmarks/results/shapes-vlm-test300; the first 100 are avis_llamacpp/data/shapes-test), or a
labelled JSONL with --items. Records go to --records (one JSON line per item and configuration); a run with
the same settings resumes where it stopped. The table is written to --out.

    .venv/bin/python benchmarks/bench_staged.py --limit 20 --threads 1        # quick check
    .venv/bin/python benchmarks/bench_staged.py --limit 300 --threads 2       # the full run (idle machine)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, table

from avis_llamacpp import VLM
from avis_llamacpp.bench import bootstrap_ci, load_items
from avis_llamacpp.defaults import default_model_paths
from avis_llamacpp.native import ContextSettings
from avis_llamacpp.voting import normalize_answer

RESULTS = ROOT / "benchmarks" / "results"


def shapes_items(n: int) -> list[dict[str, Any]]:
    """Items 0..n-1 of the shapes test split, rendered in memory."""
    from convert.shapes_task import format_question, make_item, render

    out = []
    for i in range(n):
        it = make_item("test", i)
        q = it.question
        out.append({"id": it.id, "image": np.asarray(render(it.scene)), "question": format_question(q),
                    "options": list(q.options), "answer": q.answer})
    return out


def configs(k: int, thresholds: list[float], waves: list[int], unanimity: bool) -> list[dict[str, Any]]:
    """The reference (fixed K, parallel) first, then the staged runs."""
    c = [{"name": f"fixed K={k} parallel", "mode": "parallel"}]
    for w in waves:
        c += [{"name": f"staged w={w} posterior>{t:g}", "mode": "staged", "wave": w, "stopping": "posterior",
               "stop_threshold": t} for t in thresholds]
        if unanimity:
            c.append({"name": f"staged w={w} unanimity", "mode": "staged", "wave": w, "stopping": "unanimity"})
    return c


def run_item(vlm: VLM, item: dict[str, Any], index: int, cfgs: list[dict[str, Any]], k: int,
             max_tokens: int) -> list[dict[str, Any]]:
    options = item.get("options")
    truth = normalize_answer(str(item["answer"]), options)
    image = item.get("image_path", item.get("image"))
    recs, ref_tokens = [], None
    for c in cfgs:
        kw = {key: c[key] for key in ("wave", "stopping", "stop_threshold") if key in c}
        t0 = time.perf_counter()
        ans = vlm.ask(image, item["question"], answer_tags=True, max_tokens=max_tokens, options=options,
                      k=k, seed=1000 + index, mode=c["mode"], **kw)
        wall = time.perf_counter() - t0
        toks = [r.tokens for r in ans.rollouts]
        if ref_tokens is None:
            ref_tokens = toks
        recs.append({"id": item["id"], "config": c["name"], "answer": ans.answer, "truth": truth,
                     "correct": bool(ans.answer is not None and ans.answer == truth),
                     "rollouts": len(ans.rollouts), "waves": ans.waves, "rollouts_saved": ans.rollouts_saved,
                     "decode_tokens": sum(ans.decode_tokens), "ref_decode_tokens": sum(len(t) for t in ref_tokens),
                     "tokens_saved_estimate": ans.tokens_saved, "wall_s": wall,
                     "identical": sum(a == b for a, b in zip(toks, ref_tokens)),
                     "length_runs": sum(r.finish_reason == "length" for r in ans.rollouts)})
    return recs


def paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(a - b) over items resampled together."""
    d = a.astype(np.float64) - b.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def summarize(records: list[dict[str, Any]], cfgs: list[dict[str, Any]], ids: list[str]) -> list[list[Any]]:
    by = {(r["id"], r["config"]): r for r in records}
    ref_name = cfgs[0]["name"]
    ids = [i for i in ids if all((i, c["name"]) in by for c in cfgs)]  # items every configuration finished
    ref = [by[(i, ref_name)] for i in ids]
    ref_correct = np.array([r["correct"] for r in ref])
    ref_tok = sum(r["decode_tokens"] for r in ref)
    ref_wall = sum(r["wall_s"] for r in ref)
    rows = []
    for c in cfgs:
        rs = [by[(i, c["name"])] for i in ids]
        correct = np.array([r["correct"] for r in rs])
        lo, hi = bootstrap_ci(correct.tolist())
        dlo, dhi = paired_ci(correct, ref_correct)
        tok = sum(r["decode_tokens"] for r in rs)
        saved = ref_tok - tok
        est = sum(r["tokens_saved_estimate"] for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        n_roll = sum(r["rollouts"] for r in rs)
        same = sum(r["answer"] == q["answer"] for r, q in zip(rs, ref))
        ident = sum(r["identical"] for r in rs)
        rows.append([c["name"], len(rs), f"{correct.mean():.3f} ({lo:.3f}-{hi:.3f})",
                     f"{correct.mean() - ref_correct.mean():+.3f} ({dlo:+.3f} to {dhi:+.3f})",
                     f"{n_roll / max(1, len(rs)):.2f}", tok, f"{saved} ({saved / max(1, ref_tok):.1%})", est,
                     f"{wall:.1f}", f"{wall / ref_wall:.2f}" if ref_wall > 0 else "-", f"{same}/{len(rs)}",
                     f"{ident}/{n_roll}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=300, help="first N test items")
    p.add_argument("--items", default=None, help="labelled JSONL instead of the generated shapes test split")
    p.add_argument("--k", type=int, default=7, help="K of the fixed run and K_max of the staged runs")
    p.add_argument("--thresholds", default="0.8,0.9,0.95,0.99", help="posterior-rule thresholds, comma-separated")
    p.add_argument("--waves", default="2,3", help="wave sizes to compare (every wave of a run has this size), comma-separated")
    p.add_argument("--no-unanimity", action="store_true", help="leave out the unanimity rule")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1, help="threads for single-token and batch decoding")
    p.add_argument("--records", default=str(RESULTS / "staged_shapes" / "records.jsonl"),
                   help="per-item records (appended; resumed when the settings match)")
    p.add_argument("--out", default=str(RESULTS / "staged_shapes.md"), help="markdown table")
    a = p.parse_args()
    cfgs = configs(a.k, [float(t) for t in a.thresholds.split(",") if t], [int(w) for w in a.waves.split(",") if w],
                   not a.no_unanimity)
    if a.items:
        items = load_items(a.items, a.limit)
    else:
        items = shapes_items(a.limit)
    settings = {"k": a.k, "max_tokens": a.max_tokens, "items": a.items or "shapes-test (generated)",
                "seed": "1000 + item index", "flash_attn": ContextSettings().flash_attn}
    rec_path = Path(a.records)
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = rec_path.with_suffix(".settings.json")
    records: list[dict[str, Any]] = []
    if rec_path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == settings:
        records = [json.loads(line) for line in rec_path.read_text().splitlines() if line.strip()]
    else:
        rec_path.write_text("")
        meta_path.write_text(json.dumps(settings))
    done = {(r["id"], r["config"]) for r in records}
    names = [c["name"] for c in cfgs]
    todo = [(i, it) for i, it in enumerate(items) if any((it["id"], n) not in done for n in names)]
    print(f"{len(items) - len(todo)} of {len(items)} items already done ({rec_path})", file=sys.stderr)
    model, mmproj = default_model_paths()
    t_start = time.perf_counter()
    with VLM(model, mmproj, n_ctx=2048, n_seq_max=max(8, a.k), n_threads=a.threads,
             n_threads_batch=a.threads) as vlm:
        if todo:  # warm-up: one-time allocations stay out of the first item's times
            first = todo[0][1]
            vlm.ask(first.get("image_path", first.get("image")), "warm-up", max_tokens=1)
        with rec_path.open("a") as f:
            for n, (i, it) in enumerate(todo, 1):
                recs = run_item(vlm, it, i, cfgs, a.k, a.max_tokens)
                for r in recs:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                records += recs
                el = time.perf_counter() - t_start
                print(f"[{n}/{len(todo)}] {it['id']}: " + ", ".join(
                    f"{r['rollouts']}r {r['decode_tokens']}t {'ok' if r['correct'] else 'x'}" for r in recs)
                    + f"  ({el:.0f} s, ~{el / n * (len(todo) - n):.0f} s left)", file=sys.stderr, flush=True)
    rows = summarize(records, cfgs, [it["id"] for it in items])
    header = ["config", "items", "accuracy (95% CI)", "vs fixed K (paired 95% CI)", "rollouts / item",
              "decode tokens", "tokens saved vs fixed K (exact)", "saved (pipeline estimate)", "wall s",
              "wall vs fixed K", "same answer as fixed K", "rollouts token-identical to fixed K"]
    cmd = "python " + " ".join(shlex.quote(x) for x in [str(Path(sys.argv[0]))] + sys.argv[1:])
    text = (f"`{cmd}`\n\nbundled shapes VLM ({model.parent.name}), {rows[0][1]} items, K = K_max = {a.k}, "
            f"temperature 0.7 / top-p 0.9, max {a.max_tokens} tokens, {a.threads} thread(s), "
            f"flash_attn={ContextSettings().flash_attn!r}, seed 1000 + item index\n\n" + table(header, rows) + "\n")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    print(f"(wrote {a.out}; records {rec_path})", file=sys.stderr)


if __name__ == "__main__":
    main()
