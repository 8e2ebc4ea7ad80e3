"""Calibrating an AVIS policy on a user's own model and labelled data.

0. `choose_tau` chooses KDV's adaptive angle for this model (tau.py): labelled, the largest pruning within a
   tolerance of unpruned accuracy; label-free (images only), the tau keeping a target share of the image tokens.
1. `run_calibration` runs the model over a JSONL set of multiple-choice items (fields: "image", a local path
   relative to the JSONL; "question"; "options"; "answer", the correct letter; optional "id"). Per item it
   makes one greedy K=1 call (the label of the difficulty predictor, and the accuracy of K=1) and one call
   with k_max sampled rollouts sharing one prefill (the rollouts that K>1 votes are subsampled from), and
   appends one JSON record per item to out_dir/records.jsonl, so an interrupted run resumes where it stopped.
2. `fit_policy` fits the difficulty predictor on the records' features, the p_hat -> K map on its
   out-of-fold predictions, and returns the `AVISPolicy` and a report comparing it with fixed K.

`register_cli` adds the `avis calibrate` subcommand, which does all three and writes out_dir/tau.json,
out_dir/policy.gguf and out_dir/report.json (label-free: tau.json only, or a given policy with that tau)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .cli_args import (add_answer_tags_arg, add_model_args, add_pruning_args, check_input_file, check_model_files,
                       check_output_dir, check_sampling, vlm_kwargs)
from .errors import AVISError, InvalidArgumentError
from .features import FEATURE_VERSION
from .items import Item, load_items, read_records
from .items import progress as progress_bar
from .kdv import DEFAULT_TAU
from .policy import AUTO_TAU, K_CHOICES, AVISPolicy, FeatureSpec, expected_vote_accuracy, fit_k_map
from .tau import (DEFAULT_KEEP, DEFAULT_TOLERANCE, TauCalibration, calibrate_tau, choose_tau_labelled,
                  format_tau_table, list_images)
from .voting import extract_answer, normalize_answer

__all__ = ["RECORD_VERSION", "CalibrationItem", "accuracy_matrix", "choose_tau", "cost_matrix", "fit_policy",
           "format_report", "load_items", "load_records", "read_calibration_images", "register_cli", "run_calibration"]

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
RECORDS_FILE = "records.jsonl"
SETTINGS_FILE = "calibration.json"
POLICY_FILE = "policy.gguf"
REPORT_FILE = "report.json"
TAU_FILE = "tau.json"  # the tau chosen for the model, with the settings it was chosen with
DEFAULT_LAMBDA = 0.01  # accuracy one unit of compute (a rollout, or a vanilla run's FLOPs) must buy
_SETTINGS_CHECKED = ("model_id", "k_max", "seed", "max_tokens", "answer_tags", "tau", "ratio", "feature_version",
                     "temperature", "top_p")
_UNSET: Any = object()


# ------------------------------------------------------------------------------------------------------------
# items
# ------------------------------------------------------------------------------------------------------------
CalibrationItem = Item  # the shared item type (items.py)


# ------------------------------------------------------------------------------------------------------------
# running the model
# ------------------------------------------------------------------------------------------------------------
def _item_seed(seed: int, item_id: str) -> int:
    """A per-item seed that depends on the run seed and the id only (so resuming reproduces it)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _normalised(text: str, options: Sequence[str] | None) -> str | None:
    """The rollout's answer as the pipeline votes on it (extracted, then normalised)."""
    a = extract_answer(text, options)
    return normalize_answer(a, options) if a is not None else None


def _model_info(vlm: Any) -> dict[str, str]:
    """model_id and file names of a VLM (tolerant of wrappers)."""
    model = getattr(vlm, "model", None)
    proj = getattr(vlm, "projector", None)
    return {"model_id": str(vlm.model_id),
            "model_file": Path(getattr(model, "path", "") or "").name,
            "mmproj_file": Path(getattr(proj, "path", "") or "").name}


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Calibration records from a records.jsonl file (or the out_dir holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RECORDS_FILE
    if not p.is_file():
        raise InvalidArgumentError(f"{p}: no records file")
    return read_records(p)


def worker_kwargs(vlm: Any, n_seq_max: int) -> dict[str, Any]:
    """The VLM keywords of a Ray worker: the caller's session as it is (threads, batch, flash attention, GPU layers,
    chat format; VLM.replica_kwargs), with room for the k_max rollouts."""
    kw = vlm.replica_kwargs() if hasattr(vlm, "replica_kwargs") else {"n_ctx": vlm.ctx.n_ctx}
    return {**kw, "n_seq_max": n_seq_max}


def run_calibration(vlm: Any, items_jsonl: str | os.PathLike, out_dir: str | os.PathLike, *, k_max: int = 7,
                    seed: int = 0, max_tokens: int = 256, answer_tags: bool = False, tau: float | None = DEFAULT_TAU,
                    ratio: float | None = None, resume: bool = True, progress: bool = True,
                    limit: int | None = None, log_every: int | None = None,
                    ray_workers: int = 0, ray_address: str | None = None, temperature: float = 0.7,
                    top_p: float = 0.9) -> list[dict[str, Any]]:
    """Run `vlm` over the items (greedy K=1 + k_max rollouts each) and return one record per item.

    Records are appended to out_dir/records.jsonl as they are made; with resume, items already recorded are
    skipped (the run's settings are kept in out_dir/calibration.json and must match). tau / ratio: the KDV
    pruning the policy will use (features do not depend on it, accuracies do). limit: only the first N items.
    Progress: a tqdm bar if tqdm is importable, else an INFO log line every `log_every` items.
    ray_workers > 0 shards the items over that many Ray workers (each loads the model once); the records
    are the same as in-process because every item's seed derives from its id. temperature / top_p: the k_max
    rollouts' sampling (the greedy call never samples); choose them on a calibration split, never on test."""
    if not (isinstance(k_max, int) and k_max >= 1):
        raise InvalidArgumentError(f"k_max must be an int >= 1, got {k_max!r}")
    if tau is not None and ratio is not None:
        raise InvalidArgumentError("give a KDV tau or a ratio, not both")
    items = load_items(items_jsonl)
    if limit is not None:
        items = items[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec_path, set_path = out / RECORDS_FILE, out / SETTINGS_FILE
    info = _model_info(vlm)
    settings = {"version": RECORD_VERSION, "items": str(Path(items_jsonl).resolve()), **info, "k_max": k_max,
                "seed": seed, "max_tokens": max_tokens, "answer_tags": bool(answer_tags), "tau": tau, "ratio": ratio,
                "feature_version": FEATURE_VERSION, "temperature": float(temperature), "top_p": float(top_p)}
    if rec_path.exists():
        if not resume:
            logger.warning("%s: starting over (resume off); old records removed", rec_path)
            rec_path.unlink()
        elif set_path.exists():
            old = json.loads(set_path.read_text())
            diff = {k: (old.get(k), settings[k]) for k in _SETTINGS_CHECKED if old.get(k) != settings[k]}
            if diff:
                raise InvalidArgumentError(f"{out} holds records made with other settings {diff} (recorded, now); "
                                           f"use another output folder, or start over with --no-resume "
                                           f"(resume=False in Python)")
        else:
            logger.warning("%s: no %s next to it; assuming its records were made with these settings", rec_path,
                           SETTINGS_FILE)
    set_path.write_text(json.dumps(settings, indent=2))
    done = {r["id"]: r for r in read_records(rec_path)}
    wanted = {it.id for it in items}
    if set(done) - wanted:
        logger.warning("%s has %d records for ids not in %s; they are kept but not returned", rec_path,
                       len(set(done) - wanted), items_jsonl)
    todo = [it for it in items if it.id not in done]
    if done:
        logger.info("resuming: %d of %d items already recorded", len(items) - len(todo), len(items))
    n_seq_max = getattr(getattr(vlm, "settings", None), "n_seq_max", k_max)
    mode = "parallel" if k_max <= n_seq_max else "snapshot"
    bar = progress_bar(len(items), initial=len(items) - len(todo), desc="calibrated", enabled=progress,
                       every=log_every, log=logger)
    failures: list[tuple[str, Exception]] = []
    t_start = time.perf_counter()
    kw = dict(k_max=k_max, seed=seed, max_tokens=max_tokens, answer_tags=answer_tags, tau=tau, ratio=ratio,
              mode=mode, info=info, temperature=temperature, top_p=top_p)
    if ray_workers > 0 and todo:
        from .distributed import ray_map

        results = ray_map("avis_llamacpp.calibrate:calibrate_job", todo, model=vlm.model.path,
                          mmproj=vlm.projector.path, n_workers=ray_workers, address=ray_address,
                          vlm_kwargs=worker_kwargs(vlm, n_seq_max), fn_kwargs=kw)
        with rec_path.open("a", encoding="utf-8") as f:
            for it, rec in zip(todo, results):
                if isinstance(rec, Exception):
                    failures.append((it.id, rec))
                    continue
                f.write(json.dumps(rec) + "\n")
                done[it.id] = rec
        todo = []
    try:
        with rec_path.open("a", encoding="utf-8") as f:
            for n_done, it in enumerate(todo, 1):
                try:
                    rec = _calibrate_item(vlm, it, **kw)
                except AVISError as e:
                    logger.warning("item %s failed: %s", it.id, e)
                    failures.append((it.id, e))
                    continue
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[it.id] = rec
                bar.update(1, note=lambda n_done=n_done: (
                    f"{n_done / max(time.perf_counter() - t_start, 1e-9):.2f} items/s, greedy accuracy so far "
                    f"{np.mean([done[i.id]['greedy']['correct'] for i in items if i.id in done]):.3f}"))
    finally:
        bar.close()
    if failures:
        logger.error("%d item(s) failed (first: %s: %s); rerun to retry them", len(failures), *failures[0])
        if not any(it.id in done for it in items):
            raise failures[0][1]
    return [done[it.id] for it in items if it.id in done]


def calibrate_job(vlm: Any, it: CalibrationItem, *, index: int, **kwargs: Any) -> dict[str, Any] | Exception:
    """One item's record on a Ray worker (errors come back as values so one bad item does not stop the run)."""
    try:
        return _calibrate_item(vlm, it, **kwargs)
    except AVISError as e:
        return e


def _calibrate_item(vlm: Any, it: CalibrationItem, *, k_max: int, seed: int, max_tokens: int, answer_tags: bool,
                    tau: float | None, ratio: float | None, mode: str, info: Mapping[str, str],
                    temperature: float = 0.7, top_p: float = 0.9) -> dict[str, Any]:
    """Greedy K=1 call + one k_max-rollout call for one item -> its record."""
    from .native import SamplingParams

    t0 = time.perf_counter()
    opts = list(it.options) or None
    s = _item_seed(seed, it.id)
    kw = dict(options=opts, answer_tags=answer_tags, max_tokens=max_tokens, tau=tau, ratio=ratio, seed=s)
    greedy = vlm.ask(question=it.question, k=1, **it.media(), **kw)
    multi = vlm.ask(question=it.question, k=k_max, mode=mode, **it.media(),
                    sampling=SamplingParams(temperature=temperature, top_p=top_p) if k_max > 1 else None, **kw)
    g_ans = _normalised(greedy.rollouts[0].text, opts) if greedy.rollouts else None
    rollouts = []
    for r in multi.rollouts:
        a = _normalised(r.text, opts)
        rollouts.append({"answer": a, "correct": a == it.gold, "tokens": len(r.tokens),
                         "mean_logprob": r.mean_logprob, "finish_reason": r.finish_reason})
    feats = greedy.features if greedy.features is not None else multi.features
    return {"version": RECORD_VERSION, "id": it.id, "index": it.index, "image": it.image_field,
            "question": it.question, "options": list(it.options), "gold": it.gold,
            "features": [float(x) for x in np.asarray(feats, dtype=np.float64)], "feature_version": FEATURE_VERSION,
            "greedy": {"answer": g_ans, "correct": g_ans == it.gold, "tokens": len(greedy.tokens),
                       "mean_logprob": greedy.rollouts[0].mean_logprob if greedy.rollouts else 0.0,
                       "finish_reason": greedy.finish_reason},
            "rollouts": rollouts, "vote": {"answer": multi.answer, "correct": multi.answer == it.gold,
                                           "votes": dict(multi.votes)},
            "k_max": k_max, "seed": s, "pruning": {"tau": tau, "ratio": ratio},
            "sampling": {"temperature": float(temperature), "top_p": float(top_p)},
            "prompt_tokens": multi.prompt_tokens, "image_tokens": list(multi.image_tokens),
            "kept_tokens": list(multi.kept_tokens),
            "flops": {"greedy": dict(greedy.flops), "k_max": dict(multi.flops)},
            "model": dict(info), "time_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------------------
# choosing tau for the model (tau.py holds the rules)
# ------------------------------------------------------------------------------------------------------------
def read_calibration_images(items_jsonl: str | os.PathLike, limit: int | None = None) -> tuple[list[str], bool]:
    """(image paths, labelled) of an items JSONL: labelled when every line has an "answer" (then the items are
    validated by items.load_items); otherwise only "image" is needed (label-free calibration of tau)."""
    path = Path(items_jsonl)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no such items file")
    try:
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()][:limit]
    except (UnicodeDecodeError, json.JSONDecodeError):
        lines = None  # not JSONL: items.load_items says what is wrong with it
    if lines is None or (lines and all(isinstance(d, dict) and "answer" in d for d in lines)):
        return [str(it.image) for it in load_items(path, limit)], True
    images = []
    for i, d in enumerate(lines, 1):
        if not isinstance(d, dict) or not isinstance(d.get("image"), str):
            raise InvalidArgumentError(f"{path}:{i}: needs an 'image' path")
        img = (path.parent / d["image"]).resolve()
        if not img.is_file():
            raise InvalidArgumentError(f"{path}:{i}: image {d['image']!r} not found")
        images.append(str(img))
    if not images:
        raise InvalidArgumentError(f"{path}: no items")
    return images, False


def choose_tau(vlm: Any, out_dir: str | os.PathLike, *, items_jsonl: str | os.PathLike | None = None,
               images: Sequence[str] | None = None, keep: float = DEFAULT_KEEP, tolerance: float = DEFAULT_TOLERANCE,
               limit: int | None = None, max_tokens: int = 256, answer_tags: bool = False, seed: int = 0,
               progress: bool = True) -> TauCalibration:
    """The tau for this model, written to out_dir/tau.json: labelled (`tau.choose_tau_labelled`, within
    `tolerance` of unpruned accuracy) when items_jsonl has answers, else label-free (`tau.calibrate_tau` at
    `keep`, encodes only) on its images or on `images`. A tau.json made with the same settings is reused."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labelled = False
    if items_jsonl is not None:
        images, labelled = read_calibration_images(items_jsonl, limit)
    if not images:
        raise InvalidArgumentError("no calibration images")
    settings = {"model_id": str(vlm.model_id), "images": [str(Path(x).resolve()) for x in images],
                "labelled": labelled, "keep": None if labelled else float(keep),
                "tolerance": float(tolerance) if labelled else None, "max_tokens": max_tokens if labelled else None,
                "answer_tags": bool(answer_tags) if labelled else None, "seed": seed if labelled else None}
    path = out / TAU_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") == settings:
            logger.info("%s: reusing the tau chosen with these settings", path)
            return TauCalibration(**old["calibration"])
    if labelled:
        cal = choose_tau_labelled(vlm, load_items(items_jsonl, limit), tolerance=tolerance, max_tokens=max_tokens,
                                  answer_tags=answer_tags, seed=seed, progress=progress)
    else:
        cal = calibrate_tau(vlm, images, keep, progress=progress)
    path.write_text(json.dumps({"settings": settings, "calibration": cal.to_dict()}, indent=2))
    return cal


# ------------------------------------------------------------------------------------------------------------
# from records to matrices
# ------------------------------------------------------------------------------------------------------------
def accuracy_matrix(records: Sequence[Mapping[str, Any]], ks: Sequence[int] = K_CHOICES, *, n_draws: int = 256,
                    seed: int = 0) -> np.ndarray:
    """(n_items, len(ks)) expected accuracy: K=1 is the greedy answer's correctness (the policy decodes K=1
    greedily); K>1 the majority vote of K of the k_max recorded rollouts (`policy.expected_vote_accuracy`)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(records), len(ks)))
    for i, r in enumerate(records):
        answers = [ro.get("answer") for ro in r["rollouts"]]
        lps = [float(ro.get("mean_logprob", 0.0)) for ro in r["rollouts"]]
        for j, k in enumerate(ks):
            if k == 1:
                out[i, j] = float(bool(r["greedy"]["correct"]))
            else:
                out[i, j] = expected_vote_accuracy(answers, r["gold"], int(k), logprobs=lps, n_draws=n_draws, rng=rng)
    return out


def _has_flops(r: Mapping[str, Any]) -> bool:
    """Whether a record carries the FLOPs fields cost_matrix(unit='flops') needs."""
    f = r.get("flops") or {}
    need = {"ours_total", "vanilla_total"}
    return need <= set(f.get("greedy") or {}) and need | {"encoder", "prefill", "decode"} <= set(f.get("k_max") or {})


def cost_matrix(records: Sequence[Mapping[str, Any]], ks: Sequence[int] = K_CHOICES, unit: str = "k") -> np.ndarray:
    """(n_items, len(ks)) compute: unit "k" = K; unit "flops" = FLOPs relative to the item's vanilla greedy run
    (encoder + pruned prefill + K times the mean recorded rollout's decode; K=1 is the greedy call itself)."""
    if unit not in ("k", "flops"):
        raise InvalidArgumentError(f"cost unit must be 'k' or 'flops', got {unit!r}")
    out = np.zeros((len(records), len(ks)))
    for i, r in enumerate(records):
        if unit == "k":
            out[i] = ks
            continue
        if not _has_flops(r):
            raise InvalidArgumentError(f"record {r.get('id')!r} has no FLOPs; use cost unit 'k'")
        g, m = r["flops"]["greedy"], r["flops"]["k_max"]
        base = float(g["vanilla_total"])
        shared = (float(m["encoder"]) + float(m["prefill"])) * float(m["vanilla_total"])
        per_rollout = float(m["decode"]) * float(m["vanilla_total"]) / max(len(r["rollouts"]), 1)
        for j, k in enumerate(ks):
            out[i, j] = float(g["ours_total"]) / base if k == 1 else (shared + k * per_rollout) / base
    return out


# ------------------------------------------------------------------------------------------------------------
# fitting the policy
# ------------------------------------------------------------------------------------------------------------
def _check_records(records: Sequence[Mapping[str, Any]]) -> int:
    """Validate the records' shape; returns the feature length."""
    if not records:
        raise InvalidArgumentError("no calibration records")
    d = None
    for r in records:
        for key in ("features", "greedy", "rollouts", "gold"):
            if key not in r:
                raise InvalidArgumentError(f"record {r.get('id')!r} lacks {key!r}; not a calibration record")
        if r.get("feature_version", FEATURE_VERSION) != FEATURE_VERSION:
            raise InvalidArgumentError(f"record {r.get('id')!r} has feature version {r.get('feature_version')}, "
                                       f"this avis-llamacpp computes {FEATURE_VERSION}; recalibrate")
        n = len(r["features"])
        if d is None:
            d = n
        elif n != d:
            raise InvalidArgumentError(f"record {r.get('id')!r} has {n} features, earlier ones {d} (mixed models?)")
        if not r["rollouts"]:
            raise InvalidArgumentError(f"record {r.get('id')!r} has no rollouts")
    return int(d)


def fit_policy(records: Sequence[Mapping[str, Any]] | str | os.PathLike, lambda_: float | None = None,
               budget: float | None = None, seed: int = 0, *, ks: Sequence[int] = K_CHOICES, cost: str = "auto",
               n_bins: Sequence[int] = (3, 4, 5, 6), cv: int = 5, n_draws: int = 256, tau: float | None = _UNSET,
               ratio: float | None = None, predictor_params: Mapping[str, Any] | None = None,
               tau_calibration: Mapping[str, Any] | None = None) -> tuple[AVISPolicy, dict[str, Any]]:
    """Fit predictor + K map on calibration records; returns the policy and a JSON-serialisable report.

    lambda_ / budget: see `policy.fit_k_map` (neither: lambda_ = DEFAULT_LAMBDA). cost: "k" (mean K), "flops"
    (relative FLOPs) or "auto" (FLOPs when every record has them). ks above the records' k_max are dropped.
    tau / ratio default to the pruning the records were made with. tau_calibration: how that tau was chosen for
    this model (tau.TauCalibration.to_dict()); the policy records it, so tau="auto" queries use its tau."""
    from .predictor import DifficultyPredictor, binary_metrics

    if not isinstance(records, (list, tuple)):
        records = load_records(records)
    d = _check_records(records)
    if lambda_ is None and budget is None:
        lambda_ = DEFAULT_LAMBDA
    k_max = min(len(r["rollouts"]) for r in records)
    ks_all = [int(k) for k in ks]
    ks = [k for k in ks_all if k <= k_max]
    if ks != ks_all:
        logger.warning("records hold %d rollouts per item: K choices limited to %s", k_max, ks)
    if not ks:
        raise InvalidArgumentError(f"no K choice fits the records' {k_max} rollouts")
    unit = ("flops" if all(_has_flops(r) for r in records) else "k") if cost == "auto" else cost
    X = np.array([r["features"] for r in records], dtype=np.float64)
    y = np.array([bool(r["greedy"]["correct"]) for r in records], dtype=np.int64)
    pred = DifficultyPredictor(random_state=seed, **dict(predictor_params or {})).fit(X, y)
    if pred.oof_proba_ is not None:
        p_oof = pred.oof_proba_
        held_out = {**pred.cv_metrics_, "note": "out-of-fold predictions of the chosen candidate (choosing among "
                                                "candidates on the same folds makes them slightly optimistic)"}
    else:
        p_oof, held_out = pred.predict_proba(X)[:, 1], {**binary_metrics(y, pred.predict_proba(X)[:, 1]),
                                                         "n_folds": 0, "note": "in-sample (too few of one class for CV)"}
    acc = accuracy_matrix(records, ks, n_draws=n_draws, seed=seed)
    costm = cost_matrix(records, ks, unit)
    km, map_info = fit_k_map(p_oof, acc, costm, ks, lambda_=lambda_, budget=budget, n_bins=n_bins, cv=cv, seed=seed)

    pruning = records[0].get("pruning") or {}
    if tau is _UNSET:
        if ratio is None:
            tau, ratio = (pruning.get("tau"), pruning.get("ratio")) if pruning else (DEFAULT_TAU, None)
        else:
            tau = None
    if pruning and (pruning.get("tau"), pruning.get("ratio")) != (tau, ratio):
        logger.warning("policy pruning (tau=%s, ratio=%s) differs from the calibration run's %s: the measured "
                       "accuracies may not hold", tau, ratio, pruning)
    model = dict(records[0].get("model") or {})
    if len({json.dumps(r.get("model"), sort_keys=True) for r in records}) > 1:
        logger.warning("records come from more than one model; the policy is labelled with the first")
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    kcost = cost_matrix(records, ks, "k")
    fl = cost_matrix(records, ks, "flops") if all(_has_flops(r) for r in records) else None
    col = np.array([ks.index(k) for k in (km.k_for(p) for p in p_oof)])
    rows = np.arange(len(records))
    fixed = {str(k): {"accuracy": float(acc[:, j].mean()), "mean_k": float(k),
                      "relative_flops": None if fl is None else float(fl[:, j].mean())} for j, k in enumerate(ks)}
    policy_row = {"accuracy": float(acc[rows, col].mean()), "mean_k": float(kcost[rows, col].mean()),
                  "relative_flops": None if fl is None else float(fl[rows, col].mean()),
                  "cv_accuracy": map_info["cv_accuracy"], "cv_cost": map_info["cv_cost"]}
    report = {
        "n_items": len(records), "k_max": k_max, "ks": ks, "cost_unit": unit, "lambda": lambda_, "budget": budget,
        "seed": seed, "created": created, "model": model,
        "pruning": {"tau": tau, "ratio": ratio},
        "sampling": records[0].get("sampling"),  # None: records from before it was recorded (the default)
        "predictor": {"chosen": pred.chosen_, "reason": pred.selection_["reason"], "kind": pred.to_numpy().kind,
                      "base_rate": float(y.mean()), "held_out": held_out,
                      "candidates": pred.selection_.get("candidates", {})},
        "k_map": {**km.to_dict(), "text": str(km), **{k: v for k, v in map_info.items()
                                                      if k not in ("accuracy", "cost")}},
        "policy": policy_row, "fixed": fixed,
        "vote_accuracy_k_max": float(np.mean([bool(r.get("vote", {}).get("correct")) for r in records])),
    }
    summary = {"n_items": len(records), "k_max": k_max, "cost_unit": unit, "lambda": lambda_, "budget": budget,
               "predictor": pred.chosen_, "held_out_auc": held_out.get("auc"), "accuracy": policy_row["accuracy"],
               "mean_k": policy_row["mean_k"]}
    if tau_calibration is not None and (tau is None or not math.isclose(float(tau_calibration["tau"]), tau)):
        raise InvalidArgumentError(f"the calibrated tau {tau_calibration.get('tau')} is not the policy's tau {tau}")
    report["tau_calibration"] = None if tau_calibration is None else dict(tau_calibration)
    policy = AVISPolicy(pred.to_numpy(), km, tau=tau, ratio=ratio, feature_spec=FeatureSpec.from_length(d),
                        info={**model, "created": created, "calibration": summary,
                              "sampling": report["sampling"]},
                        tau_calibration=None if tau_calibration is None else dict(tau_calibration))
    return policy, report


def _fmt(x: Any, spec: str = ".3f") -> str:
    """format(x, spec), or 'n/a' padded to the spec's width for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        width = re.match(r"\d*", spec).group(0)
        return "n/a".rjust(int(width) if width else 0)
    return format(x, spec)


def format_report(report: Mapping[str, Any]) -> str:
    """The calibration report as readable text."""
    pr, km, pol = report["predictor"], report["k_map"], report["policy"]
    ho = pr["held_out"]
    obj = f"lambda {report['lambda']:g}" if report.get("lambda") is not None else f"budget {report['budget']:g}"
    unit = "relative FLOPs" if report["cost_unit"] == "flops" else "mean K"
    lines = [
        f"AVIS calibration: {report['n_items']} items, K_max {report['k_max']}, objective accuracy vs {unit} ({obj})",
        f"predictor: {pr['reason']}",
        f"  held-out ({ho.get('n_folds', 0)} folds): AUC {_fmt(ho.get('auc'))}, Brier {_fmt(ho.get('brier'), '.4f')}, "
        f"log-loss {_fmt(ho.get('log_loss'), '.4f')}; greedy accuracy {pr['base_rate']:.3f}",
        f"K map ({km['n_bins']} quantile bins, {km['n_bins_reason']}): {km['text']}",
        f"  {'':18s}{'accuracy':>10s}{'mean K':>9s}{'rel. FLOPs':>12s}",
    ]
    for k, row in report["fixed"].items():
        lines.append(f"  {'fixed K=' + k:18s}{row['accuracy']:10.3f}{row['mean_k']:9.2f}"
                     f"{_fmt(row['relative_flops'], '12.2f')}")
    lines.append(f"  {'AVIS policy':18s}{pol['accuracy']:10.3f}{pol['mean_k']:9.2f}"
                 f"{_fmt(pol['relative_flops'], '12.2f')}")
    if pol.get("cv_accuracy") is not None:
        lines.append(f"  {'AVIS (map CV)':18s}{pol['cv_accuracy']:10.3f}   ({unit} {pol['cv_cost']:.2f})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def _cmd_calibrate(args: argparse.Namespace) -> int:
    """`avis calibrate`: run the calibration set, fit the policy, write policy.gguf + report.json."""
    from .pipeline import VLM

    if args.no_prune:
        tau, ratio = None, None
    elif args.rho is not None:
        tau, ratio = None, args.rho
    else:
        tau, ratio = args.tau, None
    labelled = _check_cli_args(args, tau, ratio)  # every knob and file before the model loads or anything is written
    logging.getLogger("avis_llamacpp").setLevel(logging.INFO if not args.quiet else logging.WARNING)
    out = Path(args.out)
    cal = None
    tau_kw = dict(keep=args.keep, tolerance=args.tolerance, limit=args.limit, max_tokens=args.max_tokens,
                  answer_tags=args.answer_tags, seed=args.seed, progress=not args.no_progress)
    if not labelled:  # label-free: only tau (no answers to calibrate K on); encodes, never decodes
        with VLM(args.model, args.mmproj, n_seq_max=1, **vlm_kwargs(args)) as vlm:
            cal = choose_tau(vlm, out, items_jsonl=args.items,
                             images=list_images(args.images) if args.images else None, **tau_kw)
        print(format_tau_table(cal))
        written = [out / TAU_FILE]
        if args.policy:
            from .policy import load_policy

            load_policy(args.policy).with_tau(cal.tau, cal.to_dict()).save(out / POLICY_FILE)
            written.append(out / POLICY_FILE)
        print(f"wrote {' and '.join(map(str, written))}" + ("" if args.policy else
              f"; prune with --tau {cal.tau:.4f}, or give --policy P to write P with this tau"))
        return 0
    with VLM(args.model, args.mmproj, n_seq_max=max(8, args.k_max), **vlm_kwargs(args)) as vlm:
        if tau == AUTO_TAU:  # labelled: the largest pruning within --tolerance of unpruned accuracy
            cal = choose_tau(vlm, out, items_jsonl=args.items, **tau_kw)
            print(format_tau_table(cal))
            tau = cal.tau
        records = run_calibration(vlm, args.items, out, k_max=args.k_max, seed=args.seed, max_tokens=args.max_tokens,
                                  answer_tags=args.answer_tags, tau=tau, ratio=ratio, resume=not args.no_resume,
                                  progress=not args.no_progress, limit=args.limit, ray_workers=args.ray,
                                  ray_address=args.ray_address, temperature=args.temperature, top_p=args.top_p)
    policy, report = fit_policy(records, lambda_=args.lambda_, budget=args.budget, seed=args.seed, cost=args.cost,
                                tau_calibration=cal.to_dict() if cal is not None and cal.tau is not None else None)
    policy.save(out / POLICY_FILE)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"wrote {out / POLICY_FILE} and {out / REPORT_FILE}")
    return 0


def _check_cli_args(args: argparse.Namespace, tau: float | str | None, ratio: float | None) -> bool:
    """`avis calibrate`'s knobs, files and items, checked before any model loads or file is written; returns
    whether the items are labelled (else only tau is calibrated, label-free)."""
    from .kdv import validate_pruning

    validate_pruning(ratio=ratio, tau=None if tau == AUTO_TAU else tau)
    if (args.items is None) == (args.images is None):
        raise InvalidArgumentError("give --items (a JSONL of items) or --images (a folder of images), one of them")
    if not 0.0 < args.keep <= 1.0:
        raise InvalidArgumentError(f"--keep (target kept share) must be in (0, 1], got {args.keep}")
    if not 0.0 <= args.tolerance < 1.0:
        raise InvalidArgumentError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    for name, value, low in (("--k-max", args.k_max, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--limit", args.limit, 1), ("--ray", args.ray, 0)):
        if value is not None and value < low:
            raise InvalidArgumentError(f"{name} must be >= {low}, got {value}")
    if args.lambda_ is not None and not args.lambda_ >= 0:
        raise InvalidArgumentError(f"--lambda must be >= 0, got {args.lambda_}")
    if args.budget is not None and not args.budget > 0:
        raise InvalidArgumentError(f"--budget must be > 0, got {args.budget}")
    check_sampling(args.temperature, args.top_p)
    check_model_files(args)
    check_output_dir(args.out)
    if args.policy:
        check_input_file(args.policy, "--policy")
    if args.images is not None:
        list_images(args.images)
        labelled = False
    else:
        check_input_file(args.items, "--items")
        _, labelled = read_calibration_images(args.items, args.limit)  # every item, before the model loads
    if not labelled and tau != AUTO_TAU:
        raise InvalidArgumentError("without answers only tau is calibrated (label-free, at --keep); drop --tau / "
                                   "--rho / --no-prune, or give items with answers")
    if labelled and args.policy:
        raise InvalidArgumentError("--policy (a policy to give the calibrated tau) goes with --images or items "
                                   "without answers; with answers a new policy is fitted")
    return labelled


CLI_DESCRIPTION = """\
Calibrate an AVIS policy for your model on your labelled data: how many rollouts (K) each query gets, chosen
by a difficulty predictor on the image features, and the KDV pruning it runs with.

First the KDV angle tau is chosen for this model (--tau auto, the default; the share of image tokens a given tau
keeps differs from model to model): with answers, the largest pruning whose greedy accuracy stays within
--tolerance of unpruned (a table of tau, kept share and accuracy; tau.json); without answers (--images DIR, or
items without "answer"), label-free: the tau that keeps --keep of the image tokens on average, from encodes
alone, and nothing else is calibrated. The policy records the tau, and `--tau auto` elsewhere means it.

Each item is then run twice: once greedily (K=1) and once with --k-max sampled rollouts sharing one prefill,
pruned as the policy will prune (that tau; or --tau X, --rho, --no-prune). Then a predictor and a p_hat -> K map
are fitted to trade accuracy against compute (--lambda, or --budget). Records are appended as they are made,
so re-running the same command resumes an interrupted run (a re-run with other settings is refused).

Items file (JSONL, one item per line; image paths are relative to the file):
  {"image": "img/0001.png", "question": "How many red shapes?", "options": ["0", "1", "2", "3"], "answer": "B"}

Writes into --out: records.jsonl, calibration.json (the run's settings), report.json and policy.gguf, which
`avis ask --policy` and `avis bench --policy` use.

Time: two model calls per item, the second decoding --k-max rollouts of up to --max-tokens tokens each; try
--limit 20 first to see the speed.

  avis calibrate -m model.gguf --mmproj mmproj.gguf --items calib/items.jsonl --out calib_out --limit 200
  avis calibrate -m model.gguf --mmproj mmproj.gguf --images my_photos/ --out tau_out --keep 0.3
"""


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `calibrate` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("calibrate", help="calibrate an AVIS policy (difficulty predictor + K map) on "
                              "labelled items", description=CLI_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--items", default=None, help="JSONL of items: image (path relative to the file), question, "
                   "options, answer (letter), optional id; without answers only tau is calibrated (label-free)")
    p.add_argument("--images", default=None, help="a folder of images instead of --items: calibrate only tau, "
                   "label-free (encodes only), so that it keeps --keep of the image tokens")
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                   help=f"label-free tau: the mean share of image tokens to keep (default {DEFAULT_KEEP})")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"labelled tau: the accuracy (0-1) pruning may lose against unpruned greedy answers "
                        f"(default {DEFAULT_TOLERANCE})")
    p.add_argument("--policy", default=None, help="with --images: write this policy with the calibrated tau to "
                   "OUT/policy.gguf")
    p.add_argument("--out", required=True, help="output folder (records.jsonl, policy.gguf, report.json)")
    p.add_argument("--k-max", type=int, default=7, help="rollouts recorded per item (the largest K; default 7)")
    obj = p.add_mutually_exclusive_group()
    obj.add_argument("--lambda", dest="lambda_", type=float, default=None,
                     help=f"accuracy - lambda * compute trade-off (default {DEFAULT_LAMBDA})")
    obj.add_argument("--budget", type=float, default=None, help="best accuracy with mean compute <= budget")
    p.add_argument("--cost", choices=("auto", "k", "flops"), default="auto",
                   help="compute measure: mean K or FLOPs relative to vanilla (auto: FLOPs)")
    p.add_argument("--seed", type=int, default=0, help="rollout seeds, CV folds")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per rollout")
    add_answer_tags_arg(p)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the k_max rollouts")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of the k_max rollouts")
    add_pruning_args(p, tau_default=AUTO_TAU, no_prune=True,
                     tau_help="KDV adaptive angle in radians (e.g. 0.785 or pi/4), or auto (default): chosen here "
                              "for this model, labelled (--tolerance) with answers, else label-free (--keep)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--no-resume", action="store_true", help="start over instead of skipping recorded items")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress log lines")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    p.add_argument("--ray", type=int, default=0, help="spread items over this many Ray workers (0: in process)")
    p.add_argument("--ray-address", default=None, help="existing Ray cluster address (default: start a local one)")
    p.set_defaults(func=_cmd_calibrate)
    return p


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m avis_llamacpp.calibrate ...` (the same as `avis calibrate ...`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m avis_llamacpp.calibrate")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(["calibrate", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args) or 0)
    except AVISError as e:
        print(f"avis calibrate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
