"""The `avis` command line on the fixtures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from avis_llamacpp.cli import _tau, build_parser, main


def test_help_explains_every_knob():
    parser = build_parser()
    out = parser.format_help()
    assert "ask" in out and "show" in out
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"avis {name} {action.option_strings} has no help text"


def test_tau_parsing():
    assert _tau("pi/4") == pytest.approx(0.7853981, rel=1e-6)
    assert _tau("0.5") == 0.5 and _tau("0.25pi") == pytest.approx(0.7853981, rel=1e-6)


def test_ask_json(llava_fixture, demo_image, capsys):
    rc = main(["ask", "-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "-i", str(demo_image),
               "--rho", "0.5", "--k", "3", "--max-tokens", "4", "--json", "How many shapes?"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 3 and out["kept_tokens"] == [98] and len(out["rollouts"]) == 3


def test_show_writes_overlay(llava_fixture, demo_image, tmp_path, capsys):
    png, bare = tmp_path / "o.png", tmp_path / "bare.png"
    argv = ["show", "-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "-i", str(demo_image),
            "--rho", "0.75", "--cell-px", "4"]
    assert main(argv + ["--no-legend", "-o", str(bare)]) == 0
    assert Image.open(bare).size == (14 * 4, 14 * 4)
    assert "kept 49 of 196" in capsys.readouterr().out
    # with the legend: the same overlay on top, a strip of text and swatches under it
    assert main(argv + ["-o", str(png)]) == 0
    img = Image.open(png).convert("RGB")
    assert img.height > 14 * 4 + 40 and img.width > 200
    assert (np.asarray(img.crop((0, 0, 56, 56))) == np.asarray(Image.open(bare).convert("RGB"))).all()
    strip = np.asarray(img.crop((0, 60, img.width, img.height)))
    assert (strip < 100).any(axis=2).sum() > 200  # dark text / swatch pixels in the legend


def test_errors_exit_2_with_message(llava_fixture, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    r = subprocess.run([sys.executable, "-m", "avis_llamacpp.cli", "ask", "-m", str(llava_fixture.model), "--mmproj",
                        str(llava_fixture.mmproj), "-i", str(bad), "q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a readable image" in r.stderr


def test_bad_knobs_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Argument errors come first: a missing model file would be the error if the model were loaded first."""
    from avis_llamacpp import pipeline

    def boom(*a, **k):  # pragma: no cover - reached only if validation comes after loading
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline.VLM, "__init__", boom)
    args = ["ask", "-m", str(tmp_path / "missing.gguf"), "--mmproj", str(tmp_path / "missing-mmproj.gguf"),
            "-i", "x.png", "q"]
    for extra, msg in ((["--k", "0"], "k (rollouts)"), (["--mode", "staged", "--wave", "0"], "wave"),
                       (["--max-tokens", "-3"], "max_tokens"), (["--rho", "1.5"], "ratio")):
        assert main(args[:-1] + extra + ["q"]) == 2
        assert msg in capsys.readouterr().err


def test_every_model_command_takes_the_same_model_flags():
    parser = build_parser()
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    model_flags = {"--model", "--mmproj", "--n-ctx", "--threads", "--threads-batch", "--n-gpu-layers",
                   "--chat-format", "--flash-attn", "--verbose"}
    for name in ("ask", "show", "calibrate", "bench"):
        flags = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert model_flags <= flags, (name, model_flags - flags)
    ns = parser.parse_args(["calibrate", "-m", "m", "--mmproj", "p", "--items", "i", "--out", "o", "--tau", "pi/4"])
    assert ns.tau == pytest.approx(0.7853981, rel=1e-6)


def test_a_broken_subcommand_module_fails_loudly(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *a, **k):
        if name.endswith("bench") or (a and a[2] and "bench" in a[2]):
            raise ImportError("simulated broken module")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ImportError, match="simulated broken module"):
        build_parser()


def test_demo_runs_the_avis_query_on_the_bundled_model(capsys):
    """`avis demo` on the Qwen2.5-VL-style bundled model: adaptive KDV at the tau calibrated for it (its policy's)
    plus the bundled policy, the same answer and kept count as that query through the API; --no-prune keeps every
    token at K = 1."""
    import re

    from avis_llamacpp import VLM, load_policy
    from avis_llamacpp.defaults import DEMO_IMAGE, TRAINED_DIR, bundled_dir

    if bundled_dir() != TRAINED_DIR:
        pytest.skip("the Qwen2.5-VL-style shapes model is not bundled")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    question = "How many red shapes are in the image?\nA. 0\nB. 1\nC. 2\nD. 3"
    with VLM(TRAINED_DIR / "model.gguf", TRAINED_DIR / "mmproj.gguf", n_ctx=2048) as vlm:
        policy = load_policy(TRAINED_DIR / "policy.gguf", vlm)
        assert policy.calibrated_tau is not None  # the bundled policy carries the tau calibrated for its model
        want = vlm.ask(DEMO_IMAGE, question, max_tokens=96, seed=0, answer_tags=True, options=["0", "1", "2", "3"],
                       tau=policy.calibrated_tau, policy=policy)
    assert f"answer: {want.answer} " in out and f"picked K={want.k}" in out
    assert f"tau={policy.calibrated_tau:.3g} (calibrated)" in out
    kept = re.search(r"image tokens kept \[(\d+)\] of \[256\]", out)
    assert kept and int(kept.group(1)) == want.kept_tokens[0] < 256
    assert main(["demo", "--no-prune"]) == 0
    assert "K=1; image tokens kept [256] of [256]" in capsys.readouterr().out



def test_demo_video_asks_the_clip_model_about_the_bundled_clip(capsys):
    """`avis demo --video`: the clip-trained model on the bundled clip (its 8 frames are the video task's test clip,
    pixel for pixel), its own question, the bundled policy's calibrated tau as one selection over the clip; the same
    answer and per-chunk kept counts as that query through the API on the task's frames; --no-prune keeps all."""
    import json
    import re

    from avis_llamacpp import VLM, load_policy
    from avis_llamacpp.defaults import DEMO_CLIP, DEMO_CLIP_QUESTION, VIDEO_DIR
    from convert import video_task

    if not (VIDEO_DIR / "model.gguf").is_file():
        pytest.skip("the clip-trained shapes model is not bundled")
    meta = json.loads(DEMO_CLIP_QUESTION.read_text())
    item = video_task.make_item("test", int(meta["id"].rsplit("-", 1)[1]))
    assert meta["question"] == item.question.text and meta["answer"] == item.question.answer
    assert main(["demo", "--video"]) == 0
    out = capsys.readouterr().out
    question = meta["question"] + "".join(f"\n{chr(65 + i)}. {o}" for i, o in enumerate(meta["options"]))
    with VLM(VIDEO_DIR / "model.gguf", VIDEO_DIR / "mmproj.gguf", n_ctx=2048) as vlm:
        policy = load_policy(VIDEO_DIR / "policy.gguf", vlm)
        assert policy.calibrated_tau is not None
        want = vlm.ask(None, question, video=video_task.render_clip(item.clip), max_tokens=96, seed=0,
                       answer_tags=True, options=meta["options"], tau=policy.calibrated_tau, policy=policy)
    assert f"answer: {want.answer} " in out and f"picked K={want.k}" in out and "8 frames, 4 chunks" in out
    kept = re.search(r"image tokens kept \[([\d, ]+)\] of \[64, 64, 64, 64\]", out)
    assert kept and [int(x) for x in kept.group(1).split(", ")] == want.kept_tokens and sum(want.kept_tokens) < 256
    assert main(["demo", "--video", "--no-prune"]) == 0
    assert "K=1; image tokens kept [64, 64, 64, 64] of [64, 64, 64, 64]" in capsys.readouterr().out

def _no_model(monkeypatch):
    from avis_llamacpp import pipeline

    def boom(*a, **k):  # pragma: no cover - reached only if a check comes after loading the model
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline.VLM, "__init__", boom)


def test_file_mistakes_are_one_line_before_the_model_loads(llava_fixture, demo_image, tmp_path, monkeypatch, capsys):
    """Missing folders, folders given as files and unknown extensions: one `avis: error:` line naming the
    problem, exit 2, no model loaded and nothing written."""
    _no_model(monkeypatch)
    m = ["-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj)]
    show = ["show", *m, "-i", str(demo_image)]
    cases = [(show + ["-o", str(tmp_path / "missing_dir" / "x.png")], "folder", "does not exist"),
             (show + ["-o", str(tmp_path)], "is a folder; give a file name", ""),
             (show + ["-o", str(tmp_path / "x.txt")], "must end in .png", ""),
             (show + ["--cell-px", "0"], "--cell-px must be >= 1", ""),
             (["ask", *m, "-i", str(tmp_path), "q"], "--image", "is a folder, not a file"),
             (["ask", *m, "-i", str(tmp_path / "nope.png"), "q"], "--image", "no such file"),
             (["ask", "-m", str(tmp_path), "--mmproj", str(llava_fixture.mmproj), "-i", str(demo_image), "q"],
              "--model (text model GGUF)", "is a folder, not a file"),
             (["ask", *m, "-i", str(demo_image), "--options", "a||b", "q"], "--options takes", "")]
    for argv, msg, msg2 in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("avis: error:") and len(err.strip().splitlines()) == 1, (argv, err)
        assert msg in err and msg2 in err, (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_one_spelling_per_knob_across_subcommands():
    """--rho is the pruning fraction everywhere with --ratio as its alias; answer tags are on by default in ask,
    calibrate and bench alike (--no-answer-tags turns them off); each --help says so."""
    parser = build_parser()
    sub = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0]
    model = ["-m", "m", "--mmproj", "p"]
    need = {"ask": ["-i", "x.png", "q"], "show": ["-i", "x.png"], "calibrate": ["--items", "i", "--out", "o"]}
    for name, rest in need.items():
        for flag in ("--rho", "--ratio"):
            assert parser.parse_args([name, *model, flag, "0.5", *rest]).rho == 0.5, (name, flag)
        assert "--rho RHO, --ratio RHO" in sub.choices[name].format_help(), name
    for name, rest in {**need, "bench": ["--items", "i"]}.items():
        if name == "show":
            continue
        assert parser.parse_args([name, *model, *rest]).answer_tags is True, name
        assert parser.parse_args([name, *model, "--no-answer-tags", *rest]).answer_tags is False, name
        assert "--answer-tags, --no-answer-tags" in sub.choices[name].format_help(), name


def test_ask_options_are_shown_to_the_model(llava_fixture, demo_image, capsys):
    """`avis ask --options` writes the options under the question as A./B. lines, the prompt `avis demo` and the
    shapes items use: same prompt and text as the API asked with that question typed out by hand."""
    from avis_llamacpp import VLM

    rc = main(["ask", "-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "-i", str(demo_image),
               "--threads", "1", "--max-tokens", "4", "--options", "red|green|blue", "--json", "Which colour?"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_threads=1) as vlm:
        typed = vlm.ask(demo_image, "Which colour?\nA. red\nB. green\nC. blue", max_tokens=4, answer_tags=True,
                        options=["red", "green", "blue"])
        bare = vlm.ask(demo_image, "Which colour?", max_tokens=4, answer_tags=True, options=["red", "green", "blue"])
    assert out["prompt_tokens"] == typed.prompt_tokens != bare.prompt_tokens
    assert out["text"] == typed.text


@pytest.mark.parametrize("flag", [[], ["--no-repack"]])
def test_no_repack_reaches_llama_cpp_from_the_cli_and_ray_replicas(qwen_fixture, demo_image, monkeypatch, capsys,
                                                                   flag):
    """`avis ask --no-repack` loads the text model with llama.cpp's use_extra_bufts off (llama-server's --no-repack,
    for hosts whose AMX kernels fault), without it on (llama.cpp's default); the VLM's replica keywords carry the
    setting, so a Ray worker built from them loads the same way."""
    import llama_cpp

    from avis_llamacpp import VLM

    seen = []
    load = llama_cpp.llama_model_load_from_file
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file",
                        lambda path, params: seen.append(params.use_extra_bufts) or load(path, params))
    rc = main(["ask", "-m", str(qwen_fixture.model), "--mmproj", str(qwen_fixture.mmproj), "-i", str(demo_image),
               "--max-tokens", "2", "--threads", "1", *flag, "What is shown?"])
    assert rc == 0 and capsys.readouterr().out
    want = not flag
    assert seen == [want]
    with VLM(qwen_fixture.model, qwen_fixture.mmproj, n_threads=1, repack=want) as vlm:
        kw = vlm.replica_kwargs()
    assert kw["repack"] is want
    with VLM(qwen_fixture.model, qwen_fixture.mmproj, **kw):
        pass
    assert seen == [want, want, want]
