"""Mutation check: break the code in a scratch copy of the working tree, run the tests meant to guard it, and
report whether they catch it. Nothing in the checkout is touched.

    .venv/bin/python tests/run_mutations.py            # every mutation below
    .venv/bin/python tests/run_mutations.py NAME ...   # some of them
    .venv/bin/python tests/run_mutations.py --list

Each mutation is one exact text replacement that must match exactly once (so a refactor that moves the code
makes the runner fail loudly instead of silently testing nothing). tests/test_mutations.md lists the results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, old text, new text, pytest arguments)
MUTATIONS: dict[str, tuple[str, str, str, list[str]]] = {
    "prefill_mrope_keeps_first_positions": (
        "avis_llamacpp/prefill.py",
        "            pos = positions[kept]\n",
        "            pos = positions[:len(kept)]\n",
        ["tests/test_prefill_glue.py"]),
    "prefill_1d_positions_on_mrope": (
        "avis_llamacpp/prefill.py",
        "        if projector.uses_mrope:\n            pos = positions[kept]",
        "        if False:\n            pos = positions[kept]",
        ["tests/test_prefill_glue.py"]),
    "prefill_first_k_rows": (
        "avis_llamacpp/prefill.py",
        "ctx.decode_embeddings(embd[kept], pos, seq_id, logits_last=(ci == last))\n",
        "ctx.decode_embeddings(embd[:len(kept)], pos, seq_id, logits_last=(ci == last))\n",
        ["tests/test_prefill_glue.py"]),
    "prefill_1d_advance_full_span": (
        "avis_llamacpp/prefill.py",
        "            advance = len(kept)\n",
        "            advance = chunk.n_tokens\n",
        ["tests/test_prefill_glue.py"]),
    "prefill_text_after_image_no_advance": (
        "avis_llamacpp/prefill.py",
        "        n_past += advance\n",
        "        n_past += 0 * advance\n",
        ["tests/test_prefill_glue.py"]),
    "prefill_image_rows_zeroed": (
        "avis_llamacpp/prefill.py",
        "ctx.decode_embeddings(embd[kept], pos, seq_id, logits_last=(ci == last))\n",
        "ctx.decode_embeddings(0 * embd[kept], pos, seq_id, logits_last=(ci == last))\n",
        ["tests/test_pipeline.py", "-k", "deterministic"]),
    "pipeline_keys_reversed": (
        "avis_llamacpp/pipeline.py",
        "            sel = prune(tk.keys, ratio=ratio, tau=tau)",
        "            sel = prune(tk.keys[::-1], ratio=ratio, tau=tau)",
        ["tests/test_prefill_glue.py", "tests/test_kdv_pipeline.py", "-k", "reference or tau"]),
    "policy_one_minus_p": (
        "avis_llamacpp/policy.py",
        "        return int(self.k_map.k_for(p)), p",
        "        return int(self.k_map.k_for(1 - p)), p",
        ["tests/test_policy.py"]),
    "features_std_is_mean": (
        "avis_llamacpp/features.py",
        "out[n_embd:2 * n_embd] = x.std(axis=0)",
        "out[n_embd:2 * n_embd] = x.mean(axis=0)",
        ["tests/test_features.py"]),
    "features_max_is_min": (
        "avis_llamacpp/features.py",
        "out[2 * n_embd:3 * n_embd] = x.max(axis=0)",
        "out[2 * n_embd:3 * n_embd] = x.min(axis=0)",
        ["tests/test_features.py"]),
    "features_kept_frac_wrong_side": (
        "avis_llamacpp/features.py",
        "kept = float(np.mean(s >= -math.cos(DEFAULT_TAU)))",
        "kept = float(np.mean(s < -math.cos(DEFAULT_TAU)))",
        ["tests/test_features.py"]),
    "features_quantiles_swapped": (
        "avis_llamacpp/features.py",
        "[kept, s.mean(), s.min(), q10, q50, q90, s.max()]",
        "[kept, s.mean(), s.min(), q90, q50, q10, s.max()]",
        ["tests/test_features.py"]),
    "predictor_scale_multiplied": (
        "avis_llamacpp/predictor.py",
        "h = (_check_matrix(X, self.n_features) - self.scaler_mean) / self.scaler_scale",
        "h = (_check_matrix(X, self.n_features) - self.scaler_mean) * self.scaler_scale",
        ["tests/test_predictor.py"]),
    "predictor_constant_rate": (
        "avis_llamacpp/predictor.py",
        "p = (n_pos + 0.5) / (n + 1.0)",
        "p = (n_pos + 1.0) / (n + 2.0)",
        ["tests/test_calibrate.py", "-k", "end_to_end"]),
    "overlay_transposed": (
        "avis_llamacpp/overlay.py",
        "arr[y:y + cell_px, x:x + cell_px] *= dim",
        "arr[x:x + cell_px, y:y + cell_px] *= dim",
        ["tests/test_kdv_pipeline.py", "-k", "overlay"]),
    "capture_contiguous_only": (
        "avis_llamacpp/capture.py",
        "    arr = strided_to_array(buf, ne, nb)\n",
        "    arr = buf[:int(np.prod(ne))].reshape(ne[::-1])\n",
        ["tests/test_families_qwen3vl.py"]),
    "items_no_truncation_repair": (
        "avis_llamacpp/items.py",
        "            if i == len(lines) - 1:  # no newline after it: the write was interrupted",
        "            if False:",
        ["tests/test_items.py"]),
    "native_log_levels_old_order": (
        "avis_llamacpp/native.py",
        "3: logging.WARNING, 4: logging.ERROR}",
        "3: logging.ERROR, 4: logging.DEBUG}",
        ["tests/test_native_logs.py"]),
    "options_mode_unchecked": (
        "avis_llamacpp/options.py",
        "        if self.mode not in MODES:",
        "        if False:",
        ["tests/test_options.py"]),
    "random_subset_ignores_image": (
        "avis_llamacpp/kdv.py",
        "rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(image_index)])",
        "rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0])",
        ["tests/test_kdv.py", "-k", "subset"]),
    "pixtral_breaks_not_restored": (
        "avis_llamacpp/mtmd.py",
        "                embd[rows] = self._constant_rows[name]\n",
        "                pass\n",
        ["tests/test_encode_guard.py"]),
    "eval_always_rewrites_bundle": (
        "training/eval_shapes_vlm.py",
        "    if args.update_training_json and info_path.exists():",
        "    if info_path.exists():",
        ["tests/test_trained_model.py", "-k", "eval_command"]),
}


def run(name: str, python: str) -> tuple[bool, str]:
    """(caught, summary) for one mutation."""
    path, old, new, args = MUTATIONS[name]
    with tempfile.TemporaryDirectory(prefix=f"mut-{name}-") as tmp:
        d = Path(tmp) / "repo"
        shutil.copytree(ROOT, d, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__",
                                                               ".pytest_cache"))
        src = d / path
        text = src.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the text to mutate occurs {text.count(old)} times in {path}; update MUTATIONS")
        src.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=str(d))  # the scratch copy's package wins over the editable install
        r = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=d, env=env,
                           capture_output=True, text=True)
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in r.stdout.splitlines()
              if line.startswith("FAILED")]
    last = next((line for line in reversed(r.stdout.splitlines()) if " passed" in line or " failed" in line), "")
    return r.returncode == 1 and bool(failed), f"{last.strip('= ')}\n    " + "\n    ".join(failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    if args.list:
        for name, (path, _, _, tests) in MUTATIONS.items():
            print(f"{name}: {path} -> {' '.join(tests)}")
        return 0
    unknown = set(args.names) - set(MUTATIONS)
    if unknown:
        p.error(f"unknown mutations {sorted(unknown)}")
    survived = []
    for name in args.names or MUTATIONS:
        caught, summary = run(name, sys.executable)
        print(f"{'caught  ' if caught else 'SURVIVED'} {name}: {summary}", flush=True)
        if not caught:
            survived.append(name)
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
