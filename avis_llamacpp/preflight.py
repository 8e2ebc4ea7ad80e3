"""Pre-flight checks of GGUF files before llama.cpp or mtmd sees them, on gguf-py's reader.

llama.cpp's own GGUF parser is robust against truncated / garbage files (it returns NULL), but a few
well-formed-looking files abort the process inside llama.cpp or mtmd (GGML_ASSERT / NULL dereference), e.g. a
vocabulary with duplicate token strings, or an mmproj whose required tensor is missing. These checks read only
the header (metadata + tensor table; the tensor data is memory-mapped, never read) and refuse such files with a
clear ModelLoadError. They only reject what is certainly malformed."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

import gguf
import numpy as np
from gguf import GGUFValueType

from .errors import ModelLoadError
from .families import family_for

__all__ = ["GGUFHeader", "TextModelInfo", "check_mmproj_file", "check_text_model_file", "scan_gguf"]

GGUF_MAGIC = b"GGUF"
# metadata string arrays whose elements are kept (others only counted): the vocabulary
_KEEP_STRING_ARRAYS = frozenset({"tokenizer.ggml.tokens"})
_U64 = {gguf.GGUFEndian.LITTLE: struct.Struct("<Q"), gguf.GGUFEndian.BIG: struct.Struct(">Q")}


class _Malformed(Exception):
    """The file breaks the GGUF format (turned into a ModelLoadError naming the file)."""


@dataclass
class GGUFHeader:
    """What the pre-flight scan read from a GGUF file's header."""

    path: str
    version: int
    file_size: int
    data_offset: int
    # scalars and strings; arrays of <= 16 numbers as lists; longer arrays as (elem_type, n)
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)  # name -> (ne, ggml type)
    tokens: list[bytes] | None = field(default=None, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or default."""
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        """general.architecture when it is a string."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _HeaderReader(gguf.GGUFReader):
    """gguf-py's reader with cheap arrays and bounds checks before it trusts the header's counts.

    gguf-py walks every array element by element into its own numpy view (seconds for a 152k-token vocabulary);
    here a numeric array is one view (read it with ReaderField.contents(), whole) and a string array's elements
    are memoryview slices (what contents() reads with .tobytes()). Tensors of a type this gguf-py does not know
    are listed but left to llama.cpp; the others must lie inside the file."""

    def _size(self) -> int:
        return int(self.data.shape[0])

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        etype_raw, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        if len(etype_raw) < 1 or len(count) < 1:
            raise _Malformed("truncated header (an array runs past the end of the file)")
        try:
            etype = GGUFValueType(int(etype_raw[0]))
        except ValueError:
            raise _Malformed(f"an array has unknown element type {int(etype_raw[0])}") from None
        n, offs, size = int(count[0]), orig_offs + 12, self._size()
        nptype = self.gguf_scalar_to_np.get(etype)
        if nptype is not None:
            if n * np.dtype(nptype).itemsize > size - offs:
                raise _Malformed(f"an array of {n} values runs past the end of the file")
            values = self._get(offs, nptype, n)
            return 12 + int(values.nbytes), [etype_raw, count, values], [2], [GGUFValueType.ARRAY, etype]
        if etype != GGUFValueType.STRING:
            raise _Malformed(f"an array has unsupported element type {etype.name}")
        if n * 8 > size - offs:
            raise _Malformed(f"an array claims {n} strings, more than the file can hold")
        buf = memoryview(self.data)
        unpack = _U64[self.endianess].unpack_from  # the file's byte order (a big-endian file is refused later)
        parts: list[Any] = [etype_raw, count]
        for _ in range(n):  # the hot loop of the scan (vocabularies, merges): kept minimal
            if offs + 8 > size:
                raise _Malformed("a string array runs past the end of the file")
            (ln,) = unpack(buf, offs)
            offs += 8
            if offs + ln > size:
                raise _Malformed("a string array runs past the end of the file")
            parts.append(buf[offs:offs + ln])
            offs += ln
        return offs - orig_offs, parts, list(range(2, 2 + n)), [GGUFValueType.ARRAY, GGUFValueType.STRING]

    def _build_fields(self, offs: int, count: int) -> int:
        if int(count) > self._size() // 12:
            raise _Malformed(f"header claims {int(count)} metadata entries, more than the file holds")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[gguf.ReaderField]]:
        if int(count) > self._size() // 24:
            raise _Malformed(f"header claims {int(count)} tensors, more than the file holds")
        offs, fields = super()._build_tensor_info(offs, count)
        for f in fields:
            n_dims = int(f.parts[2][0])
            if not 1 <= n_dims <= 4 or len(f.parts[3]) != n_dims:
                raise _Malformed(f"tensor {f.name!r} has {n_dims} dimensions")
        self.tensor_fields = fields
        return offs, fields

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        known = []
        for f in fields:
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(f.parts[4][0]))]
            except (ValueError, KeyError):
                continue  # a type this gguf-py does not know: leave the check to llama.cpp
            ne = [int(x) for x in f.parts[3]]
            if ne[0] % block:
                raise _Malformed(f"tensor {f.name!r} row size {ne[0]} is not a multiple of its block size {block}")
            end = start_offs + int(f.parts[5][0]) + int(np.prod(ne, dtype=object)) // block * type_size
            if end > self._size():
                raise _Malformed(f"tensor {f.name!r} data ends at byte {end} but the file has {self._size()} bytes")
            known.append(f)
        super()._build_tensors(start_offs, known)  # views only: no tensor data is read


def _metadata_value(f: gguf.ReaderField) -> Any:
    """A field as GGUFHeader keeps it: scalars and strings as values (strings decoded leniently, as llama.cpp
    takes bytes), arrays of <= 16 numbers as lists, longer and string arrays as (element type, n)."""
    main = f.types[0]
    if main == GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode("utf-8", "replace")
    if main != GGUFValueType.ARRAY:
        return f.contents()
    etype = f.types[-1]
    if etype == GGUFValueType.STRING:
        return (int(etype), len(f.data))
    n = int(f.parts[f.data[0]].shape[0]) if f.data else 0
    return f.contents() if n <= 16 else (int(etype), n)


def scan_gguf(path: str | os.PathLike, what: str = "model") -> GGUFHeader:
    """Read and sanity-check a GGUF file's header (magic, metadata, tensor table, tensor data bounds);
    a file that is not a GGUF, truncated or structurally broken raises ModelLoadError naming `what`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ModelLoadError(f"{what} path {path!r} is a folder; give the GGUF file in it")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{what} file not found: {path!r}; check the path")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        hint = " (the file is empty)" if size == 0 else f" (it starts with {head!r})"
        raise ModelLoadError(f"{what} {path!r} is not a GGUF file{hint}; llama.cpp needs .gguf files "
                             "(convert with llama.cpp's convert_hf_to_gguf.py, or download the GGUF release)")
    if size < 24:
        raise ModelLoadError(f"{what} {path!r} is truncated ({size} bytes); download or convert it again")
    try:
        return _scan(path, size)
    except Exception as e:  # noqa: BLE001 - whatever the reader trips on in a broken file, the error is typed
        detail = str(e) if isinstance(e, _Malformed) else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"{what} {path!r} is a malformed or truncated GGUF file ({detail}); "
                             "download or convert it again") from None


def _scan(path: str, size: int) -> GGUFHeader:
    r = _HeaderReader(path)
    if r.byte_order != "I":
        raise _Malformed("big-endian GGUF (llama.cpp here reads little-endian files)")
    hdr = GGUFHeader(path, int(r.fields["GGUF.version"].contents()), size, int(r.data_offset))
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        if name in _KEEP_STRING_ARRAYS and f.types[-1] == GGUFValueType.STRING and f.types[0] == GGUFValueType.ARRAY:
            hdr.tokens = [bytes(f.parts[i]) for i in f.data]
        hdr.metadata[name] = _metadata_value(f)
    align = hdr.metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise _Malformed(f"general.alignment is {align!r}, not a power of two")
    for f in r.tensor_fields:
        hdr.tensors[f.name] = (tuple(int(x) for x in f.parts[3]), int(f.parts[4][0]))
    return hdr


LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS = 512, 1024


def _check_hparams(hdr: GGUFHeader, arch: str) -> None:
    """Mirror the GGML_ASSERTs llama.cpp's load_hparams makes on layer / expert counts (an assert aborts the
    process; a value of the wrong type is already a clean error there)."""
    def num(key: str, default: int = 0) -> int | None:
        v = hdr.get(f"{arch}.{key}", default)
        if isinstance(v, list):
            v = max(v) if v and all(isinstance(x, int) for x in v) else None
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"text model {hdr.path!r} is corrupt: {what} (llama.cpp would abort loading it); "
                              "download or convert the model again")

    n_layer = num("block_count", -1)
    if n_layer is not None and n_layer != -1 and not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise bad(f"{arch}.block_count is {n_layer}, not in 1..{LLAMA_MAX_LAYERS}")
    nextn = num("nextn_predict_layers")
    if n_layer and n_layer > 0 and nextn is not None and nextn > n_layer:
        raise bad(f"{arch}.nextn_predict_layers {nextn} exceeds block_count {n_layer}")
    n_expert, used = num("expert_count"), num("expert_used_count")
    groups, group_used = num("expert_group_count"), num("expert_group_used_count")
    if None in (n_expert, used, groups, group_used) or arch in ("hunyuan-vl", "hunyuan-dense"):
        return
    ok = n_expert <= LLAMA_MAX_EXPERTS and used <= n_expert
    if ok and n_expert > 0:
        ok = used > 0 and groups < n_expert and (groups <= 1 or (n_expert % groups == 0 and 0 < group_used < groups))
    elif ok:
        ok = used == 0 and groups == 0
    if not ok:
        raise bad(f"inconsistent expert counts (expert_count={n_expert}, expert_used_count={used}, "
                  f"expert_group_count={groups}, expert_group_used_count={group_used})")


def check_text_model_file(path: str | os.PathLike) -> GGUFHeader:
    """Pre-flight for a text-model GGUF: refuse what llama.cpp would choke (or abort the process) on."""
    hdr = scan_gguf(path, "text model")
    arch = hdr.architecture
    if arch is None:
        raise ModelLoadError(f"text model {hdr.path!r} has no general.architecture; not a llama.cpp model GGUF")
    if arch == "clip" or "clip.projector_type" in hdr.metadata or "clip.has_vision_encoder" in hdr.metadata:
        raise ModelLoadError(f"{hdr.path!r} is a multimodal projector (mmproj), not a text model; pass it as "
                             "mmproj and give the language-model GGUF as the model")
    _check_hparams(hdr, arch)
    sections = hdr.get(f"{arch}.rope.dimension_sections")
    if isinstance(sections, list):
        # ggml's M-RoPE asserts sum(sections) <= rotary dims and divides by that sum: refuse what would abort
        n_embd, n_head = hdr.get(f"{arch}.embedding_length"), hdr.get(f"{arch}.attention.head_count")
        n_rot = hdr.get(f"{arch}.rope.dimension_count")
        if not isinstance(n_rot, int) and isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0:
            n_rot = n_embd // n_head
        total = sum(int(x) for x in sections[:4])
        if any(int(x) < 0 for x in sections[:4]) or total <= 0 or (isinstance(n_rot, int) and total > n_rot):
            raise ModelLoadError(f"text model {hdr.path!r} is corrupt: {arch}.rope.dimension_sections {sections} "
                                 f"does not fit its {n_rot} rotary dimensions (llama.cpp would abort on the first "
                                 "decode); download or convert the model again")
    if hdr.tokens is not None:
        # llama.cpp keeps a C string per token (cut at NUL, empty -> "[EMPTY_i]") and asserts they are unique
        seen: set[bytes] = set()
        for i, tok in enumerate(hdr.tokens):
            word = tok.split(b"\0", 1)[0] or f"[EMPTY_{i}]".encode()
            if word in seen:
                raise ModelLoadError(f"text model {hdr.path!r} is corrupt: its vocabulary has the token "
                                     f"{word[:40]!r} twice (id {i}); llama.cpp would abort loading it. "
                                     "Download or convert the model again")
            seen.add(word)
    return hdr


class TextModelInfo(Protocol):
    """What the mmproj check needs of the loaded text model (native.Model has it)."""

    path: str
    n_embd_inp: int


def check_mmproj_file(path: str | os.PathLike, model: TextModelInfo) -> GGUFHeader:
    """Pre-flight for an mmproj GGUF against the text model it will feed: clear ModelLoadErrors for a text model
    passed as mmproj, an audio-only projector, an embedding-size mismatch, and for tensor tables that load but
    would crash mtmd's encoder (a required tensor missing: clip.cpp treats most as optional and dereferences
    them later)."""
    hdr = scan_gguf(path, "mmproj")
    p = hdr.path
    arch = hdr.architecture
    if arch != "clip":
        if arch is not None and "clip.has_vision_encoder" not in hdr.metadata:
            raise ModelLoadError(f"{p!r} is a text model (architecture {arch!r}), not a multimodal projector; "
                                 "pass the model's mmproj-*.gguf file as mmproj")
        raise ModelLoadError(f"{p!r} is not an mmproj GGUF (general.architecture is {arch!r}, expected 'clip')")
    if not hdr.get("clip.has_vision_encoder", False):
        kind = "an audio-only projector" if hdr.get("clip.has_audio_encoder", False) else "not a vision projector"
        raise ModelLoadError(f"{p!r} has no vision encoder ({kind}); pass the vision mmproj that belongs to "
                             f"the text model {model.path!r}")
    proj = hdr.get("clip.projector_type") or hdr.get("clip.vision.projector_type")
    proj = proj if isinstance(proj, str) else None
    fam = family_for(proj)
    out_dim = fam.projection_dim(hdr.tensors)
    if out_dim is not None and model.n_embd_inp > 0 and out_dim != model.n_embd_inp:
        raise ModelLoadError(f"mmproj {p!r} outputs {out_dim}-dim image embeddings but the text model "
                             f"{model.path!r} takes {model.n_embd_inp}-dim inputs (n_embd): the two files belong to "
                             "different models; use the mmproj released with this text model")
    t = hdr.tensors
    missing: list[str] = []
    n_layer = hdr.get("clip.vision.block_count", 0)
    if isinstance(n_layer, int) and fam.standard_blocks:
        blocks: list[set[str]] = []
        for il in range(min(n_layer, 4096)):
            b = f"v.blk.{il}."
            if f"{b}attn_qkv.weight" not in t:
                missing += [f"{b}attn_{x}.weight" for x in "qkv" if f"{b}attn_{x}.weight" not in t]
            if fam.uniform_blocks:
                blocks.append({n[len(b):] for n in t if n.startswith(b)})
                missing += [n for n in fam.required_per_block(il) if n not in t]
        if fam.uniform_blocks and blocks:
            # every block of these ViTs has the same tensors: one missing from some blocks is a broken file
            union = set().union(*blocks)
            missing += [f"v.blk.{il}.{n}" for il, names in enumerate(blocks) for n in sorted(union - names)]
    missing += [n for n in fam.required_for(t) if n not in t]
    extra = [n for n in fam.forbidden_tensors if n in t]
    if extra:  # clip.cpp asserts (aborts) on these for this projector
        raise ModelLoadError(f"mmproj {p!r} is corrupt: {', '.join(extra)} must not exist in a {proj} projector "
                             "(mtmd would abort); download or convert the mmproj again")
    missing = list(dict.fromkeys(missing))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"mmproj {p!r} is incomplete or corrupt: missing or misnamed tensor(s) "
                             f"{', '.join(missing[:3])}{more} (mtmd would crash encoding with it); download or "
                             "convert the mmproj again")
    return hdr
