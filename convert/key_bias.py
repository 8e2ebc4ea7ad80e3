"""Experiments on a Qwen2-VL-style mmproj's last-block key bias (benchmarks/kdv_tau_key_bias.py): a shift along
the lowest-frequency 2-D RoPE pairs that the model's outputs barely notice but KDV's angles to the anchor do."""

from __future__ import annotations

import os
import re

import numpy as np

import gguf
from convert.gguf_tensors import edit_tensor


def lowest_frequency_dims(n_embd: int, n_head: int) -> list[int]:
    """Key dimensions of the lowest-frequency y and x rotary pairs of every head (Qwen2-VL vision RoPE: pair k of
    a head rotates dims (k, k + d/2); pairs k < d/4 turn with y at theta^(-4k/d), the rest with x)."""
    d = n_embd // n_head
    return sorted(h * d + i for h in range(n_head) for k in (d // 4 - 1, d // 2 - 1) for i in (k, k + d // 2))


def shift_last_key_bias(mmproj: str | os.PathLike, out: str | os.PathLike, shift: float) -> str:
    """Write out: mmproj with `shift` added to the last block's key bias on lowest_frequency_dims; returns the
    tensor's name."""
    reader = gguf.GGUFReader(os.fspath(mmproj))
    names = [t.name for t in reader.tensors if re.fullmatch(r"v\.blk\.\d+\.attn_k\.bias", t.name)]
    if not names:
        raise ValueError(f"{os.fspath(mmproj)} has no per-block key bias (v.blk.N.attn_k.bias)")
    last = max(names, key=lambda n: int(n.split(".")[2]))
    n_head = int(reader.fields["clip.vision.attention.head_count"].contents())
    n_embd = int(next(t for t in reader.tensors if t.name == last).data.shape[0])
    dims = lowest_frequency_dims(n_embd, n_head)

    def add(bias: np.ndarray) -> np.ndarray:
        bias[dims] += shift
        return bias

    edit_tensor(mmproj, out, last, add)
    return last
