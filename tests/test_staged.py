"""Staged self-consistency (mode="staged") on the tiny fixtures: the rollouts that run are the same-seed rollouts
of a fixed-K run, the run stops exactly where the stopping rule applied to the fixed-K answers says, the savings
it reports, early stop and the policy on top, and the chat handler / CLI plumbing.

What batching guarantees: rollout i gets the same sampler (seed derived from the index only) in every wave, and
its first token comes from the same prefill logits, bit for bit. Later logits are computed in batches of another
size and at other KV cells, which changes float rounding (log-probs differ by ~1e-7..1e-5 on these f32 fixtures),
so tokens are identical unless a sampling decision falls within that rounding; the tests check token identity on
these fixtures, exact first-token log-probs and the rest to 1e-4."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

import avis_llamacpp.answer as answer_module

from avis_llamacpp import VLM, InvalidArgumentError
from avis_llamacpp.native import SamplingParams
from avis_llamacpp.pipeline import VRS_SAMPLING
from avis_llamacpp.rollouts import rollout_params
from avis_llamacpp.stopping import make_posterior_rule, make_unanimity_rule, wave_sizes
from avis_llamacpp.voting import can_be_overtaken, majority_vote

Q = "Describe the picture."
N = 16
K = 7
NEVER = lambda answers, k_max: False  # noqa: E731  (a rule that never settles: every wave runs)


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048, n_seq_max=8, n_threads=1, n_threads_batch=1) as v:
        yield v


def _first_token_answers(rollouts, options=None):
    """A stand-in answer (3 classes) from each rollout's first token, so votes split on a random tiny model."""
    return [None if r.finish_reason == "early_stop" or not r.tokens else str(r.tokens[0] % 3) for r in rollouts]


def _same_rollouts(staged, full) -> None:
    for a, b in zip(staged.rollouts, full.rollouts):
        assert a.tokens == b.tokens and a.text == b.text and a.seed == b.seed
        assert a.token_logprobs[:1] == b.token_logprobs[:1]  # the same prefill logits, bit for bit
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("wave", [1, 2, 3])
def test_staged_rollouts_are_the_fixed_k_rollouts(vlm, demo_image, wave):
    for seed in range(3):
        full = vlm.ask(demo_image, Q, max_tokens=N, k=K, seed=seed)
        staged = vlm.ask(demo_image, Q, max_tokens=N, k=K, seed=seed, mode="staged", wave=wave, stopping=NEVER)
        assert len(staged.rollouts) == K and staged.rollouts_saved == 0 and staged.waves == len(wave_sizes(K, wave))
        _same_rollouts(staged, full)
        assert staged.k == K and staged.mode == "staged" and staged.answer == full.answer
        assert len({tuple(r.tokens) for r in staged.rollouts}) > 1  # sampled rollouts really differ


def test_later_waves_match_independent_runs(vlm, demo_image):
    """Rollouts of the second and third waves (sequences reused, first tokens from the saved prefill logits)
    against rollouts decoded alone, each after its own fresh encode and prefill."""
    params = rollout_params(K, SamplingParams(**{**VRS_SAMPLING.__dict__, "seed": 11}))
    staged = vlm.ask(demo_image, Q, max_tokens=N, k=K, seed=11, mode="staged", wave=3, stopping=NEVER)
    for i in (3, 5, 6):
        alone = vlm.ask(demo_image, Q, max_tokens=N, k=1, sampling=params[i])
        assert staged.rollouts[i].tokens == alone.tokens and staged.rollouts[i].seed == params[i].seed


def _oracle_stop(answers: list, rule, k_max: int, wave: int) -> tuple[int, int]:
    """Where a staged run must stop: after the first wave whose answers so far settle the rule (rollouts, waves)."""
    n = 0
    for w, size in enumerate(wave_sizes(k_max, wave), 1):
        n += size
        if n == k_max or rule(answers[:n], k_max):
            return n, w
    raise AssertionError("unreachable")


def test_staged_stops_where_the_rule_says(vlm, demo_image, monkeypatch):
    monkeypatch.setattr(answer_module, "normalised_answers", _first_token_answers)
    rules = {"unanimity": make_unanimity_rule(), "posterior 0.5": make_posterior_rule(0.5),
             "posterior 0.9": make_posterior_rule(0.9)}
    stopped = ran_all = 0
    for seed in range(8):
        full = vlm.ask(demo_image, Q, max_tokens=N, k=K, seed=seed)
        answers = _first_token_answers(full.rollouts)
        for name, rule in rules.items():
            for wave in (2, 3):
                staged = vlm.ask(demo_image, Q, max_tokens=N, k=K, seed=seed, mode="staged", wave=wave,
                                 stopping=rule)
                n, waves = _oracle_stop(answers, rule, K, wave)
                assert (len(staged.rollouts), staged.waves, staged.rollouts_saved) == (n, waves, K - n), (seed, name)
                _same_rollouts(staged, full)
                want = majority_vote(answers[:n], [r.mean_logprob for r in full.rollouts[:n]])
                assert staged.answer == want.winner and staged.votes == want.counts
                # tokens saved: rollouts never started counted at the mean length of those that ran (by hand)
                ran = [len(r.tokens) for r in staged.rollouts]
                assert staged.tokens_saved == round(sum(ran) / len(ran)) * (K - n)
                if all(len(r.tokens) == N for r in full.rollouts):  # all run to max_tokens: the count is exact
                    assert staged.tokens_saved == sum(full.decode_tokens) - sum(staged.decode_tokens)
                d = staged.to_dict()
                assert (d["rollouts_saved"], d["waves"], len(d["rollouts"])) == (K - n, waves, n)
                stopped += n < K
                ran_all += n == K
    assert stopped > 0 and ran_all > 0  # the rules both stopped runs early and let some run to K


def test_staged_with_early_stop(vlm, demo_image, monkeypatch):
    """Early stop inside staged waves counts the rollouts not started yet as still to come: with a rule that
    never settles the winner is the fixed-K winner; with the posterior rule it is the staged winner."""
    monkeypatch.setattr(answer_module, "normalised_answers", _first_token_answers)
    cancelled = between = 0
    for seed in range(12):
        kw = dict(max_tokens=12, k=K, seed=seed, stop=["e"])  # a stop string: rollouts end at different steps
        full = vlm.ask(demo_image, Q, **kw)
        never = vlm.ask(demo_image, Q, mode="staged", wave=3, stopping=NEVER, early_stop=True, **kw)
        assert never.answer == full.answer
        staged = vlm.ask(demo_image, Q, mode="staged", wave=3, stopping="posterior", stop_threshold=0.9, **kw)
        both = vlm.ask(demo_image, Q, mode="staged", wave=3, stopping="posterior", stop_threshold=0.9,
                       early_stop=True, **kw)
        assert both.answer == staged.answer
        assert sum(both.decode_tokens) <= sum(staged.decode_tokens)
        for r, f in zip(never.rollouts, full.rollouts):
            assert r.finish_reason == "early_stop" or r.tokens == f.tokens
        answers = _first_token_answers(never.rollouts)
        # a wave starts only while the vote over all K can still change (checked at every wave boundary) ...
        for b in range(3, len(never.rollouts), 3):
            assert can_be_overtaken(Counter(a for a in answers[:b] if a is not None), K - b), (seed, b)
        # ... and the run ends early only once the finished rollouts' leader is ahead by more than all the rest
        n_done = sum(r.finish_reason != "early_stop" for r in never.rollouts)
        if n_done < K:
            assert not can_be_overtaken(Counter(a for a in answers if a is not None), K - n_done), seed
        cancelled += never.early_stopped + never.rollouts_saved
        between += never.rollouts_saved > 0 and never.early_stopped == 0  # decided right at a wave's end
    assert cancelled > 0 and between > 0  # early stop fired, within a wave and between waves


class _FixedK:
    """A QueryPolicy stub: no pruning, K = 5 for every query."""

    ratio = None
    tau = None

    def decide(self, features: np.ndarray) -> tuple[int, float | None]:
        return 5, 0.42


def test_policy_sets_k_max(vlm, demo_image):
    fixed = vlm.ask(demo_image, Q, max_tokens=N, k=5, seed=3)
    staged = vlm.ask(demo_image, Q, max_tokens=N, k=2, seed=3, mode="staged", wave=2, stopping=NEVER,
                     policy=_FixedK())
    assert staged.k == 5 and staged.p_hat == 0.42 and staged.waves == 3 and len(staged.rollouts) == 5
    _same_rollouts(staged, fixed)
    first = vlm.ask(demo_image, Q, max_tokens=N, k=2, seed=3, mode="staged", wave=2,
                    stopping=lambda a, k_max: True, policy=_FixedK())
    assert first.k == 5 and len(first.rollouts) == 2 and first.rollouts_saved == 3


def test_k_beyond_n_seq_max_runs_in_waves(vlm_fixture, demo_image):
    """Waves only need n_seq_max >= wave: K=5 on a 2-sequence context equals snapshot mode's K=5 (rollouts
    decoded one at a time, an independent path)."""
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=1024, n_seq_max=2, n_threads=1, n_threads_batch=1) as v:
        snap = v.ask(demo_image, Q, max_tokens=N, k=5, seed=8, mode="snapshot")
        staged = v.ask(demo_image, Q, max_tokens=N, k=5, seed=8, mode="staged", wave=2, stopping=NEVER)
        assert [r.tokens for r in staged.rollouts] == [r.tokens for r in snap.rollouts] and staged.waves == 3
        with pytest.raises(InvalidArgumentError, match="n_seq_max"):
            v.ask(demo_image, Q, max_tokens=N, k=5, mode="staged", wave=3)
        with pytest.raises(InvalidArgumentError, match="n_seq_max"):
            v.ask(demo_image, Q, max_tokens=N, k=5, mode="parallel")


def test_bad_staged_arguments_are_typed(vlm, demo_image):
    for kw, match in ((dict(wave=0), "wave"), (dict(wave=1.5), "wave"), (dict(stopping="vote"), "stopping"),
                      (dict(stop_threshold=1.0), "stop_threshold"), (dict(stop_threshold="high"), "stop_threshold")):
        with pytest.raises(InvalidArgumentError, match=match):
            vlm.ask(demo_image, Q, max_tokens=N, k=5, mode="staged", **kw)
    with pytest.raises(InvalidArgumentError, match="staged"):
        vlm.ask(demo_image, Q, mode="waves")
    assert vlm.ask(demo_image, Q, max_tokens=2, k=3, mode="staged").k == 3  # still usable


def test_chat_handler_and_cli(llava_fixture, demo_image, capsys):
    import base64

    import llama_cpp

    from avis_llamacpp.chat_handler import AVISChatHandler, request_overrides
    from avis_llamacpp.cli import main

    url = "data:image/png;base64," + base64.b64encode(demo_image.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": Q}]}]
    settings = dict(k=5, seed=4, wave=2, stopping="unanimity")
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=2048) as v:
        want = v.ask(demo_image, Q, max_tokens=8, mode="staged", **settings)
    handler = AVISChatHandler(clip_model_path=str(llava_fixture.mmproj))
    llm = llama_cpp.Llama(model_path=str(llava_fixture.model), chat_handler=handler, n_ctx=2048, verbose=False)
    try:
        with request_overrides(mode="staged", **settings):
            out = llm.create_chat_completion(messages=messages, max_tokens=8)
        with request_overrides(mode="staged", stop_threshold=0.5, **settings):  # unanimity ignores the threshold
            again = llm.create_chat_completion(messages=messages, max_tokens=8)
        for bad in (dict(stopping="bogus"), dict(stop_threshold=2.0), dict(wave=0)):  # the settings reach generate
            with request_overrides(mode="staged", k=5, **bad), pytest.raises(InvalidArgumentError):
                llm.create_chat_completion(messages=messages, max_tokens=8)
    finally:
        llm.close()
    av = out["avis"]
    assert av["mode"] == "staged" and av["k"] == 5 and av["rollouts"] == [r.text for r in want.rollouts]
    assert (av["waves"], av["rollouts_saved"]) == (want.waves, want.rollouts_saved)
    assert again["avis"]["rollouts"] == av["rollouts"]
    rc = main(["ask", "-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "-i", str(demo_image),
               "--k", "5", "--seed", "4", "--mode", "staged", "--wave", "2", "--stopping", "unanimity",
               "--max-tokens", "8", "--no-answer-tags", "--json", Q])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "staged" and d["k"] == 5 and (d["waves"], d["rollouts_saved"]) == (want.waves, want.rollouts_saved)
    assert [r["tokens"] for r in d["rollouts"]] == [r.tokens for r in want.rollouts]


def test_server_accepts_staged_settings_and_names_bad_ones():
    from avis_llamacpp.server import RequestError, _validate_avis

    ok = {"mode": "staged", "k": 7, "wave": 3, "stopping": "posterior", "stop_threshold": 0.9}
    assert _validate_avis(ok, 8) == ok
    for key, bad in (("wave", 0), ("wave", 9), ("wave", 2.5), ("stopping", "vote"), ("stop_threshold", 1),
                     ("stop_threshold", 0), ("mode", "waves")):
        with pytest.raises(RequestError) as e:
            _validate_avis({**ok, key: bad}, 8)
        assert e.value.status == 400 and e.value.param == f"avis.{key}"
