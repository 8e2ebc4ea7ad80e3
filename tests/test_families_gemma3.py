"""Native KDV on Gemma 3 (projector type `gemma3`, families.Gemma3Family) on the tiny fixture of
convert/fixture_gemma3.py (SigLIP ViT, 24 x 24 patches, 4 x 4 average pool -> 6 x 6 = 36 tokens; llama text).

Oracles: the numpy re-implementation of the gemma3 graph (tests/reference_gemma3.py) for the captured keys and
the projected embeddings, with the patch -> token pooling redone by a plain loop here; stock llama-cpp-python
(MTMDChatHandler and the mtmd C helper) for the unpruned answer; a decode spy for the pruned prefill."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avis_llamacpp.families import ChunkGeometry, VisionInfo, family_for
from avis_llamacpp.images import load_image
from avis_llamacpp.kdv import kdv_scores
from convert.fixtures import make_fixture
from tests.family_helpers import (Q, assert_first_logits_equal_stock, check_non_causal_pruned_prefill, encode_one,
                                  noise, stock_chat_completion, vlm_fixtures)
from tests.reference_gemma3 import gemma3_forward
from tests.reference_vit import avg_pool_rows

N_GEN = 24
N_CTX = 512
SEED = 1  # a seed whose greedy answer is N_GEN tokens long (seed 0 stops after one token)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture("gemma3", seed=SEED, out_dir=tmp_path_factory.mktemp("gemma3"))


vlm, vlm_fa = vlm_fixtures(n_ctx=N_CTX, n_seq_max=1, use_gpu=False)
# the independent patch -> token rule is reference_vit.avg_pool_rows, a plain loop: token by*(side/k)+bx = mean of
# patches (x, y), x in [bx*k, bx*k+k), y in [by*k, by*k+k); patch (x, y) is row y*side + x


# -- the family entry on its own (no model) ------------------------------------------------------------
def _info(**kw) -> VisionInfo:
    base = dict(projector_type="gemma3", patch_size=8, n_wa_pattern=0, window_size=0, spatial_merge=0, n_layer=3,
                n_embd=64, n_ff=128, image_size=192, scale_factor=4)
    base.update(kw)
    return VisionInfo(**base)


def test_registry_entry_maps_pool_groups():
    fam = family_for("gemma3")
    assert fam.native and fam.name == "gemma3"
    rows = np.random.default_rng(0).standard_normal((24 * 24, 2, 3))
    geom = ChunkGeometry(36, 36, 1, (192, 192))
    tk = fam.token_keys(rows.astype(np.float32), geom, _info())
    assert tk is not None and tk.always_kept.size == 0
    np.testing.assert_allclose(tk.keys, avg_pool_rows(rows, 24, 24, 4), rtol=1e-5, atol=1e-6)
    assert fam.token_grid(geom, _info()) == (6, 6)
    # clip.cpp's default pool is 4 when the GGUF has no scale factor; a 2 x 2 pool gives 12 x 12 tokens
    assert fam.token_keys(rows, ChunkGeometry(36, 36, 1, None), _info(scale_factor=0)) is not None
    tk2 = fam.token_keys(rows, ChunkGeometry(144, 144, 1, (192, 192)), _info(scale_factor=2))
    np.testing.assert_allclose(tk2.keys, avg_pool_rows(rows, 24, 24, 2), rtol=1e-5, atol=1e-6)
    # rows that do not fit the rule: no native mapping (the pipeline falls back to embeddings)
    assert fam.token_keys(rows[:-1], geom, _info()) is None
    assert fam.token_keys(rows, ChunkGeometry(35, 35, 1, (192, 192)), _info()) is None
    assert fam.n_patches(256, _info(scale_factor=0)) == 4096  # real Gemma 3: 64 x 64 patches -> 256 tokens
    assert fam.blocks_run(_info(n_layer=27)) == 27
    assert fam.projection_dim({"mm.input_projection.weight": ((2560, 1152), 0)}) == 2560


# -- the captured keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flash", [False, True])
def test_key_tensor_is_the_last_blocks_keys(fx, vlm, vlm_fa, flash):
    v = vlm_fa if flash else vlm
    (n, nx, ny), _, tk, source, rows, wh, grid = encode_one(v, noise(192, 192, 3))
    assert source == f"vit_keys:Kcur-{fx.vision.n_layer - 1}"
    assert rows.shape == (24 * 24, fx.vision.n_head, fx.vision.n_embd // fx.vision.n_head)
    assert (n, nx, ny) == (36, 36, 1)  # mtmd's 1 x N report for a non-M-RoPE text model
    assert wh == (192, 192) and grid == (6, 6)


def test_captured_keys_equal_numpy_reference(vlm):
    img = noise(192, 192, 11)
    ref = gemma3_forward(vlm.projector.path, img)
    _, emb, tk, source, rows, _, _ = encode_one(vlm, img)
    last = ref["keys"][-1]
    assert source == f"vit_keys:Kcur-{ref['layers_run'] - 1}"
    scale = np.abs(last).max()
    np.testing.assert_allclose(rows, last, rtol=1e-4, atol=1e-4 * scale)  # the captured rows themselves
    want = avg_pool_rows(last, ref["patch_side"], ref["patch_side"], ref["pool"])
    assert tk.keys.shape == want.shape == (36, 4, 16)
    np.testing.assert_array_equal(tk.scored, np.arange(36))
    np.testing.assert_allclose(tk.keys, want, rtol=1e-4, atol=1e-4 * scale)
    # the same graph's output: the projected embeddings mtmd returns
    np.testing.assert_allclose(emb, ref["embeddings"], rtol=1e-4, atol=1e-4 * np.abs(ref["embeddings"]).max())


@pytest.mark.parametrize("wh", [(192, 96), (96, 192), (150, 110)])
def test_non_square_image_is_letterboxed_to_the_square_grid(vlm, wh):
    w, h = wh
    img = noise(w, h, 7)
    (n, _, _), _, tk, source, rows, got_wh, grid = encode_one(vlm, img)
    assert (n, grid, got_wh) == (36, (6, 6), (192, 192)) and source.startswith("vit_keys:")
    if max(w, h) == 192:  # no scaling: mtmd pastes the image centred on black; the reference sees the same
        padded = np.zeros((192, 192, 3), dtype=np.uint8)
        y0, x0 = (192 - h) // 2, (192 - w) // 2
        padded[y0:y0 + h, x0:x0 + w] = img
        last = gemma3_forward(vlm.projector.path, padded)["keys"][-1]
        scale = np.abs(last).max()
        np.testing.assert_allclose(tk.keys, avg_pool_rows(last, 24, 24, 4), rtol=1e-4, atol=1e-4 * scale)
    a = vlm.ask(img, Q, max_tokens=2, ratio=0.5)
    assert a.image_tokens == [36] and a.kept_tokens == [18] and a.images[0]["grid"] == [6, 6]


# -- the pipeline ----------------------------------------------------------------------------------------
def test_ask_tau_and_ratio_score_vit_keys(vlm, demo_image):
    for kw in ({"tau": math.pi / 4}, {"ratio": 0.5}):
        a = vlm.ask(demo_image, Q, max_tokens=4, **kw)
        im = a.images[0]
        assert im["key_source"].startswith("vit_keys:Kcur-"), kw
        assert a.image_tokens == [36] and 0 < a.kept_tokens[0] <= 36
        assert im["kept"] == sorted(set(im["kept"]))
    assert a.kept_tokens == [18]


def test_kept_sets_equal_with_flash_attention_on_and_off(vlm, vlm_fa, demo_image):
    for kw in ({"tau": math.pi / 4}, {"ratio": 0.5}, {"ratio": 0.75}):
        off = vlm.ask(demo_image, Q, max_tokens=1, **kw).images[0]
        on = vlm_fa.ask(demo_image, Q, max_tokens=1, **kw).images[0]
        assert on["key_source"] == off["key_source"] == "vit_keys:Kcur-2"
        assert on["kept"] == off["kept"], kw
    img = load_image(demo_image)
    k_off, k_on = encode_one(vlm, img)[2].keys, encode_one(vlm_fa, img)[2].keys
    np.testing.assert_allclose(kdv_scores(k_on), kdv_scores(k_off), atol=1e-3)


def test_pruned_prefill_positions_are_consecutive(vlm, demo_image, monkeypatch):
    """1-D RoPE text model: the kept image rows get consecutive positions right after the text before them
    (which ends in mtmd's <start_of_image> text), the text after the image (<end_of_image> ...) continues
    right after the last kept row, and the image rows are decoded non-causally."""
    check_non_causal_pruned_prefill(vlm, demo_image, monkeypatch, opens="<start_of_image>", closes="<end_of_image>",
                                    n_kept=18)


# -- stock parity ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stock_answer(fx, demo_image):
    """llama-cpp-python's stock MTMDChatHandler, greedy, flash attention off (llama_cpp has no gemma3-specific
    handler; MTMDChatHandler renders the GGUF's template): (text, completion tokens)."""
    out = stock_chat_completion(fx.model, fx.mmproj, demo_image.read_bytes(), max_tokens=N_GEN, n_ctx=N_CTX,
                                handler_kw={"use_gpu": False}, n_gpu_layers=0)
    return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]


def test_unpruned_answer_equals_stock_mtmd_chat_handler(vlm, demo_image, stock_answer):
    """Greedy, nothing pruned, K = 1, flash attention off on both sides: the same N_GEN tokens as the stock
    MTMDChatHandler (mtmd decodes gemma3 image tokens non-causally; so must prefill)."""
    text, n = stock_answer
    ours = vlm.ask(demo_image, Q, max_tokens=N_GEN, k=1)
    assert n == len(ours.tokens) >= 8  # a real answer, not an immediate end of generation
    assert ours.text == text
    assert ours.images[0]["key_source"].startswith("vit_keys:") and ours.kept_tokens == [36]


def test_unpruned_first_logits_equal_stock_mtmd_helper(fx, vlm, demo_image):
    """Bit-for-bit (to 1e-5) the next-token logits of mtmd_helper_eval_chunks after the same prompt."""
    assert_first_logits_equal_stock(fx, vlm, demo_image, N_CTX)
