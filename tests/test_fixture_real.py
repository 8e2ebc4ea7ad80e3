"""The `real` fixture's generators (#15), checked on tiny dims (the real fixture itself is multi-GB and generated
on demand only, never here): the streaming writers produce exactly the bytes of the in-memory writers, the
vocabulary padding keeps the base vocabulary and reaches the requested size, and the `real` spec has the
released Qwen2.5-VL-3B's dimensions."""

from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest

import convert.fixture_real as fixture_real
from convert.fixtures import SIZES, _key, spec
from convert.mmproj import write_mmproj
from convert.text_model import write_text_model
from convert.tokenizer import build_vocab, pad_vocab

# Qwen/Qwen2.5-VL-3B-Instruct config.json (text model and vision_config), written out by hand as the oracle.
QWEN25VL_3B = {
    "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
    "intermediate_size": 11008, "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "mrope_section": (16, 24, 24),
    "vision": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "patch_size": 14,
               "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": (7, 15, 23, 31),
               "out_hidden_size": 2048},
}


@pytest.mark.parametrize("ftype", ["f32", "f16"])
@pytest.mark.parametrize("family", ["qwen25vl", "llava", "qwen3vl"])
def test_streaming_writers_are_byte_identical(tmp_path: Path, monkeypatch, family: str, ftype: str) -> None:
    """Text model and mmproj written tensor by tensor (the embedding in row blocks, forced small here) equal
    the files the in-memory writers produce for the same dims and seed."""
    monkeypatch.setattr(fixture_real, "_CHUNK_ELEMS", 1000)
    text, vision, template, _ = spec(family, "tiny")
    write_text_model(tmp_path / "a.gguf", text, seed=3, chat_template=template, name="t", ftype=ftype)
    fixture_real.write_text_model_streaming(tmp_path / "b.gguf", text, seed=3, chat_template=template, name="t",
                                            ftype=ftype)
    assert filecmp.cmp(tmp_path / "a.gguf", tmp_path / "b.gguf", shallow=False)
    write_mmproj(tmp_path / "c.gguf", vision, seed=4, name="v", ftype=ftype)
    fixture_real.write_mmproj_streaming(tmp_path / "d.gguf", vision, seed=4, name="v", ftype=ftype)
    assert filecmp.cmp(tmp_path / "c.gguf", tmp_path / "d.gguf", shallow=False)


def test_tied_output_and_padded_vocab_tensors(tmp_path: Path) -> None:
    """tie_output drops output.weight (llama.cpp reuses token_embd, as Qwen2.5-VL-3B does) and n_vocab sizes the
    embedding; every other tensor is the untied file's, value for value."""
    import gguf

    text, _, template, _ = spec("qwen25vl", "tiny")
    fixture_real.write_text_model_streaming(tmp_path / "u.gguf", text, seed=3, chat_template=template, name="t",
                                            ftype="f32")
    info = fixture_real.write_text_model_streaming(tmp_path / "t.gguf", text, seed=3, chat_template=template,
                                                   name="t", ftype="f32", tie_output=True)
    assert info["tied_output"] is True
    untied = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "u.gguf").tensors}
    tied = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    assert set(untied) - set(tied) == {"output.weight"}
    for name, arr in tied.items():
        np.testing.assert_array_equal(arr, untied[name])
    fixture_real.write_text_model_streaming(tmp_path / "p.gguf", text, seed=3, chat_template=template, name="t",
                                            ftype="f32", n_vocab=1000)
    r = gguf.GGUFReader(tmp_path / "p.gguf")
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert emb.data.shape == (1000, text.n_embd)
    assert len(r.fields["tokenizer.ggml.tokens"].data) == 1000


def test_pad_vocab() -> None:
    """Padding appends NORMAL tokens only: the base tokens, types, merges and special roles are unchanged, all
    tokens are distinct, the size is exact, and shrinking is refused."""
    base = build_vocab(family="qwen2vl")
    padded = pad_vocab(base, fixture_real.REAL_N_VOCAB)
    assert padded.n_vocab == fixture_real.REAL_N_VOCAB == QWEN25VL_3B["vocab_size"]
    assert padded.tokens[:base.n_vocab] == base.tokens and padded.token_types[:base.n_vocab] == base.token_types
    assert len(set(padded.tokens)) == padded.n_vocab
    assert set(padded.token_types[base.n_vocab:]) == {1}  # gguf.TokenType.NORMAL
    assert (padded.merges, padded.special_ids, padded.eos_id, padded.bos_id) == \
        (base.merges, base.special_ids, base.eos_id, base.bos_id)
    assert pad_vocab(base, base.n_vocab).tokens == base.tokens
    with pytest.raises(ValueError):
        pad_vocab(base, base.n_vocab - 1)


def test_real_spec_has_qwen25vl_3b_dimensions() -> None:
    """The `real` size is Qwen2.5-VL-3B's text model and full vision tower (config.json numbers above)."""
    assert "real" in SIZES
    text, vision, _, ftype = spec("qwen25vl", "real")
    c, v = QWEN25VL_3B, QWEN25VL_3B["vision"]
    assert (text.arch, text.n_embd, text.n_layer, text.n_head, text.n_head_kv, text.n_ff) == \
        ("qwen2vl", c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
         c["intermediate_size"])
    assert text.rope_theta == c["rope_theta"] and text.rms_eps == c["rms_norm_eps"]
    assert text.resolved_rope_sections()[:3] == c["mrope_section"]
    assert (vision.family, vision.n_layer, vision.n_embd, vision.n_head, vision.n_ff, vision.patch_size,
            vision.spatial_merge, vision.window_size, vision.proj_dim) == \
        ("qwen25vl", v["depth"], v["hidden_size"], v["num_heads"], v["intermediate_size"], v["patch_size"],
         v["spatial_merge_size"], v["window_size"], v["out_hidden_size"])
    # clip.cpp runs full attention in block il when (il + 1) % n_wa_pattern == 0
    assert tuple(il for il in range(vision.n_layer) if (il + 1) % vision.n_wa_pattern == 0) == \
        v["fullatt_block_indexes"]
    assert ftype == "f16"


def test_real_cache_key_follows_its_generator_code(monkeypatch) -> None:
    """The multi-GB real fixture's cache key hashes the code that writes it, so it changes with that code (here:
    the padding order) but not with the bytes of the shared files around it."""
    before = _key("qwen25vl", "real", 0)
    assert before == _key("qwen25vl", "real", 0) and before != _key("qwen25vl", "real", 1)
    monkeypatch.setattr(fixture_real, "_sources", lambda: iter(["something else"]))
    assert _key("qwen25vl", "real", 0) != before
