"""llama.cpp's logs (#16): without verbose only errors reach stderr (llama-cpp-python 0.3.36's own callback maps
ggml's log levels in the old order, printing warnings and hiding errors); and the default context is capped at
the model's training context, so the overflow warning has nothing to warn about."""

from __future__ import annotations

import ctypes

from avis_llamacpp import VLM
from avis_llamacpp.defaults import default_model_paths
from avis_llamacpp.native import _native_log_callback, set_native_verbosity


def test_levels_follow_ggml_h(capsys):
    set_native_verbosity(False)
    try:
        for level, text in ((1, b"debug\n"), (2, b"info\n"), (3, b"warn\n"), (4, b"error\n"), (5, b" cont\n")):
            _native_log_callback(level, text, ctypes.c_void_p(0))
        assert capsys.readouterr().err == "error\n cont\n"  # CONT continues the previous (error) line
        set_native_verbosity(True)
        _native_log_callback(3, b"warn\n", ctypes.c_void_p(0))
        assert capsys.readouterr().err == "warn\n"
    finally:
        set_native_verbosity(False)


def test_default_context_is_capped_at_the_training_context(capfd):
    model, mmproj = default_model_paths()
    with VLM(model, mmproj, n_threads=1) as v:
        assert v.ctx.n_ctx == min(4096, v.model.n_ctx_train)
    with VLM(model, mmproj, n_threads=1, n_ctx=4096) as v:
        assert v.ctx.n_ctx == 4096  # explicit wins
    assert "possible training context overflow" not in capfd.readouterr().err
