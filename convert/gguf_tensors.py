"""Read every tensor of a GGUF file as float32 numpy (for the PyTorch mirror and the numpy reference ViT)."""

from __future__ import annotations

import os

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
