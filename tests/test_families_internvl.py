"""The `internvl` family (InternVL 2.5 / 3 / 3.5) on a tiny random-weight pair (convert/fixture_internvl.py):
captured keys against an independent numpy encoder (tests/reference_internvl.py), tiles + thumbnail chunks,
KDV through VLM.ask, stock llama-cpp-python parity with nothing pruned, 1-D positions after pruning, and
flash attention on / off."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM
from avis_llamacpp.capture import read_vision_info
from avis_llamacpp.families import ChunkGeometry, InternVLFamily, VisionInfo, family_for
from avis_llamacpp.images import load_image
from avis_llamacpp.preflight import scan_gguf
from convert.fixtures import make_fixture
from tests.family_helpers import Q, check_pruned_positions, check_unpruned_equals_stock, noise, open_vlm
from tests.reference_internvl import internvl_forward, shuffle_rows

N_CTX = 1024
KEY_NAME = "Kcur-2"  # the fixture's ViT has 3 blocks: the last block's keys (no RoPE in InternViT)


@pytest.fixture(scope="module")
def fx(fixture_root):
    return make_fixture("internvl", out_dir=fixture_root)


@pytest.fixture(scope="module")
def vlm(fx):
    with open_vlm(fx, n_ctx=N_CTX, flash_attn=False) as v:
        yield v


def _encode_all(v: VLM, img: np.ndarray) -> list[tuple[object, np.ndarray, np.ndarray, str, np.ndarray]]:
    """Encode every chunk of one image: (chunk, raw captured keys, token keys, key source, embeddings)."""
    out = []
    with v.projector.tokenize(v.render_question("q", 1), [load_image(Image.fromarray(img))]) as p:
        for c in p.images:
            e = v.projector.encode(c)
            tk, src = v.scored_keys(c, e)
            assert tk.scored.tolist() == list(range(c.n_tokens))  # every internvl image token is scored
            out.append((c, v.key_capture.keys.copy(), tk.keys, src, e))
    return out


def _loop_token_keys(rows: np.ndarray, grid: int, s: int) -> np.ndarray:
    """Patch-row keys (class row last) -> one key per LLM token: mean over each token's s x s patches."""
    return np.stack([rows[r].mean(axis=0) for r in shuffle_rows(grid, s)])


def _close(got: np.ndarray, want: np.ndarray, atol: float = 2e-4) -> None:
    # ggml's f16 GELU table flips a handful of values by one f16 step; the bulk agrees to ~1e-6
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol * scale)
    assert np.median(np.abs(got - want)) < 1e-5 * scale


# -- the mapping alone (no model) ------------------------------------------------------------------------
@pytest.mark.parametrize("grid,s", [(16, 2), (32, 2), (8, 4), (6, 1)])
def test_shuffle_groups_equal_a_simple_loop(grid, s):
    got = InternVLFamily.shuffle_groups(grid, grid, s)
    assert got.tolist() == shuffle_rows(grid, s)


def test_token_keys_drop_the_class_row_and_check_counts():
    fam = family_for("internvl")
    vi = VisionInfo("internvl", patch_size=14, n_wa_pattern=0, window_size=0, spatial_merge=2, n_layer=3,
                    n_embd=64, image_size=224, scale_factor=2)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((16 * 16 + 1, 4, 8))
    rows[-1] = 1e6  # the class token must not reach any token
    for wh in ((224, 224), None):
        tk = fam.token_keys(rows, ChunkGeometry(64, 64, 1, wh), vi)
        assert tk is not None and tk.n_tokens == 64 and tk.always_kept.size == 0
        np.testing.assert_allclose(tk.keys, _loop_token_keys(rows, 16, 2))
        assert fam.token_grid(ChunkGeometry(64, 64, 1, wh), vi) == (8, 8)
    assert fam.token_keys(rows[:-1], ChunkGeometry(64, 64, 1, (224, 224)), vi) is None  # no class row
    assert fam.token_keys(rows, ChunkGeometry(63, 63, 1, None), vi) is None
    assert fam.n_patches(64, vi) == 257 and fam.blocks_run(vi) == 3
    # no scale factor in the GGUF: clip.cpp's n_merge stays 1 (one token per patch)
    vi1 = VisionInfo("internvl", 14, 0, 0, 2, n_layer=3, n_embd=64, image_size=224, scale_factor=0)
    tk = fam.token_keys(rows, ChunkGeometry(256, 256, 1, (224, 224)), vi1)
    np.testing.assert_allclose(tk.keys, rows[:-1])


def test_registry_preflight_and_vision_info(fx):
    fam = family_for("internvl")
    assert isinstance(fam, InternVLFamily) and fam.native
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.dims.n_embd
    assert [n for n in fam.required_for(hdr.tensors) if n not in hdr.tensors] == []
    vi = read_vision_info(fx.mmproj)
    assert (vi.projector_type, vi.scale_factor, vi.image_size, vi.patch_size) == ("internvl", 2, 224, 14)


# -- (a) captured keys == numpy reference ---------------------------------------------------------------
def test_captured_keys_equal_numpy_reference(vlm, fx):
    """The keys KDV scores are the last ViT block's keys (class token appended last, dropped before the
    2x2 shuffle), recomputed in numpy from the mmproj weights and mapped to tokens by a plain loop; the
    projected embeddings agree too, which pins the patch -> token rule to the graph's own output."""
    img = noise(224, 224, seed=11)
    (chunk, raw, got, src, emb), = _encode_all(vlm, img)
    assert src == f"vit_keys:{KEY_NAME}" and vlm.key_capture.name == KEY_NAME
    ref = internvl_forward(fx.mmproj, img)
    last = ref["keys"][-1]
    assert raw.shape == last.shape == (257, fx.dims.v_head, fx.dims.v_embd // fx.dims.v_head)
    _close(raw, last)
    _close(got, _loop_token_keys(last, ref["grid"], ref["scale"]))
    _close(emb, ref["embeddings"], atol=1e-3)  # after one more GELU table
    assert vlm.token_grid(chunk) == (8, 8) and (chunk.nx, chunk.ny) == (64, 1)


# -- (e) non-square image: tiles + thumbnail, each mapped on its own -------------------------------------
@pytest.mark.parametrize("w,h", [(448, 224), (224, 448)])
def test_tiles_are_mapped_chunk_by_chunk(vlm, fx, w, h):
    img = noise(w, h, seed=5)
    chunks = _encode_all(vlm, img)
    assert len(chunks) == fx.chunks(w, h) == 3  # two tiles (row-major), then the thumbnail
    s = fx.dims.image_size
    tiles = [img[y:y + s, x:x + s] for y in range(0, h, s) for x in range(0, w, s)]
    for (chunk, raw, got, src, emb), tile in zip(chunks, tiles):
        assert src == f"vit_keys:{KEY_NAME}" and vlm.token_grid(chunk) == (8, 8)
        ref = internvl_forward(fx.mmproj, tile)  # the refined image is exactly 2 tiles: crops, no resize
        _close(got, _loop_token_keys(ref["keys"][-1], ref["grid"], ref["scale"]))
        _close(emb, ref["embeddings"], atol=1e-3)  # after one more GELU table
    thumb = chunks[-1]
    assert thumb[3].startswith("vit_keys:") and thumb[2].shape == chunks[0][2].shape
    assert not np.allclose(thumb[2], chunks[0][2])
    a = vlm.ask(Image.fromarray(img), Q, max_tokens=2, ratio=0.5)
    assert a.image_tokens == [64, 64, 64] and a.kept_tokens == [32, 32, 32]
    assert all(im["grid"] == [8, 8] for im in a.images)


# -- (b) KDV through ask -----------------------------------------------------------------------------------
def test_ask_with_tau_and_ratio_scores_vit_keys(vlm):
    img = Image.fromarray(noise(224, 224, seed=2))
    a = vlm.ask(img, Q, max_tokens=4, tau=math.pi / 4)
    assert a.images[0]["key_source"].startswith("vit_keys:")
    assert a.images[0]["kdv"]["mode"] == "tau" and 1 <= a.kept_tokens[0] <= a.image_tokens[0] == 64
    b = vlm.ask(img, Q, max_tokens=4, ratio=0.5)
    assert b.images[0]["key_source"] == f"vit_keys:{KEY_NAME}"
    assert b.kept_tokens == [32] and b.images[0]["always_kept"] == 0


# -- (c) stock parity ----------------------------------------------------------------------------------------
def test_unpruned_answer_equals_stock_mtmd_chat_handler(vlm, fx, tmp_path):
    """Nothing pruned, K=1, greedy, flash attention off on both sides: the same tokens as llama-cpp-python's
    MTMDChatHandler (there is no InternVL-specific stock handler), on an image that tiles (3 chunks)."""
    check_unpruned_equals_stock(vlm, fx, noise(448, 224, seed=9), tmp_path / "tiles.png", N_CTX)


# -- (d) positions after pruning (qwen2 text: 1-D RoPE) ----------------------------------------------------
def test_pruned_prefill_uses_consecutive_positions(vlm, monkeypatch):
    # the text around the tiles ("<img>", "</img>", the question) is decoded in full either way
    full, half, half_calls = check_pruned_positions(vlm, Image.fromarray(noise(448, 224, seed=4)), monkeypatch)
    assert [im.n_kept for im in half.images] == [32, 32, 32] and full.n_past - half.n_past == 96
    assert [len(ps) for k, ps in half_calls if k == "image"] == [32, 32, 32]


# -- (f) flash attention on / off ------------------------------------------------------------------------
def test_kept_sets_equal_with_flash_attention_on_and_off(vlm, fx):
    img = Image.fromarray(noise(448, 224, seed=6))
    off_r = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    off_t = vlm.ask(img, Q, max_tokens=1, tau=math.pi / 4)
    with open_vlm(fx, n_ctx=N_CTX, flash_attn=True) as on:
        on_r = on.ask(img, Q, max_tokens=1, ratio=0.5)
        on_t = on.ask(img, Q, max_tokens=1, tau=math.pi / 4)
        assert on.key_capture.name == KEY_NAME
    for a, b in ((off_r, on_r), (off_t, on_t)):
        assert [im["key_source"] for im in a.images] == [im["key_source"] for im in b.images]
        assert all(im["key_source"] == f"vit_keys:{KEY_NAME}" for im in b.images)
        assert [im["kept"] for im in a.images] == [im["kept"] for im in b.images]
