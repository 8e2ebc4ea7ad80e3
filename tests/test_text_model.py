"""Tests for convert/tokenizer.py and convert/text_model.py against stock llama.cpp."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Iterator

import gguf
import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convert.text_model import (  # noqa: E402
    CHATML_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    TextModelDims,
    default_rope_sections,
    write_text_model,
)
from convert.tokenizer import SPECIAL_TOKENS, USER_DEFINED_TOKENS, build_vocab  # noqa: E402

try:
    import llama_cpp
except ImportError:  # pragma: no cover - the template/determinism tests still run
    llama_cpp = None

needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python not installed")

ARCHES = ("llama", "qwen2vl")
TEMPLATES = {"llama": LLAVA_CHAT_TEMPLATE, "qwen2vl": CHATML_CHAT_TEMPLATE}

# Image + text user turn, as an OpenAI-style client sends it.
IMAGE_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "file:///tmp/cat.png"}},
            {"type": "text", "text": "What is in this image?"},
        ],
    }
]

# Hand-written oracles for IMAGE_MESSAGES with add_generation_prompt=True.
EXPECTED_PROMPTS = {
    "llama": (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.\n"
        "USER: <__media__>\nWhat is in this image?\nASSISTANT:"
    ),
    "qwen2vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<__media__>What is in this image?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}


def tiny_dims(arch: str) -> TextModelDims:
    """Smallest sensible dims for a fast load/generate test."""
    return TextModelDims(arch=arch, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128)


def write(path: Path, arch: str, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Write a tiny model of ``arch`` to ``path``."""
    return write_text_model(
        path, tiny_dims(arch), seed=seed, chat_template=TEMPLATES[arch], name=f"tiny-{arch}", **kwargs
    )


def load(path: Path) -> Any:
    """Load a GGUF with llama-cpp-python, quietly and deterministically."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)


def sha256(path: Path) -> str:
    """Hex digest of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=ARCHES)
def model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, dict[str, Any], Any]]:
    """(arch, path, info, loaded Llama) for each architecture."""
    if llama_cpp is None:
        pytest.skip("llama-cpp-python not installed")
    arch = request.param
    path = tmp_path_factory.mktemp(arch) / f"{arch}.gguf"
    info = write(path, arch, weight_std=0.05)
    llm = load(path)
    yield arch, path, info, llm
    llm.close()


def test_vocab_is_shared_and_small() -> None:
    llama_spec = build_vocab(family="llama")
    qwen_spec = build_vocab(family="qwen2vl")
    assert llama_spec.tokens == qwen_spec.tokens
    assert llama_spec.merges == qwen_spec.merges
    assert 300 <= llama_spec.n_vocab <= 600
    assert len(set(llama_spec.tokens)) == llama_spec.n_vocab
    assert llama_spec.add_bos and not qwen_spec.add_bos
    assert llama_spec.tokens[llama_spec.eos_id] == "</s>"
    assert qwen_spec.tokens[qwen_spec.eos_id] == "<|im_end|>"
    assert qwen_spec.tokens[qwen_spec.eot_id] == "<|im_end|>"


def test_vocab_and_special_ids(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    arch, _, info, llm = model
    assert llm.n_vocab() == info["n_vocab"]
    assert llm.token_bos() == info["bos_id"]
    assert llm.token_eos() == info["eos_id"]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_eot(vocab) == info["eot_id"]
    assert bool(llama_cpp.llama_vocab_get_add_bos(vocab)) == (arch == "llama")
    for text in ("</s>", "<|im_end|>", "<|endoftext|>"):
        assert llama_cpp.llama_vocab_is_eog(vocab, info["special_ids"][text])


def test_metadata_roundtrip(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    arch, path, _, llm = model
    meta = llm.metadata
    assert meta["general.architecture"] == arch
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == TEMPLATES[arch]
    assert llm.chat_format == "chat_template.default"
    if arch == "qwen2vl":
        # llama.cpp's string metadata view omits arrays; read the file directly.
        field = gguf.GGUFReader(path).get_field("qwen2vl.rope.dimension_sections")
        assert field is not None and list(field.contents()) == [2, 3, 3, 0]


def test_special_tokens_are_single_tokens(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    _, _, info, llm = model
    for text in SPECIAL_TOKENS:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == [info["special_ids"][text]], text
    # Control tokens are plain text unless parse_special is on; think/answer tags always match.
    assert len(llm.tokenize(b"<|im_start|>", add_bos=False, special=False)) > 1
    for text in USER_DEFINED_TOKENS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == [info["special_ids"][text]]
        assert llm.detokenize([info["special_ids"][text]]) == text.encode()


def test_tokenize_roundtrip(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    arch, _, info, llm = model
    for text in (b"hello world", b"What is in this image? The answer is 42.\n", "caf\u00e9 \u732b".encode()):
        ids = llm.tokenize(text, add_bos=False)
        assert llm.detokenize(ids) == text
    ids = llm.tokenize(b"The answer is the number of objects in the image.", add_bos=False)
    assert len(ids) < 20  # merges are applied, not one token per byte
    with_bos = llm.tokenize(b"hello world")  # add_bos defaults to True; the vocab decides
    assert (with_bos[0] == info["bos_id"]) == (arch == "llama")


def test_chat_prompt_tokenization(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    arch, _, info, llm = model
    prompt = EXPECTED_PROMPTS[arch].replace("<__media__>", "")
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    if arch == "qwen2vl":
        assert ids[0] == info["special_ids"]["<|im_start|>"]
        assert ids.count(info["special_ids"]["<|im_end|>"]) == 2
    assert llm.detokenize(ids, special=True) == prompt.encode()


def test_rope_type(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    arch, _, _, llm = model
    expected = llama_cpp.LLAMA_ROPE_TYPE_MROPE if arch == "qwen2vl" else llama_cpp.LLAMA_ROPE_TYPE_NORM
    assert llama_cpp.llama_model_rope_type(llm.model) == expected


def test_greedy_generation_is_deterministic(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    _, path, _, llm = model
    kwargs = dict(temperature=0.0, max_tokens=8, repeat_penalty=1.0, logprobs=None)
    prompt = "The answer is"
    first = llm.create_completion(prompt, **kwargs)
    again = load(path)
    try:
        second = again.create_completion(prompt, **kwargs)
    finally:
        again.close()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["usage"] == second["usage"]
    assert first["usage"]["completion_tokens"] >= 1


def test_chat_completion_uses_gguf_template(model: tuple[str, Path, dict[str, Any], Any]) -> None:
    _, _, _, llm = model
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "hello"}], temperature=0.0, max_tokens=4, repeat_penalty=1.0
    )
    assert out["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("arch", ARCHES)
def test_same_seed_same_bytes(tmp_path: Path, arch: str) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write(a, arch, seed=7)
    write(b, arch, seed=7)
    write(c, arch, seed=8)
    assert sha256(a) == sha256(b)
    assert sha256(a) != sha256(c)


@needs_llama_cpp
@pytest.mark.parametrize("arch", ARCHES)
def test_f16_loads(tmp_path: Path, arch: str) -> None:
    path = tmp_path / "f16.gguf"
    info = write(path, arch, ftype="f16")
    f32_info = write(tmp_path / "f32.gguf", arch)
    assert info["file_size"] < f32_info["file_size"]
    llm = load(path)
    try:
        assert llm.n_vocab() == info["n_vocab"]
        llm.create_completion("hello", temperature=0.0, max_tokens=2, repeat_penalty=1.0)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize(
    "env",
    [jinja2.Environment(), ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)],
    ids=["plain", "handler-like"],
)
def test_chat_template_renders_image_as_media_marker(arch: str, env: jinja2.Environment) -> None:
    rendered = env.from_string(TEMPLATES[arch]).render(messages=IMAGE_MESSAGES, add_generation_prompt=True)
    assert rendered == EXPECTED_PROMPTS[arch]


@needs_llama_cpp
@pytest.mark.parametrize("arch", ARCHES)
def test_chat_template_through_mtmd_handler_conversion(arch: str) -> None:
    from llama_cpp.llama_chat_format import MTMDChatHandler

    messages = [MTMDChatHandler._convert_message_for_template(m, "<__media__>") for m in IMAGE_MESSAGES]
    assert messages[0]["content"][0] == {"type": "text", "text": "<__media__>"}
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(TEMPLATES[arch]).render(messages=messages, add_generation_prompt=True)
    assert rendered == EXPECTED_PROMPTS[arch]


def test_chat_template_multi_turn_with_system() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    env = jinja2.Environment()
    llava = env.from_string(LLAVA_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert llava == "Be brief.\nUSER: Hi\nASSISTANT: Hello</s>\nUSER: Bye\nASSISTANT:"
    chatml = env.from_string(CHATML_CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=False)
    assert chatml == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    )


def test_rope_sections_and_validation(tmp_path: Path) -> None:
    assert default_rope_sections(16) == (2, 3, 3, 0)
    assert default_rope_sections(128) == (16, 24, 24, 0)
    bad = TextModelDims(arch="qwen2vl", n_embd=64, n_layer=1, n_head=4, n_head_kv=2, n_ff=64, rope_sections=(4, 4, 4, 0))
    with pytest.raises(ValueError, match="sum"):
        write_text_model(tmp_path / "bad.gguf", bad, seed=0, chat_template="", name="bad")
    with pytest.raises(ValueError):
        TextModelDims(arch="llama", n_embd=64, n_layer=1, n_head=4, n_head_kv=2, n_ff=64, rope_sections=(2, 3, 3, 0)).validate()
    with pytest.raises(ValueError):
        TextModelDims(arch="gpt2", n_embd=64, n_layer=1, n_head=4, n_head_kv=2, n_ff=64).validate()
