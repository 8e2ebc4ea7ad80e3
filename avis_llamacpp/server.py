"""A thin launcher for llama-cpp-python's OpenAI-compatible server with the AVIS chat handler.

llama_cpp.server maps `chat_format` names to handler classes in a fixed list, so a custom handler cannot be
named in its settings. This launcher accepts every llama_cpp.server argument (or its --config_file) and
installs AVISChatHandler for models whose chat_format is "avis" (or "avis-llava-1-5" / "avis-qwen2.5-vl"),
with defaults from the --avis_* flags. Clients pick per-request settings with an `avis` object in the body
(openai client: extra_body={"avis": {"k": 5, "tau": 0.785}}).

    python -m avis_llamacpp.server --model M.gguf --clip_model_path mmproj.gguf --chat_format avis --avis_k 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from .chat_handler import _AVIS_SINK, _OVERRIDES, OVERRIDE_KEYS, AVISChatHandler

logger = logging.getLogger(__name__)

AVIS_FORMATS = {"avis": "auto", "avis-llava-1-5": "llava-1-5", "avis-qwen2.5-vl": "qwen2.5-vl"}


class AVISOverridesMiddleware:
    """ASGI middleware for chat completions: reads the request body's `avis` object into the handler's
    per-request settings (the body is replayed unchanged), and puts the handler's `avis` result back into
    JSON responses (llama_cpp.server's response model would drop it). Streamed chunks carry it already."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith(
                "/chat/completions"):
            await self.app(scope, receive, send)
            return
        messages, body, more = [], b"", True
        while more:
            msg = await receive()
            messages.append(msg)
            body += msg.get("body", b"")
            more = msg.get("more_body", False) and msg.get("type") == "http.request"
        overrides: dict[str, Any] = {}
        try:
            data = json.loads(body or b"{}")
            raw = data.get("avis") if isinstance(data, dict) else None
        except ValueError:
            raw = None  # the app itself answers malformed JSON
        if raw is not None:
            bad = (set(raw) - OVERRIDE_KEYS) if isinstance(raw, dict) else {"<not an object>"}
            if bad:
                await _json_error(send, 400, f"unknown avis setting(s): {sorted(bad)}; known: {sorted(OVERRIDE_KEYS)}")
                return
            overrides = dict(raw)

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        sink: dict[str, Any] = {}
        held: list[dict] = []

        async def send_with_avis(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = dict(msg.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"application/json"):
                    held.append(msg)  # hold until the body is complete
                    return
            elif msg["type"] == "http.response.body" and held:
                held.append(msg)
                if msg.get("more_body"):
                    return
                start, body = held[0], b"".join(m.get("body", b"") for m in held[1:])
                held.clear()
                if "avis" in sink:
                    try:
                        data = json.loads(body)
                        if isinstance(data, dict) and "choices" in data:
                            data["avis"] = sink["avis"]
                            body = json.dumps(data).encode()
                    except ValueError:
                        pass
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(msg)

        token = _OVERRIDES.set(overrides or None)
        token_sink = _AVIS_SINK.set(sink)
        try:
            await self.app(scope, replay, send_with_avis)
        finally:
            _AVIS_SINK.reset(token_sink)
            _OVERRIDES.reset(token)


async def _json_error(send: Any, status: int, message: str) -> None:
    payload = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def install(handler_defaults: dict[str, Any]) -> None:
    """Teach llama_cpp.server's model loader the "avis*" chat formats (idempotent)."""
    from llama_cpp.server import model as server_model

    proxy = server_model.LlamaProxy
    original = getattr(proxy, "_avis_original_loader", None) or proxy.load_llama_from_model_settings

    def load(settings: Any) -> Any:
        fmt = settings.chat_format
        if fmt not in AVIS_FORMATS:
            return original(settings)
        if not settings.clip_model_path:
            raise ValueError(f"chat_format {fmt!r} needs clip_model_path (the mmproj GGUF)")
        plain = settings.model_copy(update={"chat_format": None})
        llama = original(plain)
        llama.chat_handler = AVISChatHandler(settings.clip_model_path, chat_format=AVIS_FORMATS[fmt],
                                             verbose=settings.verbose, **handler_defaults)
        return llama

    proxy._avis_original_loader = original
    proxy.load_llama_from_model_settings = staticmethod(load)


def build_parser() -> argparse.ArgumentParser:
    from llama_cpp.server.cli import add_args_from_model
    from llama_cpp.server.settings import Settings

    p = argparse.ArgumentParser(prog="python -m avis_llamacpp.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args_from_model(p, Settings)
    p.add_argument("--config_file", type=str, help="llama_cpp.server config file (JSON or YAML)")
    g = p.add_argument_group("AVIS defaults (clients override per request with an `avis` body object)")
    g.add_argument("--avis_k", type=int, default=1, help="rollouts per query (1 = greedy)")
    g.add_argument("--avis_ratio", type=float, default=None, help="KDV: fraction of image tokens to prune")
    g.add_argument("--avis_tau", type=float, default=None, help="KDV adaptive: prune tokens within tau radians of the anchor")
    g.add_argument("--avis_policy", type=str, default=None, help="policy GGUF from `avis calibrate` (adaptive K)")
    g.add_argument("--avis_mode", choices=["parallel", "snapshot"], default="parallel", help="how rollouts share the prefill")
    g.add_argument("--avis_answer_tags", action="store_true", help="ask for <think>/<answer> and vote on the answers")
    g.add_argument("--avis_content", choices=["auto", "answer", "text"], default="auto", help="message text: voted answer or full text")
    g.add_argument("--avis_early_stop", action="store_true", help="stop rollouts once the vote is decided")
    return p


def create_avis_app(args: argparse.Namespace) -> Any:
    """The llama_cpp.server FastAPI app with AVIS installed and the overrides middleware around it."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.cli import parse_model_from_args
    from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings

    install({"k": args.avis_k, "ratio": args.avis_ratio, "tau": args.avis_tau, "policy": args.avis_policy,
             "mode": args.avis_mode, "answer_tags": args.avis_answer_tags, "content": args.avis_content,
             "early_stop": args.avis_early_stop})
    config_file = os.environ.get("CONFIG_FILE", args.config_file)
    if config_file:
        with open(config_file, "rb") as f:
            text = f.read()
        if config_file.endswith((".yaml", ".yml")):
            import yaml
            text = json.dumps(yaml.safe_load(text))
        cfg = ConfigFileSettings.model_validate_json(text)
        server_settings, model_settings = ServerSettings.model_validate(cfg), cfg.models
    else:
        server_settings = parse_model_from_args(ServerSettings, args)
        model_settings = [parse_model_from_args(ModelSettings, args)]
    app = create_app(server_settings=server_settings, model_settings=model_settings)
    return AVISOverridesMiddleware(app), server_settings


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    app, server_settings = create_avis_app(args)
    uvicorn.run(app, host=os.getenv("HOST", server_settings.host), port=int(os.getenv("PORT", server_settings.port)),
                ssl_keyfile=server_settings.ssl_keyfile, ssl_certfile=server_settings.ssl_certfile)


if __name__ == "__main__":
    main()
