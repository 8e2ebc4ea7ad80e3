"""The `avis` command: ask about images, see what KDV keeps, calibrate a policy, benchmark. This module parses
and dispatches; the shared arguments and their checks live in cli_args.py, bench and calibrate in their own modules."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, Sequence

from .cli_args import _tau  # noqa: F401 (the older import path of parse_tau, used by the examples)
from .cli_args import (add_avis_args, add_model_args, add_pruning_args, ask_kwargs, check_input_file, check_model_files,
                       check_output_file, question_with_options, vlm_kwargs)
from .errors import AVISError, InvalidArgumentError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def open_vlm(args: argparse.Namespace) -> Any:
    """The VLM of the shared model flags (room for --k rollouts)."""
    from .pipeline import VLM

    return VLM(args.model, args.mmproj, n_seq_max=max(8, getattr(args, "k", 1)), **vlm_kwargs(args))


def _check_images(images: Sequence[str]) -> None:
    """Local --image paths exist and are files (URLs and data: URIs are left to the image loader)."""
    for image in images:
        if not image.startswith(("http://", "https://", "data:")):
            check_input_file(image[7:] if image.startswith("file://") else image, "--image")


def _add_video_args(p: argparse.ArgumentParser) -> None:
    """--video (instead of --image) and how its frames are sampled (video.py: qwen-vl-utils' rules)."""
    p.add_argument("--video", default=None,
                   help="video file (mp4, webm, mov, mkv, avi, or an animated GIF / WebP / PNG) instead of --image: "
                        "sampled frames pruned as one KDV selection")
    p.add_argument("--fps", type=float, default=None, help="video frames sampled per second (default 2)")
    p.add_argument("--max-frames", type=int, default=None, help="most video frames sampled (default 32)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="most pixels per sampled video frame (default 602112; the clip's total budget also applies)")


def _media_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """VLM.ask's video keywords from --video / --fps / --max-frames / --max-pixels ({} for images); checks that
    exactly one of --image / --video is given and that the video file exists (before any model loads)."""
    image = getattr(args, "image", None)
    if (image is None) == (args.video is None):
        raise InvalidArgumentError("give --image or --video (one of them)")
    if args.video is None:
        if args.fps is not None or args.max_frames is not None or args.max_pixels is not None:
            raise InvalidArgumentError("--fps, --max-frames and --max-pixels sample a --video; give one")
        return {}
    if not args.video.startswith(("http://", "https://", "data:")):
        check_input_file(args.video[7:] if args.video.startswith("file://") else args.video, "--video")
    for flag, v in (("--fps", args.fps), ("--max-frames", args.max_frames), ("--max-pixels", args.max_pixels)):
        if v is not None and not v > 0:
            raise InvalidArgumentError(f"{flag} must be > 0, got {v}")
    return {"video": args.video, "fps": args.fps, "max_frames": args.max_frames, "max_pixels": args.max_pixels}


def _cmd_ask(args: argparse.Namespace) -> int:
    from .options import QuerySettings

    kw = ask_kwargs(args)
    QuerySettings.from_kwargs(**{k: v for k, v in kw.items() if k != "answer_tags"})  # bad knobs fail before loading
    video = _media_kwargs(args)
    check_model_files(args)
    _check_images(args.image or [])
    question = question_with_options(args.question, kw["options"])
    with open_vlm(args) as vlm:
        ans = vlm.ask(args.image, question, **kw, **video)
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
    from .kdv import validate_pruning
    from .overlay import add_legend, render_overlay

    validate_pruning(ratio=args.rho, tau=args.tau if args.rho is None else None)
    if args.cell_px < 1:
        raise InvalidArgumentError(f"--cell-px must be >= 1, got {args.cell_px}")
    video = _media_kwargs(args)
    check_output_file(args.out, "--out", IMAGE_SUFFIXES)
    check_model_files(args)
    if video:
        return _show_video(args, video)
    _check_images([args.image])
    with open_vlm(args) as vlm:
        ans = vlm.ask(args.image, args.question, max_tokens=1, ratio=args.rho,
                      tau=args.tau if args.rho is None else None)
        im = ans.images[0]
        cells = _kept_cells(vlm, im)
    img = render_overlay(args.image, cells, tuple(im["grid"]), cell_px=args.cell_px)
    if not args.no_legend:
        how = (f"KDV rho = {args.rho:g}: a fixed fraction pruned" if args.rho is not None
               else f"KDV tau = {args.tau:.3g} rad: tokens within tau of the mean key pruned")
        img = add_legend(img, im["n_kept"], im["n_tokens"], how)
    img.save(args.out)
    print(f"{args.out}: kept {im['n_kept']} of {im['n_tokens']} image tokens ({im.get('key_source')})")
    return 0


def _kept_cells(vlm: Any, image: dict[str, Any]) -> list[int]:
    """The row-major grid cells of an image's kept tokens (LLM token order is the family's: Llama 4 runs column by
    column), for drawing them over the image."""
    cells = vlm.family.token_cells(int(image["n_tokens"]), tuple(image["grid"]))
    return [int(cells[i]) for i in image["kept"]]


def _show_video(args: argparse.Namespace, video: dict[str, Any]) -> int:
    """avis show --video: a contact sheet of the sampled frames with each chunk's kept tokens drawn over them."""
    from .overlay import add_legend, render_video_overlay
    from .query import load_clip

    pruning = dict(ratio=args.rho, tau=args.tau if args.rho is None else None)
    knobs = {k: v for k, v in video.items() if k != "video"}
    with open_vlm(args) as vlm:
        clip = load_clip(video["video"], vlm.projector, vlm.settings.n_ctx, **knobs)
        ans = vlm.ask(None, args.question, video=clip, max_tokens=1, **knobs, **pruning)
        tp = vlm.projector.temporal_patch
        chunks = [(_kept_cells(vlm, im), tuple(im["grid"])) for im in ans.images]
    img = render_video_overlay(clip.frames, chunks, temporal_patch=tp, timestamps=clip.timestamps,
                               cell_px=args.cell_px)
    kept, total = sum(ans.kept_tokens), sum(ans.image_tokens)
    if not args.no_legend:
        how = (f"KDV rho = {args.rho:g} over the whole video" if args.rho is not None
               else f"KDV tau = {args.tau:.3g} rad over the whole video")
        img = add_legend(img, kept, total, f"{how}; {len(clip.frames)} frames, {len(chunks)} chunks")
    img.save(args.out)
    print(f"{args.out}: kept {kept} of {total} video tokens over {len(clip.frames)} frames "
          f"({len(chunks)} chunks: {ans.kept_tokens})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import json

    from .defaults import (DEMO_CLIP, DEMO_CLIP_QUESTION, DEMO_IMAGE, TRAINED_DIR, bundled_dir, default_model_paths,
                           default_policy_path, video_model_paths)
    from .pipeline import VLM

    if args.video:  # the clip-trained model on the bundled clip, pruned as one selection over the whole clip
        model, mmproj, bundled_policy = video_model_paths()
        avis = not args.no_prune and args.k is None
        policy_path = bundled_policy if avis else None
        clip = json.loads(DEMO_CLIP_QUESTION.read_text())
        options = clip["options"]
        question = question_with_options(args.question or clip["question"], options)
        media: dict = {"image": None, "video": DEMO_CLIP}
    else:
        model, mmproj = default_model_paths()
        # the full AVIS query (adaptive KDV + the calibrated K policy) on the model trained for pruned inputs;
        # --k / --tau / --no-prune override it, and the older LLaVA-style model runs unpruned at K=1 unless told
        avis = bundled_dir() == TRAINED_DIR and not args.no_prune and args.k is None
        policy_path = default_policy_path() if avis else None
        options = ["0", "1", "2", "3"]
        question = question_with_options(args.question or "How many red shapes are in the image?", options)
        media = {"image": DEMO_IMAGE}
    tau = None if args.no_prune else args.tau if args.tau is not None else "auto" if avis else None
    with VLM(model, mmproj, n_ctx=2048, n_threads=args.threads) as vlm:
        policy = None
        if policy_path is not None:
            from .policy import load_policy
            policy = load_policy(policy_path, vlm)
        if tau == "auto":  # the tau calibrated for this model (the bundled policy's; pi/4 and a warning if none)
            from .options import QuerySettings
            from .policy import resolve_pruning
            tau = resolve_pruning(QuerySettings(tau=tau, policy=policy))[1]
        ans = vlm.ask(question=question, **media, max_tokens=args.max_tokens, k=args.k or 1, seed=0,
                      answer_tags=True, options=options, tau=tau, policy=policy)
    calibrated = " (calibrated)" if policy is not None and policy.calibrated_tau == tau else ""
    how = (f"AVIS: KDV tau={tau:.3g}{calibrated} + policy {policy_path.parent.name}/{policy_path.name} "
           f"picked K={ans.k}"
           if policy is not None else f"K={ans.k}" + (f", KDV tau={tau:.3g}" if tau is not None else ""))
    shown = (f"video: {DEMO_CLIP} ({ans.video['frames']} frames, {len(ans.kept_tokens)} chunks; expected answer "
             f"{clip['answer']})" if args.video else f"image: {DEMO_IMAGE}")
    print(f"model: {model.parent.name}/{model.name}\n{shown}\nquestion: {question}")
    print(f"output: {ans.text}\nanswer: {ans.answer} (votes {ans.votes})")
    print(f"[{how}; image tokens kept {ans.kept_tokens} of {ans.image_tokens}; "
          f"{ans.flops['total']:.2f}x the FLOPs of an unpruned greedy answer; {ans.timings['total_s'] * 1000:.0f} ms]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avis",
                                     description="AVIS test-time scaling for vision-language models in llama.cpp")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about one or more images, or a video")
    add_model_args(ask)
    add_avis_args(ask)
    ask.add_argument("--image", "-i", action="append", default=None, help="image path (repeat for several)")
    _add_video_args(ask)
    ask.add_argument("--json", action="store_true", help="print the whole result (votes, rollouts, timings) as JSON")
    ask.add_argument("question", help="the question")
    ask.set_defaults(func=_cmd_ask)

    show = sub.add_parser("show", help="write a PNG of the image with the tokens KDV prunes dimmed")
    add_model_args(show)
    show.add_argument("--image", "-i", default=None, help="image path")
    _add_video_args(show)
    add_pruning_args(show, tau_default=math.pi / 4,
                     tau_help="KDV adaptive threshold in radians (default pi/4; --rho prunes a fixed fraction)")
    show.add_argument("--cell-px", type=int, default=28, help="pixels per token cell in the output")
    show.add_argument("--no-legend", action="store_true",
                      help="no legend strip under the image (kept / pruned counts, what dark and crossed mean)")
    show.add_argument("--out", "-o", default="kdv_overlay.png",
                      help="output image file (.png, .jpg, .webp; its folder must exist)")
    show.add_argument("question", nargs="?", default="Describe the image.", help="question for the prompt")
    show.set_defaults(func=_cmd_show)

    demo = sub.add_parser("demo", help="answer a question about the bundled image with the bundled default model")
    demo.add_argument("--k", type=int, default=None,
                      help="rollouts voted on (default: the bundled policy picks K; 1 = greedy)")
    demo.add_argument("--max-tokens", type=int, default=96, help="most tokens per rollout")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    demo.add_argument("--tau", type=_tau, default=None,
                      help="KDV adaptive pruning angle (default on the model trained for pruned inputs: auto, the "
                           "tau calibrated for it, from its bundled policy)")
    demo.add_argument("--no-prune", action="store_true", help="keep every image token (and no policy)")
    demo.add_argument("--video", action="store_true",
                      help="ask the bundled clip-trained model about the bundled clip (8 frames), pruned as one "
                           "selection over the whole clip")
    demo.add_argument("question", nargs="?", default=None,
                      help="the question (image: 'How many red shapes are in the image?' with options 0-3 appended "
                           "as A-D; --video: the clip's own question and options)")
    demo.set_defaults(func=_cmd_demo)

    from . import bench, calibrate  # a broken module fails loudly instead of its command vanishing

    calibrate.register_cli(sub)
    bench.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AVISError as e:
        print(f"avis: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command could not read or write: one line, not a traceback
        print(f"avis: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
