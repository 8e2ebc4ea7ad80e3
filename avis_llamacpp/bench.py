"""The accuracy-compute benchmark: the paper's table measured on our models and any labelled JSONL set.

Every configuration runs on every item in one process (or sharded over Ray workers); the table reports
accuracy with a bootstrap 95% interval, mean kept image tokens, mean K, FLOPs normalised to the vanilla
configuration's measured FLOPs, wall-clock and time-to-first-token as ratios to vanilla, and the KV cache the
run needed. Records are appended per item, so an interrupted run resumes where it stopped.

    avis bench --model M --mmproj P --items test/items.jsonl --out bench_out [--policy policy.gguf]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import resource
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .cli_args import add_answer_tags_arg, add_model_args, check_input_file, check_model_files, vlm_kwargs
from .errors import InvalidArgumentError
from .items import iterate, media_args, read_records
from .items import load_items as read_items

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """One row of the table: how much to see (ratio / tau / selector) and how much to think (k / policy)."""

    name: str
    ratio: float | None = None
    tau: float | None = None
    k: int = 1
    selector: str = "kdv"
    policy: bool = False  # use the calibrated policy (tau and K per query)
    video_selection: str = "joint"  # a video's chunks pruned as one selection, or "per_chunk"


def policy_label(policy_path: str | os.PathLike) -> str:
    """The policy row's name, saying what the policy file does: K per query, and its pruning if it has one."""
    from .policy import load_policy

    pol = load_policy(policy_path)
    if pol.tau is not None:
        return f"avis (policy K, tau={pol.tau:.3g})"
    if pol.ratio is not None:
        return f"avis (policy K, rho={pol.ratio:.3g})"
    return "avis (policy K, no pruning)"


def default_configs(with_policy: bool, policy_name: str = "avis (policy K)", video: bool = False) -> list[BenchConfig]:
    """The paper's configurations plus pruning baselines at 75% and 90% (the first is the vanilla reference); the policy
    row is named by `policy_name` (see policy_label). video: items are clips, so KDV chunk by chunk (each frame pair
    on its own, at the same count) is a row too."""
    c = [BenchConfig("vanilla")]
    c += [BenchConfig(f"kdv rho={r}", ratio=r) for r in (0.5, 0.75, 0.9)]
    c += [BenchConfig(f"kdv tau=pi/{d}", tau=math.pi / d) for d in (6, 4, 3)]
    c += [BenchConfig(f"sc k={k}", k=k) for k in (3, 5, 7)]
    c += [BenchConfig("joint rho=0.75 k=5", ratio=0.75, k=5)]
    c += [BenchConfig(f"{s} rho={r}", ratio=r, selector=s) for r in (0.75, 0.9)
          for s in ("random", "uniform", "embeddings")]
    if video:
        c += [BenchConfig(f"kdv per-chunk rho={r}", ratio=r, video_selection="per_chunk") for r in (0.75, 0.9)]
    if with_policy:
        c += [BenchConfig(policy_name, policy=True)]
    return c


def load_items(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """A labelled JSONL set as dicts (items.load_items validates; `image_path` is resolved)."""
    return [it.as_dict() for it in read_items(path, limit)]


def kv_bytes_per_cell(vlm: Any) -> int:
    """KV-cache bytes per token (f16 K and V for every layer)."""
    d = vlm.text_dims
    return d.n_layer * 2 * (d.n_embd // d.n_head * d.n_head_kv) * 2


def evaluate_item(vlm: Any, item: dict[str, Any], *, index: int, configs: Sequence[dict[str, Any]], seed: int,
                  max_tokens: int, answer_tags: bool, policy_path: str | None = None, temperature: float = 0.7,
                  top_p: float = 0.9) -> list[dict[str, Any]]:
    """Run every configuration on one item; one record per configuration (seeds derive from the index).
    temperature / top_p: the sampling of fixed-K > 1 rows (K = 1 is greedy; policy rows use the default)."""
    from .native import SamplingParams
    from .voting import normalize_answer

    policy = _policy(policy_path, vlm) if policy_path and any(c["policy"] for c in configs) else None
    options = item.get("options")
    truth = normalize_answer(str(item["answer"]), options)
    out = []
    for c in configs:
        t0 = time.perf_counter()
        ans = vlm.ask(question=item["question"], **media_args(item["image_path"], bool(item.get("is_video"))),
                      max_tokens=max_tokens, answer_tags=answer_tags,
                      options=options, seed=seed * 1_000_003 + index, ratio=c["ratio"], tau=c["tau"], k=c["k"],
                      selector=c["selector"], policy=policy if c["policy"] else None,
                      video_selection=c.get("video_selection", "joint"),
                      sampling=SamplingParams(temperature=temperature, top_p=top_p) if c["k"] > 1 else None)
        wall = time.perf_counter() - t0
        kv_cells = ans.prompt_tokens + sum(ans.decode_tokens)
        out.append({"id": item["id"], "config": c["name"], "answer": ans.answer, "truth": truth,
                    "correct": bool(ans.answer is not None and ans.answer == truth), "k": ans.k,
                    "p_hat": ans.p_hat, "image_tokens": sum(ans.image_tokens), "kept_tokens": sum(ans.kept_tokens),
                    "prompt_tokens": ans.prompt_tokens, "decode_tokens": sum(ans.decode_tokens),
                    "flops": ans.flops["ours_total"], "wall_s": wall,
                    "ttft_s": ans.timings["encode_s"] + ans.timings["prefill_s"],
                    "kv_mib": kv_cells * kv_bytes_per_cell(vlm) / 2**20,
                    "difficulty": item.get("difficulty"), "kind": item.get("kind")})
    return out


_POLICIES: dict[tuple[str, int], Any] = {}


def _policy(path: str, vlm: Any) -> Any:
    """The policy file loaded once per worker (checked against the model's embedding size)."""
    key = (str(path), id(vlm))
    if key not in _POLICIES:
        from .policy import load_policy
        _POLICIES[key] = load_policy(path, vlm)
    return _POLICIES[key]


def evaluate_job(vlm: Any, job: tuple[int, dict[str, Any]], *, index: int, **kwargs: Any) -> list[dict[str, Any]]:
    """evaluate_item for an (item index, item) pair: seeds follow the item's index in the set, not the shard."""
    item_index, item = job
    return evaluate_item(vlm, item, index=item_index, **kwargs)


def bootstrap_ci(correct: Sequence[bool], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def summarize(records: Iterable[dict[str, Any]], configs: Sequence[BenchConfig], seed: int = 0) -> list[dict[str, Any]]:
    """One row per configuration; ratios are to the first configuration (vanilla) over the same items."""
    by: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    for r in records:
        if r["config"] in by:
            by[r["config"]].append(r)
    base = by[configs[0].name]
    mean = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else float("nan")  # noqa: E731
    rows = []
    for c in configs:
        rs = by[c.name]
        acc = mean(rs, "correct")
        lo, hi = bootstrap_ci([r["correct"] for r in rs], seed=seed)
        rows.append({"config": c.name, "n": len(rs), "accuracy": acc, "ci_low": lo, "ci_high": hi,
                     "kept_tokens": mean(rs, "kept_tokens"), "kept_fraction": mean(rs, "kept_tokens") / max(1e-9, mean(rs, "image_tokens")),
                     "mean_k": mean(rs, "k"), "flops_rel": mean(rs, "flops") / mean(base, "flops"),
                     "wall_rel": mean(rs, "wall_s") / mean(base, "wall_s"),
                     "ttft_rel": mean(rs, "ttft_s") / mean(base, "ttft_s"),
                     "wall_s": mean(rs, "wall_s"), "kv_peak_mib": max((r["kv_mib"] for r in rs), default=float("nan")),
                     "acc_vs_vanilla": acc / mean(base, "correct") if mean(base, "correct") > 0 else float("nan")})
    return rows


def paired_differences(records: Iterable[dict[str, Any]], pairs: Sequence[tuple[str, str]], n_boot: int = 2000,
                       seed: int = 0) -> list[dict[str, Any]]:
    """Accuracy of config a minus config b on the items both ran, with a 95% paired-bootstrap interval (items
    resampled together, so the shared per-item difficulty cancels)."""
    by: dict[tuple[str, str], bool] = {(r["config"], r["id"]): bool(r["correct"]) for r in records}
    out = []
    for a, b in pairs:
        ids = sorted({i for c, i in by if c == a} & {i for c, i in by if c == b})
        if not ids:
            continue
        d = np.array([by[(a, i)] for i in ids], np.float64) - np.array([by[(b, i)] for i in ids], np.float64)
        rng = np.random.default_rng(seed)
        boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
        lo, hi = np.quantile(boots, [0.025, 0.975])
        out.append({"a": a, "b": b, "n": len(ids), "diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi),
                    "a_only": int((d > 0).sum()), "b_only": int((d < 0).sum())})
    return out


def default_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """The comparisons the table is read for: KDV against each baseline at the same kept count (for clips also
    against KDV chunk by chunk), and every other row against vanilla."""
    pairs = [(f"kdv rho={r}", f"{s} rho={r}") for r in ("0.75", "0.9")
             for s in ("random", "uniform", "embeddings", "kdv per-chunk")]
    pairs += [(n, names[0]) for n in names[1:]]
    return [(a, b) for a, b in pairs if a in names and b in names]


def paired_table(diffs: Sequence[dict[str, Any]]) -> str:
    """Markdown table of paired differences."""
    lines = ["| a | b | n | accuracy a - b (95% paired CI) | only a right | only b right |", "|---|---|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['a']} | {d['b']} | {d['n']} | {d['diff']:+.3f} ({d['ci_low']:+.3f} to {d['ci_high']:+.3f}) "
                     f"| {d['a_only']} | {d['b_only']} |")
    return "\n".join(lines)


def kind_table(records: Iterable[dict[str, Any]], names: Sequence[str]) -> str:
    """Markdown accuracy per item kind (the items' "kind" field) and configuration, so a table shows which kinds of
    question survive pruning; "" when no item has a kind."""
    recs = [r for r in records if r.get("kind") is not None]
    kinds = sorted({str(r["kind"]) for r in recs})
    if not kinds:
        return ""
    cell: dict[tuple[str, str], list[bool]] = {}
    for r in recs:
        cell.setdefault((r["config"], str(r["kind"])), []).append(bool(r["correct"]))
    n_of = {k: max((len(v) for (c, kk), v in cell.items() if kk == k), default=0) for k in kinds}
    lines = ["| config | " + " | ".join(f"{k} ({n_of[k]})" for k in kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name in names:
        vals = [cell.get((name, k)) for k in kinds]
        if any(vals):
            lines.append(f"| {name} | " + " | ".join(f"{np.mean(v):.2f}" if v else "" for v in vals) + " |")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["config", "n", "accuracy (95% CI)", "vs vanilla", "kept tokens", "mean K", "FLOPs", "wall", "TTFT",
            "KV peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['config']} | {r['n']} | {r['accuracy']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f}) | "
                     f"{r['acc_vs_vanilla']:.3f} | {r['kept_tokens']:.0f} ({r['kept_fraction']:.0%}) | "
                     f"{r['mean_k']:.2f} | {r['flops_rel']:.2f}x | {r['wall_rel']:.2f}x | {r['ttft_rel']:.2f}x | "
                     f"{r['kv_peak_mib']:.1f} |")
    return "\n".join(lines)


def write_outputs(rows: Sequence[dict[str, Any]], out_dir: Path, title: str = "",
                  diffs: Sequence[dict[str, Any]] = (), by_kind: str = "") -> dict[str, Path]:
    """table.md (with accuracy by item kind and the paired differences under it), results.csv, paired.csv and
    accuracy_vs_flops.png (the PNG needs matplotlib: the [bench] extra)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"table": out_dir / "table.md", "csv": out_dir / "results.csv"}
    text = (f"{title}\n\n" if title else "") + markdown_table(rows) + "\n"
    if by_kind:
        text += "\nAccuracy by item kind (items per kind in brackets):\n\n" + by_kind + "\n"
    if diffs:
        text += "\nPaired differences (same items):\n\n" + paired_table(diffs) + "\n"
        paths["paired"] = out_dir / "paired.csv"
        with paths["paired"].open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(diffs[0]))
            w.writeheader()
            w.writerows(diffs)
    paths["table"].write_text(text)
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed: no plot (pip install 'avis-llamacpp[bench]')")
        return paths
    fig = plot_accuracy_vs_flops(rows, title)
    paths["plot"] = out_dir / "accuracy_vs_flops.png"
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths


def plot_accuracy_vs_flops(rows: Sequence[dict[str, Any]], title: str = "") -> Any:
    """The accuracy-vs-FLOPs figure of the summary rows: title wrapped inside the figure, labels that do not
    overlap (place_labels). Needs matplotlib (the [bench] extra)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        ax.errorbar(r["flops_rel"], r["accuracy"], yerr=[[r["accuracy"] - r["ci_low"]], [r["ci_high"] - r["accuracy"]]],
                    fmt="o", capsize=3)
    ax.set_xlabel("FLOPs relative to vanilla (rho=0, K=1)")
    ax.set_ylabel("accuracy (bars: 95% bootstrap interval)")
    ax.set_title(textwrap.fill(title or "accuracy vs compute", 95), fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
    fig.tight_layout()  # before the labels: they are placed in the final axes' pixels
    place_labels(ax, [(r["flops_rel"], r["accuracy"]) for r in rows], [r["config"] for r in rows])
    return fig


def place_labels(ax: Any, points: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float = 7) -> list:
    """Write each point's label at the nearest spot, right or left of it and stepping up or down, where it overlaps
    no other label and no point and stays inside the axes (a thin line joins a moved label to its point); the
    least crowded spot when none is free. Returns the text artists."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = ax.transData.transform(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    frame = ax.get_window_extent(renderer)
    r = 4.0  # a marker's half size in pixels
    taken = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in px]
    step = fontsize * 1.4  # one text line, in points
    spots = [(dx, k * sign * step) for k in range(0, 12) for sign in ((1,) if k == 0 else (1, -1)) for dx in (5, -5)]
    texts = []
    for i in sorted(range(len(labels)), key=lambda j: (px[j][0], -px[j][1])):
        best = None
        for dx, dy in spots:
            t = ax.annotate(labels[i], points[i], textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                            ha="left" if dx > 0 else "right", va="center")
            box = t.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)
            clashes = sum(box.overlaps(b) for b in taken) + (0 if inside else 100)
            if best is None or clashes < best[0]:
                if best is not None:
                    best[1].remove()
                best = (clashes, t, box, dy)
            else:
                t.remove()
            if clashes == 0:
                break
        _, t, box, dy = best
        if dy != 0:
            ax.annotate("", points[i], xytext=t.xyann, textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55", shrinkA=0, shrinkB=3))
        taken.append(box)
        texts.append(t)
    return texts


SETTINGS_FILE = "bench.json"
# what a record depends on besides its item and configuration: a resumed run must match all of them
SETTINGS_CHECKED = ("model", "mmproj", "model_bytes", "mmproj_bytes", "items", "policy", "policy_sha256", "seed",
                    "max_tokens", "answer_tags", "temperature", "top_p", "chat_format")


def check_bench_args(*, max_tokens: int, temperature: float, top_p: float, ray_workers: int = 0) -> None:
    """The run's knobs, checked before any model loads or file is written (InvalidArgumentError naming the knob)."""
    from .native import SamplingParams

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if not isinstance(ray_workers, int) or ray_workers < 0:
        raise InvalidArgumentError(f"ray workers must be an int >= 0, got {ray_workers!r}")
    SamplingParams(temperature=temperature, top_p=top_p)


def run_settings(model: str | os.PathLike, mmproj: str | os.PathLike, items_path: str | os.PathLike, *,
                 policy_path: str | os.PathLike | None, seed: int, max_tokens: int, answer_tags: bool,
                 temperature: float, top_p: float, chat_format: str = "auto") -> dict[str, Any]:
    """The settings a bench run's records depend on (kept in out_dir/bench.json): files as absolute paths, the
    model files' sizes (a model replaced at the same path) and the policy file's digest (it is small)."""
    import hashlib

    def where(p: str | os.PathLike | None) -> str | None:
        return None if p is None else str(Path(p).resolve())

    def size(p: str | os.PathLike) -> int | None:
        return Path(p).stat().st_size if Path(p).is_file() else None

    return {"model": where(model), "mmproj": where(mmproj), "model_bytes": size(model), "mmproj_bytes": size(mmproj),
            "items": where(items_path), "policy": where(policy_path),
            "policy_sha256": hashlib.sha256(Path(policy_path).read_bytes()).hexdigest() if policy_path else None,
            "seed": seed, "max_tokens": max_tokens, "answer_tags": bool(answer_tags),
            "temperature": float(temperature), "top_p": float(top_p), "chat_format": chat_format}


def check_resumable(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to add to out/records.jsonl when its records were made with other settings (or unknown ones)."""
    set_path = out / SETTINGS_FILE
    if set_path.exists():
        old = json.loads(set_path.read_text())
    elif (out / "run.json").exists():  # a finished run from before bench.json existed
        old = json.loads((out / "run.json").read_text())
        old.update({k: str(Path(old[k]).resolve()) for k in ("model", "mmproj", "items") if old.get(k)})
    else:
        raise InvalidArgumentError(f"{out} holds records.jsonl without {SETTINGS_FILE} (settings unknown); use another "
                                   f"--out folder, or --no-resume to delete those records and start over")
    diff = {k: (old.get(k), settings[k]) for k in SETTINGS_CHECKED if k in old and old.get(k) != settings[k]}
    if diff:
        named = "; ".join(f"{k}: {a!r} recorded, {b!r} now" for k, (a, b) in diff.items())
        raise InvalidArgumentError(f"{out} holds records made with other settings ({named}); use another --out "
                                   f"folder, or --no-resume to delete those records and start over")


def split_config_names(text: str) -> list[str]:
    """--configs names: split at commas outside parentheses, so a policy row such as 'avis (policy K, tau=0.977)'
    can be named."""
    return [w.strip() for w in re.split(r",(?![^()]*\))", text) if w.strip()]


def run_bench(model: str, mmproj: str, items_path: str, out_dir: str | os.PathLike, *,
              configs: Sequence[BenchConfig] | None = None, policy_path: str | None = None, seed: int = 0,
              max_tokens: int = 64, answer_tags: bool = True, limit: int | None = None, n_ctx: int | None = 4096,
              resume: bool = True, progress: bool = True, ray_workers: int = 0,
              ray_address: str | None = None, n_threads: int | None = None,
              n_threads_batch: int | None = None, temperature: float = 0.7, top_p: float = 0.9,
              vlm_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Evaluate every configuration on every item; returns the summary rows (and writes the outputs).
    vlm_options: further VLM keywords (n_gpu_layers, chat_format, flash_attn, repack, verbose)
    n_threads / n_threads_batch: CPU threads per model (give both when several runs share the cores).
    resume: keep out_dir's records of an earlier run with the same settings (other settings: refused, naming
    them); resume=False deletes them and starts over. Every argument is checked before anything is written."""
    check_bench_args(max_tokens=max_tokens, temperature=temperature, top_p=top_p, ray_workers=ray_workers)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {str(out)!r} is an existing file; give a folder (new or from an earlier "
                                   f"run)")
    items = load_items(items_path, limit)
    configs = list(configs or default_configs(with_policy=policy_path is not None,
                                              policy_name=policy_label(policy_path) if policy_path else "",
                                              video=any(it.get("is_video") for it in items)))
    if any(c.policy for c in configs) and not policy_path:
        raise InvalidArgumentError("a policy configuration needs --policy")
    cdicts = [asdict(c) for c in configs]
    rec_path, set_path = out / "records.jsonl", out / SETTINGS_FILE
    settings = run_settings(model, mmproj, items_path, policy_path=policy_path, seed=seed, max_tokens=max_tokens,
                            answer_tags=answer_tags, temperature=temperature, top_p=top_p,
                            chat_format=(vlm_options or {}).get("chat_format", "auto"))
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if rec_path.exists() and not resume:
        logger.warning("%s: starting over (--no-resume); old records removed", rec_path)
        rec_path.unlink()
    if rec_path.exists():
        check_resumable(out, settings)
        for r in read_records(rec_path):  # a truncated last line (interrupted run) is dropped
            done[(r["id"], r["config"])] = r
    out.mkdir(parents=True, exist_ok=True)
    set_path.write_text(json.dumps(settings, indent=2))
    todo = [(i, it) for i, it in enumerate(items) if any((it["id"], c.name) not in done for c in configs)]
    kw = dict(configs=cdicts, seed=seed, max_tokens=max_tokens, answer_tags=answer_tags, policy_path=policy_path,
              temperature=temperature, top_p=top_p)
    vlm_kwargs = {"n_ctx": n_ctx, "n_seq_max": max(8, max(c.k for c in configs)), "n_threads": n_threads,
                  "n_threads_batch": n_threads_batch or n_threads, **(vlm_options or {})}
    t0 = time.perf_counter()
    with rec_path.open("a") as rec:
        if ray_workers > 0:
            from .distributed import ray_map
            results = ray_map("avis_llamacpp.bench:evaluate_job", todo, model=model, mmproj=mmproj,
                              n_workers=ray_workers, vlm_kwargs=vlm_kwargs, fn_kwargs=kw, address=ray_address)
            for recs in results:
                for r in recs:
                    rec.write(json.dumps(r) + "\n")
                    done[(r["id"], r["config"])] = r
        else:
            from .pipeline import VLM
            bar = iterate(todo, desc="bench", enabled=progress)
            with VLM(model, mmproj, **vlm_kwargs) as vlm:
                if todo:  # warm-up: the first query pays one-time allocations, keep them out of the ratios
                    vlm.ask(question="warm-up", max_tokens=1,
                            **media_args(todo[0][1]["image_path"], bool(todo[0][1].get("is_video"))))
                for i, it in bar:
                    for r in evaluate_item(vlm, it, index=i, **kw):
                        rec.write(json.dumps(r) + "\n")
                        rec.flush()
                        done[(r["id"], r["config"])] = r
    elapsed = time.perf_counter() - t0
    records = [done[(it["id"], c.name)] for it in items for c in configs if (it["id"], c.name) in done]
    rows = summarize(records, configs, seed)
    from .native import ContextSettings
    flash_attn = vlm_kwargs.get("flash_attn", ContextSettings().flash_attn)
    title = (f"{Path(model).parent.name}/{Path(model).name} on {Path(items_path).parent.name} "
             f"({len(items)} items, seed {seed}, max_tokens {max_tokens}, flash_attn {flash_attn!r}, "
             f"sampling T {temperature:g} top-p {top_p:g})")
    diffs = paired_differences(records, default_pairs([c.name for c in configs]), seed=seed)
    write_outputs(rows, out, title, diffs, kind_table(records, [c.name for c in configs]))
    (out / "run.json").write_text(json.dumps({"model": str(model), "mmproj": str(mmproj), "items": str(items_path),
                                              "seed": seed, "max_tokens": max_tokens, "answer_tags": answer_tags,
                                              "temperature": temperature, "top_p": top_p,
                                              "flash_attn": flash_attn,
                                              "configs": cdicts, "elapsed_s": elapsed, "ray_workers": ray_workers,
                                              "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                                             indent=2))
    return rows


def register_cli(sub: Any) -> None:
    """The `avis bench` subcommand."""
    p = sub.add_parser("bench", help="accuracy / compute table over a labelled JSONL set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--items", required=True, help="labelled JSONL (image, question, options, answer)")
    p.add_argument("--out", default="bench_out", help="output folder (records, table, CSV, plot)")
    p.add_argument("--policy", default=None, help="policy GGUF for the full-AVIS row")
    p.add_argument("--configs", default=None, help="comma-separated config names to run (default: all)")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--seed", type=int, default=0, help="seed every rollout derives from")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per rollout")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the fixed-K > 1 rows")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of the fixed-K > 1 rows")
    add_answer_tags_arg(p)
    p.add_argument("--no-resume", action="store_true",
                   help="delete the records of an earlier run in --out and start over (by default a re-run resumes "
                        "them when its settings match, and refuses when they differ)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ray", type=int, default=0, help="spread items over this many Ray workers (0: in process)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster address (default: start a local one)")
    p.set_defaults(func=_cmd_bench)


_PASSED_APART = ("n_ctx", "n_threads", "n_threads_batch")  # run_bench's own keywords (replicas size their context)


def _cmd_bench(args: argparse.Namespace) -> int:
    check_bench_args(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, ray_workers=args.ray)
    if args.limit is not None and args.limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1, got {args.limit}")
    check_model_files(args)
    check_input_file(args.items, "--items")
    if args.policy:
        check_input_file(args.policy, "--policy")
    items = load_items(args.items, args.limit)  # every item checked before the model loads; clips add rows
    configs = default_configs(with_policy=args.policy is not None,
                              policy_name=policy_label(args.policy) if args.policy else "",
                              video=any(it.get("is_video") for it in items))
    if args.configs:
        wanted = split_config_names(args.configs)
        names = {c.name: c for c in configs}
        missing = [w for w in wanted if w not in names]
        if missing:
            raise InvalidArgumentError(f"unknown config(s) {missing}; known: {list(names)}")
        configs = [configs[0]] + [names[w] for w in wanted if w != configs[0].name]
    rows = run_bench(args.model, args.mmproj, args.items, args.out, configs=configs, policy_path=args.policy,
                     seed=args.seed, max_tokens=args.max_tokens, answer_tags=args.answer_tags, limit=args.limit,
                     n_ctx=args.n_ctx, resume=not args.no_resume, progress=not args.no_progress,
                     ray_workers=args.ray, ray_address=args.ray_address, n_threads=args.threads,
                     n_threads_batch=args.threads_batch, temperature=args.temperature, top_p=args.top_p,
                     vlm_options={k: v for k, v in vlm_kwargs(args).items() if k not in _PASSED_APART})
    print(markdown_table(rows))
    print(f"\n(wrote {args.out}/table.md with the paired differences, results.csv, paired.csv, "
          f"accuracy_vs_flops.png, records.jsonl)")
    return 0
