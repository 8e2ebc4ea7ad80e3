"""`no_repack()` and the server's --avis_no_repack: a stock `llama_cpp.Llama` (what the chat handler and the server
run on) loads with llama.cpp's use_extra_bufts off, llama-server's --no-repack. Oracle: the params llama.cpp's own
loader receives (`llama_model_load_from_file`, spied where llama_cpp.Llama calls it), and llama.cpp's default
(on) outside the block."""

from __future__ import annotations

import llama_cpp
import llama_cpp.llama_cpp as lib
import pytest

from avis_llamacpp import no_repack


@pytest.fixture
def loads(monkeypatch) -> list[bool]:
    """use_extra_bufts of every model llama.cpp loads through llama_cpp.Llama, in order."""
    seen: list[bool] = []
    load = lib.llama_model_load_from_file
    monkeypatch.setattr(lib, "llama_model_load_from_file",
                        lambda path, params: seen.append(bool(params.use_extra_bufts)) or load(path, params))
    return seen


def _llama(path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)


def test_stock_llama_loads_without_repack_only_inside_the_block(qwen_fixture, loads):
    _llama(qwen_fixture.model).close()
    with no_repack():
        llm = _llama(qwen_fixture.model)
        with no_repack():  # nested: still off, and the outer block's setting comes back
            _llama(qwen_fixture.model).close()
        _llama(qwen_fixture.model).close()
    try:
        assert llm.model_params.use_extra_bufts is False
        assert llm.tokenize(b"red square")  # the model loaded this way works
    finally:
        llm.close()
    with pytest.raises(RuntimeError, match="inside"):
        with no_repack():
            raise RuntimeError("inside")
    _llama(qwen_fixture.model).close()  # llama.cpp's default again, also after an exception in the block
    assert loads == [True, False, False, False, True]


@pytest.mark.parametrize("flag", [[], ["--avis_no_repack"]])
def test_server_flag_reaches_every_model_the_server_loads(qwen_fixture, loads, monkeypatch, flag):
    """The flag holds for the AVIS chat formats and for a plain one, as llama_cpp.server loads them (at start and on
    a switch of model); without it llama.cpp's default."""
    pytest.importorskip("llama_cpp.server")
    from llama_cpp.server import model as server_model
    from llama_cpp.server.settings import ModelSettings

    from avis_llamacpp import server

    proxy = server_model.LlamaProxy
    for name in ("load_llama_from_model_settings", "_avis_original_loader"):  # put the loader back afterwards
        monkeypatch.setattr(proxy, name, proxy.__dict__.get(name), raising=False)
    args = server.build_parser().parse_args(["--model", str(qwen_fixture.model), *flag])
    assert args.avis_repack is (not flag)
    installed: dict = {}

    class Stop(Exception):
        pass

    def spy_install(defaults: dict, **kwargs: object) -> None:
        installed.update(kwargs)
        raise Stop

    with monkeypatch.context() as m:  # the server's start passes the flag on to the loader it installs
        m.setattr(server, "install", spy_install)
        with pytest.raises(Stop):
            server.create_avis_app(args)
    server.install({}, **installed)
    common = {"model": str(qwen_fixture.model), "n_ctx": 256, "n_threads": 1, "n_threads_batch": 1, "verbose": False}
    for fmt in ("avis", "chatml"):
        settings = ModelSettings(chat_format=fmt, clip_model_path=str(qwen_fixture.mmproj), **common)
        proxy.load_llama_from_model_settings(settings).close()
    assert loads == [not flag, not flag]
    _llama(qwen_fixture.model).close()  # outside the server's loader: untouched
    assert loads[-1] is True
