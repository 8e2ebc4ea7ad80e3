"""MiniMax-M3 vision (minimax_m3): rows in 2x2 merge order under a 3-axis NEOX RoPE. The keys KDV scores equal a
numpy re-implementation of minimax-m3.cpp (tests/reference_minimax_m3.py), on a square and a non-square image, and
each token's key is its group's mean (a plain loop); mtmd reports a 1 x N grid, the token grid comes from the
encoder's input; pruned prefill gives consecutive positions (a 1-D RoPE text model); with nothing pruned the answer
equals stock llama-cpp-python's."""

from __future__ import annotations

import numpy as np

from avis_llamacpp.families import MiniMaxM3Family, family_for
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, assert_merge_group_token_keys,
                                  check_pruned_positions, check_unpruned_equals_stock, core_family_fixtures, noise)
from tests.reference_minimax_m3 import minimax_m3_forward

fx, vlm = core_family_fixtures("minimax_m3")


def test_registry_and_preflight(fx, vlm):
    fam = family_for("minimax_m3")
    assert isinstance(fam, MiniMaxM3Family) and fam.native and not fam.gated_ffn
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)


def test_keys_equal_numpy_reference(vlm, fx):
    for w, h in ((224, 224), (336, 168)):
        img = noise(w, h, 11)
        a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
        assert a.images[0]["key_source"] == f"vit_keys:Kcur_pos-{fx.vision.n_layer - 1}"
        ref = minimax_m3_forward(fx.mmproj, img)
        rows = ref["keys_rope"][-1]
        got = vlm.key_capture.keys
        assert got.shape == rows.shape
        np.testing.assert_allclose(got, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())
        assert a.images[0]["grid"] == list(ref["grid"]) and a.image_tokens == [len(rows) // 4]
        with vlm.projector.tokenize(vlm.render_question(Q, 1), [img]) as p:
            assert (p.images[0].nx, p.images[0].ny) == (len(rows) // 4, 1)  # what mtmd reports
            vlm.projector.encode(p.images[0])
            assert_merge_group_token_keys(vlm, rows, ref["grid"])


def test_pruned_prefill_positions(vlm, monkeypatch):
    check_pruned_positions(vlm, noise(336, 168, 5), monkeypatch)


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    # 9 tokens: the 10th would end inside a UTF-8 character, where stock decodes past max_tokens
    check_unpruned_equals_stock(vlm, fx, noise(224, 224, 5), tmp_path / "minimax.png", 2048, max_tokens=9)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)
