"""The bundled trained shapes VLM: files, accuracy through llama.cpp, and parity with the PyTorch mirror."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from avis_llamacpp import VLM
from convert.shapes_task import KINDS, LETTERS, format_question, item_record, make_item, render

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "avis_llamacpp" / "data"
TEST_DIR = DATA / "shapes-test"
# bundled model -> (image tokens per 224 px image, lowest greedy accuracy on the first 100 bundled test items)
BUNDLED = {"shapes-qwen": (256, 0.50), "shapes-vlm": (196, 0.50)}  # both measure 0.60-0.61 here
PRESENT = [name for name in BUNDLED if (DATA / name / "model.gguf").exists() and (DATA / name / "mmproj.gguf").exists()]
MODEL_DIR = DATA / "shapes-vlm"  # the LLaVA-style model: the eval-command test's pair
MODEL, MMPROJ = MODEL_DIR / "model.gguf", MODEL_DIR / "mmproj.gguf"

needs_bundle = pytest.mark.skipif(not (MODEL.exists() and MMPROJ.exists()), reason="bundled shapes VLM not present")


def _items(n: int) -> list[dict]:
    lines = (TEST_DIR / "items.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module", params=PRESENT)
def bundled(request):
    """(name, VLM) of each bundled shapes model."""
    d = DATA / request.param
    with VLM(d / "model.gguf", d / "mmproj.gguf", n_ctx=2048) as v:
        yield request.param, v


def test_task_is_deterministic_and_well_formed():
    a, b = make_item("test", 7), make_item("test", 7)
    assert a == b and np.array_equal(np.asarray(render(a.scene)), np.asarray(render(b.scene)))
    assert make_item("train", 7).scene != a.scene  # disjoint seed streams
    kinds = set()
    for i in range(60):
        it = make_item("calibration", i)
        q = it.question
        assert len(q.options) == 4 and len(set(q.options)) == 4 and q.answer in LETTERS
        assert 1 <= len(it.scene.objects) <= 12 and 0 <= it.scene.difficulty <= 1
        assert q.target.startswith("<think>") and q.target.endswith(f"<answer>{q.answer}</answer>")
        checks = q.target.split("</think>")[0].splitlines()[1:]  # one line per option, only the answer says yes
        assert checks == [f"{L}. {o}: {'yes' if L == q.answer else 'no'}" for L, o in zip(LETTERS, q.options)]
        rec = item_record(it, "x.png")
        assert rec["question"] == format_question(q) and rec["options"] == q.options
        kinds.add(q.kind)
    assert kinds == set(KINDS)


def test_bundled_test_set_matches_generator():
    if not (TEST_DIR / "items.jsonl").exists():
        pytest.skip("bundled test set not present")
    for rec in _items(10):
        it = make_item("test", int(rec["id"].split("-")[1]))
        assert rec == item_record(it, rec["image"])
        assert (TEST_DIR / rec["image"]).exists()


@pytest.mark.parametrize("name", PRESENT)
def test_bundle_files_and_metadata(name):
    d = DATA / name
    assert (d / "model.gguf").stat().st_size + (d / "mmproj.gguf").stat().st_size < 30 * 2**20
    info = json.loads((d / "training.json").read_text())
    for key in ("seed", "command", "dims", "train_seconds", "final_train_loss"):
        assert key in info


def test_greedy_accuracy_above_chance(bundled):
    name, vlm = bundled
    n_tokens, lowest = BUNDLED[name]
    items = _items(100)  # greedy is deterministic; 100 items take a few seconds
    correct = 0
    for rec in items:
        a = vlm.ask(str(TEST_DIR / rec["image"]), rec["question"], answer_tags=True, max_tokens=96,
                    options=rec["options"])
        assert a.image_tokens == [n_tokens]
        correct += a.answer == rec["answer"]
    # chance is 0.25; the margin under each model's measured accuracy (README) covers a few answers flipping on
    # other CPUs / BLAS builds (greedy is deterministic on one machine)
    assert correct / len(items) >= lowest


def test_parity_with_pytorch(bundled):
    """The PyTorch mirror the model was trained in gives llama.cpp's first logits and greedy tokens; for the
    Qwen2.5-VL-style model also with KDV pruning (the mirror fed llama.cpp's kept tokens at their positions)."""
    torch = pytest.importorskip("torch")
    from training.data import load_rgb
    from training.eval_shapes_vlm import llama_prompt, torch_mirror

    name, vlm = bundled
    torch.set_num_threads(1)
    tm, tok = torch_mirror(Path(vlm.model.path), Path(vlm.projector.path))
    for rec in _items(3):
        img = load_rgb(TEST_DIR / rec["image"])
        ans = vlm.ask(img, rec["question"], answer_tags=True, max_tokens=96)
        texts, want = llama_prompt(vlm, img, rec)
        assert texts == [tok.prefix(), tok.question(rec)]  # the training prompt layout is what mtmd feeds
        out, first = tm.greedy(img, tok.prefix(), tok.question(rec), max_tokens=96, eos=tok.eos,
                               stop=tok.encode("</answer>"))
        got = first.double().numpy()
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
        assert out == ans.tokens
        if name == "shapes-qwen":
            pruned = vlm.ask(img, rec["question"], answer_tags=True, max_tokens=96, ratio=0.75)
            out, _ = tm.greedy(img, tok.prefix(), tok.question(rec), max_tokens=96, eos=tok.eos,
                               stop=tok.encode("</answer>"), kept=np.asarray(pruned.images[0]["kept"]))
            assert out == pruned.tokens


@needs_bundle
def test_eval_command_writes_elsewhere_unless_asked(tmp_path):
    """training/eval_shapes_vlm.py writes its results to --out and leaves the model's training.json alone unless
    --update-training-json is given; --parity without torch is refused with the fix."""
    from training.eval_shapes_vlm import main

    d = tmp_path / "model"
    d.mkdir()
    for name in ("model.gguf", "mmproj.gguf"):
        (d / name).symlink_to(MODEL_DIR / name)
    (d / "training.json").write_text('{"seed": 0}')
    out = tmp_path / "eval.json"
    args = ["--model-dir", str(d), "--n", "2", "--k", "1", "--parity", "0", "--threads", "1"]
    assert main(args + ["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["accuracy"]["n_items"] == 2 and "--out" in res["command"]
    assert json.loads((d / "training.json").read_text()) == {"seed": 0}
    cal = tmp_path / "cal.json"  # model selection runs on the calibration split; --k 1 is greedy only
    assert main(args + ["--split", "calibration", "--out", str(cal)]) == 0
    acc = json.loads(cal.read_text())["accuracy"]
    assert acc["split"] == "calibration" and acc["sampling"] == "greedy only"
    assert acc["k1_vote_accuracy"] == acc["greedy_accuracy"] and acc["vote_differs_from_greedy"] == 0
    assert main(args + ["--out", str(tmp_path / "eval2.json"), "--update-training-json"]) == 0
    info = json.loads((d / "training.json").read_text())
    assert info["seed"] == 0 and info["eval"]["accuracy"]["n_items"] == 2
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            main(["--model-dir", str(d), "--n", "0", "--parity", "1", "--out", str(tmp_path / "x.json")])


@pytest.mark.skipif("shapes-qwen" not in PRESENT, reason="bundled Qwen2.5-VL-style model not present")
def test_kept_at_tau_counts_the_plugins_kept_tokens(tmp_path):
    """training/kept_at_tau.py reports the kept tokens of the plugin's own adaptive KDV: all 256 at tau = 1e-6 (no
    angle is below it), and at tau = pi/4 the mean of what VLM.ask keeps on the same items."""
    import math

    from training.kept_at_tau import kept_at_tau

    items = TEST_DIR / "items.jsonl"
    d = DATA / "shapes-qwen"
    assert kept_at_tau(d, items, n=2, tau=1e-6)["mean_kept"] == 256
    got = kept_at_tau(d, items, n=3)
    with VLM(d / "model.gguf", d / "mmproj.gguf", n_ctx=2048) as vlm:
        kept = [len(vlm.ask(str(TEST_DIR / r["image"]), r["question"], answer_tags=True, max_tokens=1,
                            tau=math.pi / 4).images[0]["kept"]) for r in _items(3)]
    assert got["n_items"] == 3 and got["image_tokens"] == [256]
    assert got["mean_kept"] == round(sum(kept) / 3, 2) and got["min"] == min(kept) < 256


@pytest.mark.skipif("shapes-qwen" not in PRESENT, reason="bundled Qwen2.5-VL-style model not present")
def test_kept_at_tau_from_a_checkpoint_equals_llama_cpps_count(tmp_path):
    """--checkpoint counts kept tokens from a PyTorch state dict (a training run's ckpt.pt); on the bundled model's
    weights it gives what the plugin keeps through llama.cpp on the same items, token count for token count."""
    torch = pytest.importorskip("torch")
    from training.kept_at_tau import kept_at_tau, kept_at_tau_checkpoint
    from training.qwen_torch import dims_from_gguf, load_from_gguf

    d = DATA / "shapes-qwen"
    model = load_from_gguf(d / "model.gguf", d / "mmproj.gguf", dims_from_gguf(d / "model.gguf", d / "mmproj.gguf"))
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    items = TEST_DIR / "items.jsonl"
    from_checkpoint = kept_at_tau_checkpoint(d, tmp_path / "ckpt.pt", items, n=4)
    ratio = from_checkpoint.pop("common_key_energy_ratio")
    assert from_checkpoint == kept_at_tau(d, items, n=4)
    assert ratio > 0
    assert 1 <= from_checkpoint["min"] < 256 and from_checkpoint["image_tokens"] == [256]


def test_common_key_energy_ratio_by_hand():
    """The shared-key energy ratio on keys built as a known shared vector plus zero-mean deviations: |m|^2 over
    the deviations' mean squared norm, per head, then averaged over heads."""
    from training.kept_at_tau import common_key_energy_ratio

    shared = np.array([[3.0, 0.0], [0.0, 1.0]])  # two heads, |m|^2 = 9 and 1
    deviations = np.array([[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 0.0], [0.0, -2.0]]])  # zero mean; |r|^2 = 1 and 4
    keys = shared[None] + deviations  # [2 tokens, 2 heads, 2]
    assert abs(common_key_energy_ratio(keys) - (9 / 1 + 1 / 4) / 2) < 1e-12
