"""Deterministic byte-level BPE vocabulary for the tiny random-weight test models.

The vocabulary is shared by the LLaVA-style (``llama``) and Qwen2-VL-style
(``qwen2vl``) fixtures; only the special-token roles (BOS/EOS/EOT/PAD) and the
add-BOS flag differ between the two families.  It is written as a GPT-2 style
(``tokenizer.ggml.model = "gpt2"``) tokenizer with the ``qwen2`` pre-tokenizer,
which stock llama.cpp accepts and which does not "clean up" spaces on
detokenization, so text round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import gguf

__all__ = [
    "SPECIAL_TOKENS",
    "CONTROL_TOKENS",
    "USER_DEFINED_TOKENS",
    "TokenizerSpec",
    "bytes_to_unicode",
    "build_vocab",
    "pad_vocab",
    "add_tokenizer",
]

# Control tokens: only produced from text when tokenizing with parse_special=True,
# and hidden from detokenized output unless special=True (like the real models).
CONTROL_TOKENS: list[str] = [
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
]

# User-defined tokens: always matched as single tokens and always rendered in
# detokenized text (this is how Qwen3 ships <think>), so answers can be parsed.
USER_DEFINED_TOKENS: list[str] = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
]

SPECIAL_TOKENS: list[str] = CONTROL_TOKENS + USER_DEFINED_TOKENS

_FAMILIES = ("llama", "qwen2vl")

# Small English corpus the merges are learned from (deterministic, no I/O).
_CORPUS = """\
Hello world! This is a small test of the tokenizer. The model will answer the question.
What is in this image? Describe the image in detail. The image shows a cat on the table.
There is a red car and a blue house in the picture. How many people are there in the photo?
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
You are a helpful assistant. Please think step by step, then give the final answer.
The answer is yes. The answer is no. The answer is the number of objects in the scene.
USER: What color is the sky? ASSISTANT: The sky is blue and the clouds are white.
In the middle of the room there is a large wooden table with three chairs around it.
The quick brown fox jumps over the lazy dog, and then it runs into the green forest.
They said that it would be better to count the things that are on the left and the right.
She was looking at the dog while he was reading a book about the history of the world.
We can see two animals, one person, and a number of trees near the river and the road.
Answer with a single word or phrase. Which one is bigger, the first or the second object?
This image contains text, shapes, colors and patterns; the question asks about these things.
It is not possible to tell from the image, but there are some hints in the background.
Where is the man standing? He is standing in front of the building next to the station.
The woman is holding an umbrella because it is raining outside in the street of the city.
Reasoning: first find the objects, then compare their sizes, then write the answer.
Is there a bird in the image? Yes, there is a small bird sitting on the top of the tree.
The children are playing with a ball in the park, and their parents are watching them.
Numbers like 1, 2, 3, 10 and 2024 appear in the text; letters like A, B, C and D too.
Option A is correct. Option B is wrong. The correct option is C, not D, as shown above.
"""

# Approximation of the qwen2 pre-tokenizer regex, used only to split the corpus
# into words for merge learning (llama.cpp applies its own regex at run time).
_PRETOKENIZE = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map (what llama.cpp's BPE decodes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything written under tokenizer.ggml.* for one model family."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    family: str
    bos_id: int
    eos_id: int
    eot_id: int
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool = False
    model: str = "gpt2"
    pre: str = "qwen2"
    special_ids: dict[str, int] = field(default_factory=dict)

    @property
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self.tokens)

    def token_id(self, text: str) -> int:
        """Id of the token whose stored text is exactly ``text`` (KeyError if absent)."""
        if text in self.special_ids:
            return self.special_ids[text]
        return self.tokens.index(text)


def _mapped(text: str) -> str:
    """Byte-level encode ``text`` into GPT-2 unicode symbols."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


@functools.lru_cache(maxsize=8)
def _learn_merges(n_merges: int, corpus: str | None = None) -> tuple[tuple[str, str], ...]:
    """Learn up to ``n_merges`` BPE merges from ``corpus`` (default: the built-in one; ties broken lexicographically)."""
    forbidden = set(SPECIAL_TOKENS)
    words: Counter[tuple[str, ...]] = Counter(
        tuple(_mapped(w)) for w in _PRETOKENIZE.findall(_CORPUS if corpus is None else corpus)
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                if a + b not in forbidden:
                    pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return tuple(merges)


def build_vocab(n_merges: int = 200, *, family: str = "llama", corpus: str | None = None) -> TokenizerSpec:
    """Build the shared vocab (specials, 256 byte tokens, learned merges) with ``family``'s special-token roles.

    ``corpus`` replaces the built-in merge-learning corpus (e.g. a task's prompts and targets, so they tokenize
    compactly); None keeps the default vocabulary byte for byte.
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {_FAMILIES}")
    if n_merges < 0:
        raise ValueError("n_merges must be >= 0")

    tokens: list[str] = []
    types: list[int] = []
    for tok in CONTROL_TOKENS:
        tokens.append(tok)
        types.append(int(gguf.TokenType.UNKNOWN if tok == "<unk>" else gguf.TokenType.CONTROL))
    for tok in USER_DEFINED_TOKENS:
        tokens.append(tok)
        types.append(int(gguf.TokenType.USER_DEFINED))
    special_ids = {tok: i for i, tok in enumerate(tokens)}

    byte_table = bytes_to_unicode()
    for b in range(256):
        tokens.append(byte_table[b])
        types.append(int(gguf.TokenType.NORMAL))

    seen = set(tokens)
    merges: list[str] = []
    for a, b in _learn_merges(n_merges, corpus):
        merges.append(f"{a} {b}")
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            types.append(int(gguf.TokenType.NORMAL))

    if family == "llama":
        # LLaVA-1.5 / Llama-2 conventions: <s> prepended, </s> ends a turn.
        roles = dict(
            bos_id=special_ids["<s>"],
            eos_id=special_ids["</s>"],
            eot_id=special_ids["</s>"],
            unk_id=special_ids["<unk>"],
            pad_id=special_ids["<unk>"],
            add_bos=True,
        )
    else:
        # Qwen2-VL conventions: no BOS prepended, <|im_end|> ends a turn, pad = <|endoftext|>.
        roles = dict(
            bos_id=special_ids["<|endoftext|>"],
            eos_id=special_ids["<|im_end|>"],
            eot_id=special_ids["<|im_end|>"],
            unk_id=None,
            pad_id=special_ids["<|endoftext|>"],
            add_bos=False,
        )
    return TokenizerSpec(
        tokens=tokens,
        token_types=types,
        merges=merges,
        family=family,
        special_ids=special_ids,
        **roles,
    )


def _padding_tokens() -> Iterator[str]:
    """Candidate padding tokens, in a fixed order: 4096 single CJK characters (3-byte UTF-8, as real BPE vocabs
    hold), then lowercase words of growing length, each plain and space-prefixed ("Ġword"). All are written in
    GPT-2 byte symbols, so llama.cpp detokenizes them to real UTF-8."""
    for cp in range(0x4E00, 0x4E00 + 4096):
        yield _mapped(chr(cp))
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in itertools.count(2):
        for combo in itertools.product(letters, repeat=length):
            word = "".join(combo)
            yield word
            yield _mapped(" " + word)


def pad_vocab(spec: TokenizerSpec, n_vocab: int) -> TokenizerSpec:
    """``spec`` grown to exactly ``n_vocab`` tokens with extra NORMAL tokens appended after its own (ids,
    special roles and merges unchanged), so a fixture gets a real model's vocabulary size (151,936 for
    Qwen2.5-VL) and with it the real per-token cost of a full-vocabulary logits row. The extra tokens have no
    merges (the tokenizer never produces them from text) but a model can sample them and they detokenize."""
    if n_vocab < spec.n_vocab:
        raise ValueError(f"n_vocab {n_vocab} is smaller than the base vocabulary ({spec.n_vocab} tokens)")
    tokens, types = list(spec.tokens), list(spec.token_types)
    seen = set(tokens)
    normal = int(gguf.TokenType.NORMAL)
    for tok in _padding_tokens():
        if len(tokens) >= n_vocab:
            break
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
            types.append(normal)
    return dataclasses.replace(spec, tokens=tokens, token_types=types)


def add_tokenizer(writer: gguf.GGUFWriter, spec: TokenizerSpec, chat_template: str) -> None:
    """Write the tokenizer.ggml.* and tokenizer.chat_template metadata for ``spec``."""
    writer.add_tokenizer_model(spec.model)
    writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(spec.tokens)
    writer.add_token_types(spec.token_types)
    writer.add_token_merges(spec.merges)
    writer.add_bos_token_id(spec.bos_id)
    writer.add_eos_token_id(spec.eos_id)
    # Set EOT explicitly: otherwise llama.cpp guesses it from an unordered map.
    writer.add_eot_token_id(spec.eot_id)
    if spec.unk_id is not None:
        writer.add_unk_token_id(spec.unk_id)
    if spec.pad_id is not None:
        writer.add_pad_token_id(spec.pad_id)
    writer.add_add_bos_token(spec.add_bos)
    writer.add_add_eos_token(spec.add_eos)
    writer.add_chat_template(chat_template)
