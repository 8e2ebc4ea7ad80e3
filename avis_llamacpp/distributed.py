"""Spread per-item work (benchmark evaluation, calibration) over a Ray cluster: each worker loads the model
once and runs a named function on its shard of items; results come back in item order, identical to a
single-process run because every item's seeds derive from the item's index, not from the worker.

Ray is an optional extra (`pip install "avis-llamacpp[ray]"`); nothing else imports it."""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)


def resolve(path: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class _Worker:
    """Holds one VLM and runs item functions with it (the body of the Ray actor)."""

    def __init__(self, model: str, mmproj: str, vlm_kwargs: dict[str, Any]) -> None:
        from .pipeline import VLM

        self.vlm = VLM(model, mmproj, **vlm_kwargs)

    def run(self, fn_path: str, jobs: Sequence[tuple[int, Any]], kwargs: dict[str, Any]) -> list[tuple[int, Any]]:
        fn = resolve(fn_path)
        return [(index, fn(self.vlm, item, index=index, **kwargs)) for index, item in jobs]


def worker_threads(vlm_kwargs: dict[str, Any], n_workers: int, address: str | None) -> dict[str, Any]:
    """Worker VLM keywords with threads pinned: on a local cluster (no address) a worker that was given no thread
    count gets an equal share of this machine's cores, prompt batches too (by default each would take half the cores
    for decoding and all of them for prompts, and ggml's thread pool stalls when threads exceed free cores). Given
    counts, and workers on a remote cluster, are left as they are."""
    kw = dict(vlm_kwargs)
    if address is None and kw.get("n_threads") is None and kw.get("n_threads_batch") is None:
        share = max(1, (os.cpu_count() or 1) // max(1, n_workers))
        kw["n_threads"] = kw["n_threads_batch"] = share
    return kw


def ray_map(fn_path: str, items: Sequence[Any], *, model: str, mmproj: str, n_workers: int,
            vlm_kwargs: dict[str, Any] | None = None, fn_kwargs: dict[str, Any] | None = None,
            address: str | None = None, cpus_per_worker: float = 1.0) -> list[Any]:
    """fn(vlm, item, index=i, **fn_kwargs) for every item, sharded round-robin over n_workers Ray actors.
    Connects to `address` (e.g. "auto" for an existing cluster) or starts a local Ray instance (whose workers share
    the cores: worker_threads)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 **({} if address else {"num_cpus": max(1, int(n_workers * cpus_per_worker))}))
    actor_cls = ray.remote(num_cpus=cpus_per_worker)(_Worker)
    kw = worker_threads(vlm_kwargs or {}, n_workers, address)
    workers = [actor_cls.remote(str(model), str(mmproj), kw) for _ in range(n_workers)]
    shards: list[list[tuple[int, Any]]] = [[] for _ in range(n_workers)]
    for i, item in enumerate(items):
        shards[i % n_workers].append((i, item))
    futures = [w.run.remote(fn_path, shard, dict(fn_kwargs or {})) for w, shard in zip(workers, shards) if shard]
    out: list[Any] = [None] * len(items)
    for part in ray.get(futures):
        for index, result in part:
            out[index] = result
    for w in workers:
        ray.kill(w)
    return out
