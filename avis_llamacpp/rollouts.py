"""Decoding after prefill: one stream (greedy or sampled) continuing a prefilled sequence. Each stream
keeps its own sampler, tokens, text and log-probabilities, and knows when it is finished."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .native import Context, Model, Sampler, SamplingParams


@dataclass
class Rollout:
    """One decoded continuation."""

    text: str
    tokens: list[int]
    token_logprobs: list[float] = field(repr=False)
    finish_reason: str  # "stop" (end-of-generation token or stop string) or "length"
    decode_s: float = 0.0

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.token_logprobs)) if self.token_logprobs else 0.0


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], computed stably in float64."""
    x = logits.astype(np.float64)
    m = x.max()
    return float(x[token] - m - math.log(np.exp(x - m).sum()))


class Stream:
    """The state of one rollout while it decodes on sequence seq_id."""

    def __init__(self, model: Model, params: SamplingParams, seq_id: int, n_past: int, max_tokens: int,
                 stop: Sequence[str]) -> None:
        self.model = model
        self.sampler = Sampler(params)
        self.seq_id = seq_id
        self.n_past = n_past
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.pieces: list[bytes] = []
        self.finish_reason: str | None = None
        self.text = ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, ctx: Context, output_index: int) -> int | None:
        """Sample the next token from the given output of the last decode; returns the token to feed
        next, or None when the stream has finished."""
        tok = self.sampler.sample(ctx, output_index)
        if self.model.is_eog(tok):
            self.finish_reason = "stop"
            return None
        self.logprobs.append(token_logprob(ctx.logits(output_index), tok))
        self.tokens.append(tok)
        self.pieces.append(self.model.token_piece(tok))
        text = b"".join(self.pieces).decode("utf-8", "ignore")
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.text = text[:at]
                self.finish_reason = "stop"
                return None
        self.text = text
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
            return None
        return tok

    def result(self, decode_s: float) -> Rollout:
        self.sampler.close()
        return Rollout(self.text, list(self.tokens), list(self.logprobs), self.finish_reason or "length", decode_s)


def generate(ctx: Context, model: Model, n_past: int, *, params: SamplingParams = SamplingParams(),
             max_tokens: int = 256, stop: Sequence[str] = (), seq_id: int = 0) -> Rollout:
    """Decode one stream from the logits left by prefill (output -1), one token per step."""
    t0 = time.perf_counter()
    stream = Stream(model, params, seq_id, n_past, max_tokens, stop)
    if max_tokens <= 0:
        stream.finish_reason = "length"
        return stream.result(0.0)
    tok = stream.step(ctx, -1)
    while tok is not None:
        ctx.decode_tokens([tok], stream.n_past, seq_id)
        stream.n_past += 1
        tok = stream.step(ctx, -1)
    return stream.result(time.perf_counter() - t0)
