"""Every pre-flight rule (preflight.py) has a broken file that only that rule stops (issue #34).

Each file is a tiny fixture with one minimal edit (a key's value, a renamed or added tensor), so it passes every
other rule; loading it must raise ModelLoadError naming that rule's problem. The files are loaded by a real VLM in
a child process: with a rule gone, llama.cpp or mtmd would load the file and may abort or segfault, which must
fail the test (the case is reported as a crash), not kill the test run. A file the rule no longer stops is also
asked one question there, so a crash at encode time shows too. The child runs the cases one after another and is
restarted after a crash, so one crash costs one restart."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VLM_KW = {"n_ctx": 512, "n_seq_max": 1, "n_threads": 1, "n_threads_batch": 1, "flash_attn": False}

# the child: load each case, then (if it loaded) ask one question, printing a JSON line per step
LOADER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from avis_llamacpp import VLM
cases, vlm_kw = json.load(sys.stdin)
image = np.full((64, 64, 3), 128, dtype=np.uint8)
for name, model, mmproj in cases:
    print(json.dumps({"start": name}), flush=True)
    try:
        with VLM(model, mmproj, **vlm_kw) as vlm:
            vlm.ask(image, "What is this?", max_tokens=2)
        out = {"type": None, "msg": "loaded and answered"}
    except BaseException as e:
        out = {"type": type(e).__name__, "msg": str(e)}
    print(json.dumps({"case": name, **out}), flush=True)
"""


def run_cases(cases: list[tuple[str, str, str]], loader: str = LOADER) -> dict[str, dict[str, Any]]:
    """Each case's outcome in a child process; a case the child died on is {"type": "crash", "rc": exit code} and
    the child is restarted for the cases after it."""
    results: dict[str, dict[str, Any]] = {}
    todo = list(cases)
    while todo:
        proc = subprocess.run([sys.executable, "-c", loader, str(ROOT)], input=json.dumps([todo, VLM_KW]),
                              capture_output=True, text=True, timeout=300)
        started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            elif "case" in msg:
                results[msg["case"]] = msg
        names = [c[0] for c in todo]
        if proc.returncode == 0 and all(n in results for n in names):
            break
        if started is None or started in results:
            raise AssertionError(f"the loader failed outside any case (exit {proc.returncode}): {proc.stderr[-2000:]}")
        results[started] = {"case": started, "type": "crash", "rc": proc.returncode, "msg": proc.stderr[-1500:]}
        todo = todo[names.index(started) + 1:]
    return results


# --------------------------------------------------------------------------- #
# minimal edits of a GGUF file
# --------------------------------------------------------------------------- #

def _kv_value_at(data: bytes, key: str, vtype: gguf.GGUFValueType) -> int:
    """Offset of the value of metadata key `key` (which must occur once and have type vtype)."""
    k = key.encode()
    needle = struct.pack("<Q", len(k)) + k
    assert data.count(needle) == 1, (key, data.count(needle))
    at = data.index(needle) + len(needle)
    assert struct.unpack_from("<I", data, at)[0] == int(vtype), key
    return at + 4


def set_u32(data: bytearray, key: str, value: int) -> None:
    at = _kv_value_at(data, key, gguf.GGUFValueType.UINT32)
    data[at:at + 4] = struct.pack("<I", value)


def set_bool(data: bytearray, key: str, value: bool) -> None:
    at = _kv_value_at(data, key, gguf.GGUFValueType.BOOL)
    data[at] = int(value)


def set_i32_array(data: bytearray, key: str, values: list[int]) -> None:
    at = _kv_value_at(data, key, gguf.GGUFValueType.ARRAY)
    etype, n = struct.unpack_from("<IQ", data, at)
    assert etype == int(gguf.GGUFValueType.INT32) and n == len(values), (etype, n)
    data[at + 12:at + 12 + 4 * n] = struct.pack(f"<{n}i", *values)


def set_string(data: bytearray, key: str, old: str, new: str) -> None:
    """Replace a string value by another of the same length."""
    assert len(old.encode()) == len(new.encode())
    at = _kv_value_at(data, key, gguf.GGUFValueType.STRING)
    ln = struct.unpack_from("<Q", data, at)[0]
    assert bytes(data[at + 8:at + 8 + ln]) == old.encode(), bytes(data[at + 8:at + 8 + ln])
    data[at + 8:at + 8 + ln] = new.encode()


def rename(data: bytearray, old: str, new: str) -> None:
    """Rename a tensor or key (same length; the name must occur exactly once as a whole, length-prefixed name)."""
    o, n = old.encode(), new.encode()
    assert len(o) == len(n)
    needle = struct.pack("<Q", len(o)) + o
    assert data.count(needle) == 1, (old, data.count(needle))
    at = data.index(needle) + 8
    data[at:at + len(o)] = n


def tensor_names(path: Path) -> list[str]:
    return [t.name for t in gguf.GGUFReader(str(path)).tensors]


def rewrite(src: Path, dst: Path, *, add_kv: dict[str, int] | None = None,
            add_tensors: dict[str, np.ndarray] | None = None, big_endian: bool = False) -> None:
    """Copy a GGUF with gguf-py, adding uint32 metadata keys and F32 tensors (every other key and tensor as is),
    optionally as a big-endian file."""
    r = gguf.GGUFReader(str(src))
    arch = str(r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(dst), arch, endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(int(f.types[0]))
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vtype, sub_type=gguf.GGUFValueType(int(f.types[-1])))
        else:
            w.add_key_value(name, f.contents(), vtype)
    for name, value in (add_kv or {}).items():
        w.add_uint32(name, value)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                     raw_dtype=t.tensor_type)
    for name, arr in (add_tensors or {}).items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def set_array_header(data: bytearray, key: str, *, etype: int | None = None, count: int | None = None) -> None:
    """Overwrite an array key's element type and / or element count."""
    at = _kv_value_at(data, key, gguf.GGUFValueType.ARRAY)
    if etype is not None:
        data[at:at + 4] = struct.pack("<I", etype)
    if count is not None:
        data[at + 4:at + 12] = struct.pack("<Q", count)


def set_tensor_type(data: bytearray, name: str, n_dims: int, ggml_type: int) -> None:
    """Overwrite a tensor's ggml type in the tensor table (name, n_dims, ne[n_dims], type, offset)."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    assert data.count(needle) == 1, name
    at = data.index(needle) + len(needle)
    assert struct.unpack_from("<I", data, at)[0] == n_dims
    at += 4 + 8 * n_dims
    data[at:at + 4] = struct.pack("<I", ggml_type)


def _tokens(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every vocabulary string."""
    at = _kv_value_at(data, "tokenizer.ggml.tokens", gguf.GGUFValueType.ARRAY)
    etype, n = struct.unpack_from("<IQ", data, at)
    assert etype == int(gguf.GGUFValueType.STRING)
    at += 12
    spans = []
    for _ in range(n):
        (ln,) = struct.unpack_from("<Q", data, at)
        spans.append((at + 8, ln))
        at += 8 + ln
    return spans


def duplicate_after_nul(data: bytearray) -> None:
    """Overwrite a vocabulary entry with a shorter one + NUL padding: different bytes, the same C string."""
    spans = _tokens(data)
    short = next((s for s in spans if 2 <= s[1] <= 4 and b"\0" not in data[s[0]:s[0] + s[1]]))
    word = bytes(data[short[0]:short[0] + short[1]])
    at, ln = next(s for s in spans if s[1] > short[1] + 1 and s != short)
    data[at:at + ln] = word + b"\0" * (ln - len(word))


# --------------------------------------------------------------------------- #
# the cases
# --------------------------------------------------------------------------- #

Edit = Callable[[bytearray, Path], None]


def _blocks(path: Path, suffix: str) -> list[str]:
    return [n for n in tensor_names(path) if n.startswith("v.blk.") and n.endswith(suffix)]


# name: (family, which file, the edit, the rule's words in the error)
CASES: dict[str, tuple[str, str, Edit, tuple[str, ...]]] = {
    # text model
    "text_no_architecture": ("llava", "model", lambda d, p: rename(d, "general.architecture", "general.architectura"),
                             ("has no general.architecture",)),
    "text_block_count_over_max": ("llava", "model", lambda d, p: set_u32(d, "llama.block_count", 600),
                                  ("llama.block_count is 600", "not in 1..512")),
    "text_rope_sections_wider_than_rotary": (
        "qwen25vl", "model", lambda d, p: set_i32_array(d, "qwen2vl.rope.dimension_sections", [20, 3, 3, 0]),
        ("rope.dimension_sections", "rotary dimensions")),
    "text_rope_sections_all_zero": (
        "qwen25vl", "model", lambda d, p: set_i32_array(d, "qwen2vl.rope.dimension_sections", [0, 0, 0, 0]),
        ("rope.dimension_sections",)),
    "text_duplicate_token_after_nul": ("llava", "model", lambda d, p: duplicate_after_nul(d), ("twice",)),
    # the header's structure (gguf-py would raise something unrelated, or read past the file)
    "text_tensor_count_beyond_the_file": (
        "llava", "model", lambda d, p: d.__setitem__(slice(8, 16), struct.pack("<Q", 1 << 40)),  # tensor count
        ("claims 1099511627776 tensors",)),
    "text_row_not_whole_blocks": (
        "llava", "model",
        lambda d, p: set_tensor_type(d, "blk.0.attn_norm.weight", 1, int(gguf.GGMLQuantizationType.Q4_K)),
        ("row size 64 is not a multiple of its block size 256",)),
    "text_numeric_array_past_the_end": (
        "llava", "model", lambda d, p: set_array_header(d, "tokenizer.ggml.token_type", count=1 << 40),
        ("an array of 1099511627776 values runs past the end of the file",)),
    "text_array_of_unknown_type": (
        "llava", "model", lambda d, p: set_array_header(d, "tokenizer.ggml.token_type", etype=99),
        ("unknown element type 99",)),
    "text_array_of_arrays": (
        "llava", "model", lambda d, p: set_array_header(d, "tokenizer.ggml.token_type",
                                                        etype=int(gguf.GGUFValueType.ARRAY)),
        ("unsupported element type ARRAY",)),
    # mmproj
    "mmproj_other_architecture": ("llava", "mmproj", lambda d, p: set_string(d, "general.architecture", "clip", "clap"),
                                  ("not an mmproj GGUF", "'clap'")),
    "mmproj_no_vision_encoder": ("llava", "mmproj", lambda d, p: set_bool(d, "clip.has_vision_encoder", False),
                                 ("no vision encoder", "not a vision projector")),
    "mmproj_no_attn_q_in_any_block": (
        "llava", "mmproj", lambda d, p: [rename(d, n, n[:-1] + "X") for n in _blocks(p, ".attn_q.weight")],
        ("v.blk.0.attn_q.weight",)),
    "mmproj_one_block_lacks_a_tensor": (
        "llava", "mmproj", lambda d, p: rename(d, "v.blk.1.ln1.weight", "v.blk.1.ln1.weighX"),
        ("v.blk.1.ln1.weight",)),
    "mmproj_no_q_bias_in_any_block": (
        "qwen25vl", "mmproj", lambda d, p: [rename(d, n, n[:-1] + "X") for n in _blocks(p, ".attn_q.bias")],
        ("v.blk.0.attn_q.bias",)),
    "mmproj_llava_projector_bias_missing": ("llava", "mmproj", lambda d, p: rename(d, "mm.0.bias", "mm.0.biaX"),
                                            ("mm.0.bias",)),
    "mmproj_llava_position_embd_missing": (
        "llava", "mmproj", lambda d, p: rename(d, "v.position_embd.weight", "v.position_embd.weighX"),
        ("v.position_embd.weight",)),
    "mmproj_qwen_second_patch_embd_missing": (
        "qwen25vl", "mmproj", lambda d, p: rename(d, "v.patch_embd.weight.1", "v.patch_embd.weight.9"),
        ("v.patch_embd.weight.1",)),
    "mmproj_qwen3vl_no_qkv_bias_in_any_block": (
        "qwen3vl", "mmproj", lambda d, p: [rename(d, n, n[:-1] + "X") for n in _blocks(p, ".attn_qkv.bias")],
        ("v.blk.0.attn_qkv.bias",)),
    "mmproj_qwen3vl_patch_bias_missing": ("qwen3vl", "mmproj",
                                          lambda d, p: rename(d, "v.patch_embd.bias", "v.patch_embd.biaX"),
                                          ("v.patch_embd.bias",)),
    "mmproj_exaone_one_block_lacks_its_fused_qkv": (  # exaone4_5.cpp asserts qkv_w in every block (abort)
        "exaone4_5", "mmproj", lambda d, p: rename(d, "v.blk.1.attn_qkv.weight", "v.blk.1.attn_qkv.weighX"),
        ("v.blk.1.attn_q",)),
    "mmproj_mimovl_no_qkv_bias_in_any_block": (  # mimovl.cpp adds qkv_b unchecked
        "mimovl", "mmproj", lambda d, p: [rename(d, n, n[:-1] + "X") for n in _blocks(p, ".attn_qkv.bias")],
        ("v.blk.0.attn_qkv.bias",)),
    "mmproj_paddleocr_position_embd_missing": (  # paddleocr.cpp's position resize asserts on it (abort)
        "paddleocr", "mmproj", lambda d, p: rename(d, "v.position_embd.weight", "v.position_embd.weighX"),
        ("v.position_embd.weight",)),
    "mmproj_dots_ocr_post_norm_missing": (  # clip.cpp requires it for dots_ocr (a typed error either way: the
        # rule names it before mtmd's generic load failure)
        "dots_ocr", "mmproj", lambda d, p: rename(d, "mm.post_norm.weight", "mm.post_norm.weighX"),
        ("mm.post_norm.weight",)),
    "mmproj_kimivl_position_embd_missing": (  # kimivl.cpp's position resize asserts on it (abort)
        "kimivl", "mmproj", lambda d, p: rename(d, "v.position_embd.weight", "v.position_embd.weighX"),
        ("v.position_embd.weight",)),
    "mmproj_phi4_position_embd_missing": (  # siglip.cpp resizes phi4's position table: it asserts on it (abort)
        "phi4", "mmproj", lambda d, p: rename(d, "v.position_embd.weight", "v.position_embd.weighX"),
        ("v.position_embd.weight",)),
    "mmproj_llama4_class_embd_missing": (  # llama4.cpp asserts the class embedding (abort)
        "llama4", "mmproj", lambda d, p: rename(d, "v.class_embd", "v.class_embX"), ("v.class_embd",)),
    "mmproj_minimax_m3_second_patch_embd_missing": (  # minimax-m3.cpp asserts both patch convs (abort)
        "minimax_m3", "mmproj", lambda d, p: rename(d, "v.patch_embd.weight.1", "v.patch_embd.weight.9"),
        ("v.patch_embd.weight.1",)),
    "mmproj_nemotron_registers_missing": (  # nemotron-v2-vl.cpp asserts the register tensor (abort)
        "nemotron_v2_vl", "mmproj", lambda d, p: rename(d, "v.class_embd", "v.class_embX"), ("v.class_embd",)),
    "mmproj_ling3vl_position_embd_missing": (  # ling3vl.cpp's position resize asserts on it (abort)
        "ling3vl", "mmproj", lambda d, p: rename(d, "v.position_embd.weight", "v.position_embd.weighX"),
        ("v.position_embd.weight",)),
    "mmproj_glm4v_second_patch_embd_missing": (
        "glm4v", "mmproj", lambda d, p: rename(d, "v.patch_embd.weight.1", "v.patch_embd.weight.9"),
        ("v.patch_embd.weight.1",)),
    "mmproj_glm4v_patch_merger_missing": (
        "glm4v", "mmproj", lambda d, p: rename(d, "mm.patch_merger.weight", "mm.patch_merger.weighX"),
        ("mm.patch_merger.weight",)),
}
# made with gguf-py (a key or tensor added): (family, which file, added keys, added tensors, words)
ADDED: dict[str, tuple[str, str, dict[str, int], dict[str, np.ndarray], tuple[str, ...]]] = {
    "text_big_endian": ("llava", "model", {}, {}, ("big-endian GGUF",)),  # written big-endian (below)
    "text_nextn_layers_over_block_count": ("llava", "model", {"llama.nextn_predict_layers": 5}, {},
                                           ("nextn_predict_layers 5 exceeds block_count 2",)),
    "text_experts_used_over_count": ("llava", "model", {"llama.expert_count": 2, "llama.expert_used_count": 4}, {},
                                     ("inconsistent expert counts", "expert_used_count=4")),
    "mmproj_qwen_class_embd_forbidden": ("qwen25vl", "mmproj", {}, {"v.class_embd": np.zeros(64, np.float32)},
                                         ("v.class_embd must not exist",)),
    "mmproj_qwen3vl_class_embd_forbidden": ("qwen3vl", "mmproj", {}, {"v.class_embd": np.zeros(64, np.float32)},
                                            ("v.class_embd must not exist",)),
    "mmproj_exaone_patch_bias_forbidden": ("exaone4_5", "mmproj", {}, {"v.patch_embd.bias": np.zeros(64, np.float32)},
                                           ("v.patch_embd.bias must not exist",)),
    "mmproj_glm4v_class_embd_forbidden": ("glm4v", "mmproj", {}, {"v.class_embd": np.zeros(64, np.float32)},
                                          ("v.class_embd must not exist",)),
    "mmproj_qwen_patch_bias_forbidden": ("qwen25vl", "mmproj", {}, {"v.patch_embd.bias": np.zeros(64, np.float32)},
                                         ("v.patch_embd.bias must not exist",)),
}
# EXAONE 4.5 with separate q / k / v in every block instead of its fused QKV: a generic ViT would load, but
# exaone4_5.cpp asserts the fused projection (abort), so only the family's per-block rule stops it
_EXAONE_E, _EXAONE_KV = 64, 32  # the fixture's width and its 2 key heads x 16
ADDED["mmproj_exaone_separate_qkv_instead_of_fused"] = (
    "exaone4_5", "mmproj", {},
    {f"v.blk.{il}.attn_{x}.weight": np.zeros((_EXAONE_E if x == "q" else _EXAONE_KV, _EXAONE_E), np.float32)
     for il in range(4) for x in "qkv"},
    ("v.blk.0.attn_qkv.weight",))
THEN_EDITED: dict[str, Edit] = {
    "mmproj_exaone_separate_qkv_instead_of_fused":
        lambda d, p: [rename(d, n, n[:-1] + "X") for n in _blocks(p, ".attn_qkv.weight")],
}
ALL_CASES = sorted(set(CASES) | set(ADDED))


@pytest.fixture(scope="module")
def outcomes(llava_fixture, qwen_fixture, fixture_root, tmp_path_factory) -> dict[str, dict[str, Any]]:
    from convert.fixtures import make_fixture

    d = tmp_path_factory.mktemp("preflight-rules")
    fx = {"llava": llava_fixture, "qwen25vl": qwen_fixture,
          **{fam: make_fixture(fam, "tiny", out_dir=fixture_root)
             for fam in ("qwen3vl", "ling3vl", "glm4v", "exaone4_5", "mimovl", "paddleocr", "dots_ocr",
                         "kimivl", "phi4", "llama4", "minimax_m3", "nemotron_v2_vl")}}
    cases = []
    for name, (fam, which, edit, _) in CASES.items():
        src = Path(getattr(fx[fam], which))
        data = bytearray(src.read_bytes())
        edit(data, src)
        dst = d / f"{name}.gguf"
        dst.write_bytes(bytes(data))
        cases.append((name, dst, fam, which))
    for name, (fam, which, kv, tensors, _) in ADDED.items():
        dst = d / f"{name}.gguf"
        rewrite(Path(getattr(fx[fam], which)), dst, add_kv=kv, add_tensors=tensors,
                big_endian=name == "text_big_endian")
        if name in THEN_EDITED:  # and a byte edit after the tensors were added
            data = bytearray(dst.read_bytes())
            THEN_EDITED[name](data, dst)
            dst.write_bytes(bytes(data))
        cases.append((name, dst, fam, which))
    # the good pair of each family, loaded last: the child process still loads and answers with it
    runs = [(name, str(dst) if which == "model" else str(fx[fam].model),
             str(dst) if which == "mmproj" else str(fx[fam].mmproj)) for name, dst, fam, which in cases]
    runs += [(f"good_{fam}", str(f.model), str(f.mmproj)) for fam, f in fx.items()]
    return run_cases(runs)


@pytest.mark.parametrize("case", ALL_CASES)
def test_each_rule_stops_its_broken_file_and_the_process_survives(case, outcomes):
    words = CASES[case][3] if case in CASES else ADDED[case][4]
    got = outcomes[case]
    assert got["type"] != "crash", f"llama.cpp killed the process (exit {got['rc']}) on {case}: {got['msg'][-600:]}"
    assert got["type"] == "ModelLoadError", got
    for w in words:
        assert w in got["msg"], (w, got["msg"])


def test_the_good_files_still_load_after_the_broken_ones(outcomes):
    """The control: the same loader answers on the unedited pairs (so each case's error comes from its edit)."""
    assert all(outcomes[f"good_{fam}"]["type"] is None for fam in ("llava", "qwen25vl", "qwen3vl", "ling3vl", "glm4v",
                                                                  "exaone4_5", "mimovl", "paddleocr",
                                                                  "dots_ocr", "kimivl", "phi4", "llama4",
                                                                  "minimax_m3", "nemotron_v2_vl")), outcomes


def test_the_runner_reports_a_crash_and_goes_on(tmp_path):
    """The harness itself: a child that dies mid-case is reported as a crash, and the next case still runs."""
    dying = LOADER.replace("    try:\n", "    if name == 'die':\n        import os; os.abort()\n    try:\n", 1)
    assert dying != LOADER
    got = run_cases([("die", "nope.gguf", "nope.gguf"), ("after", str(tmp_path / "x.gguf"), "y.gguf")], dying)
    assert got["die"]["type"] == "crash" and got["die"]["rc"] != 0
    assert got["after"]["type"] == "ModelLoadError" and "not found" in got["after"]["msg"]
