"""MobileVLM-V2 (ldpv2): the llava ViT's last-run block keys, rows 1..576 as the projector reads them, averaged
over the 2x2 groups of the 24 x 24 grid that clip.cpp's average pool merges into one of 144 tokens."""

from __future__ import annotations

import math

import numpy as np
from llama_cpp.llama_chat_format import Llava15ChatHandler

from tests.family_helpers import Q, core_family_fixtures, noise, png_bytes, stock_chat_completion

fx, vlm = core_family_fixtures("ldpv2")


def test_keys_equal_numpy_reference_pooled_by_hand(vlm, fx):
    from tests.reference_vit import llava_forward

    img = noise(96, 96, 11)
    a = vlm.ask(img, Q, max_tokens=1, tau=math.pi / 4)
    ref = llava_forward(str(fx.mmproj), img)
    assert a.images[0]["key_source"] == f"vit_keys:Kcur-{ref['layers_run'] - 1}"
    last = ref["keys"][-1]  # [577, H, D]: 576 patches then the class token
    rows = last[ref["rows"]]  # what the projector reads (patches[i] = i + 1)
    want = np.zeros((144,) + last.shape[1:])
    for ty in range(12):
        for tx in range(12):
            group = [rows[(2 * ty + dy) * 24 + 2 * tx + dx] for dy in range(2) for dx in range(2)]
            want[ty * 12 + tx] = np.mean(group, axis=0)
    chunk = type("C", (), {"n_tokens": 144, "nx": 144, "ny": 1, "image_index": 0})()
    got, _ = vlm.token_keys(chunk, np.zeros((144, 4)))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert a.images[0]["grid"] == [12, 12]


def test_pruned_queries_use_vit_keys_and_consecutive_positions(vlm, monkeypatch):
    img = noise(160, 90, 3)  # non-square: letterboxed to the fixed square input
    seen = []
    real = vlm.ctx.decode_embeddings

    def spy(embd, positions, seq_id=0, *, logits_last=False):
        seen.append(np.array(positions, copy=True))
        return real(embd, positions, seq_id, logits_last=logits_last)

    full = vlm.ask(img, Q, max_tokens=1)
    monkeypatch.setattr(vlm.ctx, "decode_embeddings", spy)
    a = vlm.ask(img, Q, max_tokens=1, ratio=0.5)
    monkeypatch.undo()
    assert a.images[0]["key_source"].startswith("vit_keys:") and a.kept_tokens == [72]
    (pos,) = seen
    # 1-D RoPE: kept tokens are packed at consecutive positions right after the text before the image
    np.testing.assert_array_equal(pos[:, 0], pos[0, 0] + np.arange(72))
    assert full.prompt_tokens - a.prompt_tokens == 72


def test_nothing_pruned_matches_stock_llava15_handler(vlm, fx):
    img = noise(96, 96, 7)
    out = stock_chat_completion(fx.model, fx.mmproj, png_bytes(img), max_tokens=8, n_ctx=2048,
                                handler=Llava15ChatHandler, n_threads_batch=1, flash_attn=False)
    ours = vlm.ask(img, Q, max_tokens=8)
    assert ours.text == out["choices"][0]["message"]["content"]
