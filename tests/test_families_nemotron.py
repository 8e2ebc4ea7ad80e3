"""Nemotron Nano VL (nemotron_v2_vl): register tokens before the raster patches, a ViT without RoPE, a 2x2 pixel
unshuffle of the patches. The captured keys (registers included) and the projector output equal a numpy
re-implementation of nemotron-v2-vl.cpp (tests/reference_idefics3.siglip_forward); each token's key is the mean of
its 2x2 patches, registers dropped (a plain loop); pruned prefill gives consecutive positions (a 1-D RoPE text
model); with nothing pruned the answer equals stock llama-cpp-python's."""

from __future__ import annotations

import numpy as np

from avis_llamacpp.families import NemotronVLFamily, family_for
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, check_pruned_positions,
                                  check_unpruned_equals_stock, core_family_fixtures, noise)
from tests.reference_idefics3 import siglip_forward

fx, vlm = core_family_fixtures("nemotron_v2_vl")


def test_registry_and_preflight(fx, vlm):
    fam = family_for("nemotron_v2_vl")
    assert isinstance(fam, NemotronVLFamily) and fam.native and fam.key_names == ("Kcur",)
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)


def test_keys_and_embeddings_equal_numpy_reference(vlm, fx):
    img = noise(224, 224, 11)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    assert a.images[0]["key_source"] == f"vit_keys:Kcur-{fx.vision.n_layer - 1}"
    ref = siglip_forward(fx.mmproj, img)
    rows = ref["keys"][-1]  # 4 registers, then 16 x 16 raster patches
    got = vlm.key_capture.keys
    assert got.shape == rows.shape == (4 + 256, 4, 16)
    np.testing.assert_allclose(got, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())
    with vlm.projector.tokenize(vlm.render_question(Q, 1), [img]) as p:
        emb = vlm.projector.encode(p.images[0])
        tokens, _ = vlm.token_keys(p.images[0], emb)
    np.testing.assert_allclose(emb, ref["embeddings"], rtol=2e-3, atol=2e-3 * np.abs(ref["embeddings"]).max())
    patches = rows[4:]
    want = np.stack([patches[[(2 * ty + dy) * 16 + 2 * tx + dx for dy in range(2) for dx in range(2)]].mean(axis=0)
                     for ty in range(8) for tx in range(8)])
    np.testing.assert_allclose(tokens, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_pruned_prefill_positions(vlm, monkeypatch):
    check_pruned_positions(vlm, noise(320, 160, 5), monkeypatch)


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    # seed 6: an answer of whole UTF-8 characters (stock decodes past max_tokens while one is incomplete)
    check_unpruned_equals_stock(vlm, fx, noise(224, 224, 6), tmp_path / "nemotron.png", 2048, max_tokens=10)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)
