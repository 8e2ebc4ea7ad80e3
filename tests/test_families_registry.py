"""The family registry: one place names projector types; the README's supported-models table agrees with it;
the VLM wires the family's key names into the capture; thread settings pin the batch threads too."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from avis_llamacpp import VLM
from avis_llamacpp.families import FALLBACK, family_for, native_types, registered
from avis_llamacpp.native import ContextSettings

ROOT = Path(__file__).resolve().parents[1]


def _readme_rows() -> dict[str, str]:
    """projector type -> status ('native' / 'fallback' / 'n/a') from the README's supported-models table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Supported models and limits", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        status = cells[2].split()[0].strip("*").lower() if cells[2] else ""
        for ptype in re.findall(r"`([^`]+)`", cells[0]):
            rows[ptype] = status
    return rows


def test_readme_table_matches_the_registry():
    rows = _readme_rows()
    readme_native = {p for p, s in rows.items() if s == "native"}
    assert readme_native == set(native_types())
    for p, s in rows.items():
        if s != "native":
            assert not family_for(p).native, p


def test_every_native_type_has_a_fixture_test():
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    covered = {"mlp": "llava", "qwen2.5vl_merger": "qwen25vl"}  # the core pair runs through every generic test
    for p in native_types():
        fam = family_for(p)
        assert p in tests or fam.name in tests or covered.get(p, "") in tests, p


def test_unknown_types_fall_back():
    assert family_for("no-such-projector") is FALLBACK and not FALLBACK.native
    assert family_for(None) is FALLBACK
    assert "qwen2.5o" in registered() and family_for("qwen2.5o") is family_for("qwen2.5vl_merger")


def test_projector_types_are_named_only_in_the_registry():
    pkg = ROOT / "avis_llamacpp"
    names = set(registered())
    offenders = []
    allowed = {("predictor.py", "mlp")}  # the predictor's MLP classifier, not the projector
    for path in pkg.glob("*.py"):
        if path.name == "families.py":
            continue
        src = path.read_text()
        for n in names:
            if (path.name, n) not in allowed and re.search(r"[\"']" + re.escape(n) + r"[\"']", src):
                offenders.append((path.name, n))
    assert offenders == []


def test_explicit_n_threads_pins_batch_threads():
    assert ContextSettings(n_threads=1).resolved_threads() == (1, 1)
    assert ContextSettings(n_threads=1, n_threads_batch=2).resolved_threads() == (1, 2)
    cpu = os.cpu_count() or 2
    assert ContextSettings().resolved_threads() == (max(1, cpu // 2), cpu)  # llama_cpp.Llama's defaults


def test_vlm_uses_the_familys_key_names(fixture_root):
    from convert.fixtures import make_fixture

    fx = make_fixture("gemma3", out_dir=fixture_root)
    with VLM(fx.model, fx.mmproj, n_ctx=1024, n_threads=1, flash_attn=False) as v:
        assert set(v.key_capture.priority) == set(family_for("gemma3").key_names)
    with VLM(fx.model, fx.mmproj, n_ctx=1024, n_threads=1, capture_keys=False, flash_attn=False) as v:
        assert v.key_capture is None


@pytest.mark.parametrize("fixture_family", sorted(__import__("convert.fixtures", fromlist=["REGISTRY"]).REGISTRY))
def test_every_fixture_is_native_and_its_ffn_gating_matches_the_file(fixture_family, fixture_root):
    """Each test model's projector type maps to a native family whose FLOPs count a gated (SwiGLU) ViT MLP exactly
    when the file has ffn_gate tensors, and whose projection size is the text model's input width."""
    import gguf

    from avis_llamacpp.capture import read_vision_info
    from avis_llamacpp.preflight import scan_gguf
    from convert.fixtures import make_fixture

    fx = make_fixture(fixture_family, "tiny", out_dir=fixture_root)
    info = read_vision_info(fx.mmproj)
    fam = family_for(info.projector_type)
    assert fam.native, info.projector_type
    tensors = scan_gguf(fx.mmproj, "mmproj").tensors
    gated = any(name.startswith("v.blk.") and name.endswith("ffn_gate.weight") for name in tensors)
    assert fam.encoder_dims(info).gated_ffn is gated, info.projector_type
    text = gguf.GGUFReader(str(fx.model))
    arch = text.fields["general.architecture"].contents()
    n_embd = int(text.fields[f"{arch}.embedding_length"].contents())
    n_deepstack = int(text.fields[f"{arch}.n_deepstack_layers"].contents()) if (
        f"{arch}.n_deepstack_layers" in text.fields) else 0
    assert fam.projection_dim(tensors) == n_embd * (1 + n_deepstack), info.projector_type
