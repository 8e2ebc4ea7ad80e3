"""Seeded fuzzing of what users hand us, in worker subprocesses so a segfault / abort shows up as a failure:
mutated PNG / JPEG / GIF / WebP bytes through load_image + mtmd tokenize + encode, and mutated model / mmproj
GGUF files through loading and first use. The long runs are benchmarks/fuzz_images.py."""

from __future__ import annotations

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
