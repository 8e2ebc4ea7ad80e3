"""Flash attention "auto" | True | False (issue #21): the value is validated, "auto" is the default everywhere,
the setting reaches llama.cpp's text context and mtmd's encoder (checked against stock llama-cpp-python and
against the encoder graph itself), and key capture + KDV pruning behave the same with it on and off.

Tolerances with flash attention on vs off (K/V, and the encoder's mask, go through f16 inside the attention):
- captured last-block keys: max |diff| <= KEYS_TOL x max |keys| (observed <= 7e-6 on the fixtures);
- KDV kept sets: identical;
- next-token logits along the greedy continuation: max |diff| <= LOGITS_TOL x max |logits| (observed <= 2.3e-3),
  and the greedy tokens equal until a step whose flash-off top-2 margin is within that tolerance (a near-tie
  may flip; on the fixtures every continuation is identical).
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import math

import llama_cpp
import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM, InvalidArgumentError
from avis_llamacpp import pipeline as pipeline_mod
from avis_llamacpp.capture import GGMLTensor, KeyCapture, _ggml, read_tensor
from avis_llamacpp.chat_handler import AVISChatHandler
from avis_llamacpp.images import load_image
from avis_llamacpp.mtmd import Projector
from avis_llamacpp.native import Context, ContextSettings, Model, flash_attn_type
from avis_llamacpp.prefill import prefill
from convert.fixtures import EXTRA_FAMILIES, make_fixture

Q = "What shapes do you see?"
N_GEN = 12
KEYS_TOL = 1e-3
LOGITS_TOL = 1e-2
PRUNING = [{"ratio": 0.5}, {"ratio": 0.75}, {"tau": math.pi / 4}]


def _noise(w: int = 224, h: int = 224, seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _op_name(op: int) -> str:
    lib = _ggml()
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    return lib.ggml_op_name(op).decode()


class RecordingCapture(KeyCapture):
    """KeyCapture that also records every encoder graph node (name, op, type) offered to the eval callback and
    copies the F16 '(permuted) (copy)' key tensors that flash attention consumes."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[tuple[str, str, int]] = []
        self.f16_keys: dict[str, np.ndarray] = {}

    def __call__(self, addr: int, ask: bool) -> bool:
        t = GGMLTensor.from_address(addr)
        name = t.name.decode("utf-8", "replace")
        if name.startswith("Kcur") and name.endswith(" (permuted) (copy)"):
            if ask:
                self.nodes.append((name, _op_name(t.op), int(t.type)))
                return True
            self.f16_keys[name] = read_tensor(addr)[1]
            return True
        if ask:
            self.nodes.append((name, _op_name(t.op), int(t.type)))
        return super().__call__(addr, ask)


# ---------------------------------------------------------------------------------------------------------
# the value
# ---------------------------------------------------------------------------------------------------------
def test_values_map_to_llama_cpp_enum():
    assert flash_attn_type("auto") == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO == -1
    assert flash_attn_type(True) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert flash_attn_type(False) == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


@pytest.mark.parametrize("bad", ["on", "off", "AUTO", "true", "", 1, 0, -1, None, 1.0, np.bool_(True)])
def test_bad_values_are_refused_before_anything_loads(bad, tmp_path):
    with pytest.raises(InvalidArgumentError, match="flash_attn must be 'auto', True or False"):
        flash_attn_type(bad)
    with pytest.raises(InvalidArgumentError, match="flash_attn"):
        ContextSettings(flash_attn=bad)
    # no such files: the typed argument error comes first, not a ModelLoadError
    with pytest.raises(InvalidArgumentError, match="flash_attn"):
        VLM(tmp_path / "missing.gguf", tmp_path / "missing-mmproj.gguf", flash_attn=bad)
    with pytest.raises(InvalidArgumentError, match="flash_attn"):
        Projector(tmp_path / "missing-mmproj.gguf", None, flash_attn=bad)  # type: ignore[arg-type]
    mmproj = tmp_path / "exists.gguf"
    mmproj.write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="flash_attn"):
        AVISChatHandler(str(mmproj), flash_attn=bad)


def test_auto_is_the_default_everywhere():
    for fn in (VLM.__init__, Projector.__init__, AVISChatHandler.__init__):
        assert inspect.signature(fn).parameters["flash_attn"].default == "auto", fn
    assert ContextSettings().flash_attn == "auto"
    from avis_llamacpp.cli import build_parser

    base = ["ask", "-m", "m.gguf", "--mmproj", "mm.gguf", "-i", "x.png", "q"]
    p = build_parser()
    assert p.parse_args(base).flash_attn == "auto"
    for flag, want in (("auto", "auto"), ("on", True), ("off", False), ("OFF", False)):
        assert p.parse_args(base[:1] + ["--flash-attn", flag] + base[1:]).flash_attn == want
    assert p.parse_args(["show", "-m", "m", "--mmproj", "mm", "-i", "x", "--flash-attn", "on"]).flash_attn is True
    with pytest.raises(SystemExit):
        p.parse_args(base[:1] + ["--flash-attn", "yes"] + base[1:])


def test_server_flag_reaches_the_handler(monkeypatch):
    pytest.importorskip("llama_cpp.server")
    from avis_llamacpp import server

    p = server.build_parser()
    assert p.parse_args(["--model", "m.gguf"]).avis_flash_attn == "auto"
    args = p.parse_args(["--model", "m.gguf", "--avis_flash_attn", "off"])
    assert args.avis_flash_attn is False
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_install(defaults: dict, **_: object) -> None:
        seen.update(defaults)
        raise Stop

    monkeypatch.setattr(server, "install", fake_install)
    with pytest.raises(Stop):
        server.create_avis_app(args)
    assert seen["flash_attn"] is False
    # the defaults dict is what the handler is built with
    sig = inspect.signature(AVISChatHandler.__init__)
    assert set(seen) <= set(sig.parameters)


# ---------------------------------------------------------------------------------------------------------
# the text context: the setting reaches llama.cpp (oracle: stock llama_cpp.Llama with the same setting)
# ---------------------------------------------------------------------------------------------------------
def _stock_logits(model_path: str, tokens: list[int], flash_attn: bool) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=512, n_threads=1, n_threads_batch=1, flash_attn=flash_attn,
                          verbose=False)
    try:
        llm.eval(tokens)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()


def test_text_context_follows_the_setting(vlm_fixture):
    model = Model(vlm_fixture.model)
    try:
        tokens = model.tokenize("The red square is left of the blue circle and the green", add_special=True)
        got = {}
        for fa in (False, True, "auto"):
            ctx = Context(model, ContextSettings(n_ctx=512, n_threads=1, n_threads_batch=1, flash_attn=fa))
            try:
                ctx.decode_tokens(tokens, 0)
                got[fa] = ctx.logits(-1).copy()
            finally:
                ctx.close()
    finally:
        model.close()
    on, off = _stock_logits(str(vlm_fixture.model), tokens, True), _stock_logits(str(vlm_fixture.model), tokens, False)
    assert not np.array_equal(on, off)  # the fixture is sensitive to the setting
    np.testing.assert_array_equal(got[False], off)
    np.testing.assert_array_equal(got[True], on)
    np.testing.assert_array_equal(got["auto"], on)  # llama.cpp resolves auto to enabled on the CPU backend


def test_chat_handler_passes_the_setting_on(vlm_fixture):
    """The handler's VLM context computes what a stock Llama with the same setting computes."""
    probe = Model(vlm_fixture.model)
    tokens = probe.tokenize("A small red square", add_special=True)
    probe.close()
    for fa, stock_fa in ((False, False), ("auto", True), (True, True)):
        handler = AVISChatHandler(str(vlm_fixture.mmproj), flash_attn=fa)
        llm = llama_cpp.Llama(model_path=str(vlm_fixture.model), chat_handler=handler, n_ctx=512, n_threads=1,
                              n_threads_batch=1, verbose=False)
        try:
            vlm = handler._vlm_for(llm)
            vlm.ctx.decode_tokens(tokens, 0)
            got = vlm.ctx.logits(-1).copy()
            vlm.ctx.clear()
        finally:
            llm.close()
        np.testing.assert_array_equal(got, _stock_logits(str(vlm_fixture.model), tokens, stock_fa), err_msg=str(fa))


# ---------------------------------------------------------------------------------------------------------
# the encoder: what the graph runs, and which tensor the capture reads
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoders(vlm_fixture):
    """flash_attn setting -> (RecordingCapture after two encodes, token keys of the demo image, key source)."""
    out = {}
    for fa in (False, True, "auto", None):  # None: VLM's default
        kw = {} if fa is None else {"flash_attn": fa}
        cap = RecordingCapture()
        mp = pytest.MonkeyPatch()
        mp.setattr(pipeline_mod, "KeyCapture", lambda: cap)
        try:
            with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048, n_threads=1, n_threads_batch=1, **kw) as v:
                assert v.key_capture is cap
                a = v.ask(_noise(), Q, max_tokens=1, ratio=0.5)  # first encode: learns the tensor
                b = v.ask(load_image(vlm_fixture_demo()), Q, max_tokens=1, ratio=0.5)
        finally:
            mp.undo()
        out[fa] = (cap, cap.keys.copy(), a.images[0]["key_source"], b.images[0]["key_source"])
    return out


def vlm_fixture_demo():
    from tests.conftest import DEMO_IMAGE

    return DEMO_IMAGE


def test_encoder_graph_follows_the_setting(encoders):
    for fa, (cap, _, _, _) in encoders.items():
        ops = {op for _, op, _ in cap.nodes}
        flash = fa is not False  # True, "auto" and the default: the CPU backend supports flash attention
        assert ("FLASH_ATTN_EXT" in ops) == flash, fa
        assert ("SOFT_MAX" in ops) != flash, fa
        assert bool(cap.f16_keys) == flash, fa


def test_capture_reads_the_f32_keys_with_flash_attention_on(encoders):
    target = encoders[False][0].target
    assert target is not None and "(" not in target
    for fa, (cap, keys, src_a, src_b) in encoders.items():
        assert cap.target == target, fa  # the same F32 tensor, never its permuted F16 copy
        assert src_a == src_b == f"vit_keys:{target}", fa
        node = [n for n in cap.nodes if n[0] == target]
        assert node and node[0][2] == 0, fa  # GGML_TYPE_F32
        if fa is False:
            continue
        # the F16 copy of the captured tensor is what flash attention consumed: same values up to f16 rounding
        copy = cap.f16_keys[f"{target} (permuted) (copy)"]
        copy = np.swapaxes(copy.reshape(-1, *copy.shape[-2:]), 0, 1)  # [n_head, n_rows, d] -> [n_rows, n_head, d]
        np.testing.assert_allclose(copy, keys, rtol=1e-3, atol=1e-3 * np.abs(keys).max())
        assert not np.array_equal(copy, keys)  # really the rounded copy, not a second read of the same tensor


def test_captured_keys_close_on_and_off(encoders):
    off = encoders[False][1]
    for fa in (True, "auto", None):
        keys = encoders[fa][1]
        assert keys.shape == off.shape
        assert np.abs(keys - off).max() <= KEYS_TOL * np.abs(off).max(), fa
    np.testing.assert_array_equal(encoders["auto"][1], encoders[True][1])
    np.testing.assert_array_equal(encoders[None][1], encoders[True][1])


# ---------------------------------------------------------------------------------------------------------
# KDV pruning and the continuation, flash attention on vs off
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_pair(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048, n_threads=1, n_threads_batch=1,
             flash_attn=False) as off, \
         VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048, n_threads=1, n_threads_batch=1) as on:
        yield off, on


def _forced_logits(v: VLM, image, tokens: list[int], pruning: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    """Kept set and the next-token logits after the pruned prefill and after each forced token."""
    meta: dict = {}
    v.ctx.clear()
    with v.projector.tokenize(v.render_question(Q, 1), [load_image(image)]) as p:
        pre = prefill(v.ctx, v.projector, p, select=v.kdv_selector(pruning.get("ratio"), pruning.get("tau"), meta))
    out = [v.ctx.logits(-1).copy()]
    for i, tok in enumerate(tokens):
        v.ctx.decode_tokens([tok], pre.n_past + i)
        out.append(v.ctx.logits(-1).copy())
    v.ctx.clear()
    return pre.images[0].kept, out


@pytest.mark.parametrize("pruning", PRUNING, ids=lambda d: "-".join(f"{k}{v:.2f}" for k, v in d.items()))
@pytest.mark.parametrize("image", ["demo", "noise"])
def test_kdv_same_kept_sets_and_close_continuations(vlm_pair, demo_image, pruning, image):
    off, on = vlm_pair
    img = demo_image if image == "demo" else _noise(320, 160, seed=11)
    a_off = off.ask(img, Q, max_tokens=N_GEN, **pruning)
    a_on = on.ask(img, Q, max_tokens=N_GEN, **pruning)
    assert a_off.images[0]["key_source"].startswith("vit_keys:")
    assert a_on.images[0]["key_source"] == a_off.images[0]["key_source"]
    assert a_on.images[0]["kept"] == a_off.images[0]["kept"]
    assert 0 < a_on.kept_tokens[0] < a_on.image_tokens[0] or "tau" in pruning

    # second implementation of the greedy continuation: teacher-force the flash-off tokens through both
    kept_off, l_off = _forced_logits(off, img, a_off.tokens, pruning)
    kept_on, l_on = _forced_logits(on, img, a_off.tokens, pruning)
    assert kept_off.tolist() == kept_on.tolist() == a_off.images[0]["kept"]
    assert [int(np.argmax(x)) for x in l_off[:len(a_off.tokens)]] == a_off.tokens  # the oracle loop is right
    for step, (x, y) in enumerate(zip(l_off, l_on)):
        assert np.abs(x - y).max() <= LOGITS_TOL * np.abs(x).max(), step
    # greedy tokens agree until a near-tie (within the tolerance) under flash-off
    for step, (t_off, t_on) in enumerate(zip(a_off.tokens, a_on.tokens)):
        if t_off != t_on:
            x = l_off[step]
            assert x[t_off] - x[t_on] <= 2 * LOGITS_TOL * np.abs(x).max(), step
            break
    else:
        assert len(a_on.tokens) == len(a_off.tokens)


# ---------------------------------------------------------------------------------------------------------
# the other generated families (their own test files cover the rest): capture with flash attention on
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", EXTRA_FAMILIES)
def test_capture_with_flash_attention_on_other_families(family_name, fixture_root, demo_image):
    fx = make_fixture(family_name, "tiny", out_dir=fixture_root)
    got = {}
    for fa in (False, "auto"):
        with VLM(fx.model, fx.mmproj, n_ctx=2048, n_threads=1, n_threads_batch=1, flash_attn=fa) as v:
            a = v.ask(demo_image, Q, max_tokens=1, ratio=0.5)
            b = v.ask(demo_image, Q, max_tokens=1, tau=math.pi / 4)
            got[fa] = (v.key_capture.target, v.key_capture.keys.copy(), a.images[0], b.images[0]["kept"])
    (t_off, k_off, im_off, tau_off), (t_on, k_on, im_on, tau_on) = got[False], got["auto"]
    assert t_off is not None and t_on == t_off and "(" not in t_on  # the F32 keys, not a permuted F16 copy
    assert im_on["key_source"] == im_off["key_source"] == f"vit_keys:{t_off}"
    assert k_on.shape == k_off.shape and np.abs(k_on - k_off).max() <= KEYS_TOL * np.abs(k_off).max()
    assert im_on["kept"] == im_off["kept"] and tau_on == tau_off
