"""benchmarks/bench_llama_server.py's own logic, without llama-server: which binary it picks, how it summarises
(medians, per-repeat ratios, verdicts, token-count checks, against hand-computed values), and that its EOS wrapper
makes the plugin decode exactly max_tokens tokens."""

from __future__ import annotations

import stat

import pytest

from benchmarks import bench_llama_server as bls


def _exe(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_find_server_order(tmp_path, monkeypatch):
    """--server, then $AVIS_LLAMA_SERVER, then the documented build folder, then PATH; a bad --server is refused."""
    monkeypatch.setenv("AVIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("AVIS_LLAMA_SERVER", raising=False)
    assert bls.find_server(None, "9.9.9") is None
    on_path = _exe(tmp_path / "bin" / "llama-server")
    assert bls.find_server(None, "9.9.9") == on_path
    built = _exe(tmp_path / "cache" / "llama-server-9.9.9" / "build" / "bin" / "llama-server")
    assert bls.find_server(None, "9.9.9") == built
    assert f"-B {tmp_path / 'cache' / 'llama-server-9.9.9' / 'build'} " in bls.build_commands("9.9.9")
    env = _exe(tmp_path / "env" / "llama-server")
    monkeypatch.setenv("AVIS_LLAMA_SERVER", env)
    assert bls.find_server(None, "9.9.9") == env
    explicit = _exe(tmp_path / "x" / "server")
    assert bls.find_server(explicit, "9.9.9") == explicit
    with pytest.raises(SystemExit, match="not an executable"):
        bls.find_server(str(tmp_path / "missing"), "9.9.9")


def _srv(wall, ttft, tokens=8, k=1, finish="length"):
    return {"wall_s": wall, "ttft_s": ttft, "usage": {"completion_tokens": tokens},
            "finish": {i: finish for i in range(k)}}


def _plug(wall, ttft, tokens=(8,)):
    return {"wall_s": wall, "ttft_s": ttft, "decode_tokens": list(tokens)}


def test_summarise_by_hand():
    raw = {
        "a": {"server": [_srv(2.0, 1.0), _srv(4.0, 2.0), _srv(3.0, 1.0)],
              "plugin": [_plug(1.0, 1.5), _plug(5.0, 3.0), _plug(3.0, 1.2)]},
        "c": {"server": [_srv(10.0, None, k=3), _srv(10.0, None, k=3, finish="stop")],
              "plugin": [_plug(9.0, None, (8, 8, 8)), _plug(8.0, None, (8, 8, 8))]},
        "d_ratio": {"server": [], "plugin": [_plug(1.0, 0.5), _plug(2.0, 1.0), _plug(1.5, 0.5)]},
    }
    rows, mismatches = bls.summarise(raw, 8, 3)
    by = {(r["scenario"][:2], r["metric"]): r for r in rows}
    assert [r["metric"] for r in rows] == ["wall", "TTFT", "wall", "wall", "TTFT"]
    a_wall = by[("a.", "wall")]
    assert a_wall["ratios"] == pytest.approx([0.5, 1.25, 1.0]) and a_wall["verdict"] == "level"
    assert bls.spread(a_wall["ratios"]) == "1.000 [0.500-1.250]"
    assert bls.spread(a_wall["server_s"]) == "3.000 [2.000-4.000]"
    a_ttft = by[("a.", "TTFT")]
    assert a_ttft["ratios"] == pytest.approx([1.5, 1.5, 1.2]) and a_ttft["verdict"] == "behind"
    # d is paired with a's server runs (same images): 1/2, 2/4, 1.5/3
    d_wall = by[("d.", "wall")]
    assert d_wall["ratios"] == pytest.approx([0.5, 0.5, 0.5]) and d_wall["verdict"] == "ahead"
    assert d_wall["server_s"] == [2.0, 4.0, 3.0]
    # c: one server request had a completion stop before max_tokens: reported, the others are not
    assert by[("c.", "wall")]["ratios"] == pytest.approx([0.9, 0.8])
    assert len(mismatches) == 1 and mismatches[0].startswith("c. K=3")


def test_summarise_catches_short_plugin_answers():
    raw = {"a": {"server": [_srv(1.0, 0.5)], "plugin": [_plug(1.0, 0.5, (7,))]}}
    _, mismatches = bls.summarise(raw, 8, 7)
    assert mismatches == ["a. cold question: server tokens ['8'], plugin tokens ['7'], expected ['8']"]


def test_eog_hook_decodes_max_tokens(qwen_fixture):
    """With the wrapper every rollout decodes exactly max_tokens; the EOS tokens it let through are counted and
    are what the unwrapped model calls end of generation."""
    from avis_llamacpp import VLM

    vlm = VLM(qwen_fixture.model, qwen_fixture.mmproj, n_threads=1, n_ctx=1024)
    try:
        image = bls.data_uri(bls.make_png(3, 56))
        orig = vlm.model.is_eog
        plain = vlm.ask(image, "Say something.", max_tokens=40, k=3, seed=1)
        hook = bls.EogHook(vlm.model)
        wrapped = vlm.ask(image, "Say something.", max_tokens=40, k=3, seed=1)
        assert wrapped.decode_tokens == [40, 40, 40] and hook.n_eog > 0
        # same seeds: a plain rollout that ended at an EOS is the wrapped one's start, and the wrapped one's next
        # token is that EOS (counted by the hook, decoded as an ordinary token)
        stopped = [(p, w) for p, w in zip(plain.rollouts, wrapped.rollouts) if p.finish_reason == "stop"]
        assert stopped, "the tiny model should end some rollout with EOS within 40 tokens"
        for p, w in stopped:
            n = len(p.tokens)
            assert w.tokens[:n] == p.tokens and orig(w.tokens[n]) and w.finish_reason == "length"
        assert hook.n_eog >= len(stopped)
        res = bls.plugin_call(vlm, hook, "ask", image, "Say something.", max_tokens=40)
        assert res["decode_tokens"] == [40]
        assert res["ttft_s"] is not None and 0 < res["ttft_s"] <= res["wall_s"]
    finally:
        vlm.close()


@pytest.mark.parametrize("repack", [True, False])
def test_model_repack_reaches_llama_cpp(qwen_fixture, monkeypatch, repack):
    """native.Model(repack=False) loads with use_extra_bufts off (llama-server's -nr), True keeps llama.cpp's
    default; the benchmark's --no-repack runs the plugin so."""
    import llama_cpp

    from avis_llamacpp.native import Model

    seen = []
    load = llama_cpp.llama_model_load_from_file
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file",
                        lambda path, params: seen.append(params.use_extra_bufts) or load(path, params))
    m = Model(qwen_fixture.model, repack=repack)
    try:
        assert seen == [repack] and m.n_vocab > 0
        assert llama_cpp.llama_model_default_params().use_extra_bufts  # llama.cpp's default, what repack=True keeps
    finally:
        m.close()
