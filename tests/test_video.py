"""Video input as frames: Qwen2/2.5-VL merges adjacent frames into temporal patches (as mtmd's video helper
does), LLaVA-style models take each frame as an image; KDV prunes every chunk."""

from __future__ import annotations

import ctypes

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd_cpp
import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM, ImageError
from avis_llamacpp.images import load_frames
from avis_llamacpp.kdv import n_keep_for_ratio

Q = "What happens in the video?"


def _frames(n=4, size=224):
    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (240, 240, 240))
        img.paste((200, 30, 30), (20 + 30 * i, 80, 70 + 30 * i, 130))  # a red square moving right
        out.append(img)
    return out


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=4096) as v:
        yield v


def test_frames_from_animation_and_list(tmp_path):
    frames = _frames(6)
    gif = tmp_path / "v.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    got = load_frames(gif, max_frames=3)
    assert len(got) == 3 and all(f.shape == (224, 224, 3) for f in got)
    mixed = load_frames([frames[0], frames[1].resize((100, 50))])
    assert [f.shape for f in mixed] == [(224, 224, 3)] * 2
    with pytest.raises(ImageError):
        load_frames([])


def test_video_chunks_and_pruning(vlm, vlm_fixture):
    a = vlm.ask(None, Q, video=_frames(4), max_tokens=4)
    per_frame = vlm_fixture.image_tokens(224, 224)
    if vlm_fixture.family == "qwen25vl":
        assert a.image_tokens == [per_frame, per_frame]  # 4 frames -> 2 temporal patches
    else:
        assert a.image_tokens == [per_frame] * 4
    p = vlm.ask(None, Q, video=_frames(4), max_tokens=4, ratio=0.75)  # one selection over the whole video
    assert sum(p.kept_tokens) == n_keep_for_ratio(sum(p.image_tokens), 0.75)
    c = vlm.ask(None, Q, video=_frames(4), max_tokens=4, ratio=0.75, video_selection="per_chunk")
    assert c.kept_tokens == [n_keep_for_ratio(n, 0.75) for n in c.image_tokens]
    assert all(im["key_source"].startswith("vit_keys:") for im in p.images)
    # the same frames as separate images are not merged
    sep = vlm.ask(_frames(4), Q, max_tokens=4)
    assert len(sep.image_tokens) == 4


def test_video_matches_mtmd_helper(vlm, vlm_fixture):
    """Vanilla video prefill == mtmd_helper_eval_chunks on mergeable bitmaps + argmax loop."""
    frames = [np.asarray(f) for f in _frames(4)]
    prompt = vlm.render_question(Q, 4)
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=4096, flash_attn=False) as v:  # the oracle's setting
        ours = v.generate(prompt, frames, video=True, max_tokens=12).tokens
    llm = llama_cpp.Llama(model_path=str(vlm_fixture.model), n_ctx=4096, verbose=False)
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.warmup, params.n_threads = False, False, llm.n_threads
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = mtmd_cpp.mtmd_init_from_file(str(vlm_fixture.mmproj).encode(), llm.model, params)
    try:
        bms = []
        for f in frames:
            bm = mtmd_cpp.mtmd_bitmap_init(f.shape[1], f.shape[0], f.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
            mtmd_cpp.mtmd_bitmap_set_mergeable(bm, True)
            bms.append(bm)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        text = mtmd_cpp.mtmd_input_text()
        data = prompt.encode()
        text.text, text.text_len, text.add_special, text.parse_special = data, len(data), True, True
        arr = (mtmd_cpp.mtmd_bitmap_p_ctypes * 4)(*bms)
        assert mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), arr, 4) == 0
        n_past = llama_cpp.llama_pos(0)
        assert mtmd_cpp.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, llm.n_batch, True, ctypes.byref(n_past)) == 0
        pos, want = n_past.value, []
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        for _ in range(12):
            tok = int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            want.append(tok)
            tok_arr, pos_arr = (llama_cpp.llama_token * 1)(tok), (llama_cpp.llama_pos * 1)(pos)
            batch = llama_cpp.llama_batch_get_one(tok_arr, 1)
            batch.pos = ctypes.cast(pos_arr, ctypes.POINTER(llama_cpp.llama_pos))
            assert llama_cpp.llama_decode(llm.ctx, batch) == 0
            pos += 1
        mtmd_cpp.mtmd_input_chunks_free(chunks)
        for bm in bms:
            mtmd_cpp.mtmd_bitmap_free(bm)
    finally:
        mtmd_cpp.mtmd_free(ctx)
        llm.close()
    assert ours == want
