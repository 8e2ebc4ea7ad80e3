"""Prompt layout, tokenizer and batches for the shapes VLM (torch-free: numpy, PIL, llama-cpp-python).

The layout is exactly what ``VLM.ask(image, format_question(q), answer_tags=True)`` feeds llama.cpp:
``[BOS] system + "USER: "`` (text chunk 0), the image tokens, then ``question + " " + ANSWER_PROMPT_SUFFIX +
"ASSISTANT: "`` (text chunk 1, no BOS), then the assistant target ``<think>..</think><answer>X</answer>`` + EOS.
Tokenization goes through llama.cpp itself (a vocab-only load of the exported GGUF), so training tokens are
the tokens inference sees.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from avis_llamacpp.prompt import LLAVA15, QWEN25VL, ChatFormat, render, user_message
from avis_llamacpp.voting import ANSWER_PROMPT_SUFFIX
from convert.shapes_task import Question, format_question, make_item
from convert.text_model import MEDIA_MARKER
from convert.tokenizer import TokenizerSpec, build_vocab

logger = logging.getLogger(__name__)

N_MERGES = 2000  # enough for every frequent task word to become one token
CORPUS_ITEMS = 3000


def user_text(q: Question | str | dict) -> str:
    """The user turn's text as VLM.ask(..., answer_tags=True) builds it from a Question, its formatted text or
    a JSONL record."""
    text = format_question(q) if isinstance(q, Question) else q["question"] if isinstance(q, dict) else q
    return f"{text} {ANSWER_PROMPT_SUFFIX}"


def prompt_parts(text: str, fmt: ChatFormat = LLAVA15) -> tuple[str, str]:
    """(text before the image, text after it) of the prompt the pipeline renders for one image in `fmt`, with
    the image markers mtmd adds around a Qwen2/2.5-VL image."""
    url = "avis-image://0"
    full = render(fmt, [user_message(text, 1, url)], marker=MEDIA_MARKER, image_urls=[url])
    before, after = full.split(MEDIA_MARKER)
    if fmt == QWEN25VL:
        before, after = before + "<|vision_start|>", "<|vision_end|>" + after
    return before, after


@functools.lru_cache(maxsize=1)
def task_corpus() -> str:
    """Deterministic merge-learning corpus: the prompt scaffolding plus train-split questions and targets."""
    lines = []
    for i in range(CORPUS_ITEMS):
        q = make_item("train", 10_000_000 + i).question
        before, after = prompt_parts(user_text(q))
        lines += [before, after, q.target]
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def task_vocab() -> TokenizerSpec:
    """The llama-family vocabulary with merges learned on the task corpus."""
    return build_vocab(N_MERGES, family="llama", corpus=task_corpus())


class Tokenizer:
    """llama.cpp's tokenizer for a GGUF (vocab-only load)."""

    def __init__(self, gguf_path: str | os.PathLike, fmt: ChatFormat = LLAVA15) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(os.fspath(gguf_path), vocab_only=True, verbose=False)
        self.fmt = fmt
        self.bos = int(self.llm.token_bos())
        self.eos = int(self.llm.token_eos())
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(self.llm.model)))

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Tokens of text with special tokens parsed (as mtmd tokenizes prompt chunks)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True))

    def decode(self, tokens: list[int]) -> str:
        """Text of tokens (special tokens rendered)."""
        return self.llm.detokenize(tokens, special=True).decode("utf-8", "replace")

    @functools.lru_cache(maxsize=1)
    def prefix(self) -> list[int]:
        """BOS + system line + 'USER: ' (identical for every question)."""
        return self.encode(prompt_parts("x", self.fmt)[0], bos=self.add_bos)

    def question(self, q: Question | str | dict) -> list[int]:
        """The text chunk after the image: question, options, instruction, 'ASSISTANT: '."""
        return self.encode(prompt_parts(user_text(q), self.fmt)[1])

    def target(self, q: Question) -> list[int]:
        """Assistant tokens: reasoning trace, tagged answer, EOS."""
        return self.encode(q.target) + [self.eos]


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 uint8."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
