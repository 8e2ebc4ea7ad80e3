"""KDV pruning inside the multimodal path, on both fixture families."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM, InvalidArgumentError
from avis_llamacpp.capture import VisionInfo
from avis_llamacpp.images import load_image
from avis_llamacpp.kdv import kdv_scores, n_keep_for_ratio
from avis_llamacpp.overlay import render_overlay
from avis_llamacpp.prefill import prefill

Q = "What shapes do you see?"


def _noise(w=224, h=224, seed=3):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048) as v:
        yield v


def _prefill_logits(v: VLM, image, ratio=None, tau=None, question=Q):
    """Prefill only; return (next logits, PrefillResult, max position in seq 0)."""
    meta: dict = {}
    select = v.kdv_selector(ratio, tau, meta) if (ratio is not None or tau is not None) else None
    v.ctx.clear()
    with v.projector.tokenize(v.render_question(question, 1), [load_image(image)]) as p:
        pre = prefill(v.ctx, v.projector, p, select=select)
        logits, pos_max = v.ctx.logits(-1), v.ctx.seq_pos_max(0)
    v.ctx.clear()
    return logits, pre, pos_max


def test_ratio_zero_is_vanilla(vlm, vlm_fixture, demo_image):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048, capture_keys=False) as plain:
        want, want_pre, _ = _prefill_logits(plain, demo_image)
        want_tokens = plain.ask(demo_image, Q, max_tokens=16).tokens
    got, got_pre, _ = _prefill_logits(vlm, demo_image, ratio=0.0)
    assert got_pre.images[0].n_kept == want_pre.images[0].n_tokens
    np.testing.assert_array_equal(got, want)  # bit-identical: the callback only observes
    assert vlm.ask(demo_image, Q, max_tokens=16, ratio=0.0).tokens == want_tokens


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_fixed_ratio_keeps_expected_count(vlm, demo_image, ratio):
    a = vlm.ask(demo_image, Q, max_tokens=4, ratio=ratio)
    n = a.image_tokens[0]
    assert a.kept_tokens == [n_keep_for_ratio(n, ratio)] == [math.floor((1 - ratio) * n + 1e-9)]
    im = a.images[0]
    assert im["key_source"].startswith("vit_keys:")
    assert len(im["kept"]) == a.kept_tokens[0] and im["kept"] == sorted(im["kept"])
    # the prompt shrank by exactly the pruned tokens
    full = vlm.ask(demo_image, Q, max_tokens=4)
    assert full.prompt_tokens - a.prompt_tokens == n - a.kept_tokens[0]


@pytest.mark.parametrize("tau", [math.pi / 4, 1.2])
def test_adaptive_tau_prunes_below_threshold(vlm, demo_image, tau):
    """Exactly the tokens whose KDV score (recomputed here from the captured keys) is below -cos(tau) are
    pruned; tests/test_prefill_glue.py checks the same against the numpy reference ViT's keys."""
    a = vlm.ask(demo_image, Q, max_tokens=4, tau=tau)
    kdv = a.images[0]["kdv"]
    assert kdv["mode"] == "tau" and kdv["threshold"] == pytest.approx(-math.cos(tau))
    keys, _ = vlm.token_keys(_FakeChunk.of(a), None)  # the keys of the image just encoded
    scores = kdv_scores(keys)
    want = np.flatnonzero(scores >= -math.cos(tau))
    if want.size == 0:
        want = np.array([int(np.argmax(scores))])
    assert a.images[0]["kept"] == want.tolist()
    assert 0 < len(want) < a.image_tokens[0]  # both sides populated on the demo image at these angles


def test_captured_keys_shape_and_image_dependence(vlm, vlm_fixture, demo_image):
    d = vlm_fixture.vision
    _, pre_a, _ = _prefill_logits(vlm, demo_image, ratio=0.5)
    keys_a, src = vlm.token_keys(_FakeChunk(pre_a), pre_a.images[0].embeddings)
    assert src.startswith("vit_keys:")
    assert keys_a.shape == (pre_a.images[0].n_tokens, d.n_head, d.n_embd // d.n_head)
    assert vlm.key_capture.copies == 1  # after the first encode only the one tensor is copied
    _, pre_b, _ = _prefill_logits(vlm, _noise(), ratio=0.5)
    keys_b, _ = vlm.token_keys(_FakeChunk(pre_b), pre_b.images[0].embeddings)
    assert keys_b.shape == keys_a.shape and not np.allclose(keys_a, keys_b)


class _FakeChunk:
    """The fields of an ImageChunk that token_keys reads, from a prefill result."""

    def __init__(self, pre):
        im = pre.images[0]
        self.n_tokens, self.image_index = im.n_tokens, im.index
        self.nx, self.ny = im.grid

    @classmethod
    def of(cls, answer):
        """The same from an Answer's first image."""
        im = answer.images[0]
        obj = cls.__new__(cls)
        obj.n_tokens, obj.image_index = im["n_tokens"], im["index"]
        obj.nx, obj.ny = im["grid"]
        return obj


def test_positions_after_pruned_image(vlm, demo_image):
    _, pre_full, pos_full = _prefill_logits(vlm, demo_image)
    _, pre_half, pos_half = _prefill_logits(vlm, demo_image, ratio=0.5)
    pruned = pre_full.images[0].n_tokens - pre_half.images[0].n_kept
    if vlm.projector.uses_mrope:
        # M-RoPE: kept tokens keep their positions, the text continues exactly where it did
        assert pre_half.n_past == pre_full.n_past and pos_half == pos_full
    else:
        # 1-D RoPE: consecutive positions, the image occupies as many positions as kept tokens
        assert pre_full.n_past - pre_half.n_past == pruned and pos_full - pos_half == pruned
    assert pre_full.n_kv - pre_half.n_kv == pruned


def test_multiple_images_pruned_independently(vlm, vlm_fixture, demo_image):
    a = vlm.ask([demo_image, _noise(320, 160)], Q, max_tokens=4, ratio=0.75)
    assert len(a.image_tokens) == 2
    assert a.kept_tokens == [n_keep_for_ratio(n, 0.75) for n in a.image_tokens]
    assert a.image_tokens[1] == vlm_fixture.image_tokens(320, 160)
    # each image keeps the same tokens as when it is asked about alone: scored on its own keys only
    alone = [vlm.ask(im, Q, max_tokens=1, ratio=0.75).images[0]["kept"] for im in (demo_image, _noise(320, 160))]
    assert [im["kept"] for im in a.images] == alone
    assert alone[0] != alone[1]


def test_unknown_projector_falls_back_to_embeddings(vlm_fixture, demo_image):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048) as v:
        info = v.projector.vision_info
        v.projector.vision_info = VisionInfo("some_future_projector", info.patch_size, info.n_wa_pattern,
                                             info.window_size, info.spatial_merge)
        a = v.ask(demo_image, Q, max_tokens=4, ratio=0.5)
        assert a.images[0]["key_source"] == "projected_embeddings"
        assert a.kept_tokens == [n_keep_for_ratio(a.image_tokens[0], 0.5)]


def test_invalid_pruning_arguments_leave_model_usable(vlm, demo_image):
    with pytest.raises(InvalidArgumentError, match="ratio"):
        vlm.ask(demo_image, Q, ratio=1.5)
    with pytest.raises(InvalidArgumentError):
        vlm.ask(demo_image, Q, ratio=0.5, tau=0.5)
    with pytest.raises(InvalidArgumentError, match="tau"):
        vlm.ask(demo_image, Q, tau=4.0)
    assert vlm.ask(demo_image, Q, max_tokens=4).tokens == vlm.ask(demo_image, Q, max_tokens=4).tokens


def test_overlay_marks_pruned_cells(vlm, demo_image, tmp_path):
    a = vlm.ask(demo_image, Q, max_tokens=1, ratio=0.75)
    im = a.images[0]
    nx, ny = im["grid"]
    out = render_overlay(demo_image, im["kept"], (nx, ny), cell_px=8)
    assert out.size == (nx * 8, ny * 8)
    path = tmp_path / "overlay.png"
    out.save(path)
    arr = np.asarray(Image.open(path)).astype(float)
    # hand computation: the image resized to the grid, pruned cell (i % nx, i // nx) scaled by dim = 0.25 and
    # crossed by a red diagonal, kept cells untouched
    plain = np.asarray(Image.fromarray(load_image(demo_image)).resize((nx * 8, ny * 8), Image.BICUBIC)).astype(float)
    kept = set(im["kept"])
    diag = np.eye(8, dtype=bool)
    for i in range(nx * ny):
        x, y = (i % nx) * 8, (i // nx) * 8
        got, ref = arr[y:y + 8, x:x + 8], plain[y:y + 8, x:x + 8]
        if i in kept:
            np.testing.assert_array_equal(got, ref)
        else:
            np.testing.assert_allclose(got[~diag], np.floor(ref[~diag] * 0.25), atol=1)
            assert (got[diag] == [200, 40, 40]).all()


def test_captured_keys_equal_numpy_reference(vlm, vlm_fixture):
    """The keys KDV scores are the last run ViT block's keys, recomputed independently in numpy from the
    mmproj weights (tests/reference_vit.py), mapped to LLM tokens the way llama.cpp's graph maps rows."""
    from tests.reference_vit import llava_forward, qwen25vl_forward

    img = np.asarray(_noise(224, 224, seed=11))
    _, pre, _ = _prefill_logits(vlm, img, ratio=0.5)
    got, source = vlm.token_keys(_FakeChunk(pre), pre.images[0].embeddings)
    n = pre.images[0].n_tokens
    if vlm_fixture.family == "llava":
        ref = llava_forward(str(vlm_fixture.mmproj), img)
        assert source == f"vit_keys:Kcur-{ref['layers_run'] - 1}"
        last = ref["keys"][-1]  # [n_pos, H, D], class token appended last by the graph
        want = last[1:n + 1]  # the projector reads rows patches[i] = i + 1
    else:
        ref = qwen25vl_forward(str(vlm_fixture.mmproj), img)
        assert source == f"vit_keys:Kcur_rope-{ref['layers_run'] - 1}"
        rows = ref["keys_rope"][-1]  # window-grouped, 2x2 merge groups contiguous
        grouped = rows.reshape(-1, 4, *rows.shape[1:]).mean(axis=1)
        want = grouped[np.asarray(ref["window_idx"])]  # back to LLM token order, as the graph's get_rows
    assert got.shape == want.shape
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("selector", ["embeddings", "random", "uniform"])
def test_baseline_selectors_keep_the_same_count(vlm, demo_image, selector):
    kdv = vlm.ask(demo_image, Q, max_tokens=2, ratio=0.75)
    base = vlm.ask(demo_image, Q, max_tokens=2, ratio=0.75, selector=selector, seed=3)
    assert base.kept_tokens == kdv.kept_tokens
    kept = base.images[0]["kept"]
    assert kept == sorted(set(kept)) and base.images[0]["key_source"] in ("projected_embeddings", selector)
    if selector == "uniform":
        n, m = base.image_tokens[0], base.kept_tokens[0]
        assert kept == [i * n // m for i in range(m)]
    if selector == "random":
        again = vlm.ask(demo_image, Q, max_tokens=2, ratio=0.75, selector=selector, seed=3)
        other = vlm.ask(demo_image, Q, max_tokens=2, ratio=0.75, selector=selector, seed=4)
        assert again.images[0]["kept"] == kept != other.images[0]["kept"]
    with pytest.raises(InvalidArgumentError, match="selector"):
        vlm.ask(demo_image, Q, max_tokens=2, tau=0.7, selector=selector)
