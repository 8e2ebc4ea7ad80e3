"""Stopping rules for staged self-consistency: after each wave of rollouts, is the vote settled?

A staged run (``mode="staged"``) decodes its K_max rollouts in waves from one shared prefill; after a wave has
finished, a stopping rule looks at the answers so far and says whether to stop (the vote is settled) or to fork
the next wave. Everything here is pure: a rule is a small callable built by a factory (``make_*``), tested
without a model.

A rule is called as ``rule(answers, k_max)``: ``answers`` are the normalised answers of the finished rollouts in
rollout order (None: the rollout gave no answer), ``k_max`` the number of rollouts a full run would vote on. It
returns True when the vote is settled.

- ``make_unanimity_rule()``: ESC-style (Li et al. 2024, "Escape Sky-high Cost: Early-stopping Self-Consistency"):
  stop when every rollout so far gave the same answer. Checked after the first wave, this is "the first wave is
  unanimous"; once two answers have been seen it never fires again, so the run goes on to K_max.
- ``make_posterior_rule(threshold)``: Adaptive-Consistency style (Aggarwal et al. 2023): with a Dirichlet
  posterior on the answer distribution, stop when the probability that the current leader is still the strict
  majority winner once all K_max rollouts have voted exceeds ``threshold`` (``leader_stays_probability``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Mapping, Optional, Sequence

from .errors import InvalidArgumentError

__all__ = ["STOPPING_RULES", "StoppingRule", "leader_stays_probability", "make_posterior_rule",
           "make_stopping_rule", "make_unanimity_rule", "wave_sizes"]

# rule(answers of the finished rollouts, k_max) -> the vote is settled
StoppingRule = Callable[[Sequence[Optional[str]], int], bool]

STOPPING_RULES = ("posterior", "unanimity")


def _check_k_max(k_max: object) -> int:
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise InvalidArgumentError(f"k_max must be an int >= 1, got {k_max!r}")
    return k_max


def wave_sizes(k_max: int, wave: int) -> list[int]:
    """How many rollouts each wave decodes: waves of `wave` until K_max (the last may be smaller).
    wave_sizes(7, 3) == [3, 3, 1]."""
    _check_k_max(k_max)
    if isinstance(wave, bool) or not isinstance(wave, int) or wave < 1:
        raise InvalidArgumentError(f"wave (rollouts per wave) must be an int >= 1, got {wave!r}")
    return [min(wave, k_max - start) for start in range(0, k_max, wave)]


def make_unanimity_rule() -> StoppingRule:
    """Settled when at least one rollout has finished and all finished rollouts gave the same (non-None) answer
    (a rollout without an answer breaks unanimity)."""

    def unanimous(answers: Sequence[Optional[str]], k_max: int) -> bool:
        _check_k_max(k_max)
        return len(answers) > 0 and answers[0] is not None and all(a == answers[0] for a in answers)

    return unanimous


def _log_rising(a: float, n: int) -> float:
    """log of the rising factorial a (a+1) ... (a+n-1) for a > 0."""
    return math.lgamma(a + n) - math.lgamma(a)


def leader_stays_probability(counts: Mapping[str, int], n_remaining: int, *, n_abstain: int = 0,
                             prior: float = 1.0) -> float:
    """P(the current leader ends strictly ahead of every other answer after n_remaining more rollouts).

    Model: the answers of the remaining rollouts are i.i.d. draws from an unknown distribution p over the answers
    seen so far, one bucket standing for every answer not seen yet, and "no answer" (only when some rollout gave
    none); p has the posterior Dirichlet(prior + count) over the answers and the unseen bucket (prior + 0), and
    Dirichlet(n_abstain) over "no answer". The remaining draws are then Dirichlet-multinomial (a Polya urn).
    Treating all unseen answers as one competitor overstates their chance, so the probability is conservative.
    Ties count as not staying ahead (the tie-break may pick the other answer), as in can_be_overtaken.

    The leader is the answer with the highest count (ties: the first in `counts`); with no votes the result is 0.
    Exact: a convolution over the answers for each number of draws the leader gets, O(m r^3) for m answers and
    r remaining rollouts."""
    if isinstance(n_remaining, bool) or not isinstance(n_remaining, int) or n_remaining < 0:
        raise InvalidArgumentError(f"n_remaining must be an int >= 0, got {n_remaining!r}")
    if isinstance(n_abstain, bool) or not isinstance(n_abstain, int) or n_abstain < 0:
        raise InvalidArgumentError(f"n_abstain must be an int >= 0, got {n_abstain!r}")
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not (prior > 0 and math.isfinite(prior)):
        raise InvalidArgumentError(f"prior must be a finite number > 0, got {prior!r}")
    values = []
    for key, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidArgumentError(f"counts[{key!r}] must be an int >= 0, got {v!r}")
        values.append(v)
    if not values or max(values) == 0:
        return 0.0
    lead = values.index(max(values))
    c0 = values[lead]
    rivals = [v for i, v in enumerate(values) if i != lead] + [0]  # + the unseen-answers bucket
    r = n_remaining
    # per-category weights w(x) = rising(a, x) / x!, so that P(x_0..x_m) = r! / rising(A, r) * prod w_j(x_j)
    def weights(a: float) -> list[float]:
        return [math.exp(_log_rising(a, x) - math.lgamma(x + 1)) for x in range(r + 1)]

    a_lead = prior + c0
    a_rivals = [prior + c for c in rivals]
    total = a_lead + sum(a_rivals) + n_abstain
    w_lead = weights(a_lead)
    w_rivals = [weights(a) for a in a_rivals]
    w_abstain = weights(float(n_abstain)) if n_abstain > 0 else [1.0] + [0.0] * r
    norm = math.exp(math.lgamma(r + 1) - _log_rising(total, r))
    p = 0.0
    for x0 in range(r + 1):
        final = c0 + x0
        # ways[n]: summed weight of giving n draws to the categories so far, every rival staying below `final`
        ways = list(w_abstain)
        for c, w in zip(rivals, w_rivals):
            cap = final - c - 1  # this rival may get at most cap more draws
            if cap < 0:
                ways = []
                break
            ways = [sum(ways[n - x] * w[x] for x in range(min(cap, n) + 1)) for n in range(r + 1)]
        if ways:
            p += w_lead[x0] * ways[r - x0]
    return min(1.0, max(0.0, norm * p))


def make_posterior_rule(threshold: float = 0.95, *, prior: float = 1.0) -> StoppingRule:
    """Settled when leader_stays_probability(counts so far, K_max - finished) > threshold.
    threshold in (0, 1); prior: the Dirichlet pseudo-count of each answer (1: uniform, as Adaptive-Consistency)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise InvalidArgumentError(f"stop_threshold must be a number in (0, 1), got {threshold!r}")
    leader_stays_probability({}, 0, prior=prior)  # validates prior now

    def settled(answers: Sequence[Optional[str]], k_max: int) -> bool:
        _check_k_max(k_max)
        counts = Counter(a for a in answers if a is not None)
        if not counts:
            return False
        n_abstain = sum(a is None for a in answers)
        remaining = max(0, k_max - len(answers))
        ordered = dict(counts.most_common())
        return leader_stays_probability(ordered, remaining, n_abstain=n_abstain, prior=prior) > threshold

    return settled


def make_stopping_rule(rule: str | StoppingRule = "posterior", threshold: float = 0.95) -> StoppingRule:
    """A rule by name ("posterior" with `threshold`, or "unanimity"), or a callable passed through."""
    if callable(rule):
        return rule
    if rule == "posterior":
        return make_posterior_rule(threshold)
    if rule == "unanimity":
        return make_unanimity_rule()
    raise InvalidArgumentError(f"stopping must be one of {STOPPING_RULES} or a callable, got {rule!r}")
