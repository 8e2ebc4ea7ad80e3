"""GGUF pre-flight (preflight.py, #16): the header it reads equals gguf-py's own element-by-element reading,
it stays cheap on a large vocabulary, and broken files are ModelLoadErrors naming what is wrong."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from avis_llamacpp.errors import ModelLoadError
from avis_llamacpp.preflight import check_text_model_file, scan_gguf


def _write(path: Path, *, tokens=("a", "b", "c"), extra=None, tensors=None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_uint32("test.u32", 7)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.flag", True)
    w.add_string("test.str", "héllo")
    w.add_array("test.small", [1, 2, 3])
    w.add_array("test.big", list(range(40)))
    w.add_token_list(list(tokens))
    w.add_token_types([1] * len(tokens))
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for name, arr in (tensors or {"t.weight": np.arange(64, dtype=np.float32).reshape(8, 8)}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_equals_gguf_py_reading(vlm_fixture):
    """Oracle: the stock GGUFReader (every element its own view) on both fixture files."""
    for path in (vlm_fixture.model, vlm_fixture.mmproj):
        hdr, r = scan_gguf(path), gguf.GGUFReader(path)
        assert hdr.data_offset == r.data_offset and hdr.version == r.fields["GGUF.version"].contents()
        want = {t.name: (tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in r.tensors}
        assert hdr.tensors == want
        for name, f in r.fields.items():
            if name.startswith("GGUF."):
                continue
            value = f.contents()
            if isinstance(value, list) and (len(value) > 16 or (value and isinstance(value[0], str))):
                assert hdr.metadata[name] == (int(f.types[-1]), len(value)), name
            else:
                assert hdr.metadata[name] == value, name
        toks = r.fields.get("tokenizer.ggml.tokens")
        assert (hdr.tokens is None) == (toks is None)
        if toks is not None:
            assert [t.decode() for t in hdr.tokens] == toks.contents()


def test_small_file_by_hand(tmp_path):
    hdr = scan_gguf(_write(tmp_path / "m.gguf"))
    assert hdr.architecture == "llama" and hdr.get("llama.block_count") == 2
    assert hdr.get("test.u32") == 7 and hdr.get("test.f32") == 0.5 and hdr.get("test.flag") is True
    assert hdr.get("test.str") == "héllo" and hdr.get("test.small") == [1, 2, 3]
    assert hdr.get("test.big")[1] == 40 and hdr.tokens == [b"a", b"b", b"c"]
    assert hdr.tensors == {"t.weight": ((8, 8), int(gguf.GGMLQuantizationType.F32))}


def test_scan_reads_a_large_vocabulary_without_tensor_data(tmp_path):
    """A 100k-token vocabulary comes back whole and a 64 MiB tensor is described, not read (speed against gguf-py's
    reader is a benchmark, not a test: benchmarks/bench_preflight.py)."""
    n = 100_000
    big = {"t.weight": np.zeros((4096, 4096), dtype=np.float32)}
    path = _write(tmp_path / "v.gguf", tokens=[f"tok{i}" for i in range(n)], tensors=big)
    hdr = scan_gguf(path)
    assert len(hdr.tokens) == n and hdr.tokens[12345] == b"tok12345"
    assert hdr.tensors == {"t.weight": ((4096, 4096), int(gguf.GGMLQuantizationType.F32))}


def _patch(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def _u64_after(data: bytearray, key: bytes, skip: int) -> int:
    """Offset of the 8-byte field `skip` bytes after the metadata key `key`."""
    return data.index(key) + len(key) + skip


@pytest.mark.parametrize("case, needles", [
    ("truncated_in_tokens", ("malformed or truncated", "string array runs past")),
    ("truncated_tensor_data", ("truncated", "data ends at byte")),
    ("too_many_kv", ("claims", "metadata entries")),
    ("too_many_strings", ("claims", "strings")),
    ("unknown_value_type", ("malformed",)),
    ("bad_version", ("malformed", "version 7")),
    ("five_dims", ("5 dimensions",)),
    ("bad_alignment", ("malformed", "alignment")),
    ("non_utf8_key", ("malformed", "UnicodeDecodeError")),
])
def test_broken_files_are_typed_errors(tmp_path, case, needles):
    good = _write(tmp_path / "good.gguf", extra={"zz.key": "v"})
    size = good.stat().st_size
    raw = good.read_bytes()
    tok_at = raw.index(b"tokenizer.ggml.tokens")
    edits = {
        "truncated_in_tokens": lambda d: d.__delitem__(slice(tok_at + 62, None)),
        "truncated_tensor_data": lambda d: d.__delitem__(slice(size - 16, None)),
        "too_many_kv": lambda d: d.__setitem__(slice(16, 24), struct.pack("<Q", 1 << 40)),
        "too_many_strings": lambda d: d.__setitem__(
            slice(_u64_after(d, b"tokenizer.ggml.tokens", 8), _u64_after(d, b"tokenizer.ggml.tokens", 16)),
            struct.pack("<Q", 1 << 40)),
        "unknown_value_type": lambda d: d.__setitem__(slice(_u64_after(d, b"test.u32", 0),
                                                            _u64_after(d, b"test.u32", 4)), struct.pack("<I", 99)),
        "bad_version": lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 7)),
        "five_dims": lambda d: d.__setitem__(slice(_u64_after(d, b"t.weight", 0), _u64_after(d, b"t.weight", 4)),
                                             struct.pack("<I", 5)),
        "non_utf8_key": lambda d: d.__setitem__(d.index(b"zz.key"), 0xFF),
    }
    if case == "bad_alignment":
        w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
        w.add_uint32("general.alignment", 24)
        w.add_tensor("t.weight", np.zeros((8, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        bad = tmp_path / "bad.gguf"
    else:
        bad = _patch(good, tmp_path / "bad.gguf", edits[case])
    with pytest.raises(ModelLoadError) as e:
        check_text_model_file(bad)
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert str(bad) in str(e.value)


def test_unknown_tensor_type_is_left_to_llama_cpp(tmp_path):
    """A type this gguf-py does not know may be one a newer llama.cpp does: listed, not refused."""
    good = _write(tmp_path / "good.gguf")
    at = good.read_bytes().index(b"t.weight") + len(b"t.weight") + 4 + 2 * 8
    bad = _patch(good, tmp_path / "new.gguf", lambda d: d.__setitem__(slice(at, at + 4), struct.pack("<I", 250)))
    assert scan_gguf(bad).tensors["t.weight"] == ((8, 8), 250)


def test_not_a_gguf_and_missing(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        scan_gguf(tmp_path / "x.gguf", "mmproj")
    with pytest.raises(ModelLoadError, match="mmproj file not found"):
        scan_gguf(tmp_path / "nope.gguf", "mmproj")
    with pytest.raises(ModelLoadError, match="text model path .* is a folder; give the GGUF file in it"):
        scan_gguf(tmp_path, "text model")
