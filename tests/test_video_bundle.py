"""The bundled clip-trained model (avis_llamacpp/data/shapes-qwen-video/) through llama.cpp alone (no torch, so CI
runs it): it answers questions about clips, reads motion across the frames of a pair where the image model cannot,
still answers images, and its policy carries the tau its tau.json chose. Oracle: the video task's own answers
(checked against pixel centroids in tests/test_video_task.py) and the image task's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avis_llamacpp import VLM, load_policy
from avis_llamacpp.defaults import TRAINED_DIR, VIDEO_DIR
from convert import shapes_task
from convert.gguf_tensors import read_tensors
from training.eval_video_vlm import clip_rows

pytestmark = pytest.mark.skipif(not (VIDEO_DIR / "model.gguf").is_file(), reason="clip-trained model not bundled")
N_CLIPS = 60


def _vlm(d):
    return VLM(d / "model.gguf", d / "mmproj.gguf", n_ctx=2048, n_threads=1, n_threads_batch=1)


def _accuracy(rows, temporal=None):
    rows = [r for r in rows if temporal is None or r["temporal"] == temporal]
    return float(np.mean([r["greedy"] == r["answer"] for r in rows]))


def test_bundled_clip_model_answers_clips_and_reads_motion():
    """Well above chance (0.25, four options) on the first test clips, and on the kinds that need several frames
    (direction, moving, appear, disappear, order) far ahead of the image model, whose second temporal patch conv is
    zero (it sees every other frame only)."""
    with _vlm(VIDEO_DIR) as vlm:
        rows = clip_rows(vlm, N_CLIPS)
    with _vlm(TRAINED_DIR) as vlm:
        image_model_rows = clip_rows(vlm, N_CLIPS)
    assert _accuracy(rows) >= 0.5
    assert _accuracy(rows, temporal=True) >= _accuracy(image_model_rows, temporal=True) + 0.15
    assert not np.any(read_tensors(TRAINED_DIR / "mmproj.gguf")["v.patch_embd.weight.1"])
    assert np.any(read_tensors(VIDEO_DIR / "mmproj.gguf")["v.patch_embd.weight.1"])


def test_bundled_clip_model_still_answers_images():
    """Trained on images as well: the first 40 image-task test items well above chance."""
    correct = []
    with _vlm(VIDEO_DIR) as vlm:
        for i in range(40):
            item = shapes_task.make_item("test", i)
            q = item.question
            a = vlm.ask(np.asarray(shapes_task.render(item.scene)), shapes_task.format_question(q),
                        answer_tags=True, max_tokens=96, options=q.options)
            correct.append(a.answer == q.answer)
    assert np.mean(correct) >= 0.5


def test_bundled_clip_policy_carries_its_calibrated_tau():
    """The policy `avis demo --video` and `--tau auto` use records the tau the labelled search chose (tau.json)."""
    chosen = json.loads((VIDEO_DIR / "tau.json").read_text())["calibration"]["tau"]
    with _vlm(VIDEO_DIR) as vlm:
        policy = load_policy(VIDEO_DIR / "policy.gguf", vlm)
    assert policy.calibrated_tau == pytest.approx(chosen, abs=1e-6)
