"""Qwen3-VL / Qwen3.5 (qwen3vl_merger) and Ling-3-VL (ling3vl: the same tower, its own merger, keys named by
build_vit): fused QKV. On both fixtures the capture reads the strided key views without failing, the keys KDV
scores equal a numpy re-implementation of qwen3vl.cpp, pruned prefill feeds the kept rows at their original M-RoPE
positions, and with nothing pruned the answer equals stock llama-cpp-python."""

from __future__ import annotations

import math

import numpy as np

from avis_llamacpp.capture import strided_to_array, tensor_nbytes
from avis_llamacpp.families import family_for
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, assert_merge_graph_keys_equal_reference,
                                  assert_pruned_mrope_prefill, core_family_fixtures, noise, open_vlm, png_bytes,
                                  stock_chat_completion)

# the post-RoPE key each graph names: qwen3vl.cpp runs its own block loop, ling3vl.cpp build_vit's
POST_ROPE_KEY = {"qwen3vl": "Kcur_rope", "ling3vl": "Kcur_pos"}


fx, vlm = core_family_fixtures(*sorted(POST_ROPE_KEY))


def test_strided_view_read_equals_numpy_slicing():
    """A K view of a fused [n, 3e] QKV buffer, read by its byte strides, equals slicing the buffer."""
    n, n_head, d_head = 6, 2, 4
    e = n_head * d_head
    qkv = np.arange(n * 3 * e, dtype=np.float32).reshape(n, 3 * e)
    ne = [d_head, n_head, n, 1]
    nb = [4, 4 * d_head, 4 * 3 * e, 4 * 3 * e * n]
    offset = e  # K starts after Q in each row
    nbytes = tensor_nbytes(ne, nb, 4)
    flat = qkv.reshape(-1)[offset:]
    got = strided_to_array(flat[: nbytes // 4 + 1].copy(), ne, nb)
    want = qkv[:, e:2 * e].reshape(1, n, n_head, d_head)
    np.testing.assert_array_equal(got, want)


def test_registry_maps_both_natively():
    for projector_type, name in (("qwen3vl_merger", "qwen3vl"), ("ling3vl", "ling3vl")):
        fam = family_for(projector_type)
        assert fam.native and fam.name == name and not fam.gated_ffn


def test_pruned_query_answers_with_vit_keys(vlm, fx):
    """The first query on a fused-QKV graph used to end in 'CaptureError: tensor Kcur-... is not contiguous'."""
    img = noise(224, 224, 1)
    n_layer = fx.vision.n_layer
    for kw in ({"tau": math.pi / 4}, {"ratio": 0.5}, {}):
        a = vlm.ask(img, Q, max_tokens=4, **kw)
        assert a.images[0]["key_source"] == f"vit_keys:{POST_ROPE_KEY[fx.family]}-{n_layer - 1}", kw
    assert vlm.ask(img, Q, max_tokens=4, ratio=0.5).kept_tokens == [32]


def test_captured_keys_equal_numpy_reference(vlm, fx):
    """KDV's per-token keys = mean over each 2x2 merge group of the last block's post-RoPE keys, recomputed in
    numpy from the GGUF weights (tests/reference_qwen3vl.py) and grouped by a plain loop over the grid."""
    from tests.reference_qwen3vl import qwen3vl_forward

    img = noise(224, 224, 11)
    assert_merge_graph_keys_equal_reference(vlm, img, qwen3vl_forward(str(fx.mmproj), img),
                                            POST_ROPE_KEY[fx.family])


def test_pruned_prefill_feeds_kept_rows_at_original_mrope_positions(vlm, fx, monkeypatch):
    """A spy on the decode calls: the image rows decoded are exactly the kept rows of the encoder output, at
    the positions mtmd gives those tokens unpruned; the text after the image continues at its unpruned
    position."""
    assert_pruned_mrope_prefill(vlm, fx, noise(320, 160, 5), monkeypatch)  # non-square


def test_nothing_pruned_matches_stock_mtmd_handler(vlm, fx):
    """K = 1, nothing pruned, greedy: the same text as stock llama-cpp-python's MTMDChatHandler (on Qwen3-VL with
    deepstack embeddings: the text model takes 2 x n_embd inputs). 10 tokens: stock keeps decoding past
    max_tokens while a UTF-8 character is incomplete (here from token 11), so longer runs differ by design."""
    img = noise(224, 224, 7)
    out = stock_chat_completion(fx.model, fx.mmproj, png_bytes(img), max_tokens=10, n_ctx=2048, n_threads_batch=1,
                                flash_attn=False)
    ours = vlm.ask(img, Q, max_tokens=10)
    assert ours.text == out["choices"][0]["message"]["content"]
    assert len(ours.tokens) == out["usage"]["completion_tokens"]


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)


def test_strided_kcur_view_is_read_by_its_strides(fx):
    """Capture the pre-RoPE `Kcur-(L-1)`, a strided view into the fused QKV output, and compare with the numpy
    reference's K projection: read_tensor must follow the view's nb strides, not its raw bytes."""
    from tests.reference_qwen3vl import qwen3vl_forward

    img = noise(224, 224, 13)
    with open_vlm(fx, n_ctx=2048, flash_attn=False) as v:
        v.key_capture.use_key_names(("Kcur",))  # only the plain (view) key tensors
        v.ask(img, Q, max_tokens=1)
        assert v.key_capture.name == f"Kcur-{fx.vision.n_layer - 1}"
        got = v.key_capture.keys
    want = qwen3vl_forward(str(fx.mmproj), img)["keys"][-1]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
