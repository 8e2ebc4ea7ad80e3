"""Stock mtmd (llama-cpp-python) loads and runs the random-weight mmproj files of convert/mmproj.py."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from convert.mmproj import VisionDims, expected_image_grid, expected_image_tokens, write_mmproj  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")

logger = logging.getLogger(__name__)

TEXT_N_EMBD = 64
SEED = 1234

LLAVA_DIMS = VisionDims(
    family="llava", n_embd=64, n_layer=3, n_head=4, n_ff=256, patch_size=16, image_size=224,
    proj_dim=TEXT_N_EMBD, eps=1e-5,
)
QWEN_DIMS = VisionDims(
    family="qwen25vl", n_embd=64, n_layer=4, n_head=4, n_ff=128, patch_size=14, image_size=224,
    proj_dim=TEXT_N_EMBD, n_wa_pattern=2, window_size=112, spatial_merge=2,
    image_min_pixels=8 * 784, image_max_pixels=4096 * 784,
)


# the production mirror of struct ggml_tensor (ggml/include/ggml.h); these tests also check its layout
from avis_llamacpp.capture import GGML_TYPE_F32  # noqa: E402
from avis_llamacpp.capture import GGMLTensor as GgmlTensor  # noqa: E402


@dataclass
class EvalRecorder:
    """Collects (name, ne, type) of the graph nodes the scheduler reports via cb_eval."""

    asked: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    observed: dict[str, np.ndarray] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.asked.clear()
        self.observed.clear()
        self.errors.clear()

    @staticmethod
    def wants(name: str) -> bool:
        """Whether the data of this node should be observed after it is computed."""
        return name.startswith(("Kcur", "Qcur", "Vcur")) or name == "pre_ln"

    def __call__(self, t_ptr: int, ask: bool, user_data: int) -> bool:
        """ggml_backend_sched_eval_callback body."""
        try:
            t = GgmlTensor.from_address(t_ptr)
            name = t.name.decode("utf-8", "replace")
            if ask:
                self.asked[name] = (tuple(int(x) for x in t.ne), int(t.type))
                return self.wants(name)
            # ask=False: the tensor has been computed; CPU backend -> host memory
            if t.type == GGML_TYPE_F32 and t.data:
                ne = tuple(int(x) for x in t.ne)
                nb = tuple(int(x) for x in t.nb)
                arr = np.lib.stride_tricks.as_strided(
                    np.ctypeslib.as_array((ctypes.c_float * 1).from_address(t.data)),
                    shape=ne[::-1], strides=nb[::-1],
                )
                self.observed[name] = np.array(arr, copy=True)
            return True  # must return True when ask=False, otherwise the compute is aborted
        except Exception as exc:  # never let an exception cross the C boundary
            self.errors.append(repr(exc))
            return True


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------
def _write_text_model(path: Path, arch: str) -> None:
    """Write the matching tiny text model with convert/text_model.py."""
    from convert.text_model import CHATML_CHAT_TEMPLATE, LLAVA_CHAT_TEMPLATE, TextModelDims, write_text_model

    if arch == "qwen2vl":
        dims = TextModelDims(arch="qwen2vl", n_embd=TEXT_N_EMBD, n_layer=2, n_head=4, n_head_kv=2,
                             n_ff=160, rope_sections=(2, 3, 3, 0))
        template = CHATML_CHAT_TEMPLATE
    else:
        dims = TextModelDims(arch="llama", n_embd=TEXT_N_EMBD, n_layer=2, n_head=4, n_head_kv=2, n_ff=160)
        template = LLAVA_CHAT_TEMPLATE
    write_text_model(path, dims, seed=7, chat_template=template, name=f"tiny-{arch}")


@dataclass
class Pair:
    """A loaded text model + mtmd context for one family."""

    dims: VisionDims
    mmproj: Path
    model: Any
    ctx: Any
    recorder: EvalRecorder
    callback: Any  # keeps the ctypes callback alive


@pytest.fixture(scope="module")
def backend() -> Iterator[None]:
    """Initialise the llama backend once."""
    llama_cpp.llama_backend_init()
    yield


def _make_pair(tmp: Path, dims: VisionDims, arch: str) -> Pair:
    """Write the files and initialise mtmd with an eval callback."""
    text_path = tmp / f"text-{arch}.gguf"
    _write_text_model(text_path, arch)
    mm_path = tmp / f"mmproj-{dims.family}.gguf"
    info = write_mmproj(mm_path, dims, seed=SEED, name=f"tiny-{dims.family}")
    logger.info("mmproj info: %s", info)

    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), mparams)
    assert model, "text model failed to load"

    recorder = EvalRecorder()
    callback = llama_cpp.ggml_backend_sched_eval_callback(recorder)
    cparams = mtmd.mtmd_context_params_default()
    cparams.use_gpu = False
    cparams.n_threads = 1
    cparams.print_timings = False
    cparams.warmup = False
    cparams.flash_attn_type = 0  # disabled: keep the explicit KQ/softmax graph
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    ctx = mtmd.mtmd_init_from_file(str(mm_path).encode(), model, cparams)
    assert ctx, "mtmd_init_from_file failed"
    return Pair(dims=dims, mmproj=mm_path, model=model, ctx=ctx, recorder=recorder, callback=callback)


@pytest.fixture(scope="module", params=["llava", "qwen25vl"])
def pair(request: pytest.FixtureRequest, backend: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Loaded (text model, mtmd context) for each family."""
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    if family == "llava":
        p = _make_pair(tmp, LLAVA_DIMS, "llama")
    else:
        p = _make_pair(tmp, QWEN_DIMS, "qwen2vl")
    yield p
    mtmd.mtmd_free(p.ctx)
    llama_cpp.llama_model_free(p.model)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _image(width: int, height: int, seed: int) -> Any:
    """Deterministic RGB PIL image with some structure."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                     ((xx + yy) * 7) % 256], axis=-1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    arr = ((base + noise) % 256).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _bitmap(img: Any) -> Any:
    """mtmd_bitmap from a PIL image's RGB bytes."""
    rgb = img.convert("RGB")
    raw = rgb.tobytes()
    buf = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
    bmp = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, buf)
    assert bmp
    return bmp


def _tokenize_one_image(ctx: Any, img: Any) -> tuple[Any, Any, list[int]]:
    """Tokenize 'describe <marker> please' with one image; return (chunks, image chunk, chunk types)."""
    marker = mtmd.mtmd_default_marker().decode()
    prompt = f"describe {marker} please".encode()
    text = mtmd.mtmd_input_text()
    text.text = prompt
    text.text_len = len(prompt)
    text.add_special = True
    text.parse_special = True
    bmp = _bitmap(img)
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bmp)
    chunks = mtmd.mtmd_input_chunks_init()
    rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
    mtmd.mtmd_bitmap_free(bmp)
    assert rc == 0, f"mtmd_tokenize failed: {rc}"
    types = []
    image_chunk = None
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        ch = mtmd.mtmd_input_chunks_get(chunks, i)
        types.append(mtmd.mtmd_input_chunk_get_type(ch))
        if types[-1] == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            image_chunk = ch
    assert image_chunk is not None
    return chunks, image_chunk, types


def _encode(p: Pair, img: Any) -> np.ndarray:
    """Encode one image and return its (n_tokens, n_embd) embeddings."""
    chunks, chunk, _ = _tokenize_one_image(p.ctx, img)
    try:
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        p.recorder.clear()
        assert mtmd.mtmd_encode_chunk(p.ctx, chunk) == 0
        ptr = mtmd.mtmd_get_output_embd(p.ctx)
        assert ptr
        out = np.ctypeslib.as_array(ptr, shape=(n_tokens * TEXT_N_EMBD,)).copy()
        return out.reshape(n_tokens, TEXT_N_EMBD)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


# ---------------------------------------------------------------------------
# pure-python tests
# ---------------------------------------------------------------------------
def test_expected_tokens_pure_python() -> None:
    """Token counts follow mtmd's preprocessing rules."""
    assert expected_image_tokens(LLAVA_DIMS, 224, 224) == 196
    assert expected_image_tokens(LLAVA_DIMS, 640, 100) == 196  # resized + padded to a square
    assert expected_image_tokens(QWEN_DIMS, 224, 224) == 64
    assert expected_image_grid(QWEN_DIMS, 320, 160) == (11, 6)  # 308x168 after smart resize
    assert expected_image_tokens(QWEN_DIMS, 320, 160) == 66
    assert expected_image_tokens(QWEN_DIMS, 28, 28) == 9  # min_pixels = 8 tokens -> upscaled to 84x84
    assert expected_image_tokens(QWEN_DIMS, 4000, 3000) <= 4096
    assert expected_image_tokens(QWEN_DIMS, 224, 224, image_max_tokens=16) == 16


@pytest.mark.parametrize("dims", [LLAVA_DIMS, QWEN_DIMS], ids=["llava", "qwen25vl"])
@pytest.mark.parametrize("ftype", ["f32", "f16"])
def test_deterministic_bytes(tmp_path: Path, dims: VisionDims, ftype: str) -> None:
    """Same seed -> identical bytes; other seed -> different bytes; small and fast."""
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    info = write_mmproj(a, dims, seed=5, name="x", ftype=ftype)
    write_mmproj(b, dims, seed=5, name="x", ftype=ftype)
    write_mmproj(c, dims, seed=6, name="x", ftype=ftype)
    ha, hb, hc = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c))
    assert ha == hb
    assert ha != hc
    assert info["file_size"] == a.stat().st_size < 10 * 1024 * 1024
    assert info["n_image_tokens"] == (196 if dims.family == "llava" else 64)
    assert info["n_params"] > 0


def test_gguf_contents() -> None:
    """The files carry the keys/tensors clip.cpp requires."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory() as d:
        for dims, ptype in ((LLAVA_DIMS, "mlp"), (QWEN_DIMS, "qwen2.5vl_merger")):
            path = Path(d) / f"{dims.family}.gguf"
            write_mmproj(path, dims, seed=0, name="x")
            r = gguf.GGUFReader(path)
            f = r.fields
            assert bytes(f["clip.projector_type"].parts[-1]).decode() == ptype
            assert bool(f["clip.has_vision_encoder"].parts[-1][0])
            names = {t.name for t in r.tensors}
            assert {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.patch_embd.weight"} <= names
            if dims.family == "llava":
                assert {"v.class_embd", "v.position_embd.weight", "v.pre_ln.weight"} <= names
                assert "clip.vision.feature_layer" not in f  # -> clip.cpp runs n_layer - 1 blocks
            else:
                assert {"v.patch_embd.weight.1", "v.post_ln.weight", "v.blk.0.ffn_gate.weight"} <= names
                assert int(f["clip.vision.n_wa_pattern"].parts[-1][0]) == 2


# ---------------------------------------------------------------------------
# mtmd tests
# ---------------------------------------------------------------------------
def test_init_and_caps(pair: Pair) -> None:
    """mtmd loads the projector, supports vision, and uses M-RoPE only for the qwen pair."""
    assert mtmd.mtmd_support_vision(pair.ctx)
    assert bool(mtmd.mtmd_decode_use_mrope(pair.ctx)) == (pair.dims.family == "qwen25vl")


@pytest.mark.parametrize("size", [(224, 224), (320, 160), (160, 300)])
def test_image_token_count(pair: Pair, size: tuple[int, int]) -> None:
    """The image chunk has exactly expected_image_tokens tokens."""
    w, h = size
    chunks, chunk, types = _tokenize_one_image(pair.ctx, _image(w, h, seed=1))
    try:
        assert types.count(mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE) == 1
        assert mtmd.mtmd_input_chunk_get_n_tokens(chunk) == expected_image_tokens(pair.dims, w, h)
        img_tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
        nx, ny = expected_image_grid(pair.dims, w, h)
        assert mtmd.mtmd_image_tokens_get_nx(img_tokens) * mtmd.mtmd_image_tokens_get_ny(img_tokens) == nx * ny
        if pair.dims.family == "qwen25vl":
            assert (mtmd.mtmd_image_tokens_get_nx(img_tokens), mtmd.mtmd_image_tokens_get_ny(img_tokens)) == (nx, ny)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def test_encode_embeddings(pair: Pair) -> None:
    """Embeddings are finite, deterministic and image dependent."""
    img_a = _image(224, 224, seed=1)
    img_b = _image(224, 224, seed=2)
    e1 = _encode(pair, img_a)
    e2 = _encode(pair, img_a)
    e3 = _encode(pair, img_b)
    n = expected_image_tokens(pair.dims, 224, 224)
    assert e1.shape == (n, TEXT_N_EMBD)
    assert np.isfinite(e1).all() and np.isfinite(e3).all()
    assert float(np.abs(e1).max()) > 0
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(e1, e3)
    # tokens differ from each other (no collapse)
    assert float(e1.std(axis=0).mean()) > 0


def test_encode_non_square(pair: Pair) -> None:
    """A non-square image encodes to expected_image_tokens finite rows."""
    e = _encode(pair, _image(320, 160, seed=3))
    assert e.shape == (expected_image_tokens(pair.dims, 320, 160), TEXT_N_EMBD)
    assert np.isfinite(e).all()


def test_eval_callback_names(pair: Pair) -> None:
    """cb_eval sees the per-block attention inputs; llava runs n_layer - 1 blocks."""
    _encode(pair, _image(224, 224, seed=4))
    rec = pair.recorder
    assert not rec.errors, rec.errors
    names = set(rec.asked)
    d = pair.dims
    d_head = d.n_embd // d.n_head
    if d.family == "qwen25vl":
        n_patches = (d.image_size // d.patch_size) ** 2
        for il in range(d.n_layer):
            assert f"Kcur_rope-{il}" in names
            assert f"Kcur-{il}" in names
        last = f"Kcur_rope-{d.n_layer - 1}"
        assert rec.asked[last][0] == (d_head, d.n_head, n_patches, 1)
    else:
        n_pos = (d.image_size // d.patch_size) ** 2 + 1  # + class token (appended last)
        for il in range(d.n_layer - 1):
            assert f"Kcur-{il}" in names
        assert f"Kcur-{d.n_layer - 1}" not in names  # second-to-last layer feeds the projector
        last = f"Kcur-{d.n_layer - 2}"
        assert rec.asked[last][0] == (d_head, d.n_head, n_pos, 1)
    assert rec.asked[last][1] == GGML_TYPE_F32
    obs = rec.observed[last]
    assert obs.shape == tuple(reversed(rec.asked[last][0]))
    assert np.isfinite(obs).all()
    logger.info("%s cb_eval last block: %s ne=%s", d.family, last, rec.asked[last][0])


@pytest.mark.parametrize("pair", ["llava"], indirect=True)
def test_llava_class_token_is_last(pair: Pair) -> None:
    """clip.cpp appends the class token after the patches (row n_patches), not at row 0."""
    outs = []
    for seed in (5, 6):
        _encode(pair, _image(224, 224, seed=seed))
        outs.append(pair.recorder.observed["pre_ln"].reshape(-1, pair.dims.n_embd))
    n_patches = (pair.dims.image_size // pair.dims.patch_size) ** 2
    assert outs[0].shape == (n_patches + 1, pair.dims.n_embd)
    same_rows = np.where(np.abs(outs[0] - outs[1]).max(axis=1) == 0)[0].tolist()
    # only the class token is image independent; the projector then takes rows 1..n_patches,
    # i.e. it drops patch 0 and its last output token is the class token
    assert same_rows == [n_patches]


def test_default_context_params(backend: None, tmp_path: Path) -> None:
    """With mtmd defaults (warmup on, flash attention auto) both families load and encode f16 files."""
    for dims, arch in ((LLAVA_DIMS, "llama"), (QWEN_DIMS, "qwen2vl")):
        text_path, mm_path = tmp_path / f"{arch}.gguf", tmp_path / f"{dims.family}-mm.gguf"
        _write_text_model(text_path, arch)
        write_mmproj(mm_path, dims, seed=SEED, name="x", ftype="f16")
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), mparams)
        assert model
        cparams = mtmd.mtmd_context_params_default()
        cparams.use_gpu = False
        cparams.n_threads = 1
        ctx = mtmd.mtmd_init_from_file(str(mm_path).encode(), model, cparams)
        assert ctx
        try:
            p = Pair(dims=dims, mmproj=mm_path, model=model, ctx=ctx, recorder=EvalRecorder(), callback=None)
            e = _encode(p, _image(320, 160, seed=1))
            assert e.shape == (expected_image_tokens(dims, 320, 160), TEXT_N_EMBD)
            assert np.isfinite(e).all()
        finally:
            mtmd.mtmd_free(ctx)
            llama_cpp.llama_model_free(model)
