"""Ask one question about one image; with --k > 1, vote over rollouts that share one prefill.

    python examples/basic_ask.py --image photo.jpg --k 5 --tau pi/4 "How many people are there?"
(defaults: the bundled image and the bundled default model)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avis_llamacpp import VLM  # noqa: E402
from avis_llamacpp.cli import _tau  # noqa: E402
from avis_llamacpp.defaults import DEMO_IMAGE, default_model_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--image", default=str(DEMO_IMAGE))
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--tau", type=_tau, default=None)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("question", nargs="?", default="How many shapes are in the image?")
    args = p.parse_args()
    model, mmproj = (args.model, args.mmproj) if args.model else default_model_paths()
    with VLM(model, mmproj, n_ctx=4096) as vlm:
        ans = vlm.ask(args.image, args.question, k=args.k, tau=args.tau, max_tokens=args.max_tokens)
    print(ans.answer if args.k > 1 and ans.answer else ans.text)
    print({"k": ans.k, "votes": ans.votes, "kept": ans.kept_tokens, "of": ans.image_tokens,
           "flops_vs_vanilla": round(ans.flops["total"], 3)})


if __name__ == "__main__":
    main()
