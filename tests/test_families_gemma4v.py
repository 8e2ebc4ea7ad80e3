"""Native KDV on Gemma 4 vision (projector type `gemma4v`, families.Gemma4VFamily) on the tiny fixture of
convert/fixture_gemma4v.py (RMS ViT with 2-D NEOX RoPE, patch 8, 3 x 3 average pool: 24 px per LLM token; the
aspect ratio is kept, so a 240 x 168 image is 30 x 21 patches -> 10 x 7 tokens; llama text model).

Oracles: the numpy re-implementation of gemma4v.cpp (tests/reference_gemma4v.py) for the captured post-RoPE keys
and the projected embeddings, pooled to tokens by a plain loop here; stock llama-cpp-python
(Gemma4ChatHandler, the mtmd C helper) for the unpruned answer; a decode spy for the pruned prefill."""

from __future__ import annotations

import math

import llama_cpp.llama_chat_format as lcf
import numpy as np
import pytest

from avis_llamacpp.families import ChunkGeometry, VisionInfo, family_for
from avis_llamacpp.images import load_image
from avis_llamacpp.kdv import kdv_scores
from convert.fixtures import make_fixture
from tests.family_helpers import (Q, assert_first_logits_equal_stock, check_non_causal_pruned_prefill, encode_one,
                                  noise, stock_chat_completion, vlm_fixtures)
from tests.reference_gemma4v import gemma4v_forward
from tests.reference_vit import avg_pool_rows

N_GEN = 24
N_CTX = 512
SEED = 1  # a seed whose greedy answer on the demo image is N_GEN tokens long
# the reference matches to ~3e-4 of the largest key: the GEGLU's f16 gelu table (mirrored) flips at f16 rounding
# boundaries when the inputs differ in the last f32 bits; a wrong row / token mapping is off by O(1)
TOL = 1e-3


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture("gemma4v", seed=SEED, out_dir=tmp_path_factory.mktemp("gemma4v"))


vlm, vlm_fa = vlm_fixtures(n_ctx=N_CTX, n_seq_max=1, use_gpu=False)
# the pooling oracle is reference_vit.avg_pool_rows, a plain loop: token by*(px/k)+bx = mean of patches (x, y),
# x in [bx*k, bx*k+k), y in [by*k, by*k+k); patch (x, y) is row y*px + x


def _info(**kw) -> VisionInfo:
    base = dict(projector_type="gemma4v", patch_size=8, n_wa_pattern=0, window_size=0, spatial_merge=0, n_layer=3,
                n_embd=64, n_ff=128, image_size=224, scale_factor=3)
    base.update(kw)
    return VisionInfo(**base)


def test_registry_entry_maps_pool_groups():
    fam = family_for("gemma4v")
    assert fam.native and fam.name == "gemma4v"
    rows = np.random.default_rng(0).standard_normal((30 * 21, 2, 3))
    geom = ChunkGeometry(70, 70, 1, (240, 168))
    tk = fam.token_keys(rows, geom, _info())
    assert tk is not None and tk.always_kept.size == 0
    np.testing.assert_allclose(tk.keys, avg_pool_rows(rows, 30, 21, 3), rtol=1e-6, atol=1e-9)
    assert fam.token_grid(geom, _info()) == (10, 7)
    tall = fam.token_keys(rows, ChunkGeometry(70, 70, 1, (168, 240)), _info())
    np.testing.assert_allclose(tall.keys, avg_pool_rows(rows, 21, 30, 3), rtol=1e-6, atol=1e-9)
    assert fam.token_keys(rows, ChunkGeometry(70, 70, 1, None), _info()) is None  # grid unknown: fall back
    assert fam.token_keys(rows[:-1], geom, _info()) is None
    assert fam.token_keys(rows, ChunkGeometry(71, 71, 1, (240, 168)), _info()) is None
    assert fam.n_patches(70, _info(scale_factor=0)) == 630  # clip.cpp default pool 3
    assert fam.projection_dim({"mm.input_projection.weight": ((768, 2560), 0)}) == 2560


@pytest.mark.parametrize("flash", [False, True])
def test_key_tensor_is_the_last_blocks_roped_keys(fx, vlm, vlm_fa, flash):
    v = vlm_fa if flash else vlm
    (n, nx, ny), _, tk, source, rows, wh, grid = encode_one(v, noise(240, 168, 3))
    assert source == f"vit_keys:Kcur_pos-{fx.vision.n_layer - 1}"
    assert rows.shape == (30 * 21, fx.vision.n_head, fx.vision.n_embd // fx.vision.n_head)
    assert (n, nx, ny) == (70, 70, 1) and wh == (240, 168) and grid == (10, 7)


@pytest.mark.parametrize("wh", [(240, 168), (168, 240), (216, 216)])
def test_captured_keys_equal_numpy_reference(vlm, wh):
    """Non-square both ways and square; the keys are the post-RoPE ones (pre-RoPE keys differ by O(1))."""
    img = noise(*wh, seed=sum(wh))
    ref = gemma4v_forward(vlm.projector.path, img)
    (n, _, _), emb, tk, source, rows, got_wh, grid = encode_one(vlm, img)
    px, py = ref["grid"]
    assert got_wh == wh and (px, py) == (wh[0] // 8, wh[1] // 8)
    assert grid == (px // 3, py // 3) and n == (px // 3) * (py // 3)
    last = ref["keys_pos"][-1]
    scale = np.abs(last).max()
    np.testing.assert_allclose(rows, last, rtol=TOL, atol=TOL * scale)
    assert np.abs(rows - ref["keys"][-1]).max() > 0.1 * scale  # not the pre-RoPE keys
    want = avg_pool_rows(last, px, py, 3)
    assert tk.keys.shape == want.shape
    np.testing.assert_allclose(tk.keys, want, rtol=TOL, atol=TOL * scale)
    e = ref["embeddings"]
    np.testing.assert_allclose(emb, e, rtol=TOL, atol=TOL * np.abs(e).max())


def test_ask_tau_and_ratio_score_vit_keys(vlm, demo_image):
    for kw in ({"tau": math.pi / 4}, {"ratio": 0.5}):
        a = vlm.ask(demo_image, Q, max_tokens=4, **kw)
        im = a.images[0]
        assert im["key_source"] == "vit_keys:Kcur_pos-2", kw
        assert a.image_tokens == [81] and im["grid"] == [9, 9]  # 224 px -> 216 px aligned -> 9 x 9 tokens
        assert im["kept"] == sorted(set(im["kept"])) and 0 < a.kept_tokens[0] <= 81
    assert a.kept_tokens == [40]


def test_non_square_image_through_the_pipeline(vlm):
    a = vlm.ask(noise(240, 168, 9), Q, max_tokens=2, ratio=0.5)
    assert a.image_tokens == [70] and a.kept_tokens == [35] and a.images[0]["grid"] == [10, 7]
    assert a.images[0]["key_source"].startswith("vit_keys:")


def test_kept_sets_equal_with_flash_attention_on_and_off(vlm, vlm_fa, demo_image):
    for kw in ({"tau": math.pi / 4}, {"ratio": 0.5}, {"ratio": 0.75}):
        off = vlm.ask(demo_image, Q, max_tokens=1, **kw).images[0]
        on = vlm_fa.ask(demo_image, Q, max_tokens=1, **kw).images[0]
        assert on["key_source"] == off["key_source"] == "vit_keys:Kcur_pos-2"
        assert on["kept"] == off["kept"], kw
    img = load_image(demo_image)
    np.testing.assert_allclose(kdv_scores(encode_one(vlm_fa, img)[2].keys), kdv_scores(encode_one(vlm, img)[2].keys),
                               atol=1e-3)


def test_pruned_prefill_positions_are_consecutive(vlm, demo_image, monkeypatch):
    # text n_embd 64 (not E2B / E4B): mtmd decodes gemma4v images non-causally
    check_non_causal_pruned_prefill(vlm, demo_image, monkeypatch, opens="<|image>", closes="<image|>", n_kept=40)


def test_unpruned_answer_equals_stock_gemma4_chat_handler(fx, vlm, demo_image):
    """Greedy, nothing pruned, K = 1, flash attention off on both sides: the same tokens as llama-cpp-python's
    stock Gemma4ChatHandler (an MTMDChatHandler rendering the GGUF's template)."""
    out = stock_chat_completion(fx.model, fx.mmproj, demo_image.read_bytes(), max_tokens=N_GEN, n_ctx=N_CTX,
                                handler=lcf.Gemma4ChatHandler, handler_kw={"use_gpu": False}, n_gpu_layers=0)
    ours = vlm.ask(demo_image, Q, max_tokens=N_GEN, k=1)
    assert out["usage"]["completion_tokens"] == len(ours.tokens) >= 8
    assert ours.text == out["choices"][0]["message"]["content"]
    assert ours.images[0]["key_source"].startswith("vit_keys:") and ours.kept_tokens == [81]


def test_unpruned_first_logits_equal_stock_mtmd_helper(fx, vlm, demo_image):
    assert_first_logits_equal_stock(fx, vlm, demo_image, N_CTX)
