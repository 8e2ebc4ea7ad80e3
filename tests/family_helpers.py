"""What the per-family tests (tests/test_families_*.py) share: seeded noise images and PNG data URLs, opening a
VLM on a fixture and the module fixtures for it, the stock llama-cpp-python oracles (create_chat_completion
through a stock chat handler, the next-token logits of mtmd's own C helper), and spies on the decode calls.

The oracles here use numpy, PIL and llama_cpp only, never avis_llamacpp's mappings; the spies drive
avis_llamacpp's prefill and only record what it decodes."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import io
from typing import Any, Callable, Iterator

import llama_cpp
import llama_cpp.llama_chat_format as lcf
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM
from avis_llamacpp.images import load_image
from avis_llamacpp.prefill import prefill
from convert.fixtures import make_fixture

Q = "What shapes do you see?"


def noise(w: int, h: int, seed: int = 3) -> np.ndarray:
    """A seeded uint8 RGB noise image, h x w."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """The image as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    """A PNG as the data URL an OpenAI-style image_url part carries."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def open_vlm(fx: Any, *, n_ctx: int, flash_attn: bool, **kw: Any) -> VLM:
    """A VLM on a fixture pair, one thread for prompt and batch."""
    return VLM(fx.model, fx.mmproj, n_ctx=n_ctx, n_threads=1, n_threads_batch=1, flash_attn=flash_attn, **kw)


def vlm_fixtures(fx_name: str = "fx", **kw: Any) -> tuple[Callable, Callable]:
    """Module-scoped ``vlm`` (flash attention off) and ``vlm_fa`` (on) fixtures over the module's fixture named
    ``fx_name``, opened by open_vlm(fx, **kw); assign them as ``vlm, vlm_fa = vlm_fixtures(...)``."""

    @pytest.fixture(scope="module")
    def vlm(request: pytest.FixtureRequest):
        with open_vlm(request.getfixturevalue(fx_name), flash_attn=False, **kw) as v:
            yield v

    @pytest.fixture(scope="module")
    def vlm_fa(request: pytest.FixtureRequest):
        with open_vlm(request.getfixturevalue(fx_name), flash_attn=True, **kw) as v:
            yield v

    return vlm, vlm_fa


def core_family_fixtures(*families: str, n_ctx: int = 2048) -> tuple[Callable, Callable]:
    """Module-scoped ``fx`` (convert.fixtures' tiny pair of a family, in the session's fixture_root; with several
    families, parametrized over them) and ``vlm`` (flash attention off) fixtures; assign them as
    ``fx, vlm = core_family_fixtures(family, ...)``."""

    @pytest.fixture(scope="module", params=list(families), ids=list(families))
    def fx(request, fixture_root):
        return make_fixture(request.param, "tiny", out_dir=fixture_root)

    @pytest.fixture(scope="module")
    def vlm(fx):
        with open_vlm(fx, n_ctx=n_ctx, flash_attn=False) as v:
            yield v

    return fx, vlm


def stock_chat_completion(model: Any, mmproj: Any, png: bytes, *, max_tokens: int, n_ctx: int,
                          handler: type = lcf.MTMDChatHandler, handler_kw: dict | None = None, question: str = Q,
                          **llama_kw: Any) -> dict:
    """Stock llama-cpp-python's greedy answer (temperature 0, no repeat penalty, seed 0) to one user message
    (the image, then ``question``) through the stock chat ``handler``; one thread, the response dict."""
    chat_handler = handler(clip_model_path=str(mmproj), verbose=False, **(handler_kw or {}))
    llm = llama_cpp.Llama(model_path=str(model), chat_handler=chat_handler, n_ctx=n_ctx, n_threads=1, verbose=False,
                          **llama_kw)
    try:
        return llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens, seed=0)
    finally:
        llm.close()


def assert_same_answer(ours: Any, out: dict) -> None:
    """Our Answer equals stock create_chat_completion's: a non-empty answer with the same text, completion
    token count and prompt token count."""
    assert len(ours.tokens) > 0
    assert ours.text == out["choices"][0]["message"]["content"]
    assert len(ours.tokens) == out["usage"]["completion_tokens"]
    assert ours.prompt_tokens == out["usage"]["prompt_tokens"]


def check_unpruned_equals_stock(vlm: VLM, fx: Any, img: np.ndarray, path: Any, n_ctx: int,
                                max_tokens: int = 16) -> None:
    """Nothing pruned, K = 1, greedy, flash attention off on both sides: ``img`` saved as a PNG at ``path`` gets
    the same answer from vlm.ask as from stock MTMDChatHandler."""
    path.write_bytes(png_bytes(img))
    out = stock_chat_completion(fx.model, fx.mmproj, path.read_bytes(), max_tokens=max_tokens, n_ctx=n_ctx,
                                n_threads_batch=1)
    assert_same_answer(vlm.ask(path, Q, max_tokens=max_tokens), out)


@contextlib.contextmanager
def stock_mtmd_chunks(mmproj: Any, model_ptr: Any, png: bytes, text: bytes, *, add_special: bool,
                      n_threads: int = 1) -> Iterator[tuple[Any, Any]]:
    """Stock mtmd through llama_cpp's bindings (flash attention off, no warmup): a context for `mmproj` on the
    model and `text` (one media marker) tokenized with the image; yields (ctx, chunks), both freed after."""
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.warmup, params.n_threads = False, False, n_threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), model_ptr, params)
    assert ctx
    chunks = bm = None
    try:
        buf = (ctypes.c_uint8 * len(png)).from_buffer(bytearray(png))
        bm = mtmd_cpp.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(png), False)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        tx = mtmd_cpp.mtmd_input_text()
        tx.text, tx.text_len, tx.add_special, tx.parse_special = text, len(text), add_special, True
        arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bm)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(tx), arr, 1) == 0
        yield ctx, chunks
    finally:
        if chunks is not None:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
        if bm is not None:
            mtmd_cpp.mtmd_bitmap_free(bm)
        mtmd_cpp.mtmd_free(ctx)


@contextlib.contextmanager
def stock_mtmd_prefill(fx: Any, prompt: str, png: bytes, n_ctx: int, n_threads: int = 1) -> Iterator[tuple[Any, int]]:
    """A stock Llama whose context holds `prompt` with the image, prefilled by mtmd_helper_eval_chunks (stock
    image decode, flash attention off): yields (llm, n_past); the last output's logits are the next token's."""
    llm = llama_cpp.Llama(model_path=str(fx.model), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
    try:
        with stock_mtmd_chunks(fx.mmproj, llm.model, png, prompt.encode(), add_special=True,
                               n_threads=n_threads) as (ctx, chunks):
            n_past = llama_cpp.llama_pos(0)
            assert mtmd_cpp.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, llm.n_batch, True,
                                                    ctypes.byref(n_past)) == 0
            yield llm, n_past.value
    finally:
        llm.close()


def last_logits(llm: Any) -> np.ndarray:
    """A stock Llama's next-token logits after its last decode (copied)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def stock_first_logits(fx: Any, prompt: str, png: bytes, n_ctx: int) -> np.ndarray:
    """mtmd_helper_eval_chunks (stock image decode, one thread, flash attention off) -> next-token logits."""
    with stock_mtmd_prefill(fx, prompt, png, n_ctx) as (llm, _):
        return last_logits(llm)


def assert_first_logits_equal_stock(fx: Any, vlm: VLM, image_path: Any, n_ctx: int) -> None:
    """Nothing pruned: prefill's next-token logits after Q with the image equal mtmd_helper_eval_chunks' (1e-5)."""
    prompt = vlm.render_question(Q, 1)
    want = stock_first_logits(fx, prompt, image_path.read_bytes(), n_ctx)
    vlm.ctx.clear()
    with vlm.projector.tokenize(prompt, [load_image(image_path)]) as p:
        prefill(vlm.ctx, vlm.projector, p)
        got = vlm.ctx.logits(-1)
    vlm.ctx.clear()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def encode_one(v: VLM, image: Any, question: str = Q) -> tuple:
    """Encode one single-chunk image: ((n_tokens, nx, ny), embeddings, TokenKeys, key source, captured rows,
    encoder input (w, h), token grid)."""
    with v.projector.tokenize(v.render_question(question, 1), [image]) as p:
        ch = p.images[0]
        emb = v.projector.encode(ch)
        tk, source = v.scored_keys(ch, emb)
        cap = v.key_capture
        return (ch.n_tokens, ch.nx, ch.ny), emb, tk, source, cap.keys.copy(), cap.image_wh, v.token_grid(ch)


class DecodeSpy:
    """Records the top-level decode calls prefill makes (nested calls a Context makes to itself are not
    recorded), with copies of their arguments: ("text", tokens, pos0, seq_id) and ("image", rows, positions,
    seq_id, causal)."""

    def __init__(self, ctx: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple] = []
        self._depth = 0
        real_tokens, real_embd = ctx.decode_tokens, ctx.decode_embeddings

        def decode_tokens(tokens, pos0, seq_id=0, **kw):
            self.calls.append(("text", list(tokens), int(pos0), seq_id))
            return real_tokens(tokens, pos0, seq_id, **kw)

        def decode_embeddings(embd, positions, seq_id=0, **kw):
            if self._depth == 0:
                self.calls.append(("image", np.array(embd, dtype=np.float32), np.array(positions), seq_id,
                                   kw.get("causal", True)))
            self._depth += 1
            try:
                return real_embd(embd, positions, seq_id, **kw)
            finally:
                self._depth -= 1

        monkeypatch.setattr(ctx, "decode_tokens", decode_tokens)
        monkeypatch.setattr(ctx, "decode_embeddings", decode_embeddings)


def check_non_causal_pruned_prefill(vlm: VLM, image_path: Any, monkeypatch: pytest.MonkeyPatch, *, opens: str,
                                    closes: str, n_kept: int) -> None:
    """Ratio 0.5 on a 1-D RoPE text model whose image mtmd decodes non-causally: the text before the image (ending
    in mtmd's ``opens`` marker), the ``n_kept`` kept rows, then the text after (starting with ``closes``) are
    decoded in that order on sequence 0; the kept rows are the encoder's rows, at consecutive positions right after
    the text before, decoded non-causally; the text after continues right after the last kept row."""
    meta: dict = {}
    select = vlm.kdv_selector(0.5, None, meta)
    spy = DecodeSpy(vlm.ctx, monkeypatch)
    vlm.ctx.clear()
    with vlm.projector.tokenize(vlm.render_question(Q, 1), [load_image(image_path)]) as p:
        texts = [list(c.tokens) for c in p.chunks if not hasattr(c, "nx")]
        pre = prefill(vlm.ctx, vlm.projector, p, select=select)
        pos_max = vlm.ctx.seq_pos_max(0)
    vlm.ctx.clear()
    assert [c[0] for c in spy.calls] == ["text", "image", "text"]
    before, after = texts
    assert vlm.model.detokenize(before, special=True).endswith(opens)
    assert vlm.model.detokenize(after, special=True).startswith(closes)
    kept = pre.images[0].kept
    assert len(kept) == n_kept and meta[0]["key_source"].startswith("vit_keys:")
    (_, t0, p0, s0), (_, rows, pos, s1, causal), (_, t1, p1, s2) = spy.calls
    assert s0 == s1 == s2 == 0
    assert t0 == before and p0 == 0 and t1 == after  # every special / text token is decoded
    assert causal is False  # the kept image tokens attend to each other, as mtmd decodes these images
    np.testing.assert_array_equal(rows, pre.images[0].embeddings[kept])
    np.testing.assert_array_equal(pos[:, 0], len(before) + np.arange(n_kept))
    assert p1 == len(before) + n_kept
    assert pre.n_past == pre.n_kv == len(before) + n_kept + len(after) == pos_max + 1


def _positions_by_decode(vlm: VLM, image: Any, select: Any, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Prefill Q with one image, recording each decode call's positions (1-D only): (PrefillResult, seq_pos_max,
    [(kind, positions)], tokens per text chunk)."""
    calls: list[tuple[str, list[int]]] = []
    ctx = vlm.ctx
    orig_tokens, orig_embd = ctx.decode_tokens, ctx.decode_embeddings

    def spy_tokens(tokens, pos0, seq_id=0, **kw):
        calls.append(("text", list(range(pos0, pos0 + len(tokens)))))
        return orig_tokens(tokens, pos0, seq_id, **kw)

    def spy_embd(embd, positions, seq_id=0, **kw):
        assert positions.shape[1] == 1  # no M-RoPE sections
        calls.append(("image", positions[:, 0].tolist()))
        return orig_embd(embd, positions, seq_id, **kw)

    monkeypatch.setattr(ctx, "decode_tokens", spy_tokens)
    monkeypatch.setattr(ctx, "decode_embeddings", spy_embd)
    ctx.clear()
    try:
        with vlm.projector.tokenize(vlm.render_question(Q, 1), [load_image(image)]) as p:
            text_tokens = [len(c.tokens) for c in p.chunks if not hasattr(c, "nx")]
            pre = prefill(ctx, vlm.projector, p, select=select)
            pos_max = ctx.seq_pos_max(0)
    finally:
        ctx.clear()
        monkeypatch.undo()
    return pre, pos_max, calls, text_tokens


def check_pruned_positions(vlm: VLM, image: Any, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Prefill one image unpruned and at ratio 0.5 (1-D RoPE text model): every decode call continues at the next
    position, the text chunks are decoded in full either way, and pruning moves n_past, n_kv and the last
    position down by exactly the pruned token count. Returns (full, half, half's decode calls)."""
    runs = {ratio: _positions_by_decode(vlm, image, vlm.kdv_selector(ratio, None, {}) if ratio else None,
                                        monkeypatch) for ratio in (None, 0.5)}
    (full, full_max, full_calls, text_tokens), (half, half_max, half_calls, _) = runs[None], runs[0.5]
    for pre, pos_max, calls in ((full, full_max, full_calls), (half, half_max, half_calls)):
        seq = [q for _, ps in calls for q in ps]
        assert seq == list(range(len(seq))) and pos_max == len(seq) - 1 == pre.n_past - 1 == pre.n_kv - 1
    # the text around and between the image chunks is text: decoded in full either way
    assert [len(ps) for k, ps in half_calls if k == "text"] == [len(ps) for k, ps in full_calls if k == "text"]
    assert sum(len(ps) for k, ps in half_calls if k == "text") == sum(text_tokens)
    pruned = sum(im.n_tokens - im.n_kept for im in half.images)
    assert full.n_past - half.n_past == pruned > 0 and full_max - half_max == pruned
    assert [len(ps) for k, ps in half_calls if k == "image"] == [im.n_kept for im in half.images]
    return full, half, half_calls


def noise_images(root: Any, pixel: tuple[int, int, int]) -> dict[str, Any]:
    """Two seeded 224x224 noise PNGs "a" and "b" under root, and "a_pixel": a copy of "a" with the one channel
    value at `pixel` (row, column, channel) flipped in its lowest bit (what an image digest must tell apart)."""
    import numpy as np
    from PIL import Image

    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        arr = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
        out[name] = root / f"{name}.png"
        Image.fromarray(arr).save(out[name])
        if name == "a":
            arr = arr.copy()
            arr[pixel] ^= 1
            out["a_pixel"] = root / "a_pixel.png"
            Image.fromarray(arr).save(out["a_pixel"])
    return out


def assert_merge_graph_keys_equal_reference(vlm: VLM, img: np.ndarray, ref: dict[str, Any], key_name: str) -> None:
    """A pruned query on a 2x2-merge graph captures the last block's post-RoPE keys ``key_name``-(L-1): they equal
    the numpy reference's ``ref["keys_rope"][-1]`` row for row, and the per-token keys KDV scores equal their
    groups' means (assert_merge_group_token_keys)."""
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    assert a.images[0]["key_source"] == f"vit_keys:{key_name}-{len(ref['keys_rope']) - 1}"
    got = vlm.key_capture.keys  # rows as the graph holds them
    last = ref["keys_rope"][-1]
    assert got.shape == last.shape
    np.testing.assert_allclose(got, last, rtol=2e-3, atol=2e-3 * np.abs(last).max())
    assert_merge_group_token_keys(vlm, last, ref["grid"])


def assert_merge_group_token_keys(vlm: VLM, rows: np.ndarray, grid: tuple[int, int]) -> None:
    """The VLM's per-token keys for a 2x2-merge graph (4 consecutive rows per token, row-major blocks) equal each
    group's mean computed by a plain loop: token (tx, ty) of the gx x gy grid = patches (2tx+dx, 2ty+dy), whose
    graph row is 4*(ty*gx + tx) + 2*dy + dx."""
    gx, gy = grid
    want = np.zeros((gx * gy,) + rows.shape[1:])
    for ty in range(gy):
        for tx in range(gx):
            group = [4 * (ty * gx + tx) + 2 * dy + dx for dy in range(2) for dx in range(2)]
            want[ty * gx + tx] = rows[group].mean(axis=0)
    chunk = type("C", (), {"n_tokens": gx * gy, "nx": gx, "ny": gy, "image_index": 0})()
    tokens, _ = vlm.token_keys(chunk, np.zeros((gx * gy, 4)))
    np.testing.assert_allclose(tokens, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def assert_pruned_mrope_prefill(vlm: VLM, fx: Any, img: np.ndarray, monkeypatch: Any) -> None:
    """A spy on the decode calls of a pruned query (ratio 0.5) on an M-RoPE model: the image rows decoded are
    exactly the kept rows of the encoder output, at the positions mtmd gives those tokens unpruned ((t, y, x) of
    token i on the nx x ny grid, checked by hand), and the text after the image continues at its unpruned
    position."""
    from convert.mmproj import expected_image_grid

    seen = []
    real = vlm.ctx.decode_embeddings

    def spy(embd, positions, seq_id=0, *, logits_last=False):
        seen.append((np.array(embd, copy=True), np.array(positions, copy=True)))
        return real(embd, positions, seq_id, logits_last=logits_last)

    full = vlm.ask(img, Q, max_tokens=1)
    encoded = {}
    real_encode = vlm.projector.encode

    def encode_spy(chunk):
        out = real_encode(chunk)
        encoded["embd"], encoded["pos"] = out.copy(), vlm.projector.positions(chunk, 0)
        encoded["chunk"] = chunk
        return out

    monkeypatch.setattr(vlm.ctx, "decode_embeddings", spy)
    monkeypatch.setattr(vlm.projector, "encode", encode_spy)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    monkeypatch.undo()
    kept = np.asarray(a.images[0]["kept"])
    nx, ny = a.images[0]["grid"]
    h, w = img.shape[:2]
    assert (nx, ny) == (encoded["chunk"].nx, encoded["chunk"].ny) == expected_image_grid(fx.vision, w, h)
    assert nx != ny
    assert a.image_tokens == full.image_tokens == [nx * ny]
    assert len(kept) == a.kept_tokens[0] < nx * ny and a.images[0]["key_source"].startswith("vit_keys:")
    (rows, pos), = seen
    np.testing.assert_array_equal(rows, encoded["embd"][kept])
    p0 = int(pos[0, 0]) - int(encoded["pos"][kept[0], 0])
    np.testing.assert_array_equal(pos, encoded["pos"][kept] + np.array([p0, p0, p0, 0]))
    ys, xs = kept // nx, kept % nx
    np.testing.assert_array_equal(pos[:, 1] - p0, ys)
    np.testing.assert_array_equal(pos[:, 2] - p0, xs)
    assert full.prompt_tokens - a.prompt_tokens == nx * ny - len(kept)  # only the KV cells shrink


def assert_kept_sets_equal_flash_on_off(fx: Any, vlm: VLM) -> None:
    """The same image pruned by ratio and by tau keeps the same tokens with flash attention on (a second VLM) as
    with it off (``vlm``), from the same key source."""
    import math

    img = noise(224, 224, 9)
    with open_vlm(fx, n_ctx=2048, flash_attn=True) as on:
        for kw in ({"ratio": 0.5}, {"tau": math.pi / 4}):
            a, b = on.ask(img, Q, max_tokens=1, **kw), vlm.ask(img, Q, max_tokens=1, **kw)
            assert a.images[0]["key_source"] == b.images[0]["key_source"]
            assert a.images[0]["kept"] == b.images[0]["kept"], kw


def assert_unpruned_matches_stock_qwen_template(vlm: VLM, fx: Any, path: Any, seed: int) -> None:
    """Nothing pruned, K = 1, for a fixture before the Qwen2-VL text model: the prefill's next-token logits equal
    mtmd_helper_eval_chunks' on the same prompt, and the greedy answer (10 tokens) equals stock llama-cpp-python's
    through its Qwen2.5-VL handler, the fixture's template (stock's prompt_tokens counts M-RoPE positions, so it
    is not compared). `seed` picks a noise image whose answer is whole UTF-8 characters: stock decodes past
    max_tokens while one is incomplete."""
    path.write_bytes(png_bytes(noise(224, 224, seed)))
    assert_first_logits_equal_stock(fx, vlm, path, 2048)
    out = stock_chat_completion(fx.model, fx.mmproj, path.read_bytes(), max_tokens=10, n_ctx=2048, n_threads_batch=1,
                                flash_attn=False, handler=lcf.Qwen25VLChatHandler)
    ours = vlm.ask(path, Q, max_tokens=10)
    assert ours.text == out["choices"][0]["message"]["content"]
    assert len(ours.tokens) == out["usage"]["completion_tokens"] > 0
