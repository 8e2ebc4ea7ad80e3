"""Compute accounting from model dimensions and token counts (pure Python): forward-pass FLOPs of the
vision encoder, the prefill and the decode, so runs can be compared as the paper does, normalised to the
vanilla run (nothing pruned, K = 1). Counts multiply-adds as 2 FLOPs; norms, activations and softmax are
ignored (a few percent at these sizes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextDims:
    """What the text model's FLOPs depend on."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int

    @property
    def params_per_token(self) -> int:
        """Weights every token multiplies through (attention projections + gated FFN), all layers."""
        kv_dim = self.n_embd // self.n_head * self.n_head_kv
        return self.n_layer * (2 * self.n_embd * self.n_embd + 2 * self.n_embd * kv_dim + 3 * self.n_embd * self.n_ff)


@dataclass(frozen=True)
class VisionDims:
    """What the vision encoder's FLOPs depend on (per image: n_patches rows through n_layer_run blocks)."""

    n_layer_run: int
    n_embd: int
    n_ff: int
    gated_ffn: bool = False
    window_rows: int = 0  # rows a windowed block attends to (0: every block attends over the whole image)
    full_every: int = 0  # with windows: every full_every-th block (1-based) attends over the whole image

    def attended_rows(self, il: int, n_patches: int) -> int:
        """Rows block il attends to: the whole image, or one window (windows taken as full)."""
        if self.window_rows <= 0 or (self.full_every > 0 and (il + 1) % self.full_every == 0):
            return n_patches
        return min(self.window_rows, n_patches)


def token_flops(d: TextDims, context: int, logits: bool) -> float:
    """One token through the text model attending to `context` earlier tokens (plus itself)."""
    attn = 4 * d.n_layer * (context + 1) * d.n_embd  # QK^T and AV
    head = 2 * d.n_embd * d.n_vocab if logits else 0
    return 2 * d.params_per_token + attn + head


def prefill_flops(d: TextDims, n_tokens: int, start: int = 0) -> float:
    """A prompt of n_tokens decoded after `start` cached tokens, logits for the last one only."""
    n = n_tokens
    params = 2 * d.params_per_token * n
    attn = 4 * d.n_layer * d.n_embd * (n * start + n * (n + 1) / 2)
    return params + attn + 2 * d.n_embd * d.n_vocab


def decode_flops(d: TextDims, n_prompt: int, n_generated: int) -> float:
    """n_generated tokens, one at a time, after an n_prompt-token prompt, each producing logits."""
    n = n_generated
    params = (2 * d.params_per_token + 2 * d.n_embd * d.n_vocab) * n
    attn = 4 * d.n_layer * d.n_embd * (n * n_prompt + n * (n + 1) / 2)
    return params + attn


def encoder_flops(v: VisionDims, n_patches: int) -> float:
    """One image through the vision blocks the graph runs; a windowed block attends inside its window
    (Qwen2.5-VL: 112 px windows, full attention every n_wa_pattern-th block)."""
    per_row = 2 * (4 * v.n_embd * v.n_embd + (3 if v.gated_ffn else 2) * v.n_embd * v.n_ff)
    return sum(n_patches * (per_row + 4 * v.attended_rows(il, n_patches) * v.n_embd) for il in range(v.n_layer_run))


def run_flops(d: TextDims, *, n_prompt_kv: int, generated: list[int], encoder: float = 0.0,
              shared_prefill: bool = True) -> dict[str, float]:
    """FLOPs of one query: encoder + prefill of n_prompt_kv tokens + each rollout's decode. With
    shared_prefill=False every rollout pays the prefill (what K independent stock calls cost)."""
    pre = prefill_flops(d, n_prompt_kv)
    n_prefills = 1 if shared_prefill else max(1, len(generated))
    dec = sum(decode_flops(d, n_prompt_kv, g) for g in generated)
    enc = encoder * n_prefills
    return {"encoder": enc, "prefill": pre * n_prefills, "decode": dec, "total": enc + pre * n_prefills + dec}


def relative_flops(d: TextDims, *, n_prompt_kv: int, n_prompt_kv_vanilla: int, generated: list[int],
                   vanilla_generated: int, encoder: float = 0.0) -> dict[str, float]:
    """This run's FLOPs over the vanilla run's (nothing pruned, one rollout of vanilla_generated tokens)."""
    ours = run_flops(d, n_prompt_kv=n_prompt_kv, generated=generated, encoder=encoder)
    base = run_flops(d, n_prompt_kv=n_prompt_kv_vanilla, generated=[vanilla_generated], encoder=encoder)
    return {"total": ours["total"] / base["total"], "prefill": ours["prefill"] / base["total"],
            "decode": ours["decode"] / base["total"], "encoder": ours["encoder"] / base["total"],
            "vanilla_total": base["total"], "ours_total": ours["total"]}
