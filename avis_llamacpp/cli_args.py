"""The command-line arguments every `avis` subcommand shares (model files, context, pruning, answer tags), their
parsing, and the checks that run before any model loads or any file is written. cli.py, bench.py and
calibrate.py import from here; this module imports none of them (no import circle)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .errors import InvalidArgumentError

__all__ = ["parse_tau", "flash_attn_arg", "add_model_args", "add_pruning_args", "add_answer_tags_arg",
           "add_avis_args", "vlm_kwargs", "ask_kwargs", "question_with_options", "check_model_files",
           "check_input_file", "check_output_dir", "check_output_file", "check_sampling"]

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_tau(value: str) -> float | str:
    """tau in radians; 'pi/4'-style fractions of pi are accepted; 'auto': the policy's calibrated tau."""
    v = value.strip().lower().replace(" ", "")
    if v == "auto":
        return "auto"
    try:
        if v.startswith("pi/"):
            return math.pi / float(v[3:])
        if v.endswith("pi"):
            return float(v[:-2] or 1) * math.pi
        return float(v)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected an angle in radians such as 0.785 or pi/4, got {value!r}") \
            from None


_tau = parse_tau  # the older name (examples import it from avis_llamacpp.cli)


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
    p.add_argument("--no-repack", dest="repack", action="store_false",
                   help="keep weights out of llama.cpp's CPU extra buffer types (AMX, repacked layouts), as "
                        "llama-server's --no-repack: for a host whose AMX kernels fault on quantized models")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own logs")


def add_pruning_args(p: argparse.ArgumentParser, *, tau_default: float | None = None, no_prune: bool = False,
                     tau_help: str = "") -> argparse._MutuallyExclusiveGroup:
    """KDV pruning: --rho (alias --ratio) or --tau, one of them; `no_prune` adds --no-prune to the same group."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rho", "--ratio", dest="rho", type=float, default=None, metavar="RHO",
                   help="KDV fixed mode: fraction of image tokens to prune, 0 <= rho < 1 (--ratio is the same flag)")
    g.add_argument("--tau", type=parse_tau, default=tau_default,
                   help=tau_help or "KDV adaptive mode: prune tokens within tau radians of the mean key "
                                    "(e.g. pi/4 or 0.785)")
    if no_prune:
        g.add_argument("--no-prune", action="store_true", help="keep every image token")
    return g


def add_answer_tags_arg(p: argparse.ArgumentParser) -> None:
    """--answer-tags / --no-answer-tags, on by default in every subcommand."""
    p.add_argument("--answer-tags", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for <think>...</think><answer>...</answer> output and vote on the answers (default: on, "
                        "in ask, calibrate and bench alike; --no-answer-tags for a plain answer)")


def add_avis_args(p: argparse.ArgumentParser) -> None:
    """The AVIS knobs of `avis ask`: pruning (--rho / --tau), rollouts (--k / --policy) and decoding."""
    add_pruning_args(p)
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
    add_answer_tags_arg(p)
    p.add_argument("--options", default=None,
                   help="multiple-choice options separated by '|': written under the question as 'A. ...' lines "
                        "(as `avis demo` and `avis bench` items show them) and answers normalise to letters")
    p.add_argument("--early-stop", action="store_true", help="stop remaining rollouts once the vote is decided")


def vlm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """VLM keywords from the shared model flags (add_model_args)."""
    return dict(n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads_batch,
                n_gpu_layers=args.n_gpu_layers, chat_format=args.chat_format, verbose=args.verbose,
                flash_attn=args.flash_attn, repack=args.repack)


def split_options(text: str | None) -> list[str] | None:
    """--options "a|b|c" -> ["a", "b", "c"] (None when not given); empty options are refused."""
    if text is None:
        return None
    opts = [o.strip() for o in text.split("|")]
    if len(opts) < 2 or not all(opts) or len(opts) > len(OPTION_LETTERS):
        raise InvalidArgumentError(f"--options takes 2 to {len(OPTION_LETTERS)} non-empty options separated by '|', "
                                   f"got {text!r}")
    return opts


def question_with_options(question: str, options: Sequence[str] | None) -> str:
    """The question with its options written under it as 'A. option' lines (the layout of the demo and the
    shapes items), so the model sees what the letters mean."""
    if not options:
        return question
    return question + "\n" + "\n".join(f"{letter}. {o}" for letter, o in zip(OPTION_LETTERS, options))


def ask_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """VLM.ask keywords from the AVIS arguments (the policy file is read here, before any model loads)."""
    from .native import SamplingParams

    kw: dict[str, Any] = dict(max_tokens=args.max_tokens, ratio=args.rho, tau=args.tau, k=args.k, mode=args.mode,
                              seed=args.seed, answer_tags=args.answer_tags, early_stop=args.early_stop,
                              wave=args.wave, stopping=args.stopping, stop_threshold=args.stop_threshold,
                              options=split_options(args.options))
    if args.k > 1:
        kw["sampling"] = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    if args.policy:
        from .policy import load_policy
        kw["policy"] = load_policy(args.policy)
    return kw


def check_sampling(temperature: float, top_p: float) -> None:
    """The sampling knobs, checked as SamplingParams checks them (InvalidArgumentError naming the knob)."""
    from .native import SamplingParams

    SamplingParams(temperature=temperature, top_p=top_p)


def check_input_file(path: str | os.PathLike, what: str) -> None:
    """An input the command reads must be an existing file (a folder or a missing path: one clear error)."""
    p = Path(path)
    if p.is_dir():
        raise InvalidArgumentError(f"{what} {str(p)!r} is a folder, not a file")
    if not p.is_file():
        raise InvalidArgumentError(f"{what} {str(p)!r}: no such file")


def check_model_files(args: argparse.Namespace) -> None:
    """--model and --mmproj name existing files (checked before the model loads)."""
    check_input_file(args.model, "--model (text model GGUF)")
    check_input_file(args.mmproj, "--mmproj (vision projector GGUF)")


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """An output folder: absent (created later, when the run starts) or a folder, never an existing file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InvalidArgumentError(f"{what} {str(p)!r} is an existing file; give a folder (new or from an earlier run)")
    return p


def check_output_file(path: str | os.PathLike, what: str, suffixes: Sequence[str]) -> Path:
    """An output file: its folder exists, it is not a folder, and its suffix is one of `suffixes`."""
    p = Path(path)
    if p.is_dir():
        raise InvalidArgumentError(f"{what} {str(p)!r} is a folder; give a file name such as {str(p / 'out')}"
                                   f"{suffixes[0]}")
    if p.suffix.lower() not in suffixes:
        raise InvalidArgumentError(f"{what} {str(p)!r}: the file name must end in {' or '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidArgumentError(f"{what} {str(p)!r}: folder {str(parent)!r} does not exist")
    return p
