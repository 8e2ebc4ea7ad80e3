"""PyTorch mirror of what llama.cpp / mtmd runs for a Qwen2.5-VL video, on the shapes model (training and parity).

mtmd (``mtmd_bitmap_set_mergeable``, what ``Projector.tokenize(video=True)`` sets) groups adjacent frames in
pairs; each pair is one image chunk wrapped in ``<|vision_start|>`` / ``<|vision_end|>``, and the ViT's patch
embedding is ``conv(W0, frame 2j) + conv(W1, frame 2j + 1)`` (``v.patch_embd.weight`` / ``.weight.1``,
tools/mtmd/models/qwen2vl.cpp, ``build_inp_with_temporal_merge``); a still image is ``conv(W0, x) + conv(W1, x)``.
The rest of the tower is the image's (qwen_torch.QwenVisionTower), run at the frame's own size (112 px frames: 8 x
8 merged tokens, one 112 px attention window). In the text model, chunk j is an image at its own start s_j (t = s_j,
h = s_j + y, w = s_j + x) taking max(nx, ny) positions, and the two separator tokens between chunks take one each,
so s_j = p0 + j * (max(nx, ny) + 2); a pruned chunk keeps its tokens at these positions.

The bundled image model has W1 = 0, so its frames 2j + 1 are invisible; ``from_image_model`` splits W0 evenly
(W0 = W1 = W / 2): every still image gives exactly the same embeddings, and both frames of a pair are seen.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convert.gguf_tensors import read_tensors
from training.qwen_torch import (QwenVisionTower, QwenVLMDims, ShapesQwenVLM, _gguf_map, export_weights,
                                 text_positions, vision_angles, vision_positions, window_index)
from training.vlm_torch import _f16_ste, greedy_decode, pixels, state_from_gguf

SEPARATOR = ("<|vision_end|>", "<|vision_start|>")  # the text between two chunks of one video


class QwenVideoTower(QwenVisionTower):
    """The Qwen2.5-VL ViT + merger with both temporal patch convs and any frame size (a multiple of 2 patches;
    window attention needs whole 112 px windows)."""

    def __init__(self, d) -> None:
        super().__init__(d)
        self.patch1 = nn.Parameter(torch.zeros_like(self.patch))

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a handful of frame sizes per model
    def geometry(self, ny: int, nx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(widx, inv, cos, sin, n_windows) for an image of nx x ny patches."""
        if nx % 2 or ny % 2:
            raise ValueError("frame size / patch size must be even (2x2 merge)")
        grid = 112 // self.d.patch_size // 2
        if (nx // 2) % grid or (ny // 2) % grid:
            raise ValueError("the merged grid must be a whole number of 112 px windows")
        widx = window_index(nx, ny, self.d.patch_size)
        cos, sin = vision_angles(vision_positions(nx, ny, widx), self.d.n_embd // self.d.n_head)
        n_windows = (nx // 2 // grid) * (ny // 2 // grid)
        return torch.from_numpy(widx), torch.from_numpy(np.argsort(widx)), cos, sin, n_windows

    def forward(self, px: torch.Tensor, px1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B, 3, H, W] (a still image, or the first frame of each pair) and px1 (the pairs' second frames;
        None for stills) -> (embeddings [B, T, proj_dim], last block's keys per merged token [B, T, H, D]), raster
        order."""
        e = self.d.n_embd
        x = (F.conv2d(px.half().float(), _f16_ste(self.patch), stride=self.d.patch_size)
             + F.conv2d((px if px1 is None else px1).half().float(), _f16_ste(self.patch1), stride=self.d.patch_size))
        b, _, ny, nx = x.shape
        widx, inv, cos, sin, n_windows = self.geometry(ny, nx)
        n_tok = (ny // 2) * (nx // 2)
        x = x.permute(0, 2, 3, 1).reshape(b, ny // 2, 2, nx // 2, 2, e).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, n_tok, 4 * e)[:, inv].reshape(b, n_tok * 4, e)
        k = None
        for il, blk in enumerate(self.blocks):
            x, k = blk(x, cos, sin, 1 if self.full_attention(il) else n_windows)
        x = self.post_ln(x)
        m = self.mm2(F.gelu(self.mm0(x.reshape(b, n_tok, 4 * e)), approximate="tanh"))
        keys = k.transpose(1, 2).reshape(b, n_tok, 4, self.d.n_head, -1).mean(2)
        return m[:, widx], keys[:, widx]


def clip_pixels(frames: np.ndarray | list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip's frames [F, H, W, 3] uint8 (F even) -> (first, second) frames of each temporal pair, normalised."""
    f = np.asarray(frames)
    if f.shape[0] % 2:
        raise ValueError(f"a clip needs an even number of frames, got {f.shape[0]}")
    return pixels(f[0::2]), pixels(f[1::2])


def chunk_starts(p0: int, n_chunks: int, n_pos: int) -> list[int]:
    """M-RoPE start of each chunk of a video whose first chunk starts at p0 (two separator tokens between)."""
    return [p0 + j * (n_pos + len(SEPARATOR)) for j in range(n_chunks)]


def clip_layout(kept: np.ndarray, n_chunks: int, nx: int, ny: int, p0: int) -> tuple[list[tuple[str, object]],
                                                                                         torch.Tensor, int]:
    """The rows llama.cpp evaluates for a pruned video after a p0-token prefix: a list of ("image", chunk-major
    clip token indices) / ("sep", 2) segments, their positions [n_rows, 3], and where the text after the video
    starts. kept: ascending indices into the clip's n_chunks * nx * ny tokens (chunk-major, raster per chunk)."""
    per = nx * ny
    n_pos = max(nx, ny)
    starts = chunk_starts(p0, n_chunks, n_pos)
    kept = np.asarray(kept, dtype=np.int64)
    segs: list[tuple[str, object]] = []
    pos = []
    for j, s in enumerate(starts):
        if j:
            segs.append(("sep", len(SEPARATOR)))
            pos.append(text_positions(starts[j - 1] + n_pos, len(SEPARATOR)))
        idx = kept[(kept >= j * per) & (kept < (j + 1) * per)]
        local = torch.from_numpy(idx - j * per)
        segs.append(("image", idx))
        pos.append(torch.stack((torch.full_like(local, s), s + local // nx, s + local % nx), dim=-1))
    return segs, torch.cat(pos), starts[-1] + n_pos


class ShapesQwenVideoVLM(ShapesQwenVLM):
    """The Qwen shapes VLM with both temporal patch convs: stills as before, clips as mtmd feeds them."""

    vision_type = QwenVideoTower

    def encode_clip(self, frames: np.ndarray | list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(embeddings [n_chunks * T, E], keys [n_chunks * T, H, D] chunk-major, nx, ny) of one clip."""
        a, b = clip_pixels(frames)
        img, keys = self.vision(a, b)
        ny, nx = a.shape[2] // self.dims.vision.patch_size // 2, a.shape[3] // self.dims.vision.patch_size // 2
        return img.reshape(-1, img.shape[-1]), keys.reshape(-1, *keys.shape[2:]), nx, ny

    def clip_prompt(self, prefix: list[int], img: torch.Tensor, kept: np.ndarray, n_chunks: int, nx: int, ny: int,
                    sep: list[int], rest: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's input embeddings [1, T, E] and positions [1, T, 3]: prefix, the clip's kept rows by
        chunk with the separator tokens between chunks, rest."""
        segs, vpos, rest_start = clip_layout(kept, n_chunks, nx, ny, len(prefix))
        emb = self.text.embd
        parts = [emb(torch.tensor(prefix))]
        for kind, v in segs:
            parts.append(img[torch.as_tensor(v)] if kind == "image" else emb(torch.tensor(sep)))
        parts.append(emb(torch.tensor(rest, dtype=torch.long)))
        pos = torch.cat([text_positions(0, len(prefix)), vpos, text_positions(rest_start, len(rest))])
        return torch.cat(parts)[None], pos[None]

    @torch.no_grad()
    def greedy_clip(self, frames: np.ndarray | list[np.ndarray], prefix: list[int], sep: list[int],
                    question: list[int], *, max_tokens: int, eos: int, stop: list[int] = (),
                    kept: np.ndarray | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy continuation for a clip (ends at EOS, not returned, or after `stop`) and the first-step logits;
        `kept` (chunk-major clip token indices) prunes the clip as one selection."""
        img, _, nx, ny = self.encode_clip(frames)
        n_chunks = len(frames) // 2
        kept = np.arange(img.shape[0]) if kept is None else np.sort(np.asarray(kept))

        def next_logits(out: list[int]) -> torch.Tensor:
            x, pos = self.clip_prompt(prefix, img, kept, n_chunks, nx, ny, sep, question + out)
            return self.text.logits(self.text.hidden(x, pos, None)[:, -1])[0]

        return greedy_decode(next_logits, max_tokens=max_tokens, eos=eos, stop=stop)


def from_image_model(image_model: ShapesQwenVLM) -> ShapesQwenVideoVLM:
    """A video model holding an image model's weights, its patch conv split evenly over the two temporal halves
    (stills unchanged: conv(W/2, x) + conv(W/2, x); W/2 is exact in f16)."""
    model = ShapesQwenVideoVLM(image_model.dims)
    sd = dict(image_model.state_dict())
    sd["vision.patch"] = sd["vision.patch"] / 2
    sd["vision.patch1"] = sd["vision.patch"].clone()
    model.load_state_dict(sd, strict=True)
    return model


def export_video_weights(model: ShapesQwenVideoVLM) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(mmproj weights, text weights) in GGUF naming, the second temporal conv included."""
    vision, text = export_weights(model)
    vision["v.patch_embd.weight.1"] = model.vision.patch1.detach().float().numpy()
    return vision, text


def load_video_from_gguf(model_path: str | os.PathLike, mmproj_path: str | os.PathLike,
                         dims: QwenVLMDims) -> ShapesQwenVideoVLM:
    """A ShapesQwenVideoVLM holding exactly the weights of a GGUF pair (either temporal conv may be zero)."""
    model = ShapesQwenVideoVLM(dims)
    vmap, tmap = _gguf_map(dims)
    vmap["v.patch_embd.weight.1"] = "vision.patch1"
    if "v.patch_embd.weight.1" not in read_tensors(mmproj_path):
        raise ValueError(f"{mmproj_path}: no v.patch_embd.weight.1 (not a Qwen2-VL-style mmproj)")
    model.load_state_dict(state_from_gguf(model_path, mmproj_path, vmap, tmap), strict=True)
    return model.eval()
