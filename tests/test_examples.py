"""Every example script runs on the fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 240) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _model_args(fx) -> list[str]:
    return ["--model", str(fx.model), "--mmproj", str(fx.mmproj)]


def test_basic_ask(llava_fixture):
    out = _run("basic_ask.py", *_model_args(llava_fixture), "--k", "3", "--tau", "pi/4", "--max-tokens", "4")
    assert "'k': 3" in out


def test_basic_ask_defaults_answer_on_the_bundled_model():
    """As a new user first runs it (no arguments): the bundled model answers its default question about the bundled
    image correctly (the square in shapes.png is blue: option C)."""
    import pytest

    from avis_llamacpp.defaults import TRAINED_DIR, bundled_dir

    if bundled_dir() != TRAINED_DIR:
        pytest.skip("the Qwen2.5-VL-style shapes model is not bundled")
    out = _run("basic_ask.py", "--threads", "1")
    assert "'answer': 'C'" in out


def test_chat_handler_example(qwen_fixture):
    out = _run("chat_handler.py", *_model_args(qwen_fixture))
    assert "K=1:" in out and "K=5:" in out


def test_server_client_example(llava_fixture):
    out = _run("server_client.py", *_model_args(llava_fixture))
    assert "'k': 5" in out


def test_batch_folder(llava_fixture, demo_image, tmp_path):
    Image.open(demo_image).save(tmp_path / "a.png")
    Image.open(demo_image).rotate(90).save(tmp_path / "b.jpg")
    (tmp_path / "broken.png").write_bytes(b"nope")
    out_file = tmp_path / "answers.jsonl"
    _run("batch_folder.py", str(tmp_path), "What is this?", *_model_args(llava_fixture), "--max-tokens", "3",
         "--out", str(out_file))
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["a.png", "b.jpg", "broken.png"]
    assert "error" in rows[2] and rows[0]["of"] == [196]


def test_calibrate_policy_example(llava_fixture, tmp_path):
    out = _run("calibrate_policy.py", *_model_args(llava_fixture), "--n", "6", "--k-max", "3", "--max-tokens", "6",
               "--out", str(tmp_path))
    assert "-> K=" in out and (tmp_path / "policy.gguf").exists()
