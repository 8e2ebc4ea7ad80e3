"""Reliability: every bad input or broken file gives a typed AVISError whose message names the problem and the fix,
and leaves the VLM usable; errors, interrupts and failing callbacks leave no state behind; a query's answer does
not depend on what ran before it; one VLM is safe to share between threads and to close.

"Usable" and "no state behind" are checked against a fresh-process oracle: a subprocess that forks a new
process per query, loads the model there and runs only that query (nothing loaded or run before it), printing
the rollouts' tokens as JSON. Broken model files are loaded in a subprocess too, so a llama.cpp abort would
fail the test instead of killing the test run."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM
from avis_llamacpp.capture import KeyCapture
from avis_llamacpp.errors import (AVISError, CaptureError, ClosedError, ContextOverflowError, ImageError,
                                  InvalidArgumentError, ModelLoadError, SnapshotMismatchError)
from avis_llamacpp.images import MAX_PIXELS, MAX_SIDE, load_image
from avis_llamacpp.native import SamplingParams
from benchmarks.soak import odd_images, run_spec

ROOT = Path(__file__).resolve().parents[1]
VLM_KW = {"n_ctx": 1024, "n_seq_max": 4, "n_threads": 1, "n_threads_batch": 1}

# the fresh-process oracle: one forked process per query, forked before anything is loaded
ORACLE = r"""
import json, os, subprocess, sys
root, model, mmproj = sys.argv[1], sys.argv[2], sys.argv[3]
vlm_kw = json.loads(sys.argv[4])
sys.path.insert(0, root)
from avis_llamacpp import VLM
from benchmarks.soak import run_spec

def one(spec):
    try:
        with VLM(model, mmproj, **vlm_kw) as vlm:
            return run_spec(vlm, spec)
    except BaseException as e:
        return {"error": f"{type(e).__name__}: {e}"}

specs = json.load(sys.stdin)
results = []
for spec in specs:
    if not hasattr(os, "fork"):
        results.append(one(spec))  # the caller runs one spec per process here
        continue
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        with os.fdopen(wfd, "w") as f:
            f.write(json.dumps(one(spec)))
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    results.append(json.loads(text) if text else {"error": f"oracle child died with status {status}"})
print(json.dumps(results))
"""


def fresh_outputs(fx, specs: list[dict]) -> list[dict]:
    """run_spec(spec) for each spec, each in a fresh process with a freshly loaded VLM."""
    groups = [specs] if hasattr(os, "fork") else [[s] for s in specs]
    out: list[dict] = []
    for group in groups:
        proc = subprocess.run([sys.executable, "-c", ORACLE, str(ROOT), str(fx.model), str(fx.mmproj),
                               json.dumps(VLM_KW)], input=json.dumps(group), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out += json.loads(proc.stdout.strip().splitlines()[-1])
    for spec, res in zip(specs, out):
        assert "error" not in res, (spec, res)
    return out


# -- shared data ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return odd_images(tmp_path_factory.mktemp("odd-images"))


def _specs(images) -> dict[str, dict]:
    demo = images["demo"]
    return {
        "Q0": {"image": demo, "question": "What shapes do you see?", "max_tokens": 8},
        "QA": {"image": images["noise"], "question": "Describe the image.", "max_tokens": 10, "k": 4, "ratio": 0.5,
               "seed": 3},
        "QB_par": {"image": demo, "question": "How many circles?", "max_tokens": 10, "k": 3, "seed": 7},
        "QA_snap": {"image": images["cmyk"], "question": "Describe it.", "max_tokens": 8, "k": 2, "mode": "snapshot",
                    "tau": 1.2, "seed": 5},
        "QB_snap": {"image": demo, "question": "How many circles?", "max_tokens": 10, "k": 3, "mode": "snapshot",
                    "seed": 7},
        "QS": {"image": images["palette_alpha"], "question": "What colour is it?", "max_tokens": 8, "k": 2,
               "snapshot": True, "ratio": 0.25, "seed": 2},
        "Q_stream": {"image": demo, "question": "Describe the image.", "max_tokens": 16},
    }


_FAMILIES = {"llava": "llava_fixture", "qwen25vl": "qwen_fixture"}


@pytest.fixture(scope="module")
def oracle(request, images):
    """Per family: spec name -> the fresh-process output (computed lazily, once per family)."""
    cache: dict[str, dict[str, dict]] = {}

    def get(family: str) -> dict[str, dict]:
        if family not in cache:
            fx = request.getfixturevalue(_FAMILIES[family])
            specs = _specs(images)
            cache[family] = dict(zip(specs, fresh_outputs(fx, list(specs.values()))))
        return cache[family]
    return get


@pytest.fixture(scope="module")
def vlms(request):
    """Per family: one shared VLM for the module."""
    made: dict[str, VLM] = {}

    def get(family: str) -> VLM:
        if family not in made:
            fx = request.getfixturevalue(_FAMILIES[family])
            made[family] = VLM(fx.model, fx.mmproj, **VLM_KW)
        return made[family]
    yield get
    for v in made.values():
        v.close()


@pytest.fixture(scope="module")
def vlm(vlms):
    return vlms("llava")


@pytest.fixture(scope="module")
def recovers(vlms, oracle, images):
    """recovers(family): the canonical query now gives exactly the fresh-process answer."""
    specs = _specs(images)

    def check(family: str = "llava") -> None:
        got = run_spec(vlms(family), specs["Q0"])
        assert got == oracle(family)["Q0"], "the VLM gives a different answer than a fresh process after the error"
    return check


def _raises(exc: type[BaseException], *needles: str):
    """pytest.raises that also checks the message mentions every needle (case-insensitive)."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.ctx.__exit__(*a)
            msg = str(self.info.value).lower()
            for n in needles:
                assert n.lower() in msg, f"{n!r} not in error message {str(self.info.value)!r}"
            return out
    return _Check()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and carries no pixel data (decoding it would fail differently)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# -- 1. typed errors: images ------------------------------------------------------------------------------------
def _demo_bytes(images) -> bytes:
    return Path(images["demo"]).read_bytes()


BAD_IMAGES = {
    "non_image_bytes": (lambda im: b"hello, this is text and not an image" * 4, ("not a readable image", "png")),
    "empty_bytes": (lambda im: b"", ("empty image data",)),
    "truncated_png": (lambda im: _demo_bytes(im)[:200], ("truncated or corrupt",)),
    "truncated_jpeg": (lambda im: Path(im["cmyk"]).read_bytes()[:300], ("truncated", "corrupt")),
    "corrupt_gif_header": (lambda im: b"GIF89a" + b"\x00" * 40, ("GIF", "truncated or corrupt")),
    "unsupported_format_pcx": (lambda im: _encode(Image.new("RGB", (8, 8)), "PCX"), ("not a readable image",)),
    "bomb_over_limit": (lambda im: _png_header_only(9000, 8000), ("72000000 pixels", "decompression bomb",
                                                                  "downscale")),
    "bomb_huge": (lambda im: _png_header_only(40000, 40000), ("decompression bomb", "downscale")),
    "zero_size_array": (lambda im: np.zeros((0, 10, 3), np.uint8), ("zero size",)),
    "zero_size_pil": (lambda im: Image.new("RGB", (0, 4)), ("zero size",)),
    "float_array": (lambda im: np.zeros((8, 8, 3), np.float32), ("uint8",)),
    "bad_array_shape": (lambda im: np.zeros((8, 8, 5), np.uint8), ("HxW",)),
    "missing_file": (lambda im: "/nonexistent/dir/photo.jpg", ("not found", "existing file")),
    "directory": (lambda im: str(Path(im["demo"]).parent), ("not found",)),
    "data_uri_not_base64": (lambda im: "data:image/png,rawbytes", ("base64",)),
    "data_uri_bad_base64": (lambda im: "data:image/png;base64,!!!notbase64", ("invalid base64",)),
    "remote_url_refused": (lambda im: "https://example.com/cat.jpg", ("remote images are disabled",
                                                                      "allow_remote_images")),
    "unsupported_type": (lambda im: 12345, ("unsupported image type", "path")),
    "raw_base64_as_path": (lambda im: "iVBORw0KGgo" * 40, ("image file", "data:image/png;base64,")),
    "nul_in_path": (lambda im: "photo\x00.png", ("not found",)),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_typed_error_and_the_vlm_recovers(case, vlm, images, recovers):
    make, needles = BAD_IMAGES[case]
    with _raises(ImageError, *needles):
        vlm.ask(make(images), "What is this?", max_tokens=4)
    recovers()


def test_bomb_is_refused_before_decoding():
    # no pixel data at all: a decode attempt would raise "truncated", the size check must come first
    t0 = time.perf_counter()
    with _raises(ImageError, "decompression bomb"):
        load_image(_png_header_only(20000, 20000))
    assert time.perf_counter() - t0 < 10.0  # decoding 400 M pixels would take far longer (and raise "truncated")
    img = Image.open(io.BytesIO(_png_header_only(9000, 8000)))  # a lazily opened PIL image: same check
    with _raises(ImageError, f"{MAX_PIXELS}"):
        load_image(img)


def test_odd_sizes_work(vlm, llava_fixture, recovers):
    a = vlm.ask(np.full((1, 1, 3), 200, np.uint8), "What is this?", max_tokens=4)
    assert a.image_tokens == [llava_fixture.image_tokens(1, 1)]
    strip = np.random.default_rng(0).integers(0, 256, (40, 5000, 3), dtype=np.uint8)
    arr = load_image(strip)
    assert arr.shape == (33, MAX_SIDE, 3)  # longer side capped at MAX_SIDE, aspect kept
    b = vlm.ask(strip, "What is this?", max_tokens=4)
    assert b.image_tokens == [llava_fixture.image_tokens(MAX_SIDE, 33)]
    recovers()


def test_odd_modes_become_rgb(tmp_path):
    red = (255, 0, 0)
    # CMYK JPEG
    cmyk = load_image(_encode(Image.new("RGB", (16, 16), red).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == (16, 16, 3) and cmyk[..., 0].mean() > 230 and cmyk[..., 1:].mean() < 25
    # 16-bit greyscale PNG: full scale -> 255, half -> ~128
    g16 = np.zeros((4, 4), np.uint16)
    g16[:2] = 65535
    g16[2:] = 32768
    out = load_image(_encode(Image.fromarray(g16), "PNG"))
    assert out.dtype == np.uint8 and (out[:2] == 255).all() and (np.abs(out[2:].astype(int) - 128) <= 1).all()
    # palette with transparency, LA and RGBA: alpha dropped (not composited), colours kept
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out = load_image(_encode(pal, "PNG", transparency=1))
    assert (out == (10, 200, 30)).all()
    assert (load_image(_encode(Image.new("LA", (5, 5), (120, 30)), "PNG")) == 120).all()
    assert (load_image(_encode(Image.new("RGBA", (5, 5), (1, 2, 3, 0)), "PNG")) == (1, 2, 3)).all()
    # 32-bit integer and float greyscale (TIFF)
    i32 = Image.fromarray(np.full((3, 3), 255, np.int32), "I")
    assert (load_image(_encode(i32, "TIFF")) == 255).all()
    f32 = Image.fromarray(np.full((3, 3), 0.5, np.float32), "F")
    assert (np.abs(load_image(_encode(f32, "TIFF")).astype(int) - 128) <= 1).all()
    # 1-bit
    assert (load_image(_encode(Image.new("1", (9, 9), 1), "PNG")) == 255).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    arr = load_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert arr.shape == (40, 20, 3)  # portrait after rotation
    top, bottom = arr[:18].reshape(-1, 3).mean(0), arr[22:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    # no EXIF: unchanged
    assert load_image(_encode(img, "PNG")).shape == (20, 40, 3)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_use_the_first_frame(fmt):
    frames = [Image.new("RGB", (24, 16), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    arr = load_image(data)
    assert arr.shape == (16, 24, 3) and arr[..., 0].mean() > 200 and arr[..., 2].mean() < 40
    pil = Image.open(io.BytesIO(data))
    pil.seek(2)  # a PIL image left on a later frame: still the first frame
    assert load_image(pil)[..., 0].mean() > 200


# -- 1. typed errors: arguments ----------------------------------------------------------------------------------
def _many_images(images):
    return [images["demo"]] * 6  # 6 x 196 tokens > n_ctx 1024


BAD_ARGS = {
    "too_many_image_tokens": (lambda v, im: v.ask(_many_images(im), "q", max_tokens=4), ContextOverflowError,
                              ("prompt needs", "n_ctx is 1024", "raise n_ctx")),
    "too_long_prompt": (lambda v, im: v.ask(im["demo"], "word " * 1200, max_tokens=4), ContextOverflowError,
                        ("n_ctx",)),
    "k_above_n_seq_max": (lambda v, im: v.ask(im["demo"], "q", k=5), InvalidArgumentError,
                          ("k=5", "n_seq_max=4", "mode='snapshot'")),
    "ratio_1": (lambda v, im: v.ask(im["demo"], "q", ratio=1.0), InvalidArgumentError, ("ratio",)),
    "ratio_negative": (lambda v, im: v.ask(im["demo"], "q", ratio=-0.1), InvalidArgumentError, ("ratio",)),
    "ratio_nan": (lambda v, im: v.ask(im["demo"], "q", ratio=float("nan")), InvalidArgumentError, ("ratio",)),
    "tau_zero": (lambda v, im: v.ask(im["demo"], "q", tau=0.0), InvalidArgumentError, ("tau",)),
    "tau_pi": (lambda v, im: v.ask(im["demo"], "q", tau=math.pi), InvalidArgumentError, ("tau",)),
    "tau_nan": (lambda v, im: v.ask(im["demo"], "q", tau=float("nan")), InvalidArgumentError, ("tau",)),
    "ratio_and_tau": (lambda v, im: v.ask(im["demo"], "q", ratio=0.5, tau=1.0), InvalidArgumentError,
                      ("ratio", "tau")),
    "k_zero": (lambda v, im: v.ask(im["demo"], "q", k=0), InvalidArgumentError, ("k",)),
    "k_float": (lambda v, im: v.ask(im["demo"], "q", k=2.5), InvalidArgumentError, ("k",)),
    "k_bool": (lambda v, im: v.ask(im["demo"], "q", k=True), InvalidArgumentError, ("k",)),
    "max_tokens_negative": (lambda v, im: v.ask(im["demo"], "q", max_tokens=-1), InvalidArgumentError,
                            ("max_tokens",)),
    "bad_mode": (lambda v, im: v.ask(im["demo"], "q", mode="serial"), InvalidArgumentError, ("mode",)),
    "sampling_not_params": (lambda v, im: v.ask(im["demo"], "q", sampling={"temperature": 1}),
                            InvalidArgumentError, ("sampling",)),
    "seed_float": (lambda v, im: v.ask(im["demo"], "q", seed=1.5), InvalidArgumentError, ("seed",)),
    "stop_not_str": (lambda v, im: v.ask(im["demo"], "q", stop=[1]), InvalidArgumentError, ("stop",)),
    "question_not_str": (lambda v, im: v.ask(im["demo"], 42), InvalidArgumentError, ("question",)),
    "question_surrogate": (lambda v, im: v.ask(im["demo"], "bad \ud800 text"), InvalidArgumentError,
                           ("unicode", "surrogate")),
    "marker_in_question": (lambda v, im: v.ask(im["demo"], f"what is {v.projector.marker}?"), ImageError,
                           ("2 image markers", "1 images", "out of questions")),
    "snapshot_other_image": (lambda v, im: v.ask(im["noise"], "q", snapshot=v.snapshot(im["demo"])),
                             SnapshotMismatchError, ("images",)),
    "snapshot_corrupt_state": (lambda v, im: v.ask(None, "q", snapshot=_corrupt(v.snapshot(im["demo"]))),
                               SnapshotMismatchError, ("corrupt", "make the snapshot again")),
    "snapshot_larger_than_n_ctx": (lambda v, im: v.ask(None, "q", snapshot=dataclasses.replace(
        v.snapshot(im["demo"]), n_kv=5000)), ContextOverflowError, ("n_ctx is 1024", "larger n_ctx")),
}


def _corrupt(snap):
    return dataclasses.replace(snap, state=snap.state[:len(snap.state) // 2])


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_argument_is_a_typed_error_and_the_vlm_recovers(case, vlm, images, recovers):
    call, exc, needles = BAD_ARGS[case]
    with _raises(exc, *needles):
        call(vlm, images)
    recovers()


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", -0.1, ">= 0"), ("temperature", float("nan"), "finite"), ("temperature", float("inf"), "finite"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_p", float("nan"), "finite"),
    ("top_k", -1, ">= 0"), ("top_k", 2.5, "integer"),
    ("min_p", -0.01, "[0, 1]"), ("min_p", 1.01, "[0, 1]"), ("min_p", float("nan"), "finite"),
    ("repeat_penalty", 0.0, "> 0"), ("repeat_penalty", -1.0, "> 0"), ("repeat_penalty", float("nan"), "finite"),
    ("penalty_last_n", -2, ">= -1"), ("seed", "1", "integer"),
])
def test_invalid_sampling_values_name_the_field(field, value, needle):
    with _raises(InvalidArgumentError, field, needle):
        SamplingParams(**{field: value})


def test_valid_sampling_edges_are_accepted(vlm, images):
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, penalty_last_n=-1, seed=-1)
    SamplingParams(temperature=2.0, top_p=0.01, top_k=40, min_p=1.0, repeat_penalty=0.5, seed=2**40)
    a = vlm.ask(images["demo"], "q", max_tokens=4, k=2, sampling=SamplingParams(temperature=0.9, top_k=5, min_p=0.05))
    assert len(a.rollouts) == 2


def test_k_above_n_seq_max_works_in_snapshot_mode(vlm, images):
    a = vlm.ask(images["demo"], "q", max_tokens=4, k=5, mode="snapshot")
    assert len(a.rollouts) == 5


def test_single_image_and_stop_string_are_not_iterated(vlm, images):
    a = vlm.generate(vlm.render_question("What is this?", 1), images["demo"], max_tokens=4, stop="\n\n")
    assert a.image_tokens == [196]


# -- 1. typed errors: model files (in a subprocess: a llama.cpp abort must not kill the test run) ---------------
def _patch_duplicate_token(src: Path, dst: Path) -> None:
    """Copy a text model with one vocabulary entry overwritten by another of the same length."""
    data = bytearray(src.read_bytes())
    key = b"tokenizer.ggml.tokens"
    off = data.index(key) + len(key)
    vtype, etype, n = struct.unpack_from("<IIQ", data, off)
    assert (vtype, etype) == (9, 8)
    off += 16
    spans, by_len = [], {}
    for i in range(n):
        (ln,) = struct.unpack_from("<Q", data, off)
        spans.append((off + 8, ln))
        off += 8 + ln
    for i, (at, ln) in enumerate(spans):
        if ln >= 3 and ln in by_len:
            j = by_len[ln]
            data[at:at + ln] = data[spans[j][0]:spans[j][0] + ln]
            dst.write_bytes(bytes(data))
            return
        by_len.setdefault(ln, i)
    raise AssertionError("no two tokens of the same length")


def _audio_only_mmproj(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_bool("clip.has_vision_encoder", False)
    w.add_bool("clip.has_audio_encoder", True)
    w.add_string("clip.audio.projector_type", "ultravox")
    w.add_tensor("a.position_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


LOAD_CASES = {
    # name: (model, mmproj, extra VLM kwargs, expected error type, message needles)
    "model_missing": ("{d}/nope.gguf", "{mmproj}", {}, "ModelLoadError", ("not found",)),
    "model_random_bytes": ("{d}/random.gguf", "{mmproj}", {}, "ModelLoadError", ("not a gguf file", "convert")),
    "model_empty": ("{d}/empty.gguf", "{mmproj}", {}, "ModelLoadError", ("not a gguf file", "empty")),
    "model_wrong_magic": ("{d}/badmagic.gguf", "{mmproj}", {}, "ModelLoadError", ("not a gguf file", "XXXX")),
    "model_truncated": ("{d}/model_trunc.gguf", "{mmproj}", {}, "ModelLoadError", ("truncated", "download")),
    "model_truncated_header": ("{d}/model_trunc1k.gguf", "{mmproj}", {}, "ModelLoadError", ("truncated",)),
    "model_duplicate_token": ("{d}/model_dup.gguf", "{mmproj}", {}, "ModelLoadError", ("twice", "abort")),
    "model_is_mmproj": ("{mmproj}", "{mmproj}", {}, "ModelLoadError",
                        ("is a multimodal projector", "pass it as mmproj")),
    "mmproj_missing": ("{model}", "{d}/nope.gguf", {}, "ModelLoadError", ("mmproj file not found",)),
    "mmproj_is_text_model": ("{model}", "{model}", {}, "ModelLoadError", ("is a text model", "mmproj")),
    "mmproj_random_bytes": ("{model}", "{d}/random.gguf", {}, "ModelLoadError", ("not a gguf file",)),
    "mmproj_truncated": ("{model}", "{d}/mmproj_trunc.gguf", {}, "ModelLoadError", ("truncated",)),
    "mmproj_mismatched_n_embd": ("{model}", "{d}/mmproj96.gguf", {}, "ModelLoadError",
                                 ("96-dim", "64-dim", "different models")),
    "mmproj_audio_only": ("{model}", "{d}/audio.gguf", {}, "ModelLoadError", ("no vision encoder", "audio-only")),
    "mmproj_missing_tensor": ("{model}", "{d}/mmproj_missing_tensor.gguf", {}, "ModelLoadError",
                              ("v.blk.1.attn_k.weight", "corrupt")),
    "n_batch_below_n_seq_max": ("{model}", "{mmproj}", {"n_batch": 2}, "InvalidArgumentError",
                                ("n_batch (2)", "n_seq_max (4)")),
    "n_ctx_below_n_seq_max": ("{model}", "{mmproj}", {"n_ctx": 2}, "InvalidArgumentError", ("n_ctx (2)",)),
    "n_ctx_negative": ("{model}", "{mmproj}", {"n_ctx": -1}, "InvalidArgumentError", ("n_ctx", ">= 0")),
    "n_seq_max_zero": ("{model}", "{mmproj}", {"n_seq_max": 0}, "InvalidArgumentError", ("n_seq_max",)),
}

LOADER = r"""
import json, sys
root = sys.argv[1]
sys.path.insert(0, root)
from avis_llamacpp import VLM
from benchmarks.soak import run_spec
cases, good, vlm_kw, q0 = json.load(sys.stdin)
out = {}
for name, (model, mmproj, extra) in cases.items():
    print(json.dumps({"start": name}), flush=True)
    try:
        VLM(model, mmproj, **{**vlm_kw, **extra}).close()
        out[name] = {"type": None, "msg": "loaded"}
    except BaseException as e:
        out[name] = {"type": type(e).__name__, "msg": str(e)}
with VLM(good[0], good[1], **vlm_kw) as vlm:  # after all those failures, a query in this same process
    out["__after__"] = run_spec(vlm, q0)
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def load_results(llava_fixture, images, tmp_path_factory):
    from convert.fixtures import spec as fixture_spec
    from convert.mmproj import write_mmproj

    d = tmp_path_factory.mktemp("bad-files")
    fx = llava_fixture
    model, mmproj = fx.model.read_bytes(), fx.mmproj.read_bytes()
    (d / "random.gguf").write_bytes(np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes())
    (d / "empty.gguf").write_bytes(b"")
    (d / "badmagic.gguf").write_bytes(b"XXXX" + model[4:])
    (d / "model_trunc.gguf").write_bytes(model[:len(model) // 2])
    (d / "model_trunc1k.gguf").write_bytes(model[:1000])
    (d / "mmproj_trunc.gguf").write_bytes(mmproj[:len(mmproj) // 2])
    _patch_duplicate_token(fx.model, d / "model_dup.gguf")
    name = b"v.blk.1.attn_k.weight"
    assert mmproj.count(name) == 1
    (d / "mmproj_missing_tensor.gguf").write_bytes(mmproj.replace(name, b"v.blk.1.attn_k.weighX"))
    write_mmproj(d / "mmproj96.gguf", dataclasses.replace(fixture_spec("llava", "tiny")[1], proj_dim=96), seed=1,
                 name="mismatched")
    _audio_only_mmproj(d / "audio.gguf")
    fill = {"d": str(d), "model": str(fx.model), "mmproj": str(fx.mmproj)}
    cases = {k: (m.format(**fill), p.format(**fill), extra) for k, (m, p, extra, _, _) in LOAD_CASES.items()}
    q0 = _specs(images)["Q0"]
    proc = subprocess.run([sys.executable, "-c", LOADER, str(ROOT)], capture_output=True, text=True, timeout=300,
                          input=json.dumps([cases, [str(fx.model), str(fx.mmproj)], VLM_KW, q0]))
    started = [json.loads(x)["start"] for x in proc.stdout.splitlines() if x.startswith('{"start"')]
    assert proc.returncode == 0, (f"the loader process died (exit {proc.returncode}) while loading "
                                  f"{started[-1] if started else '?'}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_bad_model_file_is_a_typed_error_and_loading_still_works(case, load_results, oracle):
    _, _, _, exc, needles = LOAD_CASES[case]
    got = load_results[case]
    assert got["type"] == exc, got
    for n in needles:
        assert n.lower() in got["msg"].lower(), (n, got["msg"])
    assert load_results["__after__"] == oracle("llava")["Q0"]


def test_error_classes_are_avis_errors():
    for exc in (ImageError, InvalidArgumentError, ModelLoadError, ContextOverflowError, CaptureError,
                SnapshotMismatchError, ClosedError):
        assert issubclass(exc, AVISError)
    assert issubclass(ImageError, ValueError) and issubclass(InvalidArgumentError, ValueError)


# -- 2. recovery after interrupts and failing callbacks ---------------------------------------------------------
FAMILIES = ["llava", "qwen25vl"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["Q_stream", "QB_par", "QB_snap"])
def test_keyboard_interrupt_while_decoding_leaves_no_state(family, which, vlms, oracle, images):
    vlm, spec = vlms(family), _specs(images)[which]
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_spec(vlm, spec, on_text=on_text)
    assert len(pieces) == 2
    assert run_spec(vlm, spec) == oracle(family)[which]
    assert run_spec(vlm, _specs(images)["Q0"]) == oracle(family)["Q0"]


@pytest.mark.parametrize("family", FAMILIES)
def test_failing_key_capture_falls_back_and_leaves_the_vlm_usable(family, vlms, oracle, images, monkeypatch):
    vlm, specs = vlms(family), _specs(images)

    def broken(self, addr, ask):
        raise RuntimeError("simulated capture failure")

    spec = specs["QA"]
    with monkeypatch.context() as m:
        m.setattr(KeyCapture, "__call__", broken)
        # a model llama.cpp runs always gets an answer: KDV falls back to the projected embeddings, and says so
        a = vlm.ask(spec["image"], spec["question"], max_tokens=spec["max_tokens"], ratio=spec["ratio"])
        assert a.images[0]["key_source"] == "projected_embeddings:capture_failed"
        assert a.kept_tokens[0] < a.image_tokens[0]
    b = vlm.ask(spec["image"], spec["question"], max_tokens=spec["max_tokens"], ratio=spec["ratio"])
    assert b.images[0]["key_source"].startswith("vit_keys:")
    assert run_spec(vlm, specs["QA"]) == oracle(family)["QA"]


@pytest.mark.parametrize("family", FAMILIES)
def test_failing_selector_and_policy_leave_the_vlm_usable(family, vlms, oracle, images, monkeypatch):
    vlm, specs = vlms(family), _specs(images)

    def selector(*a, **kw):
        def select(chunk, embeddings):
            raise RuntimeError("simulated selector failure")
        return select

    with monkeypatch.context() as m:
        m.setattr(vlm.scorer, "kdv_selector", selector)  # the scorer builds the selector (scorer.py)
        with pytest.raises(RuntimeError, match="simulated selector failure"):
            run_spec(vlm, specs["QA"])
    assert run_spec(vlm, specs["QA"]) == oracle(family)["QA"]

    class BrokenPolicy:
        ratio, tau = 0.5, None

        def decide(self, features):
            raise ValueError("simulated policy failure")

    with pytest.raises(ValueError, match="simulated policy failure"):
        vlm.ask(images["demo"], "q", policy=BrokenPolicy(), max_tokens=4)
    assert run_spec(vlm, specs["QB_snap"]) == oracle(family)["QB_snap"]


# -- 3. isolation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_answers_do_not_depend_on_earlier_queries(family, vlms, oracle, images):
    """Queries with other images, K, pruning and modes in between; each equals its fresh-process output."""
    vlm, specs, want = vlms(family), _specs(images), oracle(family)
    order = ["QA", "QB_par", "QA_snap", "QB_snap", "QS", "QB_par", "QA", "QB_snap", "QS", "QA_snap"]
    for name in order:
        assert run_spec(vlm, specs[name]) == want[name], f"{name} differs from a fresh process"


# -- 5. concurrency ----------------------------------------------------------------------------------------------
def test_threads_share_one_vlm_safely(vlm, oracle, images):
    specs, want = _specs(images), oracle("llava")
    names = ["Q0", "QB_par", "QB_snap", "QS", "QA"]
    errors: list[BaseException] = []
    got: list[tuple[str, dict]] = []

    def worker(shift: int) -> None:
        try:
            for i in range(len(names)):
                name = names[(i + shift) % len(names)]
                got.append((name, run_spec(vlm, specs[name])))
                vlm.render_question("q", 1)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(got) == 4 * len(names)
    for name, res in got:
        assert res == want[name], f"{name} run concurrently differs from a fresh process"


def test_close_waits_for_a_running_query_then_refuses_clearly(llava_fixture, images, oracle):
    vlm = VLM(llava_fixture.model, llava_fixture.mmproj, **VLM_KW)
    spec = _specs(images)["Q_stream"]
    started, pieces_at, result = threading.Event(), [], {}

    def slow(piece: str) -> None:  # runs inside the query, under the VLM's lock
        pieces_at.append(time.perf_counter())
        started.set()
        time.sleep(0.02)  # keeps the query busy while close() is called

    def query() -> None:
        result["out"] = run_spec(vlm, spec, on_text=slow)

    t = threading.Thread(target=query)
    t.start()
    assert started.wait(60)
    vlm.close()  # must wait for the query, not free the model under it
    closed_at = time.perf_counter()
    t.join(60)
    assert result["out"] == oracle("llava")["Q_stream"]  # the running query finished, undisturbed
    assert len(pieces_at) >= 2 and max(pieces_at) <= closed_at  # close() returned only after it
    assert vlm.closed
    with _raises(ClosedError, "closed", "create a new VLM"):
        vlm.ask(images["demo"], "q")
    with pytest.raises(ClosedError):
        vlm.generate("text", [])
    with pytest.raises(ClosedError):
        vlm.snapshot(images["demo"])
    with pytest.raises(ClosedError):
        vlm.render_question("q", 1)
    vlm.close()  # idempotent


def test_failed_construction_frees_what_it_loaded(llava_fixture, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)  # header too short
    with pytest.raises(ModelLoadError):
        VLM(llava_fixture.model, bad, **VLM_KW)
    with pytest.raises(InvalidArgumentError):
        VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_batch=1, n_seq_max=8)
