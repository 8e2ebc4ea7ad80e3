"""PyTorch mirror of the llama.cpp graphs a Qwen2.5-VL-architecture shapes VLM runs in (training and parity).

Vision (tools/mtmd/models/qwen2vl.cpp, projector ``qwen2.5vl_merger``): two patch convs (temporal halves; the
second is exported as zeros, so one f16 conv as ggml_conv_2d's F16 im2col computes it) -> rows grouped by 2x2
merge block, blocks in window order (112 px windows) -> ``n_layer`` blocks: RMSNorm, biased q/k/v, 2-D vision
RoPE on q and k (pairs (k, k + d/2): y on the first quarter, x on the second, theta restarting per section),
attention inside a window except every ``n_wa_pattern``-th block (full), SwiGLU FFN -> RMS post-norm -> 2x2
merge (4 rows concatenated) -> ``mm.0`` -> tanh-GELU -> ``mm.2`` -> back to raster token order.

Text (src/models/qwen2vl.cpp): RMSNorm, biased q/k/v, M-RoPE (NEOX pairs (k, k + d/2); pair k takes the t, h
or w position by ``rope_sections``, angle ``pos * base^(-2k/d)``), causal attention, SwiGLU, output tied to the
token embeddings. An image token at merged grid (y, x) sits at (p0, p0 + y, p0 + x); text tokens at (p, p, p);
the text after an image starts at p0 + max(nx, ny) whatever was pruned (mtmd's n_pos, the AVIS convention).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convert.gguf_tensors import read_tensors
from convert.mmproj import VisionDims
from convert.text_model import TextModelDims
from training.vlm_torch import (LlamaBlock, LlamaText, MirrorVLM, RMSNorm, ShapesVLMDims, _f16_ste, greedy_decode,
                                pixels, projector_map, state_from_gguf, text_gguf_map)
from training.vlm_torch import dims_from_gguf as llava_dims_from_gguf

VISION_ROPE_THETA = 10000.0


QwenVLMDims = ShapesVLMDims  # vision + text dims and vocabulary size, as for the llava-style mirror


def window_index(nx: int, ny: int, patch_size: int, window_px: int = 112) -> np.ndarray:
    """clip.cpp's window_idx over merged tokens: raster merged token -> position in window order."""
    pw, ph = nx // 2, ny // 2
    grid = window_px // patch_size // 2
    idx = np.zeros(ph * pw, dtype=np.int64)
    dst = 0
    for y in range(0, ph, grid):
        for x in range(0, pw, grid):
            for dy in range(min(grid, ph - y)):
                for dx in range(min(grid, pw - x)):
                    idx[(y + dy) * pw + (x + dx)] = dst
                    dst += 1
    return idx


def vision_positions(nx: int, ny: int, widx: np.ndarray) -> np.ndarray:
    """[n_patches, 2] (y, x) per ViT row in window order (clip.cpp's "positions", first two components)."""
    pos = np.zeros((nx * ny, 2), dtype=np.int64)
    ptr = 0
    for y in range(0, ny, 2):
        for x in range(0, nx, 2):
            for dy in range(2):
                for dx in range(2):
                    pos[widx[ptr // 4] * 4 + ptr % 4] = (y + dy, x + dx)
                    ptr += 1
    return pos


def rope_vision(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (k, k + d/2) of [B, H, N, D] by precomputed [N, D/2] angles."""
    d = x.shape[-1]
    x0, x1 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


def vision_angles(pos: np.ndarray, d_head: int, theta: float = VISION_ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, d/2] of ggml's vision rope: pairs k < d/4 use y * s^k, the rest x * s^(k - d/4); s = theta^(-4/d)."""
    n_dims = d_head // 2
    sec = d_head // 4
    scale = float(np.float32(theta) ** np.float32(-2.0 / n_dims))
    k = np.arange(d_head // 2)
    expo = np.where(k < sec, k, k - sec).astype(np.float64)
    comp = np.where(k < sec, 0, 1)
    ang = pos[:, comp].astype(np.float64) * scale ** expo[None, :]
    return torch.from_numpy(np.cos(ang).astype(np.float32)), torch.from_numpy(np.sin(ang).astype(np.float32))


class QwenViTBlock(nn.Module):
    """One qwen2vl.cpp ViT block."""

    def __init__(self, e: int, n_head: int, n_ff: int, eps: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = RMSNorm(e, eps)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.ln2 = RMSNorm(e, eps)
        self.gate = nn.Linear(e, n_ff)
        self.up = nn.Linear(e, n_ff)
        self.down = nn.Linear(n_ff, e)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows: int) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
        """[B, N, E] rows in window order -> ([B, N, E], post-RoPE keys [B, H, N, D]); windows > 1 splits the rows
        into that many equal, contiguous attention windows."""
        b, n, e = x.shape
        h = self.ln1(x)
        q, k, v = (t(h).view(b, n, self.n_head, -1).transpose(1, 2) for t in (self.q, self.k, self.v))
        q, k = rope_vision(q, cos, sin), rope_vision(k, cos, sin)
        if windows > 1:
            w = n // windows
            split = lambda t: t.reshape(b, self.n_head, windows, w, -1).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [B, W, H, w, D]
            a = a.transpose(1, 2).reshape(b, self.n_head, n, -1)
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, e))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), k


class QwenVisionTower(nn.Module):
    """Qwen2.5-VL ViT + patch merger for one fixed square image size -> [B, n_tokens, proj_dim] (raster order)."""

    def __init__(self, d: VisionDims) -> None:
        super().__init__()
        self.d = d
        self.nx = self.ny = d.image_size // d.patch_size
        if self.nx % 2:
            raise ValueError("image_size / patch_size must be even (2x2 merge)")
        self.n_tokens = (self.nx // 2) * (self.ny // 2)
        e = d.n_embd
        self.patch = nn.Parameter(torch.randn(e, 3, d.patch_size, d.patch_size) * 0.02)
        self.blocks = nn.ModuleList(QwenViTBlock(e, d.n_head, d.n_ff, d.eps) for _ in range(d.n_layer))
        self.post_ln = RMSNorm(e, d.eps)
        self.mm0 = nn.Linear(4 * e, 4 * e)
        self.mm2 = nn.Linear(4 * e, d.proj_dim)
        widx = window_index(self.nx, self.ny, d.patch_size)
        grid = 112 // d.patch_size // 2
        self.n_windows = ((self.nx // 2 + grid - 1) // grid) * ((self.ny // 2 + grid - 1) // grid)
        if (self.nx // 2) % grid or (self.ny // 2) % grid:
            raise ValueError("the merged grid must be a whole number of 112 px windows (equal windows)")
        self.register_buffer("widx", torch.from_numpy(widx), persistent=False)
        self.register_buffer("inv", torch.from_numpy(np.argsort(widx)), persistent=False)
        cos, sin = vision_angles(vision_positions(self.nx, self.ny, widx), e // d.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def full_attention(self, il: int) -> bool:
        """Whether block il attends over the whole image (every n_wa_pattern-th block)."""
        return self.d.n_wa_pattern <= 0 or (il + 1) % self.d.n_wa_pattern == 0

    def forward(self, px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels [B, 3, H, W] -> (embeddings [B, T, proj_dim], last block's post-RoPE keys averaged
        per merged token [B, T, H, D]), both in raster token order."""
        e = self.d.n_embd
        x = F.conv2d(px.half().float(), _f16_ste(self.patch), stride=self.d.patch_size)  # [B, E, ny, nx]
        b = x.shape[0]
        x = x.permute(0, 2, 3, 1).reshape(b, self.ny // 2, 2, self.nx // 2, 2, e).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, self.n_tokens, 4 * e)[:, self.inv].reshape(b, self.n_tokens * 4, e)  # window order
        k = None
        for il, blk in enumerate(self.blocks):
            x, k = blk(x, self.cos, self.sin, 1 if self.full_attention(il) else self.n_windows)
        x = self.post_ln(x)
        m = self.mm2(F.gelu(self.mm0(x.reshape(b, self.n_tokens, 4 * e)), approximate="tanh"))
        keys = k.transpose(1, 2).reshape(b, self.n_tokens, 4, self.d.n_head, -1).mean(2)
        return m[:, self.widx], keys[:, self.widx]


def mrope_angles(pos: torch.Tensor, d_head: int, sections: tuple[int, int, int, int],
                 base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., T, d/2] of ggml's M-RoPE for positions [..., T, 3] (t, h, w)."""
    k = torch.arange(d_head // 2)
    s0, s1, s2 = sections[0], sections[0] + sections[1], sections[0] + sections[1] + sections[2]
    comp = torch.where(k < s0, 0, torch.where(k < s1, 1, torch.where(k < s2, 2, 3)))
    if bool((comp == 3).any()):
        raise ValueError("the 4th M-RoPE section is unused by this mirror (position e = 0 not modelled)")
    inv = base ** (-2.0 * k.to(torch.float64) / d_head)
    p = pos.to(torch.float64)[..., comp]  # [..., T, d/2]
    ang = (p * inv).to(torch.float32)
    return ang.cos(), ang.sin()


def rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (k, k + d/2) of [B, H, T, D] by [B or 1, T, D/2] angles."""
    d = x.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x0, x1 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)


class QwenTextBlock(LlamaBlock):
    """qwen2vl decoder block: the llama block with q/k/v biases and M-RoPE (rotate takes precomputed angles)."""

    def __init__(self, d: TextModelDims) -> None:
        super().__init__(d, qkv_bias=True)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> tuple[
            torch.Tensor, torch.Tensor]:
        """NEOX-pair rotation of q and k by mrope_angles' (cos, sin)."""
        return rope_neox(q, *angles), rope_neox(k, *angles)


class QwenText(LlamaText):
    """qwen2vl decoder with tied output."""

    block_type = QwenTextBlock

    def hidden(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings [B, T, E], positions [B, T, 3] -> final hidden states."""
        angles = mrope_angles(pos, self.d.head_dim, self.d.resolved_rope_sections(), self.d.rope_theta)
        return super().hidden(x, angles, mask)


def image_positions(p0: int, kept: np.ndarray | torch.Tensor, nx: int) -> torch.Tensor:
    """[n_kept, 3] (t, h, w) of kept image tokens (raster indices) whose image starts at p0 (mtmd's layout)."""
    kept = torch.as_tensor(np.asarray(kept), dtype=torch.long)
    return torch.stack((torch.full_like(kept, p0), p0 + kept // nx, p0 + kept % nx), dim=-1)


def text_positions(start: int, n: int) -> torch.Tensor:
    """[n, 3] positions of n text tokens from start (all three components equal)."""
    return torch.arange(start, start + n)[:, None].expand(n, 3)


class ShapesQwenVLM(MirrorVLM):
    """Qwen2.5-VL vision tower + merger + qwen2vl text model."""

    vision_type = QwenVisionTower
    text_type = QwenText

    def residual_depth(self, dims: QwenVLMDims) -> int:
        return max(dims.text.n_layer, dims.vision.n_layer)

    @property
    def grid(self) -> tuple[int, int]:
        """Merged token grid (nx, ny)."""
        return self.vision.nx // 2, self.vision.ny // 2

    def prompt(self, prefix: list[int], img: torch.Tensor, kept: np.ndarray, rest: list[int]) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
        """One sequence's input embeddings [1, T, E] and positions [1, T, 3]: prefix, kept image rows, rest."""
        nx, ny = self.grid
        p0 = len(prefix)
        x = torch.cat([self.text.embd(torch.tensor([prefix])), img[:, torch.as_tensor(kept)],
                       self.text.embd(torch.tensor([rest], dtype=torch.long))], dim=1)
        pos = torch.cat([text_positions(0, p0), image_positions(p0, kept, nx), text_positions(p0 + max(nx, ny),
                                                                                                 len(rest))])
        return x, pos[None]

    @torch.no_grad()
    def greedy(self, image_rgb: np.ndarray, prefix: list[int], question: list[int], *, max_tokens: int, eos: int,
               stop: list[int] = (), kept: np.ndarray | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy continuation (ends at EOS, not returned, or after `stop`) and the first-step logits; `kept`
        (raster token indices) prunes the image as the plugin does."""
        img, _ = self.vision(pixels(image_rgb[None]))
        kept = np.arange(img.shape[1]) if kept is None else np.asarray(kept)

        def next_logits(out: list[int]) -> torch.Tensor:
            x, pos = self.prompt(prefix, img, kept, question + out)
            return self.text.logits(self.text.hidden(x, pos, None)[:, -1])[0]

        return greedy_decode(next_logits, max_tokens=max_tokens, eos=eos, stop=stop)


# ------------------------------------------------------------------------------------------------------
# GGUF names <-> parameters
# ------------------------------------------------------------------------------------------------------
def _gguf_map(dims: QwenVLMDims) -> tuple[dict[str, str], dict[str, str]]:
    """(mmproj name -> param name, text GGUF name -> param name); v.patch_embd.weight.1 is written as zeros."""
    v: dict[str, str] = {"v.patch_embd.weight": "vision.patch", "v.post_ln.weight": "vision.post_ln.weight"}
    for i in range(dims.vision.n_layer):
        v[f"v.blk.{i}.ln1.weight"] = f"vision.blocks.{i}.ln1.weight"
        v[f"v.blk.{i}.ln2.weight"] = f"vision.blocks.{i}.ln2.weight"
        for g, p in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_out", "o"), ("ffn_gate", "gate"),
                     ("ffn_up", "up"), ("ffn_down", "down")):
            for s in ("weight", "bias"):
                v[f"v.blk.{i}.{g}.{s}"] = f"vision.blocks.{i}.{p}.{s}"
    v.update(projector_map())
    return v, text_gguf_map(dims.text.n_layer, qkv_bias=True)


def export_weights(model: ShapesQwenVLM) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(mmproj weights, text weights) as float32 numpy in GGUF naming."""
    sd = {k: t.detach().float().numpy() for k, t in model.state_dict().items()}
    vmap, tmap = _gguf_map(model.dims)
    vision = {g: sd[p] for g, p in vmap.items()}
    vision["v.patch_embd.weight.1"] = np.zeros_like(vision["v.patch_embd.weight"])
    return vision, {g: sd[p] for g, p in tmap.items()}


def load_from_gguf(model_path: str | os.PathLike, mmproj_path: str | os.PathLike,
                   dims: QwenVLMDims) -> ShapesQwenVLM:
    """A ShapesQwenVLM holding exactly the weights of an exported GGUF pair; a pair whose second temporal patch
    conv is not zero (trained on clips) loads as the video mirror, training.qwen_video.ShapesQwenVideoVLM."""
    model = ShapesQwenVLM(dims)
    vmap, tmap = _gguf_map(dims)
    if np.any(read_tensors(mmproj_path)["v.patch_embd.weight.1"]):
        from training.qwen_video import load_video_from_gguf  # imports this module: load it only when needed

        return load_video_from_gguf(model_path, mmproj_path, dims)
    model.load_state_dict(state_from_gguf(model_path, mmproj_path, vmap, tmap), strict=True)
    return model.eval()


def dims_from_gguf(model_path: str | os.PathLike, mmproj_path: str | os.PathLike) -> QwenVLMDims:
    """Rebuild QwenVLMDims from an exported pair's metadata."""
    return llava_dims_from_gguf(model_path, mmproj_path, arch="qwen2vl", family="qwen25vl")


def permute_rope_norm_to_neox(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows of each head from RoPE NORM pairs (2i, 2i+1) to NEOX pairs (i, i + d/2): the same
    rotations at the same frequencies, so a llama model's weights give the same text function under M-RoPE
    (text tokens have t = h = w)."""
    d = w.shape[0] // n_head
    order = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    idx = (np.arange(n_head)[:, None] * d + order[None, :]).reshape(-1)
    return w[idx]
