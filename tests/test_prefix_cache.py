"""Prefix reuse across requests (issue #18): the matcher on its own, the bounded store, and the VLM / chat
handler / server reusing an earlier prompt's KV.

Oracles: a cold run on a VLM without the cache (same tokens, same kept sets), and an independent count of the
KV cells two prompts share: each prompt flattened to one label per cell (text token ids; image cells labelled
by image digest, pruning settings and kept index, from the answers' own kept sets), their longest common prefix,
less the one token a fully cached prompt must decode again for its logits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from PIL import Image

from avis_llamacpp.errors import ImageError, InvalidArgumentError
from avis_llamacpp.images import load_image
from avis_llamacpp.mtmd import TextChunk
from avis_llamacpp.pipeline import VLM
from avis_llamacpp.prefill import ImagePrefill
from avis_llamacpp.prefix_cache import (
    NO_MATCH,
    CachedChunk,
    ImageKey,
    PrefixEntry,
    PrefixStore,
    TextKey,
    match_prefix,
)
from avis_llamacpp.snapshot import Snapshot, image_digest
from tests.server_process import ASGIClient

N_CTX = 2048
KW = dict(n_ctx=N_CTX, flash_attn=False, n_threads=1, n_threads_batch=1)
PRUNINGS = [{}, {"ratio": 0.5}, {"tau": math.pi / 4}]
PRUNING_IDS = ["unpruned", "ratio0.5", "tau_pi4"]


# --------------------------------------------------------------------------- #
# the matcher (pure)
# --------------------------------------------------------------------------- #

SEL = ("kdv", 0.5, None, None)


def _img(d: str = "A", sel: tuple = SEL, n: int = 16) -> ImageKey:
    return ImageKey(d, sel, n, 4, 4, 4)


def _cached(keys: list, mrope: bool = True, kept: int = 8) -> list[CachedChunk]:
    """Chunk records as prefill lays them out: an image spans n_pos positions (M-RoPE) or its kept count
    (1-D) and holds `kept` cells."""
    out, n_past, n_kv = [], 0, 0
    for k in keys:
        if isinstance(k, TextKey):
            n_pos = n_cells = len(k.tokens)
        else:
            n_cells, n_pos = kept, (k.n_pos if mrope else kept)
        out.append(CachedChunk(k, n_past, n_kv, n_pos, n_cells))
        n_past, n_kv = n_past + n_pos, n_kv + n_cells
    return out


def test_match_follow_up_reuses_the_whole_cached_prompt_at_separate_position_and_cell_counts():
    old = [TextKey((1, 2, 3)), _img(), TextKey((7, 8))]
    new = [TextKey((1, 2, 3)), _img(), TextKey((7, 8, 9, 10))]
    m = match_prefix(_cached(old), new)
    # 3 text + 8 kept cells + 2 text; positions: 3 + 4 (the image's full M-RoPE span) + 2
    assert (m.chunk, m.offset, m.n_kv, m.n_past, m.n_images, m.covers_entry) == (2, 2, 13, 9, 1, True)
    m1 = match_prefix(_cached(old, mrope=False), new)  # 1-D: kept tokens took consecutive positions
    assert (m1.n_kv, m1.n_past) == (13, 13)


def test_match_same_prompt_gives_back_the_last_token():
    keys = [TextKey((1, 2, 3)), _img(), TextKey((7, 8))]
    m = match_prefix(_cached(keys), keys)
    assert (m.chunk, m.offset, m.n_kv, m.covers_entry) == (2, 1, 12, True)


def test_match_prompt_ending_with_an_image_recomputes_that_image():
    keys = [TextKey((1, 2)), _img()]
    m = match_prefix(_cached(keys), keys)
    assert (m.chunk, m.offset, m.n_kv, m.n_images) == (1, 0, 2, 0)


@pytest.mark.parametrize("changed", [_img("B"), _img(sel=("kdv", 0.25, None, None)), _img(sel=("all",)),
                                     _img(n=20)], ids=["other_image", "other_ratio", "unpruned", "other_geometry"])
def test_match_stops_before_an_image_whose_key_differs(changed):
    old = [TextKey((1, 2, 3)), _img(), TextKey((7, 8))]
    m = match_prefix(_cached(old), [TextKey((1, 2, 3)), changed, TextKey((7, 8))])
    assert (m.chunk, m.offset, m.n_kv, m.n_images, m.covers_entry) == (1, 0, 3, 0, False)


def test_match_edited_earlier_turn_stops_at_the_first_differing_token():
    old = [TextKey((1, 2, 3)), _img(), TextKey((7, 8, 9, 4, 5)), _img("C"), TextKey((6,))]
    new = [TextKey((1, 2, 3)), _img(), TextKey((7, 8, 0, 4, 5)), _img("C"), TextKey((6,))]
    m = match_prefix(_cached(old), new)
    assert (m.chunk, m.offset, m.n_kv, m.n_images, m.covers_entry) == (2, 2, 13, 1, False)


def test_match_nothing_in_common():
    m0 = match_prefix([], [TextKey((1,))])
    assert (m0.n_kv, m0.chunk, m0.offset, m0.n_past) == (NO_MATCH.n_kv, 0, 0, 0)
    m = match_prefix(_cached([TextKey((5, 6))]), [TextKey((1, 2))])
    assert (m.n_kv, m.chunk, m.offset) == (0, 0, 0)


# --------------------------------------------------------------------------- #
# the store (pure: fake entries)
# --------------------------------------------------------------------------- #

def _entry(tokens: tuple, state_bytes: int, namespace: str = "", cache_id: str = "c") -> PrefixEntry:
    keys = [TextKey(tokens), _img(), TextKey((9,))]
    im = ImagePrefill(0, 16, 8, (4, 4), np.arange(0, 16, 2), np.ones((16, 4), np.float32))
    im.meta = {"key_source": "test", "kdv": {"mode": "ratio"}}
    return PrefixEntry(cache_id, namespace, tuple(_cached(keys)), 12, 12, images=[im],
                       scores=[np.linspace(-1, 1, 16)], state=bytes(range(256)) * (state_bytes // 256),
                       prompt_text="p", model_id="m")


def test_store_evicts_least_recently_used_past_its_byte_cap():
    a, b, c = _entry((1,), 1024), _entry((2,), 1024), _entry((3,), 1024)
    store = PrefixStore(max_bytes=a.nbytes * 2)
    store.put(a)
    store.put(b)
    assert store.get(a.key) is a  # a is now the most recently used
    store.put(c)
    assert store.get(b.key) is None and store.get(a.key) is a and store.get(c.key) is c
    assert store.nbytes == a.nbytes + c.nbytes <= store.max_bytes
    best = store.best_match("c", "", [TextKey((3,)), _img(), TextKey((9, 4))])
    assert best is not None and best[0] == c.key and best[1].n_kv == 10


def test_store_never_matches_another_namespace_or_cache_id():
    store = PrefixStore()
    store.put(_entry((1,), 256, namespace="alice"))
    new = [TextKey((1,)), _img(), TextKey((9, 4))]
    assert store.best_match("c", "bob", new) is None
    assert store.best_match("other-model", "alice", new) is None
    assert store.best_match("c", "alice", new)[1].n_kv == 10


def test_store_files_survive_a_restart_and_tampered_or_foreign_files_are_never_used(tmp_path):
    e = _entry((1,), 4096, namespace="alice")
    PrefixStore(max_bytes=1 << 20, directory=tmp_path).put(e)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"prefix-{e.key}.gguf"]
    snap = Snapshot.load(tmp_path / files[0])  # an ordinary snapshot GGUF
    assert snap.state == e.state and snap.n_kv == e.n_kv
    again = PrefixStore(max_bytes=1 << 20, directory=tmp_path)
    key, _ = again.best_match("c", "alice", [TextKey((1,)), _img(), TextKey((9, 4))])
    got = again.get(key)
    assert got.state == e.state and got.images[0].kept.tolist() == e.images[0].kept.tolist()
    assert np.array_equal(got.images[0].embeddings, e.images[0].embeddings) and got.chunks == e.chunks
    # a foreign snapshot dropped into the directory under another name is not indexed
    Snapshot.load(tmp_path / files[0]).save(tmp_path / "mine.gguf")
    assert len(PrefixStore(directory=tmp_path)) == 1
    # a file whose bytes were changed (KV state, or the image arrays at its end) fails its digest on use
    clean = (tmp_path / files[0]).read_bytes()
    for at in (clean.index(bytes(range(256))) + 100, len(clean) - 10):
        raw = bytearray(clean)
        raw[at] ^= 0xFF
        (tmp_path / files[0]).write_bytes(bytes(raw))
        third = PrefixStore(max_bytes=1 << 20, directory=tmp_path)
        assert third.get(e.key) is None and len(third) == 0


def test_store_disk_cap_removes_oldest_files(tmp_path):
    a, b = _entry((1,), 4096), _entry((2,), 4096)
    store = PrefixStore(max_bytes=0, directory=tmp_path, max_disk_bytes=6000)
    store.put(a)
    store.put(b)
    assert [p.name for p in tmp_path.iterdir()] == [f"prefix-{b.key}.gguf"]
    with pytest.raises(InvalidArgumentError):
        PrefixStore(max_bytes=-1)


# --------------------------------------------------------------------------- #
# the VLM (both core families)
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def warm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, prefix_cache=True, **KW) as v:
        yield v


@pytest.fixture(scope="module")
def cold(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, **KW) as v:
        yield v


@pytest.fixture(scope="module")
def images(demo_image, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix-images")
    rng = np.random.default_rng(3)
    out = {"demo": Path(demo_image)}
    for name, (w, h) in (("noise", (224, 224)), ("wide", (320, 160))):
        p = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out[name] = p
    return out


def _selection(pr: dict) -> tuple:
    return (pr.get("ratio"), pr.get("tau"))


def _cells(vlm: VLM, prompt: str, imgs: list, ans: Any, pr: dict) -> list[tuple]:
    """One label per KV cell of a prompt: text token ids; image cells by digest, pruning and kept index."""
    arrays = [load_image(i) for i in imgs]
    out: list[tuple] = []
    with vlm.projector.tokenize(prompt, arrays) as p:
        for c in p.chunks:
            if isinstance(c, TextChunk):
                out += [("t", t) for t in c.tokens]
            else:
                d = image_digest(arrays[c.image_index])
                out += [("i", d, _selection(pr), j) for j in ans.images[c.image_index]["kept"]]
    return out


def _expected_skip(prev: list[tuple], new: list[tuple]) -> int:
    n = 0
    while n < min(len(prev), len(new)) and prev[n] == new[n]:
        n += 1
    return n - 1 if n == len(new) else n


def _question(vlm: VLM, q: str, n_images: int) -> str:
    return vlm.render_question(q, n_images)


def _same(a: Any, b: Any) -> None:
    assert a.tokens == b.tokens, (a.text, b.text)
    assert [r.tokens for r in a.rollouts] == [r.tokens for r in b.rollouts]
    assert [im["kept"] for im in a.images] == [im["kept"] for im in b.images]
    assert a.prompt_tokens == b.prompt_tokens


@pytest.mark.parametrize("pr", PRUNINGS, ids=PRUNING_IDS)
def test_second_question_about_one_image_reuses_it_and_matches_a_cold_run(warm, cold, images, pr):
    img = [images["demo"]]
    a1 = warm.ask(img, "What is in the picture?", max_tokens=12, **pr)
    a2 = warm.ask(img, "How many shapes are there?", max_tokens=12, **pr)
    c2 = cold.ask(img, "How many shapes are there?", max_tokens=12, **pr)
    _same(a2, c2)
    assert not c2.prefix_reused and c2.tokens_skipped == 0
    want = _expected_skip(_cells(warm, _question(warm, "What is in the picture?", 1), img, a1, pr),
                          _cells(warm, _question(warm, "How many shapes are there?", 1), img, a2, pr))
    assert a2.prefix_reused and a2.tokens_skipped == want
    assert a2.tokens_skipped > sum(a2.kept_tokens)  # the image and the text before it
    assert a2.timings["encode_s"] == 0.0
    d = a2.to_dict()
    assert d["prefix_reused"] is True and d["tokens_skipped"] == want


@pytest.mark.parametrize("pr", PRUNINGS[:2], ids=PRUNING_IDS[:2])
@pytest.mark.parametrize("mode", ["parallel", "snapshot"])
def test_k_rollouts_on_a_reused_prefix_equal_a_cold_run_with_the_same_seed(warm, cold, images, pr, mode):
    img = [images["demo"]]
    warm.ask(img, "Describe it.", max_tokens=4, **pr)
    a = warm.ask(img, "Which colour?", max_tokens=10, k=3, seed=11, mode=mode, **pr)
    c = cold.ask(img, "Which colour?", max_tokens=10, k=3, seed=11, mode=mode, **pr)
    assert a.prefix_reused and a.tokens_skipped > sum(a.kept_tokens)
    _same(a, c)
    assert [r.seed for r in a.rollouts] == [r.seed for r in c.rollouts]


@pytest.mark.parametrize("pr", PRUNINGS[:2], ids=PRUNING_IDS[:2])
def test_multi_image_prompt_reuses_images_up_to_the_first_changed_one(warm, cold, images, pr):
    q = "Compare the images."
    ab, ac = [images["demo"], images["noise"]], [images["demo"], images["wide"]]
    a1 = warm.ask(ab, q, max_tokens=8, **pr)
    a2 = warm.ask(ab, "Which is brighter?", max_tokens=8, **pr)
    _same(a2, cold.ask(ab, "Which is brighter?", max_tokens=8, **pr))
    assert a2.tokens_skipped == _expected_skip(_cells(warm, _question(warm, q, 2), ab, a1, pr),
                                               _cells(warm, _question(warm, "Which is brighter?", 2), ab, a2, pr))
    assert a2.tokens_skipped > sum(a2.kept_tokens)  # both images
    a3 = warm.ask(ac, "Which is brighter?", max_tokens=8, **pr)  # the second image changed
    _same(a3, cold.ask(ac, "Which is brighter?", max_tokens=8, **pr))
    want = _expected_skip(_cells(warm, _question(warm, "Which is brighter?", 2), ab, a2, pr),
                          _cells(warm, _question(warm, "Which is brighter?", 2), ac, a3, pr))
    assert a3.tokens_skipped == want and a3.kept_tokens[0] <= want < a3.kept_tokens[0] + a3.prompt_tokens - sum(
        a3.kept_tokens)


def _turns(*texts: str) -> list[dict]:
    """A conversation: the first user turn carries the image, then assistant / user turns alternate."""
    msgs: list[dict] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "avis-image://0"}},
                                                     {"type": "text", "text": texts[0]}]}]
    for i, t in enumerate(texts[1:]):
        msgs.append({"role": "assistant" if i % 2 == 0 else "user", "content": t})
    return msgs


@pytest.mark.parametrize("pr", PRUNINGS[:2], ids=PRUNING_IDS[:2])
def test_follow_up_turn_and_regeneration_reuse_the_conversation(warm, cold, images, pr):
    img = [images["demo"]]
    p1 = warm.render_messages(_turns("What is this?"), ["avis-image://0"])
    a1 = warm.generate(p1, img, max_tokens=8, **pr)
    p2 = warm.render_messages(_turns("What is this?", a1.text, "And its colour?"), ["avis-image://0"])
    a2 = warm.generate(p2, img, max_tokens=8, **pr)
    _same(a2, cold.generate(p2, img, max_tokens=8, **pr))
    assert a2.tokens_skipped == _expected_skip(_cells(warm, p1, img, a1, pr), _cells(warm, p2, img, a2, pr))
    assert a2.tokens_skipped >= a1.prompt_tokens  # the whole first turn
    regen = warm.generate(p2, img, max_tokens=8, **pr)  # the same request again
    assert regen.tokens_skipped == regen.prompt_tokens - 1 and regen.tokens == a2.tokens


@pytest.mark.parametrize("change", ["other_image", "other_pruning", "pruned_vs_unpruned", "edited_turn"])
def test_a_changed_key_part_never_hits(warm, cold, images, change):
    q = "What is this?"
    img, pr1, pr2, img2 = [images["demo"]], {"ratio": 0.5}, {"ratio": 0.5}, [images["demo"]]
    p1 = warm.render_messages(_turns(q, "Shapes.", "Colour?"), ["avis-image://0"])
    p2 = p1
    if change == "other_image":
        img2 = [images["noise"]]
    elif change == "other_pruning":
        pr2 = {"ratio": 0.25}
    elif change == "pruned_vs_unpruned":
        pr2 = {}
    else:
        p2 = warm.render_messages(_turns(q, "Circles.", "Colour?"), ["avis-image://0"])
    a1 = warm.generate(p1, img, max_tokens=6, **pr1)
    a2 = warm.generate(p2, img2, max_tokens=6, **pr2)
    _same(a2, cold.generate(p2, img2, max_tokens=6, **pr2))
    want = _expected_skip(_cells(warm, p1, img, a1, pr1), _cells(warm, p2, img2, a2, pr2))
    assert a2.tokens_skipped == want
    with warm.projector.tokenize(p1, [load_image(i) for i in img]) as pt:
        before_image = len(pt.chunks[0].tokens)
    if change == "edited_turn":
        assert sum(a2.kept_tokens) < want < a2.prompt_tokens - 4  # the image, not the edited answer
    else:
        assert want <= before_image  # nothing from the image on


def test_another_model_never_hits_a_shared_store(vlm_fixture, images, tmp_path):
    from convert.fixtures import make_fixture

    other = make_fixture(vlm_fixture.family, "tiny", seed=1, out_dir=tmp_path)
    store = PrefixStore()
    img = [images["demo"]]
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, prefix_cache=True, prefix_store=store, **KW) as a:
        a.ask(img, "Q one?", max_tokens=4)
        a.ask([images["noise"]], "Q one?", max_tokens=4)  # the first prompt goes to the store
        assert len(store) == 1 and a.ask(img, "Q one?", max_tokens=4).tokens_skipped > 0
    with VLM(other.model, other.mmproj, prefix_cache=True, prefix_store=store, **KW) as b, \
            VLM(other.model, other.mmproj, **KW) as b_cold:
        got = b.ask(img, "Q one?", max_tokens=4)
        assert not got.prefix_reused and got.tokens_skipped == 0
        _same(got, b_cold.ask(img, "Q one?", max_tokens=4))


def test_store_brings_back_an_earlier_conversation_in_process_and_after_a_restart(vlm_fixture, cold, images,
                                                                                 tmp_path):
    demo, noise = [images["demo"]], [images["noise"]]
    pr = {"ratio": 0.5}
    store = PrefixStore(max_bytes=64 << 20, directory=tmp_path)
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, prefix_cache=True, prefix_store=store, **KW) as v:
        v.ask(demo, "First?", max_tokens=4, **pr)
        v.ask(noise, "First?", max_tokens=4, **pr)  # replaces the live prompt: demo's goes to the store
        back = v.ask(demo, "Second?", max_tokens=8, **pr)
        assert back.tokens_skipped > sum(back.kept_tokens)
        _same(back, cold.ask(demo, "Second?", max_tokens=8, **pr))
        info = v.prefix_cache_info()
        assert info["store_entries"] >= 2 and info["store_bytes"] > 0 and info["disk_bytes"] > 0
        assert info["live_tokens"] == back.prompt_tokens and info["live_bytes"] > 0
    assert all(p.name.startswith("prefix-") for p in tmp_path.iterdir())
    restarted = PrefixStore(max_bytes=64 << 20, directory=tmp_path)
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, prefix_cache=True, prefix_store=restarted, **KW) as v2:
        a = v2.ask(noise, "Third?", max_tokens=8, **pr)
        assert a.tokens_skipped > sum(a.kept_tokens) and a.timings["encode_s"] == 0.0
        _same(a, cold.ask(noise, "Third?", max_tokens=8, **pr))


def test_namespaces_never_share_and_state_is_clean_after_each_query(warm, cold, images):
    prompt = warm.render_question("Namespaced?", 1)
    img = [images["wide"]]
    a = warm.generate(prompt, img, max_tokens=6, k=2, cache_namespace="alice")
    b = warm.generate(prompt, img, max_tokens=6, k=2, cache_namespace="bob")
    assert b.tokens_skipped == 0 and not b.prefix_reused
    _same(b, cold.generate(prompt, img, max_tokens=6, k=2))
    again = warm.generate(prompt, img, max_tokens=6, k=2, cache_namespace="bob")
    assert again.tokens_skipped == again.prompt_tokens - 1
    # only the prompt's cells stay: sequence 0 up to the last prompt position, no rollout sequences
    ctx = warm.ctx
    with warm.projector.tokenize(prompt, [load_image(i) for i in img]) as pt:
        n_pos = pt.n_pos  # unpruned: the prompt's positions (an M-RoPE image spans fewer than its tokens)
    assert (ctx.seq_pos_min(0), ctx.seq_pos_max(0)) == (0, n_pos - 1)
    assert all(ctx.seq_pos_max(i) == -1 for i in range(1, warm.settings.n_seq_max))
    assert warm.prefix_cache_info()["live_tokens"] == again.prompt_tokens
    del a


def test_a_failed_query_drops_the_cache_and_the_next_one_is_cold_and_correct(warm, cold, images):
    img = [images["demo"]]
    warm.ask(img, "Before?", max_tokens=4)
    with pytest.raises(ImageError):
        warm.generate(warm.render_question("Broken?", 1), [], max_tokens=4)  # marker without an image
    a = warm.ask(img, "Before?", max_tokens=6)
    assert a.tokens_skipped == 0
    _same(a, cold.ask(img, "Before?", max_tokens=6))


def test_reuse_is_switchable_per_call_and_by_the_vlm(warm, cold, images):
    img = [images["demo"]]
    warm.ask(img, "Switch?", max_tokens=4)
    off = warm.ask(img, "Switch?", max_tokens=6, reuse_prefix=False)
    assert off.tokens_skipped == 0
    assert cold.ask(img, "Switch?", max_tokens=6).tokens_skipped == 0  # prefix_cache defaults to off
    on = cold.ask(img, "Switch?", max_tokens=6, reuse_prefix=True)
    assert on.tokens_skipped == 0  # nothing kept yet
    again = cold.ask(img, "Switch?", max_tokens=6, reuse_prefix=True)
    assert again.tokens_skipped == again.prompt_tokens - 1 and again.tokens == off.tokens
    cold.clear_prefix_cache()
    assert cold.prefix_cache_info()["live_tokens"] == 0


def test_snapshot_query_is_never_mixed_with_the_cache(warm, cold, images):
    img = [images["demo"]]
    warm.ask(img, "Snap?", max_tokens=4)
    snap = warm.snapshot(img)
    a = warm.ask(None, "Snap?", max_tokens=6, snapshot=snap)
    assert not a.prefix_reused
    _same(a, cold.ask(None, "Snap?", max_tokens=6, snapshot=snap))
    assert warm.ask(img, "Snap?", max_tokens=6).tokens_skipped == 0  # the snapshot query cleared the context


# --------------------------------------------------------------------------- #
# the chat handler and the server
# --------------------------------------------------------------------------- #

def _chat(url: str, *texts: str) -> list[dict]:
    msgs: list[dict] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "text", "text": texts[0]}]}]
    for i, t in enumerate(texts[1:]):
        msgs.append({"role": "assistant" if i % 2 == 0 else "user", "content": t})
    return msgs


def test_chat_handler_second_turn_reuses_and_says_so(vlm_fixture, demo_image):
    import base64

    import llama_cpp

    from avis_llamacpp.chat_handler import AVISChatHandler

    url = "data:image/png;base64," + base64.b64encode(Path(demo_image).read_bytes()).decode()
    out = {}
    for cache in (True, False):
        h = AVISChatHandler(clip_model_path=str(vlm_fixture.mmproj), flash_attn=False, prefix_cache=cache)
        llm = llama_cpp.Llama(model_path=str(vlm_fixture.model), chat_handler=h, n_ctx=N_CTX, n_threads=1,
                              n_threads_batch=1, verbose=False)
        try:
            kw = dict(temperature=0.0, repeat_penalty=1.0, max_tokens=8)
            first = llm.create_chat_completion(messages=_chat(url, "What is this?"), **kw)
            text = first["choices"][0]["message"]["content"]
            second = llm.create_chat_completion(messages=_chat(url, "What is this?", text, "Colour?"), **kw)
            out[cache] = (first, second)
            if cache:  # the same turn again, streamed: a regeneration, reported in the last chunk's avis field
                chunks = list(llm.create_chat_completion(messages=_chat(url, "What is this?", text, "Colour?"),
                                                         stream=True, **kw))
                streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                assert streamed == second["choices"][0]["message"]["content"]
                assert chunks[-1]["avis"]["tokens_skipped"] == second["usage"]["prompt_tokens"] - 1
        finally:
            llm.close()
    (f_on, s_on), (f_off, s_off) = out[True], out[False]
    assert [r["choices"][0]["message"]["content"] for r in (f_on, s_on)] == \
        [r["choices"][0]["message"]["content"] for r in (f_off, s_off)]
    assert s_on["avis"]["prefix_reused"] is True and s_on["avis"]["tokens_skipped"] >= f_on["usage"]["prompt_tokens"]
    assert s_off["avis"]["prefix_reused"] is False and s_off["avis"]["tokens_skipped"] == 0


class _ChatClient(ASGIClient):
    """Chat-completion requests as JSON, with chosen headers and client address."""

    def chat(self, body: dict, headers: Sequence[tuple[bytes, bytes]] = (),
             client: str = "127.0.0.1") -> tuple[int, dict]:
        status, raw = self.post("/v1/chat/completions", json.dumps(body).encode(), headers, client)
        return status, json.loads(raw)


@pytest.fixture(scope="module")
def server(llava_fixture, tmp_path_factory):
    from avis_llamacpp.server import build_parser, create_avis_app

    cache_dir = tmp_path_factory.mktemp("server-prefix-cache")
    args = build_parser().parse_args([
        "--model", str(llava_fixture.model), "--clip_model_path", str(llava_fixture.mmproj), "--chat_format", "avis",
        "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "false",
        "--avis_flash_attn", "off", "--avis_prefix_cache_bytes", str(64 << 20),
        "--avis_prefix_cache_dir", str(cache_dir)])
    app, _ = create_avis_app(args)
    c = _ChatClient(app)
    yield c, cache_dir
    c.close()


def test_server_clients_never_see_each_others_cached_prompts(server, demo_image):
    import base64

    client, cache_dir = server
    url = "data:image/png;base64," + base64.b64encode(Path(demo_image).read_bytes()).decode()
    body = {"messages": _chat(url, "Server question?"), "max_tokens": 4, "temperature": 0.0}
    alice = [(b"authorization", b"Bearer alice")]
    bob = [(b"authorization", b"Bearer bob")]
    s1, r1 = client.chat(body, alice)
    s2, r2 = client.chat(body, bob)  # the same request from another client: not reused, same answer
    s3, r3 = client.chat(body, alice)  # alice again: her prompt comes back from the store
    s4, r4 = client.chat({**body, "user": "carol"}, alice)  # another end user behind alice's key
    s5, r5 = client.chat(body, alice, client="10.0.0.7")  # another address
    assert (s1, s2, s3, s4, s5) == (200,) * 5
    assert r2["avis"]["prefix_reused"] is False and r2["avis"]["tokens_skipped"] == 0
    assert r3["avis"]["prefix_reused"] is True and r3["avis"]["tokens_skipped"] == r3["usage"]["prompt_tokens"] - 1
    assert r4["avis"]["tokens_skipped"] == 0 and r5["avis"]["tokens_skipped"] == 0
    texts = {r["choices"][0]["message"]["content"] for r in (r1, r2, r3, r4, r5)}
    assert len(texts) == 1
    # a client cannot name a snapshot (or any file) for the server to load
    for key in ("snapshot", "prefix_file", "cache_dir"):
        st, err = client.chat({**body, "avis": {key: str(next(cache_dir.iterdir()))}}, alice)
        assert st == 400 and err["error"]["param"] == f"avis.{key}"
    st, r6 = client.chat({**body, "avis": {"reuse_prefix": False}}, alice)
    assert st == 200 and r6["avis"]["tokens_skipped"] == 0
    st, err = client.chat({**body, "avis": {"reuse_prefix": "yes"}}, alice)
    assert st == 400 and err["error"]["param"] == "avis.reuse_prefix"
    assert all(p.name.startswith("prefix-") and p.suffix == ".gguf" for p in cache_dir.iterdir())
