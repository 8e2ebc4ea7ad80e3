"""The trainer's packed batches (shared image prefix, several questions, optional pruning) give exactly the loss of
separate sequences, and its synthetic copy task is what it says (needs torch; skipped without it)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from training.data import Tokenizer, task_vocab  # noqa: E402
from training.train_shapes_vlm import (  # noqa: E402
    AuxHeads, Batcher, CopyTask, default_dims, loss_fn, write_gguf_pair)
from training.vlm_torch import ShapesVLM, pixels  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    spec = task_vocab()
    args = argparse.Namespace(embd=32, layers=2, heads=2, ff=64, vit_embd=32, vit_layers=1)
    model = ShapesVLM(default_dims(spec.n_vocab, args)).eval()
    with torch.no_grad():  # sharpen the random model so the loss depends on the image and on word order
        model.text.embd.weight.mul_(20)
        model.vision.mm2.weight.mul_(100)
        for blk in model.text.blocks:
            blk.q.weight.mul_(5)
            blk.k.weight.mul_(5)
    out = tmp_path_factory.mktemp("tiny-trainer")
    write_gguf_pair(model, out, spec)
    return model, Tokenizer(out / "model.gguf")


def _separate_loss(model, tok, batcher, batch, start_index):
    """Answer loss from one plain causal sequence per (image, question): the oracle for the packed batch."""
    total, count = 0.0, 0
    for b in range(batcher.batch):
        image, pairs, _ = batcher.sample(start_index + b)
        img = model.vision(pixels(image[None]))
        img = img[:, batch["keep"][b]]
        for q, t in pairs:
            seq = q + t
            x = model.embed_prompt(torch.tensor([tok.prefix()]), img, torch.tensor([seq]))
            h = model.text.hidden(x, torch.arange(x.shape[1]), None)[0]
            first = x.shape[1] - len(seq)
            pred = h[first + len(q) - 1:first + len(seq) - 1]
            ce = F.cross_entropy(model.text.logits(pred), torch.tensor(seq[len(q):]), reduction="sum")
            total, count = total + float(ce), count + len(t)
    return total / count


@pytest.mark.parametrize("prune_prob", [0.0, 1.0])
def test_packed_loss_equals_separate_sequences(setup, prune_prob):
    model, tok = setup
    batcher = Batcher(tok, batch=2, questions=2, seed=3, prune_prob=prune_prob)
    batcher.next_index = 40
    batch = batcher.next()
    n_keep = batch["keep"].shape[1]
    assert (n_keep == 196) == (prune_prob == 0.0)
    for row in batch["keep"]:
        assert torch.all(row[1:] > row[:-1])  # original order, no repeats
    aux = AuxHeads(model.dims.vision.proj_dim)
    with torch.no_grad():
        packed, _, _ = loss_fn(model, aux, batch)
        want = _separate_loss(model, tok, batcher, batch, 40)
        shuffled = _separate_loss(model, tok, batcher, dict(batch, keep=torch.flip(batch["keep"], [1])), 40)
    assert float(packed) == pytest.approx(want, rel=1e-5)
    assert abs(shuffled - want) > 50 * abs(float(packed) - want)  # the check would see image tokens out of order


def test_pruning_augmentation_prefers_object_patches(setup):
    _, tok = setup
    batcher = Batcher(tok, batch=4, questions=1, seed=0, prune_prob=1.0)
    on_object = kept_share = 0.0
    for _ in range(5):
        samples = [batcher.sample(i) for i in range(4)]
        n, keep = batcher.kept_tokens([lab for _, _, lab in samples])
        assert 16 <= n < 196 and keep.shape == (4, n)
        for (_, _, lab), row in zip(samples, keep):
            obj = lab[0] > 0
            if obj.any() and (~obj).any():
                on_object += obj[row.numpy()].mean()
                kept_share += obj.mean()
    assert on_object > kept_share  # object patches are over-represented among the kept ones


def test_copy_task_repeats_its_string(setup):
    _, tok = setup
    task = CopyTask(tok, batch=3, seed=1)
    b = task.next()
    seq = b["tokens"].numpy()
    cols = b["cols"].numpy()[: len(b["cols"]) // 3]
    n = len(cols) + 1
    assert np.array_equal(seq[:, :n], seq[:, -n:])  # the string, then filler, then the string again
    # every label is the next token of the repeat, i.e. predictable from the first copy
    assert np.array_equal(b["labels"].numpy().reshape(3, -1), seq[:, cols + 1])
    assert np.array_equal(seq[:, cols + 1], seq[:, 1:n])
    assert b["pos"][0] >= 0 and len(b["pos"]) == seq.shape[1]
