"""Janus-Pro (janus_pro) and Phi-4 vision (phi4): a SigLIP ViT whose MLP projector keeps one LLM token per patch.
On both fixtures the keys KDV scores (`Kcur-(L-1)`, no RoPE) and the projector's output equal a numpy
re-implementation of siglip.cpp (tests/reference_idefics3.siglip_forward), so token i is patch i; Phi-4 keeps a
non-square image's own grid (read from the encoder's input: mtmd reports 1 x N); pruned prefill gives consecutive
positions (1-D RoPE text models, as theirs); with nothing pruned the answer equals stock llama-cpp-python's."""

from __future__ import annotations

import numpy as np

from avis_llamacpp.families import SiglipMLPFamily, family_for
from avis_llamacpp.preflight import scan_gguf
from convert.mmproj import expected_image_grid
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, check_pruned_positions,
                                  check_unpruned_equals_stock, core_family_fixtures, noise)
from tests.reference_idefics3 import siglip_forward


fx, vlm = core_family_fixtures("janus_pro", "phi4")


def test_registry_and_preflight(fx, vlm):
    fam = family_for(fx.family)
    assert isinstance(fam, SiglipMLPFamily) and fam.native and fam.key_names == ("Kcur",)
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)
    assert fam.n_patches(256, vlm.projector.vision_info) == 256


def test_keys_and_embeddings_equal_numpy_reference(vlm, fx):
    img = noise(224, 224, 11)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    assert a.images[0]["key_source"] == f"vit_keys:Kcur-{fx.vision.n_layer - 1}"
    ref = siglip_forward(fx.mmproj, img)
    rows = ref["keys"][-1]
    got = vlm.key_capture.keys
    assert got.shape == rows.shape == (256, 4, 16)
    np.testing.assert_allclose(got, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())
    with vlm.projector.tokenize(vlm.render_question(Q, 1), [img]) as p:
        emb = vlm.projector.encode(p.images[0])
        tokens, _ = vlm.token_keys(p.images[0], emb)
    np.testing.assert_allclose(emb, ref["embeddings"], rtol=2e-3, atol=2e-3 * np.abs(ref["embeddings"]).max())
    np.testing.assert_allclose(tokens, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())  # token i = patch i


def test_grid_of_a_non_square_image(vlm, fx):
    """Janus-Pro letterboxes to its fixed square; Phi-4 keeps the image's aspect (the grid from the encoder input)."""
    a = vlm.ask(noise(320, 160, 4), Q, max_tokens=1, ratio=0.5)
    nx, ny = expected_image_grid(fx.vision, 320, 160)
    assert a.images[0]["grid"] == [nx, ny] and a.image_tokens == [nx * ny]
    assert (nx, ny) == ((16, 16) if fx.family == "janus_pro" else (23, 11))
    assert a.images[0]["key_source"].startswith("vit_keys:")


def test_pruned_prefill_positions(vlm, monkeypatch):
    check_pruned_positions(vlm, noise(320, 160, 5), monkeypatch)


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    check_unpruned_equals_stock(vlm, fx, noise(224, 224, 5), tmp_path / f"{fx.family}.png", 2048, max_tokens=10)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)


def test_preflight_asks_for_a_position_table_only_where_the_graph_needs_it():
    """siglip.cpp adds janus_pro's position table only when present but resizes phi4's (which asserts it)."""
    fam = family_for("janus_pro")
    janus = {n: ((1,), 0) for n in ("v.patch_embd.weight", "mm.0.weight", "mm.0.bias", "mm.1.weight", "mm.1.bias")}
    phi4 = {n: ((1,), 0) for n in ("v.patch_embd.weight", "mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias")}
    assert [n for n in fam.required_for(janus) if n not in janus] == []
    assert [n for n in fam.required_for(phi4) if n not in phi4] == ["v.position_embd.weight"]
