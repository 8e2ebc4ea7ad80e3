"""PaddleOCR-VL (paddleocr), dots.ocr (dots_ocr), Kimi-VL (kimivl) and Kimi-K2.5 (kimik25, a 3-D position
table): a ViT with 2-D RoPE on raster-ordered patches, then the s x s pixel-unshuffle merge. On each fixture the keys
KDV scores equal a numpy re-implementation of paddleocr.cpp / dotsocr.cpp / kimivl.cpp / kimik25.cpp
(tests/reference_paddleocr.py) and each token's key is its s x s block's mean (a plain loop over the raster grid;
dots.ocr, without a position table and with 3 x 3 blocks, also on a non-square image); pruned prefill keeps the
positions right (paddleocr before an M-RoPE text model, as its ERNIE; the others before a 1-D RoPE one, as theirs);
with nothing pruned the logits and the answer equal stock llama-cpp-python's."""

from __future__ import annotations

import numpy as np

from avis_llamacpp.families import PaddleOCRFamily, family_for
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, assert_pruned_mrope_prefill,
                                  assert_unpruned_matches_stock_qwen_template, check_pruned_positions,
                                  check_unpruned_equals_stock, core_family_fixtures, noise)
from tests.reference_paddleocr import paddleocr_forward


SCALE = {"paddleocr": 2, "dots_ocr": 3, "kimivl": 2, "kimik25": 2}  # the fixtures' s (dots.ocr's 3: the file's value)
ONE_D_ROPE = ("dots_ocr", "kimivl", "kimik25")  # fixtures before a 1-D RoPE text model, as these models' own


fx, vlm = core_family_fixtures(*sorted(SCALE))


def test_registry_and_preflight(fx, vlm):
    fam = family_for(fx.family)
    assert isinstance(fam, PaddleOCRFamily) and fam.native
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)
    s = SCALE[fx.family]
    assert fam.scale(vlm.projector.vision_info) == s and fam.n_patches(16, vlm.projector.vision_info) == 16 * s * s
    # FLOPs: dots.ocr's ViT MLP has a gate (ffn_gate tensors), the others' has none
    gated = any(name.endswith("ffn_gate.weight") for name in hdr.tensors)
    assert fam.encoder_dims(vlm.projector.vision_info).gated_ffn is gated is (fx.family == "dots_ocr")


def test_captured_keys_equal_numpy_reference(vlm, fx):
    # paddleocr / kimivl resize their position table for other grids (not mirrored by the reference): square only
    s = SCALE[fx.family]
    for w, h in [(252, 252), (336, 168)] if fx.family == "dots_ocr" else [(224, 224)]:
        img = noise(w, h, 11)
        a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
        assert a.images[0]["key_source"] == f"vit_keys:Kcur_pos-{fx.vision.n_layer - 1}"
        ref = paddleocr_forward(str(fx.mmproj), img)
        rows = ref["keys_rope"][-1]  # raster order: patch (x, y) at row y * W + x
        got = vlm.key_capture.keys
        assert got.shape == rows.shape
        np.testing.assert_allclose(got, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())
        gw, gh = ref["grid"]
        want = np.zeros((gw * gh // s // s,) + rows.shape[1:])
        for ty in range(gh // s):
            for tx in range(gw // s):
                block = [(s * ty + dy) * gw + s * tx + dx for dy in range(s) for dx in range(s)]
                want[ty * (gw // s) + tx] = rows[block].mean(axis=0)
        assert a.images[0]["grid"] == [gw // s, gh // s] and a.image_tokens == [gw * gh // s // s]
        with vlm.projector.tokenize(vlm.render_question(Q, 1), [img]) as p:
            tokens, _ = vlm.token_keys(p.images[0], vlm.projector.encode(p.images[0]))
        np.testing.assert_allclose(tokens, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_pruned_prefill_positions(vlm, fx, monkeypatch):
    """paddleocr (M-RoPE text): the kept rows at their original (t, y, x); dots.ocr (1-D RoPE text, as its own):
    consecutive positions, the text after the image moved down by the pruned count."""
    if fx.family not in ONE_D_ROPE:
        assert_pruned_mrope_prefill(vlm, fx, noise(336, 168, 5), monkeypatch)  # non-square
    else:
        check_pruned_positions(vlm, noise(336, 168, 5), monkeypatch)


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    """paddleocr (Qwen2-VL text and template): logits and answer equal stock's through its Qwen2.5-VL handler;
    the 1-D RoPE fixtures: stock's generic handler, prompt token counts equal too. The seeds give answers of whole
    UTF-8 characters (stock decodes past max_tokens while one is incomplete)."""
    seed = {"paddleocr": 3, "dots_ocr": 9, "kimivl": 5, "kimik25": 5}[fx.family]
    path = tmp_path / f"{fx.family}.png"
    if fx.family in ONE_D_ROPE:
        check_unpruned_equals_stock(vlm, fx, noise(224, 224, seed), path, 2048, max_tokens=10)
    else:
        assert_unpruned_matches_stock_qwen_template(vlm, fx, path, seed)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)
