"""Token selectors (#16): the built-in ones as pure factories (kdv.make_selector), the kept-set check, and a user's
own selector callable through a real query on the tiny fixtures (what it is shown, what reaches the prompt,
typed errors for a bad return value, and no prefix-cache reuse across callables)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avis_llamacpp import VLM, InvalidArgumentError
from avis_llamacpp.errors import SelectorError
from avis_llamacpp.kdv import (ImageTokens, check_kept, kdv_scores, make_selector, n_keep_for_ratio, random_subset,
                               select_tokens)
from avis_llamacpp.options import QuerySettings
from tests.test_kdv_pipeline import _FakeChunk

Q = "What shapes do you see?"


def _image(n=40, seed=0, index=0) -> ImageTokens:
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, 3, 8))
    return ImageTokens(keys, kdv_scores(keys), rng.normal(size=(n, 16)), index)


# -- pure factories ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kdv_selector_keeps_what_prune_keeps_at_a_ratio(ratio, seed):
    im = _image(seed=seed)
    n_keep = n_keep_for_ratio(im.n_tokens, ratio)
    np.testing.assert_array_equal(make_selector("kdv")(im, n_keep), select_tokens(im.scores, ratio=ratio))


@pytest.mark.parametrize("tau", [0.8, math.pi / 4, 1.2, 1.6])
def test_kdv_selector_keeps_what_prune_keeps_at_a_tau(tau):
    """Given tau mode's own count, the n highest scores are exactly the tokens at or above -cos(tau)."""
    for seed in range(5):
        im = _image(seed=seed)
        want = select_tokens(im.scores, tau=tau)
        np.testing.assert_array_equal(make_selector("kdv")(im, want.size), want)


def test_kdv_selector_ties_prefer_the_lower_index():
    keys = np.ones((6, 1, 2))
    im = ImageTokens(keys, kdv_scores(keys), np.zeros((6, 4)))
    assert make_selector("kdv")(im, 3).tolist() == [0, 1, 2]


def test_embeddings_selector_scores_the_embeddings_not_the_keys():
    im = _image(seed=4)
    want = select_tokens(kdv_scores(im.embeddings[:, None, :]), ratio=0.5)
    got = make_selector("embeddings")(im, n_keep_for_ratio(im.n_tokens, 0.5))
    np.testing.assert_array_equal(got, want)
    assert got.tolist() != make_selector("kdv")(im, got.size).tolist()  # the keys would choose others here


def test_random_selector_is_seeded_by_seed_and_image():
    a = make_selector("random", seed=7)
    im0, im1 = _image(index=0), _image(index=1)
    got = a(im0, 10)
    assert got.tolist() == sorted(set(got.tolist())) and len(got) == 10 and 0 <= got.min() and got.max() < 40
    np.testing.assert_array_equal(got, a(im0, 10))  # pure: same input, same output
    np.testing.assert_array_equal(got, random_subset(40, 10, 7, 0))
    assert got.tolist() != a(im1, 10).tolist()
    assert got.tolist() != make_selector("random", seed=8)(im0, 10).tolist()


def test_uniform_selector_by_hand():
    assert make_selector("uniform")(_image(n=10), 4).tolist() == [0, 2, 5, 7]  # floor(i * 10 / 4)
    assert make_selector("uniform")(_image(n=7), 7).tolist() == list(range(7))


def test_unknown_selector_name():
    with pytest.raises(InvalidArgumentError, match="selector must be one of"):
        make_selector("best")


# -- the kept-set check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kept, match", [
    (np.array([0.0, 1.0]), "integer"), (np.array([True, False]), "integer"), (["a", "b"], "integer"),
    (np.array([[0, 1]]), "1-D"), (np.array([], dtype=np.int64), "no token"), ([0, 10], "outside"),
    ([-1, 2], "outside"), ([3, 1, 3], "duplicate index 3"), (None, "integer"),
])
def test_bad_kept_sets_are_typed_errors(kept, match):
    with pytest.raises(SelectorError, match=match):
        check_kept(kept, 10)
    assert issubclass(SelectorError, InvalidArgumentError)


def test_good_kept_sets_come_back_sorted_int64():
    out = check_kept([7, 0, 3], 8)
    assert out.dtype == np.int64 and out.tolist() == [0, 3, 7]
    assert check_kept(np.array([2], dtype=np.uint8), 3).tolist() == [2]


# -- QuerySettings ---------------------------------------------------------------------------------------------


def test_query_settings_accepts_a_selector_callable():
    def mine(image, n_keep):
        return np.arange(n_keep)
    assert QuerySettings(selector=mine, ratio=0.5).selector is mine
    assert QuerySettings(selector=mine, tau=1.0).selector is mine


@pytest.mark.parametrize("selector, kwargs, match", [
    (object(), {"ratio": 0.5}, "callable"),
    (lambda: None, {"ratio": 0.5}, r"takes \(image, n_keep\)"),
    (lambda a, b, c: None, {"ratio": 0.5}, r"takes \(image, n_keep\)"),
    (lambda image, n_keep: None, {}, "needs a ratio or tau"),
])
def test_query_settings_rejects_bad_selectors(selector, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        QuerySettings(selector=selector, **kwargs)


# -- a user's selector in a real query -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048) as v:
        yield v


def _lowest(image: ImageTokens, n_keep: int) -> np.ndarray:
    """Anti-KDV: the n_keep least diverse tokens, in descending index order (any order is allowed)."""
    return np.sort(np.argsort(image.scores, kind="stable")[:n_keep])[::-1]


def test_user_selector_sees_the_image_and_chooses_the_kept_tokens(vlm, demo_image):
    seen = []

    def spy(image, n_keep):
        seen.append((image, n_keep))
        return _lowest(image, n_keep)

    a = vlm.ask(demo_image, Q, max_tokens=4, ratio=0.75, selector=spy)
    (image, n_keep), = seen
    n = a.image_tokens[0]
    keys, _ = vlm.token_keys(_FakeChunk.of(a), None)  # the keys of the image just encoded, read independently
    np.testing.assert_array_equal(image.keys, keys)
    np.testing.assert_allclose(image.scores, kdv_scores(keys), rtol=0, atol=0)
    assert image.embeddings.shape[0] == n and image.image_index == 0
    assert n_keep == n_keep_for_ratio(n, 0.75) == math.floor(0.25 * n + 1e-9)
    want = np.sort(np.argsort(kdv_scores(keys), kind="stable")[:n_keep]).tolist()
    assert a.images[0]["kept"] == want and a.kept_tokens == [n_keep]
    assert a.images[0]["kdv"]["mode"] == "custom"
    full = vlm.ask(demo_image, Q, max_tokens=4)
    assert full.prompt_tokens - a.prompt_tokens == n - n_keep


def test_user_selector_reaches_the_prompt_like_the_builtin(vlm, demo_image):
    """A callable returning the uniform baseline's indices answers token for token like selector='uniform'."""
    def mine(image, n_keep):
        return [i * image.n_tokens // n_keep for i in range(n_keep)]

    ours = vlm.ask(demo_image, Q, max_tokens=12, ratio=0.6, selector=mine)
    builtin = vlm.ask(demo_image, Q, max_tokens=12, ratio=0.6, selector="uniform")
    assert ours.images[0]["kept"] == builtin.images[0]["kept"]
    assert ours.tokens == builtin.tokens and ours.prompt_tokens == builtin.prompt_tokens
    kdv = vlm.ask(demo_image, Q, max_tokens=12, ratio=0.6)
    assert kdv.images[0]["kept"] != ours.images[0]["kept"]  # so the comparison above can tell them apart


def test_user_selector_may_keep_another_count_and_works_with_tau(vlm, demo_image):
    a = vlm.ask(demo_image, Q, max_tokens=2, tau=1.0, selector=lambda image, n_keep: [0, 1, 2])
    assert a.images[0]["kept"] == [0, 1, 2] and a.kept_tokens == [3]


@pytest.mark.parametrize("bad, match", [
    (lambda image, n_keep: np.arange(n_keep, dtype=np.float32), "integer"),
    (lambda image, n_keep: [image.n_tokens], "outside"),
    (lambda image, n_keep: [0, 0, 1], "duplicate"),
    (lambda image, n_keep: [], "no token"),
])
def test_bad_user_selector_is_a_typed_error_and_the_vlm_stays_usable(vlm, demo_image, bad, match):
    before = vlm.ask(demo_image, Q, max_tokens=8, ratio=0.5)
    with pytest.raises(SelectorError, match=match):
        vlm.ask(demo_image, Q, max_tokens=8, ratio=0.5, selector=bad)
    after = vlm.ask(demo_image, Q, max_tokens=8, ratio=0.5)
    assert after.tokens == before.tokens and after.images[0]["kept"] == before.images[0]["kept"]


def test_user_selectors_are_never_served_from_the_prefix_cache(vlm_fixture, demo_image):
    first = lambda image, n_keep: np.arange(n_keep)  # noqa: E731
    last = lambda image, n_keep: np.arange(image.n_tokens - n_keep, image.n_tokens)  # noqa: E731
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048, prefix_cache=True) as v:
        a = v.ask(demo_image, Q, max_tokens=4, ratio=0.5, selector=first)
        b = v.ask(demo_image, Q, max_tokens=4, ratio=0.5, selector=last)
        n, m = b.image_tokens[0], b.kept_tokens[0]
        assert a.images[0]["kept"] == list(range(m)) and b.images[0]["kept"] == list(range(n - m, n))
        assert not a.prefix_reused and not b.prefix_reused
        again = v.ask(demo_image, Q, max_tokens=4, ratio=0.5, selector=last, reuse_prefix=True)
        assert not again.prefix_reused and again.tokens == b.tokens
        # the cache itself works: a built-in selector's second identical query reuses the first
        v.ask(demo_image, Q, max_tokens=4, ratio=0.5)
        assert v.ask(demo_image, Q, max_tokens=4, ratio=0.5).prefix_reused

