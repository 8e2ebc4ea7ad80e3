"""Ask one question about one image; with --k > 1, vote over rollouts that share one prefill.

    python examples/basic_ask.py --image photo.jpg --k 5 --tau pi/4 --options "" "How many people are there?"
(defaults: the bundled image and model, and a question of the kind that model was trained on: "What colour is the
square?" with four options written under it and the <think>/<answer> instruction; it answers C, blue)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avis_llamacpp import VLM  # noqa: E402
from avis_llamacpp.cli_args import parse_tau, question_with_options, split_options  # noqa: E402
from avis_llamacpp.defaults import DEMO_IMAGE, default_model_paths  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--image", default=str(DEMO_IMAGE))
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--tau", type=parse_tau, default=None)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", default="red|green|blue|yellow",
                   help="options separated by '|', written under the question as A./B. lines ('' for none)")
    p.add_argument("question", nargs="?", default="What colour is the square?")
    args = p.parse_args()
    model, mmproj = (args.model, args.mmproj) if args.model else default_model_paths()
    options = split_options(args.options) if args.options else None
    with VLM(model, mmproj, n_ctx=4096, n_threads=args.threads) as vlm:
        ans = vlm.ask(args.image, question_with_options(args.question, options), k=args.k, tau=args.tau,
                      max_tokens=args.max_tokens, options=options, answer_tags=True)
    if args.k == 1:
        print(ans.text)
    print({"answer": ans.answer, "k": ans.k, "votes": ans.votes, "kept": ans.kept_tokens, "of": ans.image_tokens,
           "flops_vs_vanilla": round(ans.flops["total"], 3)})


if __name__ == "__main__":
    main()
