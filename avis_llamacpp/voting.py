"""Answer extraction, normalisation and majority voting for AVIS self-consistency rollouts.

Everything here is pure Python and linear-time in the input length: tag
search uses ``str.find``/``str.rfind`` and the few regular expressions have
bounded repetition, so adversarial megabyte outputs cannot trigger
catastrophic backtracking.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from .errors import InvalidArgumentError

__all__ = [
    "ANSWER_PROMPT_SUFFIX",
    "VoteResult",
    "can_be_overtaken",
    "extract_answer",
    "majority_vote",
    "normalize_answer",
]

ANSWER_PROMPT_SUFFIX = (
    "First output the thinking process in <think> </think> tags and then output the final "
    "answer in <answer> </answer> tags."
)

_OPEN = "<answer>"
_CLOSE = "</answer>"
_THINK_CLOSE = "</think>"

# ASCII-only lower-casing keeps string indices aligned with the original text
# (str.lower() can change the length of some non-ASCII strings).
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# "answer is X", "answer: X", "Answer is: X", "final answer is **X**"; bounded gaps only.
_ANSWER_IS_RE = re.compile(r"\banswer\b[ \t*]{0,8}(?:is\b[ \t]{0,8}:?|:)[ \t]{0,8}", re.I)
_MAX_CLAUSE = 200
_TAG_START_RE = re.compile(r"</?[A-Za-z]")
_TAG_RE = re.compile(r"</?answer>", re.I | re.A)
_BOXED = "\\boxed{"
_SENTENCE_END_RE = re.compile(r"[.!?;,](?:\s|$)")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_NUMBER_FULL_RE = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)")
# A capital letter not glued to other letters/digits, e.g. "(B)", "B.", "is C".
_LETTER_RE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
# Leading option marker followed by text: "(B) cat", "B. cat", "b) cat", "B: cat".
_MARKER_RE = re.compile(r"^\(?([a-z])(?:\)|\.|:|\)\.)\s+\S")
_MAX_NUMBER_CHARS = 400

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}

# Characters stripped from the ends before number detection (signs and inner dots survive).
_NUM_LEAD_STRIP = " \t\n([{\"'`*$"
_NUM_TRAIL_STRIP = " \t\n)]}\"'`*$.,;:!?"
_EXTRA_STRIP = set("$*`^|~+=<>")


# --------------------------------------------------------------------------- #
# extraction
# --------------------------------------------------------------------------- #


def _letter_range(options: Optional[Sequence[str]]) -> str:
    """Admissible option letters: A..(A + len(options) - 1), or A-D without (non-empty) options."""
    n = len(options) if options else 4
    return "".join(chr(ord("A") + i) for i in range(max(1, min(n, 26))))


def _strip_tags(s: str) -> str:
    """Remove stray <answer>/</answer> tags (any ASCII case) from a snippet."""
    return _TAG_RE.sub("", s)


def _clean_clause(s: str) -> str:
    """Trim a captured 'answer is ...' clause at a tag, line or sentence end and strip markup."""
    s = s.split("\n", 1)[0]
    m = _TAG_START_RE.search(s)
    if m:
        s = s[: m.start()]
    m = _SENTENCE_END_RE.search(s)
    if m:
        s = s[: m.start()]
    return s.strip().strip("*").strip()


def _answer_is(region: str) -> Optional[str]:
    """Clause after the last 'answer is' / 'answer:' in region (at most 200 characters)."""
    last = None
    for m in _ANSWER_IS_RE.finditer(region):
        last = m
    if last is None:
        return None
    raw = region[last.end() : last.end() + _MAX_CLAUSE].lstrip()  # "Answer:\n\nB" -> "B"
    boxed = _boxed(raw.split("\n", 1)[0])
    if boxed is not None:
        return boxed
    clause = _clean_clause(raw)
    return clause or None


def _boxed(region: str) -> Optional[str]:
    """Content of the last \\boxed{...} (no nested braces) in region."""
    i = region.rfind(_BOXED)
    if i < 0:
        return None
    j = region.find("}", i + len(_BOXED))
    if j < 0:
        return None
    content = region[i + len(_BOXED) : j].strip()
    return content or None


def _last_letter(region: str, letters: str) -> Optional[str]:
    """Last standalone capital option letter in region."""
    last = None
    for m in _LETTER_RE.finditer(region):
        if m.group(1) in letters:
            last = m.group(1)
    return last


def _last_number(region: str) -> Optional[str]:
    """Last number literal in region (commas as thousands separators allowed)."""
    last = None
    for m in _NUMBER_RE.finditer(region):
        last = m.group(0)
    return last


def _tagged_answer(text: str) -> Optional[str]:
    """The last complete <answer>...</answer>, else an unterminated final <answer>, else None."""
    low = text.translate(_ASCII_LOWER)
    first_open = low.find(_OPEN)
    if first_open < 0:
        return None
    last_close = low.rfind(_CLOSE)
    last_open = low.rfind(_OPEN)
    if last_close > first_open:
        # Innermost opening tag before the last closing tag; drop any stray nested tags.
        start = low.rfind(_OPEN, 0, last_close)
        content = _strip_tags(text[start + len(_OPEN) : last_close]).strip()
        if content:
            return content
    if last_open > last_close:
        rest = _strip_tags(text[last_open + len(_OPEN) :]).strip()
        if rest:
            first_line = rest.split("\n", 1)[0].strip()
            if first_line:
                return first_line
    return None


def extract_answer(text: str, options: Optional[Sequence[str]] = None) -> Optional[str]:
    """Pull the final answer out of a rollout: <answer> tags first, then textual fallbacks; None if absent.

    Order: the last complete ``<answer>...</answer>``; an unterminated final
    ``<answer>`` (rest of the text, first line); then, searching the text after
    the last ``</think>`` before the whole text: the last "answer is X" /
    "Answer: X", the last ``\\boxed{X}``, the last standalone option letter
    (only when ``options`` is given; A-D, or as many letters as options), the
    last number.  The result is trimmed but not normalised.
    """
    if not isinstance(text, str):
        raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
    tagged = _tagged_answer(text)
    if tagged is not None:
        # "<answer>The answer is (B).</answer>" -> "(B)"
        return _answer_is(tagged) or tagged

    regions = []
    think_end = text.translate(_ASCII_LOWER).rfind(_THINK_CLOSE)
    if think_end >= 0:
        tail = text[think_end + len(_THINK_CLOSE) :]
        if tail.strip():
            regions.append(tail)
    regions.append(text)
    letters = _letter_range(options) if options is not None else ""
    for region in regions:
        found = _answer_is(region) or _boxed(region)
        if found is None and options is not None:
            found = _last_letter(region, letters)
        if found is None:
            found = _last_number(region)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------- #
# normalisation
# --------------------------------------------------------------------------- #


def _canonical_number(s: str) -> Optional[str]:
    """Canonical decimal string ('+2.50' -> '2.5', '1,000' -> '1000', '-0' -> '0') or None."""
    if len(s) > _MAX_NUMBER_CHARS or not _NUMBER_FULL_RE.fullmatch(s):
        return None
    sign = ""
    if s[0] in "+-":
        sign, s = ("-" if s[0] == "-" else ""), s[1:]
    s = s.replace(",", "")
    int_part, _, frac = s.partition(".")
    int_part = int_part.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = int_part + ("." + frac if frac else "")
    if out == "0":
        sign = ""
    return sign + out


@functools.lru_cache(maxsize=1)
def _edge_re() -> "re.Pattern[str]":
    """Regex for a run of whitespace / punctuation (Unicode P* in the BMP, plus markup symbols); built once."""
    punct = "".join(
        chr(c)
        for c in range(0x10000)
        if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)).startswith("P")
    )
    return re.compile("[\\s" + re.escape(punct + "".join(sorted(_EXTRA_STRIP))) + "]+")


def _strip_punct(s: str) -> str:
    """Strip whitespace and punctuation from both ends in linear time (regex runs, no per-char Python loop)."""
    edge = _edge_re()
    m = edge.match(s)
    if m:
        s = s[m.end() :]
    m = edge.match(s[::-1])
    if m:
        s = s[: len(s) - m.end()]
    return s


def _basic_normalize(ans: str) -> str:
    """Option-independent normalisation: NFKC, case-fold, collapse spaces, canonical numbers, strip punctuation."""
    s = " ".join(unicodedata.normalize("NFKC", ans).casefold().split())
    num = _canonical_number(s.lstrip(_NUM_LEAD_STRIP).rstrip(_NUM_TRAIL_STRIP))
    if num is not None:
        return num
    s = " ".join(_strip_punct(s).split())
    if s in _NUMBER_WORDS:
        return _NUMBER_WORDS[s]
    num = _canonical_number(s)
    return num if num is not None else s


def _option_text(opt: str, letter: str) -> str:
    """Normalised option text, with a leading marker for its own letter ('B. cat') removed."""
    s = _basic_normalize(opt)
    m = _MARKER_RE.match(s)
    if m and m.group(1) == letter.lower():
        s = _basic_normalize(s[m.end() - 1 :])
    return s


def normalize_answer(ans: str, options: Optional[Sequence[str]] = None) -> str:
    """Canonical form for voting: case-folded, trimmed, numbers canonical; option letters/texts -> 'A'..'Z'."""
    if not isinstance(ans, str):
        raise InvalidArgumentError(f"ans must be a str, got {type(ans).__name__}")
    s = _basic_normalize(ans)
    if options is None:
        return s
    letters = _letter_range(options)
    # 1. A bare letter: "(B)", "B.", "b)", "b".
    if len(s) == 1 and s.upper() in letters:
        return s.upper()
    # 2. The text of an option.
    for i, opt in enumerate(options[: len(letters)]):
        if s and s == _option_text(str(opt), letters[i]):
            return letters[i]
    # 3. A letter marker followed by text: "(B) cat", "B. cat".
    m = _MARKER_RE.match(s)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return s


# --------------------------------------------------------------------------- #
# voting
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class VoteResult:
    """Outcome of a majority vote over rollouts, with the representative rollout's index."""

    winner: Optional[str]
    counts: dict[str, int] = field(default_factory=dict)  # ordered: count desc, then tie-break order
    winner_index: Optional[int] = None  # best-mean-logprob rollout with the winning answer
    n_valid: int = 0


def _lp(x: float) -> float:
    """Log-prob usable for comparison: NaN counts as -inf."""
    return -math.inf if math.isnan(x) else x


def majority_vote(
    answers: Sequence[Optional[str]], mean_logprobs: Sequence[float]
) -> VoteResult:
    """Most frequent answer (None abstains); ties -> higher mean log-prob over its rollouts, then lexicographic.

    Answers are compared verbatim: normalise them first (``normalize_answer``).
    """
    if len(answers) != len(mean_logprobs):
        raise InvalidArgumentError(
            f"answers and mean_logprobs must have equal length, got {len(answers)} and "
            f"{len(mean_logprobs)}"
        )
    groups: dict[str, list[int]] = {}
    lps: list[float] = []
    for i, (a, lp) in enumerate(zip(answers, mean_logprobs)):
        if isinstance(lp, bool) or not isinstance(lp, (int, float)):
            try:
                lp = float(lp)
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    f"mean_logprobs[{i}] must be a number, got {lp!r}"
                ) from None
        lps.append(_lp(float(lp)))
        if a is None:
            continue
        if not isinstance(a, str):
            raise InvalidArgumentError(f"answers[{i}] must be a str or None, got {a!r}")
        groups.setdefault(a, []).append(i)
    if not groups:
        return VoteResult(winner=None, counts={}, winner_index=None, n_valid=0)

    def mean_lp(idx: list[int]) -> float:
        vals = [lps[i] for i in idx]
        if any(v == -math.inf for v in vals):
            return -math.inf
        return math.fsum(vals) / len(vals)

    order = sorted(groups, key=lambda a: (-len(groups[a]), -mean_lp(groups[a]), a))
    winner = order[0]
    # First index among equal best log-probs (max keeps the first maximum).
    winner_index = max(groups[winner], key=lambda i: (lps[i], -i))
    return VoteResult(
        winner=winner,
        counts={a: len(groups[a]) for a in order},
        winner_index=winner_index,
        n_valid=sum(len(v) for v in groups.values()),
    )


def _is_count(v: object) -> bool:
    """Non-negative integer (numpy integers included), not a bool."""
    return not isinstance(v, bool) and isinstance(v, numbers.Integral) and int(v) >= 0


def can_be_overtaken(counts: Mapping[str, int], n_remaining: int) -> bool:
    """True unless the leader is safe: stopping early is only safe when leader > runner_up + n_remaining.

    The runner-up may also be a not-yet-seen answer (count 0).  Ties count as
    "can be overtaken" because the tie-break may pick the other answer.
    With no votes at all this returns True.
    """
    if not _is_count(n_remaining):
        raise InvalidArgumentError(f"n_remaining must be a non-negative int, got {n_remaining!r}")
    values = []
    for k, v in counts.items():
        if not _is_count(v):
            raise InvalidArgumentError(f"counts[{k!r}] must be a non-negative int, got {v!r}")
        values.append(int(v))
    top = sorted(values, reverse=True)[:2] + [0, 0]
    leader, runner_up = top[0], top[1]
    return not (leader > runner_up + n_remaining)
