"""One query's steps after the prompt is rendered: check -> load -> (select + prefill, in scorer / prefix_hold)
-> features -> decide K -> decode K rollouts. Each step is a function of what it needs (no VLM), so it can be
read and tested alone; VLM.generate strings them together."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from . import answer as answers  # answers.normalised_answers read at call time (tests patch it)
from .errors import ContextOverflowError, InvalidArgumentError, SnapshotMismatchError
from .features import query_features
from .flops import TextDims
from .images import load_image
from .mtmd import ImageChunk, Projector
from .native import Context, Model, SamplingParams
from .options import QuerySettings
from .policy import resolve_pruning
from .prefill import ImagePrefill, PrefillResult, prefill
from .prefix_hold import PrefixHold, chunk_keys, selection_key
from .scorer import ImageMeta, ImageScorer
from .rollouts import EarlyStop, Rollout, check_capacity, rollout_params, run_parallel, run_snapshot, run_staged
from .snapshot import Snapshot, image_digest
from .stopping import StoppingRule
from .video import DEFAULT_MIN_FRAMES, DEFAULT_TOTAL_PIXELS, Video, load_video, pixel_budget
from .voting import can_be_overtaken

# the paper's VRS sampling for K > 1
VRS_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9)


def too_many_rollouts(k: int, n_seq_max: int) -> str:
    return (f"k={k} rollouts need n_seq_max >= {k} in mode='parallel' (this VLM has "
            f"n_seq_max={n_seq_max}); create the VLM with n_seq_max={k} or use mode='snapshot'")


def load_clip(src: Any, projector: Projector, n_ctx: int, *, fps: float | None = None, max_frames: int | None = None,
              max_pixels: int | None = None, total_pixels: int | None = None, allow_remote: bool = False) -> Video:
    """A video's frames sampled for this projector (video.py): frame count a multiple of its temporal patch, and by
    default a budget of half the context: in pixels (Qwen2.5-VL tokens, at most video.DEFAULT_TOTAL_PIXELS) so a
    long clip is downscaled rather than overflowing, and, for models that take frames one by one as images of a
    fixed token count, in frames (unless max_frames is given)."""
    knobs = {k: v for k, v in {"fps": fps, "max_frames": max_frames, "max_pixels": max_pixels}.items() if v is not None}
    if total_pixels is None:
        total_pixels = min(DEFAULT_TOTAL_PIXELS, pixel_budget(max(1, n_ctx // 2)))
    patch = projector.temporal_patch
    clip = load_video(src, temporal_patch=patch, total_pixels=total_pixels, allow_remote=allow_remote, **knobs)
    if patch == 1 and max_frames is None:
        fit = max(1, (n_ctx // 2) // max(1, projector.image_tokens(clip.frames[0])))
        if len(clip.frames) > fit:  # fewer frames, evenly spread, rather than a prompt the context cannot hold
            clip = load_video(src, temporal_patch=1, total_pixels=total_pixels, allow_remote=allow_remote,
                              **{**knobs, "max_frames": fit, "min_frames": min(DEFAULT_MIN_FRAMES, fit)})
    return clip


def clip_record(clip: Video) -> dict[str, Any]:
    """What Answer.video reports of a sampled clip: frames taken, their times, size, source rate and the settings."""
    return {"frames": len(clip.frames), "timestamps": [round(float(t), 4) for t in clip.timestamps],
            "size": list(clip.size), "source_fps": float(clip.source_fps), "duration": float(clip.duration),
            **clip.settings}


def check_inputs(prompt_text: Any, images: Any, on_text: Any) -> list[Any]:
    """Type checks for generate's per-call data (InvalidArgumentError naming the argument); a single image
    is accepted where a sequence is expected."""
    if not isinstance(prompt_text, str):
        raise InvalidArgumentError(f"prompt_text must be a str, got {type(prompt_text).__name__}")
    try:
        prompt_text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"prompt text is not valid Unicode ({e.reason} at position {e.start}); "
                                   "remove lone surrogates / undecodable characters") from None
    if images is None:
        images = []
    elif (isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray))
          or hasattr(images, "getpixel")):
        images = [images]  # one image (path, bytes, array or PIL image), not a sequence of them
    if on_text is not None and not callable(on_text):
        raise InvalidArgumentError("on_text must be callable (it receives each new piece of text)")
    return list(images)


def check_query(q: QuerySettings, n_seq_max: int, prompt_text: Any, images: Any, on_text: Any) -> list[Any]:
    """The checks that need the VLM's n_seq_max and the per-call data's types, before any image is read."""
    if q.mode == "staged" and q.policy is None and min(q.wave, q.k) > n_seq_max:
        raise InvalidArgumentError(f"a staged wave of {min(q.wave, q.k)} rollouts needs n_seq_max >= "
                                   f"{min(q.wave, q.k)} (this VLM has n_seq_max={n_seq_max}); "
                                   "lower wave or create the VLM with a larger n_seq_max")
    images = check_inputs(prompt_text, images, on_text)
    if q.policy is None and q.mode == "parallel" and q.k > n_seq_max:
        raise InvalidArgumentError(too_many_rollouts(q.k, n_seq_max))
    return images


def pruning(q: QuerySettings) -> tuple[float | None, float | None]:
    """(ratio, tau) of the query: the caller's, tau="auto" the policy's calibrated tau, else the policy's pruning
    (a policy decides how much to see too); policy.resolve_pruning says it in full."""
    return resolve_pruning(q)


def load_inputs(images: list[Any], allow_remote: bool, model_id: str, prompt_text: str, snapshot: Snapshot | None,
                ratio: float | None, tau: float | None, selector: Any = "kdv", marker: str = "") -> list[np.ndarray]:
    """Decode the images to arrays and check them (and the prompt) against the snapshot, if one is given: same
    model, prefix text, image digests and pruning (snapshots are pruned by KDV), and no media marker after the
    prefix (the snapshot holds every image the prompt may have)."""
    arrays = [load_image(im, allow_remote=allow_remote) for im in images]
    if snapshot is not None:
        snapshot.check(model_id, prompt_text[:len(snapshot.prefix_text)],
                       [image_digest(a) for a in arrays] if arrays else None)
        pruned = ratio is not None or tau is not None
        if snapshot.pruning != {"ratio": ratio, "tau": tau} and pruned:
            raise SnapshotMismatchError(f"the snapshot was pruned with {snapshot.pruning}, not ratio={ratio}, "
                                        f"tau={tau}")
        if pruned and selector != "kdv":
            raise SnapshotMismatchError(f"the snapshot's kept tokens were chosen by KDV, not by selector "
                                        f"{selector if isinstance(selector, str) else 'callable'!r}; ask without "
                                        "a snapshot to use another selector")
        if marker and marker in prompt_text[len(snapshot.prefix_text):]:
            raise SnapshotMismatchError(f"the prompt has more media markers than the snapshot's "
                                        f"{len(snapshot.image_digests)} image(s): a snapshot holds every image "
                                        "its prompt may have")
    return arrays


def features(pre: PrefillResult, scores: list[np.ndarray], question: str, n_embd: int) -> np.ndarray:
    """The query's features (features.py): what the policy decides K from, and Answer.features."""
    return query_features([im.embeddings for im in pre.images], scores, n_embd=n_embd,
                          n_text_tokens=pre.n_kv - sum(im.n_kept for im in pre.images), question=question)


def decide_k(q: QuerySettings, feats: np.ndarray) -> tuple[int, float | None]:
    """K and p_hat: the caller's K, or the policy's (checked like a caller's)."""
    if q.policy is None:
        return q.k, None
    k, p_hat = q.policy.decide(feats)
    return QuerySettings.from_kwargs(q, k=k).k, p_hat


def policy_sampling(q: QuerySettings, k: int) -> SamplingParams | None:
    """K > 1 under a policy calibrated with another sampling than the default: that sampling (K = 1 stays
    greedy)."""
    s = getattr(q.policy, "sampling", None) if q.policy is not None and k > 1 else None
    return SamplingParams(temperature=s["temperature"], top_p=s["top_p"]) if s else None


def make_rollout_params(k: int, sampling: SamplingParams | None, seed: int) -> list[SamplingParams]:
    """K=1: greedy unless the caller gives sampling; K>1: the paper's sampling (or the caller's), one
    derived seed per rollout."""
    if k == 1:
        return [sampling or SamplingParams(seed=seed)]
    base = sampling or VRS_SAMPLING
    return rollout_params(k, SamplingParams(**{**base.__dict__, "seed": seed}))


def settled(rule: StoppingRule, k_max: int, options: Sequence[str] | None) -> Callable[[list[Rollout]], bool]:
    """The staged runner's check: the stopping rule on the normalised answers of the rollouts so far."""
    return lambda done: bool(rule(answers.normalised_answers(done, options), k_max))


def early_stopper(options: Sequence[str] | None) -> EarlyStop:
    """Stop the remaining rollouts once the leading answer cannot be overtaken."""
    def decided(done: list[Rollout], n_remaining: int) -> bool:
        counts: dict[str, int] = {}
        for a in answers.normalised_answers(done, options):
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        return bool(counts) and not can_be_overtaken(counts, n_remaining)
    return decided


def decode(ctx: Context, model: Model, pre: PrefillResult, q: QuerySettings, k: int,
           on_text: Callable[[str], None] | None) -> tuple[list[Rollout], int, float]:
    """Decode K rollouts from the prefilled sequence 0 in the query's mode, within the context left; returns
    the rollouts, the staged waves run and the decode time (s)."""
    params = make_rollout_params(k, q.sampling or policy_sampling(q, k), q.seed)
    stopper = early_stopper(q.options) if q.early_stop and k > 1 else None
    budget = ctx.n_ctx - pre.n_kv
    if budget <= 0:
        raise ContextOverflowError(f"prompt fills the whole context ({pre.n_kv} of n_ctx={ctx.n_ctx})")
    width = min(q.wave, k) if q.mode == "staged" else k  # rollouts decoding at once
    max_new = min(q.max_tokens, budget // (width if q.mode in ("parallel", "staged") else 1))
    check_capacity(ctx, pre.n_kv, width, max_new, "parallel" if q.mode == "staged" else q.mode)
    kw: dict[str, Any] = {"max_tokens": max_new, "stop": q.stop, "stop_after": q.stop_after,
                          "early_stop": stopper, "on_text": on_text}
    n_waves = 0
    t_dec = time.perf_counter()
    if q.mode == "staged":
        rollouts, n_waves = run_staged(ctx, model, pre.n_past, ctx.logits(-1), params, wave=q.wave,
                                       settled=settled(q.stopping_rule(), k, q.options), **kw)
    elif q.mode == "parallel":
        rollouts = run_parallel(ctx, model, pre.n_past, params, **kw)
    else:
        rollouts = run_snapshot(ctx, model, pre.n_past, ctx.logits(-1), params, **kw)
    return rollouts, n_waves, time.perf_counter() - t_dec


def prefill_after(ctx: Context, model: Model, snap: Snapshot, suffix: str) -> tuple[PrefillResult, list[np.ndarray]]:
    """Restore a snapshot's prefilled prefix into sequence 0 and decode the rest of the prompt after it."""
    t0 = time.perf_counter()
    if snap.n_kv > ctx.n_ctx:
        raise ContextOverflowError(f"the snapshot holds {snap.n_kv} KV cells but n_ctx is {ctx.n_ctx}; "
                                   "create the VLM with a larger n_ctx")
    try:
        ctx.set_seq_state(snap.state, 0)
    except ContextOverflowError:
        raise SnapshotMismatchError("could not restore the snapshot's KV state: the file is corrupt or was made "
                                    "with a different context layout; make the snapshot again") from None
    lo, hi = ctx.seq_pos_min(0), ctx.seq_pos_max(0)
    if (lo, hi) != (0, snap.n_past - 1):
        raise SnapshotMismatchError(f"the snapshot's KV state covers positions {lo}..{hi}, not "
                                    f"0..{snap.n_past - 1}: the file is corrupt; make the snapshot again")
    tokens = model.tokenize(suffix, add_special=False, parse_special=True)
    if not tokens:
        raise InvalidArgumentError("nothing to decode after the snapshot's prefix (empty question?)")
    if snap.n_kv + len(tokens) > ctx.n_ctx:
        raise ContextOverflowError(f"prompt needs {snap.n_kv + len(tokens)} tokens but n_ctx is {ctx.n_ctx}")
    ctx.decode_tokens(tokens, snap.n_past, 0, logits_last=True)
    images = [ImagePrefill.from_record(meta, emb) for meta, emb in zip(snap.images, snap.embeddings)]
    pre = PrefillResult(snap.n_past + len(tokens), snap.n_kv + len(tokens), images, 0.0, time.perf_counter() - t0)
    return pre, list(snap.scores)


def text_dims(model: Model) -> TextDims:
    """The text model's dimensions for the FLOPs accounting (flops.py)."""
    import llama_cpp

    arch = model.architecture
    n_ff = int(model.meta(f"{arch}.feed_forward_length") or 4 * model.n_embd)
    return TextDims(n_layer=model.n_layer, n_embd=model.n_embd, n_head=llama_cpp.llama_model_n_head(model.ptr),
                    n_head_kv=llama_cpp.llama_model_n_head_kv(model.ptr), n_ff=n_ff, n_vocab=model.n_vocab)


def select_and_prefill(ctx: Context, projector: Projector, scorer: ImageScorer, hold: PrefixHold | None,
                   prompt_text: str, arrays: list[np.ndarray], q: QuerySettings, ratio: float | None,
                   tau: float | None, *, video: bool = False,
                   cache_ids: tuple[str, str] = ("", "")) -> tuple[PrefillResult, list[np.ndarray]]:
    """Tokenize, encode (with token selection) and prefill sequence 0, through the prefix cache's hold when one
    is given (cache_ids: its cache id and the model id); returns the prefill and each image chunk's KDV scores.
    A video's chunks form one selection group (unless q.video_selection is 'per_chunk')."""
    image_meta: ImageMeta = {}
    pruned = ratio is not None or tau is not None
    joint = video and pruned and q.video_selection == "joint"
    if not pruned:
        select: Any = scorer.recorder(image_meta)
    elif joint:
        select = scorer.group_selector(ratio, tau, image_meta, q.selector, q.seed)
    else:
        select = scorer.kdv_selector(ratio, tau, image_meta, q.selector, q.seed)
    scores: list[np.ndarray] = []
    with projector.tokenize(prompt_text, arrays, video=video) as prompt:
        groups = [[i for i, c in enumerate(prompt.chunks) if isinstance(c, ImageChunk)]] if joint else []
        if hold is not None:
            keys = chunk_keys(prompt, arrays, selection_key(ratio, tau, q.selector, q.seed, joint))
            pre, m, entry = hold.prefill_cached(prompt, keys, cache_ids[0], str(q.cache_namespace), select, groups,
                                                prompt_text=prompt_text, model_id=cache_ids[1])
            scores = list(entry.scores[:m.n_images]) if entry is not None else []
        else:
            pre = prefill(ctx, projector, prompt, select=select, groups=groups)
    for im in pre.images[len(scores):]:
        meta = image_meta.get(im.index, {})
        scores.append(meta.pop("scores"))
        im.meta = meta
    if hold is not None:
        hold.set_pending_scores(scores)
    return pre, scores



def take_snapshot(ctx: Context, projector: Projector, scorer: ImageScorer, prefix_text: str,
                  arrays: list[np.ndarray], ratio: float | None, tau: float | None, model_id: str) -> Snapshot:
    """Prefill the prompt up to the question (KDV applied) into sequence 0 and keep its KV state and image
    records as a Snapshot (the caller clears the context afterwards)."""
    pre, scores = select_and_prefill(ctx, projector, scorer, None, prefix_text, arrays, QuerySettings(), ratio, tau)
    state = ctx.seq_state(0)
    metas = [im.record(drop=("select_s",)) for im in pre.images]
    return Snapshot(model_id=model_id, prefix_text=prefix_text, image_digests=[image_digest(a) for a in arrays],
                    pruning={"ratio": ratio, "tau": tau}, n_past=pre.n_past, n_kv=pre.n_kv, state=state,
                    images=metas, embeddings=[im.embeddings for im in pre.images], scores=scores)
