"""The benchmark harness on a fixture: every configuration, table / CSV / PNG, resume, Ray == in-process."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from avis_llamacpp import bench
from avis_llamacpp.bench import BenchConfig, bootstrap_ci, default_configs, run_bench

TIMING = {"wall_s", "ttft_s"}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    from convert.shapes_task import export

    return export("test", 3, tmp_path_factory.mktemp("items"))


def test_all_configurations_and_outputs(llava_fixture, items, tmp_path):
    rows = run_bench(str(llava_fixture.model), str(llava_fixture.mmproj), str(items), tmp_path, max_tokens=3,
                     progress=False)
    names = [c.name for c in default_configs(with_policy=False)]
    assert [r["config"] for r in rows] == names
    by = {r["config"]: r for r in rows}
    assert by["vanilla"]["flops_rel"] == pytest.approx(1.0) and by["vanilla"]["kept_fraction"] == 1.0
    assert by["kdv rho=0.75"]["kept_tokens"] == 49 and by["sc k=5"]["mean_k"] == 5
    for name in ("random rho=0.75", "uniform rho=0.75", "embeddings rho=0.75"):
        assert by[name]["kept_tokens"] == by["kdv rho=0.75"]["kept_tokens"]
    assert by["kdv rho=0.9"]["flops_rel"] < by["kdv rho=0.5"]["flops_rel"] < 1.0
    table, paired = (tmp_path / "table.md").read_text().split("Paired differences")
    table, kinds = table.split("Accuracy by item kind")
    assert table.count("\n| ") == len(names) + 1 and kinds.count("\n| ") == len(names) + 1
    # KDV against each baseline at 75% and 90%, every other row against vanilla
    assert paired.count("\n| ") == 1 + 6 + len(names) - 1 and "| kdv rho=0.9 | uniform rho=0.9 | 3 |" in paired
    with (tmp_path / "results.csv").open() as f:
        assert [r["config"] for r in csv.DictReader(f)] == names
    from PIL import Image
    assert Image.open(tmp_path / "accuracy_vs_flops.png").size[0] > 300
    n_records = len((tmp_path / "records.jsonl").read_text().splitlines())
    assert n_records == 3 * len(names)
    # resume: nothing left to do, no new records
    calls = []
    orig = bench.evaluate_item
    bench.evaluate_item = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        run_bench(str(llava_fixture.model), str(llava_fixture.mmproj), str(items), tmp_path, max_tokens=3,
                  progress=False)
    finally:
        bench.evaluate_item = orig
    assert calls == [] and len((tmp_path / "records.jsonl").read_text().splitlines()) == n_records


def test_paired_differences_by_hand():
    """a - b over the items both ran; the paired interval is degenerate when every item differs the same way."""
    recs = [{"config": c, "id": i, "correct": ok} for c, i, ok in (
        ("a", "1", True), ("a", "2", True), ("a", "3", False), ("a", "4", True),
        ("b", "1", False), ("b", "2", True), ("b", "3", False), ("b", "5", True))]
    (d,) = bench.paired_differences(recs, [("a", "b")])
    assert (d["n"], d["diff"], d["a_only"], d["b_only"]) == (3, 1 / 3, 1, 0)  # items 1-3 only
    assert 0.0 <= d["ci_low"] <= 1 / 3 <= d["ci_high"] <= 1.0
    same = [{"config": c, "id": str(i), "correct": c == "a"} for c in "ab" for i in range(20)]
    (d,) = bench.paired_differences(same, [("a", "b")])
    assert (d["diff"], d["ci_low"], d["ci_high"]) == (1.0, 1.0, 1.0)
    assert bench.paired_differences(recs, [("a", "missing")]) == []


def test_bootstrap_interval():
    assert bootstrap_ci([True] * 10) == (1.0, 1.0)
    lo, hi = bootstrap_ci([True, False] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3


def test_ray_equals_single_process(llava_fixture, items, tmp_path):
    pytest.importorskip("ray")
    configs = [BenchConfig("vanilla"), BenchConfig("kdv rho=0.5", ratio=0.5), BenchConfig("sc k=3", k=3)]
    run_bench(str(llava_fixture.model), str(llava_fixture.mmproj), str(items), tmp_path / "one", configs=configs,
              max_tokens=4, progress=False)
    run_bench(str(llava_fixture.model), str(llava_fixture.mmproj), str(items), tmp_path / "ray", configs=configs,
              max_tokens=4, progress=False, ray_workers=2)

    def load(d):
        rows = [json.loads(x) for x in (d / "records.jsonl").read_text().splitlines()]
        return sorted(({k: v for k, v in r.items() if k not in TIMING} for r in rows),
                      key=lambda r: (r["id"], r["config"]))
    assert load(tmp_path / "one") == load(tmp_path / "ray")
    import ray
    ray.shutdown()


def test_calibration_workers_get_the_callers_session(llava_fixture, items, tmp_path, monkeypatch):
    """Ray workers of `avis calibrate` are built with the caller's threads, batch, flash attention and chat format
    (unpinned threads in two workers oversubscribed a 2-core machine: 4 items took two minutes), and a VLM built
    from those keywords has the same settings as the caller's."""
    from avis_llamacpp import VLM, distributed
    from avis_llamacpp.calibrate import run_calibration

    seen = {}

    def fake_ray_map(fn_path, todo, *, vlm_kwargs, **kw):
        seen.update(vlm_kwargs)
        raise KeyboardInterrupt  # stop here: only the workers' settings are under test

    monkeypatch.setattr(distributed, "ray_map", fake_ray_map)
    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=1024, n_threads=1, n_threads_batch=1, n_batch=256,
             flash_attn=False, chat_format="llava-1-5", system_prompt="Be brief.") as vlm:
        with pytest.raises(KeyboardInterrupt):
            run_calibration(vlm, items, tmp_path / "cal", k_max=3, max_tokens=4, progress=False, ray_workers=2)
        assert seen["n_threads"] == 1 and seen["n_threads_batch"] == 1 and seen["n_seq_max"] >= 3
        with VLM(llava_fixture.model, llava_fixture.mmproj, **{**seen, "n_seq_max": vlm.settings.n_seq_max}) as twin:
            assert twin.settings == vlm.settings
            assert twin.chat_format == vlm.chat_format and twin.system_prompt == "Be brief."


def test_calibration_on_ray_equals_in_process(llava_fixture, items, tmp_path):
    pytest.importorskip("ray")
    from avis_llamacpp import VLM
    from avis_llamacpp.calibrate import run_calibration

    with VLM(llava_fixture.model, llava_fixture.mmproj, n_ctx=2048) as vlm:
        one = run_calibration(vlm, items, tmp_path / "one", k_max=3, max_tokens=4, progress=False)
        dist = run_calibration(vlm, items, tmp_path / "ray", k_max=3, max_tokens=4, progress=False, ray_workers=2)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    assert strip(one) == strip(dist) and len(one) == 3
    import ray
    ray.shutdown()


def test_policy_row_is_named_from_the_policy_file(tmp_path):
    """The policy row says what the policy does (the LLaVA-style shapes policy prunes nothing), not a fixed
    'tau + policy'."""
    from avis_llamacpp.bench import policy_label
    from avis_llamacpp.defaults import LLAVA_SHAPES_DIR
    from avis_llamacpp.policy import load_policy

    path = LLAVA_SHAPES_DIR / "policy.gguf"
    pol = load_policy(path)
    assert pol.tau is None and pol.ratio is None
    assert policy_label(path) == "avis (policy K, no pruning)"
    names = [c.name for c in default_configs(with_policy=True, policy_name=policy_label(path))]
    assert names[-1] == "avis (policy K, no pruning)" and "tau + policy" not in " ".join(names)


def test_rerun_with_other_settings_never_mixes_records(llava_fixture, items, tmp_path):
    """A re-run into the same folder with other settings is refused, naming them, and leaves the records as they
    were; --no-resume (resume=False) deletes them and starts over; the same settings resume."""
    from avis_llamacpp.errors import InvalidArgumentError

    configs = [BenchConfig("vanilla"), BenchConfig("sc k=3", k=3)]
    args = (str(llava_fixture.model), str(llava_fixture.mmproj), str(items), tmp_path)
    run_bench(*args, configs=configs, max_tokens=6, progress=False, n_threads=1)
    rec = tmp_path / "records.jsonl"
    first = rec.read_text()
    assert max(json.loads(x)["decode_tokens"] for x in first.splitlines()) > 3 * 2  # some rollout used > 2 tokens
    for kw, named in ((dict(max_tokens=2), "max_tokens: 6 recorded, 2 now"),
                      (dict(max_tokens=6, temperature=1.0), "temperature: 0.7 recorded, 1.0 now"),
                      (dict(max_tokens=6, answer_tags=False), "answer_tags: True recorded, False now"),
                      (dict(max_tokens=6, seed=3), "seed: 0 recorded, 3 now")):
        with pytest.raises(InvalidArgumentError, match=f"other settings \\({named}\\).*--no-resume"):
            run_bench(*args, configs=configs, progress=False, n_threads=1, **kw)
        assert rec.read_text() == first
    # a folder from before bench.json: its run.json holds the settings
    (tmp_path / "bench.json").unlink()
    with pytest.raises(InvalidArgumentError, match="max_tokens: 6 recorded, 2 now"):
        run_bench(*args, configs=configs, max_tokens=2, progress=False, n_threads=1)
    run_bench(*args, configs=configs, max_tokens=2, progress=False, n_threads=1, resume=False)
    recs = [json.loads(x) for x in rec.read_text().splitlines()]
    assert len(recs) == 3 * len(configs) and all(r["decode_tokens"] <= 2 * r["k"] for r in recs)
    assert json.loads((tmp_path / "run.json").read_text())["max_tokens"] == 2
    calls = []
    orig = bench.evaluate_item
    bench.evaluate_item = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        run_bench(*args, configs=configs, max_tokens=2, progress=False, n_threads=1)
    finally:
        bench.evaluate_item = orig
    assert calls == [] and len(rec.read_text().splitlines()) == len(recs)
    # the policy file's content counts, not only its path
    from avis_llamacpp.defaults import LLAVA_SHAPES_DIR, TRAINED_DIR

    pol = tmp_path / "policy.gguf"
    pol.write_bytes((LLAVA_SHAPES_DIR / "policy.gguf").read_bytes())
    out2 = tmp_path / "with_policy"
    run_bench(*args[:3], out2, configs=configs[:1], max_tokens=2, progress=False, n_threads=1, policy_path=str(pol))
    pol.write_bytes((TRAINED_DIR / "policy.gguf").read_bytes())
    with pytest.raises(InvalidArgumentError, match="policy_sha256"):
        run_bench(*args[:3], out2, configs=configs[:1], max_tokens=2, progress=False, n_threads=1,
                  policy_path=str(pol))


def test_bench_refuses_bad_input_before_writing(llava_fixture, items, tmp_path, monkeypatch, capsys):
    """`avis bench` checks its knobs and files before the model loads and before --out is created."""
    from avis_llamacpp import pipeline
    from avis_llamacpp.cli import main

    def boom(*a, **k):  # pragma: no cover - reached only if a check comes after loading the model
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline.VLM, "__init__", boom)
    from tests.conftest import DEMO_IMAGE

    out = tmp_path / "bench_out"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["bench", "-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj)]
    for extra, msg in ((["--items", str(DEMO_IMAGE), "--out", str(out)], "not a UTF-8 JSONL items file"),
                       (["--items", str(items), "--out", str(a_file)], "is an existing file"),
                       (["--items", str(items), "--out", str(out), "--max-tokens", "0"], "max_tokens must be"),
                       (["--items", str(items), "--out", str(out), "--top-p", "1.5"], "top_p"),
                       (["--items", str(tmp_path), "--out", str(out)], "--items"),
                       (["--items", str(items), "--out", str(out), "--configs", "nosuch"], "unknown config")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists(), extra


def test_plot_title_inside_and_labels_apart():
    """The accuracy-vs-FLOPs plot keeps its (long) title inside the figure and no two point labels overlap, even
    when the points cluster (as the pruning rows do at the same kept count)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    rng = np.random.default_rng(0)
    names = [c.name for c in default_configs(with_policy=True, policy_name="avis (policy K, tau=0.785)")]
    rows = []
    for i, name in enumerate(names):  # three tight clusters plus a few spread points
        x, y = ((0.53, 0.57), (0.6, 0.6), (0.92, 0.63))[i % 3] if i < 15 else (1.0 + 0.2 * (i - 15), 0.61)
        acc = y + rng.normal(0, 0.004)
        rows.append({"config": name, "flops_rel": x + rng.normal(0, 0.004), "accuracy": acc, "ci_low": acc - 0.05,
                     "ci_high": acc + 0.05})
    title = "some-folder/a-long-model-file-name.gguf on test300 " * 3 + "(300 items, seed 0, max_tokens 96)"
    fig = bench.plot_accuracy_vs_flops(rows, title)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        ax = fig.axes[0]
        fig_box = fig.bbox
        t = ax.title.get_window_extent(r)
        assert t.x0 >= fig_box.x0 and t.x1 <= fig_box.x1 and t.y1 <= fig_box.y1, "title cut"
        labels = [a for a in ax.texts if isinstance(a, Text) and a.get_text()]
        assert sorted(a.get_text() for a in labels) == sorted(names)
        boxes = [a.get_window_extent(r) for a in labels]
        frame = ax.get_window_extent(r)
        for i, b in enumerate(boxes):
            assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1, labels[i]
            for j in range(i):
                assert not b.overlaps(boxes[j]), (labels[i].get_text(), labels[j].get_text())
    finally:
        plt.close(fig)


def test_kind_table_by_hand():
    """Accuracy per item kind and config, counted by hand; kinds sorted, n per kind in the header, nothing when
    no record has a kind; clips compare joint KDV with per-chunk KDV at the same count."""
    recs = [{"config": "vanilla", "kind": "count", "correct": True},
            {"config": "vanilla", "kind": "count", "correct": False},
            {"config": "vanilla", "kind": "appear", "correct": True},
            {"config": "kdv rho=0.75", "kind": "count", "correct": True},
            {"config": "kdv rho=0.75", "kind": "count", "correct": True},
            {"config": "kdv rho=0.75", "kind": "appear", "correct": False}]
    lines = bench.kind_table(recs, ["vanilla", "kdv rho=0.75", "absent"]).splitlines()
    assert lines[0] == "| config | appear (1) | count (2) |"
    assert lines[2:] == ["| vanilla | 1.00 | 0.50 |", "| kdv rho=0.75 | 0.00 | 1.00 |"]
    assert bench.kind_table([{"config": "vanilla", "correct": True}], ["vanilla"]) == ""
    pairs = bench.default_pairs(["vanilla", "kdv rho=0.75", "kdv per-chunk rho=0.75", "random rho=0.75"])
    assert ("kdv rho=0.75", "kdv per-chunk rho=0.75") in pairs and ("kdv rho=0.75", "random rho=0.75") in pairs


def test_local_ray_workers_share_the_cores(monkeypatch):
    """Local Ray workers given no thread count split the machine's cores between them, prompt batches too; given
    counts and remote clusters are left alone."""
    from avis_llamacpp.distributed import worker_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_threads({"n_ctx": 512}, 2, None) == {"n_ctx": 512, "n_threads": 4, "n_threads_batch": 4}
    assert worker_threads({}, 16, None) == {"n_threads": 1, "n_threads_batch": 1}
    assert worker_threads({"n_threads": 3, "n_threads_batch": None}, 2, None) == {"n_threads": 3,
                                                                               "n_threads_batch": None}
    assert worker_threads({"n_threads": None}, 2, "auto") == {"n_threads": None}


@pytest.mark.parametrize("flag", [[], ["--no-repack"]])
def test_bench_loads_the_model_as_its_flags_say(llava_fixture, items, tmp_path, monkeypatch, capsys, flag):
    """`avis bench` takes the shared model flags (cli_args.vlm_kwargs) as `avis ask` does: --no-repack reaches
    llama.cpp's loader (use_extra_bufts off), without it llama.cpp's default."""
    import llama_cpp

    from avis_llamacpp.cli import main

    seen = []
    load = llama_cpp.llama_model_load_from_file
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file",
                        lambda path, params: seen.append(params.use_extra_bufts) or load(path, params))
    rc = main(["bench", "-m", str(llava_fixture.model), "--mmproj", str(llava_fixture.mmproj), "--items", str(items),
               "--out", str(tmp_path / "out"), "--limit", "1", "--max-tokens", "2", "--threads", "1", "--no-progress",
               "--configs", "vanilla", *flag])
    assert rc == 0 and "vanilla" in capsys.readouterr().out
    assert seen and set(seen) == {not flag}
