"""PaddleOCR-VL family (paddleocr: a SigLIP-style ViT with 2-D M-RoPE on raster-ordered patches, then the 2x2
pixel-unshuffle merge): the keys KDV scores equal a numpy re-implementation of paddleocr.cpp
(tests/reference_paddleocr.py) and each token's key is its 2x2 block's mean (a plain loop over the raster grid);
pruned prefill feeds the kept rows at their original M-RoPE positions; with nothing pruned the logits and the
answer equal stock llama-cpp-python's. The fixture's text model is Qwen2-VL's (M-RoPE, as PaddleOCR-VL's)."""

from __future__ import annotations

import llama_cpp.llama_chat_format as lcf
import numpy as np

from avis_llamacpp.families import PaddleOCRFamily, family_for
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_first_logits_equal_stock, assert_kept_sets_equal_flash_on_off,
                                  assert_pruned_mrope_prefill, core_family_fixtures, noise, png_bytes,
                                  stock_chat_completion)
from tests.reference_paddleocr import paddleocr_forward

fx, vlm = core_family_fixtures("paddleocr")


def test_registry_and_preflight(fx, vlm):
    fam = family_for("paddleocr")
    assert isinstance(fam, PaddleOCRFamily) and fam.native
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)
    assert fam.n_patches(64, vlm.projector.vision_info) == 256


def test_captured_keys_equal_numpy_reference(vlm, fx):
    img = noise(224, 224, 11)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    assert a.images[0]["key_source"] == f"vit_keys:Kcur_pos-{fx.vision.n_layer - 1}"
    ref = paddleocr_forward(str(fx.mmproj), img)
    rows = ref["keys_rope"][-1]  # raster order: patch (x, y) at row y * 16 + x
    got = vlm.key_capture.keys
    assert got.shape == rows.shape
    np.testing.assert_allclose(got, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())
    gw, gh = ref["grid"]
    want = np.zeros((gw * gh // 4,) + rows.shape[1:])
    for ty in range(gh // 2):
        for tx in range(gw // 2):
            block = [(2 * ty + dy) * gw + 2 * tx + dx for dy in range(2) for dx in range(2)]
            want[ty * (gw // 2) + tx] = rows[block].mean(axis=0)
    chunk = type("C", (), {"n_tokens": 64, "nx": 8, "ny": 8, "image_index": 0})()
    tokens, _ = vlm.token_keys(chunk, np.zeros((64, 4)))
    np.testing.assert_allclose(tokens, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_pruned_prefill_feeds_kept_rows_at_original_mrope_positions(vlm, fx, monkeypatch):
    assert_pruned_mrope_prefill(vlm, fx, noise(336, 168, 5), monkeypatch)  # non-square


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    """K = 1, nothing pruned: next-token logits equal mtmd_helper_eval_chunks' on the same prompt, and the greedy
    answer equals stock llama-cpp-python's through its Qwen2.5-VL handler (the fixture's template). Seed 3: with 7
    the answer starts with a byte of an incomplete UTF-8 character, where stock decodes past max_tokens."""
    path = tmp_path / "paddleocr.png"
    path.write_bytes(png_bytes(noise(224, 224, 3)))
    assert_first_logits_equal_stock(fx, vlm, path, 2048)
    out = stock_chat_completion(fx.model, fx.mmproj, path.read_bytes(), max_tokens=10, n_ctx=2048, n_threads_batch=1,
                                flash_attn=False, handler=lcf.Qwen25VLChatHandler)
    ours = vlm.ask(path, Q, max_tokens=10)
    assert ours.text == out["choices"][0]["message"]["content"]
    assert len(ours.tokens) == out["usage"]["completion_tokens"] > 0


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)
