"""The `idefics3` family (SmolVLM / Idefics3 `idefics3`, LFM2-VL `lfm2`) on tiny random-weight pairs
(convert/fixture_idefics3.py): captured keys against an independent numpy SigLIP (tests/reference_idefics3.py)
including lfm2's resized position table on non-square grids, tiles + overview chunks, KDV through VLM.ask, stock
llama-cpp-python parity with nothing pruned, 1-D positions after pruning, flash attention on / off."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM
from avis_llamacpp.capture import read_vision_info
from avis_llamacpp.families import ChunkGeometry, Idefics3Family, VisionInfo, family_for
from avis_llamacpp.images import load_image
from avis_llamacpp.preflight import scan_gguf
from convert.fixtures import make_fixture
from tests.family_helpers import Q, check_pruned_positions, check_unpruned_equals_stock, noise, open_vlm
from tests.reference_idefics3 import merge_rows, siglip_forward

N_CTX = 1024
KEY_NAME = "Kcur-2"  # 3 SigLIP blocks, all run; no RoPE, no class token


@pytest.fixture(scope="module", params=["idefics3", "lfm2"])
def fx(request, fixture_root):
    return make_fixture(request.param, out_dir=fixture_root)


@pytest.fixture(scope="module")
def vlm(fx):
    with open_vlm(fx, n_ctx=N_CTX, flash_attn=False) as v:
        yield v


def _encode_all(v: VLM, img: np.ndarray) -> list[tuple]:
    """Every chunk of one image: (chunk, raw captured keys, token keys, key source, embeddings, encoder wh)."""
    out = []
    with v.projector.tokenize(v.render_question("q", 1), [load_image(Image.fromarray(img))]) as p:
        for c in p.images:
            e = v.projector.encode(c)
            tk, src = v.scored_keys(c, e)
            assert tk.scored.tolist() == list(range(c.n_tokens))
            out.append((c, v.key_capture.keys.copy(), tk.keys, src, e, v.key_capture.image_wh))
    return out


def _loop_token_keys(rows: np.ndarray, width: int, height: int, s: int) -> np.ndarray:
    """Patch-row keys -> one key per token: mean over the token's real (unpadded) patches."""
    return np.stack([rows[[r for r in tok if r >= 0]].mean(axis=0) for tok in merge_rows(width, height, s)])


def _close(got: np.ndarray, want: np.ndarray, atol: float = 3e-4, median: float = 1e-5) -> None:
    # ggml's f16 GELU table flips a handful of values by one f16 step; the bulk of the keys agrees to ~1e-6
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol * scale)
    assert np.median(np.abs(got - want)) < median * scale


# -- the mapping alone ------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,h,s", [(16, 16, 4), (24, 16, 2), (5, 3, 2), (7, 7, 3), (9, 4, 4)])
def test_merge_groups_equal_a_simple_loop_with_padding(w, h, s):
    assert Idefics3Family.merge_groups(w, h, s).tolist() == merge_rows(w, h, s)


def test_token_keys_average_real_patches_only():
    fam = family_for("lfm2")
    assert fam is family_for("idefics3") and fam.native
    vi = VisionInfo("lfm2", patch_size=8, n_wa_pattern=0, window_size=0, spatial_merge=2, n_layer=3, n_embd=64,
                    image_size=128, scale_factor=2)
    rows = np.random.default_rng(0).standard_normal((5 * 3, 4, 8))
    geom = ChunkGeometry(3 * 2, 6, 1, (40, 24))  # 5 x 3 patches -> padded to 6 x 4 -> 3 x 2 tokens
    tk = fam.token_keys(rows, geom, vi)
    np.testing.assert_allclose(tk.keys, _loop_token_keys(rows, 5, 3, 2))
    assert fam.token_grid(geom, vi) == (3, 2) and tk.always_kept.size == 0
    assert fam.token_keys(rows, ChunkGeometry(5, 5, 1, (40, 24)), vi) is None
    assert fam.token_keys(rows, ChunkGeometry(6, 6, 1, None), vi) is None  # 15 rows, size unknown: no grid
    sq = np.random.default_rng(1).standard_normal((256, 4, 8))
    tk = fam.token_keys(sq, ChunkGeometry(64, 64, 1, None), vi)  # square input: sqrt of the row count
    np.testing.assert_allclose(tk.keys, _loop_token_keys(sq, 16, 16, 2))
    assert fam.n_patches(64, vi) == 256 and fam.blocks_run(vi) == 3


def test_registry_preflight_and_vision_info(fx):
    fam = family_for(fx.family)
    assert isinstance(fam, Idefics3Family)
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.dims.n_embd
    assert [n for n in fam.required_for(hdr.tensors) if n not in hdr.tensors] == []
    vi = read_vision_info(fx.mmproj)
    assert (vi.projector_type, vi.scale_factor) == (fx.family, fx.dims.scale_factor)


# -- (a) captured keys == numpy reference ---------------------------------------------------------------
def _sizes(fx) -> list[tuple[int, int]]:
    # idefics3: one tile + an overview, both exact copies; lfm2: dynamic sizes within its 64..256 token limits,
    # aligned to patch * s so mtmd feeds them unchanged (16 x 16 patches: no resize; 24 x 16 and 16 x 28 grow
    # the position table, 12 x 38 shrinks one axis)
    return [(128, 128)] if fx.family == "idefics3" else [(128, 128), (192, 128), (128, 224), (96, 304)]


def test_captured_keys_equal_numpy_reference(vlm, fx):
    for w, h in _sizes(fx):
        img = noise(w, h, seed=w + h)
        chunks = _encode_all(vlm, img)
        assert len(chunks) == (2 if fx.family == "idefics3" else 1)
        ref = siglip_forward(fx.mmproj, img)
        gw, gh = ref["grid"]
        for chunk, raw, got, src, emb, wh in chunks:
            assert src == f"vit_keys:{KEY_NAME}" and wh == (w, h)
            _close(raw, ref["keys"][-1])
            _close(got, _loop_token_keys(ref["keys"][-1], gw, gh, ref["scale"]))
            _close(emb, ref["embeddings"], atol=1e-3, median=1e-4)  # the projector output pins the patch -> token rule
            assert vlm.token_grid(chunk) == (gw // ref["scale"], gh // ref["scale"]) and chunk.ny == 1


# -- (e) non-square: tiles + overview (idefics3), one non-square chunk (lfm2) ----------------------------
def test_non_square_image(vlm, fx):
    if fx.family == "lfm2":  # a dynamic-size chunk: 432 x 144 px -> 54 x 18 patches -> 27 x 9 tokens
        a = vlm.ask(Image.fromarray(noise(600, 200, seed=8)), Q, max_tokens=2, ratio=0.5)
        assert a.image_tokens == [243] and a.images[0]["grid"] == [27, 9]
        assert a.images[0]["key_source"] == f"vit_keys:{KEY_NAME}"
        return
    img = noise(256, 128, seed=5)
    chunks = _encode_all(vlm, img)
    assert len(chunks) == 3  # tiles row-major, then the overview
    tiles = [img[:, :128], img[:, 128:]]  # the refined image is exactly 2 x 1 tiles: crops, no resize
    for (chunk, raw, got, src, emb, wh), tile in zip(chunks, tiles):
        ref = siglip_forward(fx.mmproj, tile)
        assert src == f"vit_keys:{KEY_NAME}" and vlm.token_grid(chunk) == (4, 4)
        _close(got, _loop_token_keys(ref["keys"][-1], 16, 16, 4))
        _close(emb, ref["embeddings"], atol=1e-3, median=1e-4)
    assert chunks[2][3].startswith("vit_keys:") and not np.allclose(chunks[2][2], chunks[0][2])
    a = vlm.ask(Image.fromarray(img), Q, max_tokens=2, ratio=0.5)
    assert a.image_tokens == [16, 16, 16] and a.kept_tokens == [8, 8, 8]


# -- (b) KDV through ask -----------------------------------------------------------------------------------
def test_ask_with_tau_and_ratio_scores_vit_keys(vlm):
    img = Image.fromarray(noise(128, 128, seed=2))
    a = vlm.ask(img, Q, max_tokens=4, tau=math.pi / 4)
    assert all(im["key_source"].startswith("vit_keys:") for im in a.images)
    assert all(1 <= k <= n for k, n in zip(a.kept_tokens, a.image_tokens))
    b = vlm.ask(img, Q, max_tokens=4, ratio=0.5)
    assert all(im["key_source"] == f"vit_keys:{KEY_NAME}" for im in b.images)
    assert b.kept_tokens == [n // 2 for n in b.image_tokens]


# -- (c) stock parity ----------------------------------------------------------------------------------------
def test_unpruned_answer_equals_stock_mtmd_chat_handler(vlm, fx, tmp_path):
    img = noise(256, 128, seed=9) if fx.family == "idefics3" else noise(192, 128, seed=9)
    check_unpruned_equals_stock(vlm, fx, img, tmp_path / f"{fx.family}.png", N_CTX)


# -- (d) positions after pruning (llama text: 1-D RoPE) ----------------------------------------------------
def test_pruned_prefill_uses_consecutive_positions(vlm, fx, monkeypatch):
    # the special tokens around and between the chunks (<fake_token_around_image>, <row_i_col_j>, <global-img>,
    # <|image_start|>, ...) are text: decoded in full either way
    img = Image.fromarray(noise(256, 128, seed=4) if fx.family == "idefics3" else noise(192, 128, seed=4))
    full, half, _ = check_pruned_positions(vlm, img, monkeypatch)
    assert [im.n_kept for im in half.images] == [im.n_tokens // 2 for im in full.images]


# -- (f) flash attention on / off ------------------------------------------------------------------------
def test_kept_sets_equal_with_flash_attention_on_and_off(vlm, fx):
    img = Image.fromarray(noise(256, 128, seed=6) if fx.family == "idefics3" else noise(96, 304, seed=6))
    off = [vlm.ask(img, Q, max_tokens=1, ratio=0.5), vlm.ask(img, Q, max_tokens=1, tau=math.pi / 4)]
    with open_vlm(fx, n_ctx=N_CTX, flash_attn=True) as v_on:
        on = [v_on.ask(img, Q, max_tokens=1, ratio=0.5), v_on.ask(img, Q, max_tokens=1, tau=math.pi / 4)]
        assert v_on.key_capture.name == KEY_NAME
    for a, b in zip(off, on):
        assert all(im["key_source"] == f"vit_keys:{KEY_NAME}" for im in a.images + b.images)
        assert [im["kept"] for im in a.images] == [im["kept"] for im in b.images]
