"""The numpy oracles of tests/reference_vit.py agree with llama.cpp's own vision encoders (mtmd, CPU).

Final LLM embeddings come from mtmd_get_output_embd; per-layer keys are captured from the graph through
mtmd_context_params.cb_eval (``Kcur-<il>`` for llava, ``Kcur-<il>`` and ``Kcur_rope-<il>`` for qwen2.5vl).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import reference_vit as ref  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")

# Tolerances, atol relative to the reference's max |value| (tiny fixtures: f32 weights, CPU).
# Keys are plain f32 arithmetic once the oracle mirrors ggml_conv_2d's f16 im2col (observed <= 1.2e-6).
KEYS_RTOL, KEYS_ATOL_REL = 1e-4, 1e-5
# Embeddings: the projector GELU reads an f16 table; an input that lands on the other side of an f16
# rounding boundary in llama.cpp's f32 vs the oracle's f64 flips one table entry (1 f16 ulp), which
# leaves a few isolated elements at up to ~1e-4 (observed max 9e-5). The bulk must be much tighter.
EMB_RTOL, EMB_ATOL_REL = 1e-3, 2e-4
EMB_BULK_ATOL_REL, EMB_BULK_FRACTION = 1e-5, 0.95  # observed >= 98.7 % of elements within 1e-5
# With flash attention on (mtmd's default AUTO resolves to ENABLED on CPU) K/V/mask are cast to f16
# (observed max 1.1e-4).
FA_RTOL, FA_ATOL_REL = 1e-2, 1e-3

IMAGE_SIZE = 224


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _random_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _structured_image() -> np.ndarray:
    s = IMAGE_SIZE
    yy, xx = np.mgrid[0:s, 0:s]
    r = xx * 255 // (s - 1)
    g = yy * 255 // (s - 1)
    b = np.where(((xx // 28) + (yy // 28)) % 2 == 0, 230, 20)
    disk = (xx - 150) ** 2 + (yy - 80) ** 2 < 40 ** 2
    img = np.stack([r, g, b], axis=-1)
    img[disk] = (255, 255, 0)
    img[150:200, 20:90] = (0, 0, 0)
    return img.astype(np.uint8)


IMAGES = {"random": _random_image(), "structured": _structured_image()}


# ---------------------------------------------------------------------------------------------
# cb_eval key capture (ctypes mirror of struct ggml_tensor, ggml/include/ggml.h)
# ---------------------------------------------------------------------------------------------
class _GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_GGML_TYPE_F32 = 0
_ggml_base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
_tensor_get = _ggml_base.ggml_backend_tensor_get
_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_tensor_get.restype = None


@dataclass
class _Capture:
    """ggml_backend_sched_eval_callback body: copies the f32 tensors whose name is in `wanted`."""

    wanted: set[str] = field(default_factory=set)
    asked: set[str] = field(default_factory=set)
    got: dict[str, np.ndarray] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __call__(self, t_ptr: int, ask: bool, _user: int) -> bool:
        try:
            t = _GgmlTensor.from_address(t_ptr)
            name = t.name.decode("utf-8", "replace")
            if ask:
                self.asked.add(name)
                return name in self.wanted
            if name in self.wanted:
                ne = [int(v) for v in t.ne]
                if t.type != _GGML_TYPE_F32 or int(t.nb[0]) != 4 or int(t.nb[1]) != 4 * ne[0]:
                    self.errors.append(f"{name}: not a contiguous f32 tensor")
                    return True
                out = np.empty(ne[::-1], dtype=np.float32)  # numpy shape = ne reversed
                _tensor_get(t_ptr, out.ctypes.data, 0, out.nbytes)
                self.got[name] = out[0] if ne[3] == 1 else out  # [n_pos, n_head, d_head]
            return True  # ask=False must return True or the graph compute is aborted
        except Exception as exc:  # never raise through the C callback
            self.errors.append(repr(exc))
            return True


# ---------------------------------------------------------------------------------------------
# mtmd encoder
# ---------------------------------------------------------------------------------------------
@dataclass
class _Encoder:
    llm: Any
    ctx: Any
    capture: _Capture
    callback: Any  # keep the ctypes callback alive
    n_embd: int

    def encode(self, img: np.ndarray, wanted: set[str]) -> np.ndarray:
        self.capture.wanted = set(wanted)
        self.capture.asked.clear()
        self.capture.got.clear()
        self.capture.errors.clear()
        h, w = img.shape[:2]
        buf = (ctypes.c_uint8 * img.nbytes).from_buffer_copy(np.ascontiguousarray(img).tobytes())
        bmp = mtmd.mtmd_bitmap_init(w, h, buf)
        assert bmp
        prompt = f"look {mtmd.mtmd_default_marker().decode()} here".encode()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = prompt, len(prompt), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            rc = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bmp), 1)
            assert rc == 0, f"mtmd_tokenize failed: {rc}"
            image_chunks = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            image_chunks = [c for c in image_chunks
                            if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            assert len(image_chunks) == 1
            chunk = image_chunks[0]
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            assert mtmd.mtmd_encode_chunk(self.ctx, chunk) == 0
            ptr = mtmd.mtmd_get_output_embd(self.ctx)
            assert ptr
            out = np.ctypeslib.as_array(ptr, shape=(n_tokens * self.n_embd,)).reshape(n_tokens, self.n_embd).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bmp)
        assert not self.capture.errors, self.capture.errors
        return out


def _make_encoder(fx: Any, flash_attn: int) -> _Encoder:
    llm = llama_cpp.Llama(model_path=str(fx.model), n_ctx=512, verbose=False)
    capture = _Capture()
    callback = llama_cpp.ggml_backend_sched_eval_callback(capture)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    params.warmup = False
    params.print_timings = False
    params.n_threads = 2
    params.flash_attn_type = flash_attn
    params.cb_eval = callback
    params.cb_eval_user_data = None
    ctx = mtmd.mtmd_init_from_file(str(fx.mmproj).encode(), llm.model, params)
    assert ctx, "mtmd_init_from_file failed"
    return _Encoder(llm, ctx, capture, callback, llama_cpp.llama_model_n_embd(llm.model))


@pytest.fixture(scope="module")
def fixtures(llava_fixture: Any, qwen_fixture: Any) -> dict[str, Any]:
    return {"llava": llava_fixture, "qwen25vl": qwen_fixture}


@pytest.fixture(scope="module")
def encoders(fixtures: dict[str, Any]) -> Iterator[dict[tuple[str, int], _Encoder]]:
    """Lazily created (family, flash_attn_type) -> encoder."""
    made: dict[tuple[str, int], _Encoder] = {}

    class _Lazy(dict):
        def __missing__(self, key: tuple[str, int]) -> _Encoder:
            enc = _make_encoder(fixtures[key[0]], key[1])
            made[key] = enc
            self[key] = enc
            return enc

    yield _Lazy()
    for enc in made.values():
        mtmd.mtmd_free(enc.ctx)
        enc.llm.close()


def _wanted(family: str, n_layer: int) -> set[str]:
    names = {f"Kcur-{il}" for il in range(n_layer)}  # llava: the last block must never show up
    if family == "qwen25vl":
        names |= {f"Kcur_rope-{il}" for il in range(n_layer)}
    return names


@pytest.fixture(scope="module")
def results(fixtures: dict[str, Any], encoders: dict) -> Callable[[str, str], tuple[dict, np.ndarray, dict, set]]:
    """(family, image) -> (oracle dict, llama.cpp embeddings, captured tensors, asked names); computed once."""
    cache: dict = {}

    def get(family: str, image: str) -> tuple[dict, np.ndarray, dict, set]:
        if (family, image) not in cache:
            fx, img = fixtures[family], IMAGES[image]
            oracle = (ref.llava_forward if family == "llava" else ref.qwen25vl_forward)(fx.mmproj, img)
            enc = encoders[(family, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)]
            emb = enc.encode(img, _wanted(family, fx.vision.n_layer))
            cache[(family, image)] = (oracle, emb, dict(enc.capture.got), set(enc.capture.asked))
        return cache[(family, image)]

    return get


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str, atol_rel: float,
                  rtol: float) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max())
    assert scale > 0
    err = float(np.abs(actual - expected).max()) / scale
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol_rel * scale,
                               err_msg=f"{what}: max |diff| / max |ref| = {err:.3g}")
    return err


FAMILIES = ("llava", "qwen25vl")


# ---------------------------------------------------------------------------------------------
# tests against llama.cpp
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image", sorted(IMAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_match_llama_cpp(results: Any, family: str, image: str) -> None:
    """The oracle's projected LLM embeddings equal mtmd's output (flash attention off)."""
    oracle, emb, _, _ = results(family, image)
    assert emb.shape == oracle["embeddings"].shape
    _assert_close(emb, oracle["embeddings"], f"{family}/{image} embeddings", EMB_ATOL_REL, EMB_RTOL)
    scale = float(np.abs(oracle["embeddings"]).max())
    within = float(np.mean(np.abs(emb - oracle["embeddings"]) <= EMB_BULK_ATOL_REL * scale))
    assert within >= EMB_BULK_FRACTION, f"only {within:.2%} of the elements within {EMB_BULK_ATOL_REL:g}"


@pytest.mark.parametrize("image", sorted(IMAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_keys_match_llama_cpp(results: Any, fixtures: dict, family: str, image: str) -> None:
    """Every block's keys (K projection + bias; qwen: also after M-RoPE) match the graph's tensors."""
    oracle, _, got, asked = results(family, image)
    n_layer = fixtures[family].vision.n_layer
    run = oracle["layers_run"]
    assert run == (n_layer - 1 if family == "llava" else n_layer)
    # the graph builds exactly `run` blocks: Kcur-<run> never exists
    assert {f"Kcur-{il}" for il in range(run)} <= asked
    assert f"Kcur-{run}" not in asked
    for il in range(run):
        _assert_close(got[f"Kcur-{il}"], oracle["keys"][il], f"{family}/{image} Kcur-{il}", KEYS_ATOL_REL, KEYS_RTOL)
        if family == "qwen25vl":
            _assert_close(got[f"Kcur_rope-{il}"], oracle["keys_rope"][il], f"{family}/{image} Kcur_rope-{il}",
                          KEYS_ATOL_REL, KEYS_RTOL)
    if family == "qwen25vl":
        # the rope is not the identity on these keys, so the check above tests the positions
        assert np.abs(oracle["keys_rope"][-1] - oracle["keys"][-1]).max() > 1e-2 * np.abs(oracle["keys"][-1]).max()


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_default_close(encoders: dict, fixtures: dict, results: Any, family: str) -> None:
    """With flash attention on (what mtmd's default AUTO picks on CPU) K/V go through f16: looser match."""
    oracle, emb_off, _, _ = results(family, "structured")
    enc = encoders[(family, llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)]
    emb_on = enc.encode(IMAGES["structured"], set())
    _assert_close(emb_on, oracle["embeddings"], f"{family} flash-attn embeddings", FA_ATOL_REL, FA_RTOL)


def test_llava_class_token_quirk(results: Any, fixtures: dict) -> None:
    """llama.cpp's llava graph puts the class token LAST and feeds rows 1..n_patches to the projector:
    patch 0 is dropped and the last LLM token is the class token. The HF layout does not match."""
    oracle, emb, _, _ = results("llava", "random")
    assert list(oracle["rows"]) == list(range(1, oracle["n_patches"] + 1))
    assert oracle["n_pos"] - 1 == oracle["rows"][-1]  # the class row (last) is fed to the projector
    hf = ref.llava_forward(fixtures["llava"].mmproj, IMAGES["random"], hf_layout=True)["embeddings"]
    scale = float(np.abs(emb).max())
    assert float(np.abs(emb - hf).max()) > 100 * EMB_ATOL_REL * scale


# ---------------------------------------------------------------------------------------------
# oracle-only checks (no llama.cpp)
# ---------------------------------------------------------------------------------------------
def test_qwen_window_index_is_a_permutation() -> None:
    idx, inv, mask = ref.qwen25vl_window_index(16, 16, 14)
    assert sorted(idx) == list(range(64)) and np.array_equal(idx[inv], np.arange(64))
    assert list(inv[:4]) == [0, 1, 2, 3] and list(inv[4:8]) == [8, 9, 10, 11]  # 4x4 merged tokens per window
    assert mask.sum() == 4 * 64 * 64  # 4 windows of 64 ViT rows, block diagonal
    pos = ref.qwen25vl_positions(16, 16, idx)
    assert pos.shape == (4, 256) and np.array_equal(pos[0], pos[2]) and np.array_equal(pos[1], pos[3])
    assert list(pos[0, :4]) == [0, 0, 1, 1] and list(pos[1, :4]) == [0, 1, 0, 1]


def test_ggml_gelu_table_is_close_to_formula() -> None:
    x = np.linspace(-12, 12, 4001)
    for fn in (ref.gelu, ref.gelu_quick):
        a, b = fn(x), fn(x, act="exact")
        assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
