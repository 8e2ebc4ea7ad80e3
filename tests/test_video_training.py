"""The video mirror and trainer (training/qwen_video.py, training/train_video_qwen.py) against stock llama.cpp.

Clips go through llama.cpp as the plugin feeds them (``VLM.ask(None, q, video=frames)``: each pair of frames one
temporal chunk); the PyTorch mirror must give the same first-step logits and greedy tokens, whole and pruned by
one KDV selection over the clip, on a small random pair whose second temporal conv is not zero. The trainer's
packed clip batches must give the same logits as the mirror's one-sequence forward of each question."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from avis_llamacpp import VLM
from convert import video_task
from convert.shapes_task import format_question, make_item, render

torch = pytest.importorskip("torch")

SMALL = argparse.Namespace(vit_embd=32, vit_heads=2, vit_ff=64, vit_layers=2, embd=64, layers=2, heads=4, ff=160)


def _random_image_model(seed: int = 0):
    from training.qwen_torch import ShapesQwenVLM
    from training.train_shapes_qwen import default_dims, qwen_vocab

    torch.manual_seed(seed)
    spec = qwen_vocab()
    model = ShapesQwenVLM(default_dims(spec.n_vocab, SMALL))
    with torch.no_grad():  # larger than the training init, so greedy margins are not ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model.eval(), spec


@pytest.fixture(scope="module")
def video_pair(tmp_path_factory):
    from training.qwen_video import from_image_model
    from training.train_video_qwen import write_video_pair

    image_model, spec = _random_image_model()
    model = from_image_model(image_model)
    with torch.no_grad():  # two different temporal convs, so the frame order inside a pair matters
        model.vision.patch1.normal_(0, 0.08)
    out = tmp_path_factory.mktemp("qwen-video")
    write_video_pair(model.eval(), out, spec)
    return out


def test_temporal_split_keeps_still_images():
    """from_image_model halves the patch conv over the two temporal convs: a still image's embeddings and keys are
    the image model's."""
    from training.qwen_video import from_image_model
    from training.vlm_torch import pixels

    image_model, _ = _random_image_model(1)
    video_model = from_image_model(image_model).eval()
    px = pixels(np.asarray(render(make_item("test", 0).scene))[None])
    with torch.no_grad():
        a, ka = image_model.vision(px)
        b, kb = video_model.vision(px)
    assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max()))
    assert torch.allclose(ka, kb, rtol=0, atol=1e-6 * float(ka.abs().max()))
    assert torch.equal(video_model.vision.patch, video_model.vision.patch1)


def test_video_mirror_matches_llama_cpp_whole_and_pruned(video_pair):
    from avis_llamacpp.kdv import kdv_scores
    from training.eval_video_vlm import llama_clip_prompt
    from training.qwen_torch import dims_from_gguf
    from training.qwen_video import SEPARATOR, load_video_from_gguf

    torch.set_num_threads(1)
    model, mmproj = video_pair / "model.gguf", video_pair / "mmproj.gguf"
    tm = load_video_from_gguf(model, mmproj, dims_from_gguf(model, mmproj))
    assert float(tm.vision.patch1.detach().abs().max()) > 0
    from avis_llamacpp.prompt import QWEN25VL
    from training.data import Tokenizer

    tok = Tokenizer(model, QWEN25VL)
    sep = tok.encode("".join(SEPARATOR))
    # flash attention off: llama.cpp's CPU flash path multiplies Q.K in f16 (~1e-2 relative on this random net)
    with VLM(model, mmproj, n_ctx=2048, n_threads=1, n_threads_batch=1, flash_attn=False) as vlm:
        for i in range(2):
            item = video_task.make_item("test", i)
            frames = video_task.render_clip(item.clip)
            text, q = format_question(item.question), item.question
            chunks, want = llama_clip_prompt(vlm, frames, text)
            assert chunks == [tok.prefix(), sep, sep, sep, tok.question(q)]  # the training layout is mtmd's
            whole = vlm.ask(None, text, video=frames, answer_tags=True, max_tokens=12)
            assert whole.image_tokens == [64] * 4
            out, first = tm.greedy_clip(frames, tok.prefix(), sep, tok.question(q), max_tokens=12, eos=tok.eos)
            got = first.double().numpy()
            assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
            assert out == whole.tokens
            # frames swapped inside each pair change the embeddings (W0 != W1): the mirror sees the order
            swapped = [frames[j ^ 1] for j in range(len(frames))]
            _, first_sw = tm.greedy_clip(swapped, tok.prefix(), sep, tok.question(q), max_tokens=1, eos=tok.eos)
            assert np.abs(first_sw.double().numpy() - got).max() > 1e-3 * np.abs(got).max()
            pruned = vlm.ask(None, text, video=frames, answer_tags=True, max_tokens=12, ratio=0.75)
            kept = np.concatenate([np.asarray(im["kept"]) + 64 * j for j, im in enumerate(pruned.images)])
            assert len(kept) == 64
            out_p, _ = tm.greedy_clip(frames, tok.prefix(), sep, tok.question(q), max_tokens=12, eos=tok.eos,
                                      kept=kept)
            assert out_p == pruned.tokens
            # the plugin selects once over the whole clip: the mirror's keys, all chunks together, pick the same
            with torch.no_grad():
                _, keys, _, _ = tm.encode_clip(frames)
            scores = kdv_scores(keys.double().numpy())
            assert np.array_equal(np.sort(np.argsort(-scores, kind="stable")[:64]), np.sort(kept))


def test_packed_clip_batch_equals_one_sequence_forward(video_pair):
    """video_inputs' packed rows (prefix, kept tokens by chunk, separators, several question branches under one
    block mask) give each answer token the logits of the mirror's own single-sequence forward of that question."""
    from avis_llamacpp.prompt import QWEN25VL
    from training.data import Tokenizer
    from training.qwen_torch import dims_from_gguf
    from training.qwen_video import load_video_from_gguf
    from training.train_video_qwen import VideoBatcher, video_inputs

    torch.set_num_threads(1)
    model, mmproj = video_pair / "model.gguf", video_pair / "mmproj.gguf"
    tm = load_video_from_gguf(model, mmproj, dims_from_gguf(model, mmproj))
    tok = Tokenizer(model, QWEN25VL)
    vb = VideoBatcher(tok, batch=2, seed=0, prune_prob=1.0)
    batch = vb.next()
    batch.update(n_keep=100, selector="kdv")
    assert any(len(p) > 1 for p in batch["pairs"])  # several branches share a clip
    with torch.no_grad():
        x, pos, pk, kept, _ = video_inputs(tm, batch, vb.prefix, vb.sep, seed=0)
        packed = tm.text.logits(tm.text.hidden(x, pos, pk["mask"]))
        n_checked = 0
        L = pk["rest"].shape[1] // max(len(p) for p in batch["pairs"])
        P = x.shape[1] - pk["rest"].shape[1]
        for b, pairs in enumerate(batch["pairs"]):
            img, _, nx, ny = tm.encode_clip(batch["frames"][b])
            for j, (q, t) in enumerate(pairs):
                xs, ps = tm.clip_prompt(vb.prefix, img, kept[b].numpy(), 4, nx, ny, vb.sep, q + t)
                single = tm.text.logits(tm.text.hidden(xs, ps, None))[0]
                n_rest = len(q) + len(t)
                got = packed[b, P + j * L:P + j * L + n_rest]
                want = single[-n_rest:]
                assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
                n_checked += 1
    assert n_checked >= 3


def test_video_batcher_questions_are_the_task_items():
    """Training clips are the video task's train split (never test), each asked its own question first."""
    from training.train_video_qwen import VideoBatcher

    class Tok:
        def prefix(self):
            return [1]

        def encode(self, s):
            return [2, 3]

        def question(self, q):
            return [len(q.text)]

        def target(self, q):
            return [ord(q.answer)]

    vb = VideoBatcher(Tok(), batch=3, seed=0, prune_prob=0.0)
    for i in range(3):
        item = video_task.make_item("train", i, quiet_share=0.0)
        qs = vb.questions(item, i)
        assert qs[0] == item.question
        extra = {q.kind for q in qs[1:]}
        assert extra <= {"count", "colour"}
        if extra:
            assert all(all(tr.visible) for tr in item.clip.tracks)
    b = vb.next()
    assert b["frames"].shape == (3, video_task.N_FRAMES, video_task.FRAME_SIZE, video_task.FRAME_SIZE, 3)
    assert b["n_keep"] == 256 and b["selector"] == "none"
    assert b["pairs"][0][0] == ([len(video_task.make_item("train", 0).question.text)],
                                [ord(video_task.make_item("train", 0).question.answer)])
    # --quiet-share: the batcher's clips are the task's items at that share (0 by default: stages 1-4's task);
    # extra count / colour questions also on quiet clips, whose shapes are all on screen outside the stretch
    quiet = VideoBatcher(Tok(), batch=1, seed=0, prune_prob=0.0, quiet_share=1.0)
    n_quiet = 0
    for i in range(40):
        item = video_task.make_item("train", i, quiet_share=1.0)
        frames, pairs, _ = quiet.sample(i)
        assert np.array_equal(frames, np.stack(video_task.render_clip(item.clip)))
        if item.clip.quiet:  # the default batcher's clip keeps its shapes on screen
            assert not np.array_equal(vb.sample(i)[0], frames)
        n_quiet += bool(item.clip.quiet)
        if item.clip.quiet and item.question.kind in ("count", "colour"):
            assert len(pairs) > 1
    assert n_quiet > 10
    # --no-crowd: the clips of stage 5's task (make_item(crowded=False)), which differ on quiet count / colour clips
    stage5 = VideoBatcher(Tok(), batch=1, seed=0, prune_prob=0.0, quiet_share=1.0, crowded=False)
    n_differ = 0
    for i in range(20):
        item = video_task.make_item("train", i, quiet_share=1.0, crowded=False)
        frames = stage5.sample(i)[0]
        assert np.array_equal(frames, np.stack(video_task.render_clip(item.clip)))
        n_differ += not np.array_equal(frames, quiet.sample(i)[0])
    assert n_differ > 0
    with pytest.raises(ValueError, match="quiet_share"):
        VideoBatcher(Tok(), batch=1, seed=0, prune_prob=0.0, quiet_share=1.5)


def test_video_batcher_pruning_draws_the_asked_keep_range_and_selectors():
    """--prune-keep and --prune-selectors: pruned batches keep a share inside the range, selectors come at the asked
    rates (a sample of 4000 draws against the probabilities), unpruned ones keep every token; bad values raise."""
    from training.train_video_qwen import VideoBatcher

    class Tok:
        def prefix(self):
            return [1]

        def encode(self, s):
            return [2]

    vb = VideoBatcher(Tok(), batch=1, seed=3, prune_prob=0.8, keep_range=(0.2, 0.4), selector_probs=(6, 3, 1))
    draws = [vb.pruning(256) for _ in range(4000)]
    pruned = [(k, s) for k, s in draws if s != "none"]
    assert all(k == 256 for k, s in draws if s == "none")
    assert abs(len(pruned) / len(draws) - 0.8) < 0.03
    assert min(k for k, _ in pruned) >= round(0.2 * 256) and max(k for k, _ in pruned) <= round(0.4 * 256)
    assert np.mean([k for k, _ in pruned]) == pytest.approx(0.3 * 256, rel=0.03)
    for name, p in (("kdv", 0.6), ("random", 0.3), ("uniform", 0.1)):
        assert abs(sum(s == name for _, s in pruned) / len(pruned) - p) < 0.03
    for bad in ({"keep_range": (0.0, 0.5)}, {"keep_range": (0.6, 0.5)}, {"selector_probs": (1, -1, 1)},
                {"selector_probs": (1, 1)}):
        with pytest.raises(ValueError):
            VideoBatcher(Tok(), batch=1, seed=0, prune_prob=0.5, **bad)


def test_clip_token_labels_follow_the_pixels():
    """The per-token clip targets: a token labelled with a colour has that colour under its 14 px cell in the
    pair's frames, and a mover's tokens carry the direction its pixels move from the first to the last frame."""
    from tests.test_video_task import read_frames
    from training.train_video_qwen import MOTION, clip_token_labels

    colours = list(video_task.COLOURS)
    n_checked = 0
    for i in range(30):
        item = video_task.make_item("train", i, "direction")
        frames = video_task.render_clip(item.clip)
        lab = clip_token_labels(item.clip).reshape(3, 4, 8, 8)
        reading = read_frames(frames)
        for j in range(4):
            for y, x in zip(*np.nonzero(lab[0, j])):
                colour = colours[lab[0, j, y, x] - 1]
                cell = np.concatenate([f[y * 14:(y + 1) * 14, x * 14:(x + 1) * 14] for f in frames[2 * j:2 * j + 2]])
                dist = np.abs(cell.reshape(-1, 3).astype(int) - np.array(video_task.COLOURS[colour])).max(1)
                assert (dist < 60).sum() >= 4
                cs = [c for _, c in reading[colour] if c is not None]  # frames off a quiet stretch
                d = cs[-1] - cs[0]
                if np.abs(d).max() > 10:
                    axis = int(abs(d[1]) > abs(d[0]))
                    want = ("right" if d[0] > 0 else "left") if axis == 0 else ("down" if d[1] > 0 else "up")
                    assert MOTION[lab[2, j, y, x]] == want
                    n_checked += 1
                else:
                    assert MOTION[lab[2, j, y, x]] == "still"
    assert n_checked > 30


def test_eval_intervals_and_paired_counts():
    """bootstrap_ci and paired against hand-counted cases."""
    from training.eval_video_vlm import bootstrap_ci, paired

    assert bootstrap_ci([True] * 20) == (1.0, 1.0)
    lo, hi = bootstrap_ci([True, False] * 50)
    assert 0.38 < lo < 0.5 < hi < 0.62
    a = [{"greedy": g, "answer": "A"} for g in "AAAABBBA"]
    b = [{"greedy": g, "answer": "A"} for g in "BBBAAABB"]
    res = paired(a, b)
    assert (res["only_a"], res["only_b"]) == (4, 2) and res["diff"] == 0.25  # 5/8 right against 3/8
    assert res["ci95"][0] <= 0.25 <= res["ci95"][1]


def test_image_loader_gives_the_video_mirror_for_a_video_pair(video_pair):
    """qwen_torch.load_from_gguf (the image tools' loader) keeps the second temporal conv of a video pair."""
    from training.qwen_torch import dims_from_gguf, load_from_gguf
    from training.qwen_video import ShapesQwenVideoVLM

    m, p = video_pair / "model.gguf", video_pair / "mmproj.gguf"
    tm = load_from_gguf(m, p, dims_from_gguf(m, p))
    assert isinstance(tm, ShapesQwenVideoVLM) and float(tm.vision.patch1.detach().abs().max()) > 0


def test_scene_list_traces_name_the_first_and_last_frames():
    """--scene-lists traces list exactly the colours the first and the last frame show (read from pixels), left to
    right, and fit the 96-token decode budget with the option lines and tags."""
    from avis_llamacpp.prompt import QWEN25VL
    from tests.test_video_task import present, read_frames
    from training.data import Tokenizer
    from training.train_video_qwen import LISTED_KINDS, VideoBatcher, scene_list_think

    tok = Tokenizer("avis_llamacpp/data/shapes-qwen/model.gguf", QWEN25VL)
    vb = VideoBatcher(tok, batch=1, seed=0, prune_prob=0.0, scene_lists=True)
    n = 0
    for i in range(120):
        item = video_task.make_item("train", i)
        q = item.question
        if q.kind not in LISTED_KINDS:
            assert vb.target(q, item.clip) == tok.target(q)
            continue
        think = scene_list_think(q, item.clip)
        first, last = (part.split(": ", 1)[1] for part in think.split(". ")[:2])
        reading = read_frames(video_task.render_clip(item.clip))
        for listed, t in ((first, 0), (last, -1)):
            names = [] if listed == "nothing" else listed.split(", ")
            assert sorted(nm.split()[0] for nm in names) == sorted(c for c in reading if present(reading, c)[t])
            xs = [reading[nm.split()[0]][t][1][0] for nm in names]
            assert xs == sorted(xs)
        assert think.endswith(q.think) and len(vb.target(q, item.clip)) <= 90
        n += 1
    assert n > 20



def test_shuffled_scene_lists_name_the_same_shapes_in_other_orders():
    """--shuffled-lists: a share of the traces list the same shapes (the same multiset, read from the sorted trace)
    in a random order, deterministic per clip; share 0 gives the sorted traces and share 1 reorders some."""
    from avis_llamacpp.prompt import QWEN25VL
    from training.data import Tokenizer
    from training.train_video_qwen import LISTED_KINDS, VideoBatcher

    tok = Tokenizer("avis_llamacpp/data/shapes-qwen/model.gguf", QWEN25VL)
    plain = VideoBatcher(tok, batch=1, seed=0, prune_prob=0.0, scene_lists=True)
    mixed = VideoBatcher(tok, batch=1, seed=0, prune_prob=0.0, scene_lists=True, shuffled_lists=0.5)
    always = VideoBatcher(tok, batch=1, seed=0, prune_prob=0.0, scene_lists=True, shuffled_lists=1.0)
    n_reordered = {0.5: 0, 1.0: 0}
    n_listed = 0
    for i in range(200):
        item = video_task.make_item("train", i)
        q = item.question
        if q.kind not in LISTED_KINDS:
            continue
        n_listed += 1
        want = plain.target(q, item.clip, i)
        for share, vb in ((0.5, mixed), (1.0, always)):
            got = vb.target(q, item.clip, i)
            assert got == vb.target(q, item.clip, i)  # deterministic per clip index
            assert sorted(got) == sorted(want) and len(got) == len(want)  # same shapes, same words
            n_reordered[share] += got != want
    assert 0 < n_reordered[0.5] < n_reordered[1.0] < n_listed

def test_count_list_traces_name_every_shape_read_from_the_pixels():
    """--count-lists: a count trace names the colours a busy frame shows (read from pixels, quiet stretches and
    crowded clips included), left to right unshuffled, then the task's own count; shuffled traces name the same
    shapes and some in another order. Every target fits the 96-token decode budget."""
    from avis_llamacpp.prompt import QWEN25VL
    from tests.test_video_task import present, read_frames
    from training.data import Tokenizer
    from training.train_video_qwen import VideoBatcher, count_list_think

    tok = Tokenizer("avis_llamacpp/data/shapes-qwen/model.gguf", QWEN25VL)
    vb = VideoBatcher(tok, batch=1, seed=0, prune_prob=0.0, count_lists=True, shuffled_lists=1.0, quiet_share=0.5)
    n, n_quiet, n_reordered = 0, 0, 0
    for i in range(150):
        item = video_task.make_item("train", i, quiet_share=0.5)
        for q in vb.questions(item, i):
            if q.kind != "count":
                continue
            think = count_list_think(q, item.clip)
            listed, rest = think.split(". ", 1)
            names = listed.removeprefix("Shapes: ").split(", ")
            frames = video_task.render_clip(item.clip)
            busy = [t for t in range(len(frames)) if t not in item.clip.quiet]
            reading = read_frames(frames)
            t = busy[0]
            assert sorted(nm.split()[0] for nm in names) == sorted(c for c in reading if present(reading, c)[t])
            xs = [reading[nm.split()[0]][t][1][0] for nm in names]
            assert xs == sorted(xs)
            # the count the trace states is the listed shapes of the asked kind ("shapes": all of them)
            what = q.text.split()[2]
            counted = len(names) if what == "shapes" else sum(what in (nm.split()[1] + "s", nm.split()[1] + "es")
                                                              for nm in names)
            assert rest == q.think == f"I count {counted} {what}."
            got = vb.target(q, item.clip, i)
            assert sorted(got) == sorted(tok.target(dataclasses.replace(q, think=think))) and len(got) <= 90
            n_reordered += got != tok.target(dataclasses.replace(q, think=think))
            n += 1
            n_quiet += bool(item.clip.quiet)
    assert n > 40 and n_quiet > 5 and n_reordered > 5


def test_direction_place_traces_read_the_movers_cells_from_the_pixels():
    """--direction-places: a direction trace names the asked mover's token cell (14 px) in its first and last busy
    frame, which the pixels' centroid of its colour agrees with, and the way it names is the larger move between
    those cells; shuffled traces put last before first on some clips."""
    from avis_llamacpp.prompt import QWEN25VL
    from tests.test_video_task import read_frames
    from training.data import Tokenizer
    from training.train_video_qwen import VideoBatcher, direction_places_think

    tok = Tokenizer("avis_llamacpp/data/shapes-qwen/model.gguf", QWEN25VL)
    vb = VideoBatcher(tok, batch=1, seed=0, prune_prob=0.0, direction_places=True, shuffled_lists=1.0,
                      quiet_share=0.5)
    n, n_swapped = 0, 0
    for i in range(250):
        item = video_task.make_item("train", i, quiet_share=0.5)
        q = item.question
        if q.kind != "direction":
            continue
        think = direction_places_think(q, item.clip)
        colour = q.text.split()[4]
        frames = video_task.render_clip(item.clip)
        busy = [t for t in range(len(frames)) if t not in item.clip.quiet]
        reading = read_frames(frames)
        centroids = [reading[colour][t][1] for t in (busy[0], busy[-1])]
        m = re.fullmatch(r"The (\w+ \w+): first at row (\d), column (\d); last at row (\d), column (\d)\. (.*)",
                         think)
        assert m and m.group(1).split()[0] == colour and m.group(6) == q.think
        said = [(int(m.group(2)), int(m.group(3))), (int(m.group(4)), int(m.group(5)))]
        for (r, c), (x, y) in zip(said, centroids):  # the drawn shape's centroid lies in (or within 4 px of) the cell
            assert c * 14 - 4 <= x < c * 14 + 18 and r * 14 - 4 <= y < r * 14 + 18
        dx, dy = centroids[1] - centroids[0]
        way = ("down" if dy > 0 else "up") if abs(dy) > abs(dx) else ("right" if dx > 0 else "left")
        assert q.think == f"The {m.group(1)} moves {way}."
        got = tok.decode(vb.target(q, item.clip, i))
        words = sorted(re.findall(r"\w+", tok.decode(tok.target(dataclasses.replace(q, think=think)))))
        assert sorted(re.findall(r"\w+", got)) == words  # the same facts, perhaps in the other order
        n_swapped += got.index("last at") < got.index("first at")
        n += 1
    assert n > 20 and 0 < n_swapped < n


VIDEO_BUNDLE = Path(__file__).resolve().parents[1] / "avis_llamacpp" / "data" / "shapes-qwen-video"


@pytest.mark.skipif(not (VIDEO_BUNDLE / "mmproj.gguf").exists(), reason="clip-trained shapes model not bundled")
def test_bundled_video_model_answers_clips_and_matches_the_mirror():
    """The bundled clip-trained model: well above chance (0.25) on the first 40 test clips through llama.cpp, and
    the PyTorch mirror's greedy tokens equal llama.cpp's on two clips, whole and joint-pruned."""
    from training.eval_video_vlm import clip_rows, run_video_parity

    torch.set_num_threads(1)
    m, p = VIDEO_BUNDLE / "model.gguf", VIDEO_BUNDLE / "mmproj.gguf"
    with VLM(m, p, n_ctx=2048, n_threads=1, n_threads_batch=1) as vlm:
        rows = clip_rows(vlm, 40)
        assert np.mean([r["greedy"] == r["answer"] for r in rows]) >= 0.5
        for ratio in (None, 0.75):
            res = run_video_parity(vlm, m, p, 2, ratio=ratio)
            assert res["greedy_tokens_identical"] == 2, res["mismatches"]
