"""Chat-prompt rendering: the same templates and system messages llama-cpp-python's stock handlers use,
so a prompt rendered here tokenizes exactly as the stock handler's does."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import llama_chat_format as lcf

from .errors import InvalidArgumentError
from .families import family_for


@dataclass(frozen=True)
class ChatFormat:
    """A chat template plus the system message injected when the conversation has none."""

    name: str
    template: str
    default_system: str | None


LLAVA15 = ChatFormat("llava-1-5", lcf.Llava15ChatHandler.CHAT_FORMAT, lcf.Llava15ChatHandler.DEFAULT_SYSTEM_MESSAGE)
QWEN25VL = ChatFormat("qwen2.5-vl", lcf.Qwen25VLChatHandler.CHAT_FORMAT, lcf.Qwen25VLChatHandler.DEFAULT_SYSTEM_MESSAGE)
KNOWN_FORMATS = {f.name: f for f in (LLAVA15, QWEN25VL)}


def check_format_name(chat_format: "str | ChatFormat") -> None:
    """InvalidArgumentError unless chat_format is a ChatFormat, 'auto' or a known format's name (checked before
    any model loads)."""
    if not isinstance(chat_format, ChatFormat) and chat_format != "auto" and chat_format not in KNOWN_FORMATS:
        raise InvalidArgumentError(f"unknown chat_format {chat_format!r}; use 'auto' or one of {sorted(KNOWN_FORMATS)}")


def resolve_format(chat_format: "str | ChatFormat", text_arch: str, projector_type: str | None,
                   gguf_template: str | None) -> ChatFormat:
    """The ChatFormat a VLM renders prompts with: the one given, the named one, or (for 'auto') a guess from
    the text model's architecture, the projector type and the GGUF's chat template."""
    check_format_name(chat_format)
    if isinstance(chat_format, ChatFormat):
        return chat_format
    if chat_format == "auto":
        return guess_format(text_arch, projector_type, gguf_template)
    return KNOWN_FORMATS[chat_format]


def guess_format(text_arch: str, projector_type: str | None, gguf_template: str | None) -> ChatFormat:
    """Pick the stock llama-cpp-python handler's format for the families it has one for (Qwen2/2.5-VL text
    models; the llava family's projector on a llama model); other families use the GGUF's own template."""
    if text_arch in ("qwen2vl", "qwen25vl"):
        return QWEN25VL
    if text_arch == "llama" and family_for(projector_type).chat_format == LLAVA15.name:
        return LLAVA15
    if gguf_template:
        return ChatFormat("gguf", gguf_template, None)
    return LLAVA15


def user_message(question: str, n_images: int, image_url: str) -> dict[str, Any]:
    """An OpenAI-style user message: the images first, then the question (as the stock handlers order them)."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_url}} for _ in range(n_images)]
    parts.append({"type": "text", "text": question})
    return {"role": "user", "content": parts}


@lru_cache(maxsize=16)
def _compiled(template: str):  # noqa: ANN202 - jinja2.Template
    """Compile a chat template once (the sandboxed environment stock handlers use)."""
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render(fmt: ChatFormat, messages: Sequence[Mapping[str, Any]], *, marker: str, bos: str = "", eos: str = "",
           image_urls: Sequence[str] = ()) -> str:
    """Render messages to prompt text (generation prompt appended); image URLs become the media marker."""
    if not messages:
        raise InvalidArgumentError("messages is empty")
    msgs = list(messages)
    has_system = any(m.get("role") == "system" for m in msgs)
    if not has_system and fmt.default_system is not None:
        msgs = [{"role": "system", "content": fmt.default_system}] + msgs
    text = _compiled(fmt.template).render(messages=msgs, add_generation_prompt=True, bos_token=bos,
                                                eos_token=eos)
    for url in image_urls:
        text = text.replace(url, marker)
    return text
