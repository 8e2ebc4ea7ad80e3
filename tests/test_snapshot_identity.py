"""A snapshot's identity (model files, prefix text, image digests, pruning): each field, changed alone, is refused
with SnapshotMismatchError instead of answering from the old KV (issue #34).

Controls: the same query with nothing changed answers like a direct query (same kept set, same tokens), so the
refusals are not a snapshot that never works. A saved file whose identity field was edited (its stored digest
left as it was) is refused on load."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avis_llamacpp.errors import InvalidArgumentError, SnapshotMismatchError
from avis_llamacpp.pipeline import VLM
from avis_llamacpp.snapshot import Snapshot
from tests.family_helpers import noise_images

KW = dict(n_ctx=1024, n_seq_max=2, flash_attn=False, n_threads=1, n_threads_batch=1)
Q = "What is in the picture?"


@pytest.fixture(scope="module")
def vlm(vlm_fixture):
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, **KW) as v:
        yield v


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Two noise images of one size, and a copy of the first with a single pixel changed."""
    return noise_images(tmp_path_factory.mktemp("snapshot-identity"), (100, 33, 2))


def _same(a: Any, b: Any) -> None:
    assert [im["kept"] for im in a.images] == [im["kept"] for im in b.images]
    assert a.tokens == b.tokens and a.prompt_tokens == b.prompt_tokens


PRUNINGS = {
    "ratio_to_other_ratio": ({"ratio": 0.5}, {"ratio": 0.25}),
    "ratio_to_tau": ({"ratio": 0.5}, {"tau": math.pi / 4}),
    "tau_to_other_tau": ({"tau": math.pi / 4}, {"tau": 1.2}),
    "tau_to_ratio": ({"tau": math.pi / 4}, {"ratio": 0.5}),
    "unpruned_to_ratio": ({}, {"ratio": 0.5}),
    "unpruned_to_tau": ({}, {"tau": 1.2}),
}


@pytest.mark.parametrize("change", sorted(PRUNINGS))
def test_another_pruning_is_refused(vlm, images, change):
    made, asked = PRUNINGS[change]
    img = images["a"]
    snap = vlm.snapshot(img, **made)
    with pytest.raises(SnapshotMismatchError, match="pruned with"):
        vlm.ask(None, Q, max_tokens=4, snapshot=snap, **asked)
    with pytest.raises(SnapshotMismatchError, match="pruned with"):
        vlm.ask(img, Q, max_tokens=4, snapshot=snap, **asked)
    # the controls: the snapshot's own pruning, given or left out, answers like a direct query
    direct = vlm.ask(img, Q, max_tokens=6, **made)
    _same(vlm.ask(None, Q, max_tokens=6, snapshot=snap, **made), direct)
    _same(vlm.ask(None, Q, max_tokens=6, snapshot=snap), direct)


def _first_tokens(image: Any, n_keep: int) -> np.ndarray:
    return np.arange(n_keep)


@pytest.mark.parametrize("selector", ["uniform", "random", "embeddings", _first_tokens],
                         ids=["uniform", "random", "embeddings", "callable"])
def test_another_selector_is_refused(vlm, images, selector):
    """A snapshot's kept tokens were chosen by KDV: a baseline asked on it must not answer from that KV."""
    snap = vlm.snapshot(images["a"], ratio=0.5)
    with pytest.raises(SnapshotMismatchError, match="chosen by KDV"):
        vlm.ask(None, Q, max_tokens=4, snapshot=snap, ratio=0.5, selector=selector)
    _same(vlm.ask(None, Q, max_tokens=6, snapshot=snap, ratio=0.5, selector="kdv"),  # the control
          vlm.ask(images["a"], Q, max_tokens=6, ratio=0.5))


@pytest.mark.parametrize("which", ["mmproj", "text_model"])
def test_another_model_file_alone_is_refused(vlm_fixture, fixture_root, images, which):
    from convert.fixtures import make_fixture

    other = make_fixture(vlm_fixture.family, "tiny", seed=1, out_dir=fixture_root)
    model, mmproj = (vlm_fixture.model, other.mmproj) if which == "mmproj" else (other.model, vlm_fixture.mmproj)
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, **KW) as v:
        snap = v.snapshot(images["a"], ratio=0.5)
    with VLM(model, mmproj, **KW) as v2:
        assert v2.render_question(Q, 1).startswith(snap.prefix_text)  # only the model differs
        with pytest.raises(SnapshotMismatchError, match="different text model or mmproj"):
            v2.ask(None, Q, max_tokens=4, snapshot=snap)
        with pytest.raises(SnapshotMismatchError, match="different text model or mmproj"):
            v2.ask(images["a"], Q, max_tokens=4, snapshot=snap, ratio=0.5)


def test_another_prefix_text_alone_is_refused(vlm, images):
    snap = vlm.snapshot(images["a"])
    full = vlm.render_question(Q, 1)
    assert full.startswith(snap.prefix_text)
    prefix, question = snap.prefix_text, full[len(snap.prefix_text):]
    at = next(i for i, ch in enumerate(prefix) if ch.isascii() and ch.isalpha())
    edited = prefix[:at] + prefix[at].swapcase() + prefix[at + 1:]  # one letter's case
    with pytest.raises(SnapshotMismatchError, match="prompt prefix differs"):
        vlm.generate(edited + question, [], max_tokens=4, snapshot=snap)
    with pytest.raises(SnapshotMismatchError):  # two images asked of a one-image snapshot
        vlm.ask([images["a"], images["a"]], Q, max_tokens=4, snapshot=snap)
    _same(vlm.generate(full, [], max_tokens=6, snapshot=snap), vlm.ask(images["a"], Q, max_tokens=6))


def test_more_image_markers_than_the_snapshot_has_are_refused(vlm, images):
    snap = vlm.snapshot(images["a"])
    two = vlm.render_question(Q, 2)
    assert two.startswith(snap.prefix_text)
    with pytest.raises((SnapshotMismatchError, InvalidArgumentError)):
        vlm.generate(two, [], max_tokens=4, snapshot=snap)


def test_other_image_digests_alone_are_refused(vlm, images):
    snap = vlm.snapshot([images["a"], images["b"]], ratio=0.5)
    for imgs in ([images["a_pixel"], images["b"]], [images["b"], images["a"]], [images["a"], images["a"]]):
        with pytest.raises(SnapshotMismatchError, match="images passed differ"):
            vlm.ask(imgs, Q, max_tokens=4, snapshot=snap)
    direct = vlm.ask([images["a"], images["b"]], Q, max_tokens=6, ratio=0.5)
    _same(vlm.ask([images["a"], images["b"]], Q, max_tokens=6, snapshot=snap), direct)


class _StaleDigest(Snapshot):
    """A snapshot written with a digest given beforehand (what an edit of the file's metadata leaves)."""

    stale: str = ""

    @property
    def digest(self) -> str:  # type: ignore[override]
        return self.stale


@pytest.mark.parametrize("field, value", [("model_id", "0" * 64), ("prefix_text", None),
                                          ("image_digests", None), ("pruning", {"ratio": 0.25, "tau": None})])
def test_an_edited_identity_field_in_a_saved_file_is_refused(vlm, images, tmp_path, field, value):
    snap = vlm.snapshot([images["a"], images["b"]], ratio=0.5)
    if field == "prefix_text":
        value = snap.prefix_text.replace(snap.prefix_text.strip()[-1], "?", 1)
    elif field == "image_digests":
        value = list(reversed(snap.image_digests))
    assert value != getattr(snap, field)
    snap.save(tmp_path / "good.gguf")
    assert Snapshot.load(tmp_path / "good.gguf").digest == snap.digest  # the control
    forged = _StaleDigest(**{f.name: getattr(snap, f.name) for f in dataclasses.fields(Snapshot)})
    forged.stale = snap.digest
    setattr(forged, field, value)
    forged.save(tmp_path / "forged.gguf")
    with pytest.raises(SnapshotMismatchError, match="digest mismatch"):
        Snapshot.load(tmp_path / "forged.gguf")
