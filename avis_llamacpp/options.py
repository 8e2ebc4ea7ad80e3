"""One frozen, validated object for a query's knobs: sampling, pruning, K, mode, policy, early stop, selector, staging,
prefix reuse. Built once (from keywords, the CLI or a chat request) and validated in one place before any model is
loaded or any image decoded; `VLM.generate` then only reads it. Checks that need the loaded model (n_seq_max, the
context size) stay in the VLM."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from .errors import InvalidArgumentError
from .kdv import SELECTORS, TokenSelector, validate_pruning
from .native import SamplingParams
from .stopping import StoppingRule, make_stopping_rule, wave_sizes

MODES = ("parallel", "snapshot", "staged")
# how a video's (or any multi-chunk input's) chunks are pruned: one selection over all of them, as the AVIS
# reference scores a video (one anchor, one top-k / threshold), or each chunk on its own (the old behaviour)
VIDEO_SELECTIONS = ("joint", "per_chunk")

__all__ = ["QuerySettings", "MODES", "SELECTORS", "VIDEO_SELECTIONS"]


def _strings(name: str, value: Any) -> tuple[str, ...]:
    value = (value,) if isinstance(value, str) else tuple(value or ())
    if not all(isinstance(x, str) for x in value):
        raise InvalidArgumentError(f"{name} must be a string or a sequence of strings, got {value!r}")
    return value


def _check_selector_callable(fn: Any) -> None:
    """A user's selector must be callable as selector(image, n_keep) (kdv.TokenSelector)."""
    if not callable(fn):
        raise InvalidArgumentError(f"selector must be one of {SELECTORS} or a callable (image, n_keep) -> kept "
                                   f"indices, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to read (some builtins): its return value is still checked per image
    try:
        signature.bind(None, 0)
    except TypeError:
        raise InvalidArgumentError(f"a selector callable takes (image, n_keep); {fn!r} has the signature "
                                   f"{signature}") from None


@dataclass(frozen=True)
class QuerySettings:
    """How to answer one query (everything but the prompt and images).

    max_tokens: most tokens per rollout. stop / stop_after: strings that end a rollout (without / with the string).
    sampling: K > 1 default is the paper's temperature 0.7, top-p 0.9; K = 1 decodes greedily. ratio / tau: KDV
    pruning (fraction pruned, or adaptive angle in radians; at most one). k: rollouts (K_max in staged mode).
    mode: "parallel" | "snapshot" | "staged". seed: rollout i is seeded from it. early_stop: stop once the vote
    cannot change. options: multiple-choice option texts (answers normalise to letters). policy: picks K (and
    the pruning when none is given) per query. selector: "kdv", the baselines "embeddings" / "random" / "uniform"
    (these need a ratio), or a kdv.TokenSelector callable (needs a ratio or tau: it chooses which tokens, KDV at
    that setting says how many; such queries bypass the prefix cache). wave / stopping / stop_threshold: staged
    mode. reuse_prefix / cache_namespace: the prefix cache (None: the VLM's setting). video_selection: "joint"
    (default: one KDV selection over all of a video's chunks) or "per_chunk" (each frame pair on its own)."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_after: tuple[str, ...] = ()
    sampling: Optional[SamplingParams] = None
    ratio: Optional[float] = None
    tau: Union[float, str, None] = None  # an angle, or "auto" (the policy's calibrated tau)
    k: int = 1
    mode: str = "parallel"
    seed: int = 0
    early_stop: bool = False
    options: Optional[tuple[str, ...]] = None
    policy: Any = None
    selector: Union[str, TokenSelector] = "kdv"
    wave: int = 3
    stopping: Any = "posterior"  # a rule name or a StoppingRule callable
    stop_threshold: float = 0.95
    reuse_prefix: Optional[bool] = None
    cache_namespace: str = ""
    video_selection: str = "joint"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, (int, np.integer)) \
                or self.max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise InvalidArgumentError(f"k (rollouts) must be an int >= 1, got {self.k!r}")
        set_(self, "max_tokens", int(self.max_tokens))
        set_(self, "k", int(self.k))
        if self.mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {self.mode!r}")
        set_(self, "stop", _strings("stop", self.stop))
        set_(self, "stop_after", _strings("stop_after", self.stop_after))
        if self.sampling is not None and not isinstance(self.sampling, SamplingParams):
            raise InvalidArgumentError(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise InvalidArgumentError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.early_stop, bool):
            raise InvalidArgumentError(f"early_stop must be a bool, got {self.early_stop!r}")
        if self.options is not None:
            if isinstance(self.options, str) or not all(isinstance(o, (str, int, float)) for o in self.options):
                raise InvalidArgumentError(f"options must be a sequence of option texts, got {self.options!r}")
            set_(self, "options", tuple(str(o) for o in self.options))
        if self.policy is not None and not callable(getattr(self.policy, "decide", None)):
            raise InvalidArgumentError(f"policy must have a decide(features) method, got {type(self.policy).__name__}")
        if isinstance(self.selector, str):
            if self.selector not in SELECTORS:
                raise InvalidArgumentError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
            if self.selector != "kdv" and self.ratio is None:
                raise InvalidArgumentError(f"selector {self.selector!r} needs a ratio (it has no adaptive mode)")
        else:
            _check_selector_callable(self.selector)
            if self.ratio is None and self.tau is None:
                raise InvalidArgumentError("a selector callable needs a ratio or tau (KDV at that setting gives "
                                           "the count it is offered)")
        if isinstance(self.tau, str) and self.tau != "auto":  # "auto": policy.resolve_pruning's calibrated tau
            raise InvalidArgumentError(f"tau must be an angle in radians (0 < tau < pi) or 'auto', got {self.tau!r}")
        validate_pruning(self.ratio, None if self.tau == "auto" and self.ratio is None else self.tau)
        if self.mode == "staged":
            make_stopping_rule(self.stopping, self.stop_threshold)  # validates rule and threshold
            wave_sizes(self.k, self.wave)  # validates wave
        if self.reuse_prefix is not None and not isinstance(self.reuse_prefix, bool):
            raise InvalidArgumentError(f"reuse_prefix must be None or a bool, got {self.reuse_prefix!r}")
        if not isinstance(self.cache_namespace, str):
            raise InvalidArgumentError(f"cache_namespace must be a str, got {self.cache_namespace!r}")
        if self.video_selection not in VIDEO_SELECTIONS:
            raise InvalidArgumentError(f"video_selection must be one of {VIDEO_SELECTIONS}, "
                                       f"got {self.video_selection!r}")

    @classmethod
    def from_kwargs(cls, base: "QuerySettings | None" = None, **kwargs: Any) -> "QuerySettings":
        """`base` (or the defaults) with the given fields replaced; unknown names are a typed error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown query setting(s) {unknown}; expected some of {sorted(known)}")
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)

    def stopping_rule(self) -> Optional[StoppingRule]:
        """The staged mode's rule (None in the other modes)."""
        return make_stopping_rule(self.stopping, self.stop_threshold) if self.mode == "staged" else None

    def waves(self) -> list[int]:
        """Staged mode: rollouts per wave."""
        return wave_sizes(self.k, self.wave)
