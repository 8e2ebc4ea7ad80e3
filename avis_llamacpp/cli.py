"""The `avis` command: ask a question about an image from the shell."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

DATA_DIR = Path(__file__).parent / "data"
DEMO_IMAGE = DATA_DIR / "shapes.png"
DEMO_QUESTION = "How many shapes are in the image?"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, help="text model GGUF")
    p.add_argument("--mmproj", required=True, help="vision projector (mmproj) GGUF")
    p.add_argument("--n-ctx", type=int, default=4096, help="context size in tokens")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (-1: all)")
    p.add_argument("--chat-format", default="auto", help="'auto', 'llava-1-5' or 'qwen2.5-vl'")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own logs")


def _cmd_ask(args: argparse.Namespace) -> int:
    from .pipeline import VLM

    with VLM(args.model, args.mmproj, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
             chat_format=args.chat_format, verbose=args.verbose) as vlm:
        ans = vlm.ask(args.image, args.question, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(ans.to_dict(), indent=2))
    else:
        print(ans.text)
        t = ans.timings
        print(f"[image tokens {ans.image_tokens} kept {ans.kept_tokens}; encode {t['encode_s']*1000:.0f} ms, "
              f"prefill {t['prefill_s']*1000:.0f} ms, decode {t['decode_s']*1000:.0f} ms "
              f"for {len(ans.tokens)} tokens]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avis", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer a question about one or more images")
    _add_model_args(ask)
    ask.add_argument("--image", "-i", action="append", required=True, help="image path (repeat for several)")
    ask.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    ask.add_argument("--json", action="store_true", help="print the full result as JSON")
    ask.add_argument("question", help="the question")
    ask.set_defaults(func=_cmd_ask)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
