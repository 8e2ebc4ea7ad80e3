"""Tests for avis_llamacpp.kdv against deliberately naive loop-based oracles."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.kdv import (
    DEFAULT_TAU,
    KDVSelection,
    angle_to_anchor,
    apply_window_order,
    kdv_scores,
    merge_consecutive,
    merge_groups,
    n_keep_for_ratio,
    prune,
    qwen25vl_inv_window_index,
    qwen25vl_window_index,
    select_tokens,
    undo_window_order,
    vit_keys_to_token_keys,
)

# --------------------------------------------------------------------------- #
# naive oracles
# --------------------------------------------------------------------------- #


def oracle_scores(keys: np.ndarray) -> list[float]:
    """Loop over heads and tokens with the math module only."""
    n_tok, n_head, d = keys.shape
    scores = [0.0] * n_tok
    for h in range(n_head):
        units = []
        for n in range(n_tok):
            v = [float(keys[n, h, j]) for j in range(d)]
            norm = math.sqrt(math.fsum(x * x for x in v))
            units.append([x / norm for x in v] if norm > 0 else [0.0] * d)
        anchor = [math.fsum(u[j] for u in units) / n_tok for j in range(d)]
        a_norm = math.sqrt(math.fsum(a * a for a in anchor))
        anchor = [a / a_norm for a in anchor] if a_norm > 0 else [0.0] * d
        for n in range(n_tok):
            c = math.fsum(units[n][j] * anchor[j] for j in range(d))
            c = max(-1.0, min(1.0, c))
            scores[n] -= c / n_head
    return scores


def oracle_select_ratio(scores, ratio: float) -> list[int]:
    n = len(scores)
    n_keep = max(1, math.floor((1 - Fraction(repr(ratio))) * n))
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    return sorted(ranked[:n_keep])


def oracle_select_tau(scores, tau: float) -> list[int]:
    thr = -math.cos(tau)
    kept = [i for i in range(len(scores)) if not scores[i] < thr]
    if not kept:
        best = 0
        for i in range(len(scores)):
            if scores[i] > scores[best]:
                best = i
        kept = [best]
    return kept


def oracle_merge(x: np.ndarray, gw: int, gh: int, m: int) -> np.ndarray:
    out = []
    for by in range(gh // m):
        for bx in range(gw // m):
            acc = np.zeros(x.shape[1:])
            for dy in range(m):
                for dx in range(m):
                    acc = acc + x[(by * m + dy) * gw + (bx * m + dx)]
            out.append(acc / (m * m))
    return np.array(out)


def clip_cpp_window_idx(gw: int, gh: int, merge: int, window_patches: int):
    """Line-by-line transcription of llama.cpp clip.cpp's PROJECTOR_TYPE_QWEN25VL idx/inv_idx loop."""
    pw, ph = gw // merge, gh // merge
    grid_window = window_patches // merge
    idx = [0] * (ph * pw)
    inv_idx = [0] * (ph * pw)
    dst = 0
    for y in range(0, ph, grid_window):
        for x in range(0, pw, grid_window):
            win_h = min(grid_window, ph - y)
            win_w = min(grid_window, pw - x)
            for dy in range(win_h):
                for dx in range(win_w):
                    src = (y + dy) * pw + (x + dx)
                    idx[src] = dst
                    inv_idx[dst] = src
                    dst += 1
    return idx, inv_idx


SHAPES = [(1, 1, 1), (1, 3, 4), (2, 1, 3), (5, 2, 4), (17, 3, 8), (64, 4, 16), (100, 2, 80), (7, 1, 1)]


# --------------------------------------------------------------------------- #
# kdv_scores
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_loop_oracle(shape, seed):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=shape) * rng.uniform(0.1, 10.0) + rng.normal(size=shape[1:])
    got = kdv_scores(keys.astype(np.float32))
    want = oracle_scores(keys.astype(np.float32).astype(np.float64))
    assert got.dtype == np.float64 and got.shape == (shape[0],)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.all(got >= -1.0) and np.all(got <= 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_selection_matches_loop_oracle(shape):
    rng = np.random.default_rng(42)
    scores = kdv_scores(rng.normal(size=shape))
    for ratio in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]:
        assert select_tokens(scores, ratio=ratio).tolist() == oracle_select_ratio(scores, ratio)
    for tau in [0.05, 0.3, math.pi / 4, 1.2, math.pi / 2, 2.5, 3.1]:
        assert select_tokens(scores, tau=tau).tolist() == oracle_select_tau(scores, tau)


def test_identical_keys_score_minus_one_and_ties_stable():
    keys = np.tile(np.array([[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]]), (6, 1, 1))
    s = kdv_scores(keys)
    np.testing.assert_allclose(s, -1.0, atol=1e-12)
    assert len(set(s.tolist())) == 1  # exactly equal -> a true tie
    assert select_tokens(s, ratio=0.5).tolist() == [0, 1, 2]
    assert select_tokens(s, ratio=0.8).tolist() == [0]
    # everything is pruned by the angle rule -> the single best (lowest index on ties) survives
    assert select_tokens(s, tau=math.pi / 4).tolist() == [0]


def test_zero_keys():
    assert kdv_scores(np.zeros((4, 2, 3))).tolist() == [0.0] * 4
    keys = np.ones((3, 1, 2))
    keys[1] = 0.0
    s = kdv_scores(keys)
    np.testing.assert_allclose(s, [-1.0, 0.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(s, oracle_scores(keys), atol=1e-12)


def test_zero_anchor_gives_cosine_zero():
    keys = np.array([[[1.0, 2.0]], [[-1.0, -2.0]]])
    assert kdv_scores(keys).tolist() == [0.0, 0.0]


def test_single_token():
    assert kdv_scores(np.array([[[3.0, 4.0], [0.0, 1.0]]])).tolist() == pytest.approx([-1.0])
    assert select_tokens(np.array([-1.0]), ratio=0.9).tolist() == [0]
    assert select_tokens(np.array([-1.0])).tolist() == [0]


def test_hand_computed_two_tokens_one_head():
    # unit keys (1,0) and (0,-1): the anchor bisects them, cos = cos(45 deg) for both.
    keys = np.array([[[3.0, 0.0]], [[0.0, -2.0]]])
    s = kdv_scores(keys)
    np.testing.assert_allclose(s, [-math.sqrt(0.5)] * 2, atol=1e-15)
    np.testing.assert_allclose(angle_to_anchor(s), [math.pi / 4] * 2, atol=1e-7)
    assert select_tokens(s, tau=math.pi / 5).tolist() == [0, 1]  # 45 deg > 36 deg: kept
    assert len(select_tokens(s, tau=math.pi / 3)) == 1  # 45 deg < 60 deg: all pruned -> 1 kept


def test_hand_computed_three_tokens_one_head():
    # units (1,0),(1,0),(0,1) -> anchor (2,1)/sqrt5 -> cos 2/sqrt5, 2/sqrt5, 1/sqrt5
    keys = np.array([[[1.0, 0.0]], [[5.0, 0.0]], [[0.0, 0.5]]])
    s = kdv_scores(keys)
    c1, c2 = 2 / math.sqrt(5), 1 / math.sqrt(5)
    np.testing.assert_allclose(s, [-c1, -c1, -c2], atol=1e-15)
    assert select_tokens(s, tau=math.pi / 4).tolist() == [2]
    assert select_tokens(s).tolist() == [2]  # default tau = pi/4
    assert select_tokens(s, ratio=0.5).tolist() == [2]
    assert select_tokens(s, ratio=0.3).tolist() == [0, 2]  # tie 0/1 -> lower index
    assert select_tokens(s, tau=0.2).tolist() == [0, 1, 2]


def test_scale_invariance():
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(20, 3, 5))
    scale = rng.uniform(1e-3, 1e3, size=(20, 3, 1))
    np.testing.assert_allclose(kdv_scores(keys), kdv_scores(keys * scale), atol=1e-12)


def test_extreme_magnitudes_no_overflow():
    keys = np.array([[[1e300, 1e300]], [[1e-300, 0.0]], [[5e-324, 5e-324]]])
    s = kdv_scores(keys)
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s, kdv_scores(np.array([[[1.0, 1.0]], [[1.0, 0.0]], [[1.0, 1.0]]])), atol=1e-12)


def test_ratio_zero_keeps_all():
    s = np.random.default_rng(0).normal(size=33)
    assert select_tokens(s, ratio=0.0).tolist() == list(range(33))


@pytest.mark.parametrize("n", list(range(1, 60)) + [577, 1296])
def test_exact_kept_counts(n):
    s = np.random.default_rng(n).normal(size=n)
    for k in range(20):
        ratio = k / 20
        want = max(1, math.floor((1 - Fraction(k, 20)) * n))
        assert len(select_tokens(s, ratio=ratio)) == want == n_keep_for_ratio(n, ratio)
    for ratio in [0.1, 0.3, 0.7, 0.9, 0.33, 0.66, 0.999]:
        want = max(1, math.floor((1 - Fraction(repr(ratio))) * n))
        assert len(select_tokens(s, ratio=ratio)) == want


def test_adaptive_threshold_semantics():
    tau = 1.0
    thr = -math.cos(tau)
    s = np.array([thr - 1e-9, thr, thr + 1e-9, 0.5, -0.9])
    assert select_tokens(s, tau=tau).tolist() == [1, 2, 3]  # strict "<" prunes, equality keeps


def test_ties_exact():
    s = np.array([0.1, 0.5, 0.1, 0.5, 0.1, -0.2, 0.5])
    # n_keep = floor(0.5 * 7) = 3: the three 0.5s
    assert select_tokens(s, ratio=0.5).tolist() == [1, 3, 6]
    # n_keep = floor(0.6 * 7) = 4: three 0.5s + lowest-index 0.1
    assert select_tokens(s, ratio=0.4).tolist() == [0, 1, 3, 6]
    # n_keep = floor(0.8 * 7) = 5: three 0.5s + two lowest-index 0.1s
    assert select_tokens(s, ratio=0.2).tolist() == [0, 1, 2, 3, 6]
    assert select_tokens(-np.zeros(3), ratio=0.5).tolist() == [0]
    assert select_tokens(np.array([0.0, -0.0, 0.0]), ratio=0.5).tolist() == [0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": True}, "ratio"),
        ({"ratio": "0.5"}, "ratio"),
        ({"tau": 0.0}, "tau"),
        ({"tau": math.pi}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": float("inf")}, "tau"),
        ({"ratio": 0.5, "tau": 1.0}, "ratio and tau"),
    ],
)
def test_invalid_selection_args(kwargs, name):
    with pytest.raises(InvalidArgumentError, match=name):
        select_tokens(np.zeros(4), **kwargs)
    with pytest.raises(InvalidArgumentError, match=name):
        prune(np.ones((4, 1, 2)), **kwargs)


@pytest.mark.parametrize(
    "scores",
    [np.zeros((2, 2)), np.zeros(0), np.array([0.0, np.nan]), np.array([np.inf]), 3.0, [["a"]]],
)
def test_invalid_scores(scores):
    with pytest.raises(InvalidArgumentError, match="scores"):
        select_tokens(scores)


@pytest.mark.parametrize(
    "keys",
    [
        np.zeros((3, 4)),
        np.zeros((2, 3, 4, 5)),
        np.zeros((0, 2, 4)),
        np.zeros((3, 0, 4)),
        np.zeros((3, 2, 0)),
        np.array([[[1.0, np.nan]]]),
        np.array([[[np.inf, 1.0]]]),
    ],
)
def test_invalid_keys(keys):
    with pytest.raises(InvalidArgumentError, match="keys"):
        kdv_scores(keys)
    with pytest.raises(ValueError):  # InvalidArgumentError is also a ValueError
        kdv_scores(keys)


def test_prune_and_selection_record():
    rng = np.random.default_rng(5)
    keys = rng.normal(size=(50, 2, 8))
    sel = prune(keys, ratio=0.6)
    assert isinstance(sel, KDVSelection)
    assert sel.mode == "ratio" and sel.param == 0.6
    assert sel.n_total == 50 and sel.n_kept == 20 == len(sel.kept)
    assert sel.kept_fraction == pytest.approx(0.4)
    scores = kdv_scores(keys)
    assert sel.threshold == scores[sel.kept].min()
    assert np.all(scores[np.setdiff1d(np.arange(50), sel.kept)] <= sel.threshold)
    d = sel.to_dict()
    assert d["kept"] == sel.kept.tolist() and all(type(i) is int for i in d["kept"])
    summ = d["score_summary"]
    assert summ["min"] <= summ["q10"] <= summ["q50"] <= summ["q90"] <= summ["max"]
    assert summ["mean"] == pytest.approx(scores.mean())

    sel_t = prune(keys)
    assert sel_t.mode == "tau" and sel_t.param == DEFAULT_TAU
    assert sel_t.threshold == pytest.approx(-math.cos(math.pi / 4))
    assert sel_t.kept.tolist() == select_tokens(scores, tau=math.pi / 4).tolist()
    import json

    json.dumps(sel_t.to_dict())


def test_angle_to_anchor():
    s = np.array([-1.0, 0.0, 1.0, -1.0 - 1e-15])
    np.testing.assert_allclose(angle_to_anchor(s), [0.0, math.pi / 2, math.pi, 0.0])


# --------------------------------------------------------------------------- #
# Qwen2.5-VL merge / window order
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gw, gh, m", [(4, 4, 2), (6, 2, 2), (10, 6, 2), (9, 3, 3), (5, 7, 1), (2, 2, 2)])
def test_merge_groups_matches_loop(gw, gh, m):
    x = np.random.default_rng(gw * gh).normal(size=(gw * gh, 3, 4))
    got = merge_groups(x, gw, gh, m)
    assert got.shape == (gw * gh // (m * m), 3, 4)
    np.testing.assert_allclose(got, oracle_merge(x, gw, gh, m), atol=1e-14)


def test_merge_groups_hand_example():
    # 4x2 patch grid, merge 2 -> 2 tokens: left block {0,1,4,5}, right block {2,3,6,7}
    x = np.arange(8, dtype=float)
    assert merge_groups(x, 4, 2, 2).tolist() == [2.5, 4.5]


@pytest.mark.parametrize(
    "args, name",
    [
        ((np.zeros((8, 1)), 3, 3, 2), "grid_w"),
        ((np.zeros((12, 1)), 4, 3, 2), "grid_h"),
        ((np.zeros((7, 1)), 4, 2, 2), "keys_per_patch"),
        ((np.zeros((8, 1)), 4, 2, 0), "merge"),
        ((np.zeros((8, 1)), 4.0, 2, 2), "grid_w"),
    ],
)
def test_merge_groups_invalid(args, name):
    with pytest.raises(InvalidArgumentError, match=name):
        merge_groups(*args)


def test_window_index_hand_example_square():
    # 8x8 patches, merge 2 -> 4x4 merged grid, window 4 patches = 2x2 merged cells.
    # Merged cells (row-major):   windows (row-major), cells row-major inside each:
    #   0  1 |  2  3              W0 = {0,1,4,5}   -> slots 0..3
    #   4  5 |  6  7              W1 = {2,3,6,7}   -> slots 4..7
    #  ------+------              W2 = {8,9,12,13} -> slots 8..11
    #   8  9 | 10 11              W3 = {10,11,14,15} -> slots 12..15
    #  12 13 | 14 15
    idx = qwen25vl_window_index(8, 8, 2, 4)
    assert idx.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert qwen25vl_inv_window_index(8, 8, 2, 4).tolist() == [
        0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15
    ]


def test_window_index_hand_example_not_an_involution():
    # 6x2 merged grid, 2x2-cell windows: W0={0,1,6,7}, W1={2,3,8,9}, W2={4,5,10,11}
    idx = qwen25vl_window_index(12, 4, 2, 4)
    inv = qwen25vl_inv_window_index(12, 4, 2, 4)
    assert idx.tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]  # idx[src] = dst
    assert inv.tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]  # inv[dst] = src
    # window-grouped rows (as llama.cpp's ViT holds them) back to row-major
    raster = np.arange(12) * 10
    window_rows = raster[inv]  # ggml_get_rows(inpL, inv_window_idx)
    assert window_rows.tolist() == [0, 10, 60, 70, 20, 30, 80, 90, 40, 50, 100, 110]
    assert undo_window_order(window_rows, idx).tolist() == raster.tolist()
    assert apply_window_order(raster, idx).tolist() == window_rows.tolist()


def test_window_index_partial_windows_hand_example():
    # 3x3 merged grid, windows of 2x2 cells: W0={0,1,3,4}, W1={2,5}, W2={6,7}, W3={8}
    idx = qwen25vl_window_index(6, 6, 2, 4)
    assert idx.tolist() == [0, 1, 4, 2, 3, 5, 6, 7, 8]


@pytest.mark.parametrize(
    "gw, gh, m, wp",
    [(8, 8, 2, 4), (12, 4, 2, 4), (6, 6, 2, 4), (20, 14, 2, 8), (34, 22, 2, 8), (2, 2, 2, 8),
     (64, 40, 2, 8), (30, 18, 2, 6), (9, 6, 3, 6), (7, 5, 1, 3), (16, 16, 2, 2)],
)
def test_window_index_matches_clip_cpp(gw, gh, m, wp):
    idx, inv = clip_cpp_window_idx(gw, gh, m, wp)
    assert qwen25vl_window_index(gw, gh, m, wp).tolist() == idx
    assert qwen25vl_inv_window_index(gw, gh, m, wp).tolist() == inv
    x = np.random.default_rng(1).normal(size=(len(idx), 2))
    np.testing.assert_array_equal(undo_window_order(apply_window_order(x, idx), idx), x)
    # out[inv[i]] = x[i] is the same mapping as out = x[idx]
    out = np.empty_like(x)
    out[np.array(inv)] = x
    np.testing.assert_array_equal(undo_window_order(x, idx), out)


def test_window_index_invalid():
    with pytest.raises(InvalidArgumentError, match="window_size_patches"):
        qwen25vl_window_index(8, 8, 2, 1)
    with pytest.raises(InvalidArgumentError, match="grid_w"):
        qwen25vl_window_index(7, 8, 2, 8)
    with pytest.raises(InvalidArgumentError, match="window_index"):
        undo_window_order(np.zeros(3), np.array([0, 0, 1]))
    with pytest.raises(InvalidArgumentError, match="x must have"):
        undo_window_order(np.zeros(4), np.array([0, 2, 1]))
    with pytest.raises(InvalidArgumentError, match="window_index"):
        undo_window_order(np.zeros(2), np.array([0.0, 1.0]))


def _llamacpp_vit_rows(raster: np.ndarray, gw: int, gh: int, window_patches=None) -> np.ndarray:
    """Emulate clip_graph_qwen2vl::build: 2x2 blocks as 4 consecutive rows, then window grouping."""
    rows = []
    for by in range(gh // 2):
        for bx in range(gw // 2):
            for dy in range(2):
                for dx in range(2):
                    rows.append(raster[(2 * by + dy) * gw + (2 * bx + dx)])
    rows = np.array(rows)
    if window_patches is None:
        return rows
    _, inv = clip_cpp_window_idx(gw, gh, 2, window_patches)
    blocks = rows.reshape((len(inv), 4) + rows.shape[1:])
    return blocks[np.array(inv)].reshape(rows.shape)  # ggml_get_rows(inpL, inv_window_idx)


@pytest.mark.parametrize("gw, gh, wp", [(8, 8, 4), (12, 4, 4), (20, 14, 8), (6, 10, None)])
def test_vit_keys_to_token_keys_matches_row_major_merge(gw, gh, wp):
    raster = np.random.default_rng(7).normal(size=(gw * gh, 2, 3))
    vit_rows = _llamacpp_vit_rows(raster, gw, gh, wp)
    got = vit_keys_to_token_keys(vit_rows, gw, gh, 2, window_size_patches=wp)
    np.testing.assert_allclose(got, merge_groups(raster, gw, gh, 2), atol=1e-14)
    np.testing.assert_allclose(
        merge_consecutive(vit_rows, 2), apply_window_order(got, qwen25vl_window_index(gw, gh, 2, wp))
        if wp else got, atol=1e-14,
    )


# --------------------------------------------------------------------------- #
# property tests
# --------------------------------------------------------------------------- #

score_arrays = hnp.arrays(
    np.float64,
    st.integers(1, 60),
    elements=st.one_of(st.floats(-1, 1), st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0])),
)
ratios = st.floats(0.0, 1.0, exclude_max=True)
taus = st.floats(1e-6, math.pi - 1e-6)


def _valid(kept: np.ndarray, n: int) -> None:
    assert kept.dtype == np.int64 and kept.ndim == 1
    assert kept.size >= 1
    assert np.all(np.diff(kept) > 0)  # ascending and unique
    assert kept[0] >= 0 and kept[-1] < n


@settings(max_examples=200, deadline=None)
@given(score_arrays, ratios, taus)
def test_selection_well_formed(s, ratio, tau):
    _valid(select_tokens(s, ratio=ratio), s.size)
    _valid(select_tokens(s, tau=tau), s.size)
    _valid(select_tokens(s), s.size)
    # Arbitrary binary ratios: n_keep may round up by one where (1 - ratio) * N is within
    # 1e-9 below an integer (the documented float tolerance); the ranking is the oracle's.
    kept = select_tokens(s, ratio=ratio).tolist()
    exact = max(1, math.floor((1 - Fraction(ratio)) * s.size))
    assert len(kept) in (exact, min(s.size, exact + 1))
    ranked = sorted(range(s.size), key=lambda i: (-s[i], i))
    assert kept == sorted(ranked[: len(kept)])
    assert select_tokens(s, tau=tau).tolist() == oracle_select_tau(s.tolist(), tau)


@settings(max_examples=200, deadline=None)
@given(score_arrays, st.integers(0, 999))
def test_selection_matches_oracle_decimal_ratios(s, k):
    ratio = k / 1000
    assert select_tokens(s, ratio=ratio).tolist() == oracle_select_ratio(s.tolist(), ratio)


@settings(max_examples=200, deadline=None)
@given(score_arrays, ratios, ratios)
def test_kept_count_monotone_in_ratio(s, r1, r2):
    lo, hi = min(r1, r2), max(r1, r2)
    k_lo, k_hi = select_tokens(s, ratio=lo), select_tokens(s, ratio=hi)
    assert k_lo.size >= k_hi.size
    assert set(k_hi.tolist()) <= set(k_lo.tolist())  # nested by the stable ranking


@settings(max_examples=200, deadline=None)
@given(score_arrays, taus, taus)
def test_adaptive_nested_in_tau(s, t1, t2):
    # A larger tau widens the pruned cone (score < -cos(tau)), so it keeps a subset.
    lo, hi = min(t1, t2), max(t1, t2)
    k_lo, k_hi = set(select_tokens(s, tau=lo).tolist()), set(select_tokens(s, tau=hi).tolist())
    assert k_hi <= k_lo


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6),
        elements=st.one_of(st.just(0.0), st.floats(1e-3, 100), st.floats(-100, -1e-3)),
    )
)
def test_scores_property_vs_oracle(keys):
    got = kdv_scores(keys)
    np.testing.assert_allclose(got, oracle_scores(keys), atol=1e-9)
    assert np.all(np.abs(got) <= 1.0)


def test_random_subset_is_seeded_per_image_and_sorted():
    from avis_llamacpp.kdv import random_subset

    a = random_subset(100, 25, seed=3, image_index=0)
    assert a.dtype == np.int64 and len(a) == 25 and len(set(a.tolist())) == 25 and list(a) == sorted(a)
    assert np.array_equal(a, random_subset(100, 25, seed=3, image_index=0))
    assert not np.array_equal(a, random_subset(100, 25, seed=3, image_index=1))
    assert not np.array_equal(a, random_subset(100, 25, seed=4, image_index=0))
    # hand oracle: the same generator the docstring names
    rng = np.random.default_rng([3, 0])
    assert np.array_equal(a, np.sort(rng.choice(100, size=25, replace=False)))
    with pytest.raises(InvalidArgumentError):
        random_subset(10, 11, seed=0)


def test_uniform_subset_by_hand():
    from avis_llamacpp.kdv import uniform_subset

    assert uniform_subset(10, 5).tolist() == [0, 2, 4, 6, 8]
    assert uniform_subset(10, 3).tolist() == [0, 3, 6]
    assert uniform_subset(7, 7).tolist() == list(range(7))
    assert uniform_subset(7, 0).tolist() == []
    with pytest.raises(InvalidArgumentError):
        uniform_subset(3, 4)
