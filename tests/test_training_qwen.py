"""The Qwen2.5-VL-architecture shapes trainer's export and its PyTorch mirror against llama.cpp.

The mirror is what the bundled model was trained in; these tests hold it to stock llama.cpp (via the plugin)
on a small random-weight pair: the same first-step logits and greedy tokens with the whole image and with a
KDV-pruned image (kept tokens at their original M-RoPE positions). The writer test needs no torch.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from avis_llamacpp import VLM
from convert.mmproj import VisionDims, _Init, _qwen25vl_tensors, write_mmproj, write_mmproj_weights
from convert.shapes_task import format_question, make_item, render

SMALL = argparse.Namespace(vit_embd=32, vit_heads=2, vit_ff=64, vit_layers=2, embd=64, layers=2, heads=4, ff=160)
# one ViT head, a low text RoPE base and no t section (the bundled model's choices: columns readable by M-RoPE)
SMALL_COLUMNS = argparse.Namespace(**{**vars(SMALL), "vit_heads": 1, "text_rope_theta": 100.0,
                                      "rope_sections": (0, 4, 4, 0)})


def test_trained_qwen_mmproj_writer_matches_the_generator(tmp_path):
    """write_mmproj_weights(qwen25vl) of the generator's own arrays gives the generator's tensors, and stock mtmd
    encodes an image with it exactly as with the generator's file."""
    from convert.gguf_tensors import read_tensors

    dims = VisionDims("qwen25vl", n_embd=32, n_layer=2, n_head=2, n_ff=64, patch_size=14, image_size=224,
                      proj_dim=64, n_wa_pattern=2)
    write_mmproj(tmp_path / "gen.gguf", dims, seed=3, name="gen")
    arrays = dict(_qwen25vl_tensors(dims, _Init(3, 0.02)))
    info = write_mmproj_weights(tmp_path / "trained.gguf", dims, arrays, name="gen")
    assert info["n_image_tokens"] == 64 and info["n_blocks_run"] == 2
    a, b = read_tensors(tmp_path / "gen.gguf"), read_tensors(tmp_path / "trained.gguf")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="missing tensors"):
        write_mmproj_weights(tmp_path / "x.gguf", dims, {k: v for k, v in arrays.items() if k != "mm.2.bias"},
                             name="x")


@pytest.fixture(scope="module", params=[SMALL, SMALL_COLUMNS], ids=["qwen-default", "one-head-low-base-no-t"])
def qwen_pair(tmp_path_factory, request):
    torch = pytest.importorskip("torch")
    from training.qwen_torch import ShapesQwenVLM
    from training.train_shapes_qwen import default_dims, qwen_vocab, write_gguf_pair

    torch.manual_seed(0)
    spec = qwen_vocab()
    model = ShapesQwenVLM(default_dims(spec.n_vocab, request.param))
    with torch.no_grad():  # larger than the training init, so greedy margins are not ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    out = tmp_path_factory.mktemp("qwen-shapes")
    write_gguf_pair(model.eval(), out, spec)
    return out


def test_mirror_matches_llama_cpp_whole_and_pruned(qwen_pair):
    torch = pytest.importorskip("torch")
    from training.eval_shapes_vlm import llama_prompt, torch_mirror

    torch.set_num_threads(1)
    model, mmproj = qwen_pair / "model.gguf", qwen_pair / "mmproj.gguf"
    tm, tok = torch_mirror(model, mmproj)
    assert tm.grid == (16, 16)
    # flash attention off: llama.cpp's CPU flash path multiplies Q.K in f16 (~1e-2 relative on this random net)
    with VLM(model, mmproj, n_ctx=2048, n_threads=1, n_threads_batch=1, flash_attn=False) as vlm:
        for i in range(2):
            item = make_item("test", i)
            img, text = np.asarray(render(item.scene)), format_question(item.question)
            chunks, want = llama_prompt(vlm, img, text)
            assert chunks == [tok.prefix(), tok.question(item.question)]  # the training layout is mtmd's
            whole = vlm.ask(img, text, answer_tags=True, max_tokens=12)
            out, first = tm.greedy(img, tok.prefix(), tok.question(item.question), max_tokens=12, eos=tok.eos)
            got = first.double().numpy()
            # llama.cpp rounds K/V to f16 and takes GELU from an f16 table
            assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
            assert out == whole.tokens
            pruned = vlm.ask(img, text, answer_tags=True, max_tokens=12, ratio=0.75)
            kept = np.asarray(pruned.images[0]["kept"])
            assert len(kept) == 64 and pruned.images[0]["key_source"].startswith("vit_keys")
            out_p, _ = tm.greedy(img, tok.prefix(), tok.question(item.question), max_tokens=12, eos=tok.eos,
                                 kept=kept)
            assert out_p == pruned.tokens
            # the mirror's own KDV keys pick the same tokens as the plugin's captured ViT keys
            from avis_llamacpp.kdv import kdv_scores
            from training.vlm_torch import pixels
            with torch.no_grad():
                _, keys = tm.vision(pixels(img[None]))
            scores = kdv_scores(keys[0].double().numpy())
            assert np.array_equal(np.sort(np.argsort(-scores, kind="stable")[:64]), kept)


def test_mirror_vision_equals_numpy_reference(qwen_pair):
    """The mirror's ViT + merger against the numpy re-implementation of qwen2vl.cpp (tests/reference_vit.py, exact
    GELU): embeddings in raster token order, and the last block's post-RoPE keys averaged per merged token."""
    torch = pytest.importorskip("torch")
    from tests.reference_vit import qwen25vl_forward
    from training.eval_shapes_vlm import torch_mirror
    from training.vlm_torch import pixels

    tm, _ = torch_mirror(qwen_pair / "model.gguf", qwen_pair / "mmproj.gguf")
    img = np.asarray(render(make_item("test", 3).scene))
    ref = qwen25vl_forward(qwen_pair / "mmproj.gguf", img, act="exact")
    with torch.no_grad():
        emb, keys = tm.vision(pixels(img[None]))
    want = ref["embeddings"]
    assert np.abs(emb[0].double().numpy() - want).max() <= 1e-4 * np.abs(want).max()
    last = ref["keys_rope"][-1]
    want_keys = last.reshape(-1, 4, *last.shape[1:]).mean(1)[ref["window_idx"]]
    assert np.abs(keys[0].double().numpy() - want_keys).max() <= 1e-4 * np.abs(want_keys).max()


def test_rope_permutation_keeps_the_text_function():
    """A llama (RoPE NORM) text model's weights, q/k rows permuted to NEOX pairs, give the same logits in the
    qwen2vl (M-RoPE) mirror on text, where t = h = w."""
    torch = pytest.importorskip("torch")
    from convert.text_model import TextModelDims
    from training.qwen_torch import QwenText, permute_rope_norm_to_neox, text_positions
    from training.vlm_torch import LlamaText

    torch.manual_seed(1)
    d_llama = TextModelDims("llama", n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=160)
    d_qwen = TextModelDims("qwen2vl", n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=160)
    src, dst = LlamaText(d_llama, 50), QwenText(d_qwen, 50)
    sd = {}
    for k, v in src.state_dict().items():
        if k.endswith((".q.weight", ".k.weight")):
            v = torch.from_numpy(permute_rope_norm_to_neox(v.numpy(), 4))
        sd[k] = v
    for k, v in dst.state_dict().items():
        if k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
    dst.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 50, (1, 20))
    with torch.no_grad():
        a = src.logits(src.hidden(src.embd(ids), torch.arange(5, 25), None))
        b = dst.logits(dst.hidden(dst.embd(ids), text_positions(5, 20)[None], None))
        assert torch.allclose(a, b, atol=1e-5)
        plain = {k: (v if not k.endswith((".q.weight", ".k.weight")) else src.state_dict()[k]) for k, v in sd.items()}
        dst.load_state_dict(plain)  # without the permutation the function differs
        c = dst.logits(dst.hidden(dst.embd(ids), text_positions(5, 20)[None], None))
        assert not torch.allclose(a, c, atol=1e-3)


def test_aux_heads_weigh_object_tokens_in_the_colour_and_shape_terms():
    """AuxHeads' loss equals a hand-written weighted cross-entropy: colour and shape terms count a token on an
    object object_weight times, the centre / row / column terms count every token once (row and column only the
    object tokens with place_on_objects); weight 1 is the plain mean."""
    torch = pytest.importorskip("torch")
    from training.train_shapes_qwen import GRID, AuxHeads

    torch.manual_seed(3)
    img = torch.randn(2, GRID * GRID, 8)
    labels = torch.zeros(2, 3, GRID * GRID, dtype=torch.long)
    labels[0, 0, :40], labels[0, 1, :40], labels[0, 2, 5] = 2, 3, 1  # 40 object tokens in image 0, none in 1
    rows = np.arange(GRID * GRID)
    targets = np.concatenate([labels.numpy(), np.broadcast_to(np.stack([rows // GRID, rows % GRID]), (2, 2, 256))],
                             axis=1)

    def oracle(aux: AuxHeads, w: float, place_on_objects: bool = False) -> float:
        total = 0.0
        on_object = labels[:, 0].numpy().reshape(-1) > 0
        for i, head in enumerate(aux.heads):
            z = head(img).detach().double().numpy().reshape(-1, head.out_features)
            logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
            ce = -logp[np.arange(len(z)), targets[:, i].reshape(-1)]
            weight = np.where(on_object, w, 1.0) if i < 2 else np.ones_like(ce)
            if i >= 3 and place_on_objects:  # row and column: the object tokens' mean
                total += float(ce[on_object].mean())
            else:
                total += float((ce * weight).sum() / len(ce))
        return total

    for w in (1.0, 4.0):
        aux = AuxHeads(8, object_weight=w)
        assert abs(float(aux(img, labels)) - oracle(aux, w)) < 1e-4
        aux = AuxHeads(8, object_weight=w, place_on_objects=True)
        assert abs(float(aux(img, labels)) - oracle(aux, w, place_on_objects=True)) < 1e-4
    heavy, plain = AuxHeads(8, object_weight=4.0), AuxHeads(8)
    plain.load_state_dict(heavy.state_dict())
    assert float(heavy(img, labels)) > float(plain(img, labels)) + 1e-3


def test_count_targets_and_answer_start_rows(qwen_pair):
    """The batcher's counts hold each colour's, shape's and colour-shape pair's object count (counted here by
    a plain loop over the scene), and answer_start_* name the rows whose answer-loss label is the branch's first
    target token."""
    pytest.importorskip("torch")
    from avis_llamacpp.prompt import QWEN25VL
    from convert.shapes_task import COLOURS, SHAPES, SPLITS, make_scene
    from training.data import Tokenizer
    from training.train_shapes_qwen import Batcher

    tok = Tokenizer(qwen_pair / "model.gguf", QWEN25VL)
    batcher = Batcher(tok, batch=3, questions=2, seed=5, prune_prob=1.0)
    first_target = tok.encode("<think>")
    for _ in range(2):
        b = batcher.next()
        for i in range(3):
            scene = make_scene(np.random.default_rng([SPLITS["train"], 5, b["index"] + i]))
            expected = [sum(o.colour == c for o in scene.objects) for c in COLOURS]
            expected += [sum(o.shape == s for o in scene.objects) for s in SHAPES]
            expected += [sum(o.colour == c and o.shape == s for o in scene.objects) for c in COLOURS for s in SHAPES]
            assert b["counts"][i].tolist() == expected
        labels = dict(zip(zip(b["rows"].tolist(), b["cols"].tolist()), b["labels"].tolist()))
        starts = list(zip(b["answer_start_rows"].tolist(), b["answer_start_cols"].tolist()))
        assert len(starts) == 6 and sorted({r for r, _ in starts}) == [0, 1, 2]
        assert [labels[s] for s in starts] == first_target * 6


def test_count_head_loss_is_the_mean_cross_entropy_over_counted_kinds():
    """CountHead's loss equals a hand-written mean cross-entropy over every (branch, counted kind) pair."""
    torch = pytest.importorskip("torch")
    from training.train_shapes_qwen import COUNTED, MAX_COUNT, CountHead

    torch.manual_seed(4)
    head = CountHead(8)
    hidden = torch.randn(5, 8)
    counts = torch.randint(0, MAX_COUNT + 1, (5, len(COUNTED)))
    z = head.proj(hidden).detach().double().numpy().reshape(5, len(COUNTED), MAX_COUNT + 1)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, counts.numpy()[..., None], -1).mean()
    assert abs(float(head(hidden, counts)) - expected) < 1e-5


def test_spatial_places_name_each_objects_centre_cell_and_fit_the_decode_budget(qwen_pair):
    """--spatial-places traces put each named object at the token cell that patch_labels marks as its centre (and
    colours with its colour), end with the task's own trace, and stay under the 96 tokens eval and calibrate
    decode."""
    pytest.importorskip("torch")
    import re

    from avis_llamacpp.prompt import QWEN25VL
    from convert.shapes_task import COLOURS, make_item
    from training.data import Tokenizer
    from training.train_shapes_qwen import CELL, GRID, Batcher, patch_labels, spatial_places_think

    tok = Tokenizer(qwen_pair / "model.gguf", QWEN25VL)
    batcher = Batcher(tok, batch=1, questions=1, seed=0, spatial_places=True)
    place = re.compile(r"The (\w+) (\w+) is at row (\d+), column (\d+)\.")
    n = 0
    for i in range(400):
        it = make_item("train", i, kind="spatial")
        if it.question.kind != "spatial":
            continue
        think = spatial_places_think(it.question, it.scene)
        assert think.endswith(" " + it.question.think)
        labels = patch_labels(it.scene, GRID, CELL)
        found = place.findall(think)
        assert [f"{c} {s}" for c, s, _, _ in found] == re.findall(r"the (\w+ \w+)", it.question.text)
        for colour, _shape, row, col in found:
            cell = int(row) * GRID + int(col)
            assert labels[2, cell] == 1 and labels[0, cell] == 1 + list(COLOURS).index(colour)
        assert len(batcher.target(it.question, it.scene)) <= 96
        n += 1
    assert n > 50
    with pytest.raises(ValueError, match="not a spatial question"):
        spatial_places_think(make_item("train", 0, kind="count").question, make_item("train", 0).scene)


def test_compare_present_draws_the_second_colour_from_the_image(qwen_pair):
    """compare_present=1 makes every compare question's second colour one that is in the image (counted by a
    plain loop); 0 leaves the task's own questions (the same draws as make_question)."""
    pytest.importorskip("torch")
    from avis_llamacpp.prompt import QWEN25VL
    from convert.shapes_task import Obj, Scene, compare_question, make_question, make_scene
    from training.data import Tokenizer
    from training.train_shapes_qwen import Batcher

    tok = Tokenizer(qwen_pair / "model.gguf", QWEN25VL)
    always = Batcher(tok, batch=1, questions=1, seed=0, compare_present=1.0)
    never = Batcher(tok, batch=1, questions=1, seed=0)
    n_compare, absent_in_task = 0, 0
    for i in range(300):
        scene = make_scene(np.random.default_rng([9, i]))
        q = always.question(scene, np.random.default_rng([8, i]))
        task_q = make_question(scene, np.random.default_rng([8, i]))
        assert never.question(scene, np.random.default_rng([8, i])) == task_q
        if q.kind != "compare":
            continue
        n_compare += 1
        second = q.text.split(" or more ")[1].split()[0]
        colours_here = {o.colour for o in scene.objects}
        assert second in colours_here or len(colours_here) == 1
        absent_in_task += task_q.kind == "compare" and task_q.text.split(" or more ")[1].split()[0] not in colours_here
    assert n_compare > 30 and absent_in_task > 10  # the task's own draw often names an absent colour
    one_colour = Scene(0.0, [Obj("circle", "red", 50, 50, 10)], (255, 255, 255), "plain", 0, 0, 0, 1)
    assert compare_question(one_colour, np.random.default_rng(0), second_present=True) is None


def test_locate_questions_mark_the_named_objects_centre_cell(qwen_pair):
    """--locate-share questions ask for a unique colour-shape pair and their answer is the token cell that
    patch_labels marks as its centre (and colours with its colour), among four distinct cells; share 0 leaves the
    task's own draws."""
    pytest.importorskip("torch")
    import re

    from avis_llamacpp.prompt import QWEN25VL
    from convert.shapes_task import COLOURS, LETTERS, make_question, make_scene
    from training.data import Tokenizer
    from training.train_shapes_qwen import CELL, GRID, Batcher, locate_question, patch_labels

    tok = Tokenizer(qwen_pair / "model.gguf", QWEN25VL)
    always = Batcher(tok, batch=1, questions=1, seed=0, locate_share=1.0)
    never = Batcher(tok, batch=1, questions=1, seed=0)
    cell_text = re.compile(r"row (\d+), column (\d+)")
    n, longest = 0, 0
    for i in range(200):
        scene = make_scene(np.random.default_rng([7, i]))
        assert never.question(scene, np.random.default_rng([6, i])) == make_question(scene,
                                                                                    np.random.default_rng([6, i]))
        q = always.question(scene, np.random.default_rng([6, i]))
        if q.kind != "locate":
            assert locate_question(scene, np.random.default_rng(0)) is None
            continue
        n += 1
        colour, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", q.text).groups()
        assert scene.count(shape=shape, colour=colour) == 1
        cells = [tuple(map(int, cell_text.fullmatch(o).groups())) for o in q.options]
        assert len(set(cells)) == 4 and all(0 <= r < GRID and 0 <= c < GRID for r, c in cells)
        row, col = cells[LETTERS.index(q.answer)]
        labels = patch_labels(scene, GRID, CELL)
        assert labels[2, row * GRID + col] == 1 and labels[0, row * GRID + col] == 1 + list(COLOURS).index(colour)
        assert q.think == f"The {colour} {shape} is at {q.options[LETTERS.index(q.answer)]}."
        longest = max(longest, len(always.target(q, scene)))
    assert n > 100
    assert longest <= 110  # training-only, never decoded at 96 tokens; longer branches would pad every batch


def test_grad_shares_match_a_backward_pass_per_term(qwen_pair):
    """term_grad_norms gives, for each weighted loss term, the norm of the gradients a plain .backward() of that
    term alone leaves on the ViT's and the text model's parameters; the auxiliary term never reaches the text
    model, and doubling its weight doubles its norms."""
    torch = pytest.importorskip("torch")
    from avis_llamacpp.prompt import QWEN25VL
    from training.data import Tokenizer
    from training.grad_shares import term_grad_norms
    from training.qwen_torch import ShapesQwenVLM, dims_from_gguf
    from training.train_shapes_qwen import AuxHeads, Batcher, loss_fn

    torch.manual_seed(1)
    model = ShapesQwenVLM(dims_from_gguf(qwen_pair / "model.gguf", qwen_pair / "mmproj.gguf"))
    aux = AuxHeads(model.dims.vision.proj_dim, 4.0)
    batch = Batcher(Tokenizer(qwen_pair / "model.gguf", QWEN25VL), batch=2, questions=2, seed=3,
                    prune_prob=0.0).next()
    norms = term_grad_norms(model, aux, batch, aux_weight=0.5, question_weight=0.5)
    answer, aux_loss, question, _ = loss_fn(model, aux, batch, 0, True)
    for name, term in (("answer", answer), ("aux", 0.5 * aux_loss), ("question", 0.5 * question)):
        model.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        for group, module in (("vision", model.vision), ("text", model.text)):
            expected = sum(float((p.grad.double() ** 2).sum()) for p in module.parameters() if p.grad is not None)
            assert norms[name][group] == pytest.approx(expected ** 0.5, rel=1e-6, abs=1e-12)
    assert norms["aux"]["text"] == 0.0 and norms["aux"]["vision"] > 0 and norms["answer"]["text"] > 0
    doubled = term_grad_norms(model, aux, batch, aux_weight=1.0, question_weight=0.5)
    assert doubled["aux"]["vision"] == pytest.approx(2 * norms["aux"]["vision"], rel=1e-6)
