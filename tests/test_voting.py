"""Tests for avis_llamacpp.voting: extraction, normalisation, majority vote, early stopping."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.voting import (
    ANSWER_PROMPT_SUFFIX,
    VoteResult,
    can_be_overtaken,
    extract_answer,
    majority_vote,
    normalize_answer,
)

OPTS4 = ["a cat", "a dog", "a bird", "a fish"]

# --------------------------------------------------------------------------- #
# extract_answer
# --------------------------------------------------------------------------- #

EXTRACT_CASES = [
    # (text, options, expected)
    ("<think>Maybe A? No.</think><answer>B</answer>", None, "B"),
    ("<think>\nThe image shows a dog.\n</think>\n<answer> (C) </answer>", OPTS4, "(C)"),
    ("<think>x</think><answer>\nB\n</answer>\n", OPTS4, "B"),
    ("<answer><answer>B</answer></answer>", None, "B"),
    ("<answer>B</answer></answer>", None, "B"),
    ("<answer>A</answer> wait, let me re-check. <answer>D</answer>", OPTS4, "D"),
    ("<ANSWER>b</ANSWER>", None, "b"),
    ("<Answer>42</Answer>", None, "42"),
    ("<think>x</think><answer>  42 apples\nsecond line", None, "42 apples"),
    ("<answer>A</answer> then <answer>C", OPTS4, "A"),  # a complete pair wins
    ("<answer></answer> The answer is C.", OPTS4, "C"),  # empty tag falls through
    ("<answer>The answer is (B).</answer>", OPTS4, "(B)"),
    ("<answer>two</answer>", None, "two"),
    ("<answer>3.14</answer> and 7", None, "3.14"),
    ("The answer is (C).", OPTS4, "(C)"),
    ("The answer is (C).", None, "(C)"),
    ("Answer: 12.5", None, "12.5"),
    ("The answer is:\n\n(B) a dog\n\nThat is all.", OPTS4, "(B) a dog"),
    ("The answer is \\boxed{B}.", OPTS4, "B"),
    ("So the final answer is **B**.", OPTS4, "B"),
    ("**Final Answer:** 7", None, "7"),
    ("the answer is A. Hmm, actually the answer is D, since", OPTS4, "D"),
    ("<think>the answer is A</think> The answer is B", OPTS4, "B"),
    ("<think>so the answer is A</think>\n\n42", None, "42"),  # post-think text first
    ("<think>so the answer is A</think>", OPTS4, "A"),  # nothing after </think>
    ("Therefore \\boxed{12} is it", None, "12"),
    ("I think it's B because the dog is bigger", OPTS4, "B"),
    ("I think it's B because the dog is bigger", None, None),  # letters only with options
    ("C is wrong, so A", ["x", "y"], "A"),  # only A-B admissible
    ("It is C", ["x", "y"], None),
    ("There are 3 cats and 4 dogs, total 7 animals", None, "7"),
    ("The temperature dropped to -3.5 degrees", None, "-3.5"),
    ("about 1,000 people", None, "1,000"),
    ("no answer here", None, None),
    ("", None, None),
    ("<answer>", None, None),
    ("</answer>", None, None),
    ("</answer> 5 <answer>", None, "5"),
]


@pytest.mark.parametrize("text, options, expected", EXTRACT_CASES)
def test_extract_answer_table(text, options, expected):
    assert extract_answer(text, options) == expected


def test_extract_then_normalize_realistic_rollouts():
    outs = [
        "<think>The animal has whiskers.</think><answer>A</answer>",
        "<think>Whiskers... a cat.</think><answer>(A) a cat</answer>",
        "<think>hmm</think><answer>a cat</answer>",
        "<think>hmm</think>The answer is (a).",
        "<think>hmm</think><answer>B.</answer>",
        "<think>truncated reasoning that never finish",
    ]
    got = [extract_answer(t, OPTS4) for t in outs]
    norm = [normalize_answer(a, OPTS4) if a is not None else None for a in got]
    assert norm == ["A", "A", "A", "A", "B", None]


def test_extract_rejects_non_str():
    with pytest.raises(InvalidArgumentError, match="text"):
        extract_answer(None)  # type: ignore[arg-type]


MB = 1_000_000
ADVERSARIAL = [
    "<answer>" * (MB // 8),
    "</answer>" * (MB // 9),
    "<answer>" + "a" * MB,
    "<answer>" + " " * MB + "</answer>" * 50_000,
    "<answer>" * 60_000 + "</answer>" * 60_000,
    "answer is " * (MB // 10),
    "answer" + " " * MB + "is",
    "answer" + "*" * MB,
    "Answer:" * (MB // 7),
    "9" * MB,
    "1," * (MB // 2),
    "-." * (MB // 2),
    " " * MB + "A",
    "(" * MB,
    "<" * MB,
    "\\boxed{" * (MB // 7),
    "</think>" * (MB // 8),
    "A " * (MB // 2),
    "é<answer>İ" * (MB // 10),
    "<think>" + "x" * MB + "</think>" + " " * MB,
]


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


@pytest.mark.parametrize("i", range(len(ADVERSARIAL)))
def test_adversarial_inputs_are_linear_time(i):
    text = ADVERSARIAL[i]
    ans, t1 = _timed(extract_answer, text, OPTS4)
    _, t2 = _timed(extract_answer, text)
    _, t3 = _timed(normalize_answer, text, OPTS4)
    t4 = 0.0
    if ans is not None:
        _, t4 = _timed(normalize_answer, ans, OPTS4)
    # ~1 MB inputs run in milliseconds when linear; a quadratic or backtracking regex takes minutes. The bound is
    # a wide margin for a loaded CI machine, not a speed goal (those live in benchmarks/)
    assert max(t1, t2, t3, t4) < 20.0, (t1, t2, t3, t4)


def test_adversarial_scaling_is_linear():
    # Doubling the input must not quadruple the time (quadratic blow-up check).
    pieces = ["answer is (", "<answer>", "</answer>", "1,", " A", "\\boxed{"]
    small = "".join(pieces) * 20_000
    big = small * 4
    # best of 3 each, so a burst of load on a shared machine does not decide it
    t_small = min(_timed(extract_answer, small, OPTS4)[1] for _ in range(3))
    t_big = min(_timed(extract_answer, big, OPTS4)[1] for _ in range(3))
    assert t_big < 12 * t_small + 0.05


# --------------------------------------------------------------------------- #
# normalize_answer
# --------------------------------------------------------------------------- #

NORMALIZE_NO_OPTIONS = [
    ("B", "b"),
    ("  Hello   World  ", "hello world"),
    ("'cat'.", "cat"),
    ("**cat**", "cat"),
    ("2", "2"),
    ("2.0", "2"),
    ("+2", "2"),
    ("two", "2"),
    ("Two.", "2"),
    ("twenty", "20"),
    ("zero", "0"),
    ("-3", "-3"),
    ("(-3)", "-3"),
    ("-0.0", "0"),
    ("007", "7"),
    ("2.50", "2.5"),
    (".5", "0.5"),
    ("5.", "5"),
    ("1,000", "1000"),
    ("$12", "12"),
    ("3.", "3"),
    ("ＡＢＣ", "abc"),  # NFKC full-width
    ("Straße", "strasse"),  # case-fold
    ("twenty-one", "twenty-one"),  # only whole words zero..twenty
    ("", ""),
    ("...", ""),
]


@pytest.mark.parametrize("ans, expected", NORMALIZE_NO_OPTIONS)
def test_normalize_without_options(ans, expected):
    assert normalize_answer(ans) == expected


NORMALIZE_WITH_OPTIONS = [
    ("(B)", OPTS4, "B"),
    ("B.", OPTS4, "B"),
    ("b)", OPTS4, "B"),
    ("b", OPTS4, "B"),
    (" [C] ", OPTS4, "C"),
    ("A dog", OPTS4, "B"),  # option text -> its letter
    ("a Fish.", OPTS4, "D"),
    ("(B) a dog", OPTS4, "B"),
    ("C. whatever", OPTS4, "C"),
    ("E", OPTS4, "e"),  # beyond the options: not a letter
    ("E", OPTS4 + ["a cow"], "E"),
    ("2", ["1", "2", "3"], "B"),
    ("two", ["1", "2", "3"], "B"),
    ("2.0", ["1", "2.00", "3"], "B"),
    ("cat", ["A. cat", "B. dog"], "A"),  # option text carrying its own marker
    ("dog", ["(A) cat", "(B) dog"], "B"),
    ("horse", OPTS4, "horse"),
    ("A", [], "A"),  # empty options -> A-D
]


@pytest.mark.parametrize("ans, options, expected", NORMALIZE_WITH_OPTIONS)
def test_normalize_with_options(ans, options, expected):
    assert normalize_answer(ans, options) == expected


def test_normalize_idempotent_examples():
    for ans, _ in NORMALIZE_NO_OPTIONS:
        once = normalize_answer(ans)
        assert normalize_answer(once) == once
    for ans, opts, _ in NORMALIZE_WITH_OPTIONS:
        once = normalize_answer(ans, opts)
        assert normalize_answer(once, opts) == once


def test_normalize_rejects_non_str():
    with pytest.raises(InvalidArgumentError, match="ans"):
        normalize_answer(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# majority_vote
# --------------------------------------------------------------------------- #


def test_simple_majority_and_none_abstains():
    r = majority_vote(["A", None, "B", "A", None], [-1.0, -0.1, -0.2, -0.5, -0.1])
    assert r == VoteResult(winner="A", counts={"A": 2, "B": 1}, winner_index=3, n_valid=3)


def test_all_none():
    r = majority_vote([None, None], [-1.0, -2.0])
    assert r.winner is None and r.counts == {} and r.winner_index is None and r.n_valid == 0
    r = majority_vote([], [])
    assert r.winner is None and r.n_valid == 0


def test_tie_broken_by_mean_logprob():
    r = majority_vote(["A", "B", "A", "B"], [-1.0, -0.5, -1.0, -0.6])
    assert r.winner == "B" and r.winner_index == 1
    assert list(r.counts) == ["B", "A"]


def test_tie_mean_over_tied_rollouts_not_max():
    # A has the single best rollout, but B has the better mean.
    r = majority_vote(["A", "A", "B", "B"], [-0.1, -3.0, -0.5, -0.6])
    assert r.winner == "B" and r.winner_index == 2


def test_tie_equal_logprob_falls_back_to_lexicographic():
    r = majority_vote(["b", "a", "c"], [-1.0, -1.0, -1.0])
    assert r.winner == "a" and list(r.counts) == ["a", "b", "c"] and r.winner_index == 1


def test_winner_index_first_among_equal_logprobs():
    r = majority_vote(["X", "Y", "X", "X"], [-0.3, 0.0, -0.2, -0.2])
    assert r.winner == "X" and r.winner_index == 2


def test_counts_ordered_by_count_desc():
    r = majority_vote(list("ABBCCCD"), [-1.0] * 7)
    assert list(r.counts.items()) == [("C", 3), ("B", 2), ("A", 1), ("D", 1)]
    assert r.n_valid == 7


def test_nan_logprob_is_worst():
    r = majority_vote(["A", "B"], [float("nan"), -5.0])
    assert r.winner == "B"
    r = majority_vote(["A", "A"], [float("nan"), -5.0])
    assert r.winner_index == 1
    r = majority_vote(["A", "B"], [-math.inf, -math.inf])
    assert r.winner == "A"


def test_vote_invalid_args():
    with pytest.raises(InvalidArgumentError, match="equal length"):
        majority_vote(["A"], [])
    with pytest.raises(InvalidArgumentError, match="answers"):
        majority_vote([3], [0.0])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="mean_logprobs"):
        majority_vote(["A"], ["x"])  # type: ignore[list-item]


# --------------------------------------------------------------------------- #
# can_be_overtaken
# --------------------------------------------------------------------------- #

OVERTAKE_CASES = [
    ({}, 0, True),
    ({}, 3, True),
    ({"A": 1}, 0, False),
    ({"A": 3}, 2, False),  # a brand-new answer could reach only 2
    ({"A": 3}, 3, True),  # ... or tie at 3
    ({"A": 3, "B": 1}, 1, False),  # 3 > 1 + 1
    ({"A": 3, "B": 1}, 2, True),  # B could tie at 3 and win the tie-break
    ({"A": 2, "B": 2}, 0, True),  # already tied
    ({"A": 5, "B": 0}, 4, False),
    ({"A": 4, "B": 2, "C": 1}, 1, False),
    ({"A": 4, "B": 2, "C": 1}, 2, True),
]


@pytest.mark.parametrize("counts, n_remaining, expected", OVERTAKE_CASES)
def test_can_be_overtaken_table(counts, n_remaining, expected):
    assert can_be_overtaken(counts, n_remaining) is expected


def test_can_be_overtaken_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    assert can_be_overtaken({"A": np.int64(3)}, np.int32(2)) is False


def test_can_be_overtaken_invalid():
    with pytest.raises(InvalidArgumentError, match="n_remaining"):
        can_be_overtaken({"A": 1}, -1)
    with pytest.raises(InvalidArgumentError, match="n_remaining"):
        can_be_overtaken({"A": 1}, 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="counts"):
        can_be_overtaken({"A": -1}, 1)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["A", "B", "C", None]), st.sampled_from([-2.0, -1.0, -0.5, -0.1])),
        min_size=0,
        max_size=12,
    )
)
def test_early_stop_never_changes_winner(rollouts):
    answers = [a for a, _ in rollouts]
    lps = [lp for _, lp in rollouts]
    full = majority_vote(answers, lps)
    n = len(rollouts)
    counts: dict[str, int] = {}
    stop_at = n
    for i, a in enumerate(answers):
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
        if not can_be_overtaken(counts, n - i - 1):
            stop_at = i + 1
            break
    early = majority_vote(answers[:stop_at], lps[:stop_at])
    assert early.winner == full.winner
    if stop_at < n:
        assert counts[early.winner] > max([c for k, c in counts.items() if k != early.winner] + [0])


def test_prompt_suffix():
    assert ANSWER_PROMPT_SUFFIX == (
        "First output the thinking process in <think> </think> tags and then output the final "
        "answer in <answer> </answer> tags."
    )
