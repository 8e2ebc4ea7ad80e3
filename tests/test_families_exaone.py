"""EXAONE 4.5 family (exaone4_5: Qwen2.5-VL's windowed tower with a fused grouped-query QKV): the keys KDV scores
(n_head_kv heads, rows in 112 px window order) equal a numpy re-implementation of exaone4_5.cpp
(tests/reference_vit.qwen25vl_forward), and so does the projector output, which pins the window order back to LLM
tokens; pruned prefill feeds the kept rows at their original M-RoPE positions; with nothing pruned the logits and the
answer equal stock llama-cpp-python's. The fixture's text model is Qwen2-VL's (M-RoPE)."""

from __future__ import annotations

import numpy as np

from avis_llamacpp.families import Exaone45Family, family_for
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, assert_pruned_mrope_prefill,
                                  assert_unpruned_matches_stock_qwen_template, core_family_fixtures, noise)
from tests.reference_vit import qwen25vl_forward

fx, vlm = core_family_fixtures("exaone4_5")


def test_registry_preflight_and_windows(fx, vlm):
    fam = family_for("exaone4_5")
    assert isinstance(fam, Exaone45Family) and fam.native and fam.gated_ffn
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)
    vi = vlm.projector.vision_info
    assert vi.projector_type == "exaone4_5" and fam.windowed(vi) and vi.n_wa_pattern == fx.vision.n_wa_pattern
    dims = fam.encoder_dims(vi)
    assert (dims.window_rows, dims.full_every) == (64, 2)  # 112 px windows of 8 x 8 patches at patch 14


def test_captured_keys_and_embeddings_equal_numpy_reference(vlm, fx):
    """The capture reads `Kcur_rope-(L-1)` (a RoPE'd strided view, 2 key heads for 4 query heads) row for row as
    the reference computes it; each token's key is its 2x2 group's mean, taken from the window-ordered rows and put
    back in LLM token order by the reference's window index; the projected embeddings agree in that order too."""
    img = noise(224, 224, 11)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    ref = qwen25vl_forward(str(fx.mmproj), img)
    assert a.images[0]["key_source"] == f"vit_keys:Kcur_rope-{fx.vision.n_layer - 1}"
    assert ref["full_attn"] == [False, True, False, True]
    rows = ref["keys_rope"][-1]
    got = vlm.key_capture.keys
    assert got.shape == rows.shape == (256, fx.vision.n_head_kv, 16)
    np.testing.assert_allclose(got, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())
    want = rows.reshape(-1, 4, *rows.shape[1:]).mean(axis=1)[np.asarray(ref["window_idx"])]
    chunk = type("C", (), {"n_tokens": 64, "nx": 8, "ny": 8, "image_index": 0})()
    tokens, _ = vlm.token_keys(chunk, np.zeros((64, 4)))
    np.testing.assert_allclose(tokens, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    with vlm.projector.tokenize(vlm.render_question(Q, 1), [img]) as p:
        emb = vlm.projector.encode(p.images[0])
    np.testing.assert_allclose(emb, ref["embeddings"], rtol=2e-3, atol=2e-3 * np.abs(ref["embeddings"]).max())


def test_pruned_prefill_feeds_kept_rows_at_original_mrope_positions(vlm, fx, monkeypatch):
    assert_pruned_mrope_prefill(vlm, fx, noise(336, 168, 5), monkeypatch)  # non-square, 2 x 1 windows of 8 x 8


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    assert_unpruned_matches_stock_qwen_template(vlm, fx, tmp_path / "exaone.png", seed=7)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)
