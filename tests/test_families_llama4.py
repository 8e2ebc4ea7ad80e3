"""Llama 4 vision (llama4): tiles of 16 x 16 raster patches plus a class token, 2-D RoPE keys, a 2x2 pixel shuffle
whose tokens run column by column. The keys KDV scores and the projector output equal a numpy re-implementation of
llama4.cpp (tests/reference_llama4.py, the shuffle as the graph's literal reshape / permute sequence); each token's
key is the mean of the patches the literal shuffle puts in it; every tile of a sliced image is mapped on its own;
pruned prefill gives consecutive positions (a 1-D RoPE text model); with nothing pruned the answer equals stock
llama-cpp-python's."""

from __future__ import annotations

import numpy as np

from avis_llamacpp.families import Llama4Family, family_for
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, check_pruned_positions,
                                  check_unpruned_equals_stock, core_family_fixtures, noise)
from tests.reference_llama4 import llama4_forward, pixel_shuffle

fx, vlm = core_family_fixtures("llama4")


def test_registry_and_preflight(fx, vlm):
    fam = family_for("llama4")
    assert isinstance(fam, Llama4Family) and fam.native
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)
    assert fam.n_patches(64, vlm.projector.vision_info) == 257


def test_keys_and_embeddings_equal_numpy_reference(vlm, fx):
    img = noise(224, 224, 11)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    assert a.images[0]["key_source"] == f"vit_keys:Kcur_pos-{fx.vision.n_layer - 1}"
    ref = llama4_forward(fx.mmproj, img)
    rows = ref["keys_rope"][-1]  # 256 patches, then the class token
    got = vlm.key_capture.keys
    assert got.shape == rows.shape == (257, 4, 16)
    np.testing.assert_allclose(got, rows, rtol=2e-3, atol=2e-3 * np.abs(rows).max())
    with vlm.projector.tokenize(vlm.render_question(Q, 1), [img]) as p:
        emb = vlm.projector.encode(p.images[0])
        tokens, _ = vlm.token_keys(p.images[0], emb)
    np.testing.assert_allclose(emb, ref["embeddings"], rtol=2e-3, atol=2e-3 * np.abs(ref["embeddings"]).max())
    # which patches each token holds, by running the literal shuffle on patch indices
    side, s = ref["side"], ref["scale"]
    members = pixel_shuffle(np.arange(side * side, dtype=np.float64)[:, None], side, s).astype(int)
    want = np.stack([rows[m].mean(axis=0) for m in members])
    np.testing.assert_allclose(tokens, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert members[1].tolist() == [2 * side * 1, 2 * side * 1 + 1, 2 * side * 1 + side, 2 * side * 1 + side + 1]


def test_every_tile_is_mapped_on_its_own(vlm):
    a = vlm.ask(noise(320, 160, 4), Q, max_tokens=1, ratio=0.5)
    assert len(a.images) > 1 and a.image_tokens == [64] * len(a.images)
    assert all(im["key_source"].startswith("vit_keys:Kcur_pos") and im["grid"] == [8, 8] for im in a.images)
    assert a.kept_tokens == [32] * len(a.images)


def test_pruned_prefill_positions(vlm, monkeypatch):
    check_pruned_positions(vlm, noise(224, 224, 5), monkeypatch)


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    # seed 9: an answer of whole UTF-8 characters (stock decodes past max_tokens while one is incomplete)
    check_unpruned_equals_stock(vlm, fx, noise(224, 224, 9), tmp_path / "llama4.png", 2048, max_tokens=10)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)


def test_show_draws_each_kept_token_where_its_patches_are(fx, vlm, tmp_path):
    """`avis show` darkens the cells of pruned tokens: with Llama 4's column-by-column tokens, the bright cells are
    the blocks whose patches the literal shuffle puts in kept tokens (not the transposed ones)."""
    from PIL import Image

    from avis_llamacpp.cli import main
    from tests.family_helpers import png_bytes

    src = tmp_path / "img.png"
    src.write_bytes(png_bytes(noise(224, 224, 21)))
    out = tmp_path / "show.png"
    assert main(["show", "-m", str(fx.model), "--mmproj", str(fx.mmproj), "-i", str(src), "--rho", "0.5",
                 "--cell-px", "4", "--no-legend", "--threads", "1", "--flash-attn", "off", "-o", str(out)]) == 0
    kept = vlm.ask(str(src), "What is shown?", max_tokens=1, ratio=0.5).images[0]["kept"]
    members = pixel_shuffle(np.arange(256, dtype=np.float64)[:, None], 16, 2).astype(int)
    bright = np.zeros((8, 8), dtype=bool)
    for t in kept:
        y, x = divmod(int(members[t][0]), 16)
        bright[y // 2, x // 2] = True
    assert not np.array_equal(bright, bright.T)  # the kept set must tell the two orders apart

    def cell_means(img: Image.Image) -> np.ndarray:
        return np.asarray(img.convert("L"), dtype=np.float64).reshape(8, 4, 8, 4).mean(axis=(1, 3))

    plain = Image.open(src).convert("RGB").resize((32, 32), Image.BICUBIC)
    np.testing.assert_array_equal(cell_means(Image.open(out)) / cell_means(plain) > 0.6, bright)
