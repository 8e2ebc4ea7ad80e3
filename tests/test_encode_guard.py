"""The encode guard: rows the graph fills with a fixed mmproj embedding (pixtral's [IMG_BREAK]) are restored from
the file, so corrupt values there (pixtral.cpp builds them as 0 * uninitialised memory + img_break, NaN when the
reused buffer held NaN) never reach the model; any other non-finite embedding is a typed EncodeError, and the
VLM answers the next query normally."""

from __future__ import annotations

import ctypes

import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
import pytest

from avis_llamacpp import VLM
from avis_llamacpp import mtmd as mtmd_mod
from avis_llamacpp.errors import EncodeError
from convert.fixtures import make_fixture
from convert.gguf_tensors import read_tensors

Q = "What is it?"


@pytest.fixture(scope="module")
def fx(fixture_root):
    return make_fixture("pixtral", out_dir=fixture_root)


@pytest.fixture(scope="module")
def vlm(fx):
    v = VLM(fx.model, fx.mmproj, n_ctx=2048, n_threads=1, n_threads_batch=1, flash_attn=False)
    yield v
    v.close()


def _img(seed: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8)


def _poison(monkeypatch, rows_of):
    """Make mtmd's output buffer hold NaN at the rows rows_of(n_tokens) picks, as a corrupt encode would."""
    real = mtmd_cpp.mtmd_get_output_embd

    def poisoned(ctx):
        ptr = real(ctx)
        poisoned.calls += 1
        n_embd = poisoned.n_embd
        for r in rows_of(poisoned.n_tokens):
            for j in range(n_embd):
                ptr[r * n_embd + j] = float("nan")
        return ptr

    poisoned.calls = 0
    monkeypatch.setattr(mtmd_cpp, "mtmd_get_output_embd", poisoned)
    return poisoned


def test_break_rows_restored_from_the_mmproj(vlm, fx, monkeypatch):
    clean = vlm.ask(_img(), Q, max_tokens=6, ratio=0.5)
    n_tokens = clean.image_tokens[0]
    nx, ny = clean.images[0]["grid"]  # p_x + 1 columns, the last one holds the breaks
    breaks = [r * nx + nx - 1 for r in range(ny - 1)]
    assert breaks and n_tokens == nx * ny - 1
    p = _poison(monkeypatch, lambda n: breaks)
    p.n_tokens, p.n_embd = n_tokens, vlm.model.n_embd_inp
    seen = []
    real_encode = mtmd_mod.Projector.encode

    def spy(self, chunk):
        out = real_encode(self, chunk)
        seen.append(out)
        return out

    monkeypatch.setattr(mtmd_mod.Projector, "encode", spy)
    a = vlm.ask(_img(), Q, max_tokens=6, ratio=0.5)
    assert p.calls == 1
    img_break = read_tensors(str(fx.mmproj))["v.token_embd.img_break"].reshape(-1)
    np.testing.assert_array_equal(seen[0][breaks], np.broadcast_to(img_break, (len(breaks), img_break.size)))
    assert a.tokens == clean.tokens


def test_other_non_finite_rows_raise_and_the_vlm_stays_usable(vlm, monkeypatch):
    clean = vlm.ask(_img(5), Q, max_tokens=6)
    p = _poison(monkeypatch, lambda n: [0])
    p.n_tokens, p.n_embd = clean.image_tokens[0], vlm.model.n_embd_inp
    with pytest.raises(EncodeError, match="non-finite embeddings"):
        vlm.ask(_img(5), Q, max_tokens=6)
    monkeypatch.undo()
    assert vlm.ask(_img(5), Q, max_tokens=6).tokens == clean.tokens
