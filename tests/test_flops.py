"""FLOPs accounting checked by hand on the tiny fixtures' text dimensions."""

from __future__ import annotations

import pytest

from avis_llamacpp.flops import (TextDims, VisionDims, decode_flops, encoder_flops, prefill_flops, relative_flops,
                                 run_flops, token_flops)

# the tiny fixtures' text model: 2 layers, 64 wide, 4 heads (2 KV heads, head dim 16), FFN 160, vocab 472
D = TextDims(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=160, n_vocab=472)


def test_params_per_token_by_hand():
    # q, o: 64x64 each; k, v: 64x32 each; gate, up, down: 64x160 each -> per layer 8192 + 4096 + 30720
    assert D.params_per_token == 2 * 43008 == 86016


def test_prefill_by_hand():
    # 3 tokens: 2*86016*3 weights + attention 4*2*64*(1+2+3) + one logits row 2*64*472
    assert prefill_flops(D, 3) == 516096 + 3072 + 60416 == 579584


def test_decode_by_hand_and_as_sum_of_tokens():
    # 2 tokens after a 3-token prompt: (2*86016 + 2*64*472)*2 + 4*2*64*(4 + 5)
    assert decode_flops(D, 3, 2) == (172032 + 60416) * 2 + 512 * 9 == 469504
    assert decode_flops(D, 10, 7) == pytest.approx(sum(token_flops(D, 10 + i, logits=True) for i in range(7)))


def test_encoder_by_hand():
    v = VisionDims(n_layer_run=2, n_embd=64, n_ff=128)
    # per row 2*(4*64*64 + 2*64*128) = 65536; attention 4*197*64 = 50432; 197 rows, 2 layers
    assert encoder_flops(v, 197) == 2 * 197 * (65536 + 50432)


def test_relative_flops():
    same = relative_flops(D, n_prompt_kv=300, n_prompt_kv_vanilla=300, generated=[20], vanilla_generated=20)
    assert same["total"] == pytest.approx(1.0)
    pruned = relative_flops(D, n_prompt_kv=150, n_prompt_kv_vanilla=300, generated=[20], vanilla_generated=20)
    assert 0.4 < pruned["total"] < 1.0
    k5 = relative_flops(D, n_prompt_kv=300, n_prompt_kv_vanilla=300, generated=[20] * 5, vanilla_generated=20)
    unshared = run_flops(D, n_prompt_kv=300, generated=[20] * 5, shared_prefill=False)
    shared = run_flops(D, n_prompt_kv=300, generated=[20] * 5)
    assert unshared["total"] - shared["total"] == pytest.approx(4 * prefill_flops(D, 300))
    assert k5["decode"] == pytest.approx(5 * decode_flops(D, 300, 20) / k5["vanilla_total"])


def test_encoder_windowed_blocks_by_hand():
    """Windowed blocks attend inside their window; every full_every-th block over the whole image."""
    v = VisionDims(n_layer_run=3, n_embd=32, n_ff=128, gated_ffn=True, window_rows=256, full_every=3)
    per_row = 2 * (4 * 32 * 32 + 3 * 32 * 128)  # 32768
    # blocks 0 and 1 attend to 256 rows, block 2 to all 1024
    assert encoder_flops(v, 1024) == 1024 * (3 * per_row + 2 * 4 * 256 * 32 + 4 * 1024 * 32)
    # a window larger than the image is the image
    assert encoder_flops(v, 100) == encoder_flops(VisionDims(3, 32, 128, gated_ffn=True), 100)


def test_qwen25vl_family_windows_follow_clip_cpp():
    """Qwen2.5-VL's 112 px windows in patches (clip.cpp: window / patch / merge merged tokens a side);
    Qwen2-VL has no windows."""
    from avis_llamacpp.families import VisionInfo, family_for

    fam = family_for("qwen2.5vl_merger")
    for patch, side in ((14, 8), (7, 16), (16, 6)):
        info = VisionInfo(projector_type="qwen2.5vl_merger", patch_size=patch, n_wa_pattern=4, window_size=112,
                          spatial_merge=2, n_layer=8,
                          n_embd=64, n_ff=128)
        d = fam.encoder_dims(info)
        assert (d.window_rows, d.full_every, d.n_layer_run, d.gated_ffn) == (side * side, 4, 8, True)
    plain = family_for("qwen2vl_merger").encoder_dims(
        VisionInfo(projector_type="qwen2vl_merger", patch_size=14, n_wa_pattern=0, window_size=0, spatial_merge=2,
                   n_layer=8, n_embd=64, n_ff=128))
    assert plain.window_rows == 0


def test_answer_counts_qwen25vl_windows(qwen_fixture, demo_image):
    """An answer's encoder FLOPs on the windowed Qwen2.5-VL fixture (224 px, patch 14: 256 patches; 112 px windows
    of 8 x 8 patches; full attention in blocks 1 and 3), computed here by hand from the fixture's dims."""
    from avis_llamacpp import VLM

    v = qwen_fixture.vision
    assert (v.n_layer, v.n_wa_pattern, v.patch_size) == (4, 2, 14)
    per_row = 2 * (4 * v.n_embd * v.n_embd + 3 * v.n_embd * v.n_ff)
    want = sum(256 * (per_row + 4 * (256 if il % 2 else 64) * v.n_embd) for il in range(4))
    with VLM(qwen_fixture.model, qwen_fixture.mmproj, n_ctx=1024) as vlm:
        ans = vlm.ask(str(demo_image), "Describe.", max_tokens=2)
    assert ans.image_tokens == [64]
    assert ans.flops["encoder"] * ans.flops["vanilla_total"] == pytest.approx(want, rel=1e-9)
