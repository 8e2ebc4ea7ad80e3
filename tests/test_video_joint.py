"""One KDV selection per video (the AVIS reference's Qwen2_5_VLModel.forward): every chunk of a video is scored
against one anchor and cut by one top-k (ratio) or one threshold (tau). Oracle: a plain numpy KDV over the
concatenated per-chunk keys, the keys read by encoding each chunk on its own. The clip is built so that its
frame pairs differ in key diversity, so a chunk-by-chunk selection keeps other tokens (checked here too)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avis_llamacpp import VLM
from avis_llamacpp.mtmd import ImageChunk

Q = "What happens in the video?"
SETTINGS = [{"ratio": 0.5}, {"ratio": 0.75}, {"ratio": 0.9}, {"tau": math.pi / 4}]


def _clip(n_frames: int = 6, size: int = 224, seed: int = 0) -> list[np.ndarray]:
    """Grey frames with pixel noise whose strength changes every frame pair (each pair is one chunk)."""
    rng = np.random.default_rng(seed)
    amps = [3.0, 80.0, 25.0]
    frames = []
    for i in range(n_frames):
        noise = rng.normal(0.0, amps[(i // 2) % len(amps)], (size, size, 3))
        frames.append(np.clip(128.0 + noise, 0, 255).astype(np.uint8))
    return frames


def _oracle_kept(keys: np.ndarray, *, ratio: float | None = None, tau: float | None = None) -> np.ndarray:
    """Numpy KDV: unit keys per head, one mean-direction anchor, score = -mean cosine, top-k or threshold."""
    unit = keys / np.linalg.norm(keys, axis=2, keepdims=True)
    anchor = unit.mean(axis=0)
    anchor /= np.linalg.norm(anchor, axis=1, keepdims=True)
    score = -(unit * anchor[None]).sum(axis=2).mean(axis=1)
    if ratio is not None:
        n_keep = max(1, math.floor((1 - ratio) * len(score) + 1e-9))
        return np.sort(np.argsort(-score, kind="stable")[:n_keep])
    kept = np.flatnonzero(score >= -math.cos(tau))
    return kept if kept.size else np.array([int(np.argmax(score))])  # a selection keeps at least one token


@pytest.fixture(scope="module")
def qwen_vlm(qwen_fixture):
    with VLM(qwen_fixture.model, qwen_fixture.mmproj, n_ctx=4096, n_threads=1, n_threads_batch=1) as v:
        yield v


@pytest.fixture(scope="module")
def chunk_keys(qwen_vlm):
    """Each chunk's scored keys, from encoding the chunks one by one (no selection involved)."""
    frames = _clip()
    out = []
    with qwen_vlm.projector.tokenize(qwen_vlm.render_question(Q, len(frames)), frames, video=True) as prompt:
        for c in prompt.chunks:
            if isinstance(c, ImageChunk):
                keys, source = qwen_vlm.token_keys(c, qwen_vlm.projector.encode(c))
                assert source.startswith("vit_keys:")
                out.append(keys)
    assert len(out) == 3  # 6 frames -> 3 temporal-patch chunks
    return out


def _kept_over_video(answer) -> np.ndarray:
    """Answer.images' per-chunk kept indices as indices into the whole video's tokens."""
    offsets = np.cumsum([0] + answer.image_tokens[:-1])
    return np.concatenate([np.asarray(im["kept"]) + off for im, off in zip(answer.images, offsets)])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}{v:.3g}" for k, v in s.items()))
def test_video_kept_set_is_one_selection(qwen_vlm, chunk_keys, setting):
    joint = _oracle_kept(np.concatenate(chunk_keys), **setting)
    offsets = np.cumsum([0] + [len(k) for k in chunk_keys[:-1]])
    per_chunk = np.concatenate([_oracle_kept(k, **setting) + off for k, off in zip(chunk_keys, offsets)])
    # the clip must tell the two rules apart, or this test could not catch a chunk-by-chunk selection
    assert not np.array_equal(joint, per_chunk)
    a = qwen_vlm.ask(None, Q, video=_clip(), max_tokens=1, **setting)
    assert a.image_tokens == [len(k) for k in chunk_keys]
    np.testing.assert_array_equal(_kept_over_video(a), joint)
    assert sum(a.kept_tokens) == joint.size
    group = a.images[0]["kdv"]["group"]
    assert group == {"chunks": 3, "n_total": sum(a.image_tokens), "n_kept": int(joint.size)}
    # per_chunk keeps the old rule: each frame pair against its own anchor
    b = qwen_vlm.ask(None, Q, video=_clip(), max_tokens=1, video_selection="per_chunk", **setting)
    np.testing.assert_array_equal(_kept_over_video(b), per_chunk)


@pytest.mark.parametrize("selector", ["random", "uniform", "embeddings"])
def test_video_baselines_choose_over_the_whole_video(qwen_vlm, chunk_keys, selector):
    """Baselines get the count one joint KDV selection keeps, and choose it over the whole video."""
    a = qwen_vlm.ask(None, Q, video=_clip(), max_tokens=1, ratio=0.75, selector=selector)
    n = sum(len(k) for k in chunk_keys)
    assert sum(a.kept_tokens) == max(1, math.floor(0.25 * n))
    kept = _kept_over_video(a)
    assert kept.size == np.unique(kept).size and kept.min() >= 0 and kept.max() < n
    if selector == "uniform":  # evenly spread over the video, not per chunk
        np.testing.assert_array_equal(kept, np.sort(kept))
        assert kept[0] < len(chunk_keys[0]) and kept[-1] >= n - len(chunk_keys[-1])


def test_second_question_about_a_video_reuses_its_prefill(qwen_fixture):
    """The prefix cache holds a video's pruned chunks: a follow-up question encodes nothing and equals a cold run."""
    frames = _clip()
    kw = {"max_tokens": 4, "ratio": 0.75}
    with VLM(qwen_fixture.model, qwen_fixture.mmproj, n_ctx=4096, n_threads=1, n_threads_batch=1,
             prefix_cache=True) as v:
        first = v.ask(None, Q, video=frames, **kw)
        second = v.ask(None, "Which way does it move?", video=frames, **kw)
        other = v.ask(None, "Which way does it move?", video=frames, video_selection="per_chunk", **kw)
    assert not first.prefix_reused and second.prefix_reused
    assert second.timings["encode_s"] == 0.0 and second.tokens_skipped >= sum(first.kept_tokens)
    assert [im["kept"] for im in second.images] == [im["kept"] for im in first.images]
    # another selection rule is another cache key: only the text before the video is reused
    assert other.timings["encode_s"] > 0 and other.tokens_skipped + sum(first.kept_tokens) <= second.tokens_skipped
    with VLM(qwen_fixture.model, qwen_fixture.mmproj, n_ctx=4096, n_threads=1, n_threads_batch=1) as cold_vlm:
        cold = cold_vlm.ask(None, "Which way does it move?", video=frames, **kw)
    assert second.tokens == cold.tokens


def test_video_file_is_sampled_and_answered_like_its_frames(qwen_vlm, tmp_path):
    """ask(video=clip.mp4): frames sampled at 2 fps from the file (an even count for the temporal patch), Answer.video
    records them, and the answer equals asking about the decoded frames directly."""
    from avis_llamacpp.video import load_video
    from convert.video_files import moving_shapes_clip, write_video

    path = write_video(moving_shapes_clip(30, size=112, seed=3), tmp_path / "clip.mp4", fps=10)  # 3 s at 10 fps
    a = qwen_vlm.ask(None, Q, video=str(path), max_tokens=4, ratio=0.75)
    assert a.video["frames"] == 6 and a.video["temporal_patch"] == 2  # 3 s x 2 fps
    assert a.video["timestamps"] == pytest.approx([i * 2.9 / 5 for i in range(6)], abs=0.06)
    assert len(a.image_tokens) == 3  # 6 frames -> 3 temporal-patch chunks
    frames = load_video(str(path), temporal_patch=2).frames
    b = qwen_vlm.ask(None, Q, video=frames, fps=10, max_tokens=4, ratio=0.75)
    assert b.video["frames"] == 6 and a.tokens == b.tokens and a.kept_tokens == b.kept_tokens


def test_bench_takes_video_items(qwen_fixture, tmp_path):
    """Items with a `video` field go through avis bench as clips: every chunk counted, KDV joint over the clip,
    and the per-chunk row keeps floor(0.25 n) of each frame pair instead."""
    import json

    from avis_llamacpp.bench import BenchConfig, run_bench
    from avis_llamacpp.kdv import n_keep_for_ratio
    from convert.video_files import moving_shapes_clip, write_video

    lines = []
    for i in range(2):
        write_video(moving_shapes_clip(8, size=112, seed=i), tmp_path / f"c{i}.mp4", fps=4)
        lines.append({"id": f"c{i}", "video": f"c{i}.mp4", "question": "Which way?", "options": ["left", "right"],
                      "answer": "A"})
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(d) + "\n" for d in lines))
    # rho 0.9 keeps floor(0.1 * 32) = 3 of the clip jointly but 2 x floor(0.1 * 16) = 2 chunk by chunk
    configs = [BenchConfig("vanilla"), BenchConfig("kdv rho=0.9", ratio=0.9),
               BenchConfig("kdv per-chunk rho=0.9", ratio=0.9, video_selection="per_chunk")]
    run_bench(str(qwen_fixture.model), str(qwen_fixture.mmproj), str(items), tmp_path / "out", configs=configs,
              max_tokens=2, progress=False, n_threads=1)
    recs = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    by = {(r["id"], r["config"]): r for r in recs}
    for i in range(2):
        n = by[(f"c{i}", "vanilla")]["kept_tokens"]
        # 8 frames at 4 fps = 2 s, sampled at 2 fps: 4 frames -> 2 chunks of 4x4 tokens
        assert n == by[(f"c{i}", "vanilla")]["image_tokens"] and n == 2 * 16
        assert by[(f"c{i}", "kdv rho=0.9")]["kept_tokens"] == n_keep_for_ratio(n, 0.9) == 3
        assert by[(f"c{i}", "kdv per-chunk rho=0.9")]["kept_tokens"] == 2 * n_keep_for_ratio(16, 0.9) == 2


def test_frame_by_frame_models_sample_what_the_context_holds(llava_fixture, tmp_path):
    """A model without temporal patches takes each frame as an image of a fixed token count: the default sampling
    takes at most half the context's worth of frames (evenly spread) instead of overflowing it."""
    from convert.video_files import moving_shapes_clip, write_video

    path = write_video(moving_shapes_clip(40, size=112, seed=1), tmp_path / "clip.mp4", fps=4)  # 10 s: 20 at 2 fps
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_threads=1, n_threads_batch=1) as v:
        per_frame = v.projector.image_tokens(np.zeros((112, 112, 3), np.uint8))
        a = v.ask(None, Q, video=str(path), max_tokens=2)
        assert v.projector.temporal_patch == 1
    assert a.video["frames"] == 512 // per_frame and a.image_tokens == [per_frame] * a.video["frames"]
    assert a.video["timestamps"][0] == 0.0 and a.video["timestamps"][-1] > 9.0  # spread over the whole clip


def test_items_take_a_clip_as_frame_files(qwen_vlm, tmp_path):
    """An item's `video` may list its frame files (what convert/video_task.py writes): they load in order and VLM.ask
    answers them exactly as the same frames passed as arrays; a missing frame or an empty list is refused by name."""
    import json

    from PIL import Image

    from avis_llamacpp.errors import InvalidArgumentError
    from avis_llamacpp.items import load_items

    frames = _clip(4, size=112)
    rels = []
    for t, f in enumerate(frames):
        (tmp_path / "clip").mkdir(exist_ok=True)
        Image.fromarray(f).save(tmp_path / "clip" / f"f{t}.png")
        rels.append(f"clip/f{t}.png")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "c", "video": rels, "question": Q, "options": ["a", "b"], "answer": "B"}) + "\n")
    (it,) = load_items(items)
    assert it.is_video and it.media()["video"] == [str((tmp_path / r).resolve()) for r in rels]
    assert it.as_dict()["video"] == rels
    got = qwen_vlm.ask(question=Q, max_tokens=3, ratio=0.75, **it.media())
    want = qwen_vlm.ask(None, Q, video=frames, max_tokens=3, ratio=0.75)
    assert got.image_tokens == want.image_tokens and len(got.image_tokens) == 2
    assert got.rollouts[0].tokens == want.rollouts[0].tokens
    np.testing.assert_array_equal(_kept_over_video(got), _kept_over_video(want))
    for bad, says in (([*rels[:3], "clip/f9.png"], "'clip/f9.png' not found"), ([], "list of frame paths")):
        items.write_text(json.dumps({"video": bad, "question": Q, "answer": "x"}) + "\n")
        with pytest.raises(InvalidArgumentError, match=says):
            load_items(items)


@pytest.mark.parametrize("tau", [math.pi / 6, math.pi / 4, math.pi / 3])
def test_tau_calibration_scores_a_clip_as_one_selection(qwen_vlm, chunk_keys, tau):
    """What calibration scores for a clip (tau.clip_scores) is what the query path keeps: one array over all chunks
    equal to the numpy oracle on the concatenated keys, whose count at a tau is the count VLM.ask keeps."""
    from avis_llamacpp.tau import clip_scores

    (scores,) = clip_scores(qwen_vlm, _clip())
    keys = np.concatenate(chunk_keys)
    assert scores.shape == (len(keys),)
    np.testing.assert_array_equal(np.flatnonzero(scores >= -math.cos(tau)), _oracle_kept(keys, tau=tau))
    a = qwen_vlm.ask(None, Q, video=_clip(), max_tokens=1, tau=tau)
    assert sum(a.kept_tokens) == max(1, int((scores >= -math.cos(tau)).sum()))


def test_bench_cli_names_clip_rows_and_the_policy_row(qwen_fixture, tmp_path):
    """`avis bench --configs` accepts the rows clips add (per-chunk KDV) when the items are clips, and a row name
    with a comma inside parentheses (the policy row's 'avis (policy K, tau=...)') as one name."""
    import json

    from PIL import Image

    from avis_llamacpp.bench import split_config_names
    from avis_llamacpp.cli import main

    assert split_config_names("vanilla, avis (policy K, tau=0.977),kdv rho=0.9") == [
        "vanilla", "avis (policy K, tau=0.977)", "kdv rho=0.9"]
    rels = []
    for t, f in enumerate(_clip(4, size=112)):
        Image.fromarray(f).save(tmp_path / f"f{t}.png")
        rels.append(f"f{t}.png")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "c", "video": rels, "question": Q, "options": ["a", "b"], "answer": "A"}) + "\n")
    out = tmp_path / "out"
    assert main(["bench", "-m", str(qwen_fixture.model), "--mmproj", str(qwen_fixture.mmproj), "--items", str(items),
                 "--out", str(out), "--configs", "kdv per-chunk rho=0.9", "--max-tokens", "2", "--threads", "1",
                 "--no-progress"]) == 0
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["config"] for r in recs) == ["kdv per-chunk rho=0.9", "vanilla"]
    # 2 chunks of 16 tokens: floor(0.1 * 16) = 1 each chunk by chunk
    assert {r["config"]: r["kept_tokens"] for r in recs} == {"vanilla": 32, "kdv per-chunk rho=0.9": 2}
