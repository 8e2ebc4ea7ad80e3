"""QuerySettings (#16): one frozen object validates a query's knobs before any model is loaded."""

from __future__ import annotations

import math

import pytest

from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.kdv import validate_pruning
from avis_llamacpp.native import SamplingParams
from avis_llamacpp.options import QuerySettings


@pytest.mark.parametrize("kw, field", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"k": 0}, "k"), ({"k": "lots"}, "k"), ({"k": True}, "k"),
    ({"mode": "fast"}, "mode"),
    ({"stop": [1]}, "stop"), ({"stop_after": [None]}, "stop_after"),
    ({"sampling": {"temperature": 0.7}}, "sampling"),
    ({"seed": 1.5}, "seed"), ({"seed": False}, "seed"),
    ({"early_stop": "yes"}, "early_stop"),
    ({"options": "A|B"}, "options"),
    ({"policy": object()}, "policy"),
    ({"selector": "best"}, "selector"), ({"selector": "random"}, "needs a ratio"),
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"tau": 0.0}, "tau"), ({"tau": math.pi}, "tau"),
    ({"ratio": 0.5, "tau": 1.0}, "at most one"),
    ({"mode": "staged", "wave": 0}, "wave"), ({"mode": "staged", "stopping": "vibes"}, "stopping"),
    ({"mode": "staged", "stop_threshold": 1.5}, "threshold"),
    ({"reuse_prefix": "yes"}, "reuse_prefix"), ({"cache_namespace": 3}, "cache_namespace"),
])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(InvalidArgumentError, match=field):
        QuerySettings(**kw)


def test_good_settings_are_normalised_and_frozen():
    s = QuerySettings(stop="</s>", stop_after=["</answer>"], options=["red", 2], k=3, mode="staged", wave=2,
                      ratio=0.5, sampling=SamplingParams(temperature=0.7, top_p=0.9))
    assert s.stop == ("</s>",) and s.stop_after == ("</answer>",) and s.options == ("red", "2")
    assert s.waves() == [2, 1] and callable(s.stopping_rule())
    assert QuerySettings().stopping_rule() is None  # only staged mode has one
    with pytest.raises(Exception):
        s.k = 5  # frozen
    t = QuerySettings.from_kwargs(s, k=5)
    assert t.k == 5 and t.ratio == 0.5 and s.k == 3
    with pytest.raises(InvalidArgumentError, match="unknown query setting"):
        QuerySettings.from_kwargs(k=2, kk=3)
    with pytest.raises(InvalidArgumentError, match="k"):
        QuerySettings.from_kwargs(s, k=0)  # replacing re-validates


def test_validate_pruning_by_hand():
    validate_pruning()
    validate_pruning(0.0, None)
    validate_pruning(None, math.pi / 4)
    for bad in ((1.0, None), (None, 4.0), (0.5, 0.5), ("0.5", None)):
        with pytest.raises(InvalidArgumentError):
            validate_pruning(*bad)


def test_generate_takes_a_settings_object_or_its_fields(llava_fixture, demo_image):
    from avis_llamacpp import VLM

    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_threads=1, flash_attn=False) as vlm:
        prompt = vlm.render_question("What is it?", 1)
        s = QuerySettings(max_tokens=3, ratio=0.5)
        a = vlm.generate(prompt, [demo_image], s)
        b = vlm.generate(prompt, [demo_image], max_tokens=3, ratio=0.5)
        c = vlm.generate(prompt, [demo_image], s, max_tokens=2)  # a field given as a keyword replaces it
        assert a.tokens == b.tokens and c.tokens == a.tokens[:2] and a.kept_tokens == c.kept_tokens
        with pytest.raises(InvalidArgumentError, match="unknown query setting"):
            vlm.generate(prompt, [demo_image], max_tokns=3)
        # knobs are checked before any image is read: a missing file would be an ImageError otherwise
        with pytest.raises(InvalidArgumentError, match="k \\(rollouts\\)"):
            vlm.ask("/no/such/image.png", "q", k=0)
