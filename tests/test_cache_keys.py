"""Every field of the prefix-cache key, changed alone, never reuses an earlier prompt's image (issue #34).

The key of an image chunk is its pixels' digest and the selection settings (selector name, ratio, tau, the random
selector's seed); text chunks are keyed by their tokens; an entry also carries a cache id (model files, flash
attention, batch sizes) and a namespace. For each field: a query that differs from the cached one in that field
only must decode its image again and answer exactly like a VLM without a cache (same kept set, same tokens), and
the same query asked twice must hit (so "no hit" is not a cache that never works). Kept sets and tokens_skipped are
what users see: a benchmark's baseline row served from KDV's cached KV would show KDV's kept set.

Also: a multi-image query under every selector gives each image its own subset (oracles: the image asked alone,
a second implementation of the random and uniform baselines, and the ratio's count by hand)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avis_llamacpp.images import load_image
from avis_llamacpp.pipeline import VLM
from avis_llamacpp.prefix_cache import PrefixStore
from tests.family_helpers import noise_images

KW = dict(n_ctx=2048, flash_attn=False, n_threads=1, n_threads_batch=1)
Q1, Q2 = "What is in the picture?", "How many shapes?"
SELECTORS = ("kdv", "embeddings", "random", "uniform")


@pytest.fixture(scope="module")
def warm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, prefix_cache=True, **KW) as v:
        yield v


@pytest.fixture(scope="module")
def cold(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, **KW) as v:
        yield v


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Two noise images of one size, and a copy of the first with a single pixel changed."""
    return noise_images(tmp_path_factory.mktemp("cache-key-images"), (150, 77, 1))


def _text_before_image(vlm: VLM, prompt: str, imgs: list) -> int:
    return len(_first_text_tokens(vlm, prompt, imgs))


def _first_text_tokens(vlm: VLM, prompt: str, imgs: list) -> list[int]:
    with vlm.projector.tokenize(prompt, [load_image(i) for i in imgs]) as p:
        return [int(t) for t in p.chunks[0].tokens]


def _same(a: Any, b: Any) -> None:
    assert [im["kept"] for im in a.images] == [im["kept"] for im in b.images]
    assert a.tokens == b.tokens and a.prompt_tokens == b.prompt_tokens


def _no_image_reused(vlm: VLM, ans: Any, prompt: str, imgs: list) -> None:
    assert ans.tokens_skipped <= _text_before_image(vlm, prompt, imgs), ans.tokens_skipped


# (first query's settings, second query's settings): each pair differs in one field of the image key
CHANGES = {
    "selector_kdv_to_uniform": ({"ratio": 0.5}, {"ratio": 0.5, "selector": "uniform"}),
    "selector_kdv_to_random": ({"ratio": 0.5}, {"ratio": 0.5, "selector": "random"}),
    "selector_kdv_to_embeddings": ({"ratio": 0.5}, {"ratio": 0.5, "selector": "embeddings"}),
    "selector_uniform_to_kdv": ({"ratio": 0.5, "selector": "uniform"}, {"ratio": 0.5}),
    "selector_random_to_uniform": ({"ratio": 0.5, "selector": "random"}, {"ratio": 0.5, "selector": "uniform"}),
    "random_seed": ({"ratio": 0.5, "selector": "random", "seed": 1}, {"ratio": 0.5, "selector": "random", "seed": 2}),
    "ratio": ({"ratio": 0.5}, {"ratio": 0.25}),
    "tau": ({"tau": math.pi / 4}, {"tau": 1.2}),
    "ratio_to_tau": ({"ratio": 0.5}, {"tau": math.pi / 4}),
    "pruned_to_unpruned": ({"ratio": 0.5}, {}),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_selection_field_changed_alone_never_reuses_the_image(warm, cold, images, change):
    first, second = CHANGES[change]
    img = [images["a"]]
    warm.ask(img, Q1, max_tokens=4, **first)
    got = warm.ask(img, Q2, max_tokens=6, **second)
    want = cold.ask(img, Q2, max_tokens=6, **second)
    _same(got, want)
    _no_image_reused(warm, got, warm.render_question(Q2, 1), img)
    again = warm.ask(img, Q1, max_tokens=6, **second)  # the control: the same selection now hits the image
    assert again.prefix_reused and again.tokens_skipped > sum(again.kept_tokens)
    _same(again, cold.ask(img, Q1, max_tokens=6, **second))


@pytest.mark.parametrize("selector", ["kdv", "embeddings", "uniform"])
def test_the_seed_is_no_key_of_a_deterministic_selector(warm, cold, images, selector):
    """Only the random baseline depends on the seed: another seed still reuses the others' images."""
    img = [images["b"]]
    warm.ask(img, Q1, max_tokens=4, ratio=0.5, selector=selector, seed=1)
    got = warm.ask(img, Q2, max_tokens=6, ratio=0.5, selector=selector, seed=2)
    assert got.prefix_reused and got.tokens_skipped > sum(got.kept_tokens)
    _same(got, cold.ask(img, Q2, max_tokens=6, ratio=0.5, selector=selector, seed=2))


@pytest.mark.parametrize("pr", [{}, {"ratio": 0.5}], ids=["unpruned", "ratio0.5"])
def test_one_changed_pixel_never_reuses_the_image(warm, cold, images, pr):
    warm.ask([images["a"]], Q1, max_tokens=4, **pr)
    got = warm.ask([images["a_pixel"]], Q2, max_tokens=6, **pr)
    _same(got, cold.ask([images["a_pixel"]], Q2, max_tokens=6, **pr))
    _no_image_reused(warm, got, warm.render_question(Q2, 1), [images["a_pixel"]])


def test_a_changed_pixel_in_the_second_image_keeps_only_the_first(warm, cold, images):
    pr = {"ratio": 0.5}
    warm.ask([images["b"], images["a"]], Q1, max_tokens=4, **pr)
    pair = [images["b"], images["a_pixel"]]
    got = warm.ask(pair, Q2, max_tokens=6, **pr)
    _same(got, cold.ask(pair, Q2, max_tokens=6, **pr))
    # the first image and the text around it are reused, nothing of the second image
    n_text = got.prompt_tokens - sum(got.kept_tokens)
    assert got.kept_tokens[0] < got.tokens_skipped < got.kept_tokens[0] + n_text


def test_other_text_before_the_image_never_reuses_the_image(warm, cold, images):
    """A system prompt one word apart: the text chunk before the image differs, so the image after it (same
    pixels, same selection) must be decoded again after the new text."""
    img = [images["a"]]

    def prompt(system: str) -> str:
        return warm.render_messages([{"role": "system", "content": system},
                                     {"role": "user", "content": [{"type": "image_url",
                                                                   "image_url": {"url": "avis-image://0"}},
                                                                  {"type": "text", "text": Q1}]}],
                                    ["avis-image://0"])

    p1, p2 = prompt("Answer with one word."), prompt("Answer with two words.")
    warm.generate(p1, img, max_tokens=4, ratio=0.5)
    got = warm.generate(p2, img, max_tokens=6, ratio=0.5)
    _same(got, cold.generate(p2, img, max_tokens=6, ratio=0.5))
    # reused: exactly the tokens the two texts share from the start (counted on the two tokenisations)
    first, second = (_first_text_tokens(warm, p, img) for p in (p1, p2))
    common = next(i for i, (x, y) in enumerate(zip(first + [-1], second + [-2])) if x != y)
    assert 0 < common < len(second) and got.tokens_skipped == common
    again = warm.generate(p2, img, max_tokens=6, ratio=0.5)  # the control
    assert again.tokens_skipped == again.prompt_tokens - 1


# --------------------------------------------------------------------------- #
# the cache id (model files, context settings) and the namespace, through a shared store
# --------------------------------------------------------------------------- #

def _fill(store: PrefixStore, model: Path, mmproj: Path, img: list, **kw: Any) -> None:
    """Put the prompt (img, Q1) into the store: ask it, then another prompt that replaces it as the live one."""
    with VLM(model, mmproj, prefix_cache=True, prefix_store=store, **{**KW, **kw}) as v:
        v.ask(img, Q1, max_tokens=2, ratio=0.5)
        v.ask([np.zeros((32, 32, 3), np.uint8)], Q1, max_tokens=2)
    assert len(store) == 1


@pytest.mark.parametrize("setting", [{"flash_attn": True}, {"n_batch": 256}, {"n_ubatch": 256}, "other_mmproj",
                                     "other_text_model"],
                         ids=["flash_attn", "n_batch", "n_ubatch", "other_mmproj", "other_text_model"])
def test_a_cache_id_field_changed_alone_never_hits_the_store(vlm_fixture, fixture_root, images, setting):
    from convert.fixtures import make_fixture

    img = [images["a"]]
    store = PrefixStore(max_bytes=64 << 20)
    _fill(store, vlm_fixture.model, vlm_fixture.mmproj, img)
    model, mmproj, kw = vlm_fixture.model, vlm_fixture.mmproj, {}
    if isinstance(setting, dict):
        kw = setting
    else:
        other = make_fixture(vlm_fixture.family, "tiny", seed=1, out_dir=fixture_root)
        model, mmproj = (model, other.mmproj) if setting == "other_mmproj" else (other.model, mmproj)
    with VLM(model, mmproj, prefix_cache=True, prefix_store=store, **{**KW, **kw}) as v:
        got = v.ask(img, Q2, max_tokens=4, ratio=0.5)
    assert not got.prefix_reused and got.tokens_skipped == 0
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, prefix_cache=True, prefix_store=store, **KW) as same:
        hit = same.ask(img, Q2, max_tokens=4, ratio=0.5)  # the control: unchanged settings hit the same store
    assert hit.prefix_reused and hit.tokens_skipped > sum(hit.kept_tokens)


def test_another_namespace_never_hits_the_store(vlm_fixture, images):
    img = [images["b"]]
    store = PrefixStore(max_bytes=64 << 20)
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, prefix_cache=True, prefix_store=store, **KW) as v:
        v.ask(img, Q1, max_tokens=2, ratio=0.5, cache_namespace="alice")
        v.ask([images["a"]], Q1, max_tokens=2, ratio=0.5, cache_namespace="alice")  # alice's first prompt: stored
        bob = v.ask(img, Q2, max_tokens=4, ratio=0.5, cache_namespace="bob")
        assert not bob.prefix_reused and bob.tokens_skipped == 0
        v.ask([images["a"]], Q1, max_tokens=2, ratio=0.5, cache_namespace="alice")
        alice = v.ask(img, Q2, max_tokens=4, ratio=0.5, cache_namespace="alice")  # from the store
        assert alice.prefix_reused and alice.tokens_skipped > sum(alice.kept_tokens)
        assert alice.tokens == bob.tokens


# --------------------------------------------------------------------------- #
# multi-image queries: each image its own subset, under every selector
# --------------------------------------------------------------------------- #

def _random_oracle(n: int, k: int, seed: int, index: int) -> list[int]:
    """The random baseline as documented: k of n indices drawn by a generator seeded with (seed, image index)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index])
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


@pytest.mark.parametrize("selector", SELECTORS)
def test_each_image_of_a_query_gets_its_own_subset(warm, cold, images, selector):
    pair, ratio, seed = [images["a"], images["b"]], 0.75, 5
    got = cold.ask(pair, Q1, max_tokens=4, ratio=ratio, selector=selector, seed=seed)
    n = got.image_tokens
    assert n[0] == n[1] and got.kept_tokens == [math.floor((1 - ratio) * x) for x in n]
    kept = [im["kept"] for im in got.images]
    if selector == "random":
        assert kept == [_random_oracle(n[i], got.kept_tokens[i], seed, i) for i in range(2)]
        assert kept[0] != kept[1]
    elif selector == "uniform":
        assert kept == [[j * n[i] // got.kept_tokens[i] for j in range(got.kept_tokens[i])] for i in range(2)]
    else:  # scored on each image's own keys (or embeddings): what the image keeps when asked about alone
        alone = [cold.ask([im], Q1, max_tokens=1, ratio=ratio, selector=selector).images[0]["kept"] for im in pair]
        assert kept == alone and alone[0] != alone[1]
    # the prefix cache reuses both images, each with its own kept set
    warm.ask(pair, Q1, max_tokens=2, ratio=ratio, selector=selector, seed=seed)
    again = warm.ask(pair, Q2, max_tokens=6, ratio=ratio, selector=selector, seed=seed)
    assert again.tokens_skipped > sum(again.kept_tokens)
    _same(again, cold.ask(pair, Q2, max_tokens=6, ratio=ratio, selector=selector, seed=seed))
    assert [im["kept"] for im in again.images] == kept


# --------------------------------------------------------------------------- #
# video queries: one selection over the whole video, under every selector, and its rule in the key
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(4)]


def _split(kept: list[int], sizes: list[int]) -> list[list[int]]:
    """Indices into the concatenated video tokens -> each chunk's own indices."""
    out, start = [], 0
    for n in sizes:
        out.append([i - start for i in kept if start <= i < start + n])
        start += n
    return out


@pytest.mark.parametrize("selector", SELECTORS)
def test_a_video_is_one_selection_under_every_selector_and_reused_as_such(warm, cold, frames, selector):
    ratio, seed = 0.5, 3
    got = cold.ask(None, Q1, video=frames, max_tokens=2, ratio=ratio, selector=selector, seed=seed)
    sizes, total = got.image_tokens, sum(got.image_tokens)
    k = math.floor((1 - ratio) * total)
    assert len(sizes) > 1 and sum(got.kept_tokens) == k  # one count for the whole video
    kept = [im["kept"] for im in got.images]
    if selector == "random":  # one subset of the video's tokens, seeded by (seed, the first chunk's index 0)
        assert kept == _split(_random_oracle(total, k, seed, 0), sizes)
    elif selector == "uniform":
        assert kept == _split([j * total // k for j in range(k)], sizes)
    per_chunk = cold.ask(None, Q1, video=frames, max_tokens=2, ratio=ratio, selector=selector, seed=seed,
                         video_selection="per_chunk")
    assert per_chunk.kept_tokens == [math.floor((1 - ratio) * n) for n in sizes]
    # the prefix cache: the same video again reuses every chunk with the joint kept sets
    warm.ask(None, Q1, video=frames, max_tokens=2, ratio=ratio, selector=selector, seed=seed)
    again = warm.ask(None, Q2, video=frames, max_tokens=6, ratio=ratio, selector=selector, seed=seed)
    assert again.tokens_skipped > sum(again.kept_tokens)
    _same(again, cold.ask(None, Q2, video=frames, max_tokens=6, ratio=ratio, selector=selector, seed=seed))


def test_the_video_selection_rule_is_a_key_field(warm, cold, frames):
    warm.ask(None, Q1, video=frames, max_tokens=2, ratio=0.5)
    got = warm.ask(None, Q2, video=frames, max_tokens=6, ratio=0.5, video_selection="per_chunk")
    want = cold.ask(None, Q2, video=frames, max_tokens=6, ratio=0.5, video_selection="per_chunk")
    joint = cold.ask(None, Q2, video=frames, max_tokens=1, ratio=0.5)
    assert [im["kept"] for im in joint.images] != [im["kept"] for im in want.images]  # the two rules differ here
    _same(got, want)
    with warm.projector.tokenize(warm.render_question(Q2, len(frames)), frames, video=True) as p:
        before_video = len(p.chunks[0].tokens)
    assert 0 < got.tokens_skipped <= before_video  # the text before the video, no chunk of it
    again = warm.ask(None, Q1, video=frames, max_tokens=6, ratio=0.5, video_selection="per_chunk")  # the control
    assert again.tokens_skipped > sum(again.kept_tokens)
