"""Borrowed llama.cpp handles keep their owner alive (#16): a VLM built on a llama_cpp.Llama's model holds a
reference to that Llama, and the chat handler rebuilds its VLM for a different Llama even when Python reuses
the old one's id()."""

from __future__ import annotations

import gc
import weakref

import llama_cpp

from avis_llamacpp import VLM
from avis_llamacpp.chat_handler import AVISChatHandler


def test_vlm_from_llama_keeps_the_llama_alive(vlm_fixture, demo_image):
    llm = llama_cpp.Llama(model_path=str(vlm_fixture.model), n_ctx=1024, n_threads=1, verbose=False)
    ref = weakref.ref(llm)
    vlm = VLM.from_llama(llm, vlm_fixture.mmproj, flash_attn=False)
    want = vlm.ask(demo_image, "What is it?", max_tokens=4).tokens
    del llm
    gc.collect()
    assert ref() is not None  # its model (weights) is still in use by the VLM
    assert vlm.ask(demo_image, "What is it?", max_tokens=4).tokens == want
    vlm.close()


def test_chat_handler_follows_the_llama_it_is_called_with(vlm_fixture):
    handler = AVISChatHandler(clip_model_path=str(vlm_fixture.mmproj), flash_attn=False)
    a = llama_cpp.Llama(model_path=str(vlm_fixture.model), n_ctx=1024, n_threads=1, verbose=False)
    vlm_a = handler._vlm_for(a)
    assert vlm_a.model.owner is a
    b = llama_cpp.Llama(model_path=str(vlm_fixture.model), n_ctx=1024, n_threads=1, verbose=False)
    vlm_b = handler._vlm_for(b)
    assert vlm_b is not vlm_a and vlm_b.model.owner is b and vlm_a.closed
    assert handler._vlm_for(b) is vlm_b
    b.close()
    a.close()
