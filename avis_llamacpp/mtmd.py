"""Owner of the mtmd (multimodal) handles: projector context, bitmaps, tokenized chunks, image encoding.
The only module besides native.py that calls llama.cpp's C API."""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np

from .capture import KeyCapture, read_constant_tensors, read_vision_info
from .families import ChunkGeometry, VisionInfo, family_for
from .errors import EncodeError, ImageError, InvalidArgumentError, ModelLoadError
from .native import FlashAttn, Model, flash_attn_type, set_native_verbosity
from .preflight import check_mmproj_file

logger = logging.getLogger(__name__)



@dataclass
class TextChunk:
    """Text tokens of the prompt between images."""

    tokens: list[int]

    @property
    def n_pos(self) -> int:
        return len(self.tokens)


@dataclass
class ImageChunk:
    """One image as mtmd tokenized it: n_tokens LLM tokens on an nx x ny grid, n_pos positions."""

    handle: int = field(repr=False)  # mtmd_input_chunk * (owned by the Prompt's chunk list)
    n_tokens: int
    nx: int
    ny: int
    n_pos: int
    image_index: int


Chunk = TextChunk | ImageChunk


class Prompt:
    """A tokenized multimodal prompt (mtmd_input_chunks); free() releases the native chunk list."""

    def __init__(self, handle: int, chunks: list[Chunk]) -> None:
        self._handle = handle
        self.chunks = chunks

    @property
    def images(self) -> list[ImageChunk]:
        return [c for c in self.chunks if isinstance(c, ImageChunk)]

    @property
    def n_tokens(self) -> int:
        return sum(len(c.tokens) if isinstance(c, TextChunk) else c.n_tokens for c in self.chunks)

    @property
    def n_pos(self) -> int:
        return sum(c.n_pos for c in self.chunks)

    def free(self) -> None:
        if self._handle:
            mtmd_cpp.mtmd_input_chunks_free(self._handle)
            self._handle = None

    def __enter__(self) -> "Prompt":
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.free()
        except Exception:
            pass


class Projector:
    """An mtmd context: the vision encoder + projector (mmproj GGUF) bound to a text model.

    `key_capture`, if given, is installed as the encoder graph's eval callback and collects the last
    vision block's attention keys on every encode.
    """

    def __init__(self, mmproj_path: str | os.PathLike, model: Model, *, n_threads: int | None = None,
                 use_gpu: bool = True, flash_attn: FlashAttn = "auto", verbose: bool = False,
                 key_capture: KeyCapture | None = None) -> None:
        mmproj_path = os.fspath(mmproj_path)
        fa_type = flash_attn_type(flash_attn)  # InvalidArgumentError before any file is read
        check_mmproj_file(mmproj_path, model)  # clear errors for files mtmd would refuse or crash on
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = verbose
        set_native_verbosity(verbose)  # clip / mtmd logs only when verbose (a borrowed Model never set it)
        params.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        # "auto": clip.cpp tries flash attention when it first allocates the graph (at the first encode, as
        # warmup is off) and keeps it if the encoder's backend supports it
        params.flash_attn_type = fa_type
        params.warmup = False
        self._cb = None
        self.key_capture = key_capture
        self.capture_error: Exception | None = None
        if key_capture is not None:
            def _trampoline(tensor: int, ask: bool, _user: int) -> bool:
                try:
                    return bool(key_capture(tensor, ask))
                except Exception as e:  # never let an exception cross into C; keep the compute going
                    self.capture_error = e
                    return not ask
            self._cb = llama_cpp.ggml_backend_sched_eval_callback(_trampoline)  # keep alive
            params.cb_eval = self._cb
        self.path = mmproj_path
        self.model = model
        self.ptr = mtmd_cpp.mtmd_init_from_file(mmproj_path.encode(), model.ptr, params)
        if not self.ptr:
            raise ModelLoadError(
                f"mtmd could not load the projector {mmproj_path!r} with text model {model.path!r}: an unsupported "
                "projector type or inconsistent metadata, or its output size does not match the text model's "
                f"embedding size ({model.n_embd_inp}); run with verbose=True for mtmd's reason, and use the mmproj "
                "released with this text model (or a newer llama-cpp-python)")
        if not mtmd_cpp.mtmd_support_vision(self.ptr):
            self.close()
            raise ModelLoadError(f"{mmproj_path!r} has no vision encoder (audio-only projector?); pass a vision mmproj")
        self.uses_mrope = bool(mtmd_cpp.mtmd_decode_use_mrope(self.ptr))
        try:
            self.vision_info: VisionInfo = read_vision_info(mmproj_path)
        except Exception as e:
            self.close()
            raise ModelLoadError(f"mmproj {mmproj_path!r}: unreadable vision metadata ({type(e).__name__}: {e}); "
                                 "download or convert the mmproj again") from e
        self.projector_type = self.vision_info.projector_type
        self.family = family_for(self.projector_type)
        try:
            self._constant_rows = read_constant_tensors(mmproj_path, self.family.constant_row_tensors)
        except Exception as e:
            self.close()
            raise ModelLoadError(f"mmproj {mmproj_path!r}: unreadable tensor data ({type(e).__name__}: {e}); "
                                 "download or convert the mmproj again") from e
        marker = mtmd_cpp.mtmd_default_marker()
        self.marker = marker.decode() if isinstance(marker, bytes) else str(marker)

    # -- prompts --------------------------------------------------------------------------------------
    def tokenize(self, text: str, images_rgb: Sequence[np.ndarray], *, add_special: bool = True,
                 video: bool = False) -> Prompt:
        """Split `text` at media markers into text and image chunks; images are HxWx3 uint8 arrays.
        video=True marks the images as frames of one video, so models with temporal patches (Qwen2/2.5-VL)
        encode each pair of adjacent same-size frames as one chunk, as mtmd's own video helper does."""
        n_markers = text.count(self.marker)
        if n_markers != len(images_rgb):
            raise ImageError(f"prompt has {n_markers} image markers {self.marker!r} but {len(images_rgb)} images: "
                             f"pass one image per marker (and keep the text {self.marker!r} out of questions)")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgumentError(f"prompt text is not valid Unicode ({e.reason} at position {e.start}); "
                                       "remove lone surrogates / undecodable characters") from None
        bitmaps = []
        try:
            for arr in images_rgb:
                arr = np.ascontiguousarray(arr, dtype=np.uint8)
                if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
                    raise ImageError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
                h, w = arr.shape[:2]
                bm = mtmd_cpp.mtmd_bitmap_init(w, h, arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
                if not bm:
                    raise ImageError(f"mtmd could not create a {w}x{h} bitmap")
                if video:
                    mtmd_cpp.mtmd_bitmap_set_mergeable(bm, True)
                bitmaps.append(bm)
            inp = mtmd_cpp.mtmd_input_text()
            inp.text = data
            inp.text_len = len(data)
            inp.add_special = add_special
            inp.parse_special = True
            handle = mtmd_cpp.mtmd_input_chunks_init()
            arr_t = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            ret = mtmd_cpp.mtmd_tokenize(self.ptr, handle, ctypes.byref(inp), arr_t, len(bitmaps))
            if ret != 0:
                mtmd_cpp.mtmd_input_chunks_free(handle)
                raise ImageError(f"mtmd_tokenize failed with code {ret} (1: marker/image count mismatch, "
                                 "2: image preprocessing failed)")
            return Prompt(handle, self._read_chunks(handle))
        finally:
            for bm in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bm)

    @staticmethod
    def _read_chunks(handle: int) -> list[Chunk]:
        chunks: list[Chunk] = []
        n_images = 0
        for i in range(mtmd_cpp.mtmd_input_chunks_size(handle)):
            ch = mtmd_cpp.mtmd_input_chunks_get(handle, i)
            kind = mtmd_cpp.mtmd_input_chunk_get_type(ch)
            if kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                chunks.append(TextChunk([int(ptr[j]) for j in range(n.value)]))
            elif kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                img = mtmd_cpp.mtmd_input_chunk_get_tokens_image(ch)
                chunks.append(ImageChunk(
                    handle=ch,
                    n_tokens=int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(ch)),
                    nx=int(mtmd_cpp.mtmd_image_tokens_get_nx(img)),
                    ny=int(mtmd_cpp.mtmd_image_tokens_get_ny(img)),
                    n_pos=int(mtmd_cpp.mtmd_input_chunk_get_n_pos(ch)),
                    image_index=n_images))
                n_images += 1
            else:
                raise ImageError("audio chunks are not supported")
        return chunks

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, chunk: ImageChunk) -> np.ndarray:
        """Run the vision encoder + projector on one image chunk -> embeddings [n_tokens, n_embd] (copied)."""
        if self.key_capture is not None:
            self.key_capture.begin()
            self.capture_error = None
        ret = mtmd_cpp.mtmd_encode_chunk(self.ptr, chunk.handle)
        if self.key_capture is not None and ret == 0:
            self.key_capture.end()
        if ret != 0:
            raise EncodeError(f"mtmd_encode_chunk failed with code {ret} for image {chunk.image_index}")
        ptr = mtmd_cpp.mtmd_get_output_embd(self.ptr)
        embd = np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens, self.model.n_embd_inp)).copy()
        if self._constant_rows:
            cap = self.key_capture
            geom = ChunkGeometry(chunk.n_tokens, chunk.nx, chunk.ny, cap.image_wh if cap is not None else None)
            n_key_rows = cap.keys.shape[0] if cap is not None and cap.keys is not None else None
            for name, rows in self.family.constant_rows(geom, self.vision_info, n_key_rows).items():
                embd[rows] = self._constant_rows[name]
        if not np.isfinite(embd).all():
            bad = np.flatnonzero(~np.isfinite(embd).all(axis=1))
            raise EncodeError(f"the vision encoder produced non-finite embeddings for image {chunk.image_index} "
                              f"(token rows {bad[:5].tolist()}{' ...' if bad.size > 5 else ''}); the mmproj may be "
                              "corrupt or not match this llama.cpp build")
        return embd

    @property
    def temporal_patch(self) -> int:
        """Video frames per image chunk: 2 where mtmd merges adjacent frames into temporal patches (Qwen2/2.5/3-VL),
        else 1. Read from mtmd itself (two tiny frames tokenized as a video), so it holds for any projector."""
        if getattr(self, "_temporal_patch", None) is None:
            frame = np.zeros((32, 32, 3), dtype=np.uint8)
            with self.tokenize(self.marker * 2, [frame, frame], add_special=False, video=True) as prompt:
                self._temporal_patch = 2 if len(prompt.images) == 1 else 1
        return self._temporal_patch

    def image_tokens(self, image_rgb: np.ndarray) -> int:
        """LLM tokens mtmd gives this image (all its chunks: tiles included), from tokenizing it (no encode)."""
        with self.tokenize(self.marker, [image_rgb], add_special=False) as prompt:
            return sum(c.n_tokens for c in prompt.images)

    def non_causal(self, chunk: ImageChunk) -> bool:
        """Whether mtmd decodes this image chunk with bidirectional attention (Gemma 3 / 4 image tokens)."""
        return bool(mtmd_cpp.mtmd_decode_use_non_causal(self.ptr, chunk.handle))

    def positions(self, chunk: ImageChunk, pos0: int) -> np.ndarray:
        """Decoder positions of the image tokens: [n_tokens, 4] (t, y, x, z) sections for M-RoPE models,
        as mtmd_helper_decode_image_chunk lays them out; [n_tokens, 1] consecutive positions otherwise."""
        if not self.uses_mrope:
            return (pos0 + np.arange(chunk.n_tokens, dtype=np.int32))[:, None]
        img = mtmd_cpp.mtmd_input_chunk_get_tokens_image(chunk.handle)
        out = (mtmd_cpp.mtmd_decoder_pos * chunk.n_tokens)()
        mtmd_cpp.mtmd_helper_image_get_decoder_pos(img, pos0, out)
        raw = np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_uint32)), shape=(chunk.n_tokens, 4))
        # struct is (t, x, y, z); the decoder wants sections (t, y, x, z)
        return raw[:, [0, 2, 1, 3]].astype(np.int32)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            mtmd_cpp.mtmd_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
