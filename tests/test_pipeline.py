"""The vanilla pipeline against two independent oracles: stock llama-cpp-python's chat handler
(create_chat_completion) and mtmd_helper_eval_chunks followed by a numpy-argmax greedy loop.
Flash attention off throughout, as stock llama-cpp-python runs (tests/test_flash_attn.py covers it on)."""

from __future__ import annotations

import base64
import ctypes
import io

import llama_cpp
import numpy as np
import pytest
from llama_cpp import llama_chat_format as lcf
from PIL import Image

from avis_llamacpp import VLM
from avis_llamacpp.images import load_image

QUESTION = "What shapes do you see?"
N_GEN = 24
N_CTX = 1024

STOCK_HANDLERS = {"llava": lcf.Llava15ChatHandler, "qwen25vl": lcf.Qwen25VLChatHandler}


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _other_image(w: int = 320, h: int = 160) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=N_CTX, flash_attn=False) as v:
        yield v


def test_loads_and_uses_the_right_rope(vlm, vlm_fixture):
    assert vlm.projector.uses_mrope == (vlm_fixture.family == "qwen25vl")
    assert vlm.model.uses_mrope == (vlm_fixture.family == "qwen25vl")
    assert vlm.model.n_embd_inp == vlm_fixture.vision.proj_dim


@pytest.mark.parametrize("size", [(224, 224), (320, 160), (97, 300)])
def test_image_token_count_matches_mmproj_geometry(vlm, vlm_fixture, size):
    w, h = size
    img = _other_image(w, h)
    prompt = vlm.render_question("q", 1)
    with vlm.projector.tokenize(prompt, [load_image(img)]) as p:
        (chunk,) = p.images
        assert chunk.n_tokens == vlm_fixture.image_tokens(w, h)
        assert chunk.nx * chunk.ny == chunk.n_tokens
        # M-RoPE: an image spans max(nx, ny) positions; 1-D RoPE: one per token
        expected_pos = max(chunk.nx, chunk.ny) if vlm.projector.uses_mrope else chunk.n_tokens
        assert chunk.n_pos == expected_pos


def test_fixture_has_at_least_64_image_tokens(vlm_fixture):
    assert vlm_fixture.image_tokens(224, 224) >= 64


def test_greedy_is_deterministic(vlm, vlm_fixture, demo_image):
    a = vlm.ask(demo_image, QUESTION, max_tokens=N_GEN)
    b = vlm.ask(demo_image, QUESTION, max_tokens=N_GEN)
    assert a.tokens == b.tokens and len(a.tokens) > 0
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=N_CTX, flash_attn=False) as fresh:
        c = fresh.ask(demo_image, QUESTION, max_tokens=N_GEN)
    assert c.tokens == a.tokens
    # a different image changes the visual tokens and so the prefill's next-token logits (the greedy text of
    # these random-weight models may or may not change with it)
    d = vlm.ask(_other_image(), QUESTION, max_tokens=N_GEN)
    assert d.image_tokens == [vlm_fixture.image_tokens(320, 160)]
    from avis_llamacpp.prefill import prefill
    first = []
    for img in (demo_image, _other_image()):
        vlm.ctx.clear()
        with vlm.projector.tokenize(vlm.render_question(QUESTION, 1), [load_image(img)]) as p:
            prefill(vlm.ctx, vlm.projector, p)
            first.append(vlm.ctx.logits(-1))
    vlm.ctx.clear()
    assert np.abs(first[0] - first[1]).max() > 1e-3


def test_matches_stock_create_chat_completion(vlm, vlm_fixture, demo_image):
    """Same prompt, same image, greedy: identical text to llama-cpp-python's stock family handler."""
    png = demo_image.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    handler = STOCK_HANDLERS[vlm_fixture.family](clip_model_path=str(vlm_fixture.mmproj), verbose=False)
    llm = llama_cpp.Llama(model_path=str(vlm_fixture.model), chat_handler=handler, n_ctx=N_CTX, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": QUESTION}]}],
            temperature=0.0, repeat_penalty=1.0, max_tokens=N_GEN, seed=0)
        stock_text = out["choices"][0]["message"]["content"]
        stock_completion_tokens = out["usage"]["completion_tokens"]
    finally:
        llm.close()
    ours = vlm.ask(demo_image, QUESTION, max_tokens=N_GEN)
    assert ours.text == stock_text
    assert len(ours.tokens) == stock_completion_tokens


def _oracle_greedy(fx, prompt_text: str, png: bytes, n: int) -> tuple[list[int], np.ndarray]:
    """mtmd_helper_eval_chunks (stb_image decoding, the C helper's positions) + argmax loop."""
    from tests.family_helpers import last_logits, stock_mtmd_prefill

    with stock_mtmd_prefill(fx, prompt_text, png, N_CTX) as (llm, pos):
        first = last_logits(llm)
        logits, tokens = first, []
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        for _ in range(n):
            tok = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            tokens.append(tok)
            tok_arr = (llama_cpp.llama_token * 1)(tok)  # kept alive: the batch only points at it
            batch = llama_cpp.llama_batch_get_one(tok_arr, 1)
            pos_arr = (llama_cpp.llama_pos * 1)(pos)
            batch.pos = ctypes.cast(pos_arr, ctypes.POINTER(llama_cpp.llama_pos))
            assert llama_cpp.llama_decode(llm.ctx, batch) == 0
            pos += 1
            logits = last_logits(llm)
        return tokens, first


def test_matches_mtmd_helper_token_for_token(vlm, vlm_fixture, demo_image):
    prompt = vlm.render_question(QUESTION, 1)
    want, want_logits = _oracle_greedy(vlm_fixture, prompt, demo_image.read_bytes(), N_GEN)
    got = vlm.generate(prompt, [demo_image], max_tokens=N_GEN)
    assert got.tokens == want
    # the first-step logits agree too (same kernels, same batches)
    vlm.ctx.clear()
    with vlm.projector.tokenize(prompt, [load_image(demo_image)]) as p:
        from avis_llamacpp.prefill import prefill
        prefill(vlm.ctx, vlm.projector, p)
        np.testing.assert_allclose(vlm.ctx.logits(-1), want_logits, rtol=0, atol=1e-5)
    vlm.ctx.clear()


def test_text_only_prompt(vlm):
    a = vlm.ask(None, "Say something.", max_tokens=8)
    assert a.image_tokens == [] and a.prompt_tokens > 0
