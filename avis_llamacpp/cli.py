"""The `avis` command: ask about images, see what KDV keeps, calibrate a policy, benchmark."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, Sequence

def _tau(value: str) -> float:
    """tau in radians; 'pi/4'-style fractions of pi are accepted."""
    v = value.strip().lower().replace(" ", "")
    if v.startswith("pi/"):
        return math.pi / float(v[3:])
    if v.endswith("pi"):
        return float(v[:-2] or 1) * math.pi
    return float(v)


def flash_attn_arg(value: str) -> str | bool:
    """--flash-attn auto|on|off -> VLM's flash_attn ("auto" | True | False)."""
    v = value.strip().lower()
    if v in ("auto", "on", "off"):
        return {"auto": "auto", "on": True, "off": False}[v]
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--mmproj and the context knobs every model-loading subcommand takes."""
    p.add_argument("--model", "-m", required=True, help="text model GGUF")
    p.add_argument("--mmproj", required=True, help="vision projector (mmproj) GGUF")
    p.add_argument("--n-ctx", type=int, default=None,
                   help="context size in tokens, shared by all rollouts (default 4096, or the model's training "
                        "context if shorter)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--threads-batch", type=int, default=None,
                   help="CPU threads for prompt batches (default: --threads if given, else all cores)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="text-model layers to offload to the GPU (-1: all)")
    p.add_argument("--chat-format", default="auto", help="prompt format: auto, llava-1-5 or qwen2.5-vl")
    p.add_argument("--flash-attn", type=flash_attn_arg, default="auto", metavar="{auto,on,off}",
                   help="flash attention in the text model and the vision encoder (default auto: where supported)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own logs")


def add_avis_args(p: argparse.ArgumentParser) -> None:
    """The AVIS knobs: pruning (--rho / --tau), rollouts (--k / --policy) and decoding."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rho", type=float, default=None, help="KDV fixed mode: fraction of image tokens to prune (0-1)")
    g.add_argument("--tau", type=_tau, default=None, help="KDV adaptive mode: prune tokens within tau radians of the mean key (e.g. pi/4)")
    p.add_argument("--k", type=int, default=1, help="rollouts voted on (1 = greedy; the paper uses 1, 3, 5, 7)")
    p.add_argument("--policy", default=None, help="policy GGUF from `avis calibrate`: picks K (and tau) per query")
    p.add_argument("--mode", choices=["parallel", "snapshot", "staged"], default="parallel",
                   help="rollouts decoded together, one at a time to save memory, or staged: in waves (--wave) until "
                        "a stopping rule settles the vote (--k is then the most rollouts)")
    p.add_argument("--wave", type=int, default=3, help="staged mode: rollouts per wave (each wave one batch)")
    p.add_argument("--stopping", choices=["posterior", "unanimity"], default="posterior",
                   help="staged mode: stop when P(leader stays the majority of K) > --stop-threshold, or when the "
                        "rollouts so far agree")
    p.add_argument("--stop-threshold", type=float, default=0.95, help="staged mode: the posterior rule's threshold")
    p.add_argument("--seed", type=int, default=0, help="seed the rollouts' samplers derive from")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when K > 1")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling when K > 1")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per rollout")
    p.add_argument("--answer-tags", action="store_true", help="ask for <think>/<answer> output and vote on the answers")
    p.add_argument("--options", default=None, help="multiple-choice options separated by '|' (answers normalise to letters)")
    p.add_argument("--early-stop", action="store_true", help="stop remaining rollouts once the vote is decided")


def vlm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """VLM keywords from the shared model flags (add_model_args)."""
    return dict(n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads_batch,
                n_gpu_layers=args.n_gpu_layers, chat_format=args.chat_format, verbose=args.verbose,
                flash_attn=args.flash_attn)


def open_vlm(args: argparse.Namespace) -> Any:
    from .pipeline import VLM

    return VLM(args.model, args.mmproj, n_seq_max=max(8, getattr(args, "k", 1)), **vlm_kwargs(args))


def ask_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """VLM.ask keywords from the AVIS arguments."""
    from .native import SamplingParams

    kw: dict[str, Any] = dict(max_tokens=args.max_tokens, ratio=args.rho, tau=args.tau, k=args.k, mode=args.mode,
                              seed=args.seed, answer_tags=args.answer_tags, early_stop=args.early_stop,
                              wave=args.wave, stopping=args.stopping, stop_threshold=args.stop_threshold,
                              options=args.options.split("|") if args.options else None)
    if args.k > 1:
        kw["sampling"] = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    if args.policy:
        from .policy import load_policy
        kw["policy"] = load_policy(args.policy)
    return kw


def _cmd_ask(args: argparse.Namespace) -> int:
    from .options import QuerySettings

    kw = ask_kwargs(args)
    QuerySettings.from_kwargs(**{k: v for k, v in kw.items() if k != "answer_tags"})  # bad knobs fail before loading
    with open_vlm(args) as vlm:
        ans = vlm.ask(args.image, args.question, **kw)
    if args.json:
        print(json.dumps(ans.to_dict(), indent=2))
        return 0
    print(ans.answer if (ans.k > 1 and ans.answer is not None) else ans.text)
    t = ans.timings
    votes = f", votes {ans.votes}" if ans.k > 1 else ""
    print(f"[K={ans.k}{votes}; image tokens kept {ans.kept_tokens} of {ans.image_tokens}; "
          f"FLOPs {ans.flops.get('total', 1.0):.2f}x vanilla; encode {t['encode_s'] * 1000:.0f} ms, "
          f"prefill {t['prefill_s'] * 1000:.0f} ms, decode {t['decode_s'] * 1000:.0f} ms]", file=sys.stderr)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .overlay import render_overlay

    with open_vlm(args) as vlm:
        ans = vlm.ask(args.image, args.question, max_tokens=1, ratio=args.rho,
                      tau=args.tau if args.rho is None else None)
    im = ans.images[0]
    render_overlay(args.image, im["kept"], tuple(im["grid"]), cell_px=args.cell_px).save(args.out)
    print(f"{args.out}: kept {im['n_kept']} of {im['n_tokens']} image tokens ({im.get('key_source')})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .defaults import DEMO_IMAGE, TRAINED_DIR, bundled_dir, default_model_paths, default_policy_path
    from .pipeline import VLM

    model, mmproj = default_model_paths()
    # the full AVIS query (adaptive KDV + the calibrated K policy) on the model trained for pruned inputs;
    # --k / --tau / --no-prune override it, and the older LLaVA-style model runs unpruned at K=1 unless told
    avis = bundled_dir() == TRAINED_DIR and not args.no_prune and args.k is None
    policy_path = default_policy_path() if avis else None
    tau = None if args.no_prune else args.tau if args.tau is not None else math.pi / 4 if avis else None
    options = ["0", "1", "2", "3"]
    question = args.question + "\n" + "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", options))
    with VLM(model, mmproj, n_ctx=2048) as vlm:
        policy = None
        if policy_path is not None:
            from .policy import load_policy
            policy = load_policy(policy_path, vlm)
        ans = vlm.ask(DEMO_IMAGE, question, max_tokens=args.max_tokens, k=args.k or 1, seed=0, answer_tags=True,
                      options=options, tau=tau, policy=policy)
    how = (f"AVIS: KDV tau={tau:.3g} + policy {policy_path.parent.name}/{policy_path.name} picked K={ans.k}"
           if policy is not None else f"K={ans.k}" + (f", KDV tau={tau:.3g}" if tau is not None else ""))
    print(f"model: {model.parent.name}/{model.name}\nimage: {DEMO_IMAGE}\nquestion: {question}")
    print(f"output: {ans.text}\nanswer: {ans.answer} (votes {ans.votes})")
    print(f"[{how}; image tokens kept {ans.kept_tokens} of {ans.image_tokens}; "
          f"{ans.flops['total']:.2f}x the FLOPs of an unpruned greedy answer; {ans.timings['total_s'] * 1000:.0f} ms]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avis", description="AVIS test-time scaling for vision-language models in llama.cpp")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about one or more images")
    add_model_args(ask)
    add_avis_args(ask)
    ask.add_argument("--image", "-i", action="append", required=True, help="image path (repeat for several)")
    ask.add_argument("--json", action="store_true", help="print the whole result (votes, rollouts, timings) as JSON")
    ask.add_argument("question", help="the question")
    ask.set_defaults(func=_cmd_ask)

    show = sub.add_parser("show", help="write a PNG of the image with the tokens KDV prunes dimmed")
    add_model_args(show)
    show.add_argument("--image", "-i", required=True, help="image path")
    show.add_argument("--rho", type=float, default=None, help="fraction to prune (default: adaptive tau)")
    show.add_argument("--tau", type=_tau, default=math.pi / 4, help="adaptive threshold in radians (default pi/4)")
    show.add_argument("--cell-px", type=int, default=28, help="pixels per token cell in the output")
    show.add_argument("--out", "-o", default="kdv_overlay.png", help="output PNG")
    show.add_argument("question", nargs="?", default="Describe the image.", help="question for the prompt")
    show.set_defaults(func=_cmd_show)

    demo = sub.add_parser("demo", help="answer a question about the bundled image with the bundled default model")
    demo.add_argument("--k", type=int, default=None,
                      help="rollouts voted on (default: the bundled policy picks K; 1 = greedy)")
    demo.add_argument("--max-tokens", type=int, default=96, help="most tokens per rollout")
    demo.add_argument("--tau", type=_tau, default=None,
                      help="KDV adaptive pruning angle (default pi/4 on the model trained for pruned inputs)")
    demo.add_argument("--no-prune", action="store_true", help="keep every image token (and no policy)")
    demo.add_argument("question", nargs="?", default="How many red shapes are in the image?",
                      help="the question (options 0-3 are appended as A-D)")
    demo.set_defaults(func=_cmd_demo)

    from . import bench, calibrate  # a broken module fails loudly instead of its command vanishing

    calibrate.register_cli(sub)
    bench.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from .errors import AVISError

    try:
        return int(args.func(args) or 0)
    except AVISError as e:
        print(f"avis: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
