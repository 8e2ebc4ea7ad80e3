"""A launcher for llama-cpp-python's OpenAI-compatible server with the AVIS chat handler, safe to put on a network.

llama_cpp.server maps `chat_format` names to handler classes in a fixed list, so a custom handler cannot be
named in its settings. This launcher accepts every llama_cpp.server argument (or its --config_file) and
installs AVISChatHandler for models whose chat_format is "avis" (or "avis-llava-1-5" / "avis-qwen2.5-vl"),
with defaults from the --avis_* flags. Clients pick per-request settings with an `avis` object in the body
(openai client: extra_body={"avis": {"k": 5, "tau": 0.785}}).

    python -m avis_llamacpp.server --model M.gguf --clip_model_path mmproj.gguf --chat_format avis --avis_k 5

What a request may do (the ASGI guard in front of llama_cpp.server checks it before any work is queued):
images come as data URIs; http(s) URLs only with --avis_allow_remote_images; local paths and file:// URLs only
inside --avis_image_dir (one error message for outside / missing / unreadable files). One video per request (an
OpenAI-style {"type": "video_url", "video_url": {"url": ...}} part, and then no images) comes from the same places,
within --avis_max_video_bytes / _seconds / _frames and --avis_max_image_pixels per frame, read from its container
header before anything is decoded; the `avis` object may set its sampling (fps, max_frames, max_pixels) and
video_selection. Every client mistake
(unknown or ill-typed `avis` keys, K above the server's slots, max_tokens beyond the context, oversized,
undecodable or too many images, too large a body) is a 4xx with an OpenAI-shaped error body
{"error": {"message", "type", "param", "code"}}; 5xx means a server fault. Requests are answered one at a time
(llama_cpp.server's lock), each on a cleared KV cache or on the same client's cached prompt prefix (the prefix
cache, --avis_prefix_cache*: same tokens as a cold run), so concurrent clients get the single-client answers.
Cached prefixes are kept per client (Authorization header + address + the body's `user`): one client never reuses,
or learns of, another's; no request can name a file for the server to read (the cache directory is the operator's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio

from .chat_handler import _AVIS_SINK, _CACHE_NAMESPACE, _OVERRIDES, ONE_VIDEO_RULE, OVERRIDE_KEYS, AVISChatHandler
from .cli_args import flash_attn_arg
from .cli_args import parse_tau as _parse_tau
from .errors import AVISError, ClosedError, ContextOverflowError, ImageError, InvalidArgumentError, VideoError
from .images import (ImageSourcePolicy, check_image_header, fetch_request_bytes, fetch_request_image, load_image,
                     request_images)
from .native import no_repack

logger = logging.getLogger(__name__)

AVIS_FORMATS = {"avis": "auto", "avis-llava-1-5": "llava-1-5", "avis-qwen2.5-vl": "qwen2.5-vl"}
MiB = 1024 * 1024
MAX_SAMPLE_FPS = 60.0  # the `avis` body's fps
MAX_SAMPLE_FRAMES = 768  # the `avis` body's max_frames (qwen-vl-utils' FPS_MAX_FRAMES)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server (the --avis_max_* flags). max_queue bounds the chat requests
    held at once (running or waiting for the model), which bounds memory: more get 429."""

    max_request_bytes: int = 32 * MiB
    max_images: int = 8
    max_queue: int = 16
    slots: int = 8  # rollout slots (the handler's n_seq_max): the largest K a request may ask for
    images: ImageSourcePolicy = field(default_factory=ImageSourcePolicy)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_images", "max_queue", "slots"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {v!r}")


class RequestError(Exception):
    """A client mistake, answered with `status` and an OpenAI-shaped error body naming the field (`param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def payload(self) -> dict[str, Any]:
        """The response body, as OpenAI shapes errors (openai raises it as APIStatusError with .param/.code)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- #
# request validation (pure: no model, no I/O)
# --------------------------------------------------------------------------- #

@dataclass
class ChatPlan:
    """What a valid chat request needs from the guard: the handler overrides and the images to fetch."""

    overrides: dict[str, Any]
    images: list[tuple[str, str]]  # (param path, url), in message order
    stream: bool = False
    videos: list[tuple[str, str]] = field(default_factory=list)  # (param path, url): at most one


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(param: str, expected: str, got: Any, status: int = 400, code: str = "invalid_value") -> RequestError:
    shown = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
    return RequestError(status, f"{param} must be {expected}, got {shown}", param=param, code=code)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _avis_checks(slots: int) -> dict[str, tuple[str, Callable[[Any], bool]]]:
    """Each `avis` key: (the expected value, in words; its check)."""
    num = _is_num
    return {
        "k": (f"an integer from 1 to {slots} (this server's rollout slots)",
              lambda v: _is_int(v) and 1 <= v <= slots),
        "ratio": ("null or a number with 0 <= ratio < 1", lambda v: v is None or (num(v) and 0 <= v < 1)),
        "rho": ("null or a number with 0 <= rho < 1", lambda v: v is None or (num(v) and 0 <= v < 1)),
        "tau": ('null, "auto" (the policy\'s calibrated tau) or a number with 0 < tau < pi',
                lambda v: v is None or v == "auto" or (num(v) and 0 < v < math.pi)),
        "mode": ('"parallel", "snapshot" or "staged"', lambda v: v in ("parallel", "snapshot", "staged")),
        "wave": (f"an integer from 1 to {slots} (rollouts per staged wave)", lambda v: _is_int(v) and 1 <= v <= slots),
        "stopping": ('"posterior" or "unanimity"', lambda v: v in ("posterior", "unanimity")),
        "stop_threshold": ("a number with 0 < stop_threshold < 1", lambda v: num(v) and 0 < v < 1),
        "seed": ("an integer", _is_int),
        "early_stop": ("true or false", lambda v: isinstance(v, bool)),
        "answer_tags": ("true or false", lambda v: isinstance(v, bool)),
        "reuse_prefix": ("true or false (reuse this client's earlier prompt prefix)", lambda v: isinstance(v, bool)),
        "content": ('"auto", "answer" or "text"', lambda v: v in ("auto", "answer", "text")),
        "options": ("null or a list of 1 to 26 option strings (each at most 1000 characters)",
                    lambda v: v is None or (isinstance(v, list) and 1 <= len(v) <= 26
                                            and all(isinstance(o, str) and len(o) <= 1000 for o in v))),
        "temperature": ("a number from 0 to 100", lambda v: num(v) and 0 <= v <= 100),
        "top_p": ("a number with 0 < top_p <= 1", lambda v: num(v) and 0 < v <= 1),
        "top_k": ("an integer >= 0 (0 disables it)", lambda v: _is_int(v) and v >= 0),
        "min_p": ("a number from 0 to 1", lambda v: num(v) and 0 <= v <= 1),
        "policy": ("null (turns the server's adaptive-K policy off; the operator chooses the policy file)",
                   lambda v: v is None),
        "fps": (f"a number with 0 < fps <= {MAX_SAMPLE_FPS:g} (video frames sampled per second)",
                lambda v: num(v) and 0 < v <= MAX_SAMPLE_FPS),
        "max_frames": (f"an integer from 1 to {MAX_SAMPLE_FRAMES} (most video frames sampled)",
                       lambda v: _is_int(v) and 1 <= v <= MAX_SAMPLE_FRAMES),
        "max_pixels": ("an integer >= 1 (most pixels per sampled video frame)", lambda v: _is_int(v) and v >= 1),
        "video_selection": ('"joint" or "per_chunk"', lambda v: v in ("joint", "per_chunk")),
    }


def _validate_avis(raw: Any, slots: int) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad("avis", "an object of AVIS settings (e.g. {\"k\": 5, \"tau\": 0.785})", raw)
    checks = _avis_checks(slots)
    unknown = sorted(str(k) for k in raw if k not in checks)
    if unknown:
        raise RequestError(400, f"unknown avis setting(s): {unknown}; known: {sorted(OVERRIDE_KEYS)}",
                           param=f"avis.{unknown[0]}", code="unknown_parameter")
    for key, value in raw.items():
        expected, ok = checks[key]
        if not ok(value):
            raise _bad(f"avis.{key}", expected, value)
    pruning = [k for k in ("ratio", "rho", "tau") if raw.get(k) is not None]
    if len(pruning) > 1:
        raise RequestError(400, f"avis: give at most one of ratio/rho (fixed pruning) and tau (adaptive), got "
                           f"{pruning}", param=f"avis.{pruning[1]}", code="invalid_value")
    return dict(raw)


def _message_images(messages: list[Any], max_images: int,
                    videos: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """(param, url) of every image part of every message, checking the shapes the handler relies on; video_url
    parts go to `videos` (one per request, and then no images: a 400 naming the part otherwise)."""
    found: list[tuple[str, str]] = []
    videos = [] if videos is None else videos
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "a message object with a role and content", m)
        if m.get("role") not in ("system", "user", "assistant", "tool", "function"):
            raise _bad(f"{where}.role", '"system", "user" or "assistant" (or "tool" / "function")', m.get("role"))
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content", "a string or a list of content parts", content)
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(pw, 'a content part object with a "type"', part)
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{pw}.text", "a string", part.get("text"))
            elif part["type"] in ("image_url", "video_url"):
                kind = part["type"]
                iu = part.get(kind)
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str) or not url:
                    example = "data:video/mp4;base64,..." if kind == "video_url" else "data:image/png;base64,..."
                    raise _bad(f"{pw}.{kind}", f'a non-empty URL string or {{"url": "{example}"}}', iu)
                (videos if kind == "video_url" else found).append((f"{pw}.{kind}", url))
                if videos and (len(videos) > 1 or found):
                    got = f"{len(videos)} videos" if len(videos) > 1 else f"a video and {len(found)} image(s)"
                    raise RequestError(400, f"{ONE_VIDEO_RULE} (got {got}); ask about each separately",
                                       param=f"{pw}.{kind}", code="too_many_media")
                if len(found) > max_images:
                    raise RequestError(400, f"too many images: at most {max_images} per request on this server",
                                       param=f"{pw}.image_url", code="too_many_images")
            else:
                raise _bad(f"{pw}.type", '"text", "image_url" or "video_url"', part["type"])
    return found


def validate_chat_request(data: Any, limits: ServerLimits, n_ctx: int | None) -> ChatPlan:
    """Check a parsed chat-completions body; RequestError (4xx) naming the field for any client mistake.
    Types llama_cpp.server's own model checks are left to it (its errors are reshaped the same way)."""
    if not isinstance(data, dict):
        raise _bad("body", "a JSON object", data)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of messages", messages)
    videos: list[tuple[str, str]] = []
    images = _message_images(messages, limits.max_images, videos)
    overrides = _validate_avis(data.get("avis"), limits.slots)
    mt = data.get("max_tokens")
    if mt is not None:
        hi = n_ctx if n_ctx else 2 ** 31 - 1
        if not _is_int(mt) or not 1 <= mt <= hi:
            raise _bad("max_tokens", f"null or an integer from 1 to {hi} (the model's context)", mt,
                       code="context_length_exceeded" if _is_int(mt) and mt > hi else "invalid_value")
    for name, expected, ok in (
            ("seed", "null or an integer", lambda v: v is None or _is_int(v)),
            ("temperature", "a number >= 0", lambda v: _is_num(v) and v >= 0),
            ("top_p", "a number with 0 < top_p <= 1", lambda v: _is_num(v) and 0 < v <= 1),
            ("min_p", "a number from 0 to 1", lambda v: _is_num(v) and 0 <= v <= 1),
            ("top_k", "an integer >= 0", lambda v: _is_int(v) and v >= 0),
            ("repeat_penalty", "a number > 0 (1 disables it)", lambda v: _is_num(v) and v > 0),
            ("stream", "true or false", lambda v: isinstance(v, bool)),
            ("n", "1 (one choice per request)", lambda v: v is None or v == 1 and _is_int(v))):
        if name in data and not (name == "seed" and data[name] is None) and not ok(data[name]):
            raise _bad(name, expected, data[name])
    if data.get("grammar") is not None:
        raise RequestError(400, "grammar is not supported by the AVIS chat handler; leave it out", param="grammar",
                           code="unsupported_parameter")
    return ChatPlan(overrides=overrides, images=images, stream=data.get("stream") is True, videos=videos)


def validate_other_request(path: str, data: Any, n_vocab: int | None, serves_embeddings: bool) -> None:
    """Checks for llama_cpp.server's other POST routes where a bad value would crash the process or be a 5xx:
    token ids out of the vocabulary (llama.cpp aborts in detokenize), embeddings from a model not loaded for them."""
    if not isinstance(data, dict):
        raise _bad("body", "a JSON object", data)
    if path.endswith("/embeddings") and not serves_embeddings:
        raise RequestError(400, "this server does not serve embeddings (the operator starts it with --embedding true)",
                           code="unsupported_endpoint")
    hi = n_vocab if n_vocab else 2 ** 31 - 1
    if path.endswith("/detokenize"):
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(_is_int(t) and 0 <= t < hi for t in tokens):
            raise _bad("tokens", f"a list of token ids from 0 to {hi - 1} (the model's vocabulary)", tokens)
    bias = data.get("logit_bias")
    if isinstance(bias, dict) and data.get("logit_bias_type") != "tokens":
        for key in bias:
            if not (isinstance(key, str) and key.isdigit() and int(key) < hi):
                raise _bad("logit_bias", f"an object keyed by token ids from 0 to {hi - 1}", {key: bias[key]})


# --------------------------------------------------------------------------- #
# the ASGI guard
# --------------------------------------------------------------------------- #

def _error_for_exception(exc: BaseException) -> RequestError:
    """The answer for an exception a request raised: 4xx for AVIS's client-error types, 5xx otherwise."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(exc)
    for e in leaves:
        if isinstance(e, RequestError):
            return e
        if isinstance(e, ContextOverflowError):
            return RequestError(400, f"the request does not fit the model's context: {e}", param="messages",
                                code="context_length_exceeded")
        if isinstance(e, VideoError):
            return RequestError(400, f"video: {e}", param="messages", code="invalid_video")
        if isinstance(e, ImageError):
            return RequestError(400, f"image: {e}", param="messages", code="invalid_image")
        if isinstance(e, InvalidArgumentError):
            return RequestError(400, str(e), code="invalid_value")
        if isinstance(e, ClosedError):
            return RequestError(503, "the model is shutting down; retry", type_="server_error")
    first = leaves[0] if leaves else exc
    return RequestError(500, f"internal server error ({type(first).__name__})", type_="server_error")


async def _send_error(send: Any, err: RequestError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(err.payload()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class AVISGuard:
    """ASGI middleware in front of llama_cpp.server: bounds request bytes and queued chat requests, validates
    chat bodies (`avis` settings, limits, image sources), fetches their images under the image policy (the
    handler sees only those bytes), maps failures to OpenAI-shaped 4xx / 5xx, and puts the handler's `avis`
    result into JSON responses (llama_cpp.server's response model would drop it)."""

    def __init__(self, app: Any, limits: ServerLimits | None = None,
                 n_ctx: Callable[[str | None], int | None] | None = None,
                 n_vocab: Callable[[], int | None] | None = None, serves_embeddings: bool = True) -> None:
        self.app = app
        self.limits = limits or ServerLimits()
        self.n_ctx = n_ctx or (lambda model: None)
        self.n_vocab = n_vocab or (lambda: None)
        self.serves_embeddings = serves_embeddings
        self.active = 0  # chat requests held now (running or queued)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chat = scope.get("path", "").endswith("/chat/completions")
        if chat and self.active >= self.limits.max_queue:
            await _send_error(send, RequestError(429, f"server busy: {self.active} requests are queued; retry "
                                                      "shortly", code="server_busy", type_="rate_limit_error"),
                              [(b"retry-after", b"1")])
            return
        if chat:
            self.active += 1
        try:
            await self._post(scope, receive, send, chat)
        finally:
            if chat:
                self.active -= 1

    async def _read_body(self, scope: dict, receive: Any) -> list[dict]:
        limit = self.limits.max_request_bytes
        for k, v in scope.get("headers") or []:
            if k.lower() == b"content-length" and v.strip().isdigit() and int(v) > limit:
                raise RequestError(413, f"request body is {int(v)} bytes, over this server's limit of {limit}",
                                   code="request_too_large")
        messages, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg.get("type") != "http.request":
                raise RequestError(400, "client disconnected", code="client_disconnected")
            size += len(msg.get("body", b""))
            if size > limit:
                raise RequestError(413, f"request body is over this server's limit of {limit} bytes",
                                   code="request_too_large")
            messages.append(msg)
            more = msg.get("more_body", False)
        return messages

    async def _post(self, scope: dict, receive: Any, send: Any, chat: bool) -> None:
        try:
            messages = await self._read_body(scope, receive)
            body = b"".join(m.get("body", b"") for m in messages)
            try:  # every route takes JSON; llama_cpp.server's error path would crash on a malformed body
                data = json.loads(body or b"null") if body or chat else None
            except (ValueError, RecursionError):
                raise RequestError(400, "the body is not valid JSON", code="invalid_json") from None
            if not chat and data is not None:
                validate_other_request(scope.get("path", ""), data, self.n_vocab(), self.serves_embeddings)
            if chat:
                n_ctx = self.n_ctx(data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), str)
                                   else None)
                plan = validate_chat_request(data, self.limits, n_ctx)
                resolved = await anyio.to_thread.run_sync(self._fetch_images, plan.images)
                if plan.videos:
                    resolved.update(await anyio.to_thread.run_sync(self._fetch_videos, plan.videos))
                    scope, messages = _as_image_parts(scope, data)
        except RequestError as e:
            await _send_error(send, e)
            return
        queue = list(messages)

        async def replay() -> dict:
            return queue.pop(0) if queue else await receive()

        if not chat:
            await self._answer(scope, replay, send, {})
            return
        sink: dict[str, Any] = {}
        token, token_sink = _OVERRIDES.set(plan.overrides or None), _AVIS_SINK.set(sink)
        token_ns = _CACHE_NAMESPACE.set(cache_namespace(scope, data))
        try:
            with request_images(resolved, videos=[url for _, url in plan.videos]):
                await self._answer(scope, replay, send, sink)
        finally:
            _CACHE_NAMESPACE.reset(token_ns)
            _AVIS_SINK.reset(token_sink)
            _OVERRIDES.reset(token)

    async def _answer(self, scope: dict, receive: Any, send: Any, sink: dict[str, Any]) -> None:
        """Run the app; an exception before the response got under way is answered as a 4xx / 5xx."""
        out = _HeldResponse(send, sink)
        try:
            await self.app(scope, receive, out.send)
        except Exception as e:  # noqa: BLE001 - every failure gets an answer (or a logged, closed stream)
            err = _error_for_exception(e)
            if err.status >= 500:
                logger.exception("request failed")
            if out.forwarded:
                raise  # a stream already under way: the connection is closed mid-stream
            out.held.clear()
            await _send_error(send, err)
            return
        await out.flush()

    def _fetch_images(self, images: list[tuple[str, str]]) -> dict[str, bytes]:
        resolved: dict[str, bytes] = {}
        for param, url in images:
            if url in resolved:
                continue
            try:
                data = fetch_request_image(url, self.limits.images)
                load_image(data)  # decode once here (then dropped: bytes are smaller) so a corrupt image is a
                resolved[url] = data  # 400 naming its field, also for streams
            except ImageError as e:
                raise RequestError(400, f"{param}: {e}", param=param, code="invalid_image") from None
        return resolved


    def _fetch_videos(self, videos: list[tuple[str, str]]) -> dict[str, bytes]:
        """The request's video bytes under the source policy, each checked against the video limits from its
        header (check_video_header); nothing is decoded here (the handler samples the frames it needs)."""
        policy = self.limits.images
        resolved: dict[str, bytes] = {}
        for param, url in videos:
            try:
                data = fetch_request_bytes(url, policy, video=True)
            except ImageError as e:
                code = "video_too_large" if "over this server's limit" in str(e) else "invalid_video"
                raise RequestError(400, f"{param}: {e}", param=param, code=code) from None
            check_video_header(data, policy, param)
            resolved[url] = data
        return resolved


def check_video_header(data: bytes, policy: ImageSourcePolicy, param: str) -> dict[str, Any]:
    """A request's video checked from its container header (video.probe_video: no frame decoded) against the
    policy's limits: pixels per frame, duration, source frames. RequestError (400) naming the part and the limit;
    returns the header's facts. Animated GIF / WebP / PNG are checked from their image header and frame count."""
    from .video import container_format, probe_video

    def refuse(code: str, message: str) -> RequestError:
        return RequestError(400, f"{param}: {message}", param=param, code=code)

    try:
        if container_format(data[:16]) is not None:
            # the probe's own limits stay open so that each limit below gets its own code
            info = probe_video(data, max_bytes=policy.max_video_bytes, max_source_pixels=2 ** 62)
        else:
            try:
                w, h = check_image_header(data, 2 ** 62)
            except ImageError:
                raise ImageError("not a readable video; send an mp4, mov, webm, mkv or avi file (or an animated GIF, "
                                 "WebP or PNG)") from None
            info = {"width": w, "height": h, "frames": _animation_frames(data), "duration": None}
    except ImageError as e:
        raise refuse("invalid_video", str(e)) from None
    w, h, n, seconds = info["width"], info["height"], info["frames"], info["duration"]
    if w * h > policy.max_pixels:
        raise refuse("video_too_many_pixels", f"video frames are {w}x{h} = {w * h} pixels, over this server's limit "
                                              f"of {policy.max_pixels} per frame; downscale the video")
    if n > policy.max_video_frames:
        raise refuse("video_too_many_frames", f"the video has {n} frames, over this server's limit of "
                                              f"{policy.max_video_frames}; send a shorter clip")
    if seconds is not None and seconds > policy.max_video_seconds:
        raise refuse("video_too_long", f"the video lasts {seconds:.1f} s, over this server's limit of "
                                       f"{policy.max_video_seconds:g} s; send a shorter clip")
    return info


def _animation_frames(data: bytes) -> int:
    """Frames of an animated (or still) image, counted from its headers."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(getattr(img, "n_frames", 1) or 1)
    except Exception as e:  # whatever a plugin raises on a damaged animation
        raise ImageError(f"the animation is truncated or corrupt ({type(e).__name__})") from None


def _as_image_parts(scope: dict, data: dict[str, Any]) -> tuple[dict, list[dict]]:
    """The request with its video_url part handed on as an image_url part of the same URL (llama_cpp.server's
    request model knows no video_url; request_images tells the handler which URL is the video): the new scope
    (content-length) and body messages."""
    messages = []
    for m in data["messages"]:
        if isinstance(m.get("content"), list):
            m = {**m, "content": [{"type": "image_url", "image_url": p["video_url"]}
                                  if isinstance(p, dict) and p.get("type") == "video_url" else p
                                  for p in m["content"]]}
        messages.append(m)
    body = json.dumps({**data, "messages": messages}).encode()
    headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers}, [{"type": "http.request", "body": body, "more_body": False}]


def cache_namespace(scope: dict, data: Any) -> str:
    """Whose conversation a chat request belongs to, for the prefix cache (KV reused only within a namespace):
    the Authorization header, the client's address and the body's OpenAI `user` field, hashed. Clients that
    differ in any of them never reuse (or learn of) each other's cached prompts."""
    import hashlib

    auth = b""
    for k, v in scope.get("headers") or []:
        if k.lower() == b"authorization":
            auth = bytes(v)
    client = scope.get("client") or ("", 0)
    user = data.get("user") if isinstance(data, dict) and isinstance(data.get("user"), str) else ""
    h = hashlib.sha256(auth + b"\0" + str(client[0]).encode() + b"\0" + user.encode())
    return h.hexdigest()


class _HeldResponse:
    """Forwards a response, holding its start: a JSON body until complete (to add `avis`), a stream until its
    second chunk (so a failure in the first steps, e.g. an undecodable image, still gets a proper 4xx)."""

    def __init__(self, send: Any, sink: dict[str, Any]) -> None:
        self._send, self.sink = send, sink
        self.held: list[dict] = []
        self.json = False
        self.forwarded = False

    async def send(self, msg: dict) -> None:
        if self.forwarded:
            await self._send(msg)
            return
        if msg["type"] == "http.response.start":
            headers = dict(msg.get("headers") or [])
            self.json = headers.get(b"content-type", b"").startswith(b"application/json")
            self.held.append(msg)
            return
        if msg["type"] != "http.response.body":
            await self._send(msg)
            return
        self.held.append(msg)
        if self.json:
            if not msg.get("more_body"):
                await self._flush_json()
        elif sum(1 for m in self.held if m.get("body")) >= 2:
            await self.flush()  # the end of a stream (an empty last body) waits for the app to return

    async def _flush_json(self) -> None:
        start, body = self.held[0], b"".join(m.get("body", b"") for m in self.held[1:])
        self.held.clear()
        self.forwarded = True
        if "avis" in self.sink and start.get("status") == 200:
            try:
                data = json.loads(body)
                if isinstance(data, dict) and "choices" in data:
                    data["avis"] = self.sink["avis"]
                    body = json.dumps(data).encode()
            except ValueError:
                pass
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    async def flush(self) -> None:
        if self.held and self.json:
            await self._flush_json()
            return
        held, self.held = self.held, []
        if held:
            self.forwarded = True
        for m in held:
            await self._send(m)


# --------------------------------------------------------------------------- #
# llama_cpp.server integration
# --------------------------------------------------------------------------- #

def install(handler_defaults: dict[str, Any], *, repack: bool = True) -> None:
    """Teach llama_cpp.server's model loader the "avis*" chat formats (and, with repack=False, to load every model
    as llama-server's --no-repack does), and its route error handler that AVIS's client-error exceptions are 4xx
    (idempotent)."""
    from llama_cpp.server import model as server_model
    from llama_cpp.server.errors import RouteErrorHandler

    proxy = server_model.LlamaProxy
    original = getattr(proxy, "_avis_original_loader", None) or proxy.load_llama_from_model_settings

    def load_model(settings: Any) -> Any:
        with contextlib.nullcontext() if repack else no_repack():
            return original(settings)

    def load(settings: Any) -> Any:
        fmt = settings.chat_format
        if fmt not in AVIS_FORMATS:
            return load_model(settings)
        if not settings.clip_model_path:
            raise ValueError(f"chat_format {fmt!r} needs clip_model_path (the mmproj GGUF)")
        plain = settings.model_copy(update={"chat_format": None})
        llama = load_model(plain)
        llama.chat_handler = AVISChatHandler(settings.clip_model_path, chat_format=AVIS_FORMATS[fmt],
                                             verbose=settings.verbose, **handler_defaults)
        return llama

    proxy._avis_original_loader = original
    proxy.load_llama_from_model_settings = staticmethod(load)

    wrapper = getattr(RouteErrorHandler, "_avis_original_wrapper", None) or RouteErrorHandler.error_message_wrapper

    def error_message_wrapper(self: Any, error: Exception, body: Any = None) -> tuple[int, dict[str, Any]]:
        from fastapi.exceptions import RequestValidationError

        if isinstance(error, RequestValidationError):  # the route catches these before FastAPI's handler
            return 400, _validation_error(error).payload()["error"]
        if isinstance(error, AVISError):
            err = _error_for_exception(error)
            if err.status < 500:
                return err.status, err.payload()["error"]
        status, err = wrapper(self, error, body)  # llama_cpp's own mapping; it prints the traceback of a fault
        if status >= 500:  # a fault's text (paths, internals) stays in the server's log
            err = RequestError(status, f"internal server error ({type(error).__name__})",
                               type_="server_error").payload()["error"]
        return status, err

    RouteErrorHandler._avis_original_wrapper = wrapper
    RouteErrorHandler.error_message_wrapper = error_message_wrapper


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_error(exc: Any) -> RequestError:
    """llama_cpp.server's request-model errors (pydantic) as a 400 naming the first field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    # pydantic puts union members' type names in the path (stop.str, messages[0].ChatCompletionRequest...): drop them
    loc = [p for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or (
        isinstance(p, str) and p.isidentifier() and p.islower() and p not in _TYPE_NAMES))]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    msg = str(first.get("msg", "invalid request"))
    return RequestError(400, f"{param or 'body'}: {msg}", param=param, code="invalid_value")


def _openai_error_handlers(app: Any) -> None:
    """FastAPI's own 422 / 404 / 405 bodies ({"detail": ...}) reshaped as OpenAI errors; validation is a 400."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def validation(request: Any, exc: RequestValidationError) -> Any:
        return JSONResponse(_validation_error(exc).payload(), status_code=400)

    async def http_error(request: Any, exc: HTTPException) -> Any:
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error"
                                       if exc.status_code < 500 else "server_error", "param": None,
                                       "code": None}}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)


def build_parser() -> argparse.ArgumentParser:
    from llama_cpp.server.cli import add_args_from_model
    from llama_cpp.server.settings import Settings

    p = argparse.ArgumentParser(prog="python -m avis_llamacpp.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args_from_model(p, Settings)
    p.add_argument("--config_file", type=str, help="llama_cpp.server config file (JSON or YAML)")
    p.add_argument("--avis_no_repack", dest="avis_repack", action="store_false",
                   help="load every model outside llama.cpp's CPU extra buffer types (AMX, repacked layouts), as "
                        "llama-server's --no-repack: for a host whose AMX kernels fault on quantized models")
    g = p.add_argument_group("AVIS defaults (clients override per request with an `avis` body object)")
    g.add_argument("--avis_k", type=int, default=1, help="rollouts per query (1 = greedy)")
    g.add_argument("--avis_ratio", type=float, default=None, help="KDV: fraction of image tokens to prune")
    g.add_argument("--avis_tau", type=_parse_tau, default=None,
                   help="KDV adaptive: prune tokens within tau radians of the anchor (auto: the policy's "
                        "calibrated tau)")
    g.add_argument("--avis_policy", type=str, default=None, help="policy GGUF from `avis calibrate` (adaptive K)")
    g.add_argument("--avis_mode", choices=["parallel", "snapshot"], default="parallel", help="how rollouts share the prefill")
    g.add_argument("--avis_answer_tags", action="store_true", help="ask for <think>/<answer> and vote on the answers")
    g.add_argument("--avis_content", choices=["auto", "answer", "text"], default="auto", help="message text: voted answer or full text")
    g.add_argument("--avis_early_stop", action="store_true", help="stop rollouts once the vote is decided")
    g.add_argument("--avis_prefix_cache", choices=["on", "off"], default="on",
                   help="reuse a client's earlier prompt prefix (image encode + prefill) across its turns")
    g.add_argument("--avis_prefix_cache_bytes", type=int, default=0,
                   help="also keep earlier prompts' KV states in memory, up to this many bytes (0: only the last)")
    g.add_argument("--avis_prefix_cache_dir", type=str, default=None,
                   help="also keep them as snapshot GGUF files in this directory (the server names and reads them; "
                        "requests cannot)")
    g.add_argument("--avis_prefix_cache_disk_bytes", type=int, default=None, help="cap on that directory's files")
    g.add_argument("--avis_flash_attn", type=flash_attn_arg, default="auto", metavar="{auto,on,off}",
                   help="flash attention in AVIS's text context and vision encoder (default auto: where supported; "
                        "--flash_attn only sets the Llama's own context)")
    d = ServerLimits()
    s = p.add_argument_group("what requests may do (a server on a network)")
    s.add_argument("--avis_slots", type=int, default=d.slots, help="rollout slots (n_seq_max): the largest K a request may ask for")
    s.add_argument("--avis_image_dir", type=str, default=None,
                   help="local image paths / file:// URLs in requests resolve inside this directory (default: refused)")
    s.add_argument("--avis_allow_remote_images", action="store_true", help="fetch http(s) image URLs (default: refused)")
    s.add_argument("--avis_max_request_bytes", type=int, default=d.max_request_bytes, help="largest request body")
    s.add_argument("--avis_max_image_bytes", type=int, default=d.images.max_bytes, help="largest encoded image")
    s.add_argument("--avis_max_image_pixels", type=int, default=d.images.max_pixels, help="largest image (width x height)")
    s.add_argument("--avis_max_images", type=int, default=d.max_images, help="most images per request")
    s.add_argument("--avis_max_video_bytes", type=int, default=d.images.max_video_bytes,
                   help="largest encoded video (one video_url per request, from the same places as images)")
    s.add_argument("--avis_max_video_seconds", type=float, default=d.images.max_video_seconds,
                   help="longest video, from its container header")
    s.add_argument("--avis_max_video_frames", type=int, default=d.images.max_video_frames,
                   help="most source frames in a video, from its header (--avis_max_image_pixels bounds each frame)")
    s.add_argument("--avis_max_queue", type=int, default=d.max_queue,
                   help="most chat requests held at once (running or waiting); more get 429")
    return p


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    """The ServerLimits the --avis_* flags describe."""
    return ServerLimits(max_request_bytes=args.avis_max_request_bytes, max_images=args.avis_max_images,
                        max_queue=args.avis_max_queue, slots=args.avis_slots,
                        images=ImageSourcePolicy(image_dir=args.avis_image_dir,
                                                 allow_remote=args.avis_allow_remote_images,
                                                 max_bytes=args.avis_max_image_bytes,
                                                 max_pixels=args.avis_max_image_pixels,
                                                 max_video_bytes=args.avis_max_video_bytes,
                                                 max_video_seconds=args.avis_max_video_seconds,
                                                 max_video_frames=args.avis_max_video_frames))


def prefix_cache_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The handler's prefix-cache settings the --avis_prefix_cache* flags describe."""
    from .prefix_cache import PrefixStore

    on = getattr(args, "avis_prefix_cache", "on") == "on"
    n_bytes = getattr(args, "avis_prefix_cache_bytes", 0) or 0
    directory = getattr(args, "avis_prefix_cache_dir", None)
    store = None
    if on and (n_bytes > 0 or directory):
        store = PrefixStore(n_bytes, directory, getattr(args, "avis_prefix_cache_disk_bytes", None))
    return {"prefix_cache": on, "prefix_store": store}


def _n_ctx_lookup(model_settings: list[Any]) -> Callable[[str | None], int | None]:
    """model name -> its context size (as llama_cpp.server picks the model: unknown names get the default)."""
    from llama_cpp.server import app as server_app

    by_alias = {(m.model_alias or m.model): m for m in model_settings}
    default = model_settings[0]

    def n_ctx(model: str | None) -> int | None:
        settings = by_alias.get(model or "", default)
        if settings.n_ctx:
            return int(settings.n_ctx)
        proxy = server_app._llama_proxy  # n_ctx=0: the model's own, known once it is loaded
        current = getattr(proxy, "_current_model", None)
        if current is not None and getattr(proxy, "_current_model_alias", None) == (settings.model_alias or settings.model):
            return int(current.n_ctx())
        return None

    return n_ctx


def create_avis_app(args: argparse.Namespace) -> Any:
    """The llama_cpp.server FastAPI app with AVIS installed and the guard around it; returns (app, settings)."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.cli import parse_model_from_args
    from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings

    limits = limits_from_args(args)
    install({"k": args.avis_k, "ratio": args.avis_ratio, "tau": args.avis_tau, "policy": args.avis_policy,
             "mode": args.avis_mode, "answer_tags": args.avis_answer_tags, "content": args.avis_content,
             "early_stop": args.avis_early_stop, "n_seq_max": limits.slots, "flash_attn": args.avis_flash_attn,
             **prefix_cache_from_args(args)}, repack=args.avis_repack)
    config_file = os.environ.get("CONFIG_FILE", args.config_file)
    if config_file:
        with open(config_file, "rb") as f:
            text = f.read()
        if config_file.endswith((".yaml", ".yml")):
            import yaml
            text = json.dumps(yaml.safe_load(text))
        cfg = ConfigFileSettings.model_validate_json(text)
        server_settings, model_settings = ServerSettings.model_validate(cfg), cfg.models
        if "interrupt_requests" not in cfg.model_fields_set:
            server_settings.interrupt_requests = False
    else:
        server_settings = parse_model_from_args(ServerSettings, args)
        if getattr(args, "interrupt_requests", None) is None:
            # llama_cpp.server's default cuts a stream short when another request arrives; a shared server must
            # give every client its whole answer
            server_settings.interrupt_requests = False
        model_settings = [parse_model_from_args(ModelSettings, args)]
    app = create_app(server_settings=server_settings, model_settings=model_settings)
    _openai_error_handlers(app)
    return AVISGuard(app, limits, _n_ctx_lookup(model_settings), _n_vocab,
                     serves_embeddings=any(m.embedding for m in model_settings)), server_settings


def _n_vocab() -> int | None:
    """The loaded model's vocabulary size (None before one is loaded)."""
    from llama_cpp.server import app as server_app

    current = getattr(server_app._llama_proxy, "_current_model", None)
    return int(current.n_vocab()) if current is not None else None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        app, server_settings = create_avis_app(args)
    except InvalidArgumentError as e:
        raise SystemExit(f"avis server: {e}") from None
    uvicorn.run(app, host=os.getenv("HOST", server_settings.host), port=int(os.getenv("PORT", server_settings.port)),
                ssl_keyfile=server_settings.ssl_keyfile, ssl_certfile=server_settings.ssl_certfile)


if __name__ == "__main__":
    main()
