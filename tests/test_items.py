"""One items reader and one records reader for calibrate and bench (#16)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from avis_llamacpp import bench, calibrate
from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.items import load_items, read_records


def _items_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [{"id": "x1", "image": "a.png", "question": "q?", "options": ["red", "blue"], "answer": "blue",
              "kind": "colour"},
             {"image": "a.png", "question": "how many?", "answer": "3"}]
    p = tmp_path / "items.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in lines) + "\n\n")
    return p


def test_calibrate_and_bench_read_the_same_items(tmp_path):
    p = _items_file(tmp_path)
    cal, ben = calibrate.load_items(p), bench.load_items(p)
    assert [i.id for i in cal] == [d["id"] for d in ben] == ["x1", "item-000002"]  # default id: line number
    assert [i.gold for i in cal] == [d["gold"] for d in ben] == ["B", "3"]  # 'blue' is option B
    assert ben[0]["kind"] == "colour" and ben[0]["image_path"] == str((tmp_path / "a.png").resolve())
    assert [d["id"] for d in bench.load_items(p, limit=1)] == ["x1"]


@pytest.mark.parametrize("line, msg", [
    ({"image": "https://x/a.png", "question": "q", "answer": "a"}, "not a URL"),
    ({"image": "data:image/png;base64,AAAA", "question": "q", "answer": "a"}, "not a URL"),
    ({"image": "missing.png", "question": "q", "answer": "a"}, "not found"),
    ({"image": "a.png", "question": "q", "options": ["x", "y"], "answer": "Z"}, "option letters"),
    ({"image": "a.png", "answer": "a"}, "missing field"),
])
def test_both_refuse_the_same_bad_items(tmp_path, line, msg):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(line) + "\n")
    for reader in (calibrate.load_items, bench.load_items):
        with pytest.raises(InvalidArgumentError, match=msg):
            reader(p)


def test_truncated_last_record_is_dropped_and_the_file_repaired(tmp_path):
    p = tmp_path / "records.jsonl"
    p.write_text('{"id": "a", "config": "c"}\n{"id": "b", "config": "c"}\n{"id": "c", "conf')
    assert [r["id"] for r in read_records(p)] == ["a", "b"]
    assert p.read_text() == '{"id": "a", "config": "c"}\n{"id": "b", "config": "c"}\n'
    with p.open("a") as f:
        f.write('{"id": "c", "config": "c"}\n')
    assert [r["id"] for r in read_records(p)] == ["a", "b", "c"]
    p.write_text('{"id": "a"}\n{oops\n{"id": "b"}\n')
    with pytest.raises(InvalidArgumentError, match="corrupt record"):
        read_records(p)
    assert read_records(tmp_path / "none.jsonl") == []
    assert load_items  # the shared reader is importable from one place
