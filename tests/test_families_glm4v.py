"""GLM-4.1V-4.6V / GLM-OCR (glm4v) and GLM-5V (glm5v: the same graph, SwiGLU clamped, its own padded canvas): fused
QKV, 2x2 conv merger. Every test runs on both fixtures: the keys KDV scores equal a numpy re-implementation of
glm4v.cpp (tests/reference_glm4v.py), pruned prefill feeds the kept rows at their original
M-RoPE positions, and with nothing pruned the answer equals stock llama-cpp-python's. The fixture's text model is
Qwen2-VL's (M-RoPE, as GLM-4.1V's glm4 text model with rope sections): mtmd positions the image the same way."""

from __future__ import annotations

import math

import numpy as np

from avis_llamacpp.families import GLM4VFamily, family_for
from avis_llamacpp.mtmd import read_vision_info
from avis_llamacpp.preflight import scan_gguf
from tests.family_helpers import (Q, assert_kept_sets_equal_flash_on_off, assert_merge_graph_keys_equal_reference,
                                  assert_pruned_mrope_prefill, assert_unpruned_matches_stock_qwen_template,
                                  core_family_fixtures, noise, open_vlm)
from tests.reference_glm4v import glm4v_forward


fx, vlm = core_family_fixtures("glm4v", "glm5v")


def test_registry_preflight_and_vision_info(fx, vlm):
    fam = family_for(fx.family)
    assert isinstance(fam, GLM4VFamily) and fam.native and fam.gated_ffn
    hdr = scan_gguf(fx.mmproj, "mmproj")
    assert fam.projection_dim(hdr.tensors) == fx.text.n_embd == vlm.model.n_embd_inp  # clip_n_mmproj_embd
    assert set(fam.required_for(hdr.tensors)) <= set(hdr.tensors)
    vi = read_vision_info(fx.mmproj)
    assert vi.projector_type == fx.family and fam.blocks_run(vi) == fx.vision.n_layer
    assert fam.n_patches(64, vi) == 256 and not fam.windowed(vi)


def test_pruned_query_answers_with_post_rope_vit_keys(vlm, fx):
    img = noise(224, 224, 1)
    for kw in ({"tau": math.pi / 4}, {"ratio": 0.5}, {}):
        a = vlm.ask(img, Q, max_tokens=4, **kw)
        assert a.images[0]["key_source"] == f"vit_keys:Kcur_pos-{fx.vision.n_layer - 1}", kw
    assert vlm.ask(img, Q, max_tokens=4, ratio=0.5).kept_tokens == [32]


def test_captured_keys_equal_numpy_reference(vlm, fx):
    """KDV's per-token keys = mean over each 2x2 merge group of the last block's post-RoPE keys, recomputed in
    numpy from the GGUF weights and grouped by a plain loop over the grid."""
    img = noise(224, 224, 11)
    ref = glm4v_forward(str(fx.mmproj), img)
    assert_merge_graph_keys_equal_reference(vlm, img, ref, "Kcur_pos")
    if fx.family == "glm5v":  # the clamp shapes these keys: without it the reference is off by more than the tolerance
        last, unclamped = ref["keys_rope"][-1], glm4v_forward(str(fx.mmproj), img, swiglu_clamp=0.0)["keys_rope"][-1]
        assert np.abs(last - unclamped).max() > 2e-3 * np.abs(last).max()


def test_strided_kcur_view_is_read_by_its_strides(fx):
    """The pre-RoPE `Kcur-(L-1)` is a strided view into the fused QKV output: read by its strides it equals the
    reference's K projection."""
    img = noise(224, 224, 13)
    with open_vlm(fx, n_ctx=2048, flash_attn=False) as v:
        v.key_capture.use_key_names(("Kcur",))
        v.ask(img, Q, max_tokens=1)
        assert v.key_capture.name == f"Kcur-{fx.vision.n_layer - 1}"
        got = v.key_capture.keys
    want = glm4v_forward(str(fx.mmproj), img)["keys"][-1]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_pruned_prefill_feeds_kept_rows_at_original_mrope_positions(vlm, fx, monkeypatch):
    assert_pruned_mrope_prefill(vlm, fx, noise(320, 160, 5), monkeypatch)  # non-square: 308 x 168 / 336 x 168 (glm5v)


def test_nothing_pruned_matches_stock(vlm, fx, tmp_path):
    """Logits and answer equal stock's, on the fixture's Qwen2-VL text model and template (the generic
    MTMDChatHandler renders this template with one more token, so Qwen2.5-VL's handler is the oracle)."""
    assert_unpruned_matches_stock_qwen_template(vlm, fx, tmp_path / f"{fx.family}.png", seed=7)


def test_kept_sets_equal_with_flash_attention_on_and_off(fx, vlm):
    assert_kept_sets_equal_flash_on_off(fx, vlm)


def test_video_frames_are_chunks_of_one_selection(vlm, fx):
    """llama.cpp pairs no frames for GLM-4V / GLM-5V (no temporal merge): a 4-frame clip is 4 chunks, and its kept
    set is one KDV selection over all of them (numpy oracle over the chunks' keys, read chunk by chunk), which a
    frame-by-frame rule would not give on this clip."""
    from avis_llamacpp.mtmd import ImageChunk
    from tests.test_video_joint import _clip, _kept_over_video, _oracle_kept

    frames = _clip(n_frames=4, size=112)
    keys = []
    with vlm.projector.tokenize(vlm.render_question(Q, len(frames)), frames, video=True) as prompt:
        for c in prompt.chunks:
            if isinstance(c, ImageChunk):
                k, source = vlm.token_keys(c, vlm.projector.encode(c))
                assert source.startswith("vit_keys:Kcur_pos")
                keys.append(k)
    assert len(keys) == 4
    joint = _oracle_kept(np.concatenate(keys), ratio=0.5)
    offsets = np.cumsum([0] + [len(k) for k in keys[:-1]])
    per_chunk = np.concatenate([_oracle_kept(k, ratio=0.5) + off for k, off in zip(keys, offsets)])
    assert not np.array_equal(joint, per_chunk)
    a = vlm.ask(None, Q, video=frames, max_tokens=1, ratio=0.5)
    assert a.image_tokens == [len(k) for k in keys] == [16] * 4
    np.testing.assert_array_equal(_kept_over_video(a), joint)
