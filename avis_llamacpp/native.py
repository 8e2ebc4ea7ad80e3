"""Thin owners of llama.cpp handles (model, context, sampler): the only place that calls llama_cpp's C API
for text models. Each class frees what it allocates; nothing here knows about images or AVIS."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import numbers
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Sequence, Union

import llama_cpp
import numpy as np

from .errors import ContextOverflowError, InvalidArgumentError, ModelLoadError
from .preflight import check_text_model_file

logger = logging.getLogger(__name__)

_BACKEND_READY = False


def ensure_backend() -> None:
    """Initialise llama.cpp's backends once per process (idempotent)."""
    global _BACKEND_READY
    if not _BACKEND_READY:
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True


# ggml_log_level in the vendored ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5. llama-cpp-python
# 0.3.36's own callback still maps the old order (WARN as ERROR, ERROR as DEBUG), so without --verbose it
# prints llama.cpp's warnings and hides its errors; ours maps them as ggml.h says.
_GGML_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_native_log = {"verbose": False, "last": logging.INFO}


@llama_cpp.llama_log_callback
def _native_log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    lvl = _native_log["last"] if level == 5 else _GGML_LEVELS.get(level, logging.DEBUG)
    _native_log["last"] = lvl
    if _native_log["verbose"] or lvl >= logging.ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))
        sys.stderr.flush()


def set_native_verbosity(verbose: bool) -> None:
    """Show llama.cpp's (and mtmd's) own logs only when verbose (errors always), through one log callback for
    llama.cpp, ggml and mtmd, the switch llama_cpp.Llama(verbose=...) is meant to be."""
    import llama_cpp.mtmd_cpp as mtmd_cpp
    from llama_cpp import _logger

    _logger.set_verbose(verbose)
    _native_log["verbose"] = bool(verbose)
    llama_cpp.llama_log_set(_native_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(_native_log_callback, None)
    mtmd_cpp.mtmd_helper_log_set(_native_log_callback, None)


_NO_REPACK_LOCK = threading.RLock()


@contextlib.contextmanager
def no_repack() -> Iterator[None]:
    """Within the block, `llama_cpp.Llama(...)` loads its weights outside llama.cpp's CPU extra buffer types (AMX
    tiles, repacked layouts), as llama-server's --no-repack: llama-cpp-python has no keyword for it, and a host
    whose AMX kernels fault cannot run a quantized model without it. Swaps llama_cpp's default model params for
    the block, so a Llama another thread builds meanwhile loads the same way; blocks of two threads take turns."""
    import llama_cpp.llama_cpp as lib  # the module llama_cpp.Llama reads its default params from

    with _NO_REPACK_LOCK:
        original = lib.llama_model_default_params

        def default_params_without_repack() -> Any:
            params = original()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = default_params_without_repack
        try:
            yield
        finally:
            lib.llama_model_default_params = original


class Model:
    """A loaded text model (GGUF) and its vocabulary."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 repack: bool = True, verbose: bool = False) -> None:
        """repack: let llama.cpp move weights into its CPU extra buffer types (AMX tiles, interleaved repacked
        layouts), its default; False is llama-server's --no-repack (for a host whose AMX faults: SIGILL / SIGSEGV
        in tinygemm_kernel_amx on the first matrix product of a quantized model)."""
        ensure_backend()
        set_native_verbosity(verbose)
        path = os.fspath(path)
        check_text_model_file(path)  # refuse files that would make llama.cpp abort the process
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_mmap = use_mmap
        params.use_extra_bufts = bool(repack)
        self.path = path
        self.n_gpu_layers = n_gpu_layers  # what a replica in another process needs
        self.repack = bool(repack)
        self.owned = True
        self.owner: Any = None  # set by borrow(): the object whose model this is
        self.ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load the text model {path!r}: not a GGUF language model, "
                                 "truncated, or an architecture this llama.cpp build does not know (run with "
                                 "verbose=True for llama.cpp's reason; update llama-cpp-python or re-download)")
        self._read_facts()

    @classmethod
    def borrow(cls, ptr: int, path: str, owner: Any = None) -> "Model":
        """Wrap a model another owner (e.g. a llama_cpp.Llama) loaded; close() leaves it alone. The owner is
        kept referenced, so its weights are not freed while this wrapper is in use."""
        self = cls.__new__(cls)
        self.path, self.ptr, self.owned = path, ptr, False
        self.owner = owner
        self._read_facts()
        return self

    def _read_facts(self) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        self.n_embd_inp = llama_cpp.llama_model_n_embd_inp(self.ptr)
        self.n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        self.rope_type = llama_cpp.llama_model_rope_type(self.ptr)

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def architecture(self) -> str:
        return self.meta("general.architecture") or "unknown"

    @property
    def uses_mrope(self) -> bool:
        return self.rope_type in (llama_cpp.LLAMA_ROPE_TYPE_MROPE, getattr(llama_cpp, "LLAMA_ROPE_TYPE_IMROPE", -1))

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Text -> token ids with llama.cpp's tokenizer."""
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp returns minus the needed size
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (special tokens render only when special=True)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int], *, special: bool = False) -> str:
        """Token ids -> text (invalid UTF-8 across token boundaries is replaced)."""
        return b"".join(self.token_piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if getattr(self, "ptr", None):
            if self.owned:
                llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, *, hint: str = "") -> int:
    """An integer argument in [lo, hi], else InvalidArgumentError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]" if lo is not None else f"<= {hi}"
        raise InvalidArgumentError(f"{name} must be {rng}, got {value!r}" + (f" ({hint})" if hint else ""))
    return v


def _check_real(name: str, value: Any) -> float:
    """A finite real number, else InvalidArgumentError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}")
    return v


# flash attention: "auto" lets llama.cpp (text context) and mtmd (encoder) enable it where the backend supports it
FlashAttn = Union[Literal["auto"], bool]


def flash_attn_type(value: Any) -> int:
    """"auto" | True | False -> llama.cpp's enum llama_flash_attn_type (AUTO / ENABLED / DISABLED), which both
    llama_context_params and mtmd_context_params take; anything else is an InvalidArgumentError."""
    if value is True:
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    if value is False:
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if isinstance(value, str) and value == "auto":
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    raise InvalidArgumentError(f"flash_attn must be 'auto', True or False, got {value!r}")


@dataclass(frozen=True)
class ContextSettings:
    """What a llama.cpp context is created with; defaults mirror llama_cpp.Llama's so outputs match it, except
    flash_attn: "auto" (llama.cpp's own default) where llama_cpp.Llama disables it; pass flash_attn=False for
    bit-identical logits with a stock Llama."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_threads: int | None = None
    n_threads_batch: int | None = None
    flash_attn: FlashAttn = "auto"
    kv_unified: bool = True

    def __post_init__(self) -> None:
        flash_attn_type(self.flash_attn)
        _check_int("n_ctx", self.n_ctx, 0, hint="0 means the model's training context")
        _check_int("n_batch", self.n_batch, 1)
        _check_int("n_ubatch", self.n_ubatch, 0)
        _check_int("n_seq_max", self.n_seq_max, 1, MAX_SEQUENCES)
        for name in ("n_threads", "n_threads_batch"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, hint="None or 0 means the default")

    def resolved_threads(self) -> tuple[int, int]:
        cpu = max(1, (os.cpu_count() or 2) // 2)  # llama_cpp.Llama's default
        n = self.n_threads or cpu
        # an explicit n_threads also pins the batch threads (threads beyond free cores stall ggml's pool)
        return n, self.n_threads_batch or self.n_threads or (os.cpu_count() or n)


class Context:
    """A llama.cpp context (KV cache + compute) on a Model, with the decode calls the pipeline needs."""

    def __init__(self, model: Model, settings: ContextSettings = ContextSettings()) -> None:
        self.model = model
        self.settings = settings
        n_ctx = settings.n_ctx or model.n_ctx_train
        if min(n_ctx, settings.n_batch) < settings.n_seq_max:
            # llama.cpp sizes its output buffer by n_batch (capped at n_ctx) and asserts it holds one output per
            # sequence: refuse here instead of letting it abort the process
            raise InvalidArgumentError(
                f"n_batch ({settings.n_batch}) and n_ctx ({n_ctx}) must both be >= n_seq_max ({settings.n_seq_max}): "
                "one decode step holds one token per parallel rollout; raise n_batch / n_ctx or lower n_seq_max")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = settings.n_batch
        params.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        params.n_seq_max = settings.n_seq_max
        params.n_threads, params.n_threads_batch = settings.resolved_threads()
        params.flash_attn_type = flash_attn_type(settings.flash_attn)
        params.kv_unified = settings.kv_unified
        params.no_perf = True
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not create a context with {settings} "
                                 "(out of memory, or n_seq_max above llama_max_parallel_sequences())")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self.n_batch = int(llama_cpp.llama_n_batch(self.ptr))  # llama.cpp caps n_batch at n_ctx
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self._batch = llama_cpp.llama_batch_init(max(settings.n_batch, settings.n_seq_max), 0, settings.n_seq_max)
        self._batch_ext = None

    # -- memory ---------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every sequence from the KV cache."""
        llama_cpp.llama_memory_clear(self.memory, True)

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_pos_max(self, seq_id: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self.memory, seq_id))

    def seq_pos_min(self, seq_id: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id))

    def seq_state(self, seq_id: int = 0) -> bytes:
        """The KV-cache state of one sequence (llama_state_seq_get_data), for snapshot/restore."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        if n != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {n} of {size} bytes")
        return bytes(buf)

    def seq_state_size(self, seq_id: int = 0) -> int:
        """Bytes seq_state(seq_id) would return (the sequence's KV cells), without copying them."""
        return int(llama_cpp.llama_state_seq_get_size(self.ptr, seq_id))

    def set_seq_state(self, state: bytes, seq_id: int = 0) -> None:
        """Load a sequence state (from seq_state) into seq_id, replacing what the sequence held."""
        self.seq_rm(seq_id)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(state), seq_id) == 0:
            raise ContextOverflowError("could not restore the sequence state: no room in the KV cache, or the "
                                       "state comes from a different model/context layout")

    # -- decoding -------------------------------------------------------------------------------------
    def _check(self, ret: int, what: str) -> None:
        if ret == 1:
            raise ContextOverflowError(f"{what}: no KV-cache slot left (n_ctx={self.n_ctx}); raise n_ctx")
        if ret != 0:
            raise RuntimeError(f"{what}: llama_decode returned {ret}")

    def decode_tokens(self, tokens: Sequence[int], pos0: int, seq_id: int = 0, *, logits_last: bool = True) -> None:
        """Decode text tokens at consecutive positions pos0.. in slices of n_batch, exactly as
        llama_cpp.Llama.eval does (logits only for the last token of each slice)."""
        for start in range(0, len(tokens), self.n_batch):
            piece = tokens[start:start + self.n_batch]
            b = self._batch
            b.n_tokens = len(piece)
            for i, tok in enumerate(piece):
                b.token[i] = tok
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq_id
                b.logits[i] = False
            b.logits[len(piece) - 1] = logits_last
            self._check(llama_cpp.llama_decode(self.ptr, b), "decoding text tokens")

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int]) -> None:
        """Decode one token per sequence in one batch (a generation step for several rollouts);
        logits are produced for every entry, readable with logits(i)."""
        b = self._batch
        b.n_tokens = len(tokens)
        for i, (tok, pos, sid) in enumerate(zip(tokens, positions, seq_ids)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = sid
            b.logits[i] = True
        self._check(llama_cpp.llama_decode(self.ptr, b), "decoding a generation step")

    def decode_embeddings(self, embd: np.ndarray, positions: np.ndarray, seq_id: int = 0, *,
                          logits_last: bool = False, causal: bool = True) -> None:
        """Decode embedding rows [n, n_embd] with explicit positions [n, n_pos] (n_pos = 4 for M-RoPE,
        1 otherwise) in slices of n_batch, as mtmd_helper_decode_image_chunk does. causal=False decodes them
        with bidirectional attention (Gemma 3's image tokens), restoring causal attention afterwards."""
        if not causal:
            llama_cpp.llama_set_causal_attn(self.ptr, False)
            try:
                self.decode_embeddings(embd, positions, seq_id, logits_last=logits_last)
            finally:
                llama_cpp.llama_set_causal_attn(self.ptr, True)
            return
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        n, n_embd = embd.shape
        if positions.shape[0] != n:
            raise ValueError(f"{n} embeddings but {positions.shape[0]} positions")
        if self._batch_ext is None:
            self._batch_ext = llama_cpp.llama_batch_ext_init(self.ptr)
        pos_buf = (llama_cpp.llama_pos * 4)()
        base = embd.ctypes.data
        row_bytes = n_embd * 4
        for start in range(0, n, self.n_batch):
            stop = min(n, start + self.n_batch)
            llama_cpp.llama_batch_ext_clear(self._batch_ext)
            for i in range(start, stop):
                e = llama_cpp.llama_embd(ctypes.cast(base + i * row_bytes, ctypes.POINTER(ctypes.c_float)), 1, n_embd)
                idx = llama_cpp.llama_batch_ext_add_embd(self._batch_ext, seq_id, e)
                if idx < 0:
                    raise RuntimeError(f"llama_batch_ext_add_embd failed ({idx})")
                for j in range(4):
                    pos_buf[j] = int(positions[i, j]) if j < positions.shape[1] else 0
                llama_cpp.llama_batch_ext_set_pos(self._batch_ext, idx, pos_buf)
                if logits_last and i == n - 1:
                    llama_cpp.llama_batch_ext_set_output_logits(self._batch_ext, idx, True)
            self._check(llama_cpp.llama_process(self.ptr, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, self._batch_ext),
                        "decoding image embeddings")

    def logits(self, i: int = -1) -> np.ndarray:
        """Logits of output i of the last decode (-1: the last output), copied out as float32."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise RuntimeError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def logits_view(self, i: int = -1) -> np.ndarray:
        """Logits of output i of the last decode as a read-only float32 view of llama.cpp's buffer, no copy.
        Valid only until the next decode: for per-token reads (a rollout's log-probability) that should not
        copy a vocabulary-sized row (600 KB at 152k tokens) per rollout per step."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise RuntimeError(f"no logits for output {i}")
        row = (ctypes.c_float * self.model.n_vocab).from_address(ctypes.cast(ptr, ctypes.c_void_p).value)
        view = np.frombuffer(row, dtype=np.float32)  # ~1 us; np.ctypeslib.as_array takes ~15 us
        view.flags.writeable = False
        return view

    def close(self) -> None:
        if getattr(self, "_batch_ext", None):
            llama_cpp.llama_batch_ext_free(self._batch_ext)
            self._batch_ext = None
        if getattr(self, "ptr", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class SamplingParams:
    """llama-cpp-python's sampling knobs; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse values llama.cpp's samplers would misbehave on, naming the field (InvalidArgumentError)."""
        t = _check_real("temperature", self.temperature)
        if t < 0:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        p = _check_real("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        _check_int("top_k", self.top_k, 0, hint="0 disables it")
        m = _check_real("min_p", self.min_p)
        if not 0.0 <= m <= 1.0:
            raise InvalidArgumentError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        r = _check_real("repeat_penalty", self.repeat_penalty)
        if r <= 0:
            raise InvalidArgumentError(f"repeat_penalty must be > 0 (1 disables it), got {self.repeat_penalty!r}")
        _check_int("penalty_last_n", self.penalty_last_n, -1, hint="-1 means the whole context")
        _check_int("seed", self.seed)


class Sampler:
    """A llama.cpp sampler chain for one stream, built in llama-cpp-python's order
    (penalties, top-k, top-p, min-p, temperature, dist) so the same knobs mean the same thing."""

    def __init__(self, p: SamplingParams, n_vocab: int) -> None:
        self.params = p
        self.ptr = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        if p.repeat_penalty != 1.0:
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, p.penalty_last_n, p.repeat_penalty, 0.0, 0.0))
        if p.temperature <= 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(p.temperature))
            add(llama_cpp.llama_sampler_init_dist(p.seed & 0xFFFFFFFF))

    def sample(self, ctx: Context, i: int = -1) -> int:
        """Sample (and accept) the next token from output i of the last decode."""
        return int(llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, i))

    def sample_logits(self, logits: np.ndarray) -> int:
        """Sample (and accept) from saved logits, as llama_sampler_sample does from the context's."""
        n = logits.shape[0]
        data = (llama_cpp.llama_token_data * n)()
        arr = np.ctypeslib.as_array(data)  # structured view: id, logit, p
        arr["id"] = np.arange(n, dtype=np.int32)
        arr["logit"] = logits
        arr["p"] = 0.0
        cur = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise RuntimeError("sampler chain selected no token")
        token = int(cur.data[cur.selected].id)
        llama_cpp.llama_sampler_accept(self.ptr, token)
        return token

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
