"""MiMo-VL family (mimovl: fused biased grouped-query QKV, row / column banded windows with attention sinks): the
keys KDV scores equal a numpy re-implementation of mimovl.cpp (tests/reference_mimovl.py); the fixture's last block
windows in column order, so its keys come in column order of the 2x2 units and the mapping puts them back (checked
by a plain loop over the grid); pruned prefill feeds the kept rows at their original M-RoPE positions; with nothing
pruned the logits and the answer equal stock llama-cpp-python's. The fixture's text model is Qwen2-VL's (M-RoPE)."""

from __future__ import annotations

import numpy as np

from avis_llamacpp.families import ChunkGeometry, MimoVLFamily, VisionInfo, family_for
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, assert_pruned_mrope_prefill,
                                  assert_unpruned_matches_stock_qwen_template, core_family_fixtures, noise)
from tests.reference_mimovl import column_unit_order, mimovl_forward

fx, vlm = core_family_fixtures("mimovl")


def _tokens_by_loop(rows: np.ndarray, gx: int, gy: int, column_order: bool) -> np.ndarray:
    """Token (tx, ty) = mean of its unit's 4 rows; the unit sits at position ty * gx + tx in row order, at
    tx * gy + ty in column order."""
    out = np.zeros((gx * gy,) + rows.shape[1:])
    for ty in range(gy):
        for tx in range(gx):
            unit = tx * gy + ty if column_order else ty * gx + tx
            out[ty * gx + tx] = rows[4 * unit:4 * unit + 4].mean(axis=0)
    return out


def test_mapping_follows_the_last_blocks_unit_order():
    """Pure mapping on a non-square grid: column order undone only when the last block's mode is 1."""
    fam = family_for("mimovl")
    rows = np.random.default_rng(0).standard_normal((4 * 6 * 3, 2, 4))  # 6 x 3 tokens
    geom = ChunkGeometry(18, 6, 3)
    for modes, column in (((0, 1), True), ((1, 0), False), ((1, -1), False), ((), False)):
        got = fam.token_keys(rows, geom, VisionInfo("mimovl", 14, 0, 112, 2, n_layer=2, window_modes=modes)).keys
        np.testing.assert_allclose(got, _tokens_by_loop(rows, 6, 3, column), err_msg=str(modes))
    assert sorted(column_unit_order(6, 3)) == list(range(18))


def test_registry_preflight_and_vision_info(fx, vlm):
    fam = family_for("mimovl")
    assert isinstance(fam, MimoVLFamily) and fam.native and fam.gated_ffn
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)
    vi = vlm.projector.vision_info
    assert vi.window_modes == fx.vision.window_modes == (0, -1, 0, 1) and not fam.windowed(vi)


def test_captured_keys_equal_numpy_reference(vlm, fx):
    img = noise(224, 224, 11)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    assert a.images[0]["key_source"] == f"vit_keys:Kcur_rope-{fx.vision.n_layer - 1}"
    ref = mimovl_forward(str(fx.mmproj), img)
    rows = ref["keys_rope"][-1]  # column order of the units: the last block's mode is 1
    got = vlm.key_capture.keys
    assert got.shape == rows.shape == (256, fx.vision.n_head_kv, 16)
    # f32 vs f64 rounding is ~1e-7 here; the sinks alone move these keys by ~4e-4, the window by ~6e-3
    np.testing.assert_allclose(got, rows, rtol=0, atol=2e-5 * np.abs(rows).max())
    chunk = type("C", (), {"n_tokens": 64, "nx": 8, "ny": 8, "image_index": 0})()
    tokens, _ = vlm.token_keys(chunk, np.zeros((64, 4)))
    want = _tokens_by_loop(rows, 8, 8, column_order=True)
    np.testing.assert_allclose(tokens, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_pruned_prefill_feeds_kept_rows_at_original_mrope_positions(vlm, fx, monkeypatch):
    assert_pruned_mrope_prefill(vlm, fx, noise(336, 168, 5), monkeypatch)  # non-square: column order differs


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    assert_unpruned_matches_stock_qwen_template(vlm, fx, tmp_path / "mimovl.png", seed=7)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)
