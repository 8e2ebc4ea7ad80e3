"""Per-token work of a rollout that stays flat in the vocabulary size and the text length (#15): the sampled
token's log-probability without a float64 full-vocabulary softmax, incremental UTF-8 detokenization with
windowed stop-string search, no per-rollout logits copy.

The oracle is the implementation before #15, copied below verbatim (`old_token_logprob`, `OldStream`): the new
code must give the same tokens, text, finish reasons and streamed pieces, and log-probabilities equal to float32
rounding, on the tiny fixtures and on hand-built byte sequences that split multi-byte UTF-8 characters across
tokens."""

from __future__ import annotations

import math
import time
from contextlib import closing
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

from avis_llamacpp import VLM
from avis_llamacpp import rollouts
from avis_llamacpp.native import Context, ContextSettings, Model, Sampler, SamplingParams
from avis_llamacpp.rollouts import Rollout, Stream, token_logprob

Q = "Describe the picture."
LOGPROB_ATOL = 1e-5  # float32 exp-sum vs float64 log-softmax; measured worst case ~1e-7


# ---- the oracle: rollouts.py before #15, verbatim ----------------------------------------------------------
def old_token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], computed stably in float64."""
    x = logits.astype(np.float64)
    m = x.max()
    return float(x[token] - m - math.log(np.exp(x - m).sum()))


class OldStream:
    """The state of one rollout while it decodes on sequence seq_id (pre-#15: float64 softmax per token, text
    re-joined and re-decoded from all pieces per token, stop strings searched in the whole text)."""

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
        self.text = ""
        self.t0 = time.perf_counter()
        self.decode_s = 0.0
        self.on_text = on_text
        self._emitted = 0
        self._holdback = max((len(x) for x in self.stop), default=1) - 1

    def _emit(self, final: bool) -> None:
        if self.on_text is None:
            return
        upto = len(self.text) if final else max(self._emitted, len(self.text) - self._holdback)
        if upto > self._emitted:
            self.on_text(self.text[self._emitted:upto])
            self._emitted = upto

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _accept(self, tok: int, logits: np.ndarray) -> int | None:
        if self.model.is_eog(tok):
            return self._finish("stop")
        self.logprobs.append(old_token_logprob(logits, tok))
        self.tokens.append(tok)
        self.pieces.append(self.model.token_piece(tok))
        text = b"".join(self.pieces).decode("utf-8", "ignore")
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.text = text[:at]
                return self._finish("stop")
        self.text = text
        for s in self.stop_after:
            at = text.find(s)
            if at >= 0:
                self.text = text[:at + len(s)]
                return self._finish("stop")
        if len(self.tokens) >= self.max_tokens:
            return self._finish("length")
        self._emit(final=False)
        return tok

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.decode_s = time.perf_counter() - self.t0
        self._emit(final=True)
        return None

    def step(self, ctx: Context, output_index: int) -> int | None:
        tok = self.sampler.sample(ctx, output_index)
        return self._accept(tok, ctx.logits(output_index))

    def step_logits(self, logits: np.ndarray) -> int | None:
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
# -------------------------------------------------------------------------------------------------------------


def _same_rollouts(new: Sequence[Rollout], old: Sequence[Rollout]) -> None:
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert a.tokens == b.tokens
        assert a.text == b.text
        assert a.finish_reason == b.finish_reason
        assert a.seed == b.seed
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=LOGPROB_ATOL)


@pytest.mark.parametrize("n_vocab", [64, 472, 151_936])
@pytest.mark.parametrize("scale", [0.02, 1.0, 8.0, 40.0])
def test_token_logprob_matches_float64_log_softmax(n_vocab: int, scale: float) -> None:
    """float32 max / exp-sum vs the old float64 log-softmax, on rows from nearly flat (random-weight models)
    to peaked (a confident real model), with and without a reused scratch buffer."""
    rng = np.random.default_rng(n_vocab + int(scale * 100))
    x = (rng.standard_normal(n_vocab) * scale).astype(np.float32)
    x[rng.integers(n_vocab)] += 3 * scale  # one clear winner
    scratch = np.empty_like(x)
    for tok in [int(np.argmax(x)), int(np.argmin(x)), *rng.integers(0, n_vocab, 8).tolist()]:
        want = old_token_logprob(x, tok)
        got = token_logprob(x, tok)
        assert got == token_logprob(x, tok, scratch)  # the buffer changes nothing
        assert abs(got - want) <= LOGPROB_ATOL, (tok, got, want)
    assert token_logprob(x.astype(np.float64), 3) == token_logprob(x, 3)  # other dtypes: same float32 math
    before = x.copy()
    token_logprob(x, 0, scratch)
    assert np.array_equal(x, before)  # the logits row is only read


def test_token_logprob_does_not_allocate_a_row_with_scratch() -> None:
    """With a scratch buffer the per-token call allocates nothing vocabulary-sized (tracemalloc peak)."""
    import tracemalloc

    x = np.random.default_rng(0).standard_normal(151_936).astype(np.float32)
    scratch = np.empty_like(x)
    token_logprob(x, 1, scratch)
    tracemalloc.start()
    token_logprob(x, 1, scratch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < x.nbytes // 10


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048, n_seq_max=8) as v:
        yield v


def _ask_both(vlm: VLM, image, monkeypatch: pytest.MonkeyPatch, **kw) -> tuple[tuple, tuple]:
    """The same query through the new Stream and through OldStream (swapped into rollouts.py): (answer,
    streamed pieces) for each."""
    out = []
    for cls in (Stream, OldStream):
        monkeypatch.setattr(rollouts, "Stream", cls)
        pieces: list[str] = []
        out.append((vlm.ask(image, Q, on_text=pieces.append, **kw), pieces))
    monkeypatch.setattr(rollouts, "Stream", Stream)
    return out[0], out[1]


@pytest.mark.parametrize("mode", ["parallel", "snapshot"])
def test_rollouts_match_old_implementation(vlm, demo_image, monkeypatch, mode):
    """K = 3 sampled rollouts and K = 1 greedy, without and with stop strings taken from the middle of the
    text (so a stop really fires, possibly inside a token): same tokens, text, finish reasons, streamed pieces;
    log-probabilities to float32 rounding."""
    (new, new_pieces), (old, old_pieces) = _ask_both(vlm, demo_image, monkeypatch, k=3, mode=mode, max_tokens=24,
                                                     seed=7)
    _same_rollouts(new.rollouts, old.rollouts)
    assert new_pieces == old_pieces and "".join(new_pieces) == new.rollouts[0].text
    texts = [r.text for r in new.rollouts]
    assert len(set(texts)) > 1 and all(len(t) > 12 for t in texts)
    stop = [texts[0][9:12], texts[1][5:7]]
    stop_after = [texts[2][10:14]]
    (new, new_pieces), (old, old_pieces) = _ask_both(vlm, demo_image, monkeypatch, k=3, mode=mode, max_tokens=24,
                                                     seed=7, stop=stop, stop_after=stop_after)
    _same_rollouts(new.rollouts, old.rollouts)
    assert new_pieces == old_pieces
    assert [r.finish_reason for r in new.rollouts].count("stop") >= 2
    (new, _), (old, _) = _ask_both(vlm, demo_image, monkeypatch, k=1, mode=mode, max_tokens=16)
    _same_rollouts(new.rollouts, old.rollouts)


@pytest.fixture(scope="module")
def text_model(qwen_fixture):
    m = Model(qwen_fixture.model)
    yield m
    m.close()


def _byte_tokens(model: Model) -> dict[int, int]:
    """byte value -> id of the token whose piece is exactly that one byte."""
    out: dict[int, int] = {}
    for t in range(model.n_vocab):
        piece = model.token_piece(t)
        if len(piece) == 1:
            out.setdefault(piece[0], t)
    return out


def _feed(model: Model, cls: type, tokens: Sequence[int], logits: np.ndarray, **kw) -> tuple[list, list[str]]:
    """Feed `tokens` to a fresh stream of `cls` through _accept; (text after every accepted token + finish
    state, streamed pieces)."""
    pieces: list[str] = []
    s = cls(model, SamplingParams(), 0, 0, kw.pop("max_tokens", 10_000), on_text=pieces.append, **kw)
    states = []
    for t in tokens:
        nxt = s._accept(t, logits)
        states.append((s.text, s.finish_reason, list(s.logprobs)))
        if nxt is None:
            break
    r = s.result()
    states.append((r.text, r.finish_reason, r.tokens))
    return states, pieces


MULTIBYTE = ["é", "中文", "😀", "naïve café", "Ω≈ç√", "🇫🇷", "a\u0301"]


def test_incremental_text_matches_rejoin_oracle_on_split_utf8(text_model):
    """Multi-byte characters fed one byte token at a time (2-, 3- and 4-byte UTF-8, a flag pair, a combining
    accent), invalid bytes (a lone continuation byte, a truncated sequence followed by ASCII, 0xFF), and stop /
    stop_after strings that start inside such a character's bytes or span tokens: after every token the text,
    the finish reason and the streamed pieces equal the old join-and-decode-everything implementation."""
    byte_tok = _byte_tokens(text_model)
    assert len(byte_tok) == 256
    logits = np.random.default_rng(1).standard_normal(text_model.n_vocab).astype(np.float32)
    cases: list[tuple[bytes, dict]] = [(s.encode(), {}) for s in MULTIBYTE]
    cases += [
        (b"ab\x80cd", {}), (b"x\xe4\xb8y", {}), (b"\xff\xfeok", {}), (b"\xf0\x9f\x98", {}),
        ("le café est chaud".encode(), {"stop": ["é e"]}),
        ("中文字符".encode(), {"stop": ["文字"]}),
        ("go 😀 now".encode(), {"stop_after": ["😀"]}),
        ("αβγδ".encode(), {"stop": ["zz", "γ"], "stop_after": ["β"]}),
        ("done</answer> more".encode(), {"stop_after": ["</answer>"], "stop": ["more"]}),
    ]
    for data, kw in cases:
        toks = [byte_tok[b] for b in data]
        got = _feed(text_model, Stream, toks, logits, **dict(kw))
        want = _feed(text_model, OldStream, toks, logits, **dict(kw))
        assert [st[:2] for st in got[0]] == [st[:2] for st in want[0]], data
        assert got[1] == want[1], data
        for g, w in zip(got[0][:-1], want[0][:-1]):
            np.testing.assert_allclose(g[2], w[2], rtol=0, atol=LOGPROB_ATOL)


def test_incremental_text_matches_rejoin_oracle_random(text_model):
    """Random token sequences (whole-vocabulary tokens mixed with byte tokens of random multi-byte characters,
    and random bytes >= 0x80), random stop strings cut from the expected text, random max_tokens: the new
    stream equals the old one after every token."""
    byte_tok = _byte_tokens(text_model)
    rng = np.random.default_rng(15)
    logits = rng.standard_normal(text_model.n_vocab).astype(np.float32)
    normal = [t for t in range(text_model.n_vocab) if not text_model.is_eog(t)]
    for case in range(240):
        toks: list[int] = []
        while len(toks) < 40:
            r = rng.random()
            if r < 0.4:
                toks.append(int(rng.choice(normal)))
            elif r < 0.8:
                ch = chr(int(rng.choice([rng.integers(0x80, 0x800), rng.integers(0x800, 0xD800),
                                         rng.integers(0x10000, 0x110000)])))
                toks += [byte_tok[b] for b in ch.encode()]
            else:
                toks.append(byte_tok[int(rng.integers(0x80, 0x100))])
        full = b"".join(text_model.token_piece(t) for t in toks).decode("utf-8", "ignore")
        kw: dict = {"max_tokens": int(rng.integers(1, 60))}
        if case % 3 and len(full) > 4:  # stops of 1..12 chars, a third of them at the very start
            a = 0 if case % 9 < 3 else int(rng.integers(0, len(full) - 2))
            kw["stop"] = [full[a:a + int(rng.integers(1, 13))], "\x00never"]
        if case % 4 == 0 and len(full) > 4:
            a = int(rng.integers(0, min(6, len(full) - 2)) if case % 8 else rng.integers(0, len(full) - 2))
            kw["stop_after"] = [full[a:a + int(rng.integers(1, 13))]]
        got = _feed(text_model, Stream, toks, logits, **dict(kw))
        want = _feed(text_model, OldStream, toks, logits, **dict(kw))
        assert [st[:2] for st in got[0]] == [st[:2] for st in want[0]], (case, kw)
        assert got[1] == want[1], (case, kw)


def test_step_reads_logits_in_place(text_model, monkeypatch):
    """Stream.step samples and scores from llama.cpp's logits buffer without copying the row (Context.logits,
    the copying reader, is never called) and scores the row it sampled from (the old implementation's value)."""
    with closing(Context(text_model, ContextSettings(n_ctx=256, n_batch=64, n_seq_max=2))) as ctx:
        ctx.decode_tokens(text_model.tokenize("Hello world"), 0, 0)
        want = old_token_logprob(ctx.logits(-1), int(np.argmax(ctx.logits(-1))))
        view = ctx.logits_view(-1)
        assert not view.flags.writeable and not view.flags.owndata
        np.testing.assert_array_equal(view, ctx.logits(-1))
        monkeypatch.setattr(Context, "logits", lambda *a, **k: pytest.fail("per-rollout logits copy"))
        s = Stream(text_model, SamplingParams(), 0, 2, 4)
        s.step(ctx, -1)
        assert abs(s.logprobs[0] - want) <= LOGPROB_ATOL


def test_padded_vocab_model_decodes_like_old(tmp_path: Path):
    """A text model with the `real` fixture's tokenizer padding (here to 6,000 tokens: CJK characters, then
    words): llama.cpp loads it with that vocabulary, the padding tokens detokenize to their UTF-8 text, and
    greedy / sampled generation gives the old implementation's tokens and text (CJK tokens interleaved with
    byte tokens exercise multi-byte decoding on real sampled output)."""
    from convert.fixture_real import write_text_model_streaming
    from convert.fixtures import spec
    from convert.tokenizer import build_vocab, bytes_to_unicode, pad_vocab

    dims, _, template, _ = spec("qwen25vl", "tiny")
    path = tmp_path / "padded.gguf"
    info = write_text_model_streaming(path, dims, seed=3, chat_template=template, name="padded", n_vocab=6000,
                                      tie_output=True, ftype="f32")
    assert info["n_vocab"] == 6000
    vocab = pad_vocab(build_vocab(family="qwen2vl"), 6000)
    decode = {c: b for b, c in bytes_to_unicode().items()}
    zhong = vocab.tokens.index("".join(bytes_to_unicode()[b] for b in "中".encode()))
    with closing(Model(path)) as model:
        assert model.n_vocab == 6000
        for t in (vocab.n_vocab - 1, vocab.n_vocab // 2, zhong):
            assert model.token_piece(t) == bytes(decode[c] for c in vocab.tokens[t])
        assert zhong >= build_vocab(family="qwen2vl").n_vocab and model.token_piece(zhong) == "中".encode()
        prompt = model.tokenize("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
        for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=4)):
            got = []
            for cls in (Stream, OldStream):
                with closing(Context(model, ContextSettings(n_ctx=256, n_batch=64))) as ctx:
                    ctx.decode_tokens(prompt, 0, 0)
                    s = cls(model, params, 0, len(prompt), 40)
                    tok = s.step(ctx, -1)
                    while tok is not None:
                        ctx.decode_tokens([tok], s.n_past, 0)
                        s.n_past += 1
                        tok = s.step(ctx, -1)
                    got.append(s.result())
            _same_rollouts([got[0]], [got[1]])
        assert any(ord(ch) >= 0x4E00 for ch in got[0].text)  # sampled CJK padding tokens

