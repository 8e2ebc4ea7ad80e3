"""The public object: load a text model + mmproj once, then answer questions about images and videos.

One query: load images -> mtmd tokenize -> encode each image (keys captured) -> optional KDV selection ->
prefill sequence 0 -> K rollouts sharing that prefill -> answer extraction and vote. With nothing pruned and
K = 1 this is the vanilla path and reproduces stock llama-cpp-python token for token.

This module is the session (model, projector, context, lifetime) and the thin entry points; the rooms behind it:
query.py (the query's steps), scorer.py (keys -> KDV / baseline selection), prefix_hold.py (the prefix cache's
hold on the live context), answer.py (vote, FLOPs, the Answer)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from . import query
from .answer import Answer, build_answer, estimate_tokens_saved  # noqa: F401 (estimate_tokens_saved re-exported)
from .capture import KeyCapture
from .errors import ClosedError, InvalidArgumentError
from .images import ImageInput, load_image
from .mtmd import Projector
from .native import Context, ContextSettings, FlashAttn, Model
from .options import MODES, SELECTORS, QuerySettings  # noqa: F401 (MODES, SELECTORS re-exported)
from .prefix_cache import PrefixStore
from .prefix_hold import PrefixHold, cache_id_for
from .prompt import ChatFormat, check_format_name, render, resolve_format, user_message
from .query import VRS_SAMPLING  # noqa: F401 (re-exported)
from .scorer import ImageScorer, ScorerViews
from .snapshot import Snapshot, file_fingerprint
from .video import VideoInput
from .voting import ANSWER_PROMPT_SUFFIX

_IMAGE_URL = "avis-image://{}"  # placeholder URLs swapped for the media marker after rendering

DEFAULT_N_CTX = 4096  # capped at the model's training context when n_ctx is not given


class QueryPolicy(Protocol):
    """Decides per query how much to see (ratio / tau for KDV) and how much to think (K)."""

    ratio: float | None
    tau: float | None

    def decide(self, features: np.ndarray) -> tuple[int, float | None]:
        """K for this query and the predicted solvability p_hat (None if the policy has no predictor)."""
        ...


class VLM(ScorerViews):
    """A vision-language model in llama.cpp: text GGUF + mmproj GGUF, one context, one projector.

    The context holds n_seq_max sequences in a unified KV cache so up to n_seq_max rollouts can share one
    prefill. Queries are serialised by a lock: one object may be shared between threads.
    flash_attn ("auto" | True | False) applies to the text context and the vision encoder; "auto" (llama.cpp's
    default) enables it where the backend supports it. Stock llama_cpp.Llama disables it: pass flash_attn=False
    to reproduce its outputs exactly (with it on, K/V go through f16, so logits differ slightly).
    repack=False keeps the weights out of llama.cpp's CPU extra buffer types (llama-server's --no-repack), for a host
    whose AMX kernels fault on quantized models.
    """

    def __init__(self, model_path: str | os.PathLike | Model, mmproj_path: str | os.PathLike, *, n_ctx: int | None = None,
                 n_batch: int = 512, n_ubatch: int = 512, n_seq_max: int = 8, n_threads: int | None = None,
                 n_threads_batch: int | None = None, n_gpu_layers: int = 0, use_gpu: bool = True,
                 repack: bool = True, flash_attn: FlashAttn = "auto", chat_format: str | ChatFormat = "auto",
                 system_prompt: str | None = None,
                 allow_remote_images: bool = False, capture_keys: bool = True, verbose: bool = False,
                 prefix_cache: bool = False, prefix_store: PrefixStore | None = None) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self.key_capture = KeyCapture() if capture_keys else None
        if prefix_store is not None and not isinstance(prefix_store, PrefixStore):
            raise InvalidArgumentError(f"prefix_store must be a PrefixStore, got {type(prefix_store).__name__}")
        check_format_name(chat_format)
        # validated before anything is loaded, so bad settings cost nothing and never reach llama.cpp
        self.settings = ContextSettings(n_ctx=DEFAULT_N_CTX if n_ctx is None else n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max,
                                        n_threads=n_threads, n_threads_batch=n_threads_batch, flash_attn=flash_attn)
        try:
            self.model = model_path if isinstance(model_path, Model) else Model(model_path, n_gpu_layers=n_gpu_layers,
                                                                               repack=repack, verbose=verbose)
            if n_ctx is None and 0 < self.model.n_ctx_train < self.settings.n_ctx:
                # default: 4096, or the model's training context when shorter (no overflow past what it learned)
                self.settings = dataclasses.replace(self.settings, n_ctx=self.model.n_ctx_train)
            self.ctx = Context(self.model, self.settings)
            self.projector = Projector(mmproj_path, self.model, n_threads=self.settings.resolved_threads()[0],
                                       use_gpu=use_gpu, flash_attn=flash_attn, verbose=verbose,
                                       key_capture=self.key_capture)
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
        self.chat_format = resolve_format(chat_format, self.model.architecture, self.projector.projector_type,
                                          self.model.meta("tokenizer.chat_template"))
        self.system_prompt = system_prompt
        self.allow_remote_images = allow_remote_images
        self.text_dims = query.text_dims(self.model)
        self._model_id: str | None = None
        # prefix cache (prefix_hold.py): sequence 0 keeps the last prompt's cells (the live entry) for the next
        # query to reuse; prefix_store optionally keeps earlier prompts' KV states too
        self.prefix_cache = bool(prefix_cache)
        self.prefix_store = prefix_store
        self._hold = PrefixHold(self.ctx, self.projector, self.settings.n_seq_max, prefix_store)
        self.scorer = ImageScorer(self.projector, self.key_capture)
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

    def replica_kwargs(self) -> dict[str, Any]:
        """VLM keywords that rebuild this session in another process (a Ray worker): context, batch, threads, flash
        attention, GPU layers, chat format and system prompt, so workers run as the caller configured (threads
        unpinned there would oversubscribe the cores)."""
        s = self.settings
        return {"n_ctx": s.n_ctx, "n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "n_seq_max": s.n_seq_max,
                "n_threads": s.n_threads, "n_threads_batch": s.n_threads_batch, "flash_attn": s.flash_attn,
                "n_gpu_layers": getattr(self.model, "n_gpu_layers", 0), "repack": getattr(self.model, "repack", True),
                "chat_format": self.chat_format, "system_prompt": self.system_prompt}

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
    def ask(self, image: ImageInput | Sequence[ImageInput] | None, question: str, *, answer_tags: bool = False,
            video: VideoInput | None = None, fps: float | None = None, max_frames: int | None = None,
            max_pixels: int | None = None, total_pixels: int | None = None, **kwargs: Any) -> Answer:
        """Answer a question about zero or more images, or one video, with the model's chat format.

        answer_tags appends the paper's instruction to think in <think> and answer in <answer> tags (and stops
        each rollout after </answer>). video (instead of `image`): a file (mp4, webm, mov, mkv, avi), its bytes, a
        data URI, a list of frames or an animated image, sampled as Qwen2.5-VL expects (video.py: fps 2, at most
        max_frames, max_pixels per frame, a total_pixels budget that defaults to half the context) and pruned as
        one selection; Answer.video records the sampling. Other keywords are those of `generate`."""
        clip = None
        if video is not None:
            if image is not None:
                raise InvalidArgumentError("pass either image(s) or a video, not both")
            clip = query.load_clip(video, self.projector, self.settings.n_ctx, fps=fps, max_frames=max_frames,
                                   max_pixels=max_pixels, total_pixels=total_pixels,
                                   allow_remote=self.allow_remote_images)
            image, kwargs["video"] = clip.frames, True
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        if not isinstance(question, str):
            raise InvalidArgumentError(f"question must be a str, got {type(question).__name__}")
        if answer_tags:
            question = f"{question} {ANSWER_PROMPT_SUFFIX}"
            kwargs.setdefault("stop_after", ("</answer>",))
        kwargs.setdefault("question", question)
        snap = kwargs.get("snapshot")
        n_images = len(snap.image_digests) if snap is not None and not images else len(images)
        answer = self.generate(self.render_question(question, n_images), images, **kwargs)
        answer.video = query.clip_record(clip) if clip is not None else None
        return answer

    def generate(self, prompt_text: str, images: Sequence[ImageInput] = (), settings: QuerySettings | None = None,
                 *, question: str | None = None, snapshot: Snapshot | None = None,
                 on_text: Callable[[str], None] | None = None, video: bool = False, **knobs: Any) -> Answer:
        """Run a raw prompt (one media marker per image) through encode, KDV selection, prefill and K rollouts.

        settings / knobs: the query's settings as one validated QuerySettings, or its fields as keywords (they replace
        those of `settings`; options.py says what each does). question: the question text (for the policy's
        features). snapshot: a prefilled prefix (see `snapshot`); the prompt must start with its prefix text, and
        images, if given, must be the snapshot's. on_text: called with the first rollout's text as it decodes.
        video: the images are one video's frames (one selection unless video_selection='per_chunk')."""
        q = QuerySettings.from_kwargs(settings, **knobs)  # every knob validated here, in one place
        images = query.check_query(q, self.settings.n_seq_max, prompt_text, images, on_text)
        ratio, tau = query.pruning(q)
        t0 = time.perf_counter()
        arrays = query.load_inputs(images, self.allow_remote_images, self.model_id if snapshot is not None else "",
                                   prompt_text, snapshot, ratio, tau, q.selector, self.projector.marker)
        with self._lock:
            self._check_open()
            # a selector callable is not cached: nothing names what it keeps (a new function can reuse an id)
            reuse = (self.prefix_cache if q.reuse_prefix is None else bool(q.reuse_prefix)) and snapshot is None \
                and isinstance(q.selector, str)
            if not reuse:
                self._hold.forget()
            kept = False
            try:
                if snapshot is None:
                    hold, ids = (self._hold, (self.prefix_cache_id, self.model_id)) if reuse else (None, ("", ""))
                    pre, scores = query.select_and_prefill(self.ctx, self.projector, self.scorer, hold, prompt_text,
                                                           arrays, q, ratio, tau, video=video, cache_ids=ids)
                else:
                    pre, scores = query.prefill_after(self.ctx, self.model, snapshot,
                                                      prompt_text[len(snapshot.prefix_text):])
                feats = query.features(pre, scores, question if question is not None else prompt_text,
                                       self.model.n_embd_inp)
                k, p_hat = query.decide_k(q, feats)
                rollouts, n_waves, decode_s = query.decode(self.ctx, self.model, pre, q, k, on_text)
                kept = reuse
            finally:
                self._hold.end_query(kept)
        return build_answer(pre, rollouts, q, k, text_dims=self.text_dims, encoder_flops=self.scorer.encoder_flops,
                            timings={"decode_s": decode_s, "total_s": time.perf_counter() - t0}, features=feats,
                            p_hat=p_hat, n_waves=n_waves)

    # -- prefix cache ---------------------------------------------------------------------------------
    @property
    def prefix_cache_id(self) -> str:
        """What a cached prefix must have been computed with: the model files and the context settings that
        change the numbers (flash attention, batch sizes)."""
        if self._prefix_cache_id is None:
            self._prefix_cache_id = cache_id_for(self.model_id, self.settings)
        return self._prefix_cache_id

    def prefix_cache_info(self) -> dict[str, Any]:
        """What the prefix cache holds now: the live prompt's KV cells and bytes (KV state + image records), and
        the prefix store's entries and bytes in memory and on disk."""
        with self._lock:
            self._check_open()
            return self._hold.info()

    def clear_prefix_cache(self) -> None:
        """Forget the live prompt (the store, if any, keeps what it has)."""
        with self._lock:
            self._check_open()
            self._hold.clear()

    # -- snapshots ------------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """Fingerprint of the text model + mmproj files (what a snapshot must have been made with)."""
        if self._model_id is None:
            self._model_id = hashlib.sha256((file_fingerprint(self.model.path) +
                                             file_fingerprint(self.projector.path)).encode()).hexdigest()
        return self._model_id

    def snapshot(self, image: ImageInput | Sequence[ImageInput], *, ratio: float | None = None,
                 tau: float | str | None = None) -> Snapshot:
        """Encode and prefill the prompt up to the question once (system text + images, KDV applied), so
        several questions can follow it: `ask(None, question, snapshot=snap)`; `snap.save(path)` keeps it."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        ratio, tau = query.pruning(QuerySettings(ratio=ratio, tau=tau))  # validated; tau="auto" resolved
        sentinel = "\x00avis-question\x00"
        full = self.render_question(sentinel, len(images))
        arrays = [load_image(im, allow_remote=self.allow_remote_images) for im in images]
        with self._lock:
            self._check_open()
            self._hold.forget()
            try:
                return query.take_snapshot(self.ctx, self.projector, self.scorer, full[:full.index(sentinel)],
                                           arrays, ratio, tau, self.model_id)
            finally:
                self.ctx.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this VLM was closed (its model, context and projector are freed); "
                              "create a new VLM to run more queries")

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
