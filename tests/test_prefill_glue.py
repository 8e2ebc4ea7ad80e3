"""Oracle tests for the glue between the encoder, the token selector and the decoder (prefill.py and the
KDV selector in pipeline.py): which embedding rows reach llama_decode, at which positions, and which tokens KDV
keeps inside the pipeline.

Three independent oracles:

* a spy on Context.decode_tokens / decode_embeddings, checked against positions computed by hand from each
  image chunk's grid (M-RoPE: (t, y, x, z) = (p0, p0 + row, p0 + col, 0), text resumes at p0 + max(nx, ny);
  1-D RoPE: consecutive positions over the kept tokens only);
* the next-token logits of a second, raw llama.cpp context that is fed the kept embedding rows with those
  hand-computed positions through plain `llama_batch` structs (only the loaded weights are shared with the code
  under test);
* the kept sets KDV picks, recomputed with a few lines of numpy from the keys of the numpy reference ViT
  (tests/reference_vit.py), not from the captured keys.

Several images per prompt, and non-square token grids on the M-RoPE family (11x6 and 6x11)."""

from __future__ import annotations

import ctypes
import math

import llama_cpp
import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM
from avis_llamacpp.images import load_image
from avis_llamacpp.prefill import prefill

Q = "What shapes do you see?"
N_CTX = 2048


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    # flash attention off on both sides: the raw reference context below uses the plain attention kernel
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, flash_attn=False) as v:
        yield v


def _noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _images(family: str, demo_image) -> list[np.ndarray]:
    """Three images the numpy reference ViT can also run (no resize by mtmd): for the M-RoPE family two
    non-square grids (308x168 -> 11x6 tokens, 168x308 -> 6x11) and a square one; llava always gives 14x14."""
    if family == "qwen25vl":
        return [_noise(308, 168, 1), _noise(168, 308, 2), load_image(demo_image)]
    return [_noise(224, 224, 1), load_image(demo_image), _noise(224, 224, 2)]


def _scattered(n: int, image_index: int) -> np.ndarray:
    """A selection that is neither a prefix nor evenly spaced: about a third of the tokens at seeded random
    places, always the last token, never the first."""
    rng = np.random.default_rng(100 + image_index)
    pick = set(rng.choice(np.arange(1, n), size=max(2, n // 3), replace=False).tolist()) | {n - 1}
    return np.array(sorted(pick), dtype=np.int64)


def _hand_positions(mrope: bool, nx: int, ny: int, kept: np.ndarray, p0: int) -> tuple[np.ndarray, int]:
    """Decoder positions of the kept tokens and how far the text position advances after the image.
    Token i sits at row i // nx, column i % nx (mtmd's raster order)."""
    if mrope:
        rows, cols = kept // nx, kept % nx
        pos = np.stack([np.full(len(kept), p0), p0 + rows, p0 + cols, np.zeros(len(kept))], axis=1)
        return pos.astype(np.int32), max(nx, ny)
    return (p0 + np.arange(len(kept)))[:, None].astype(np.int32), len(kept)


class DecodeSpy:
    """Records every decode call of a Context (arguments copied), then forwards it."""

    def __init__(self, ctx, monkeypatch):
        self.calls: list[tuple] = []
        real_tokens, real_embd = ctx.decode_tokens, ctx.decode_embeddings

        def decode_tokens(tokens, pos0, seq_id=0, **kw):
            self.calls.append(("text", list(tokens), int(pos0), seq_id))
            return real_tokens(tokens, pos0, seq_id, **kw)

        def decode_embeddings(embd, positions, seq_id=0, **kw):
            self.calls.append(("image", np.array(embd, dtype=np.float32), np.array(positions), seq_id))
            return real_embd(embd, positions, seq_id, **kw)

        monkeypatch.setattr(ctx, "decode_tokens", decode_tokens)
        monkeypatch.setattr(ctx, "decode_embeddings", decode_embeddings)


def _run_prefill(v: VLM, arrays, select):
    """Prefill the rendered question with these images; returns (PrefillResult, chunk facts, logits)."""
    v.ctx.clear()
    with v.projector.tokenize(v.render_question(Q, len(arrays)), arrays) as p:
        chunks = [("image", c.nx, c.ny, c.n_tokens) if hasattr(c, "nx") else ("text", list(c.tokens))
                  for c in p.chunks]
        pre = prefill(v.ctx, v.projector, p, select=select)
        logits = v.ctx.logits(-1)
    v.ctx.clear()
    return pre, chunks, logits


def _recording_selector(choose):
    """A TokenSelector that keeps choose(n, image_index) and remembers the full embeddings it was shown."""
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def select(chunk, embd):
        kept = choose(chunk.n_tokens, chunk.image_index)
        seen[chunk.image_index] = (np.array(embd, dtype=np.float32), kept)
        return kept
    return select, seen


def _expected_decodes(mrope: bool, chunks, seen) -> tuple[list[tuple], int]:
    """The decode calls a correct prefill makes, walked by hand over the chunk list."""
    out, p, img = [], 0, 0
    for c in chunks:
        if c[0] == "text":
            if c[1]:
                out.append(("text", c[1], p))
                p += len(c[1])
            continue
        _, nx, ny, n = c
        embd, kept = seen[img]
        pos, advance = _hand_positions(mrope, nx, ny, kept, p)
        out.append(("image", embd[kept], pos))
        p += advance
        img += 1
    return out, p


def test_spy_sees_kept_rows_at_hand_computed_positions(vlm, vlm_fixture, demo_image, monkeypatch):
    arrays = _images(vlm_fixture.family, demo_image)
    mrope = vlm.model.uses_mrope  # from the text GGUF's rope type, not from the projector code
    assert mrope == (vlm_fixture.family == "qwen25vl")
    select, seen = _recording_selector(_scattered)
    spy = DecodeSpy(vlm.ctx, monkeypatch)
    pre, chunks, _ = _run_prefill(vlm, arrays, select)
    grids = [(c[1], c[2]) for c in chunks if c[0] == "image"]
    assert len(grids) == 3
    if vlm_fixture.family == "qwen25vl":
        assert grids[:2] == [(11, 6), (6, 11)]  # non-square both ways
    want, n_past = _expected_decodes(mrope, chunks, seen)
    assert [c[0] for c in spy.calls] == [w[0] for w in want]
    for got, exp in zip(spy.calls, want):
        assert got[3] == 0  # sequence 0
        if exp[0] == "text":
            assert got[1] == exp[1] and got[2] == exp[2]
        else:
            np.testing.assert_array_equal(got[1], exp[1])  # exactly the kept rows, in order
            np.testing.assert_array_equal(got[2], exp[2])
    assert pre.n_past == n_past
    assert pre.n_kv == sum(len(c[1]) for c in chunks if c[0] == "text") + sum(len(k) for _, k in seen.values())
    for im, (embd, kept) in zip(pre.images, [seen[i] for i in range(3)]):
        np.testing.assert_array_equal(im.kept, kept)
        assert im.n_kept == len(kept) and im.n_tokens == len(embd)
        np.testing.assert_array_equal(im.embeddings, embd)  # recorded before pruning


def test_spy_nothing_pruned_uses_every_row_and_the_full_span(vlm, vlm_fixture, demo_image, monkeypatch):
    arrays = _images(vlm_fixture.family, demo_image)[:2]
    select, seen = _recording_selector(lambda n, i: np.arange(n, dtype=np.int64))
    spy = DecodeSpy(vlm.ctx, monkeypatch)
    pre, chunks, _ = _run_prefill(vlm, arrays, select)
    want, n_past = _expected_decodes(vlm.model.uses_mrope, chunks, seen)
    images = [c for c in spy.calls if c[0] == "image"]
    assert len(images) == 2
    for got, exp in zip(images, [w for w in want if w[0] == "image"]):
        np.testing.assert_array_equal(got[1], exp[1])
        np.testing.assert_array_equal(got[2], exp[2])
    assert pre.n_past == n_past


# ------------------------------------------------------------------------------------------------------------
# logits against a raw llama.cpp context fed by hand
# ------------------------------------------------------------------------------------------------------------
class RawContext:
    """A second llama.cpp context on the same weights with the VLM context's layout (KV size, batch, sequences,
    attention kernel), driven with plain llama_batch structs."""

    def __init__(self, v: VLM):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = v.ctx.n_ctx, v.settings.n_batch, v.settings.n_ubatch
        params.n_seq_max, params.kv_unified = v.settings.n_seq_max, v.settings.kv_unified
        params.n_threads = params.n_threads_batch = 1
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ptr = llama_cpp.llama_init_from_model(v.model.ptr, params)
        assert self.ptr
        self.n_vocab = v.model.n_vocab
        self.n_sections = 4 if v.model.uses_mrope else 1  # positions per embedding row llama.cpp reads

    def _batch(self, n: int, *, tokens=None, embd=None, pos: np.ndarray, logits_last: bool):
        keep = []  # ctypes buffers the batch points into, alive until decode returns
        b = llama_cpp.llama_batch()
        b.n_tokens = n
        if tokens is not None:
            tok = (llama_cpp.llama_token * n)(*tokens)
            keep.append(tok)
            b.token = ctypes.cast(tok, ctypes.POINTER(llama_cpp.llama_token))
        else:
            e = np.ascontiguousarray(embd, dtype=np.float32)
            keep.append(e)
            b.embd = e.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        p = (llama_cpp.llama_pos * len(pos))(*[int(x) for x in pos])
        n_seq = (ctypes.c_int32 * n)(*([1] * n))
        seq0 = (llama_cpp.llama_seq_id * 1)(0)
        seqs = (ctypes.POINTER(llama_cpp.llama_seq_id) * n)(
            *([ctypes.cast(seq0, ctypes.POINTER(llama_cpp.llama_seq_id))] * n))
        out = (ctypes.c_int8 * n)()
        out[n - 1] = 1 if logits_last else 0
        keep += [p, n_seq, seq0, seqs, out]
        b.pos = ctypes.cast(p, ctypes.POINTER(llama_cpp.llama_pos))
        b.n_seq_id = ctypes.cast(n_seq, ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(seqs, ctypes.POINTER(ctypes.POINTER(llama_cpp.llama_seq_id)))
        b.logits = ctypes.cast(out, ctypes.POINTER(ctypes.c_int8))
        assert llama_cpp.llama_decode(self.ptr, b) == 0
        del keep

    def text(self, tokens, p0: int, logits_last: bool):
        self._batch(len(tokens), tokens=tokens, pos=np.arange(p0, p0 + len(tokens)), logits_last=logits_last)

    def rows(self, embd: np.ndarray, pos: np.ndarray, logits_last: bool):
        # llama_batch with embeddings: positions section-major, pos[j * n + i] (what mtmd's helper builds);
        # one position per row on an M-RoPE model is broadcast to every section, as llama.cpp does for text
        pos = np.asarray(pos)
        if pos.shape[1] != self.n_sections:
            assert pos.shape[1] == 1
            pos = np.repeat(pos, self.n_sections, axis=1)
        self._batch(len(embd), embd=embd, pos=pos.T.reshape(-1), logits_last=logits_last)

    def logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ptr, -1), shape=(self.n_vocab,)).copy()

    def close(self):
        llama_cpp.llama_free(self.ptr)


def _reference_logits(v: VLM, mrope: bool, chunks, seen) -> np.ndarray:
    want, _ = _expected_decodes(mrope, chunks, seen)
    raw = RawContext(v)
    try:
        for i, w in enumerate(want):
            last = i == len(want) - 1
            if w[0] == "text":
                raw.text(w[1], w[2], last)
            else:
                raw.rows(w[1], w[2], last)
        return raw.logits()
    finally:
        raw.close()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_logits_equal_a_reference_fed_the_kept_rows(vlm, vlm_fixture, demo_image):
    arrays = _images(vlm_fixture.family, demo_image)
    select, seen = _recording_selector(_scattered)
    pre, chunks, logits = _run_prefill(vlm, arrays, select)
    ref = _reference_logits(vlm, vlm.model.uses_mrope, chunks, seen)
    _close(logits, ref)
    # the reference is sensitive to exactly what the glue could get wrong: the first k tokens instead of the
    # kept ones, or the 1-D scheme on an M-RoPE model, give other logits
    first_k = {i: (embd, np.arange(len(kept))) for i, (embd, kept) in seen.items()}
    assert np.abs(_reference_logits(vlm, vlm.model.uses_mrope, chunks, first_k) - ref).max() > 1e-3
    if vlm.model.uses_mrope:
        assert np.abs(_reference_logits(vlm, False, chunks, seen) - ref).max() > 1e-3


def test_reference_with_nothing_pruned_equals_stock_prefill(vlm, vlm_fixture, demo_image):
    """Validates the reference itself: with every row kept it reproduces prefill(select=None), which
    test_pipeline checks against llama.cpp's own mtmd_helper_eval_chunks."""
    arrays = _images(vlm_fixture.family, demo_image)[:2]
    select, seen = _recording_selector(lambda n, i: np.arange(n, dtype=np.int64))
    _, chunks, _ = _run_prefill(vlm, arrays, select)
    _, _, stock = _run_prefill(vlm, arrays, None)
    _close(stock, _reference_logits(vlm, vlm.model.uses_mrope, chunks, seen))


# ------------------------------------------------------------------------------------------------------------
# KDV inside the pipeline keeps what kdv_scores on the reference keys picks
# ------------------------------------------------------------------------------------------------------------
def _reference_token_keys(fx, img: np.ndarray, n_tokens: int) -> np.ndarray:
    """One key per LLM token from the numpy ViT (see test_kdv_pipeline.test_captured_keys_equal_numpy_reference
    for the row mapping)."""
    from tests.reference_vit import llava_forward, qwen25vl_forward

    if fx.family == "llava":
        return llava_forward(str(fx.mmproj), img)["keys"][-1][1:n_tokens + 1]
    if fx.family == "qwen25vl":
        ref = qwen25vl_forward(str(fx.mmproj), img)
        rows = ref["keys_rope"][-1]
        return rows.reshape(-1, 4, *rows.shape[1:]).mean(axis=1)[np.asarray(ref["window_idx"])]
    pytest.skip(f"no numpy reference ViT for family {fx.family!r}")


def _hand_kdv_scores(keys: np.ndarray) -> np.ndarray:
    """score_i = -mean_h cos(k_ih, anchor_h), anchor_h = normalised mean of the normalised keys (the paper)."""
    k = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-30)
    a = k.mean(axis=0)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-30)
    return -(k * a[None]).sum(-1).mean(-1)


def _assert_kept_matches(kept: list[int], scores: np.ndarray, cut: float, n_keep: int | None, slack: float):
    """kept holds every token scoring clearly above the cut and none clearly below; tokens within `slack` of
    the cut (float32 graph vs float64 reference) may go either way."""
    kept_set = set(kept)
    sure_in = set(np.flatnonzero(scores > cut + slack).tolist())
    maybe = set(np.flatnonzero(scores >= cut - slack).tolist())
    assert sure_in <= kept_set <= maybe, (sorted(sure_in - kept_set), sorted(kept_set - maybe))
    if n_keep is not None:
        assert len(kept) == n_keep
    # the comparison means something: most tokens are decided, and the kept set is not the complement
    assert len(maybe - sure_in) <= max(2, len(scores) // 20)


SLACK = 1e-5


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_pipeline_ratio_keeps_the_reference_top_scores(vlm, vlm_fixture, demo_image, ratio):
    arrays = _images(vlm_fixture.family, demo_image)
    a = vlm.ask(arrays, Q, max_tokens=1, ratio=ratio)
    assert len(a.images) == 3
    for img, im in zip(arrays, a.images):
        n = im["n_tokens"]
        scores = _hand_kdv_scores(_reference_token_keys(vlm_fixture, img, n))
        n_keep = max(1, math.floor((1 - ratio) * n + 1e-9))
        cut = np.sort(scores)[::-1][n_keep - 1]
        _assert_kept_matches(im["kept"], scores, cut, n_keep, SLACK)


def test_pipeline_tau_keeps_the_reference_scores_above_threshold(vlm, vlm_fixture, demo_image):
    arrays = _images(vlm_fixture.family, demo_image)
    tau = 1.2  # a threshold inside the tiny models' score range, so both sides are populated
    a = vlm.ask(arrays, Q, max_tokens=1, tau=tau)
    some_pruned = False
    for img, im in zip(arrays, a.images):
        scores = _hand_kdv_scores(_reference_token_keys(vlm_fixture, img, im["n_tokens"]))
        cut = -math.cos(tau)
        if scores.max() < cut:  # nothing clears the threshold: KDV keeps the single best token
            assert im["kept"] == [int(np.argmax(scores))]
            continue
        _assert_kept_matches(im["kept"], scores, cut, None, SLACK)
        some_pruned |= 0 < len(im["kept"]) < im["n_tokens"]
    assert some_pruned
