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
    "pipeline_keys_reversed": (  # moved by #33 from pipeline.py (tk.keys) to scorer.py (the group's keys)
        "avis_llamacpp/scorer.py",
        "            sel = prune(keys, ratio=ratio, tau=tau)",
        "            sel = prune(keys[::-1], ratio=ratio, tau=tau)",
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
    # -- issue #34: cache keys, snapshot identity, server guard rules and avis keys, pre-flight rules ------------
    "image_digest_first_row_only": (
        "avis_llamacpp/snapshot.py",
        "h.update(np.ascontiguousarray(rgb).tobytes())",
        "h.update(np.ascontiguousarray(rgb[:1]).tobytes())",
        ["tests/test_cache_keys.py", "-k", "pixel"]),
    "store_ignores_namespace": (
        "avis_llamacpp/prefix_cache.py",
        "if cid != cache_id or ns != namespace:",
        "if cid != cache_id:",
        ["tests/test_cache_keys.py", "-k", "namespace"]),
    "store_ignores_cache_id": (
        "avis_llamacpp/prefix_cache.py",
        "if cid != cache_id or ns != namespace:",
        "if ns != namespace:",
        ["tests/test_cache_keys.py", "-k", "cache_id"]),
    "live_entry_ignores_namespace": (
        "avis_llamacpp/prefix_cache.py",
        "if cache_id != self.cache_id or namespace != self.namespace:",
        "if cache_id != self.cache_id:",
        ["tests/test_prefix_cache.py", "-k", "namespaces"]),
    "text_match_assumes_equal_tokens": (
        "avis_llamacpp/prefix_cache.py",
        "j = _common(c.tokens, k.tokens)",
        "j = min(len(c.tokens), len(k.tokens))",
        ["tests/test_cache_keys.py", "-k", "text_before"]),
    "snapshot_model_unchecked": (
        "avis_llamacpp/snapshot.py",
        "if model_id != self.model_id:",
        "if False:",
        ["tests/test_snapshot_identity.py", "-k", "model_file"]),
    "snapshot_prefix_unchecked": (
        "avis_llamacpp/snapshot.py",
        "if prefix_text != self.prefix_text:",
        "if False:",
        ["tests/test_snapshot_identity.py", "-k", "prefix_text"]),
    "snapshot_images_unchecked": (
        "avis_llamacpp/snapshot.py",
        "if image_digests is not None and image_digests != self.image_digests:",
        "if False:",
        ["tests/test_snapshot_identity.py", "-k", "image_digests_alone"]),
    "snapshot_digest_ignores_pruning": (
        "avis_llamacpp/snapshot.py",
        "h.update(json.dumps(self.pruning, sort_keys=True).encode())",
        "h.update(b'')",
        ["tests/test_snapshot_identity.py", "-k", "saved_file"]),
    "snapshot_digest_ignores_prefix": (
        "avis_llamacpp/snapshot.py",
        "h.update(self.prefix_text.encode())",
        "h.update(b'')",
        ["tests/test_snapshot_identity.py", "-k", "saved_file"]),
    "snapshot_digest_ignores_image_order": (
        "avis_llamacpp/snapshot.py",
        "for d in self.image_digests:",
        "for d in sorted(self.image_digests):",
        ["tests/test_snapshot_identity.py", "-k", "saved_file"]),
    "image_dir_string_prefix": (
        "avis_llamacpp/images.py",
        "if os.path.commonpath([root, real]) != root or real == root:",
        "if not real.startswith(root) or real == root:",
        ["tests/test_guard_rules.py", "-k", "image_dir or containment"]),
    "image_dir_symlinked_folders_followed": (
        "avis_llamacpp/images.py",
        "real = os.path.realpath(os.path.join(root, rel))",
        "real = os.path.normpath(os.path.join(root, rel))",
        ["tests/test_guard_rules.py", "-k", "image_dir or containment"]),
    "image_dir_not_resolved": (
        "avis_llamacpp/images.py",
        "real = os.path.realpath(self.image_dir)",
        "real = os.path.abspath(self.image_dir)",
        ["tests/test_guard_rules.py", "-k", "image_dir or containment"]),
    "request_bytes_limit_off_by_one": (
        "avis_llamacpp/server.py",
        "and int(v) > limit:",
        "and int(v) >= limit:",
        ["tests/test_guard_rules.py", "-k", "size_limits"]),
    "request_bytes_read_off_by_one": (
        "avis_llamacpp/server.py",
        "            if size > limit:",
        "            if size >= limit:",
        ["tests/test_guard_rules.py", "-k", "size_limits"]),
    "image_count_limit_off_by_one": (
        "avis_llamacpp/server.py",
        "                if len(found) > max_images:",
        "                if len(found) >= max_images:",
        ["tests/test_guard_rules.py", "-k", "image_count"]),
    "data_uri_bytes_limit_off_by_one": (
        "avis_llamacpp/images.py",
        "    if len(data) > max_bytes:\n        raise _too_big(what, max_bytes)\n    return data\n",
        "    if len(data) >= max_bytes:\n        raise _too_big(what, max_bytes)\n    return data\n",
        ["tests/test_guard_rules.py", "-k", "size_limits"]),
    "detokenize_past_the_vocabulary": (
        "avis_llamacpp/server.py",
        "_is_int(t) and 0 <= t < hi for t in tokens",
        "_is_int(t) and 0 <= t <= hi for t in tokens",
        ["tests/test_guard_rules.py", "-k", "vocabulary"]),
    "logit_bias_past_the_vocabulary": (
        "avis_llamacpp/server.py",
        "key.isdigit() and int(key) < hi",
        "key.isdigit() and int(key) <= hi",
        ["tests/test_guard_rules.py", "-k", "vocabulary"]),
    "rho_alias_ignored": (
        "avis_llamacpp/chat_handler.py",
        'o["ratio"] = o.pop("rho")',
        'o.pop("rho")',
        ["tests/test_guard_rules.py", "-k", "takes_effect"]),
    "top_k_override_ignored": (
        "avis_llamacpp/chat_handler.py",
        'top_k=int(s.get("top_k", base.top_k))',
        "top_k=int(base.top_k)",
        ["tests/test_guard_rules.py", "-k", "takes_effect"]),
    "min_p_override_ignored": (
        "avis_llamacpp/chat_handler.py",
        'min_p=float(s.get("min_p", base.min_p))',
        "min_p=float(base.min_p)",
        ["tests/test_guard_rules.py", "-k", "takes_effect"]),
    "wave_override_ignored": (
        "avis_llamacpp/chat_handler.py",
        'wave=s["wave"]',
        'wave=self.defaults["wave"]',
        ["tests/test_guard_rules.py", "-k", "takes_effect"]),
    "stop_threshold_override_ignored": (
        "avis_llamacpp/chat_handler.py",
        'stop_threshold=s["stop_threshold"]',
        'stop_threshold=self.defaults["stop_threshold"]',
        ["tests/test_guard_rules.py", "-k", "takes_effect"]),
    "content_override_ignored": (
        "avis_llamacpp/chat_handler.py",
        'out = _completion(ans, name, s["content"])',
        'out = _completion(ans, name, self.defaults["content"])',
        ["tests/test_guard_rules.py", "-k", "takes_effect"]),
    "preflight_no_required_nonblock_tensors": (
        "avis_llamacpp/preflight.py",
        "missing += [n for n in fam.required_for(t) if n not in t]",
        "missing += []",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_forbidden_tensors": (
        "avis_llamacpp/preflight.py",
        "    if extra:  # clip.cpp asserts",
        "    if False:  # clip.cpp asserts",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_qkv_per_block": (
        "avis_llamacpp/preflight.py",
        'missing += [f"{b}attn_{x}.weight" for x in "qkv" if f"{b}attn_{x}.weight" not in t]',
        "missing += []",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_family_per_block": (
        "avis_llamacpp/preflight.py",
        "missing += [n for n in fam.required_per_block(il) if n not in t]",
        "missing += []",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_uniform_blocks": (
        "avis_llamacpp/preflight.py",
        'missing += [f"v.blk.{il}.{n}" for il, names in enumerate(blocks) for n in sorted(union - names)]',
        "missing += []",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_block_count_check": (
        "avis_llamacpp/preflight.py",
        "if n_layer is not None and n_layer != -1 and not 0 < n_layer <= LLAMA_MAX_LAYERS:",
        "if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_nextn_check": (
        "avis_llamacpp/preflight.py",
        "if n_layer and n_layer > 0 and nextn is not None and nextn > n_layer:",
        "if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_expert_check": (
        "avis_llamacpp/preflight.py",
        '    if not ok:\n        raise bad(f"inconsistent expert counts',
        '    if False:\n        raise bad(f"inconsistent expert counts',
        ["tests/test_preflight_rules.py"]),
    "preflight_rope_sections_over_rotary": (
        "avis_llamacpp/preflight.py",
        " or (isinstance(n_rot, int) and total > n_rot)",
        "",
        ["tests/test_preflight_rules.py"]),
    "preflight_rope_sections_zero": (
        "avis_llamacpp/preflight.py",
        " or total <= 0 or",
        " or",
        ["tests/test_preflight_rules.py"]),
    "preflight_tokens_not_cut_at_nul": (
        "avis_llamacpp/preflight.py",
        'word = tok.split(b"\\0", 1)[0] or',
        "word = tok or",
        ["tests/test_preflight_rules.py"]),
    "preflight_big_endian_accepted": (
        "avis_llamacpp/preflight.py",
        '    if r.byte_order != "I":',
        "    if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_tensor_count_unchecked": (
        "avis_llamacpp/preflight.py",
        "if int(count) > self._size() // 24:",
        "if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_partial_blocks_unchecked": (
        "avis_llamacpp/preflight.py",
        "if ne[0] % block:",
        "if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_numeric_array_bounds_unchecked": (
        "avis_llamacpp/preflight.py",
        "if n * np.dtype(nptype).itemsize > size - offs:",
        "if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_unknown_array_type_wrapped": (
        "avis_llamacpp/preflight.py",
        "etype = GGUFValueType(int(etype_raw[0]))",
        "etype = GGUFValueType(int(etype_raw[0]) % 13)",
        ["tests/test_preflight_rules.py"]),
    "preflight_nested_arrays_read_as_strings": (
        "avis_llamacpp/preflight.py",
        "if etype != GGUFValueType.STRING:",
        "if False:",
        ["tests/test_preflight_rules.py"]),
    "family_qwen3vl_qkv_bias_not_required": (
        "avis_llamacpp/families.py",
        'return [f"v.blk.{il}.attn_qkv.weight", f"v.blk.{il}.attn_qkv.bias"]',
        'return [f"v.blk.{il}.attn_qkv.weight"]',
        ["tests/test_preflight_rules.py"]),
    "family_qwen3vl_patch_bias_not_required": (
        "avis_llamacpp/families.py",
        '"v.patch_embd.weight.1", "v.patch_embd.bias", "v.position_embd.weight")',
        '"v.patch_embd.weight.1", "v.position_embd.weight")',
        ["tests/test_preflight_rules.py"]),
    "family_qwen3vl_class_embd_allowed": (
        "avis_llamacpp/families.py",
        '    forbidden_tensors = ("v.class_embd",)',
        "    forbidden_tensors = ()",
        ["tests/test_preflight_rules.py"]),
    "family_qwen_q_bias_not_required": (
        "avis_llamacpp/families.py",
        'return [f"v.blk.{il}.attn_{x}.bias" for x in "qkv"]',
        'return [f"v.blk.{il}.attn_{x}.bias" for x in "kv"]',
        ["tests/test_preflight_rules.py"]),
    "family_llava_projector_bias_not_required": (
        "avis_llamacpp/families.py",
        '"mm.0.weight", "mm.0.bias")',
        '"mm.0.weight")',
        ["tests/test_preflight_rules.py"]),
    "preflight_no_architecture_check": (
        "avis_llamacpp/preflight.py",
        "    if arch is None:",
        "    if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_vision_encoder_check": (
        "avis_llamacpp/preflight.py",
        'if not hdr.get("clip.has_vision_encoder", False):',
        "if False:",
        ["tests/test_preflight_rules.py"]),
    "preflight_no_clip_check": (
        "avis_llamacpp/preflight.py",
        '    if arch != "clip":',
        "    if False:",
        ["tests/test_preflight_rules.py"]),
    # (issue #34, written last: code the lead moved out of pipeline.py into prefix_hold.py and query.py)
    "cache_key_ignores_selector": (
        "avis_llamacpp/prefix_hold.py",
        "key = (selector, None if ratio is None",
        'key = ("kdv", None if ratio is None',
        ["tests/test_cache_keys.py", "-k", "selection_field or own_subset"]),
    "cache_key_ignores_random_seed": (
        "avis_llamacpp/prefix_hold.py",
        'int(seed) if selector == "random" else None)',
        "None)",
        ["tests/test_cache_keys.py", "-k", "selection_field"]),
    "cache_key_seed_for_every_selector": (
        "avis_llamacpp/prefix_hold.py",
        'int(seed) if selector == "random" else None)',
        "int(seed))",
        ["tests/test_cache_keys.py", "-k", "seed_is_no_key"]),
    "cache_key_ignores_ratio": (
        "avis_llamacpp/prefix_hold.py",
        "None if ratio is None else float(ratio), None if tau",
        "None, None if tau",
        ["tests/test_cache_keys.py", "-k", "selection_field"]),
    "cache_key_ignores_tau": (
        "avis_llamacpp/prefix_hold.py",
        "None if tau is None else float(tau),",
        "None,",
        ["tests/test_cache_keys.py", "-k", "selection_field"]),
    "cache_id_ignores_n_batch": (
        "avis_llamacpp/prefix_hold.py",
        "|b={st.n_batch}",
        "",
        ["tests/test_cache_keys.py", "-k", "cache_id"]),
    "cache_id_ignores_n_ubatch": (
        "avis_llamacpp/prefix_hold.py",
        "|ub={st.n_ubatch}",
        "",
        ["tests/test_cache_keys.py", "-k", "cache_id"]),
    "chunk_key_first_image_digest": (
        "avis_llamacpp/prefix_hold.py",
        "d = digests[c.image_index] if one_to_one else",
        "d = digests[0] if one_to_one else",
        ["tests/test_cache_keys.py", "-k", "second_image"]),
    "cache_key_ignores_video_selection": (
        "avis_llamacpp/prefix_hold.py",
        'return key + ("joint",) if joint else key',
        "return key",
        ["tests/test_cache_keys.py", "-k", "video"]),
    "snapshot_pruning_unchecked": (
        "avis_llamacpp/query.py",
        'if snapshot.pruning != {"ratio": ratio, "tau": tau} and pruned:',
        "if False:",
        ["tests/test_snapshot_identity.py", "-k", "pruning"]),
    "snapshot_selector_unchecked": (
        "avis_llamacpp/query.py",
        'if pruned and selector != "kdv":',
        "if False:",
        ["tests/test_snapshot_identity.py", "-k", "selector"]),
    "snapshot_extra_markers_unchecked": (
        "avis_llamacpp/query.py",
        "if marker and marker in prompt_text[len(snapshot.prefix_text):]:",
        "if False:",
        ["tests/test_snapshot_identity.py", "-k", "markers"]),
    "video_pruned_per_chunk": (
        "avis_llamacpp/query.py",
        'joint = video and pruned and q.video_selection == "joint"',
        "joint = False",
        ["tests/test_video_joint.py", "-k", "one_selection"]),
    "video_group_first_chunk_only": (
        "avis_llamacpp/prefill.py",
        "            members = [g for g in group_of.get(ci, [ci]) if g >= ci]\n",
        "            members = [ci]\n",
        ["tests/test_video_joint.py", "-k", "one_selection"]),
    "video_joint_chunks_misordered": (
        "avis_llamacpp/scorer.py",
        "keys = group[0].keys.keys if len(group) == 1 else np.concatenate([s.keys.keys for s in group])",
        "keys = group[0].keys.keys if len(group) == 1 else np.concatenate([s.keys.keys for s in group[::-1]])",
        ["tests/test_video_joint.py", "-k", "one_selection"]),
    "video_frames_not_capped_for_frame_models": (
        "avis_llamacpp/query.py",
        "    if patch == 1 and max_frames is None:",
        "    if False:",
        ["tests/test_video_joint.py", "-k", "frame_by_frame"]),
    # eleventh session: clips in items and calibration, Ray workers, bench tables, animation timing
    "tau_clip_scores_per_chunk": (
        "avis_llamacpp/tau.py",
        "    return [kdv_scores(np.concatenate(_chunk_keys(vlm, clip.frames, video=True)))]",
        "    return [np.concatenate([kdv_scores(k) for k in _chunk_keys(vlm, clip.frames, video=True)])]",
        ["tests/test_video_joint.py", "-k", "tau_calibration"]),
    "items_frames_reversed": (
        "avis_llamacpp/items.py",
        "        frames = tuple(resolved) if isinstance(image, list) else ()",
        "        frames = tuple(resolved[::-1]) if isinstance(image, list) else ()",
        ["tests/test_video_joint.py", "-k", "frame_files"]),
    "calibrate_workers_unpinned": (
        "avis_llamacpp/calibrate.py",
        "vlm_kwargs=worker_kwargs(vlm, n_seq_max), fn_kwargs=kw)",
        'vlm_kwargs={"n_ctx": vlm.ctx.n_ctx, "n_seq_max": n_seq_max}, fn_kwargs=kw)',
        ["tests/test_bench.py", "-k", "workers_get"]),
    "animation_sampled_by_frame": (
        "avis_llamacpp/video.py",
        "        step_ms = max(_ANIMATION_MIN_STEP_MS, math.gcd(*durations_ms))",
        "        step_ms = max(durations_ms)",
        ["tests/test_video_decode.py", "-k", "held"]),
    "kind_table_sums": (
        "avis_llamacpp/bench.py",
        'f"{np.mean(v):.2f}" if v',
        'f"{np.sum(v):.2f}" if v',
        ["tests/test_bench.py", "-k", "kind_table"]),
    "bench_configs_split_every_comma": (
        "avis_llamacpp/bench.py",
        'return [w.strip() for w in re.split(r",(?![^()]*\\))", text) if w.strip()]',
        'return [w.strip() for w in text.split(",") if w.strip()]',
        ["tests/test_video_joint.py", "-k", "bench_cli"]),
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
