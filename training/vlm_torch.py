"""PyTorch mirror of the llama.cpp graphs the exported shapes VLM runs in (training and parity; needs torch).

Vision (tools/mtmd/models/llava.cpp, projector ``mlp``, no class embedding): patch conv in f16 (ggml_conv_2d's
im2col is F16: pixels and kernel are rounded to f16, mirrored with a straight-through estimator) -> + position
embeddings (rows 0..N-1) -> pre-LayerNorm -> ``n_layer - 1`` pre-LN blocks (biased q/k/v/out, quick-GELU MLP)
-> all N patch rows -> ``mm.0`` -> tanh-GELU -> ``mm.2``. The GGUF gets one extra, never-run block (LLaVA-1.5
files have no ``clip.vision.feature_layer``, so clip.cpp runs ``n_layer - 1`` blocks).

Text (src/models/llama.cpp): RMSNorm, RoPE type NORM (adjacent pairs (2i, 2i+1) rotate by
``pos * base^(-2i/d_head)``; weights are stored in that layout, so no q/k permutation on export), causal
attention with scale 1/sqrt(d_head), SwiGLU FFN, output tied to the token embeddings.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convert.gguf_tensors import read_tensors
from convert.mmproj import VisionDims
from convert.text_model import TextModelDims

_CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class ShapesVLMDims:
    """Vision tower + projector + text model hyper-parameters."""

    vision: VisionDims
    text: TextModelDims
    n_vocab: int

    def to_dict(self) -> dict:
        """JSON-friendly view."""
        return {"vision": asdict(self.vision), "text": asdict(self.text), "n_vocab": self.n_vocab}


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W] exactly as clip.cpp (f32 /255, mean/std)."""
    f = images.astype(np.float32) / np.float32(255.0)
    f = (f - _CLIP_MEAN) / _CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2)))


def _f16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to f16 in the forward pass, identity gradient."""
    return x + (x.half().float() - x).detach()


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml_gelu_quick: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class ViTBlock(nn.Module):
    """CLIP pre-LN block as llava.cpp builds it."""

    def __init__(self, e: int, n_head: int, n_ff: int, eps: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(e, eps=eps)
        self.q, self.k, self.v, self.o = (nn.Linear(e, e) for _ in range(4))
        self.ln2 = nn.LayerNorm(e, eps=eps)
        self.up = nn.Linear(e, n_ff)
        self.down = nn.Linear(n_ff, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, E] -> [B, N, E]."""
        b, n, e = x.shape
        h = self.ln1(x)
        q, k, v = (t(h).view(b, n, self.n_head, -1).transpose(1, 2) for t in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, e)
        x = x + self.o(a)
        return x + self.down(quick_gelu(self.up(self.ln2(x))))


class VisionTower(nn.Module):
    """CLIP ViT (no class token) + mlp projector -> [B, N, proj_dim] LLM embeddings."""

    def __init__(self, d: VisionDims) -> None:
        super().__init__()
        self.d = d
        n = (d.image_size // d.patch_size) ** 2
        self.patch = nn.Parameter(torch.randn(d.n_embd, 3, d.patch_size, d.patch_size) * 0.02)
        self.pos = nn.Parameter(torch.randn(n, d.n_embd) * 0.02)
        self.pre_ln = nn.LayerNorm(d.n_embd, eps=d.eps)
        self.blocks = nn.ModuleList(ViTBlock(d.n_embd, d.n_head, d.n_ff, d.eps) for _ in range(d.n_layer - 1))
        self.mm0 = nn.Linear(d.n_embd, d.proj_dim)
        self.mm2 = nn.Linear(d.proj_dim, d.proj_dim)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> [B, N, proj_dim]."""
        x = F.conv2d(px.half().float(), _f16_ste(self.patch), stride=self.d.patch_size)
        x = x.flatten(2).transpose(1, 2) + self.pos
        x = self.pre_ln(x)
        for blk in self.blocks:
            x = blk(x)
        return self.mm2(F.gelu(self.mm0(x), approximate="tanh"))


class RMSNorm(nn.Module):
    """llama.cpp LLM_NORM_RMS with a weight."""

    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x) * w."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_norm(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """ggml rope mode NORM on [B, H, T, D]: pairs (2i, 2i+1) rotate by pos * base^(-2i/D); pos [T] or [B, T]."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (pos.to(torch.float64)[..., None] * inv).to(torch.float32)  # [.., T, D/2]
    if ang.dim() == 3:
        ang = ang[:, None]
    cos, sin = ang.cos(), ang.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class LlamaBlock(nn.Module):
    """Llama decoder block (no biases; qkv_bias adds q/k/v biases as qwen2vl has)."""

    def __init__(self, d: TextModelDims, qkv_bias: bool = False) -> None:
        super().__init__()
        self.d = d
        e, hd = d.n_embd, d.head_dim
        self.attn_norm = RMSNorm(e, d.rms_eps)
        self.q = nn.Linear(e, d.n_head * hd, bias=qkv_bias)
        self.k = nn.Linear(e, d.n_head_kv * hd, bias=qkv_bias)
        self.v = nn.Linear(e, d.n_head_kv * hd, bias=qkv_bias)
        self.o = nn.Linear(d.n_head * hd, e, bias=False)
        self.ffn_norm = RMSNorm(e, d.rms_eps)
        self.gate = nn.Linear(e, d.n_ff, bias=False)
        self.up = nn.Linear(e, d.n_ff, bias=False)
        self.down = nn.Linear(d.n_ff, e, bias=False)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q and k ([B, H, T, D]) at positions pos (mode NORM)."""
        return rope_norm(q, pos, self.d.rope_theta), rope_norm(k, pos, self.d.rope_theta)

    def forward(self, x: torch.Tensor, pos: object, mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T, E] -> [B, T, E]; pos: what rotate() takes; mask [T, T] bool (True = attend) or None for causal."""
        b, t, e = x.shape
        d = self.d
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, d.n_head, d.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, d.n_head_kv, d.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, d.n_head_kv, d.head_dim).transpose(1, 2)
        q, k = self.rotate(q, k, pos)
        if d.n_head_kv != d.n_head:
            rep = d.n_head // d.n_head_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaText(nn.Module):
    """Llama decoder with tied output."""

    block_type: type[LlamaBlock] = LlamaBlock

    def __init__(self, d: TextModelDims, n_vocab: int) -> None:
        super().__init__()
        self.d = d
        self.embd = nn.Embedding(n_vocab, d.n_embd)
        nn.init.normal_(self.embd.weight, std=0.02)
        self.blocks = nn.ModuleList(self.block_type(d) for _ in range(d.n_layer))
        self.out_norm = RMSNorm(d.n_embd, d.rms_eps)

    def hidden(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings [B, T, E] -> final hidden states (before the output norm)."""
        for blk in self.blocks:
            x = blk(x, pos, mask)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states -> logits over the vocabulary."""
        return self.out_norm(h) @ self.embd.weight.T


def greedy_decode(next_logits, *, max_tokens: int, eos: int, stop: list[int] = ()) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens from next_logits(tokens so far) -> logits, ending at EOS (not returned) or after `stop`;
    also the first step's logits."""
    out: list[int] = []
    first = None
    for _ in range(max_tokens):
        logits = next_logits(out)
        if first is None:
            first = logits
        tok = int(torch.argmax(logits))
        if tok == eos:
            break
        out.append(tok)
        if stop and out[-len(stop):] == list(stop):
            break
    assert first is not None
    return out, first


def gguf_metadata(path: str | os.PathLike) -> tuple[dict, int]:
    """(a GGUF's metadata fields except the tokenizer's, vocabulary size)."""
    import gguf

    r = gguf.GGUFReader(os.fspath(path))
    tokens = r.fields.get("tokenizer.ggml.tokens")
    return ({k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")},
            len(tokens.data) if tokens is not None else 0)


class MirrorVLM(nn.Module):
    """A vision tower + a text model built from dims, residual outputs initialised GPT-2 style (std 0.02 /
    sqrt(2 * depth)); subclasses name the two module types and the depth."""

    vision_type: type[nn.Module]
    text_type: type[nn.Module]

    def residual_depth(self, dims: ShapesVLMDims) -> int:
        """The layer count the residual-output init scales by."""
        return dims.text.n_layer

    def __init__(self, dims: ShapesVLMDims) -> None:
        super().__init__()
        self.dims = dims
        self.vision = self.vision_type(dims.vision)
        self.text = self.text_type(dims.text, dims.n_vocab)
        for name, p in self.named_parameters():
            if name.endswith(("o.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.residual_depth(dims)))


class ShapesVLM(MirrorVLM):
    """Vision tower + projector + llama text model."""

    vision_type = VisionTower
    text_type = LlamaText

    def embed_prompt(self, prefix: torch.Tensor, image: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """[B, P0] tokens, [B, N, E] image embeddings, [B, R] tokens -> [B, P0 + N + R, E]."""
        return torch.cat([self.text.embd(prefix), image, self.text.embd(rest)], dim=1)

    @torch.no_grad()
    def prompt_logits(self, image_rgb: np.ndarray, prefix: list[int], tokens: list[int]) -> torch.Tensor:
        """Next-token logits after [prefix, image, tokens] (one sequence, causal)."""
        img = self.vision(pixels(image_rgb[None]))
        x = self.embed_prompt(torch.tensor([prefix]), img, torch.tensor([tokens], dtype=torch.long))
        pos = torch.arange(x.shape[1])
        return self.text.logits(self.text.hidden(x, pos, None)[:, -1])[0]

    @torch.no_grad()
    def greedy(self, image_rgb: np.ndarray, prefix: list[int], question: list[int], *, max_tokens: int,
               eos: int, stop: list[int] = ()) -> tuple[list[int], torch.Tensor]:
        """Greedy continuation and the first-step logits; ends at EOS (not returned) or after `stop` tokens."""
        img = self.vision(pixels(image_rgb[None]))

        def next_logits(out: list[int]) -> torch.Tensor:
            x = self.embed_prompt(torch.tensor([prefix]), img, torch.tensor([question + out], dtype=torch.long))
            return self.text.logits(self.text.hidden(x, torch.arange(x.shape[1]), None)[:, -1])[0]

        return greedy_decode(next_logits, max_tokens=max_tokens, eos=eos, stop=stop)


# ------------------------------------------------------------------------------------------------------
# GGUF names <-> parameters
# ------------------------------------------------------------------------------------------------------
def _gguf_map(dims: ShapesVLMDims) -> tuple[dict[str, str], dict[str, str]]:
    """(mmproj name -> param name, text GGUF name -> param name)."""
    v: dict[str, str] = {"v.patch_embd.weight": "vision.patch", "v.position_embd.weight": "vision.pos",
                         "v.pre_ln.weight": "vision.pre_ln.weight", "v.pre_ln.bias": "vision.pre_ln.bias"}
    for i in range(dims.vision.n_layer - 1):
        for g, p in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_out", "o"), ("ln1", "ln1"),
                     ("ffn_up", "up"), ("ffn_down", "down"), ("ln2", "ln2")):
            for s in ("weight", "bias"):
                v[f"v.blk.{i}.{g}.{s}"] = f"vision.blocks.{i}.{p}.{s}"
    v.update(projector_map())
    return v, text_gguf_map(dims.text.n_layer)


def projector_map() -> dict[str, str]:
    """mm.0 / mm.2 GGUF names -> the mirrors' parameter names."""
    return {f"{g}.{s}": f"vision.{g.replace('.', '')}.{s}" for g in ("mm.0", "mm.2") for s in ("weight", "bias")}


def text_gguf_map(n_layer: int, qkv_bias: bool = False) -> dict[str, str]:
    """Text GGUF names -> the mirrors' parameter names (llama; qwen2vl adds q/k/v biases)."""
    t: dict[str, str] = {"token_embd.weight": "text.embd.weight", "output_norm.weight": "text.out_norm.weight"}
    for i in range(n_layer):
        for g, p in (("attn_norm", "attn_norm"), ("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"),
                     ("attn_output", "o"), ("ffn_norm", "ffn_norm"), ("ffn_gate", "gate"), ("ffn_up", "up"),
                     ("ffn_down", "down")):
            t[f"blk.{i}.{g}.weight"] = f"text.blocks.{i}.{p}.weight"
        if qkv_bias:
            for g, p in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v")):
                t[f"blk.{i}.{g}.bias"] = f"text.blocks.{i}.{p}.bias"
    return t


def export_weights(model: ShapesVLM) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(mmproj weights incl. the never-run last block, text weights) as float32 numpy in GGUF naming."""
    sd = {k: t.detach().float().numpy() for k, t in model.state_dict().items()}
    vmap, tmap = _gguf_map(model.dims)
    vision = {g: sd[p] for g, p in vmap.items()}
    d = model.dims.vision
    last = d.n_layer - 1  # present in the file, never run by clip.cpp: LLaVA-1.5 convention
    shapes = {"attn_q": (d.n_embd, d.n_embd), "attn_k": (d.n_embd, d.n_embd), "attn_v": (d.n_embd, d.n_embd),
              "attn_out": (d.n_embd, d.n_embd), "ffn_up": (d.n_ff, d.n_embd), "ffn_down": (d.n_embd, d.n_ff)}
    blk = {}
    for g, shp in shapes.items():
        blk[f"v.blk.{last}.{g}.weight"] = np.zeros(shp, np.float32)
        blk[f"v.blk.{last}.{g}.bias"] = np.zeros(shp[0], np.float32)
    for g in ("ln1", "ln2"):
        blk[f"v.blk.{last}.{g}.weight"] = np.ones(d.n_embd, np.float32)
        blk[f"v.blk.{last}.{g}.bias"] = np.zeros(d.n_embd, np.float32)
    mm = {k: vision.pop(k) for k in list(vision) if k.startswith("mm.")}
    vision.update(blk)
    vision.update(mm)
    text = {g: sd[p] for g, p in tmap.items()}
    return vision, text


def load_from_gguf(model_path: str | os.PathLike, mmproj_path: str | os.PathLike,
                   dims: ShapesVLMDims) -> ShapesVLM:
    """A ShapesVLM holding exactly the weights of an exported GGUF pair."""
    model = ShapesVLM(dims)
    vmap, tmap = _gguf_map(dims)
    model.load_state_dict(state_from_gguf(model_path, mmproj_path, vmap, tmap), strict=True)
    return model.eval()


def state_from_gguf(model_path: str | os.PathLike, mmproj_path: str | os.PathLike, vmap: dict[str, str],
                    tmap: dict[str, str]) -> dict[str, torch.Tensor]:
    """A mirror's state dict (float32) from a GGUF pair through its name maps."""
    tw, vw = read_tensors(model_path), read_tensors(mmproj_path)
    sd = {p: torch.from_numpy(np.asarray(vw[g], np.float32)) for g, p in vmap.items()}
    sd.update({p: torch.from_numpy(np.asarray(tw[g], np.float32)) for g, p in tmap.items()})
    return sd


def dims_from_gguf(model_path: str | os.PathLike, mmproj_path: str | os.PathLike, *, arch: str = "llama",
                   family: str = "llava") -> ShapesVLMDims:
    """Rebuild the dims of an exported pair from its metadata (llama + llava, or qwen2vl + qwen25vl)."""
    (t, n_vocab), (v, _) = gguf_metadata(model_path), gguf_metadata(mmproj_path)
    extra_text = ({"rope_sections": tuple(int(x) for x in t[f"{arch}.rope.dimension_sections"])}
                  if f"{arch}.rope.dimension_sections" in t else {})
    text = TextModelDims(arch, n_embd=t[f"{arch}.embedding_length"], n_layer=t[f"{arch}.block_count"],
                         n_head=t[f"{arch}.attention.head_count"], n_head_kv=t[f"{arch}.attention.head_count_kv"],
                         n_ff=t[f"{arch}.feed_forward_length"], n_ctx_train=t[f"{arch}.context_length"],
                         rope_theta=float(t[f"{arch}.rope.freq_base"]),
                         rms_eps=float(np.float32(t[f"{arch}.attention.layer_norm_rms_epsilon"])), **extra_text)
    extra_vision = {"n_wa_pattern": v["clip.vision.n_wa_pattern"]} if "clip.vision.n_wa_pattern" in v else {}
    vision = VisionDims(family, n_embd=v["clip.vision.embedding_length"], n_layer=v["clip.vision.block_count"],
                        n_head=v["clip.vision.attention.head_count"], n_ff=v["clip.vision.feed_forward_length"],
                        patch_size=v["clip.vision.patch_size"], image_size=v["clip.vision.image_size"],
                        proj_dim=v["clip.vision.projection_dim"],
                        eps=float(np.float32(v["clip.vision.attention.layer_norm_epsilon"])), **extra_vision)
    return ShapesVLMDims(vision, text, n_vocab)
