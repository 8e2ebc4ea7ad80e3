"""Calibrate an AVIS policy on a labelled set, save it as GGUF, load it back and let it pick K per query.

    python examples/calibrate_policy.py --items calib/items.jsonl --out calib_out [--model M --mmproj P]
(default: 40 generated shapes-task calibration items and the bundled default model: two model calls per item, the
second decoding --k-max rollouts, so minutes on a CPU; --n 10 for a quick look, --threads to use more cores)"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avis_llamacpp import VLM, load_policy  # noqa: E402
from avis_llamacpp.calibrate import fit_policy, format_report, run_calibration  # noqa: E402
from avis_llamacpp.defaults import default_model_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--items", help="labelled JSONL (default: generate shapes-task calibration items)")
    p.add_argument("--n", type=int, default=40, help="items to generate when --items is not given")
    p.add_argument("--out", default=None)
    p.add_argument("--k-max", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    args = p.parse_args()
    model, mmproj = (args.model, args.mmproj) if args.model else default_model_paths()
    out = Path(args.out or tempfile.mkdtemp(prefix="avis-calib-"))
    items = args.items
    if items is None:
        from convert.shapes_task import export
        items = export("calibration", args.n, out / "items")
    n_items = sum(1 for line in Path(items).read_text().splitlines() if line.strip())
    print(f"calibrating on {n_items} items: per item one greedy answer and {args.k_max} sampled rollouts of up to "
          f"{args.max_tokens} tokens (minutes on a CPU; --n 10 for a quick look)", file=sys.stderr)
    with VLM(model, mmproj, n_ctx=4096, n_threads=args.threads) as vlm:
        records = run_calibration(vlm, items, out, k_max=args.k_max, max_tokens=args.max_tokens, answer_tags=True,
                                  progress=True)
        policy, report = fit_policy(records, lambda_=0.01)
        print(format_report(report))
        policy.save(out / "policy.gguf")
        loaded = load_policy(out / "policy.gguf", vlm)
        first = records[0]
        ans = vlm.ask(str(Path(items).parent / first["image"]), first["question"], answer_tags=True,
                      options=first["options"], policy=loaded, max_tokens=args.max_tokens)
    print(f"policy: {out / 'policy.gguf'}; first item: p_hat={ans.p_hat:.3f} -> K={ans.k}, "
          f"kept {ans.kept_tokens} of {ans.image_tokens} image tokens, answer {ans.answer}")


if __name__ == "__main__":
    main()
