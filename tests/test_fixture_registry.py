"""The one registry of test models (convert/fixtures.py): every family and size through make_fixture, listed by
`python -m convert.fixtures --list`; llama.cpp's quantizer quiet unless verbose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fixture_list_names_every_family_and_size():
    """`python -m convert.fixtures --list` prints one line per registered family with its sizes, and every
    family of the registry is one make_fixture call away (unknown names are refused with the list)."""
    from convert.fixtures import REGISTRY, SIZES, _SPECS, make_fixture

    out = subprocess.run([sys.executable, "-m", "convert.fixtures", "--list"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    listed = {line.split()[0]: line.split()[1:-1] for line in out.splitlines()}
    families = {"llava", "qwen25vl", "exaone4_5", "mimovl", "paddleocr", "dots_ocr", "kimivl", "janus_pro", "phi4",
                "llama4", "minimax_m3", "kimik25", "nemotron_v2_vl", "qwen3vl", "ling3vl", "glm4v", "glm5v", "ldpv2",
                "gemma3", "gemma4v", "pixtral", "lightonocr", "internvl", "idefics3", "lfm2"}
    assert set(listed) == set(REGISTRY) == families
    for fam, sizes in listed.items():
        assert sizes == [s for s in SIZES if (fam, s) in _SPECS or (s == "tiny" and fam not in
                                                                    {f for f, _ in _SPECS})], fam
    with pytest.raises(ValueError, match="families: llava, qwen25vl"):
        make_fixture("nosuch")
    with pytest.raises(ValueError, match="its sizes: tiny"):
        make_fixture("gemma3", "bench")


@pytest.mark.parametrize("verbose", [False, True])
def test_quantizer_is_quiet_unless_verbose(tmp_path, capfd, verbose):
    """Quantizing a fixture's f16 text model writes nothing on stderr (fd 2, where llama.cpp logs) unless verbose;
    the quantized file is a Q8_0 GGUF either way."""
    import gguf

    from convert.fixtures import quantize_model, spec
    from convert.text_model import write_text_model

    text, _, template, _ = spec("llava", "tiny")
    src, dst = tmp_path / "f16.gguf", tmp_path / "q8.gguf"
    write_text_model(src, text, seed=0, chat_template=template, name="q", ftype="f16")
    capfd.readouterr()
    quantize_model(src, dst, "q8_0", nthread=1, verbose=verbose)
    err = capfd.readouterr().err
    assert (len(err.splitlines()) > 10) if verbose else err == "", err[:500]
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors}
    assert "Q8_0" in types
