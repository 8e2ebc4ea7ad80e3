"""Decoding after prefill: K rollouts that share one prefilled prompt.

- parallel (default): sequence 0 is copied to sequences 1..K-1 (metadata-only with a unified KV cache) and all
  live rollouts advance together, one llama_decode per step;
- snapshot: rollouts run one after another on sequence 0; between rollouts only the generated tokens are
  removed, so the prompt's KV cells are reused (the prompt state itself can be saved and restored, see
  snapshot.py).
Each rollout keeps its own sampler (own seed), tokens, text and log-probabilities."""

from __future__ import annotations

import codecs
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import ContextOverflowError, InvalidArgumentError
from .native import Context, Model, Sampler, SamplingParams


@dataclass
class Rollout:
    """One decoded continuation."""

    text: str
    tokens: list[int]
    token_logprobs: list[float] = field(repr=False)
    finish_reason: str  # "stop" (end-of-generation token or stop string), "length", or "early_stop"
    decode_s: float = 0.0
    seed: int = 0

    @property
    def mean_logprob(self) -> float:
        return float(np.mean(self.token_logprobs)) if self.token_logprobs else 0.0


def token_logprob(logits: np.ndarray, token: int, scratch: np.ndarray | None = None) -> float:
    """log softmax(logits)[token] of one float32 logits row, computed stably without a float64 copy.

    Why: this runs for every sampled token of every rollout, over the whole vocabulary; a float64 log-softmax
    (copy, exp, sum) costs about 1.4 ms per call at 152k tokens, ~10 ms per step at K = 7. Here the max and
    the exp-sum stay in the row's float32 (one exp pass into `scratch`, a float32 buffer of the row's size
    reused across calls, so nothing vocabulary-sized is allocated) and only the final subtraction is float64:
    it agrees with the float64 log-softmax to float32 rounding of the sum (about 1e-6 absolute)."""
    x = logits if logits.dtype == np.float32 else np.asarray(logits, dtype=np.float32)
    m = x.max()
    buf = scratch if scratch is not None and scratch.shape == x.shape else np.empty_like(x)
    np.subtract(x, m, out=buf)
    np.exp(buf, out=buf)
    return float(x[token]) - float(m) - math.log(float(buf.sum()))


def rollout_seed(seed: int, index: int) -> int:
    """The sampler seed of rollout `index`, derived from one user seed (reproducible, decorrelated)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1)[0])


def rollout_params(k: int, base: SamplingParams) -> list[SamplingParams]:
    """Sampling parameters for K rollouts: K=1 is greedy (the paper's VRS); K>1 samples with `base`,
    each rollout with its own derived seed."""
    if k < 1:
        raise InvalidArgumentError(f"k must be >= 1, got {k}")
    if k == 1:
        return [SamplingParams(temperature=0.0, repeat_penalty=base.repeat_penalty,
                               penalty_last_n=base.penalty_last_n, seed=rollout_seed(base.seed, 0))]
    return [SamplingParams(temperature=base.temperature, top_p=base.top_p, top_k=base.top_k, min_p=base.min_p,
                           repeat_penalty=base.repeat_penalty, penalty_last_n=base.penalty_last_n,
                           seed=rollout_seed(base.seed, i)) for i in range(k)]


class Stream:
    """The state of one rollout while it decodes on sequence seq_id.

    `stop` strings end the rollout and are cut from its text; `stop_after` strings (e.g. "</answer>") end it
    and are kept."""

    def __init__(self, model: Model, params: SamplingParams, seq_id: int, n_past: int, max_tokens: int,
                 stop: Sequence[str] = (), stop_after: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.params = params
        self.sampler = Sampler(params, model.n_vocab)
        self.seq_id = seq_id
        self.n_past = n_past
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.stop_after = [s for s in stop_after if s]
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.pieces: list[bytes] = []
        self.finish_reason: str | None = None
        # Text is decoded incrementally: each token's bytes go through one UTF-8 decoder that holds back an
        # incomplete multi-byte character until its last byte arrives (and drops invalid bytes, as decoding all
        # bytes with errors="ignore" does), so a token costs its own bytes, not the whole text so far.
        self._decoder = codecs.getincrementaldecoder("utf-8")("ignore")
        self._parts: list[str] = []  # the text, joined lazily when read (text property)
        self._len = 0  # len(text)
        # stop strings are searched only where a new match can be: the new text plus the last _window chars
        self._window = max((len(x) for x in (*self.stop, *self.stop_after)), default=1) - 1
        self._tail = ""  # the last _window chars of the text
        self._scratch: np.ndarray | None = None  # float32 buffer for token_logprob, one vocabulary row
        self.t0 = time.perf_counter()
        self.decode_s = 0.0
        self.on_text = on_text
        self._emitted = 0
        self._holdback = max((len(x) for x in self.stop), default=1) - 1  # a stop string may still cut this

    @property
    def text(self) -> str:
        """The rollout's text so far (stop strings cut, stop_after strings kept)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self._parts = [value] if value else []
        self._len = len(value)
        self._tail = value[max(0, len(value) - self._window):]

    def _emit(self, final: bool, recent: str = "", recent_at: int = 0) -> None:
        """Send the text that can no longer change to on_text. `recent` is text[recent_at:] when the caller has
        it (the last window plus the new text), so a step does not join the whole text."""
        if self.on_text is None:
            return
        upto = self._len if final else max(self._emitted, self._len - self._holdback)
        if upto > self._emitted:
            if not final and self._emitted >= recent_at and upto <= recent_at + len(recent):
                self.on_text(recent[self._emitted - recent_at:upto - recent_at])
            else:
                self.on_text(self.text[self._emitted:upto])
            self._emitted = upto

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _accept(self, tok: int, logits: np.ndarray) -> int | None:
        """Record a sampled token (its log-probability from `logits`, the row it was sampled from) and extend
        the text; the token to feed next, or None when the rollout ends. Work per token is independent of the
        text's length: no re-join or re-decode of earlier pieces, stop strings searched in the new text plus
        the window a match could start in (no earlier match exists, or the rollout would have ended)."""
        if self.model.is_eog(tok):
            return self._finish("stop")
        if self._scratch is None or self._scratch.shape != logits.shape:
            self._scratch = np.empty(logits.shape, dtype=np.float32)
        self.logprobs.append(token_logprob(logits, tok, self._scratch))
        self.tokens.append(tok)
        piece = self.model.token_piece(tok)
        self.pieces.append(piece)
        new = self._decoder.decode(piece)
        recent = self._tail + new
        recent_at = self._len - len(self._tail)  # text index of recent[0]
        for s in self.stop:
            at = recent.find(s)
            if at >= 0:
                self.text = (self.text + new)[:recent_at + at]
                return self._finish("stop")
        if new:
            self._parts.append(new)
            self._len += len(new)
            self._tail = recent[max(0, len(recent) - self._window):]
        for s in self.stop_after:
            at = recent.find(s)
            if at >= 0:
                self.text = self.text[:recent_at + at + len(s)]
                return self._finish("stop")
        if len(self.tokens) >= self.max_tokens:
            return self._finish("length")
        self._emit(final=False, recent=recent, recent_at=recent_at)
        return tok

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.decode_s = time.perf_counter() - self.t0
        self._emit(final=True)
        return None

    def step(self, ctx: Context, output_index: int) -> int | None:
        """Sample from output `output_index` of the last decode; the token to feed next, or None when done."""
        tok = self.sampler.sample(ctx, output_index)
        return self._accept(tok, ctx.logits_view(output_index))  # read in place: no per-rollout copy

    def step_logits(self, logits: np.ndarray) -> int | None:
        """Like step, from saved logits (the prefill's, for rollouts after the first in snapshot mode)."""
        return self._accept(self.sampler.sample_logits(logits), logits)

    def cancel(self) -> None:
        if not self.done:
            self._finish("early_stop")

    def result(self) -> Rollout:
        self.sampler.close()
        if not self.done:
            self._finish("length")
        return Rollout(self.text, list(self.tokens), list(self.logprobs), self.finish_reason or "length",
                       self.decode_s, self.params.seed)


# Called after each rollout finishes with the finished rollouts so far and the number still running;
# returns True to stop the rest (early stopping once the vote is decided).
EarlyStop = Callable[[list[Rollout], int], bool]


def required_kv_cells(n_prompt_kv: int, k: int, max_tokens: int, mode: str) -> int:
    """KV cells the rollouts may need: the shared prompt plus every live rollout's tokens."""
    return n_prompt_kv + (k if mode == "parallel" else 1) * max_tokens


def run_parallel(ctx: Context, model: Model, n_past: int, params: Sequence[SamplingParams], *, max_tokens: int,
                 stop: Sequence[str] = (), stop_after: Sequence[str] = (),
                 early_stop: EarlyStop | None = None, on_text: Callable[[str], None] | None = None,
                 first_logits: np.ndarray | None = None) -> list[Rollout]:
    """K rollouts continuing the prompt prefilled in sequence 0 (logits at output -1), decoded as one batch
    per step on sequences 0..K-1. Sequences 1..K-1 are removed afterwards.
    first_logits: the prefill's last logits saved earlier, to sample the first tokens from (when other decodes
    ran since the prefill, as in staged mode's later waves)."""
    k = len(params)
    if k > ctx.settings.n_seq_max:
        raise InvalidArgumentError(f"k={k} rollouts need n_seq_max >= {k} (the context has "
                                   f"{ctx.settings.n_seq_max}); create the VLM with n_seq_max={k} or use mode='snapshot'")
    for i in range(1, k):
        ctx.seq_cp(0, i)
    streams = [Stream(model, p, i, n_past, max_tokens, stop, stop_after, on_text if i == 0 else None)
               for i, p in enumerate(params)]
    try:
        live: list[tuple[Stream, int]] = []
        finished: list[Stream] = []
        for s in streams:
            tok = (s._finish("length") if max_tokens <= 0 else s.step(ctx, -1) if first_logits is None
                   else s.step_logits(first_logits))
            (live.append((s, tok)) if tok is not None else finished.append(s))
        _maybe_stop(streams, finished, live, early_stop)
        live = [(s, t) for s, t in live if not s.done]
        while live:
            ctx.decode_step([t for _, t in live], [s.n_past for s, _ in live], [s.seq_id for s, _ in live])
            nxt = []
            for j, (s, _) in enumerate(live):
                s.n_past += 1
                tok = s.step(ctx, j)
                if tok is None:
                    finished.append(s)
                else:
                    nxt.append((s, tok))
            live = nxt
            if _maybe_stop(streams, finished, live, early_stop):
                live = []
    finally:
        for i in range(1, k):
            ctx.seq_rm(i)
    return [s.result() for s in streams]


def _maybe_stop(streams: list[Stream], finished: list[Stream], live: list, early_stop: EarlyStop | None) -> bool:
    if early_stop is None or not live:
        return False
    done = [_view(s) for s in streams if s.done]
    if early_stop(done, len(live)):
        for s, _ in live:
            s.cancel()
        return True
    return False


def _view(s: Stream) -> Rollout:
    return Rollout(s.text, list(s.tokens), list(s.logprobs), s.finish_reason or "length", s.decode_s, s.params.seed)


def run_staged(ctx: Context, model: Model, n_past: int, prefill_logits: np.ndarray, params: Sequence[SamplingParams],
               *, wave: int, settled: Callable[[list[Rollout]], bool], max_tokens: int, stop: Sequence[str] = (),
               stop_after: Sequence[str] = (), early_stop: EarlyStop | None = None,
               on_text: Callable[[str], None] | None = None) -> tuple[list[Rollout], int]:
    """Up to K = len(params) rollouts in waves of `wave`, each wave decoded as one batch (run_parallel) from the
    prompt prefilled in sequence 0; prefill_logits are the prefill's last logits (the first tokens of every wave
    are sampled from them). Between waves only the generated tokens are removed, so the prompt's KV is reused.
    After each wave but the last, `settled(finished rollouts so far)` decides whether to stop. Rollout i always
    gets params[i], whatever wave it runs in. early_stop sees every rollout not yet started as still to come.
    Returns the rollouts that ran (in order) and the number of waves."""
    k = len(params)
    out: list[Rollout] = []
    n_waves = 0
    for start in range(0, k, wave):
        chunk = params[start:start + wave]
        upcoming = k - start - len(chunk)
        prev = list(out)
        stopper = None
        if early_stop is not None:
            def stopper(done: list[Rollout], n_live: int, prev: list[Rollout] = prev, upcoming: int = upcoming) -> bool:
                return early_stop(prev + done, n_live + upcoming)
        if n_waves > 0:
            ctx.seq_rm(0, n_past, -1)  # the previous wave's tokens on sequence 0; the prompt stays
        got = run_parallel(ctx, model, n_past, chunk, max_tokens=max_tokens, stop=stop, stop_after=stop_after,
                           early_stop=stopper, on_text=on_text if start == 0 else None,
                           first_logits=prefill_logits if n_waves > 0 else None)
        out += got
        n_waves += 1
        if upcoming == 0 or any(r.finish_reason == "early_stop" for r in got):
            break  # K reached, or the vote was decided for all K (early stop cancelled the rest)
        if early_stop is not None and early_stop(list(out), upcoming):
            break  # decided for all K: no later wave can change the winner
        if settled(list(out)):
            break
    ctx.seq_rm(0, n_past, -1)
    return out, n_waves


def run_snapshot(ctx: Context, model: Model, n_past: int, prefill_logits: np.ndarray,
                 params: Sequence[SamplingParams], *, max_tokens: int, stop: Sequence[str] = (),
                 stop_after: Sequence[str] = (), early_stop: EarlyStop | None = None,
                 on_text: Callable[[str], None] | None = None) -> list[Rollout]:
    """K rollouts one after another on sequence 0, each starting from the prefilled prompt: the generated
    tokens (positions >= n_past) are removed between rollouts and the first token is sampled from the saved
    prefill logits."""
    out: list[Rollout] = []
    for i, p in enumerate(params):
        if i > 0:
            ctx.seq_rm(0, n_past, -1)
        s = Stream(model, p, 0, n_past, max_tokens, stop, stop_after, on_text if i == 0 else None)
        tok = s.step_logits(prefill_logits) if max_tokens > 0 else s._finish("length")
        while tok is not None:
            ctx.decode_tokens([tok], s.n_past, 0)
            s.n_past += 1
            tok = s.step(ctx, -1)
        out.append(s.result())
        if early_stop is not None and i + 1 < len(params) and early_stop(list(out), len(params) - i - 1):
            for q in params[i + 1:]:
                out.append(Rollout("", [], [], "early_stop", 0.0, q.seed))
            break
    ctx.seq_rm(0, n_past, -1)
    return out


def generate(ctx: Context, model: Model, n_past: int, *, params: SamplingParams = SamplingParams(),
             max_tokens: int = 256, stop: Sequence[str] = (), seq_id: int = 0) -> Rollout:
    """Decode one stream from the logits left by prefill (output -1), one token per step."""
    s = Stream(model, params, seq_id, n_past, max_tokens, stop)
    tok = s.step(ctx, -1) if max_tokens > 0 else s._finish("length")
    while tok is not None:
        ctx.decode_tokens([tok], s.n_past, seq_id)
        s.n_past += 1
        tok = s.step(ctx, -1)
    return s.result()


def check_capacity(ctx: Context, n_prompt_kv: int, k: int, max_tokens: int, mode: str) -> None:
    """Raise a clear error when the context cannot hold the prompt plus the rollouts."""
    need = required_kv_cells(n_prompt_kv, k, max_tokens, mode)
    if need > ctx.n_ctx:
        raise ContextOverflowError(
            f"{k} rollout(s) of up to {max_tokens} tokens after a {n_prompt_kv}-token prompt need {need} KV cells "
            f"in {mode} mode but n_ctx is {ctx.n_ctx}; raise n_ctx, lower max_tokens"
            + (", or use mode='snapshot'" if mode == "parallel" else ""))
