"""Read every tensor of a GGUF file as float32 numpy (for the PyTorch mirror and the numpy reference ViT), and
write a copy with one tensor edited."""

from __future__ import annotations

import os
import shutil
from typing import Callable

import numpy as np

import gguf


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a GGUF as float32 arrays shaped as ggml ne reversed (numpy row-major); F16 and quantized
    types are converted. A linear weight with ne [n_in, n_out] comes out [n_out, n_in] (PyTorch layout)."""
    out = {}
    for t in gguf.GGUFReader(os.fspath(path)).tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            a = np.asarray(t.data, dtype=np.float32)
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            a = np.asarray(t.data, dtype=np.float16).astype(np.float32)
        else:
            a = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = np.array(a.reshape(shape), dtype=np.float32, copy=True)
    return out


def edit_tensor(src: str | os.PathLike, dst: str | os.PathLike, name: str,
                edit: Callable[[np.ndarray], np.ndarray]) -> None:
    """Copy the GGUF src to dst with the F32 tensor `name` replaced by edit(its values) (same shape; metadata and
    every other tensor byte for byte), for experiments on a model's weights without re-exporting it."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(os.fspath(dst), "r+")
    tensor = next((t for t in reader.tensors if t.name == name), None)
    if tensor is None:
        raise KeyError(f"{os.fspath(src)} has no tensor {name!r}")
    if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
        raise ValueError(f"tensor {name!r} is {tensor.tensor_type.name}; only F32 tensors can be edited")
    new = np.asarray(edit(np.array(tensor.data, dtype=np.float32, copy=True)), dtype=np.float32)
    if new.shape != tensor.data.shape:
        raise ValueError(f"edit changed {name!r}'s shape {tensor.data.shape} to {new.shape}")
    tensor.data[...] = new
    reader.data.flush()
