"""A llama-cpp-python chat handler that runs AVIS: drop it into existing code with one object,

    llm = Llama(model_path=..., chat_handler=AVISChatHandler(clip_model_path=..., k=5, tau=math.pi / 4), n_ctx=8192)
    llm.create_chat_completion(messages=[...image_url..., text...])

and get the usual OpenAI-shaped response whose message is the voted answer, plus an `avis` field (kept/total
image tokens per image, K, votes, timings, FLOPs relative to vanilla, and a video's sampling). A message may carry
one video instead of images, as an OpenAI-style {"type": "video_url", "video_url": {"url": ...}} part (a data URI,
a local path / file:// URL, or http(s) with allow_remote_images): it is sampled for the projector (video.py) and
pruned as one KDV selection, as VLM.ask(video=...) does. Per-request overrides (k, ratio, tau,
...) come from `request_overrides(...)` in Python or from an `avis` object in the HTTP body (see server.py),
because Llama.create_chat_completion passes no extra keywords to handlers."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

from . import query
from .errors import ImageError, InvalidArgumentError
from .images import request_image, request_video_urls
from .native import FlashAttn, SamplingParams, flash_attn_type
from .pipeline import VRS_SAMPLING, Answer, VLM

logger = logging.getLogger(__name__)

# per-request settings (k, ratio, tau, mode, seed, early_stop, answer_tags, content, options, temperature, top_p)
_OVERRIDES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("avis_overrides", default=None)
# set by the server middleware: the handler leaves the response's `avis` field here, because llama_cpp.server
# validates responses against its ChatCompletion type, which drops unknown fields
_AVIS_SINK: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("avis_sink", default=None)
# set by the server middleware: whose conversation a request belongs to; the prefix cache reuses KV only within
# one namespace, so clients never see each other's state (not even whether their prompt was cached)
_CACHE_NAMESPACE: contextvars.ContextVar[str] = contextvars.ContextVar("avis_cache_namespace", default="")
VIDEO_KEYS = ("fps", "max_frames", "max_pixels")  # how a video is sampled (video.load_video's knobs)
OVERRIDE_KEYS = {"k", "ratio", "rho", "tau", "mode", "seed", "early_stop", "answer_tags", "content", "options",
                 "temperature", "top_p", "top_k", "min_p", "policy", "wave", "stopping", "stop_threshold",
                 "reuse_prefix", "video_selection", *VIDEO_KEYS}
ONE_VIDEO_RULE = "a request may carry one video and no images"


@contextlib.contextmanager
def request_overrides(**settings: Any) -> Iterator[None]:
    """Apply AVIS settings to the chat completions made inside the block (this thread / task only)."""
    unknown = set(settings) - OVERRIDE_KEYS
    if unknown:
        raise InvalidArgumentError(f"unknown AVIS setting(s) {sorted(unknown)}; known: {sorted(OVERRIDE_KEYS)}")
    token = _OVERRIDES.set(dict(settings))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def current_overrides() -> dict[str, Any]:
    return dict(_OVERRIDES.get() or {})


def _part_url(part: Any) -> str | None:
    """The URL of an image_url / video_url content part (the object form or a bare string), else None."""
    if not isinstance(part, dict) or part.get("type") not in ("image_url", "video_url"):
        return None
    u = part.get(part["type"])
    return u.get("url") if isinstance(u, dict) else u


def _is_video_part(part: Mapping[str, Any], server_videos: frozenset[str]) -> bool:
    """A video_url part, or an image_url part the server rewrote from one (its URL is in server_videos)."""
    return part.get("type") == "video_url" or (part.get("type") == "image_url" and _part_url(part) in server_videos)


def _media_urls(messages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(image URLs, video URLs) of user messages in order, as llama-cpp-python's stock handlers collect images."""
    images: list[str] = []
    videos: list[str] = []
    server_videos = request_video_urls()
    for m in messages:
        content = m.get("content")
        if m.get("role") != "user" or not isinstance(content, list):
            continue
        for part in content:
            url = _part_url(part)
            if url is not None:
                (videos if _is_video_part(part, server_videos) else images).append(url)
    return images, videos


def _image_urls(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Image URLs of user messages in order, as llama-cpp-python's stock handlers collect them."""
    return _media_urls(messages)[0]


def check_one_video(n_images: int, n_videos: int) -> None:
    """InvalidArgumentError naming the rule unless the request has no video, or one video and no images (a video's
    frames are one KDV selection; mixing it with other media has no defined selection)."""
    if n_videos > 1 or (n_videos and n_images):
        got = f"{n_videos} videos" if n_videos > 1 else f"a video and {n_images} image(s)"
        raise InvalidArgumentError(f"{ONE_VIDEO_RULE} (got {got}); ask about each separately")


def _expand_video(messages: Sequence[Mapping[str, Any]], placeholder: str, n_frames: int,
                  server_videos: frozenset[str]) -> list[dict[str, Any]]:
    """The messages with the video part replaced by n_frames image parts (URL `placeholder`) in its place, so the
    frames' media markers touch, as VLM.ask renders a video (mtmd pairs touching markers into temporal patches)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "user" and isinstance(m.get("content"), list):
            parts: list[Any] = []
            for part in m["content"]:
                if isinstance(part, dict) and _is_video_part(part, server_videos):
                    parts.extend({"type": "image_url", "image_url": {"url": placeholder}} for _ in range(n_frames))
                else:
                    parts.append(part)
            m["content"] = parts
        out.append(m)
    return out


class AVISChatHandler:
    """llama-cpp-python chat handler (any family the VLM supports: LLaVA-1.5, Qwen2/2.5-VL, ...).

    k / ratio / tau / policy set the defaults; `content` chooses the message text: "answer" (the voted
    answer), "text" (the winning rollout's full text) or "auto" (text when K = 1 or no answer was extracted,
    else the voted answer). mode "staged" runs the k rollouts in waves of `wave` until the stopping rule
    (`stopping`: "posterior" with `stop_threshold`, or "unanimity") settles the vote.
    flash_attn ("auto" | True | False) is the AVIS context's and the encoder's setting
    (independent of the Llama's own flash_attn); False reproduces the stock handler's outputs exactly.
    A video_url part is sampled with fps / max_frames / max_pixels (None: video.py's defaults) and pruned as
    video_selection says ("joint": one KDV selection over the whole clip, or "per_chunk")."""

    def __init__(self, clip_model_path: str, *, k: int = 1, ratio: float | None = None, tau: float | None = None,
                 policy: Any = None, mode: str = "parallel", answer_tags: bool = False, content: str = "auto",
                 early_stop: bool = False, wave: int = 3, stopping: str = "posterior", stop_threshold: float = 0.95,
                 chat_format: str = "auto", n_seq_max: int = 8,
                 sampling: SamplingParams = VRS_SAMPLING, allow_remote_images: bool = False,
                 flash_attn: FlashAttn = "auto", verbose: bool = False, prefix_cache: bool = True,
                 prefix_store: Any = None, video_selection: str = "joint", fps: float | None = None,
                 max_frames: int | None = None, max_pixels: int | None = None) -> None:
        flash_attn_type(flash_attn)  # InvalidArgumentError now, not at the first request
        if not os.path.exists(clip_model_path):
            raise InvalidArgumentError(f"clip model path does not exist: {clip_model_path!r}")
        if content not in ("auto", "answer", "text"):
            raise InvalidArgumentError(f"content must be 'auto', 'answer' or 'text', got {content!r}")
        if isinstance(policy, (str, os.PathLike)):
            from .policy import load_policy
            policy = load_policy(policy)
        self.clip_model_path = clip_model_path
        self.defaults = {"k": k, "ratio": ratio, "tau": tau, "policy": policy, "mode": mode,
                         "answer_tags": answer_tags, "content": content, "early_stop": early_stop,
                         "wave": wave, "stopping": stopping, "stop_threshold": stop_threshold,
                         "video_selection": video_selection, "fps": fps, "max_frames": max_frames,
                         "max_pixels": max_pixels}
        self.sampling = sampling
        self.chat_format = chat_format
        self.n_seq_max = n_seq_max
        self.allow_remote_images = allow_remote_images
        self.flash_attn = flash_attn
        self.verbose = verbose
        # prefix cache: follow-up turns, regenerations and new questions about the same image reuse the earlier
        # prompt's KV (image encode + prefill); prefix_store (a PrefixStore) also keeps earlier conversations
        self.prefix_cache = prefix_cache
        self.prefix_store = prefix_store
        self.vlm: VLM | None = None
        self._init_lock = threading.Lock()

    def _vlm_for(self, llama: Any) -> VLM:
        """The VLM sharing this Llama's weights (created on first use, rebuilt if the Llama changes)."""
        with self._init_lock:
            # by identity of the owner the VLM holds (an id() can be reused by a new Llama once the old one died)
            if self.vlm is None or self.vlm.closed or self.vlm.model.owner is not llama:
                if self.vlm is not None:
                    self.vlm.close()
                self.vlm = VLM.from_llama(llama, self.clip_model_path, n_seq_max=self.n_seq_max,
                                          chat_format=self.chat_format, allow_remote_images=self.allow_remote_images,
                                          flash_attn=self.flash_attn, verbose=self.verbose,
                                          prefix_cache=self.prefix_cache, prefix_store=self.prefix_store)
                llama._stack.callback(self.vlm.close)
            return self.vlm

    def _settings(self) -> dict[str, Any]:
        s = dict(self.defaults)
        o = current_overrides()
        if "rho" in o:
            o["ratio"] = o.pop("rho")
        if ("ratio" in o or "tau" in o) and not ("ratio" in o and "tau" in o):
            s["ratio"], s["tau"] = None, None  # an override of one pruning knob replaces the other
        s.update(o)
        if isinstance(s.get("policy"), (str, os.PathLike)):
            from .policy import load_policy
            s["policy"] = load_policy(s["policy"])
        return s

    def __call__(self, *, llama: Any, messages: list[dict[str, Any]], temperature: float = 0.2, top_p: float = 0.95,
                 top_k: int = 40, min_p: float = 0.05, stream: bool = False, stop: str | list[str] | None = None,
                 seed: int | None = None, max_tokens: int | None = None, repeat_penalty: float = 1.0,
                 model: str | None = None, **_unused: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        vlm = self._vlm_for(llama)
        s = self._settings()
        k = int(s["k"])
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        urls, videos = _media_urls(messages)
        check_one_video(len(urls), len(videos))
        clip = None
        if videos:
            # sampled before rendering: the prompt has one media marker per sampled frame
            clip = query.load_clip(_media_source(videos[0], "video"), vlm.projector, vlm.settings.n_ctx,
                                   allow_remote=self.allow_remote_images, **{k: s.get(k) for k in VIDEO_KEYS})
            placeholder = f"avis-video-{uuid.uuid4().hex}"
            messages = _expand_video(messages, placeholder, len(clip.frames), request_video_urls())
            urls = [placeholder]
        if s["answer_tags"]:
            messages = _with_answer_suffix(messages)
        prompt = vlm.render_messages(messages, urls)
        question = _last_user_text(messages)
        if k == 1 and s.get("policy") is None:
            # the drop-in path: the request's own sampling, as the stock handler would use it
            sampling = SamplingParams(temperature=max(0.0, temperature), top_p=top_p, top_k=top_k, min_p=min_p,
                                      repeat_penalty=repeat_penalty, seed=seed or 0)
        else:
            base = self.sampling
            sampling = SamplingParams(temperature=float(s.get("temperature", base.temperature)),
                                      top_p=float(s.get("top_p", base.top_p)), top_k=int(s.get("top_k", base.top_k)),
                                      min_p=float(s.get("min_p", base.min_p)), repeat_penalty=repeat_penalty)
        kwargs = dict(max_tokens=max_tokens if max_tokens is not None else 512, stop=stops,
                      stop_after=("</answer>",) if s["answer_tags"] else (), sampling=sampling, ratio=s["ratio"],
                      tau=s["tau"], k=k, mode=s["mode"], seed=int(s.get("seed", seed or 0) or 0),
                      early_stop=bool(s["early_stop"]), options=s.get("options"), policy=s.get("policy"),
                      question=question, wave=s["wave"], stopping=s["stopping"], stop_threshold=s["stop_threshold"],
                      reuse_prefix=s.get("reuse_prefix"), cache_namespace=_CACHE_NAMESPACE.get(),
                      video_selection=s["video_selection"])
        if clip is not None:
            images: list[Any] = list(clip.frames)
            kwargs["video"] = True
        else:
            images = [_image_source(u) for u in urls]
        name = model or os.path.basename(vlm.model.path)
        record = query.clip_record(clip) if clip is not None else None
        if stream:
            return self._stream(vlm, prompt, images, kwargs, name, s["content"], record)
        ans = vlm.generate(prompt, images, **kwargs)
        ans.video = record
        out = _completion(ans, name, s["content"])
        sink = _AVIS_SINK.get()
        if sink is not None:
            sink["avis"] = out["avis"]
        return out

    def _stream(self, vlm: VLM, prompt: str, images: list[Any], kwargs: dict[str, Any], name: str,
                content: str, video: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Chunks as llama-cpp-python streams them: the single rollout as it decodes when K = 1 (and no policy
        may raise K), else the voted answer once the vote is done."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None):
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if extra:
                c.update(extra)
            return c

        live = kwargs["k"] == 1 and kwargs.get("policy") is None
        q: queue.Queue = queue.Queue()
        box: dict[str, Any] = {}
        ctx = contextvars.copy_context()

        def work() -> None:
            try:
                box["answer"] = ctx.run(vlm.generate, prompt, images,
                                        **kwargs, on_text=(lambda t: q.put(("text", t))) if live else None)
            except BaseException as e:  # surfaced to the consumer below
                box["error"] = e
            q.put(("done", None))

        t = threading.Thread(target=work, name="avis-stream", daemon=True)
        t.start()
        yield chunk({"role": "assistant"})
        while True:
            kind, payload = q.get()
            if kind == "text":
                yield chunk({"content": payload})
            else:
                break
        t.join()
        if "error" in box:
            raise box["error"]
        ans: Answer = box["answer"]
        ans.video = video
        if not live:
            yield chunk({"content": _message_text(ans, content)})
        yield chunk({}, ans.finish_reason, {"avis": _avis_field(ans)})


def _with_answer_suffix(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append the paper's <think>/<answer> instruction to the last user message's text."""
    from .voting import ANSWER_PROMPT_SUFFIX

    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") != "user":
            continue
        if isinstance(m.get("content"), str):
            m["content"] = f"{m['content']} {ANSWER_PROMPT_SUFFIX}"
        elif isinstance(m.get("content"), list):
            parts = [dict(p) for p in m["content"]]
            texts = [p for p in parts if p.get("type") == "text"]
            if texts:
                texts[-1]["text"] = f"{texts[-1]['text']} {ANSWER_PROMPT_SUFFIX}"
            else:
                parts.append({"type": "text", "text": ANSWER_PROMPT_SUFFIX})
            m["content"] = parts
        break
    return out


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _image_source(url: str) -> Any:
    """What load_image takes for an image_url: data URIs and local paths as is, file:// URLs as paths; inside a
    server request, only the bytes the server's image policy fetched (images.request_image)."""
    return _media_source(url, "image")


def _media_source(url: Any, kind: str) -> Any:
    """What load_image / load_video take for an image_url / video_url (see _image_source)."""
    if not isinstance(url, str) or not url:
        raise ImageError(f"{kind}_url must be a non-empty string")
    return request_image(url)


def _message_text(ans: Answer, content: str) -> str:
    if content == "text" or ans.answer is None or (content == "auto" and ans.k == 1):
        return ans.text
    return ans.answer


def _avis_field(ans: Answer) -> dict[str, Any]:
    """The `avis` extension of a response: what AVIS decided and what it cost."""
    return {"answer": ans.answer, "votes": ans.votes, "k": ans.k, "mode": ans.mode, "p_hat": ans.p_hat,
            "images": [{"tokens": im["n_tokens"], "kept": im["n_kept"], "kept_fraction": im["kept_fraction"],
                        "key_source": im.get("key_source")} for im in ans.images],
            "decode_tokens": ans.decode_tokens, "early_stopped": ans.early_stopped,
            "tokens_saved": ans.tokens_saved, "rollouts_saved": ans.rollouts_saved, "waves": ans.waves,
            "prefix_reused": ans.prefix_reused, "tokens_skipped": ans.tokens_skipped,
            "timings": {k: round(v, 6) for k, v in ans.timings.items()},
            "flops_vs_vanilla": ans.flops.get("total"),
            "rollouts": [r.text for r in ans.rollouts], "video": getattr(ans, "video", None)}


def _completion(ans: Answer, name: str, content: str) -> dict[str, Any]:
    """An OpenAI chat.completion dict for an Answer."""
    completion = sum(ans.decode_tokens)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": _message_text(ans, content)},
                         "logprobs": None, "finish_reason": ans.finish_reason if ans.finish_reason != "early_stop" else "stop"}],
            "usage": {"prompt_tokens": ans.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": ans.prompt_tokens + completion},
            "avis": _avis_field(ans)}


# family-named aliases, so configuration can name the family as llama-cpp-python's handlers do
class AVISLlava15ChatHandler(AVISChatHandler):
    """AVIS for LLaVA-1.5-style models (the stock Llava15ChatHandler's prompt format)."""

    def __init__(self, clip_model_path: str, **kwargs: Any) -> None:
        kwargs.setdefault("chat_format", "llava-1-5")
        super().__init__(clip_model_path, **kwargs)


class AVISQwen25VLChatHandler(AVISChatHandler):
    """AVIS for Qwen2/2.5-VL models (the stock Qwen25VLChatHandler's prompt format)."""

    def __init__(self, clip_model_path: str, **kwargs: Any) -> None:
        kwargs.setdefault("chat_format", "qwen2.5-vl")
        super().__init__(clip_model_path, **kwargs)


__all__ = ["AVISChatHandler", "AVISLlava15ChatHandler", "AVISQwen25VLChatHandler", "request_overrides"]
