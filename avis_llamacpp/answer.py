"""What one query returns: the voted answer, the chosen rollout's text, what was kept, timings and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .flops import TextDims, relative_flops
from .options import QuerySettings
from .prefill import PrefillResult
from .rollouts import Rollout
from .voting import extract_answer, majority_vote, normalize_answer


@dataclass
class Answer:
    """The result of one query.

    `text` is the chosen rollout's full text (the vanilla answer when K = 1); `answer` the voted, normalised
    answer extracted from the rollouts (None when none had one)."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int  # KV-cache cells used by the prompt (text + kept image tokens)
    image_tokens: list[int]  # per image, before pruning
    kept_tokens: list[int]  # per image, after pruning
    timings: dict[str, float] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)  # per image: grid, kept indices, KDV summary
    rollouts: list[Rollout] = field(default_factory=list, repr=False)
    answer: str | None = None
    votes: dict[str, int] = field(default_factory=dict)
    k: int = 1
    mode: str = "parallel"
    flops: dict[str, float] = field(default_factory=dict)
    early_stopped: int = 0  # rollouts cancelled because the vote was decided
    # decode tokens early stopping saved, estimated: each cancelled rollout would have run as long as the mean
    # finished one (or as far as it already got); exact when every rollout runs to max_tokens
    tokens_saved: int = 0
    features: np.ndarray | None = field(default=None, repr=False)  # see features.py
    p_hat: float | None = None  # the policy's predicted solvability, when a policy chose K
    # staged mode: rollouts of K never started because the stopping rule settled the vote (exact), and waves run
    rollouts_saved: int = 0
    waves: int = 0
    # prefix cache: whether the prompt's start came from an earlier prompt's KV, and how many cells were reused
    prefix_reused: bool = False
    tokens_skipped: int = 0
    # video: how its frames were sampled (fps, frame count, timestamps, size, source fps / duration)
    video: dict[str, Any] | None = None

    @property
    def decode_tokens(self) -> list[int]:
        return [len(r.tokens) for r in self.rollouts]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (kept indices omitted)."""
        return {"answer": self.answer, "votes": self.votes, "text": self.text, "tokens": self.tokens,
                "finish_reason": self.finish_reason, "k": self.k, "mode": self.mode,
                "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
                "kept_tokens": self.kept_tokens, "decode_tokens": self.decode_tokens,
                "early_stopped": self.early_stopped,
                "tokens_saved": self.tokens_saved, "rollouts_saved": self.rollouts_saved, "waves": self.waves,
                "prefix_reused": self.prefix_reused, "tokens_skipped": self.tokens_skipped,
                "p_hat": self.p_hat, "timings": self.timings,
                "flops": self.flops, "video": self.video,
                "images": [{k: v for k, v in im.items() if k != "kept"} for im in self.images],
                "rollouts": [{"text": r.text, "tokens": r.tokens, "mean_logprob": r.mean_logprob,
                              "finish_reason": r.finish_reason, "seed": r.seed} for r in self.rollouts]}


def estimate_tokens_saved(rollouts: Sequence[Rollout]) -> int:
    """Decode tokens early stopping saved: a cancelled rollout is assumed to have needed as many tokens as the
    finished rollouts on average (at least what it had already decoded). Exact when all run to max_tokens."""
    finished = [len(r.tokens) for r in rollouts if r.finish_reason != "early_stop"]
    if not finished:
        return 0
    typical = round(float(np.mean(finished)))
    return sum(max(0, typical - len(r.tokens)) for r in rollouts if r.finish_reason == "early_stop")


def normalised_answers(rollouts: Sequence[Rollout], options: Sequence[str] | None) -> list[str | None]:
    """Each rollout's extracted, normalised answer (None for cancelled rollouts and those without one)."""
    out = []
    for r in rollouts:
        a = extract_answer(r.text, options) if r.finish_reason != "early_stop" else None
        out.append(normalize_answer(a, options) if a is not None else None)
    return out


def build_answer(pre: PrefillResult, rollouts: list[Rollout], q: QuerySettings, k: int, *, text_dims: TextDims,
                 encoder_flops: Callable[[int], float], timings: dict[str, float],
                 features: np.ndarray | None = None, p_hat: float | None = None, n_waves: int = 0) -> Answer:
    """The Answer: the vote over the rollouts' normalised answers, the chosen text, FLOPs, savings.
    encoder_flops(n_tokens): one image chunk's vision-encoder FLOPs."""
    images = [im.record(with_fraction=True) for im in pre.images]
    answers = normalised_answers(rollouts, q.options)
    vote = majority_vote(answers, [r.mean_logprob for r in rollouts])
    best = rollouts[vote.winner_index] if vote.winner is not None else rollouts[0]
    n_pruned = sum(im.n_tokens - im.n_kept for im in pre.images)
    generated = [len(r.tokens) for r in rollouts if r.finish_reason != "early_stop"] or [0]
    flops = relative_flops(text_dims, n_prompt_kv=pre.n_kv, n_prompt_kv_vanilla=pre.n_kv + n_pruned,
                           generated=generated, vanilla_generated=round(float(np.mean(generated))),
                           encoder=sum(encoder_flops(im.n_tokens) for im in pre.images))
    ans = Answer(text=best.text, tokens=best.tokens, finish_reason=best.finish_reason, prompt_tokens=pre.n_kv,
                 image_tokens=[im.n_tokens for im in pre.images], kept_tokens=[im.n_kept for im in pre.images],
                 timings={"encode_s": pre.encode_s, "prefill_s": pre.prefill_s, **timings},
                 images=images, rollouts=rollouts, answer=vote.winner, votes=dict(vote.counts), k=k,
                 mode=q.mode, flops=flops, early_stopped=sum(r.finish_reason == "early_stop" for r in rollouts),
                 tokens_saved=estimate_tokens_saved(rollouts), features=features, p_hat=p_hat,
                 prefix_reused=pre.n_reused > 0, tokens_skipped=pre.n_reused)
    if q.mode == "staged":
        ans.rollouts_saved, ans.waves = k - len(rollouts), n_waves
        ran = [len(r.tokens) for r in rollouts if r.finish_reason != "early_stop"]
        # rollouts never started are estimated like cancelled ones (exact when all run to max_tokens)
        ans.tokens_saved += round(float(np.mean(ran))) * ans.rollouts_saved if ran else 0
    return ans
