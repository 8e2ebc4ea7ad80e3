"""The public object: load a text model + mmproj once, then answer questions about images.

One query: load images -> mtmd tokenize -> encode each image (keys captured) -> optional KDV selection ->
prefill sequence 0 -> K rollouts sharing that prefill -> answer extraction and vote. With nothing pruned and
K = 1 this is the vanilla path and reproduces stock llama-cpp-python token for token."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from .capture import KeyCapture
from .families import ChunkGeometry, Family, TokenKeys, family_for
from .errors import ClosedError, ContextOverflowError, InvalidArgumentError, SnapshotMismatchError
from .flops import TextDims, encoder_flops, relative_flops
from .images import ImageInput, load_frames, load_image
from .features import query_features
from .kdv import (ImageTokens, KDVSelection, TokenSelector, check_kept, kdv_scores, make_selector, prune,
                  validate_pruning)
from .mtmd import ImageChunk, Projector
from .native import Context, ContextSettings, FlashAttn, Model, SamplingParams
from .options import MODES, SELECTORS, QuerySettings  # noqa: F401 (MODES, SELECTORS re-exported)
from .prefill import ChunkSelector, ImagePrefill, PrefillResult, Resume, prefill
from .prefix_cache import NO_MATCH, CachedChunk, ChunkKey, ImageKey, PrefixEntry, PrefixStore, TextKey
from .prompt import KNOWN_FORMATS, ChatFormat, guess_format, render, user_message
from .snapshot import Snapshot, file_fingerprint, image_digest
from .rollouts import EarlyStop, Rollout, check_capacity, rollout_params, run_parallel, run_snapshot, run_staged
from .stopping import StoppingRule
from .voting import ANSWER_PROMPT_SUFFIX, can_be_overtaken, extract_answer, majority_vote, normalize_answer

logger = logging.getLogger(__name__)

_IMAGE_URL = "avis-image://{}"  # placeholder URLs swapped for the media marker after rendering

DEFAULT_N_CTX = 4096  # capped at the model's training context when n_ctx is not given
# the paper's VRS sampling for K > 1
VRS_SAMPLING = SamplingParams(temperature=0.7, top_p=0.9)


class QueryPolicy(Protocol):
    """Decides per query how much to see (ratio / tau for KDV) and how much to think (K)."""

    ratio: float | None
    tau: float | None

    def decide(self, features: np.ndarray) -> tuple[int, float | None]:
        """K for this query and the predicted solvability p_hat (None if the policy has no predictor)."""
        ...


@dataclass
class Answer:
    """The result of one query.

    `text` is the chosen rollout's full text (the vanilla answer when K = 1); `answer` the voted, normalised
    answer extracted from the rollouts (None when none had one)."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int  # KV-cache cells used by the prompt (text + kept image tokens)
    image_tokens: list[int]  # per image, before pruning
    kept_tokens: list[int]  # per image, after pruning
    timings: dict[str, float] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)  # per image: grid, kept indices, KDV summary
    rollouts: list[Rollout] = field(default_factory=list, repr=False)
    answer: str | None = None
    votes: dict[str, int] = field(default_factory=dict)
    k: int = 1
    mode: str = "parallel"
    flops: dict[str, float] = field(default_factory=dict)
    early_stopped: int = 0  # rollouts cancelled because the vote was decided
    # decode tokens early stopping saved, estimated: each cancelled rollout would have run as long as the mean
    # finished one (or as far as it already got); exact when every rollout runs to max_tokens
    tokens_saved: int = 0
    features: np.ndarray | None = field(default=None, repr=False)  # see features.py
    p_hat: float | None = None  # the policy's predicted solvability, when a policy chose K
    # staged mode: rollouts of K never started because the stopping rule settled the vote (exact), and waves run
    rollouts_saved: int = 0
    waves: int = 0
    # prefix cache: whether the prompt's start came from an earlier prompt's KV, and how many cells were reused
    prefix_reused: bool = False
    tokens_skipped: int = 0

    @property
    def decode_tokens(self) -> list[int]:
        return [len(r.tokens) for r in self.rollouts]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (kept indices omitted)."""
        return {"answer": self.answer, "votes": self.votes, "text": self.text, "tokens": self.tokens,
                "finish_reason": self.finish_reason, "k": self.k, "mode": self.mode,
                "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
                "kept_tokens": self.kept_tokens, "decode_tokens": self.decode_tokens,
                "early_stopped": self.early_stopped,
                "tokens_saved": self.tokens_saved, "rollouts_saved": self.rollouts_saved, "waves": self.waves,
                "prefix_reused": self.prefix_reused, "tokens_skipped": self.tokens_skipped,
                "p_hat": self.p_hat, "timings": self.timings,
                "flops": self.flops,
                "images": [{k: v for k, v in im.items() if k != "kept"} for im in self.images],
                "rollouts": [{"text": r.text, "tokens": r.tokens, "mean_logprob": r.mean_logprob,
                              "finish_reason": r.finish_reason, "seed": r.seed} for r in self.rollouts]}


def estimate_tokens_saved(rollouts: Sequence[Rollout]) -> int:
    """Decode tokens early stopping saved: a cancelled rollout is assumed to have needed as many tokens as the
    finished rollouts on average (at least what it had already decoded). Exact when all run to max_tokens."""
    finished = [len(r.tokens) for r in rollouts if r.finish_reason != "early_stop"]
    if not finished:
        return 0
    typical = round(float(np.mean(finished)))
    return sum(max(0, typical - len(r.tokens)) for r in rollouts if r.finish_reason == "early_stop")


class VLM:
    """A vision-language model in llama.cpp: text GGUF + mmproj GGUF, one context, one projector.

    The context holds n_seq_max sequences in a unified KV cache so up to n_seq_max rollouts can share one
    prefill. Queries are serialised by a lock: one object may be shared between threads.
    flash_attn ("auto" | True | False) applies to the text context and the vision encoder; "auto" (llama.cpp's
    default) enables it where the backend supports it. Stock llama_cpp.Llama disables it: pass flash_attn=False
    to reproduce its outputs exactly (with it on, K/V go through f16, so logits differ slightly).
    """

    def __init__(self, model_path: str | os.PathLike | Model, mmproj_path: str | os.PathLike, *, n_ctx: int | None = None,
                 n_batch: int = 512, n_ubatch: int = 512, n_seq_max: int = 8, n_threads: int | None = None,
                 n_threads_batch: int | None = None, n_gpu_layers: int = 0, use_gpu: bool = True,
                 flash_attn: FlashAttn = "auto", chat_format: str | ChatFormat = "auto", system_prompt: str | None = None,
                 allow_remote_images: bool = False, capture_keys: bool = True, verbose: bool = False,
                 prefix_cache: bool = False, prefix_store: PrefixStore | None = None) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self.key_capture = KeyCapture() if capture_keys else None
        self._capture_warned = False
        # validated before anything is loaded, so bad settings cost nothing and never reach llama.cpp
        self.settings = ContextSettings(n_ctx=DEFAULT_N_CTX if n_ctx is None else n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max,
                                        n_threads=n_threads, n_threads_batch=n_threads_batch, flash_attn=flash_attn)
        try:
            self.model = model_path if isinstance(model_path, Model) else Model(model_path, n_gpu_layers=n_gpu_layers,
                                                                               verbose=verbose)
            if n_ctx is None and 0 < self.model.n_ctx_train < self.settings.n_ctx:
                # default: 4096, or the model's training context when shorter (no overflow past what it learned)
                self.settings = dataclasses.replace(self.settings, n_ctx=self.model.n_ctx_train)
            self.ctx = Context(self.model, self.settings)
            self.projector = self._make_projector(mmproj_path, use_gpu, flash_attn, verbose)
            if self.key_capture is not None:
                self.key_capture.use_key_names(self.projector.family.key_names)
        except BaseException:
            # free what was loaded here now, not at garbage collection (long-running servers retry loads);
            # a Model the caller passed in stays theirs
            for part in ("projector", "ctx") + (() if isinstance(model_path, Model) else ("model",)):
                obj = getattr(self, part, None)
                if obj is not None:
                    obj.close()
            self._closed = True
            raise
        if isinstance(chat_format, ChatFormat):
            self.chat_format = chat_format
        elif chat_format == "auto":
            self.chat_format = guess_format(self.model.architecture, self.projector.projector_type,
                                            self.model.meta("tokenizer.chat_template"))
        elif chat_format in KNOWN_FORMATS:
            self.chat_format = KNOWN_FORMATS[chat_format]
        else:
            raise InvalidArgumentError(f"unknown chat_format {chat_format!r}; use 'auto' or one of {sorted(KNOWN_FORMATS)}")
        self.system_prompt = system_prompt
        self.allow_remote_images = allow_remote_images
        self.text_dims = self._text_dims()
        self._model_id: str | None = None
        # prefix cache (prefix_cache.py): sequence 0 keeps the last prompt's cells (the live entry) for the next
        # query to reuse; prefix_store optionally keeps earlier prompts' KV states too
        if prefix_store is not None and not isinstance(prefix_store, PrefixStore):
            raise InvalidArgumentError(f"prefix_store must be a PrefixStore, got {type(prefix_store).__name__}")
        self.prefix_cache = bool(prefix_cache)
        self.prefix_store = prefix_store
        self._live: PrefixEntry | None = None
        self._live_span: tuple[int, int] = (-1, -1)  # seq 0's (pos_min, pos_max) when the live entry was kept
        self._pending: PrefixEntry | None = None
        self._prefix_cache_id: str | None = None

    @classmethod
    def from_llama(cls, llama: Any, mmproj_path: str | os.PathLike, **kwargs: Any) -> "VLM":
        """A VLM on the model an existing llama_cpp.Llama already loaded (its weights are shared, not copied);
        context size, batch and threads default to the Llama's."""
        kwargs.setdefault("n_ctx", llama.n_ctx())
        kwargs.setdefault("n_batch", llama.n_batch)
        kwargs.setdefault("n_threads", llama.n_threads)
        kwargs.setdefault("verbose", llama.verbose)
        return cls(Model.borrow(llama.model, llama.model_path, owner=llama), mmproj_path, **kwargs)

    def _make_projector(self, mmproj_path: str | os.PathLike, use_gpu: bool, flash_attn: FlashAttn,
                        verbose: bool) -> Projector:
        return Projector(mmproj_path, self.model, n_threads=self.settings.resolved_threads()[0], use_gpu=use_gpu,
                         flash_attn=flash_attn, verbose=verbose, key_capture=self.key_capture)

    def _text_dims(self) -> TextDims:
        import llama_cpp

        arch = self.model.architecture
        n_ff = int(self.model.meta(f"{arch}.feed_forward_length") or 4 * self.model.n_embd)
        return TextDims(n_layer=self.model.n_layer, n_embd=self.model.n_embd,
                        n_head=llama_cpp.llama_model_n_head(self.model.ptr),
                        n_head_kv=llama_cpp.llama_model_n_head_kv(self.model.ptr), n_ff=n_ff,
                        n_vocab=self.model.n_vocab)

    # -- prompt ---------------------------------------------------------------------------------------
    def render_messages(self, messages: Sequence[Mapping[str, Any]], image_urls: Sequence[str] = ()) -> str:
        """Chat messages -> prompt text with one media marker per image."""
        with self._lock:  # the vocabulary must not be freed by close() meanwhile
            self._check_open()
            bos = self.model.detokenize([self._bos()], special=True) if self._bos() >= 0 else ""
        return render(self.chat_format, messages, marker=self.projector.marker, bos=bos, image_urls=image_urls)

    def render_question(self, question: str, n_images: int = 1) -> str:
        """A single user turn (images, then the question) rendered with the model's chat format."""
        url = _IMAGE_URL.format(0)
        messages: list[dict[str, Any]] = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append(user_message(question, n_images, url))
        return self.render_messages(messages, [url])

    def _bos(self) -> int:
        import llama_cpp
        return int(llama_cpp.llama_vocab_bos(self.model.vocab))

    # -- queries --------------------------------------------------------------------------------------
    def ask(self, image: ImageInput | Sequence[ImageInput] | None, question: str, *,
            answer_tags: bool = False, video: ImageInput | Sequence[ImageInput] | None = None,
            max_frames: int = 16, **kwargs: Any) -> Answer:
        """Answer a question about zero or more images with the model's chat format.

        answer_tags appends the paper's instruction to think in <think> and answer in <answer> tags (and stops
        each rollout after </answer>). video: a list of frames, or an animated GIF / WebP / PNG (at most
        max_frames, evenly sampled), asked about instead of `image`. Other keywords are those of `generate`."""
        if video is not None:
            if image is not None:
                raise InvalidArgumentError("pass either image(s) or a video, not both")
            image = load_frames(video, max_frames=max_frames, allow_remote=self.allow_remote_images)
            kwargs["video"] = True
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        if not isinstance(question, str):
            raise InvalidArgumentError(f"question must be a str, got {type(question).__name__}")
        if answer_tags:
            question = f"{question} {ANSWER_PROMPT_SUFFIX}"
            kwargs.setdefault("stop_after", ("</answer>",))
        kwargs.setdefault("question", question)
        snap = kwargs.get("snapshot")
        n_images = len(snap.image_digests) if snap is not None and not images else len(images)
        return self.generate(self.render_question(question, n_images), images, **kwargs)

    def generate(self, prompt_text: str, images: Sequence[ImageInput] = (), settings: QuerySettings | None = None,
                 *, question: str | None = None, snapshot: Snapshot | None = None,
                 on_text: Callable[[str], None] | None = None, video: bool = False, **knobs: Any) -> Answer:
        """Run a raw prompt (one media marker per image) through encode, KDV selection, prefill and K rollouts.

        settings: the query's knobs as one validated QuerySettings (options.py); keyword `knobs` are its fields
        (max_tokens, stop, stop_after, sampling, ratio, tau, k, mode, seed, early_stop, options, policy, selector,
        wave, stopping, stop_threshold, reuse_prefix, cache_namespace) and replace those of `settings`.
        In short: ratio / tau prune (fraction, or adaptive angle); k rollouts (greedy at K=1, the paper's
        sampling at K>1, rollout i seeded from seed); mode 'parallel' | 'snapshot' | 'staged' (k is then K_max,
        waves of `wave` until the stopping rule settles the vote; rollout i is the same as in a fixed-K run);
        policy decides the pruning (unless given) and K from the query's features; reuse_prefix /
        cache_namespace: the prefix cache (Answer.prefix_reused, .tokens_skipped).
        question: the question text (for the policy's features). snapshot: a prefilled prefix (see `snapshot`);
        the prompt must start with its prefix text, and images, if given, must be the snapshot's. on_text: called
        with the first rollout's text as it decodes (streaming a K=1 answer). video: the images are one video's
        frames."""
        q = QuerySettings.from_kwargs(settings, **knobs)  # every knob validated here, in one place
        images = self._check_query(q, prompt_text, images, on_text)
        ratio, tau = self._pruning(q)
        t0 = time.perf_counter()
        arrays = self._load_inputs(prompt_text, images, snapshot, ratio, tau)
        with self._lock:
            self._check_open()
            # a selector callable is not cached: nothing names what it keeps (a new function can reuse an id)
            reuse = (self.prefix_cache if q.reuse_prefix is None else bool(q.reuse_prefix)) and snapshot is None \
                and not video and isinstance(q.selector, str)
            if not reuse:
                self._forget_prefix()
            kept = False
            try:
                pre, scores = self._select_and_prefill(prompt_text, arrays, q, ratio, tau, snapshot, video, reuse)
                features = self._features(pre, scores, question if question is not None else prompt_text)
                k, p_hat = self._decide_k(q, features)
                rollouts, n_waves, decode_s = self._decode(pre, q, k, on_text)
                kept = reuse
            finally:
                self._end_query(kept)
        return self._answer(pre, rollouts, q, k, timings={"decode_s": decode_s, "total_s": time.perf_counter() - t0},
                            features=features, p_hat=p_hat, n_waves=n_waves)

    # -- generate's steps: check -> load -> select + prefill -> decide K -> decode -> answer ------------------
    def _check_query(self, q: QuerySettings, prompt_text: Any, images: Any, on_text: Any) -> list[Any]:
        """The checks that need this VLM (n_seq_max) and the per-call data's types, before any image is read."""
        n_seq_max = self.settings.n_seq_max
        if q.mode == "staged" and q.policy is None and min(q.wave, q.k) > n_seq_max:
            raise InvalidArgumentError(f"a staged wave of {min(q.wave, q.k)} rollouts needs n_seq_max >= "
                                       f"{min(q.wave, q.k)} (this VLM has n_seq_max={n_seq_max}); "
                                       "lower wave or create the VLM with a larger n_seq_max")
        images = self._check_inputs(prompt_text, images, on_text)
        if q.policy is None and q.mode == "parallel" and q.k > n_seq_max:
            raise InvalidArgumentError(self._too_many_rollouts(q.k))
        return images

    @staticmethod
    def _pruning(q: QuerySettings) -> tuple[float | None, float | None]:
        """(ratio, tau) of the query: the caller's, else the policy's (a policy decides how much to see too)."""
        if q.policy is not None and q.ratio is None and q.tau is None:
            return q.policy.ratio, q.policy.tau
        return q.ratio, q.tau

    def _load_inputs(self, prompt_text: str, images: list[Any], snapshot: Snapshot | None, ratio: float | None,
                     tau: float | None) -> list[np.ndarray]:
        """Decode the images to arrays and check them (and the prompt) against the snapshot, if one is given."""
        arrays = [load_image(im, allow_remote=self.allow_remote_images) for im in images]
        if snapshot is not None:
            snapshot.check(self.model_id, prompt_text[:len(snapshot.prefix_text)],
                           [image_digest(a) for a in arrays] if arrays else None)
            pruning = ratio is not None or tau is not None
            if snapshot.pruning != {"ratio": ratio, "tau": tau} and pruning:
                raise SnapshotMismatchError(f"the snapshot was pruned with {snapshot.pruning}, not ratio={ratio}, "
                                            f"tau={tau}")
        return arrays

    def _select_and_prefill(self, prompt_text: str, arrays: list[np.ndarray], q: QuerySettings, ratio: float | None,
                            tau: float | None, snapshot: Snapshot | None, video: bool,
                            reuse: bool) -> tuple[PrefillResult, list[np.ndarray]]:
        """Encode, select and prefill sequence 0 from the prefix cache, from scratch or after a snapshot."""
        if reuse:
            return self._prefill_cached(prompt_text, arrays, ratio, tau, q.selector, q.seed, str(q.cache_namespace))
        if snapshot is None:
            return self._prefill(prompt_text, arrays, ratio, tau, q.selector, q.seed, video)
        return self._prefill_after(snapshot, prompt_text[len(snapshot.prefix_text):])

    def _features(self, pre: PrefillResult, scores: list[np.ndarray], question: str) -> np.ndarray:
        """The query's features (features.py): what the policy decides K from, and Answer.features."""
        return query_features([im.embeddings for im in pre.images], scores, n_embd=self.model.n_embd_inp,
                              n_text_tokens=pre.n_kv - sum(im.n_kept for im in pre.images), question=question)

    @staticmethod
    def _decide_k(q: QuerySettings, features: np.ndarray) -> tuple[int, float | None]:
        """K and p_hat: the caller's K, or the policy's (checked like a caller's)."""
        if q.policy is None:
            return q.k, None
        k, p_hat = q.policy.decide(features)
        return QuerySettings.from_kwargs(q, k=k).k, p_hat

    @staticmethod
    def _policy_sampling(q: QuerySettings, k: int) -> SamplingParams | None:
        """K > 1 under a policy calibrated with another sampling than the default: that sampling (K = 1 stays
        greedy)."""
        s = getattr(q.policy, "sampling", None) if q.policy is not None and k > 1 else None
        return SamplingParams(temperature=s["temperature"], top_p=s["top_p"]) if s else None

    def _decode(self, pre: PrefillResult, q: QuerySettings, k: int,
                on_text: Callable[[str], None] | None) -> tuple[list[Rollout], int, float]:
        """Decode K rollouts from the prefilled sequence 0 in the query's mode, within the context left; returns
        the rollouts, the staged waves run and the decode time (s)."""
        params = self._rollout_params(k, q.sampling or self._policy_sampling(q, k), q.seed)
        stopper = self._early_stopper(q.options) if q.early_stop and k > 1 else None
        budget = self.ctx.n_ctx - pre.n_kv
        if budget <= 0:
            raise ContextOverflowError(f"prompt fills the whole context ({pre.n_kv} of n_ctx={self.ctx.n_ctx})")
        width = min(q.wave, k) if q.mode == "staged" else k  # rollouts decoding at once
        max_new = min(q.max_tokens, budget // (width if q.mode in ("parallel", "staged") else 1))
        check_capacity(self.ctx, pre.n_kv, width, max_new, "parallel" if q.mode == "staged" else q.mode)
        decode: dict[str, Any] = {"max_tokens": max_new, "stop": q.stop, "stop_after": q.stop_after,
                                  "early_stop": stopper, "on_text": on_text}
        n_waves = 0
        t_dec = time.perf_counter()
        if q.mode == "staged":
            rollouts, n_waves = run_staged(self.ctx, self.model, pre.n_past, self.ctx.logits(-1), params,
                                           wave=q.wave, settled=self._settled(q.stopping_rule(), k, q.options),
                                           **decode)
        elif q.mode == "parallel":
            rollouts = run_parallel(self.ctx, self.model, pre.n_past, params, **decode)
        else:
            rollouts = run_snapshot(self.ctx, self.model, pre.n_past, self.ctx.logits(-1), params, **decode)
        return rollouts, n_waves, time.perf_counter() - t_dec

    def _prefill(self, prompt_text: str, arrays: list[np.ndarray], ratio: float | None, tau: float | None,
                 selector: str | TokenSelector = "kdv", seed: int = 0, video: bool = False) -> tuple[PrefillResult, list[np.ndarray]]:
        """Tokenize, encode (with token selection) and prefill sequence 0; returns the prefill and each image's
        KDV scores."""
        image_meta: dict[int, dict[str, Any]] = {}
        pruning = ratio is not None or tau is not None
        select = (self.kdv_selector(ratio, tau, image_meta, selector, seed) if pruning
                  else self._recorder(image_meta))
        with self.projector.tokenize(prompt_text, arrays, video=video) as prompt:
            pre = prefill(self.ctx, self.projector, prompt, select=select)
        scores = []
        for im in pre.images:
            meta = image_meta.get(im.index, {})
            scores.append(meta.pop("scores"))
            im.meta = meta
        return pre, scores

    def _prefill_after(self, snap: Snapshot, suffix: str) -> tuple[PrefillResult, list[np.ndarray]]:
        """Restore a prefilled prefix into sequence 0 and decode the rest of the prompt after it."""
        t0 = time.perf_counter()
        if snap.n_kv > self.ctx.n_ctx:
            raise ContextOverflowError(f"the snapshot holds {snap.n_kv} KV cells but n_ctx is {self.ctx.n_ctx}; "
                                       "create the VLM with a larger n_ctx")
        try:
            self.ctx.set_seq_state(snap.state, 0)
        except ContextOverflowError:
            raise SnapshotMismatchError("could not restore the snapshot's KV state: the file is corrupt or was made "
                                        "with a different context layout; make the snapshot again") from None
        lo, hi = self.ctx.seq_pos_min(0), self.ctx.seq_pos_max(0)
        if (lo, hi) != (0, snap.n_past - 1):
            raise SnapshotMismatchError(f"the snapshot's KV state covers positions {lo}..{hi}, not "
                                        f"0..{snap.n_past - 1}: the file is corrupt; make the snapshot again")
        tokens = self.model.tokenize(suffix, add_special=False, parse_special=True)
        if not tokens:
            raise InvalidArgumentError("nothing to decode after the snapshot's prefix (empty question?)")
        if snap.n_kv + len(tokens) > self.ctx.n_ctx:
            raise ContextOverflowError(f"prompt needs {snap.n_kv + len(tokens)} tokens but n_ctx is {self.ctx.n_ctx}")
        self.ctx.decode_tokens(tokens, snap.n_past, 0, logits_last=True)
        images = []
        for meta, emb in zip(snap.images, snap.embeddings):
            kept = np.asarray(meta["kept"], dtype=np.int64)
            im = ImagePrefill(meta["index"], meta["n_tokens"], len(kept), tuple(meta["grid"]), kept, emb)
            im.meta = {k: v for k, v in meta.items() if k not in ("index", "n_tokens", "n_kept", "kept_fraction", "grid", "kept")}
            images.append(im)
        pre = PrefillResult(snap.n_past + len(tokens), snap.n_kv + len(tokens), images, 0.0, time.perf_counter() - t0)
        return pre, list(snap.scores)

    # -- prefix cache ---------------------------------------------------------------------------------
    @property
    def prefix_cache_id(self) -> str:
        """What a cached prefix must have been computed with: the model files and the context settings that
        change the numbers (flash attention, batch sizes)."""
        if self._prefix_cache_id is None:
            st = self.settings
            self._prefix_cache_id = hashlib.sha256(
                f"{self.model_id}|fa={st.flash_attn}|b={st.n_batch}|ub={st.n_ubatch}|u={st.kv_unified}".encode()
            ).hexdigest()
        return self._prefix_cache_id

    @staticmethod
    def _selection_key(ratio: float | None, tau: float | None, selector: str, seed: int) -> tuple[Any, ...]:
        """What decides an image's kept set besides its pixels (selection is deterministic in these); only the
        built-in selectors have one (generate does not cache queries with a selector callable)."""
        if not isinstance(selector, str):
            raise TypeError("a selector callable has no prefix-cache key")
        if ratio is None and tau is None:
            return ("all",)
        return (selector, None if ratio is None else float(ratio), None if tau is None else float(tau),
                int(seed) if selector == "random" else None)

    @staticmethod
    def _chunk_keys(prompt: Any, arrays: list[np.ndarray], selection: tuple[Any, ...]) -> list[ChunkKey]:
        """The prompt's chunk keys; an image chunk is named by its image's digest when chunks and images map one
        to one, else (an image split into several chunks) by all images' digests and its ordinal."""
        digests = [image_digest(a) for a in arrays]
        image_chunks = [c for c in prompt.chunks if isinstance(c, ImageChunk)]
        one_to_one = len(image_chunks) == len(digests)
        combined = hashlib.sha256("".join(digests).encode()).hexdigest()
        keys: list[ChunkKey] = []
        for c in prompt.chunks:
            if isinstance(c, ImageChunk):
                d = digests[c.image_index] if one_to_one else f"{combined}:{c.image_index}"
                keys.append(ImageKey(d, selection, c.n_tokens, c.nx, c.ny, c.n_pos))
            else:
                keys.append(TextKey(tuple(int(t) for t in c.tokens)))
        return keys

    def _live_intact(self) -> bool:
        """Whether the context still holds exactly the live entry: sequence 0's positions as they were kept and
        no other sequence (anything else touching the context invalidates it)."""
        if self._live is None:
            return False
        if (self.ctx.seq_pos_min(0), self.ctx.seq_pos_max(0)) != self._live_span:
            return False
        return all(self.ctx.seq_pos_max(i) == -1 for i in range(1, self.settings.n_seq_max))

    def _store_live(self) -> None:
        """Copy the live entry's KV state into the prefix store (before its cells are dropped or cut)."""
        if self.prefix_store is None or not self._live_intact():
            return
        from dataclasses import replace
        self.prefix_store.put(replace(self._live, state=self.ctx.seq_state(0)))

    def _forget_prefix(self) -> None:
        """Clear the context; the live entry goes to the prefix store first, if there is one."""
        if self._live is not None:
            try:
                self._store_live()
            except Exception as e:  # noqa: BLE001 - keeping an old prefix must never fail a query
                logger.warning("prefix cache: could not store the previous prompt (%s)", e)
        self._live, self._pending = None, None
        self.ctx.clear()

    def _end_query(self, keep: bool) -> None:
        """After a query: keep sequence 0's prompt cells as the live entry (generated tokens and the rollout
        sequences removed), or clear the context."""
        pending, self._pending = self._pending, None
        if keep and pending is not None:
            self.ctx.seq_rm(0, pending.n_past, -1)
            for i in range(1, self.settings.n_seq_max):
                self.ctx.seq_rm(i)
            self._live = pending
            self._live_span = (self.ctx.seq_pos_min(0), self.ctx.seq_pos_max(0))
        else:
            self._live = None
            self.ctx.clear()

    def _prefill_cached(self, prompt_text: str, arrays: list[np.ndarray], ratio: float | None, tau: float | None,
                        selector: str, seed: int, namespace: str) -> tuple[PrefillResult, list[np.ndarray]]:
        """Prefill sequence 0 reusing the longest prefix that the live entry (cells still in the context) or the
        prefix store holds for this cache id and namespace; only the rest is encoded and decoded. The prompt
        becomes the pending live entry (kept by _end_query when the query succeeds)."""
        image_meta: dict[int, dict[str, Any]] = {}
        pruning = ratio is not None or tau is not None
        select = (self.kdv_selector(ratio, tau, image_meta, selector, seed) if pruning
                  else self._recorder(image_meta))
        with self.projector.tokenize(prompt_text, arrays) as prompt:
            keys = self._chunk_keys(prompt, arrays, self._selection_key(ratio, tau, selector, seed))
            cache_id = self.prefix_cache_id
            live = self._live if self._live_intact() else None
            m = live.matches(cache_id, namespace, keys) if live is not None else NO_MATCH
            found = (self.prefix_store.best_match(cache_id, namespace, keys) if self.prefix_store is not None
                     else None)
            entry = live
            if found is not None and found[1].n_kv > m.n_kv:
                stored = self.prefix_store.get(found[0])
                if stored is not None:
                    entry, m = stored, found[1]
            if self._live is not None and not (entry is live and m.covers_entry):
                try:
                    self._store_live()  # its cells are about to be cut or replaced
                except Exception as e:  # noqa: BLE001
                    logger.warning("prefix cache: could not store the previous prompt (%s)", e)
            self._live = None  # until this query succeeds
            resume = None
            if m.n_kv > 0 and entry is live:
                self.ctx.seq_rm(0, m.n_past, -1)
            elif m.n_kv > 0:
                self.ctx.clear()
                try:
                    self.ctx.set_seq_state(entry.state, 0)
                except ContextOverflowError:
                    logger.warning("prefix cache: a stored state did not fit this context; decoding cold")
                    m = NO_MATCH
                if m.n_kv > 0 and (self.ctx.seq_pos_min(0), self.ctx.seq_pos_max(0)) != (0, entry.n_past - 1):
                    logger.warning("prefix cache: a stored state covers the wrong positions; decoding cold")
                    m = NO_MATCH
                self.ctx.seq_rm(0, m.n_past, -1)
            else:
                self.ctx.clear()
            if m.n_kv > 0:
                resume = Resume(m.chunk, m.offset, m.n_past, m.n_kv, list(entry.images[:m.n_images]))
                logger.debug("prefix cache: reusing %d cells (%d images)", m.n_kv, m.n_images)
            pre = prefill(self.ctx, self.projector, prompt, select=select, resume=resume)
            first = resume.chunk if resume is not None else 0
            records: list[CachedChunk] = list(entry.chunks[:first]) if resume is not None else []
            new_images = iter(pre.images[m.n_images if resume is not None else 0:])
            for ci, (n_past, n_kv) in zip(range(first, len(prompt.chunks)), pre.spans):
                c = prompt.chunks[ci]
                if isinstance(c, ImageChunk):
                    n_cells = next(new_images).n_kept
                    n_pos = c.n_pos if self.projector.uses_mrope else n_cells
                else:
                    n_cells = n_pos = len(c.tokens)
                records.append(CachedChunk(keys[ci], n_past, n_kv, n_pos, n_cells))
        scores = list(entry.scores[:m.n_images]) if resume is not None else []
        for im in pre.images[len(scores):]:
            meta = image_meta.get(im.index, {})
            scores.append(meta.pop("scores"))
            im.meta = meta
        self._pending = PrefixEntry(cache_id, namespace, tuple(records), pre.n_past, pre.n_kv, images=list(pre.images),
                                    scores=list(scores), prompt_text=prompt_text, model_id=self.model_id)
        return pre, scores

    def prefix_cache_info(self) -> dict[str, Any]:
        """What the prefix cache holds now: the live prompt's KV cells and bytes (KV state + image records), and
        the prefix store's entries and bytes in memory and on disk."""
        with self._lock:
            self._check_open()
            live = self._live if self._live_intact() else None
            live_bytes = (self.ctx.seq_state_size(0) + live.nbytes) if live is not None else 0
            store = self.prefix_store
            return {"live_tokens": live.n_kv if live is not None else 0, "live_bytes": live_bytes,
                    "store_entries": len(store) if store is not None else 0,
                    "store_bytes": store.nbytes if store is not None else 0,
                    "disk_bytes": store.disk_bytes if store is not None else 0}

    def clear_prefix_cache(self) -> None:
        """Forget the live prompt (the store, if any, keeps what it has)."""
        with self._lock:
            self._check_open()
            self._live, self._pending = None, None
            self.ctx.clear()

    # -- snapshots ------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """Fingerprint of the text model + mmproj files (what a snapshot must have been made with)."""
        if self._model_id is None:
            self._model_id = hashlib.sha256((file_fingerprint(self.model.path) +
                                             file_fingerprint(self.projector.path)).encode()).hexdigest()
        return self._model_id

    def snapshot(self, image: ImageInput | Sequence[ImageInput], *, ratio: float | None = None,
                 tau: float | None = None) -> Snapshot:
        """Encode and prefill the prompt up to the question once (system text + images, KDV applied), so
        several questions can follow it: `ask(None, question, snapshot=snap)`; `snap.save(path)` keeps it."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        validate_pruning(ratio, tau)
        sentinel = "\x00avis-question\x00"
        full = self.render_question(sentinel, len(images))
        prefix_text = full[:full.index(sentinel)]
        arrays = [load_image(im, allow_remote=self.allow_remote_images) for im in images]
        with self._lock:
            self._check_open()
            self._forget_prefix()
            try:
                pre, scores = self._prefill(prefix_text, arrays, ratio, tau)
                state = self.ctx.seq_state(0)
            finally:
                self.ctx.clear()
        metas = [im.record(drop=("select_s",)) for im in pre.images]
        return Snapshot(model_id=self.model_id, prefix_text=prefix_text, image_digests=[image_digest(a) for a in arrays],
                        pruning={"ratio": ratio, "tau": tau}, n_past=pre.n_past, n_kv=pre.n_kv, state=state,
                        images=metas, embeddings=[im.embeddings for im in pre.images], scores=scores)

    @staticmethod
    def _rollout_params(k: int, sampling: SamplingParams | None, seed: int) -> list[SamplingParams]:
        """K=1: greedy unless the caller gives sampling; K>1: the paper's sampling (or the caller's), one
        derived seed per rollout."""
        if k == 1:
            return [sampling or SamplingParams(seed=seed)]
        base = sampling or VRS_SAMPLING
        return rollout_params(k, SamplingParams(**{**base.__dict__, "seed": seed}))

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this VLM was closed (its model, context and projector are freed); "
                              "create a new VLM to run more queries")

    def _too_many_rollouts(self, k: int) -> str:
        return (f"k={k} rollouts need n_seq_max >= {k} in mode='parallel' (this VLM has "
                f"n_seq_max={self.settings.n_seq_max}); create the VLM with n_seq_max={k} or use mode='snapshot'")

    @staticmethod
    def _check_inputs(prompt_text: Any, images: Any, on_text: Any) -> list[Any]:
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

    @staticmethod
    def _normalised_answers(rollouts: Sequence[Rollout], options: Sequence[str] | None) -> list[str | None]:
        out = []
        for r in rollouts:
            a = extract_answer(r.text, options) if r.finish_reason != "early_stop" else None
            out.append(normalize_answer(a, options) if a is not None else None)
        return out

    def _settled(self, rule: StoppingRule, k_max: int, options: Sequence[str] | None) -> Callable[[list[Rollout]], bool]:
        """The staged runner's check: the stopping rule on the normalised answers of the rollouts so far."""
        return lambda done: bool(rule(self._normalised_answers(done, options), k_max))

    def _early_stopper(self, options: Sequence[str] | None) -> EarlyStop:
        def decided(done: list[Rollout], n_remaining: int) -> bool:
            counts: dict[str, int] = {}
            for a in self._normalised_answers(done, options):
                if a is not None:
                    counts[a] = counts.get(a, 0) + 1
            return bool(counts) and not can_be_overtaken(counts, n_remaining)
        return decided

    def _answer(self, pre: PrefillResult, rollouts: list[Rollout], q: QuerySettings, k: int, *,
                timings: dict[str, float], features: np.ndarray | None = None, p_hat: float | None = None,
                n_waves: int = 0) -> Answer:
        """The Answer: the vote over the rollouts' normalised answers, the chosen text, FLOPs, savings."""
        images = [im.record(with_fraction=True) for im in pre.images]
        answers = self._normalised_answers(rollouts, q.options)
        vote = majority_vote(answers, [r.mean_logprob for r in rollouts])
        best = rollouts[vote.winner_index] if vote.winner is not None else rollouts[0]
        n_pruned = sum(im.n_tokens - im.n_kept for im in pre.images)
        generated = [len(r.tokens) for r in rollouts if r.finish_reason != "early_stop"] or [0]
        flops = relative_flops(self.text_dims, n_prompt_kv=pre.n_kv, n_prompt_kv_vanilla=pre.n_kv + n_pruned,
                               generated=generated, vanilla_generated=round(float(np.mean(generated))),
                               encoder=sum(self._encoder_flops(im) for im in pre.images))
        ans = Answer(text=best.text, tokens=best.tokens, finish_reason=best.finish_reason, prompt_tokens=pre.n_kv,
                     image_tokens=[im.n_tokens for im in pre.images], kept_tokens=[im.n_kept for im in pre.images],
                     timings={"encode_s": pre.encode_s, "prefill_s": pre.prefill_s, **timings},
                     images=images, rollouts=rollouts, answer=vote.winner, votes=dict(vote.counts), k=k,
                     mode=q.mode, flops=flops, early_stopped=sum(r.finish_reason == "early_stop" for r in rollouts),
                     tokens_saved=estimate_tokens_saved(rollouts), features=features, p_hat=p_hat,
                     prefix_reused=pre.n_reused > 0, tokens_skipped=pre.n_reused)
        if q.mode == "staged":
            ans.rollouts_saved, ans.waves = k - len(rollouts), n_waves
            ran = [len(r.tokens) for r in rollouts if r.finish_reason != "early_stop"]
            # rollouts never started are estimated like cancelled ones (exact when all run to max_tokens)
            ans.tokens_saved += round(float(np.mean(ran))) * ans.rollouts_saved if ran else 0
        return ans

    @property
    def family(self) -> Family:
        """The vision family of the loaded mmproj (families.py): key tensor, token mapping, FLOPs rules."""
        return family_for(self.projector.vision_info.projector_type)

    def _encoder_flops(self, im: Any) -> float:
        info = self.projector.vision_info
        if not info.n_layer or not info.n_embd:
            return 0.0
        fam = self.family
        return encoder_flops(fam.encoder_dims(info), fam.n_patches(im.n_tokens, info))

    # -- KDV ------------------------------------------------------------------------------------------
    def _geometry(self, chunk: ImageChunk) -> ChunkGeometry:
        cap = self.key_capture
        return ChunkGeometry(chunk.n_tokens, chunk.nx, chunk.ny, cap.image_wh if cap is not None else None)

    def token_grid(self, chunk: ImageChunk) -> tuple[int, int]:
        """(nx, ny) of an image's LLM tokens, by the family's rule (a 1-row mtmd grid made 2-D where known)."""
        return self.family.token_grid(self._geometry(chunk), self.projector.vision_info)

    def scored_keys(self, chunk: ImageChunk, embeddings: np.ndarray) -> tuple[TokenKeys, str]:
        """Keys of the scored LLM tokens of the chunk just encoded: the last ViT block's captured keys when the
        family's mapping applies, else the projected embeddings as a single head (the fallback; a failed
        capture also falls back, with one warning, so a model llama.cpp runs always gets an answer)."""
        cap = self.key_capture
        if self.projector.capture_error is not None:
            if not self._capture_warned:
                logger.warning("key capture failed (%s); scoring projected embeddings instead",
                               self.projector.capture_error)
                self._capture_warned = True
            source = "projected_embeddings:capture_failed"
        elif cap is not None and cap.keys is not None:
            tk = self.family.token_keys(cap.keys, self._geometry(chunk), self.projector.vision_info)
            if tk is not None and tk.n_tokens == chunk.n_tokens and tk.keys.shape[0] == tk.scored.shape[0]:
                return tk, f"vit_keys:{cap.name}"
            source = "projected_embeddings"
        else:
            source = "projected_embeddings"
        emb = embeddings[:, None, :]
        return TokenKeys(emb, np.arange(chunk.n_tokens, dtype=np.int64), chunk.n_tokens), source

    def token_keys(self, chunk: ImageChunk, embeddings: np.ndarray) -> tuple[np.ndarray, str]:
        """Keys of the scored tokens only (see scored_keys), and where they came from."""
        tk, source = self.scored_keys(chunk, embeddings)
        return tk.keys, source

    def _recorder(self, image_meta: dict[int, dict[str, Any]]) -> ChunkSelector:
        """A selector that keeps every token and records the grid and KDV scores (for the features)."""
        def record(chunk: ImageChunk, embeddings: np.ndarray) -> None:
            keys, source = self.token_keys(chunk, embeddings)
            image_meta[chunk.image_index] = {"grid": list(self.token_grid(chunk)), "key_source": source,
                                             "scores": kdv_scores(keys)}
            return None
        return record

    def kdv_selector(self, ratio: float | None, tau: float | None, image_meta: dict[int, dict[str, Any]],
                     selector: str | TokenSelector = "kdv", seed: int = 0) -> ChunkSelector:
        """A prefill token selector that keeps each image's tokens chosen by KDV (fixed ratio or adaptive tau),
        or by another selector (a built-in baseline's name or a TokenSelector callable, kdv.py) given the count
        KDV keeps at that setting."""
        choose = None if selector == "kdv" else make_selector(selector, seed=seed) if isinstance(selector, str) \
            else selector

        def select(chunk: ImageChunk, embeddings: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            tk, source = self.scored_keys(chunk, embeddings)
            sel = prune(tk.keys, ratio=ratio, tau=tau)  # indices into the scored tokens; the features use its scores
            if choose is not None:
                image = ImageTokens(tk.keys, sel.scores, embeddings[tk.scored], chunk.image_index)
                kept = check_kept(choose(image, sel.n_kept), sel.n_total)
                name = selector if isinstance(selector, str) else "custom"
                sel = KDVSelection(kept=kept, n_total=sel.n_total, n_kept=int(kept.size),
                                   kept_fraction=kept.size / sel.n_total, mode=name,
                                   param=float(ratio if ratio is not None else tau), threshold=float("nan"),
                                   score_summary=sel.score_summary, scores=sel.scores)
                source = {"embeddings": "projected_embeddings", "random": "random", "uniform": "uniform"}.get(
                    name, source)
            always = tk.always_kept  # e.g. pixtral's row breaks: kept, never scored
            image_meta[chunk.image_index] = {"grid": list(self.token_grid(chunk)), "key_source": source,
                                             "scores": sel.scores, "always_kept": int(always.size),
                                             "kdv": {k: v for k, v in sel.to_dict().items() if k != "kept"},
                                             "select_s": time.perf_counter() - t0}
            if always.size == 0:
                return sel.kept
            return np.union1d(tk.scored[sel.kept], always).astype(np.int64)
        return select

    def close(self) -> None:
        """Free the projector, context and model (also done at garbage collection). Waits for a query running
        in another thread to finish; later queries raise ClosedError. Safe to call more than once."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            self._closed = True
            for part in ("projector", "ctx", "model"):
                obj = getattr(self, part, None)
                if obj is not None:
                    obj.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "VLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
