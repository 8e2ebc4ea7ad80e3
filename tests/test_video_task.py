"""The synthetic video task (convert/video_task.py): every answer is checked against a reading of the rendered
frames alone (objects found by their palette colour, centroids and presence computed from pixels), the splits
are disjoint and seeded, and the exported records point at the frames they describe."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from convert.shapes_task import COLOURS, LETTERS
from convert.video_task import (CROWD, CROWD_KINDS, FRAME_SIZE, KINDS, N_FRAMES, QUIET_KINDS, QUIET_SHARE, SPLITS,
                                TEMPORAL_KINDS, export, make_item, render_clip)

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
NAMES = list(COLOURS)
MIN_PIXELS = 40  # the smallest object (a triangle of radius 8) covers about 80 pixels


def read_frames(frames: list[np.ndarray]) -> dict[str, list[tuple[int, np.ndarray | None]]]:
    """Per palette colour, per frame: (pixel count, centroid (x, y) or None), from saturated pixels labelled by
    their nearest palette colour (backgrounds and specks are grey)."""
    out: dict[str, list] = {c: [] for c in NAMES}
    for f in frames:
        px = f.reshape(-1, 3).astype(np.float32)
        saturated = px.max(1) - px.min(1) > 60
        nearest = np.argmin(((px[:, None, :] - PALETTE[None]) ** 2).sum(-1), axis=1)
        ys, xs = np.divmod(np.arange(px.shape[0]), f.shape[1])
        for i, c in enumerate(NAMES):
            m = saturated & (nearest == i)
            n = int(m.sum())
            out[c].append((n, np.array([xs[m].mean(), ys[m].mean()]) if n >= MIN_PIXELS else None))
    return out


def present(reading, colour: str) -> list[bool]:
    return [n >= MIN_PIXELS for n, _ in reading[colour]]


def answer_text(item) -> str:
    q = item.question
    return q.options[LETTERS.index(q.answer)]


def check_by_pixels(item) -> None:
    """Assert the item's answer from its frames alone."""
    q = item.question
    frames = render_clip(item.clip)
    busy = [t for t in range(len(frames)) if t not in item.clip.quiet]  # frames outside the quiet stretch
    reading = read_frames(frames)
    in_clip = [c for c in NAMES if any(present(reading, c))]
    ans = answer_text(item)
    if q.kind == "direction":
        colour = q.text.split()[4]  # "Which way does the <colour> <shape> move?"
        p = [reading[colour][t][1] for t in busy]
        d = p[-1] - p[0]
        axis = 0 if abs(d[0]) > abs(d[1]) else 1
        assert abs(d[axis]) > (15 if len(busy) == len(frames) else 10) and abs(d[axis]) > 2 * abs(d[1 - axis])
        assert ans == (("right" if d[0] > 0 else "left") if axis == 0 else ("down" if d[1] > 0 else "up"))
    elif q.kind == "moving":
        movers = [c for c in in_clip if all(present(reading, c)[t] for t in busy)
                  and np.abs(reading[c][busy[-1]][1] - reading[c][busy[0]][1]).max() > 10]
        assert movers == [ans.split()[0]]
        # every option of another colour names a shape that is still or not in the clip
        assert all(o.split()[0] not in movers for o in q.options if o.split()[0] != ans.split()[0])
    elif q.kind in ("appear", "disappear"):
        seen = present(reading, ans.split()[0])
        first, last = (False, True) if q.kind == "appear" else (True, False)
        assert seen[0] is first and seen[1] is first and seen[-1] is last and seen[-2] is last
        for o in q.options:  # no option of another colour changes presence (colours are read, shapes are not)
            if o.split()[0] != ans.split()[0]:
                s = present(reading, o.split()[0])
                assert all(s) or not any(s)
        assert sum(1 for c in in_clip if not all(present(reading, c))) == 1
    elif q.kind == "order":
        def arrival(c):
            s = present(reading, c)
            return s.index(True) if any(s) else None
        a = arrival(ans.split()[0])
        assert a is not None and a > 0
        for o in q.options:
            if o.split()[0] != ans.split()[0] and arrival(o.split()[0]):  # another arrival (not there from the start)
                assert arrival(o.split()[0]) > a
    elif q.kind == "count":
        if q.text == "How many shapes are in the video?":
            assert int(ans) == len(in_clip)
        else:
            assert int(ans) <= len(in_clip)
    elif q.kind == "colour":
        assert all(present(reading, ans)[t] for t in busy)
    else:  # pragma: no cover
        raise AssertionError(q.kind)
    if q.kind in ("count", "colour", "direction", "moving"):  # nothing comes or goes outside the quiet stretch
        assert all(present(reading, c)[t] == (t in busy) for c in in_clip for t in range(len(frames)))
    else:
        assert item.clip.quiet == ()


@pytest.mark.parametrize("split", list(SPLITS))
def test_answers_match_the_frames(split):
    kinds = set()
    for i in range(70):
        item = make_item(split, i)
        kinds.add(item.question.kind)
        check_by_pixels(item)
    assert kinds == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_on_request(kind):
    for i in range(12):
        item = make_item("calibration", 1000 + i, kind)
        assert item.question.kind == kind
        assert len(set(item.question.options)) == 4
        check_by_pixels(item)


def _digest(item) -> str:
    h = hashlib.sha256()
    for f in render_clip(item.clip):
        h.update(f.tobytes())
    h.update(item.question.target.encode())
    return h.hexdigest()


def test_splits_disjoint_and_seeded():
    digests = {s: [_digest(make_item(s, i)) for i in range(60)] for s in SPLITS}
    assert digests["test"] == [_digest(make_item("test", i)) for i in range(60)]  # reproducible
    sets = [set(v) for v in digests.values()]
    assert all(len(s) == 60 for s in sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    with pytest.raises(ValueError, match="split"):
        make_item("dev", 0)
    with pytest.raises(ValueError, match="kind"):
        make_item("test", 0, "teleport")
    with pytest.raises(ValueError, match="quiet_share"):
        make_item("test", 0, quiet_share=1.5)


def test_clip_shape_and_kind_mix():
    counts = {k: 0 for k in KINDS}
    for i in range(300):
        counts[make_item("test", i).question.kind] += 1
    assert min(counts.values()) >= 20  # every kind well represented in the 300 test clips
    assert sum(counts[k] for k in TEMPORAL_KINDS) > 150
    frames = render_clip(make_item("test", 0).clip)
    assert len(frames) == N_FRAMES and all(f.shape == (FRAME_SIZE, FRAME_SIZE, 3) and f.dtype == np.uint8
                                           for f in frames)


def test_quiet_stretches():
    """A quiet stretch is whole frame pairs at the start or the end, rendered as the background alone (no saturated
    pixel, equal to the other quiet frames), in about QUIET_SHARE of the QUIET_KINDS items and no other item; a quiet
    count / colour clip has one busy pair, crowded with CROWD objects (counted from its pixels)."""
    quiet_items = eligible = 0
    spans = set()
    for i in range(300):
        item = make_item("test", i)
        clip = item.clip
        if item.question.kind not in QUIET_KINDS:
            assert clip.quiet == ()
            continue
        eligible += 1
        if not clip.quiet:
            continue
        quiet_items += 1
        q = clip.quiet
        assert len(q) % 2 == 0 and q[0] % 2 == 0 and list(q) == list(range(q[0], q[0] + len(q)))
        assert q[0] == 0 or q[-1] == N_FRAMES - 1
        assert len(q) == (6 if item.question.kind in ("count", "colour") else 2)
        spans.add((q[0] == 0, len(q)))
        frames = render_clip(clip)
        if item.question.kind in ("count", "colour"):  # crowded: the one busy pair holds 5-6 objects
            assert clip.crowded and CROWD[0] <= len(clip.tracks) <= CROWD[1]
            reading = read_frames([frames[t] for t in range(N_FRAMES) if t not in q][:1])
            assert sum(n >= MIN_PIXELS for c in NAMES for n, _ in reading[c]) == len(clip.tracks)
        for t in q:
            f = frames[t].reshape(-1, 3).astype(int)
            assert (f.max(1) - f.min(1) <= 60).all()  # background and specks only
            assert np.array_equal(frames[t], frames[q[0]])
        assert any(np.any(frames[t] != frames[q[0]]) for t in range(N_FRAMES) if t not in q)
    assert abs(quiet_items / eligible - QUIET_SHARE) < 0.12
    assert {(True, 2), (False, 2), (True, 6), (False, 6)} <= spans


def test_uncrowded_task_is_the_crowded_one_but_for_crowded_clips():
    """crowded=False (stage 5's task) changes only the quiet count / colour items: there the stretch is 1-3 pairs
    and no shape is added; every other item is the same item."""
    spans = set()
    for i in range(200):
        a, b = make_item("test", i), make_item("test", i, crowded=False)
        if a.question.kind in CROWD_KINDS and a.clip.quiet:
            assert b.clip.quiet and not b.clip.crowded and len(b.clip.tracks) <= len(a.clip.tracks)
            spans.add(len(b.clip.quiet))
        else:
            assert a == b
    assert spans == {2, 4, 6}


def test_export_records_point_at_their_frames(tmp_path):
    path = export("test", 5, tmp_path, start=3)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"video-test-{i:05d}" for i in range(3, 8)]
    for r in recs:
        item = make_item("test", int(r["id"].rsplit("-", 1)[1]))
        assert r["answer"] == item.question.answer and r["kind"] == item.question.kind
        assert r["temporal"] == (r["kind"] in TEMPORAL_KINDS)
        assert r["question"].splitlines()[1:] == [f"{L}. {o}" for L, o in zip(LETTERS, r["options"])]
        frames = [np.asarray(Image.open(tmp_path / p).convert("RGB")) for p in r["video"]]
        assert all(np.array_equal(a, b) for a, b in zip(frames, render_clip(item.clip)))
        assert len(frames) == r["n_frames"] == N_FRAMES
        assert r["quiet_frames"] == list(item.clip.quiet)
