"""Evaluate a shapes VLM on video-task clips and image-task items in llama.cpp, and check PyTorch parity on clips.

    .venv/bin/python -m training.eval_video_vlm --model-dir /tmp/vq/out --n 300 --images 300 --parity 50 \
        --parity-ratio 0.75 --out eval_video.json

Accuracy is greedy through the public pipeline (``VLM.ask(None, question, video=frames, answer_tags=True)`` for a
clip, ``VLM.ask(image, ...)`` for an image), with 95% bootstrap intervals (2000 resamples of the items). Parity
loads the pair into the PyTorch video mirror (training/qwen_video.py) and compares greedy tokens and, unpruned, the
first-step logits with llama.cpp; with --parity-ratio llama.cpp prunes each clip by KDV and the mirror is fed the
same kept tokens at their original positions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from avis_llamacpp import VLM
from convert import shapes_task, video_task
from convert.shapes_task import format_question


def bootstrap_ci(correct: list[bool] | np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of 0/1 outcomes."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarise(rows: list[dict]) -> dict:
    """Accuracy with its interval, per kind and (clips) temporal vs single-frame kinds, clips with vs without a
    quiet stretch and crowded clips (convert/video_task: where one selection over the clip and one per pair differ)."""
    ok = [r["greedy"] == r["answer"] for r in rows]
    lo, hi = bootstrap_ci(ok)
    out = {"n": len(rows), "accuracy": round(float(np.mean(ok)), 4), "ci95": [round(lo, 4), round(hi, 4)],
           "by_kind": {}}
    for kind in sorted({r["kind"] for r in rows}):
        ks = [r["greedy"] == r["answer"] for r in rows if r["kind"] == kind]
        out["by_kind"][kind] = {"n": len(ks), "accuracy": round(float(np.mean(ks)), 3)}
    for field, groups in (("temporal", (("temporal", True), ("single_frame", False))),
                          ("quiet", (("quiet_stretch", True), ("no_quiet_stretch", False))),
                          ("crowded", (("crowded", True),))):
        if any(field in r for r in rows):
            for name, flag in groups:
                ks = [r["greedy"] == r["answer"] for r in rows if r[field] == flag]
                out[name] = {"n": len(ks), "accuracy": round(float(np.mean(ks)), 4) if ks else None}
    if rows and "kept" in rows[0]:
        out["mean_kept"] = round(float(np.mean([r["kept"] for r in rows])), 2)
    return out


def config_knobs(spec: str, temperature: float = 0.3) -> dict:
    """VLM.ask knobs of a config name: 'kdv@0.75' (joint KDV, ratio), 'chunk@0.75' (KDV per chunk), 'random@0.75',
    'uniform@0.75', 'tau@0.785' (adaptive KDV), 'k@5' (5 rollouts at `temperature`, top-p 0.9, majority vote)."""
    from avis_llamacpp.native import SamplingParams

    name, _, value = spec.partition("@")
    if name == "kdv":
        return {"ratio": float(value)}
    if name == "chunk":
        return {"ratio": float(value), "video_selection": "per_chunk"}
    if name in ("random", "uniform"):
        return {"ratio": float(value), "selector": name}
    if name == "tau":
        return {"tau": float(value)}
    if name == "k":
        return {"k": int(value), "sampling": SamplingParams(temperature=temperature, top_p=0.9)}
    raise ValueError(f"unknown config {spec!r} (kdv@R, chunk@R, random@R, uniform@R, tau@A, k@K)")


def paired(rows_a: list[dict], rows_b: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy a - b on the same items with a 95% paired-bootstrap interval, and the discordant counts."""
    a = np.array([r["greedy"] == r["answer"] for r in rows_a], dtype=np.float64)
    b = np.array([r["greedy"] == r["answer"] for r in rows_b], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    d = (a[idx] - b[idx]).mean(1)
    return {"diff": round(float(a.mean() - b.mean()), 4),
            "ci95": [round(float(np.quantile(d, 0.025)), 4), round(float(np.quantile(d, 0.975)), 4)],
            "only_a": int(((a == 1) & (b == 0)).sum()), "only_b": int(((a == 0) & (b == 1)).sum())}


def clip_rows(vlm: VLM, n: int, split: str = "test", max_tokens: int = 96, **knobs) -> list[dict]:
    """Answers on video-task clips 0..n-1 of split (greedy unless knobs ask for k rollouts; knobs: config_knobs)."""
    rows = []
    for i in range(n):
        item = video_task.make_item(split, i)
        q = item.question
        a = vlm.ask(None, format_question(q), video=video_task.render_clip(item.clip), answer_tags=True,
                    max_tokens=max_tokens, options=q.options, seed=1000 + i, **knobs)
        rows.append({"id": item.id, "kind": q.kind, "temporal": q.kind in video_task.TEMPORAL_KINDS,
                     "quiet": bool(item.clip.quiet), "crowded": item.clip.crowded, "answer": q.answer,
                     "greedy": a.answer, "kept": int(sum(a.kept_tokens))})
    return rows


def image_rows(vlm: VLM, n: int, split: str = "test", max_tokens: int = 96) -> list[dict]:
    """Greedy answers on image-task items 0..n-1 of split."""
    rows = []
    for i in range(n):
        item = shapes_task.make_item(split, i)
        q = item.question
        a = vlm.ask(np.asarray(shapes_task.render(item.scene)), format_question(q), answer_tags=True,
                    max_tokens=max_tokens, options=q.options)
        rows.append({"id": item.id, "kind": q.kind, "answer": q.answer, "greedy": a.answer})
    return rows


def llama_clip_prompt(vlm: VLM, frames: list[np.ndarray], question: str) -> tuple[list[list[int]], np.ndarray]:
    """What llama.cpp feeds for a question about a clip (text chunks' tokens) and its next-token logits after the
    prompt (the context is cleared after)."""
    from avis_llamacpp.prefill import prefill
    from training.data import user_text

    prompt = vlm.render_question(user_text(question), len(frames))
    vlm.ctx.clear()
    try:
        with vlm.projector.tokenize(prompt, frames, video=True) as p:
            chunks = [c.tokens for c in p.chunks if hasattr(c, "tokens")]
            prefill(vlm.ctx, vlm.projector, p)
            return chunks, np.array(vlm.ctx.logits(-1), dtype=np.float64)
    finally:
        vlm.ctx.clear()


def run_video_parity(vlm: VLM, model_path: Path, mmproj_path: Path, n: int, max_tokens: int = 96,
                     ratio: float | None = None) -> dict:
    """Greedy tokens (and unpruned, first-step logits) of llama.cpp vs the PyTorch video mirror on test clips
    0..n-1; with `ratio` the mirror gets llama.cpp's kept tokens of each chunk at their positions."""
    from avis_llamacpp.prompt import QWEN25VL
    from training.data import Tokenizer
    from training.qwen_torch import dims_from_gguf
    from training.qwen_video import SEPARATOR, load_video_from_gguf

    tm = load_video_from_gguf(model_path, mmproj_path, dims_from_gguf(model_path, mmproj_path))
    tok = Tokenizer(model_path, QWEN25VL)
    sep, stop = tok.encode("".join(SEPARATOR)), tok.encode("</answer>")
    same, argmax_same, layout_same, max_abs, max_rel, mismatches = 0, 0, 0, 0.0, 0.0, []
    for i in range(n):
        item = video_task.make_item("test", i)
        q = item.question
        frames = video_task.render_clip(item.clip)
        text = format_question(q)
        ans = vlm.ask(None, text, video=frames, answer_tags=True, max_tokens=max_tokens, ratio=ratio)
        kw = {}
        if ratio is not None:
            offsets = np.cumsum([0] + list(ans.image_tokens[:-1]))
            kw["kept"] = np.concatenate([np.asarray(im["kept"], dtype=np.int64) + off
                                         for im, off in zip(ans.images, offsets)])
        out, first = tm.greedy_clip(frames, tok.prefix(), sep, tok.question(q), max_tokens=max_tokens, eos=tok.eos,
                                    stop=stop, **kw)
        if ratio is None:
            chunks, lc = llama_clip_prompt(vlm, frames, text)
            layout_same += chunks == [tok.prefix()] + [sep] * (len(frames) // 2 - 1) + [tok.question(q)]
            lt = first.double().numpy()
            diff = float(np.abs(lt - lc).max())
            max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / float(np.abs(lc).max()))
            argmax_same += int(np.argmax(lt) == np.argmax(lc))
        if out == ans.tokens:
            same += 1
        else:
            mismatches.append({"id": item.id, "llama": tok.decode(ans.tokens), "torch": tok.decode(out)})
    res = {"n_clips": n, "ratio": ratio, "greedy_tokens_identical": same, "mismatches": mismatches[:5]}
    if ratio is None:
        res.update({"prompt_layout_identical": layout_same, "first_step_argmax_identical": argmax_same,
                    "first_logits_max_abs_diff": max_abs, "first_logits_max_rel_diff": max_rel})
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.eval_video_vlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="avis_llamacpp/data/shapes-qwen")
    p.add_argument("--n", type=int, default=300, help="clips for accuracy (0 to skip)")
    p.add_argument("--images", type=int, default=300, help="image items for accuracy (0 to skip)")
    p.add_argument("--split", default="test", choices=("calibration", "test"))
    p.add_argument("--configs", nargs="*", default=[], help="also score clips under these configs (config_knobs: "
                   "kdv@0.75 chunk@0.75 random@0.75 uniform@0.75 tau@0.785 k@5 ...), each paired against greedy")
    p.add_argument("--temperature", type=float, default=0.3, help="sampling temperature of k@K configs")
    p.add_argument("--parity", type=int, default=0, help="test clips for the torch parity check (0 to skip)")
    p.add_argument("--parity-ratio", type=float, default=None, help="also check parity pruned at this ratio")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="eval_video.json")
    args = p.parse_args(argv)
    if args.parity:
        import torch

        torch.set_num_threads(args.threads)
    d = Path(args.model_dir)
    model, mmproj = d / "model.gguf", d / "mmproj.gguf"
    res: dict = {"model_dir": str(d), "split": args.split}
    t0 = time.perf_counter()
    with VLM(model, mmproj, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads) as vlm:
        if args.parity:
            res["parity"] = run_video_parity(vlm, model, mmproj, args.parity)
            print(json.dumps(res["parity"]), flush=True)
            if args.parity_ratio is not None:
                res["parity_pruned"] = run_video_parity(vlm, model, mmproj, args.parity, ratio=args.parity_ratio)
                print(json.dumps(res["parity_pruned"]), flush=True)
        if args.n:
            rows = {"vanilla": clip_rows(vlm, args.n, args.split)}
            res["clips"] = summarise(rows["vanilla"])
            print(json.dumps({"clips": res["clips"]}), flush=True)
            res["configs"], res["paired"] = {}, {}
            for spec in args.configs:
                rows[spec] = clip_rows(vlm, args.n, args.split, **config_knobs(spec, args.temperature))
                res["configs"][spec] = summarise(rows[spec])
                res["paired"][f"{spec} - vanilla"] = paired(rows[spec], rows["vanilla"])
                print(json.dumps({spec: res["configs"][spec], "vs vanilla": res["paired"][f"{spec} - vanilla"]}),
                      flush=True)
            for a, b in (("kdv", "chunk"), ("kdv", "random"), ("kdv", "uniform")):
                for spec in args.configs:
                    other = spec.replace(a, b, 1) if spec.startswith(a + "@") else None
                    if other in rows:
                        res["paired"][f"{spec} - {other}"] = paired(rows[spec], rows[other])
                        for name, field, flag in (("quiet-stretch clips", "quiet", True),
                                                  ("other clips", "quiet", False), ("crowded clips", "crowded", True)):
                            sub = [i for i, r in enumerate(rows[spec]) if r[field] == flag]
                            if sub:
                                res["paired"][f"{spec} - {other} ({name})"] = paired(
                                    [rows[spec][i] for i in sub], [rows[other][i] for i in sub])
            if res["paired"]:
                print(json.dumps({"paired": res["paired"]}), flush=True)
        if args.images:
            res["images"] = summarise(image_rows(vlm, args.images, args.split))
            print(json.dumps({"images": res["images"]}), flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["command"] = "python -m training.eval_video_vlm " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
