"""Evaluate an exported shapes VLM in llama.cpp (greedy and K-rollout voting) and check PyTorch parity.

    .venv/bin/python -m training.eval_shapes_vlm --model-dir avis_llamacpp/data/shapes-vlm --n 300 --parity 50 \
        --out eval_shapes_vlm.json

Accuracy runs through the public pipeline: ``VLM.ask(image, question, answer_tags=True, k=..., options=...)``.
Parity (needs torch: ``pip install -e '.[dev]'``, or pass ``--parity 0``) loads the GGUF weights into the PyTorch
mirror (training/vlm_torch.py or training/qwen_torch.py, by the text model's architecture) and compares greedy
tokens and first-step logits with llama.cpp (--parity-ratio: also with KDV pruning). Results are printed and
written to --out (default ./eval_shapes_vlm.json); the bundled MODEL_DIR/training.json is only updated with
--update-training-json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from avis_llamacpp import VLM
from convert.shapes_task import format_question, make_item, render


def run_accuracy(vlm: VLM, n: int, k: int, seed: int, max_tokens: int = 96, split: str = "test") -> dict:
    """Greedy and K-vote accuracy on `split` items 0..n-1, plus how often the vote differs from greedy (k <= 1:
    greedy only, the vote is the greedy answer)."""
    rows = []
    t0 = time.perf_counter()
    for i in range(n):
        item = make_item(split, i)
        q = item.question
        img = np.asarray(render(item.scene))
        text = format_question(q)
        g = vlm.ask(img, text, answer_tags=True, max_tokens=max_tokens, options=q.options)
        v = (vlm.ask(img, text, answer_tags=True, max_tokens=max_tokens, options=q.options, k=k, seed=seed + i)
             if k > 1 else g)
        rows.append({"id": item.id, "kind": q.kind, "difficulty": item.scene.difficulty, "answer": q.answer,
                     "greedy": g.answer, "vote": v.answer, "votes": v.votes})
    greedy = np.mean([r["greedy"] == r["answer"] for r in rows])
    vote = np.mean([r["vote"] == r["answer"] for r in rows])
    differ = np.mean([r["vote"] != r["greedy"] for r in rows])
    disagree = np.mean([len(r["votes"]) > 1 for r in rows])
    by_kind = {}
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        by_kind[kind] = {"n": len(rs), "greedy": round(float(np.mean([r["greedy"] == r["answer"] for r in rs])), 3),
                         "vote": round(float(np.mean([r["vote"] == r["answer"] for r in rs])), 3)}
    by_diff = {}
    for lo, hi in ((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.01)):
        rs = [r for r in rows if lo <= r["difficulty"] < hi]
        by_diff[f"{lo:.2f}-{min(hi, 1):.2f}"] = {
            "n": len(rs), "greedy": round(float(np.mean([r["greedy"] == r["answer"] for r in rs])), 3) if rs else None}
    return {"split": split, "n_items": n, "k": k,
            "sampling": "temperature 0.7, top-p 0.9" if k > 1 else "greedy only",
            "greedy_accuracy": round(float(greedy), 4),
            f"k{k}_vote_accuracy": round(float(vote), 4), "vote_differs_from_greedy": round(float(differ), 4),
            "rollouts_disagree": round(float(disagree), 4), "by_kind": by_kind, "by_difficulty": by_diff,
            "seconds": round(time.perf_counter() - t0, 1)}


def llama_prompt(vlm: VLM, image: np.ndarray, question: str | dict) -> tuple[list[list[int]], np.ndarray]:
    """What llama.cpp feeds and predicts for a question about an image, as VLM.ask(..., answer_tags=True) builds
    it: the text chunks' tokens and the next-token logits after the prompt (the context is cleared after)."""
    from avis_llamacpp.images import load_image
    from avis_llamacpp.prefill import prefill
    from training.data import user_text

    prompt = vlm.render_question(user_text(question), 1)
    vlm.ctx.clear()
    try:
        with vlm.projector.tokenize(prompt, [load_image(image)]) as p:
            chunks = [c.tokens for c in p.chunks if hasattr(c, "tokens")]
            prefill(vlm.ctx, vlm.projector, p)
            return chunks, np.array(vlm.ctx.logits(-1), dtype=np.float64)
    finally:
        vlm.ctx.clear()


def torch_mirror(model_path: Path, mmproj_path: Path) -> tuple[object, object]:
    """(PyTorch mirror holding the pair's weights, the training tokenizer) for a llava-style (llama) or a
    Qwen2.5-VL-style (qwen2vl) shapes VLM."""
    import gguf

    from avis_llamacpp.prompt import LLAVA15, QWEN25VL
    from training.data import Tokenizer

    arch = gguf.GGUFReader(str(model_path)).fields["general.architecture"].contents()
    if arch == "qwen2vl":
        from training import qwen_torch as mirror
    else:
        from training import vlm_torch as mirror
    tm = mirror.load_from_gguf(model_path, mmproj_path, mirror.dims_from_gguf(model_path, mmproj_path))
    return tm, Tokenizer(model_path, QWEN25VL if arch == "qwen2vl" else LLAVA15)


def run_parity(vlm: VLM, model_path: Path, mmproj_path: Path, n: int, max_tokens: int = 96, threads: int = 1,
               ratio: float | None = None) -> dict:
    """Greedy tokens and first-step logits of llama.cpp vs the PyTorch mirror on test items 0..n-1; with `ratio`,
    llama.cpp prunes by KDV and the mirror is fed the same kept tokens at their original M-RoPE positions
    (Qwen2.5-VL-style models only: a 1-D RoPE mirror does not model pruned positions)."""
    import torch

    torch.set_num_threads(threads)
    tm, tok = torch_mirror(model_path, mmproj_path)
    if ratio is not None and not hasattr(tm, "grid"):
        raise ValueError("pruned parity needs the Qwen2.5-VL-style mirror")
    stop_tok = tok.encode("</answer>")
    same, max_abs, max_rel, argmax_same, n_tok_prompt_ok = 0, 0.0, 0.0, 0, 0
    mismatches = []
    for i in range(n):
        item = make_item("test", i)
        q = item.question
        img = np.asarray(render(item.scene))
        text = format_question(q)
        ans = vlm.ask(img, text, answer_tags=True, max_tokens=max_tokens, ratio=ratio)
        prefix, question = tok.prefix(), tok.question(q)
        kw = {} if ratio is None else {"kept": np.asarray(ans.images[0]["kept"])}
        out, first = tm.greedy(img, prefix, question, max_tokens=max_tokens, eos=tok.eos, stop=stop_tok, **kw)
        if ratio is None:  # first-step logits of the unpruned prompt straight from llama.cpp's context
            chunks, lc = llama_prompt(vlm, img, text)
            n_tok_prompt_ok += chunks == [prefix, question]
            lt = first.double().numpy()
            diff = np.abs(lt - lc).max()
            max_abs = max(max_abs, float(diff))
            max_rel = max(max_rel, float(diff / np.abs(lc).max()))
            argmax_same += int(np.argmax(lt) == np.argmax(lc))
        if out == ans.tokens:
            same += 1
        else:
            mismatches.append({"id": item.id, "llama": tok.decode(ans.tokens), "torch": tok.decode(out)})
    res = {"n_items": n, "ratio": ratio, "greedy_tokens_identical": same, "mismatches": mismatches[:5]}
    if ratio is None:
        res.update({"first_step_argmax_identical": argmax_same, "prompt_tokens_identical": n_tok_prompt_ok,
                    "first_logits_max_abs_diff": max_abs, "first_logits_max_rel_diff": max_rel})
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.eval_shapes_vlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="avis_llamacpp/data/shapes-vlm")
    p.add_argument("--n", type=int, default=300, help="items for accuracy (0 to skip)")
    p.add_argument("--split", default="test", choices=("calibration", "test"),
                   help="items for accuracy (choose between trained models on calibration, never on test)")
    p.add_argument("--k", type=int, default=7, help="rollouts for the vote (1: greedy only)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--parity", type=int, default=50, help="test items for the torch parity check (0 to skip)")
    p.add_argument("--parity-ratio", type=float, default=None,
                   help="also check parity with this KDV pruning ratio (Qwen2.5-VL-style models)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for llama.cpp and torch")
    p.add_argument("--out", default="eval_shapes_vlm.json", help="where to write the results (JSON)")
    p.add_argument("--update-training-json", action="store_true",
                   help="also merge the results into MODEL_DIR/training.json (the bundled model's record)")
    p.add_argument("--no-write", action="store_true", help="write no file, only print")
    args = p.parse_args(argv)
    if args.parity:
        try:
            import torch  # noqa: F401
        except ImportError:
            p.error("--parity needs torch (pip install -e '.[dev]'); pass --parity 0 to skip the parity check")
    d = Path(args.model_dir)
    model, mmproj = d / "model.gguf", d / "mmproj.gguf"
    results: dict = {"files": {"model.gguf": model.stat().st_size, "mmproj.gguf": mmproj.stat().st_size}}
    with VLM(model, mmproj, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads) as vlm:
        if args.parity:
            results["parity"] = run_parity(vlm, model, mmproj, args.parity, threads=args.threads)
            print(json.dumps(results["parity"], indent=1), flush=True)
            if args.parity_ratio is not None:
                results["parity_pruned"] = run_parity(vlm, model, mmproj, args.parity, threads=args.threads,
                                                      ratio=args.parity_ratio)
                print(json.dumps(results["parity_pruned"], indent=1), flush=True)
        if args.n:
            results["accuracy"] = run_accuracy(vlm, args.n, args.k, args.seed, split=args.split)
            print(json.dumps(results["accuracy"], indent=1), flush=True)
    if args.no_write:
        return 0
    results["command"] = "python -m training.eval_shapes_vlm " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).write_text(json.dumps(results, indent=1))
    info_path = d / "training.json"
    if args.update_training_json and info_path.exists():
        info = json.loads(info_path.read_text())
        info.update({"eval": results})
        info_path.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
