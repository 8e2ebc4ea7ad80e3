"""Seeded fuzzing of what users hand us, in worker subprocesses so a segfault / abort shows up as a failure:
mutated PNG / JPEG / GIF / WebP bytes through load_image + mtmd tokenize + encode, mutated and broken video files
through load_video + tokenize as a video + encode, and mutated model / mmproj GGUF files through loading and first
use. The long runs are benchmarks/fuzz_images.py."""

from __future__ import annotations

import time

import pytest

from benchmarks.fuzz_images import make_cases, run_fuzz, run_gguf_fuzz


def test_cases_are_reproducible():
    assert make_cases(20, seed=5) == make_cases(20, seed=5)
    assert make_cases(20, seed=5) != make_cases(20, seed=6)


@pytest.mark.parametrize("family,n", [("llava", 150), ("qwen25vl", 60)])
def test_mutated_images_never_crash(family, n, llava_fixture, qwen_fixture):
    fx = llava_fixture if family == "llava" else qwen_fixture
    rep = run_fuzz(fx.model, fx.mmproj, n, seed=0, timeout_s=300)
    assert rep.clean, rep.summary()
    assert rep.outcomes["ok"] + rep.outcomes["ImageError"] == n
    assert rep.outcomes["ok"] > 0 and rep.outcomes["ImageError"] > 0  # the mutations exercise both paths


@pytest.mark.parametrize("family", ["llava", "qwen25vl"])
def test_mutated_gguf_files_never_crash(family, llava_fixture, qwen_fixture):
    fx = llava_fixture if family == "llava" else qwen_fixture
    rep = run_gguf_fuzz(fx.model, fx.mmproj, 80, seed=1, timeout_s=300)
    assert rep.clean, rep.summary()
    assert rep.outcomes["ModelLoadError"] > 0


def test_the_harness_sees_a_crash(llava_fixture, monkeypatch):
    monkeypatch.setenv("AVIS_FUZZ_SELFTEST_CRASH", "00003-")
    rep = run_fuzz(llava_fixture.model, llava_fixture.mmproj, 8, seed=0, timeout_s=120)
    assert len(rep.crashes) == 1 and rep.crashes[0][0].startswith("00003-") and rep.crashes[0][1] != 0
    assert sum(rep.outcomes.values()) == 8 and rep.workers == 2  # the rest ran in a fresh worker
    assert not rep.clean


# -- video files: mutated mp4 / mov / webm / mkv / avi / GIF bytes and the known-broken set through load_video, then
# tokenized as one video and encoded, in worker subprocesses (a crash in FFmpeg or mtmd is a failure) --------------
VIDEO_WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
from avis_llamacpp import VLM
from avis_llamacpp.errors import VideoError
from avis_llamacpp.video import load_video
vlm = VLM(sys.argv[1], sys.argv[2], n_ctx=8192, n_seq_max=1, n_threads=1, n_threads_batch=1, capture_keys=True)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    name, hexdata = line.rstrip("\n").split("\t")
    print(json.dumps({"start": name}), flush=True)
    t0 = time.perf_counter()
    try:
        v = load_video(bytes.fromhex(hexdata), max_frames=8)
        with vlm.projector.tokenize(vlm.render_question("What happens?", len(v.frames)), v.frames, video=True) as p:
            for ch in p.images:
                assert vlm.projector.encode(ch).shape[0] == ch.n_tokens
        res = {"outcome": "ok", "frames": len(v.frames)}
    except VideoError as e:
        res = {"outcome": "VideoError", "msg": str(e)[:160]}
    except Exception as e:
        res = {"outcome": type(e).__name__, "msg": str(e)[:300]}
    if name.startswith(("valid-", "broken-")) and res["outcome"] != ("ok" if name[0] == "v" else "VideoError"):
        res["outcome"] = "wrong-" + res["outcome"]  # an unmutated file failed, or a known-broken one passed
    res.update(name=name, s=round(time.perf_counter() - t0, 4))
    print(json.dumps(res), flush=True)
"""


def video_cases(n: int, seed: int, work_dir) -> list[tuple[str, bytes]]:
    """n seeded mutations of small valid clips, then the known-broken files, then the unmutated clips (which must
    still decode and encode after everything before them in the same worker)."""
    import random

    from PIL import Image

    from benchmarks.fuzz_images import mutate
    from convert.video_files import malformed_videos, moving_shapes_clip, write_video

    clip = moving_shapes_clip(8, (32, 32), seed=7)
    seeds = {ext: write_video(clip, work_dir / f"seed{ext}", 8).read_bytes()
             for ext in (".mp4", ".mov", ".webm", ".mkv", ".avi")}
    gif = work_dir / "seed.gif"
    Image.fromarray(clip[0]).save(gif, save_all=True, append_images=[Image.fromarray(c) for c in clip[1:]],
                                  duration=125)
    seeds[".gif"] = gif.read_bytes()
    rng = random.Random(seed)
    names = sorted(seeds)
    cases = []
    for i in range(n):
        name = rng.choice(names)
        data, ops = seeds[name], []
        for _ in range(rng.choice((1, 1, 2))):
            op, data = mutate(data, seeds, rng)
            ops.append(op)
            if not data:
                break
        cases.append((f"{i:05d}{name}:{'+'.join(ops)}", data))
    cases += [(f"broken-{k}", v) for k, v in sorted(malformed_videos(work_dir / "bad").items())]
    return cases + [(f"valid-{k}", v) for k, v in sorted(seeds.items())]


def test_mutated_videos_never_crash(qwen_fixture, tmp_path):
    from benchmarks.fuzz_images import FuzzReport, _drive

    cases = video_cases(40, seed=0, work_dir=tmp_path)
    rep = FuzzReport(cases=len(cases), seconds=0.0)
    t0 = time.perf_counter()
    _drive(VIDEO_WORKER, [str(qwen_fixture.model), str(qwen_fixture.mmproj)],
           [(name, data.hex()) for name, data in cases], rep, ("ok", "VideoError"), t0 + 300)
    rep.seconds = time.perf_counter() - t0
    assert rep.clean, rep.summary()
    assert rep.outcomes["ok"] + rep.outcomes["VideoError"] == len(cases)
    assert rep.outcomes["ok"] > 6 and rep.outcomes["VideoError"] > 11  # mutations reach both paths
