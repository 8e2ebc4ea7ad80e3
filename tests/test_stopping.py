"""Stopping rules of staged self-consistency (stopping.py), without a model: hand-computed posterior
probabilities, a brute-force Polya-urn enumeration and a Monte Carlo simulation as independent oracles."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.stopping import (leader_stays_probability, make_posterior_rule, make_stopping_rule,
                                    make_unanimity_rule, wave_sizes)


def test_wave_sizes():
    assert wave_sizes(7, 3) == [3, 3, 1]
    assert wave_sizes(7, 7) == [7] and wave_sizes(7, 10) == [7] and wave_sizes(2, 5) == [2]
    assert wave_sizes(5, 1) == [1] * 5 and wave_sizes(1, 3) == [1]
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(InvalidArgumentError, match="wave"):
            wave_sizes(7, bad)
    with pytest.raises(InvalidArgumentError, match="k_max"):
        wave_sizes(0, 3)


def test_unanimity_by_hand():
    rule = make_unanimity_rule()
    assert rule(["A", "A", "A"], 7) and rule(["B"], 7) and rule(["A"] * 7, 7)
    assert not rule([], 7)
    assert not rule(["A", "B", "A"], 7)
    assert not rule(["A", "A", None], 7) and not rule([None, None], 7)  # no answer breaks unanimity
    # once two answers were seen it never fires again (ESC's first-wave unanimity)
    assert not rule(["A", "B", "A", "A", "A", "A"], 7)


def test_leader_stays_probability_by_hand():
    # 3 of 3 agree, K=7: urn A (1+3), unseen (1). The leader only loses if the unseen bucket takes all 4 draws:
    # 1*2*3*4 / (5*6*7*8) = 1/70
    assert leader_stays_probability({"A": 3}, 4) == pytest.approx(69 / 70, abs=1e-12)
    # A=2, B=1, K=5: urn A 3, B 2, unseen 1 (6 balls). A stays strictly ahead unless both draws miss A:
    # (3/6) * (4/7) = 2/7
    assert leader_stays_probability({"A": 2, "B": 1}, 2) == pytest.approx(5 / 7, abs=1e-12)
    # A=1, K=3 with one rollout that gave no answer: urn A 2, unseen 1, abstain 1. One draw; the unseen bucket
    # ties the leader (1-1) if drawn -> 3/4; without the abstention the urn is A 2, unseen 1 -> 2/3
    assert leader_stays_probability({"A": 1}, 1, n_abstain=1) == pytest.approx(3 / 4, abs=1e-12)
    assert leader_stays_probability({"A": 1}, 1) == pytest.approx(2 / 3, abs=1e-12)
    # A=1, B=1, one draw: only drawing A (2 of 5 balls) puts the leader strictly ahead
    assert leader_stays_probability({"A": 1, "B": 1}, 1) == pytest.approx(2 / 5, abs=1e-12)
    # prior 2 on every answer: 3 of 3, K=5 -> urn A 5, unseen 2; loses only if both draws are unseen (3 vs 2
    # is still a win, so it never loses): 1
    assert leader_stays_probability({"A": 3}, 2, prior=2.0) == 1.0
    # nothing left to draw: a strict leader stays, a tie does not
    assert leader_stays_probability({"A": 2, "B": 1}, 0) == 1.0
    assert leader_stays_probability({"A": 2, "B": 2}, 0) == 0.0
    assert leader_stays_probability({}, 4) == 0.0 and leader_stays_probability({"A": 0}, 2) == 0.0


def _urn_oracle(counts: list[int], n_abstain: int, r: int, prior: Fraction) -> Fraction:
    """Every sequence of r draws from the Polya urn, with exact rational probabilities (a second, brute-force
    implementation): categories = answers (prior + count), unseen (prior), abstain (n_abstain, never competes)."""
    balls = [prior + c for c in counts] + [prior] + ([Fraction(n_abstain)] if n_abstain else [])
    competing = len(counts) + 1
    lead = counts.index(max(counts))
    total = Fraction(0)
    for seq in itertools.product(range(len(balls)), repeat=r):
        urn = list(balls)
        p = Fraction(1)
        for j in seq:
            p *= urn[j] / sum(urn)
            urn[j] += 1
        final = list(counts) + [0]
        for j in seq:
            if j < competing:
                final[j] += 1
        if all(final[lead] > final[j] for j in range(competing) if j != lead):
            total += p
    return total


@pytest.mark.parametrize("counts,n_abstain,r,prior", [
    ([3], 0, 4, 1), ([2, 1], 0, 4, 1), ([2, 1], 1, 3, 1), ([1, 1, 1], 0, 4, 1), ([4, 2], 0, 1, 1),
    ([2], 2, 5, 1), ([3, 1, 1], 1, 3, Fraction(1, 2)), ([1], 0, 6, 2), ([5, 4, 2], 0, 2, 1), ([2, 2], 0, 3, 1),
])
def test_leader_stays_probability_matches_enumerating_the_urn(counts, n_abstain, r, prior):
    want = _urn_oracle(counts, n_abstain, r, Fraction(prior))
    got = leader_stays_probability({chr(65 + i): c for i, c in enumerate(counts)}, r, n_abstain=n_abstain,
                                   prior=float(prior))
    assert got == pytest.approx(float(want), abs=1e-12)


@pytest.mark.parametrize("counts,n_abstain,r", [([3], 0, 4), ([2, 1], 1, 4), ([3, 2, 1], 0, 8), ([6, 3], 2, 12)])
def test_leader_stays_probability_matches_monte_carlo(counts, n_abstain, r):
    """Simulate the model directly: p ~ Dirichlet(posterior), the remaining answers ~ Multinomial(r, p)."""
    rng = np.random.default_rng(7)
    n = 200_000
    alpha = [1.0 + c for c in counts] + [1.0] + ([float(n_abstain)] if n_abstain else [])
    p = rng.dirichlet(alpha, size=n)
    x = np.array([rng.multinomial(r, pi) for pi in p])
    final = np.array(counts + [0])[None, :] + x[:, :len(counts) + 1]
    wins = (final[:, :1] > final[:, 1:]).all(axis=1).mean()
    exact = leader_stays_probability({chr(65 + i): c for i, c in enumerate(counts)}, r, n_abstain=n_abstain)
    se = math.sqrt(exact * (1 - exact) / n)
    assert abs(wins - exact) < 5 * se + 1e-9
    assert 0.05 < exact < 0.999  # a case that is not decided either way


def test_posterior_rule_decisions():
    # 3 agreeing of K=7 stays the leader with probability 69/70 = 0.9857
    assert make_posterior_rule(0.98)(["A", "A", "A"], 7)
    assert not make_posterior_rule(0.99)(["A", "A", "A"], 7)
    # A=2, B=1 of K=5: 5/7 = 0.714
    assert make_posterior_rule(0.7)(["A", "B", "A"], 5) and not make_posterior_rule(0.72)(["B", "A", "A"], 5)
    # order does not matter, only counts; no answer at all never settles
    r = make_posterior_rule(0.9)
    assert r(["A", "A", "B", "A", "A"], 9) == r(["B", "A", "A", "A", "A"], 9)
    assert not r([None, None, None], 7) and not r([], 7)
    # all K_max voted: a strict leader is final, a tie is not
    assert r(["A", "B", "A"], 3) and not r(["A", "B"], 2)


def test_posterior_rule_is_monotone_in_threshold_and_counts():
    p = [leader_stays_probability({"A": a, "B": 1}, 7 - a - 1) for a in range(1, 6)]
    # more agreement, more certain; A=4 or 5 against B=1 with 2 or 1 rollouts left can no longer lose
    assert p[0] < p[1] < p[2] < p[3] == p[4] == 1.0
    answers = ["A", "A", "B", "A"]
    settled = [make_posterior_rule(t)(answers, 9) for t in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]
    assert settled == sorted(settled, reverse=True)


def test_bad_arguments_are_typed():
    for t in (0, 1, 1.5, -0.1, "0.9", True):
        with pytest.raises(InvalidArgumentError, match="stop_threshold"):
            make_posterior_rule(t)
    with pytest.raises(InvalidArgumentError, match="prior"):
        make_posterior_rule(0.9, prior=0)
    with pytest.raises(InvalidArgumentError, match="stopping"):
        make_stopping_rule("sometimes")
    with pytest.raises(InvalidArgumentError, match="counts"):
        leader_stays_probability({"A": -1}, 2)
    with pytest.raises(InvalidArgumentError, match="n_remaining"):
        leader_stays_probability({"A": 1}, -2)
    with pytest.raises(InvalidArgumentError, match="k_max"):
        make_unanimity_rule()(["A"], 0)
    custom = lambda answers, k_max: len(answers) >= 2  # noqa: E731
    assert make_stopping_rule(custom) is custom
    assert make_stopping_rule("unanimity")(["A", "A"], 5) and make_stopping_rule("posterior", 0.5)(["A", "A"], 5)
