"""The public object: load a text model + mmproj once, then answer questions about images.

`VLM.ask` runs the vanilla path (encode, prefill, greedy decode) that reproduces stock llama-cpp-python
token for token; AVIS features plug into the same steps (token selection before prefill, rollouts after)."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import math

import numpy as np

from .capture import KeyCapture, keys_per_token
from .errors import CaptureError, ContextOverflowError, InvalidArgumentError
from .images import ImageInput, load_image
from .kdv import prune
from .mtmd import ImageChunk, Projector
from .native import Context, ContextSettings, Model, SamplingParams
from .prefill import PrefillResult, TokenSelector, prefill
from .prompt import KNOWN_FORMATS, ChatFormat, guess_format, render, user_message
from .rollouts import Rollout, generate

logger = logging.getLogger(__name__)

_IMAGE_URL = "avis-image://{}"  # placeholder URLs swapped for the media marker after rendering


@dataclass
class Answer:
    """The result of one query: text, tokens, per-image token counts and timings in seconds."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int  # KV-cache cells used by the prompt (text + kept image tokens)
    image_tokens: list[int]  # per image, before pruning
    kept_tokens: list[int]  # per image, after pruning
    timings: dict[str, float] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)  # per image: grid, kept indices, KDV summary
    rollouts: list[Rollout] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
                "kept_tokens": self.kept_tokens, "timings": self.timings,
                "images": [{k: v for k, v in im.items() if k != "kept"} for im in self.images]}


class VLM:
    """A vision-language model in llama.cpp: text GGUF + mmproj GGUF, one context, one projector.

    Queries are serialised by a lock: one object may be shared between threads, one query runs at a time.
    """

    def __init__(self, model_path: str | os.PathLike, mmproj_path: str | os.PathLike, *, n_ctx: int = 4096,
                 n_batch: int = 512, n_ubatch: int = 512, n_seq_max: int = 1, n_threads: int | None = None,
                 n_threads_batch: int | None = None, n_gpu_layers: int = 0, use_gpu: bool = True,
                 flash_attn: bool = False, chat_format: str | ChatFormat = "auto", system_prompt: str | None = None,
                 allow_remote_images: bool = False, capture_keys: bool = True, verbose: bool = False) -> None:
        self.key_capture = KeyCapture() if capture_keys else None
        self.model = Model(model_path, n_gpu_layers=n_gpu_layers, verbose=verbose)
        self.settings = ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max,
                                        n_threads=n_threads, n_threads_batch=n_threads_batch, flash_attn=flash_attn)
        self.ctx = Context(self.model, self.settings)
        self.projector = self._make_projector(mmproj_path, use_gpu, flash_attn, verbose)
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
        self._lock = threading.RLock()

    def _make_projector(self, mmproj_path: str | os.PathLike, use_gpu: bool, flash_attn: bool,
                        verbose: bool) -> Projector:
        """Create the mtmd context (subclasses add an eval callback to capture encoder tensors)."""
        return Projector(mmproj_path, self.model, n_threads=self.settings.resolved_threads()[0], use_gpu=use_gpu,
                         flash_attn=flash_attn, verbose=verbose, key_capture=self.key_capture)

    # -- prompt ---------------------------------------------------------------------------------------
    def render_messages(self, messages: Sequence[Mapping[str, Any]], image_urls: Sequence[str] = ()) -> str:
        """Chat messages -> prompt text with one media marker per image."""
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
    def ask(self, image: ImageInput | Sequence[ImageInput] | None, question: str, *, max_tokens: int = 256,
            stop: Sequence[str] = (), sampling: SamplingParams = SamplingParams(), ratio: float | None = None,
            tau: float | None = None) -> Answer:
        """Answer a question about zero or more images with the model's chat format. `ratio` prunes that
        fraction of each image's tokens by KDV score; `tau` (radians, e.g. pi/4) prunes adaptively."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        return self.generate(self.render_question(question, len(images)), images, max_tokens=max_tokens,
                             stop=stop, sampling=sampling, ratio=ratio, tau=tau)

    def generate(self, prompt_text: str, images: Sequence[ImageInput] = (), *, max_tokens: int = 256,
                 stop: Sequence[str] = (), sampling: SamplingParams = SamplingParams(), ratio: float | None = None,
                 tau: float | None = None) -> Answer:
        """Run a raw prompt (containing one media marker per image) through encode, (pruning,) prefill, decode."""
        if max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be >= 0, got {max_tokens}")
        pruning = ratio is not None or tau is not None
        if pruning:
            prune(np.ones((1, 1, 1)), ratio=ratio, tau=tau)  # validate the arguments before any work
        image_meta: dict[int, dict[str, Any]] = {}
        select = self.kdv_selector(ratio, tau, image_meta) if pruning else self._recorder(image_meta)
        t0 = time.perf_counter()
        arrays = [load_image(im, allow_remote=self.allow_remote_images) for im in images]
        with self._lock:
            with self.projector.tokenize(prompt_text, arrays) as prompt:
                self.ctx.clear()
                try:
                    pre = prefill(self.ctx, self.projector, prompt, select=select)
                    budget = self.ctx.n_ctx - pre.n_kv
                    if budget <= 0:
                        raise ContextOverflowError(f"prompt fills the whole context ({pre.n_kv} of n_ctx={self.ctx.n_ctx})")
                    out = generate(self.ctx, self.model, pre.n_past, params=sampling,
                                   max_tokens=min(max_tokens, budget), stop=stop)
                finally:
                    self.ctx.clear()
        return self._answer(pre, out, time.perf_counter() - t0, image_meta)

    @staticmethod
    def _answer(pre: PrefillResult, out: Rollout, total_s: float, image_meta: dict[int, dict[str, Any]]) -> Answer:
        images = []
        for im in pre.images:
            meta = {"index": im.index, "n_tokens": im.n_tokens, "n_kept": im.n_kept,
                    "kept_fraction": im.kept_fraction, "grid": list(im.grid), "kept": im.kept.tolist()}
            meta.update(image_meta.get(im.index, {}))
            images.append(meta)
        return Answer(text=out.text, tokens=out.tokens, finish_reason=out.finish_reason, prompt_tokens=pre.n_kv,
                      image_tokens=[im.n_tokens for im in pre.images], kept_tokens=[im.n_kept for im in pre.images],
                      timings={"encode_s": pre.encode_s, "prefill_s": pre.prefill_s, "decode_s": out.decode_s,
                               "total_s": total_s},
                      images=images, rollouts=[out])

    # -- KDV ------------------------------------------------------------------------------------------
    def token_grid(self, chunk: ImageChunk) -> tuple[int, int]:
        """(nx, ny) of an image's LLM tokens; LLaVA-style projectors report a 1-row grid, made square here."""
        if chunk.ny == 1 and chunk.nx > 1:
            side = math.isqrt(chunk.nx)
            if side * side == chunk.nx:
                return side, side
        return chunk.nx, chunk.ny

    def token_keys(self, chunk: ImageChunk, embeddings: np.ndarray) -> tuple[np.ndarray, str]:
        """One key per LLM token for the chunk just encoded: the last ViT block's captured keys when the
        projector's mapping is known, else the projected embeddings as a single head (the fallback)."""
        if self.projector.capture_error is not None:
            raise CaptureError(f"key capture failed: {self.projector.capture_error}")
        cap = self.key_capture
        if cap is not None and cap.keys is not None:
            nx, ny = self.token_grid(chunk)
            keys = keys_per_token(cap.keys, self.projector.vision_info, nx, ny)
            if keys is not None and keys.shape[0] == chunk.n_tokens:
                return keys, f"vit_keys:{cap.name}"
        return embeddings[:, None, :], "projected_embeddings"

    def _recorder(self, image_meta: dict[int, dict[str, Any]]) -> TokenSelector:
        def record(chunk: ImageChunk, embeddings: np.ndarray) -> None:
            image_meta[chunk.image_index] = {"grid": list(self.token_grid(chunk))}
            return None
        return record

    def kdv_selector(self, ratio: float | None, tau: float | None,
                     image_meta: dict[int, dict[str, Any]]) -> TokenSelector:
        """A prefill token selector that keeps each image's tokens chosen by KDV (fixed ratio or adaptive tau)."""
        def select(chunk: ImageChunk, embeddings: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            keys, source = self.token_keys(chunk, embeddings)
            sel = prune(keys, ratio=ratio, tau=tau)
            image_meta[chunk.image_index] = {"grid": list(self.token_grid(chunk)), "key_source": source,
                                             "kdv": {k: v for k, v in sel.to_dict().items() if k != "kept"},
                                             "select_s": time.perf_counter() - t0}
            return sel.kept
        return select

    def close(self) -> None:
        """Free the projector, context and model (also done at garbage collection)."""
        for part in ("projector", "ctx", "model"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()

    def __enter__(self) -> "VLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
