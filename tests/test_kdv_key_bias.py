"""The key-bias experiment's GGUF edit and its claim on the bundled model: a shift of the last ViT block's key bias
along the lowest-frequency RoPE pairs leaves stock llama.cpp's unpruned answers unchanged while adaptive KDV at
tau = pi/4 keeps far fewer tokens (benchmarks/kdv_tau_key_bias.py runs it on 200 items)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from avis_llamacpp import VLM
from convert.gguf_tensors import edit_tensor, read_tensors
from convert.key_bias import lowest_frequency_dims, shift_last_key_bias
from convert.shapes_task import format_question, make_item, render

BUNDLED = Path(__file__).resolve().parents[1] / "avis_llamacpp" / "data" / "shapes-qwen"


def test_edit_tensor_changes_only_the_named_tensor(tmp_path):
    src = BUNDLED / "mmproj.gguf"
    edit_tensor(src, tmp_path / "m.gguf", "v.blk.1.attn_v.bias", lambda b: b * 2 + 1)
    a, b = read_tensors(src), read_tensors(tmp_path / "m.gguf")
    assert sorted(a) == sorted(b)
    assert [k for k in a if not np.array_equal(a[k], b[k])] == ["v.blk.1.attn_v.bias"]
    np.testing.assert_array_equal(b["v.blk.1.attn_v.bias"], a["v.blk.1.attn_v.bias"] * 2 + 1)
    with pytest.raises(KeyError, match="no tensor 'v.blk.9.attn_k.bias'"):
        edit_tensor(src, tmp_path / "x.gguf", "v.blk.9.attn_k.bias", lambda b: b)
    with pytest.raises(ValueError, match="changed 'v.blk.0.attn_k.bias'"):
        edit_tensor(src, tmp_path / "x.gguf", "v.blk.0.attn_k.bias", lambda b: b[:3])


def test_lowest_frequency_dims_are_each_heads_slowest_y_and_x_pairs():
    """Head dim 16: pair k rotates dims (k, k + 8); y pairs k = 0-3 turn at theta^(-k/4), x pairs k = 4-7 at
    theta^(-(k-4)/4), so the slowest are k = 3 and k = 7, i.e. dims 3, 11, 7, 15 of each head."""
    assert lowest_frequency_dims(32, 2) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert lowest_frequency_dims(32, 1) == [7, 15, 23, 31]


def test_shifted_key_bias_keeps_the_answers_but_not_the_kept_count(tmp_path):
    name = shift_last_key_bias(BUNDLED / "mmproj.gguf", tmp_path / "mmproj.gguf", 3.0)
    assert name == "v.blk.2.attn_k.bias"
    delta = read_tensors(tmp_path / "mmproj.gguf")[name] - read_tensors(BUNDLED / "mmproj.gguf")[name]
    assert np.flatnonzero(delta).tolist() == lowest_frequency_dims(32, 2) and np.allclose(delta[delta != 0], 3.0)
    items = [make_item("calibration", i) for i in range(4)]
    runs = {}
    for label, mmproj in (("original", BUNDLED / "mmproj.gguf"), ("shifted", tmp_path / "mmproj.gguf")):
        with VLM(BUNDLED / "model.gguf", mmproj, n_ctx=1024, n_threads=1, n_threads_batch=1) as vlm:
            texts, kept = [], []
            for it in items:
                img, q = np.asarray(render(it.scene)), format_question(it.question)
                texts.append(vlm.ask(img, q, answer_tags=True, max_tokens=40).text)
                kept.append(len(vlm.ask(img, q, max_tokens=1, tau=math.pi / 4).images[0]["kept"]))
            runs[label] = texts, kept
    assert runs["shifted"][0] == runs["original"][0]  # same greedy text, unpruned
    assert sum(runs["shifted"][1]) * 4 < sum(runs["original"][1])  # far fewer tokens kept at tau
