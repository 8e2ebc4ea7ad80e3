"""Every seeded random-weight VLM pair (text GGUF + mmproj GGUF) for tests and benchmarks, through one call:
``make_fixture(family, size)``. The registry below (REGISTRY) lists every family and its sizes; the per-family
writers sit behind it (the dims of llava, qwen25vl and the families whose towers mmproj.py writes in _SPECS here,
written by text_model.py and mmproj.py; the others in convert/fixture_<family>.py). Files are cached under a key
that includes the generators' source, so an edited generator never serves a stale file.

    python -m convert.fixtures --list                              # every family and its sizes
    python -m convert.fixtures --family gemma3 --out DIR           # one family (tiny), paths printed as JSON
    python -m convert.fixtures --all                               # every family at --size (default tiny)
    python -m convert.fixtures --family qwen25vl --size real --quant-threads 1   # ~40 min once; 3.2 GB kept (Q4_K_M)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import Callable, Union

from .fixture_common import DimsFixture, PairFixture, cached_pair, default_cache_dir, fixture_key, scalars  # noqa: F401
from .fixture_gemma3 import make_gemma3_fixture
from .fixture_gemma4v import make_gemma4v_fixture
from .fixture_idefics3 import make_idefics3_fixture
from .fixture_internvl import make_internvl_fixture
from .fixture_pixtral import PixtralFixture, make_pixtral_fixture
from .mmproj import VisionDims, expected_image_tokens, write_mmproj
from .text_model import CHATML_CHAT_TEMPLATE, LLAVA_CHAT_TEMPLATE, TextModelDims, write_text_model

logger = logging.getLogger(__name__)

FAMILIES = ("llava", "qwen25vl")  # the core pair every generic test runs on
# further families written from dims in _SPECS, with their own test files (tests/test_families_*.py)
EXTRA_FAMILIES = ("exaone4_5", "mimovl", "paddleocr", "dots_ocr", "kimivl", "kimik25", "janus_pro", "phi4", "llama4",
                  "minimax_m3", "nemotron_v2_vl", "qwen3vl", "ling3vl", "glm4v", "glm5v", "ldpv2")
SPEC_FAMILIES = FAMILIES + EXTRA_FAMILIES
SIZES = ("tiny", "bench", "real")

# (text dims, vision dims, chat template, file type) for each family and size.
_SPECS: dict[tuple[str, str], tuple[TextModelDims, VisionDims, str, str]] = {
    ("llava", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("llava", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=16, image_size=224, proj_dim=64),
        LLAVA_CHAT_TEMPLATE, "f32"),
    ("qwen25vl", "tiny"): (
        TextModelDims("qwen2vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0)),
        VisionDims("qwen25vl", n_embd=64, n_layer=4, n_head=4, n_ff=128, patch_size=14, image_size=224,
                   proj_dim=64, n_wa_pattern=2),
        CHATML_CHAT_TEMPLATE, "f32"),
    # Qwen3-VL / Qwen3.5-style: fused-QKV ViT (strided Kcur views), one deepstack merger (text n_embd_inp
    # = 2 x n_embd), qwen3vl text blocks with q/k norms and interleaved M-RoPE
    ("qwen3vl", "tiny"): (
        TextModelDims("qwen3vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0),
                      n_deepstack=1),
        VisionDims("qwen3vl", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224,
                   proj_dim=64, deepstack_layers=(1,)),
        CHATML_CHAT_TEMPLATE, "f32"),
    # EXAONE 4.5: Qwen2.5-VL's windowed tower with a fused grouped-query QKV (4 query heads, 2 key heads), before
    # a Qwen2-VL text model (M-RoPE: mtmd positions the image as for Qwen2.5-VL)
    ("exaone4_5", "tiny"): (
        TextModelDims("qwen2vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0)),
        VisionDims("exaone4_5", n_embd=64, n_layer=4, n_head=4, n_ff=128, patch_size=14, image_size=224,
                   proj_dim=64, n_wa_pattern=2, n_head_kv=2),
        CHATML_CHAT_TEMPLATE, "f32"),
    # MiMo-VL: a fused biased grouped-query QKV, row / column banded windows with attention sinks; the last block
    # windows in column order, so its keys come in column order of the 2x2 units (before a Qwen2-VL text model)
    ("mimovl", "tiny"): (
        TextModelDims("qwen2vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0)),
        VisionDims("mimovl", n_embd=64, n_layer=4, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64,
                   n_head_kv=2, window_rows=24, window_modes=(0, -1, 0, 1)),
        CHATML_CHAT_TEMPLATE, "f32"),
    # PaddleOCR-VL: a SigLIP-style ViT with 2-D M-RoPE on raster-ordered patches, then the 2x2 pixel-unshuffle
    # merge (before a Qwen2-VL text model: PaddleOCR-VL's ERNIE text model is M-RoPE too)
    ("paddleocr", "tiny"): (
        TextModelDims("qwen2vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0)),
        VisionDims("paddleocr", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # dots.ocr: the raster-order M-RoPE ViT with RMSNorm / SwiGLU blocks and an s x s pixel-unshuffle merge (s = 3
    # here, read from the file: real dots.ocr uses 2), before a 1-D RoPE text model as dots.ocr's own (Qwen2.5);
    # mtmd reports its image as a 1 x N grid
    ("dots_ocr", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("dots_ocr", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=252, proj_dim=64,
                   spatial_merge=3),
        CHATML_CHAT_TEMPLATE, "f32"),
    # Kimi-VL: raster patches with 2-D RoPE keys (build_rope_2d) and a 2x2 pixel-unshuffle merge, before a 1-D RoPE
    # text model as Kimi-VL's own (DeepSeek-V3 style); mtmd reports its image as a 1 x N grid
    ("kimivl", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("kimivl", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # Janus-Pro and Phi-4 vision: a SigLIP ViT, one token per patch (Janus-Pro at a fixed size, Phi-4 at each image's
    # own grid), before 1-D RoPE text models as theirs
    ("janus_pro", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("janus_pro", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    ("phi4", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("phi4", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64,
                   spatial_merge=1),
        CHATML_CHAT_TEMPLATE, "f32"),
    # Llama 4 vision: 224 px tiles (llava-uhd slicing) of 16 x 16 patches, a 2x2 pixel shuffle whose tokens run
    # column by column, before a 1-D RoPE text model
    ("llama4", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("llama4", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # MiniMax-M3 vision: 2x2 merge-ordered rows under a 3-axis NEOX RoPE (head dim 16: 4 channels per axis), before
    # a 1-D RoPE text model; mtmd reports its image as a 1 x N grid
    ("minimax_m3", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("minimax_m3", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224,
                   proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # Kimi-K2.5 vision: kimivl's with a 3-D position table added before the blocks (before a 1-D RoPE text model)
    ("kimik25", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("kimik25", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # Nemotron Nano VL: 4 register tokens before the patches, a 2x2 pixel unshuffle (before a 1-D RoPE text model)
    ("nemotron_v2_vl", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("nemotron_v2_vl", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224,
                   proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # Ling-3-VL: the Qwen3-VL tower with its own merger (norm + MLP), no deepstack, before a Qwen3-VL text model
    ("ling3vl", "tiny"): (
        TextModelDims("qwen3vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0)),
        VisionDims("ling3vl", n_embd=64, n_layer=3, n_head=4, n_ff=128, patch_size=14, image_size=224, proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # GLM-4.1V-4.6V / GLM-OCR: the glm4v vision tower (fused QKV, RMSNorm, SwiGLU, 2x2 conv merger) before a
    # Qwen2-VL text model: GLM-4.1V's own text model (llama.cpp arch glm4 with rope sections) is M-RoPE too, so mtmd
    # gives the image the same positions
    ("glm4v", "tiny"): (
        TextModelDims("qwen2vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0)),
        VisionDims("glm4v", n_embd=64, n_layer=3, n_head=4, n_ff=96, patch_size=14, image_size=224, proj_dim=64),
        CHATML_CHAT_TEMPLATE, "f32"),
    # GLM-5V: the glm4v graph with a SwiGLU clamp small enough to bite on these weights, and glm5v's padded canvas
    ("glm5v", "tiny"): (
        TextModelDims("qwen2vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, rope_sections=(2, 3, 3, 0)),
        VisionDims("glm5v", n_embd=64, n_layer=3, n_head=4, n_ff=96, patch_size=14, image_size=224, proj_dim=64,
                   swiglu_clamp=0.02),
        CHATML_CHAT_TEMPLATE, "f32"),
    # MobileVLM-V2: the llava ViT on a 24 x 24 patch grid (clip.cpp hard-codes it), 2x2 average pool -> 144
    ("ldpv2", "tiny"): (
        TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160),
        VisionDims("ldpv2", n_embd=32, n_layer=3, n_head=4, n_ff=96, patch_size=4, image_size=96, proj_dim=64),
        LLAVA_CHAT_TEMPLATE, "f32"),
    # bench: ~0.3B text model, ViT giving ~500-1000 image tokens (576 for llava at 336 / patch 14;
    # a 644x644 image gives 23x23 = 529 tokens on the qwen25vl tower)
    ("llava", "bench"): (
        TextModelDims("llama", n_embd=1024, n_layer=20, n_head=16, n_head_kv=8, n_ff=2816),
        VisionDims("llava", n_embd=512, n_layer=12, n_head=8, n_ff=2048, patch_size=14, image_size=336,
                   proj_dim=1024),
        LLAVA_CHAT_TEMPLATE, "f16"),
    ("qwen25vl", "bench"): (
        TextModelDims("qwen2vl", n_embd=1024, n_layer=20, n_head=16, n_head_kv=8, n_ff=2816),
        VisionDims("qwen25vl", n_embd=512, n_layer=12, n_head=8, n_ff=1408, patch_size=14, image_size=644,
                   proj_dim=1024, n_wa_pattern=4),
        CHATML_CHAT_TEMPLATE, "f16"),
    # real: Qwen2.5-VL-3B's dimensions (config.json): text hidden 2048, 36 layers, 16 / 2 heads, ffn 11008,
    # vocab 151,936 (the small BPE vocab padded, convert/tokenizer.pad_vocab), tied output embeddings,
    # rope theta 1e6; vision 32 blocks, hidden 1280, 16 heads, ffn 3420, full attention in blocks 7/15/23/31
    # (n_wa_pattern 8), merger to 2048. Written streaming (convert/fixture_real.py), quantized to Q4_K_M by
    # default; on demand only (benchmarks), never in tests.
    ("qwen25vl", "real"): (
        TextModelDims("qwen2vl", n_embd=2048, n_layer=36, n_head=16, n_head_kv=2, n_ff=11008, n_ctx_train=128000,
                      rope_theta=1000000.0),
        VisionDims("qwen25vl", n_embd=1280, n_layer=32, n_head=16, n_ff=3420, patch_size=14, image_size=644,
                   proj_dim=2048, n_wa_pattern=8),
        CHATML_CHAT_TEMPLATE, "f16"),
}


class Fixture(PairFixture):
    """Paths and facts of one generated VLM pair (.vision a VisionDims)."""

    def image_tokens(self, width: int, height: int) -> int:
        """LLM image tokens mtmd will produce for a width x height image."""
        return expected_image_tokens(self.vision, width, height)


def spec(family: str, size: str = "tiny") -> tuple[TextModelDims, VisionDims, str, str]:
    """The dims, template and file type of a family at a size."""
    if (family, size) not in _SPECS:
        raise ValueError(f"unknown fixture {family!r}/{size!r}; families {SPEC_FAMILIES}, sizes {SIZES}")
    return _SPECS[(family, size)]


def _key(family: str, size: str, seed: int) -> str:
    prefix = f"{family}-{size}-s{seed}"
    if size == "real":  # multi-GB: keyed on the code that writes it, not on whole shared files
        from .fixture_real import source_digest
        return fixture_key(prefix, (), source_digest(), *spec(family, size), seed)
    return fixture_key(prefix, ("fixtures.py", "text_model.py", "mmproj.py", "tokenizer.py"), *spec(family, size),
                       seed)


QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "f16": None}
# quantization when make_fixture's quantize is "default": Q8_0 for bench, Q4_K_M (what people run) for real
DEFAULT_QUANT = {"bench": "q8_0", "real": "q4_k_m"}


def quantize_model(src: Path, dst: Path, qtype: str, nthread: int | None = None, verbose: bool = False) -> None:
    """Quantize a text-model GGUF with llama.cpp's own quantizer (llama_model_quantize); nthread None: all CPUs.
    Its per-tensor log lines go to stderr only when verbose (errors always)."""
    import llama_cpp

    from avis_llamacpp.native import set_native_verbosity

    const = QUANT_TYPES.get(qtype)
    if const is None:
        os.replace(src, dst)
        return
    set_native_verbosity(verbose)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, const)
    params.nthread = nthread or os.cpu_count() or 1
    ret = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if ret != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) failed with {ret}")


def _write_spec_fixture(family: str, size: str, *, seed: int, out_dir: str | os.PathLike | None, force: bool,
                        quantize: str | None, quant_threads: int | None, verbose: bool = False) -> Fixture:
    """The writer of the _SPECS families: text_model.py + mmproj.py from the family's dims at a size."""
    if quantize == "default":
        quantize = DEFAULT_QUANT.get(size, "q8_0")
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {sorted(QUANT_TYPES)} or None")
    text, vision, template, ftype = spec(family, size)
    key = _key(family, size, seed) + (f"-{quantize}" if ftype == "f16" and quantize else "")

    def write(tmp_model: Path, tmp_mmproj: Path) -> dict:
        t0 = time.perf_counter()
        if size == "real":
            from .fixture_real import REAL_N_VOCAB, write_mmproj_streaming, write_text_model_streaming
            text_info = write_text_model_streaming(tmp_model, text, seed=seed, chat_template=template,
                                                   name=f"avis-{family}-{size}", n_vocab=REAL_N_VOCAB,
                                                   tie_output=True, ftype=ftype)
            vision_info = write_mmproj_streaming(tmp_mmproj, vision, seed=seed + 1,
                                                 name=f"avis-{family}-{size}-mmproj", ftype=ftype)
        else:
            text_info = write_text_model(tmp_model, text, seed=seed, chat_template=template,
                                         name=f"avis-{family}-{size}", ftype=ftype)
            vision_info = write_mmproj(tmp_mmproj, vision, seed=seed + 1, name=f"avis-{family}-{size}-mmproj",
                                       ftype=ftype)
        return {"family": family, "size": size, "seed": seed, "write_seconds": round(time.perf_counter() - t0, 3),
                "quantize": quantize, "text": scalars(text_info), "vision": scalars(vision_info),
                "text_dims": asdict(text), "vision_dims": asdict(vision)}

    def finish_model(tmp_model: Path, model: Path) -> None:
        if ftype == "f16" and quantize:
            quantize_model(tmp_model, model, quantize, quant_threads, verbose=verbose)
            tmp_model.unlink()
        else:
            os.replace(tmp_model, model)

    model, mmproj = cached_pair(out_dir, key, write, force=force, finish_model=finish_model, sizes=True)
    return Fixture(family, size, seed, model, mmproj, text, vision)


AnyFixture = Union[Fixture, PairFixture, DimsFixture, PixtralFixture]
# a writer: (family, size, seed=, out_dir=, force=, quantize=, quant_threads=, verbose=) -> the family's fixture
Writer = Callable[..., AnyFixture]


@dataclass(frozen=True)
class FixtureFamily:
    """One family of test models: the sizes it comes in, the module that writes it and that writer."""

    name: str
    sizes: tuple[str, ...]
    module: str
    write: Writer


def _tiny(make: Callable[..., AnyFixture], **family_kw: object) -> Writer:
    """A writer for a convert/fixture_<family>.py generator (tiny only, f32: quantize does not apply)."""
    def write(family: str, size: str, *, seed: int, out_dir: str | os.PathLike | None, force: bool,
              **_: object) -> AnyFixture:
        return make(out_dir, seed=seed, force=force, **family_kw)
    return write


# every family and size a test or benchmark can ask for; make_fixture is the one way in
REGISTRY: dict[str, FixtureFamily] = {
    **{f: FixtureFamily(f, tuple(s for s in SIZES if (f, s) in _SPECS), "convert/fixtures.py", _write_spec_fixture)
       for f in SPEC_FAMILIES},
    "gemma3": FixtureFamily("gemma3", ("tiny",), "convert/fixture_gemma3.py", _tiny(make_gemma3_fixture)),
    "gemma4v": FixtureFamily("gemma4v", ("tiny",), "convert/fixture_gemma4v.py", _tiny(make_gemma4v_fixture)),
    "pixtral": FixtureFamily("pixtral", ("tiny",), "convert/fixture_pixtral.py",
                             _tiny(make_pixtral_fixture, projector="pixtral")),
    "lightonocr": FixtureFamily("lightonocr", ("tiny",), "convert/fixture_pixtral.py",
                                _tiny(make_pixtral_fixture, projector="lightonocr")),
    "internvl": FixtureFamily("internvl", ("tiny",), "convert/fixture_internvl.py", _tiny(make_internvl_fixture)),
    "idefics3": FixtureFamily("idefics3", ("tiny",), "convert/fixture_idefics3.py",
                              _tiny(make_idefics3_fixture, variant="idefics3")),
    "lfm2": FixtureFamily("lfm2", ("tiny",), "convert/fixture_idefics3.py",
                          _tiny(make_idefics3_fixture, variant="lfm2")),
}
ALL_FAMILIES = tuple(REGISTRY)


def make_fixture(family: str, size: str = "tiny", *, seed: int = 0, out_dir: str | os.PathLike | None = None,
                 force: bool = False, quantize: str | None = "default", quant_threads: int | None = None,
                 verbose: bool = False) -> AnyFixture:
    """Write (or reuse from the cache) the text model + mmproj of any registered family at a size; returns an
    object with .family, .seed, .model and .mmproj (and the family's dims). f16 (bench, real) text models are
    then quantized with llama.cpp's quantizer (`quantize`; "default": Q8_0 for bench, Q4_K_M for real) on
    `quant_threads` threads (None: all CPUs), showing llama.cpp's quantizer log only when `verbose`."""
    if family not in REGISTRY:
        raise ValueError(f"unknown fixture family {family!r}; families: {', '.join(ALL_FAMILIES)}")
    entry = REGISTRY[family]
    if size not in entry.sizes:
        raise ValueError(f"fixture family {family!r} has no size {size!r}; its sizes: {', '.join(entry.sizes)}")
    return entry.write(family, size, seed=seed, out_dir=out_dir, force=force, quantize=quantize,
                       quant_threads=quant_threads, verbose=verbose)


def list_fixtures() -> list[str]:
    """One line per registered family: its name, sizes and writer module (what --list prints)."""
    return [f"{e.name:<11s} {' '.join(e.sizes):<16s} {e.module}" for e in REGISTRY.values()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.fixtures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print every family and its sizes, write nothing")
    p.add_argument("--family", choices=ALL_FAMILIES, action="append", help="family to write (repeatable)")
    p.add_argument("--size", choices=SIZES, default="tiny",
                   help="tiny (tests), bench (benchmarks; llava, qwen25vl) or real (Qwen2.5-VL-3B dimensions, "
                        "qwen25vl only; GBs)")
    p.add_argument("--all", action="store_true", help="every family that comes in --size")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--out", default=None, help="output root (default: the cache dir)")
    p.add_argument("--force", action="store_true", help="rewrite even if cached")
    p.add_argument("--quantize", default="default", choices=["default", *sorted(QUANT_TYPES)],
                   help="bench/real text models: llama.cpp quantization type (default: q8_0 for bench, q4_k_m for "
                        "real; f16 keeps them unquantized)")
    p.add_argument("--quant-threads", type=int, default=None, help="quantizer threads (default: all CPUs)")
    p.add_argument("--shell", action="store_true", help="print AVIS_MODEL=... AVIS_MMPROJ=... for one family")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's quantizer log (one line per tensor)")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(list_fixtures()))
        return 0
    families = ([f for f in ALL_FAMILIES if args.size in REGISTRY[f].sizes] if args.all or not args.family
                else args.family)
    for fam in families:
        if args.size not in REGISTRY[fam].sizes:
            p.error(f"family {fam} has no size {args.size} (its sizes: {', '.join(REGISTRY[fam].sizes)})")
    if args.size == "real":  # minutes of work: show progress
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    opts = dict(seed=args.seed, out_dir=args.out, force=args.force, quantize=args.quantize,
                quant_threads=args.quant_threads, verbose=args.verbose)
    if args.shell:
        import shlex
        fx = make_fixture(families[0], args.size, **opts)
        print(f"AVIS_MODEL={shlex.quote(str(fx.model))} AVIS_MMPROJ={shlex.quote(str(fx.mmproj))}")
        return 0
    for fam in families:
        t0 = time.perf_counter()
        fx = make_fixture(fam, args.size, **opts)
        image_tokens = getattr(fx, "image_tokens", None)
        print(json.dumps({"family": fam, "size": args.size, "model": str(fx.model), "mmproj": str(fx.mmproj),
                          "model_mb": round(fx.model.stat().st_size / 2**20, 2),
                          "mmproj_mb": round(fx.mmproj.stat().st_size / 2**20, 2),
                          "image_tokens_224": image_tokens(224, 224) if image_tokens else None,
                          "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
