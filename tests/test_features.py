"""The difficulty predictor's feature vector (features.py), each block against values worked out by hand on
small known embeddings and scores, plus the features the pipeline records for a real query."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avis_llamacpp.features import N_EXTRA, feature_names, n_features, query_features

# two images, n_embd = 2: rows chosen so mean, population std and max are easy to do in one's head
IMG_A = np.array([[1.0, -2.0], [3.0, 0.0]])
IMG_B = np.array([[5.0, 4.0]])
# over the three rows: column 0 = 1, 3, 5 -> mean 3, std sqrt(8/3), max 5; column 1 = -2, 0, 4 -> mean 2/3,
# std sqrt(((-8/3)^2 + (-2/3)^2 + (10/3)^2) / 3) = sqrt(168/27), max 4
SCORES = [np.array([-0.9, -0.5, 0.0]), np.array([0.25, 0.5, -0.8, 0.1, -0.7, 0.3, 0.6])]  # 10 scores in all


def test_layout_and_names():
    assert n_features(2) == 6 + N_EXTRA == 17
    names = feature_names(2)
    assert len(names) == 17
    assert names[:6] == ["emb_mean_0", "emb_mean_1", "emb_std_0", "emb_std_1", "emb_max_0", "emb_max_1"]
    assert names[6] == "kdv_kept_frac_pi4" and names[12] == "kdv_max" and names[-1] == "log_question_chars"


def test_every_block_equals_the_hand_computation():
    f = query_features([IMG_A, IMG_B], SCORES, n_embd=2, n_text_tokens=9, question="abcd")
    # embedding blocks
    assert f[0:2].tolist() == pytest.approx([3.0, 2 / 3])
    assert f[2:4].tolist() == pytest.approx([math.sqrt(8 / 3), math.sqrt(168 / 27)])
    assert f[4:6].tolist() == [5.0, 4.0]
    # KDV block; sorted scores: -0.9 -0.8 -0.7 -0.5 0 0.1 0.25 0.3 0.5 0.6
    kept = 8 / 10  # scores >= -cos(pi/4) = -0.7071: only -0.9 and -0.8 fall below (-0.7 is kept)
    mean = sum([-0.9, -0.5, 0.0, 0.25, 0.5, -0.8, 0.1, -0.7, 0.3, 0.6]) / 10  # -0.115
    # numpy's default (linear) quantiles at h = (n - 1) q: q10 -> h = 0.9 between -0.9 and -0.8;
    # q50 -> h = 4.5 between 0 and 0.1; q90 -> h = 8.1 between 0.5 and 0.6
    q10, q50, q90 = -0.9 + 0.9 * 0.1, 0.05, 0.5 + 0.1 * 0.1
    assert f[6:13].tolist() == pytest.approx([kept, mean, -0.9, q10, q50, q90, 0.6])
    # counts: 3 image tokens, 2 images, 9 text tokens, 4 question characters
    assert f[13:].tolist() == pytest.approx([math.log(4), 2.0, math.log(10), math.log(5)])


def test_blocks_are_distinguishable():
    """Each block reacts to its own statistic only: equal means with different spreads change the std block
    and leave the mean block alone."""
    tight = np.array([[1.0, 1.0], [1.0, 1.0]])
    wide = np.array([[0.0, -1.0], [2.0, 3.0]])
    ft = query_features([tight], [], n_embd=2, n_text_tokens=0, question="")
    fw = query_features([wide], [], n_embd=2, n_text_tokens=0, question="")
    assert ft[0:2].tolist() == fw[0:2].tolist() == [1.0, 1.0]
    assert ft[2:4].tolist() == [0.0, 0.0] and fw[2:4].tolist() == [1.0, 2.0]
    assert ft[4:6].tolist() == [1.0, 1.0] and fw[4:6].tolist() == [2.0, 3.0]


def test_no_images_gives_zero_visual_and_kdv_parts():
    f = query_features([], [], n_embd=3, n_text_tokens=4, question="hi")
    assert f.shape == (n_features(3),)
    assert not f[:9 + 7].any()
    assert f[16:].tolist() == pytest.approx([0.0, 0.0, math.log(5), math.log(3)])


def test_wrong_width_is_refused():
    with pytest.raises(ValueError, match="width"):
        query_features([np.zeros((2, 3))], [], n_embd=2, n_text_tokens=0, question="")


def test_pipeline_features_are_the_hand_computation_on_the_recorded_embeddings(llava_fixture, demo_image):
    """In a real query the feature vector is built from the image's projected embeddings before pruning, its
    KDV scores and the prompt's token counts."""
    from avis_llamacpp import VLM
    from avis_llamacpp.kdv import kdv_scores

    q = "How many shapes?"
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_threads=1, n_threads_batch=1) as v:
        a = v.ask(demo_image, q, max_tokens=1, ratio=0.5)
        keys, _ = v.token_keys(_Chunk(a.image_tokens[0], a.images[0]["grid"]), np.zeros((a.image_tokens[0], 64)))
    n = a.image_tokens[0]
    f = a.features
    d = 64
    assert f.shape == (3 * d + N_EXTRA,)
    emb = _projected_embeddings(llava_fixture, demo_image)
    np.testing.assert_allclose(f[:d], emb.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f[d:2 * d], emb.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f[2 * d:3 * d], emb.max(0), rtol=1e-5, atol=1e-6)
    s = kdv_scores(keys)
    assert f[3 * d] == pytest.approx(np.mean(s >= -math.cos(math.pi / 4)))
    assert f[3 * d + 1] == pytest.approx(s.mean()) and f[3 * d + 6] == pytest.approx(s.max())
    n_text = a.prompt_tokens - a.kept_tokens[0]
    assert f[3 * d + 7:].tolist() == pytest.approx([math.log1p(n), 1.0, math.log1p(n_text), math.log1p(len(q))])


class _Chunk:
    def __init__(self, n, grid):
        self.n_tokens, self.image_index = n, 0
        self.nx, self.ny = (n, 1) if grid[0] * grid[1] != n else grid


def _projected_embeddings(fx, image) -> np.ndarray:
    """The image's projected embeddings straight from llama.cpp's mtmd (encode + get_output_embd)."""
    import llama_cpp.mtmd_cpp as mtmd_cpp

    from avis_llamacpp.native import Model
    from tests.family_helpers import stock_mtmd_chunks

    model = Model(fx.model)
    try:
        with stock_mtmd_chunks(fx.mmproj, model.ptr, image.read_bytes(), mtmd_cpp.mtmd_default_marker(),
                               add_special=False) as (ctx, chunks):
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                ch = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(ch) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    assert mtmd_cpp.mtmd_encode_chunk(ctx, ch) == 0
                    n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(ch)
                    out = np.ctypeslib.as_array(mtmd_cpp.mtmd_get_output_embd(ctx),
                                                shape=(n, model.n_embd_inp)).copy()
        return out.astype(np.float64)
    finally:
        model.close()
