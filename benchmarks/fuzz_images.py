"""Fuzz the full image path (load_image -> mtmd tokenize -> encode) with mutated PNG / JPEG / GIF / WebP bytes.

Cases are generated from a seed (bit flips, truncations, header splices, chunk duplication / deletion,
inserted garbage, width/height field overwrites) and run in a worker subprocess, so a segfault or abort in PIL,
mtmd or ggml is seen as the worker dying: the case is recorded as a crash and a new worker carries on with
the rest. Every case must end either decoded-and-encoded ("ok") or with an ImageError; any other exception
type counts as a failure too (every bad input must give a clear, typed error).

    .venv/bin/python benchmarks/fuzz_images.py --cases 3000 --seed 0 [--family llava]
    .venv/bin/python benchmarks/fuzz_images.py --gguf --cases 3000 --seed 0 [--family qwen25vl]

--gguf fuzzes the model / mmproj GGUF files the same way (see GGUF_WORKER). tests/test_fuzz_images.py runs
short seeded versions of both.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FORMATS = ("PNG", "JPEG", "GIF", "WEBP")


def seed_images() -> dict[str, bytes]:
    """Small valid files to mutate, one per format (+ an animated GIF, a palette PNG with transparency and a
    JPEG with EXIF orientation)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1234)
    base = Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB")
    out: dict[str, bytes] = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        base.save(buf, format=fmt, **({"quality": 80} if fmt in ("JPEG", "WEBP") else {}))
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    frames = [base.convert("P"), Image.new("P", base.size, 3)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["GIF-animated"] = buf.getvalue()
    buf = io.BytesIO()
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(buf, format="PNG", transparency=0)
    out["PNG-palette"] = buf.getvalue()
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(buf, format="JPEG", exif=exif.tobytes())
    out["JPEG-exif"] = buf.getvalue()
    return out


def mutate(data: bytes, seeds: dict[str, bytes], rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of `data`; returns (its name, the mutated bytes)."""
    b = bytearray(data)
    op = rng.choice(("flip", "flip_header", "truncate", "splice_header", "splice_chunk", "duplicate", "delete",
                     "insert", "dims"))
    if op in ("flip", "flip_header"):
        span = len(b) if op == "flip" else min(len(b), 64)
        for _ in range(rng.randint(1, 12)):
            i = rng.randrange(span)
            b[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        b = b[:rng.randrange(len(b))]
    elif op == "splice_header":  # another format's header on this body
        other = seeds[rng.choice(sorted(seeds))]
        n = rng.randint(4, min(64, len(other)))
        b = bytearray(other[:n]) + b[n:]
    elif op == "splice_chunk":  # a chunk of another file pasted in
        other = seeds[rng.choice(sorted(seeds))]
        n = rng.randint(1, min(256, len(other)))
        src = rng.randrange(len(other) - n + 1)
        dst = rng.randrange(len(b))
        b[dst:dst + n] = other[src:src + n]
    elif op == "duplicate":
        i, n = rng.randrange(len(b)), rng.randint(1, 200)
        b[i:i] = b[i:i + n]
    elif op == "delete":
        i, n = rng.randrange(len(b)), rng.randint(1, 200)
        del b[i:i + n]
    elif op == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    else:  # overwrite 2-4 bytes near the start (where the width / height fields live) with big values
        i = rng.randrange(min(len(b), 40))
        n = rng.choice((2, 4))
        b[i:i + n] = rng.choice((b"\xff" * n, b"\x7f" + b"\xff" * (n - 1), b"\x00" * n, b"\x40" + b"\x00" * (n - 1)))
    return op, bytes(b)


def make_cases(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    seeds = seed_images()
    names = sorted(seeds)
    cases = []
    for i in range(n):
        name = rng.choice(names)
        data = seeds[name]
        ops = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            op, data = mutate(data, seeds, rng)
            ops.append(op)
            if not data:
                break
        cases.append((f"{i:05d}-{name}:{'+'.join(ops)}", data))
    return cases


# The worker: loads the VLM once, then reads "<name>\t<hex bytes>" lines and prints one JSON line per case.
WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
SELFTEST = os.environ.get("AVIS_FUZZ_SELFTEST_CRASH")
from avis_llamacpp import VLM
from avis_llamacpp.errors import ImageError
from avis_llamacpp.images import load_image
vlm = VLM(sys.argv[1], sys.argv[2], n_ctx=8192, n_seq_max=1, n_threads=1, n_threads_batch=1, capture_keys=True)
prompt = vlm.render_question("What is this?", 1)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    name, hexdata = line.rstrip("\n").split("\t")
    print(json.dumps({"start": name}), flush=True)
    if SELFTEST and name.startswith(SELFTEST):  # harness self-test: a real segfault
        import ctypes
        ctypes.string_at(0)
    t0 = time.perf_counter()
    try:
        arr = load_image(bytes.fromhex(hexdata))
        with vlm.projector.tokenize(prompt, [arr]) as p:
            for ch in p.images:
                emb = vlm.projector.encode(ch)
                assert emb.shape[0] == ch.n_tokens
        res = {"outcome": "ok", "shape": list(arr.shape)}
    except ImageError as e:
        res = {"outcome": "ImageError", "msg": str(e)[:160]}
    except Exception as e:
        res = {"outcome": type(e).__name__, "msg": str(e)[:300]}
    res.update(name=name, s=round(time.perf_counter() - t0, 4))
    print(json.dumps(res), flush=True)
"""


@dataclass
class FuzzReport:
    cases: int
    seconds: float
    outcomes: Counter = field(default_factory=Counter)
    crashes: list[tuple[str, int]] = field(default_factory=list)  # (case, exit code)
    unexpected: list[dict] = field(default_factory=list)  # exceptions other than ImageError
    slowest: tuple[float, str] = (0.0, "")
    workers: int = 0

    @property
    def clean(self) -> bool:
        return not self.crashes and not self.unexpected

    def summary(self) -> dict:
        return {"cases": self.cases, "seconds": round(self.seconds, 2), "outcomes": dict(self.outcomes),
                "crashes": self.crashes, "unexpected": self.unexpected[:10], "workers_started": self.workers,
                "slowest_case_s": round(self.slowest[0], 3), "slowest_case": self.slowest[1]}


def _drive(worker: str, args: list[str], todo: list[tuple[str, str]], rep: FuzzReport, ok: tuple[str, ...],
           deadline: float) -> None:
    """Feed `todo` (name, payload line) to worker subprocesses, restarting after a crash, until done."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while todo:
        rep.workers += 1
        proc = subprocess.Popen([sys.executable, "-c", worker, *args, str(ROOT)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        feed = "".join(f"{name}\t{payload}\n" for name, payload in todo)
        try:
            out, err = proc.communicate(feed, timeout=max(10.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rep.crashes.append(("<timeout>", -1))
            return
        done, current, ready = set(), None, False
        for line in out.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready"):
                ready = True
            elif "start" in msg:
                current = msg["start"]
            elif "outcome" in msg:
                done.add(msg["name"])
                current = None
                rep.outcomes[msg["outcome"]] += 1
                if msg["outcome"] not in ok:
                    rep.unexpected.append(msg)
                if msg["s"] > rep.slowest[0]:
                    rep.slowest = (msg["s"], msg["name"])
        if proc.returncode != 0:
            if not ready:
                raise RuntimeError(f"fuzz worker failed to start (exit {proc.returncode}): {err[-2000:]}")
            if current is None:
                raise RuntimeError(f"fuzz worker exited with {proc.returncode} between cases: {err[-2000:]}")
            rep.crashes.append((current, proc.returncode))
            rep.outcomes["crash"] += 1
            done.add(current)
        remaining = [c for c in todo if c[0] not in done]
        if len(remaining) == len(todo):
            return  # no progress: give up rather than loop
        todo = remaining


def run_fuzz(model: str | os.PathLike, mmproj: str | os.PathLike, n_cases: int, seed: int = 0,
             timeout_s: float = 1800.0) -> FuzzReport:
    """Run n_cases seeded image mutations through the full image path in worker subprocesses."""
    t0 = time.perf_counter()
    todo = [(name, data.hex()) for name, data in make_cases(n_cases, seed)]
    rep = FuzzReport(cases=len(todo), seconds=0.0)
    _drive(WORKER, [str(model), str(mmproj)], todo, rep, ("ok", "ImageError"), t0 + timeout_s)
    rep.seconds = time.perf_counter() - t0
    return rep


# -- GGUF files ------------------------------------------------------------------------------------------------
# The same harness over mutated model / mmproj files (header-focused: bit flips, 8-byte integer overwrites,
# truncation, random splices): each mutated file is loaded with a good partner and, when it loads, used (a text
# model decodes 3 tokens; an mmproj tokenizes and encodes a small image). Every case must end "ok" or with a
# ModelLoadError (InvalidArgumentError for settings); a crash means a file reaches llama.cpp unguarded.
GGUF_WORKER = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[3])
import numpy as np
from avis_llamacpp.errors import ModelLoadError
from avis_llamacpp.mtmd import Projector
from avis_llamacpp.native import Context, ContextSettings, Model
base = Model(sys.argv[1])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    name, path = line.rstrip("\n").split("\t")
    print(json.dumps({"start": name}), flush=True)
    t0 = time.perf_counter()
    try:
        if name.startswith("model"):
            m = Model(path)
            try:
                c = Context(m, ContextSettings(n_ctx=256, n_seq_max=1, n_threads=1, n_threads_batch=1))
                c.decode_tokens([1, 2, 3], 0)
                c.logits()
                c.close()
            finally:
                m.close()
        else:
            p = Projector(path, base, n_threads=1, use_gpu=False)
            try:
                with p.tokenize("a " + p.marker + " b", [np.full((40, 50, 3), 128, np.uint8)]) as pt:
                    p.encode(pt.images[0])
            finally:
                p.close()
        res = {"outcome": "ok"}
    except ModelLoadError as e:
        res = {"outcome": "ModelLoadError", "msg": str(e)[:160]}
    except Exception as e:
        res = {"outcome": type(e).__name__, "msg": str(e)[:300]}
    os.unlink(path)
    res.update(name=name, s=round(time.perf_counter() - t0, 4))
    print(json.dumps(res), flush=True)
"""


def _gguf_header_size(path: str | os.PathLike) -> int:
    from avis_llamacpp.preflight import scan_gguf

    return scan_gguf(path).data_offset


def make_gguf_cases(model: str | os.PathLike, mmproj: str | os.PathLike, n: int, seed: int,
                    folder: Path) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    srcs = {"model": Path(model).read_bytes(), "mmproj": Path(mmproj).read_bytes()}
    hdr = {"model": _gguf_header_size(model), "mmproj": _gguf_header_size(mmproj)}
    cases = []
    for i in range(n):
        kind = rng.choice(("model", "mmproj"))
        b, h = bytearray(srcs[kind]), hdr[kind]
        op = rng.choice(("flip", "int", "truncate", "splice"))
        if op == "flip":
            for _ in range(rng.randint(1, 8)):
                j = rng.randrange(h)
                b[j] ^= 1 << rng.randrange(8)
        elif op == "int":
            j = rng.choice((8, 16, rng.randrange(24, h)))
            b[j:j + 8] = rng.choice((2**63 - 1, 2**32, 2**31, 2**64 - 1, 0, 1 << 40, 513)).to_bytes(8, "little")
        elif op == "truncate":
            b = b[:rng.randrange(len(b))]
        else:
            j = rng.randrange(8, h)
            b[j:j + 8] = rng.randbytes(8)
        name = f"{kind}-{i:05d}-{op}"
        path = folder / f"{name}.gguf"
        path.write_bytes(bytes(b))
        cases.append((name, str(path)))
    return cases


def run_gguf_fuzz(model: str | os.PathLike, mmproj: str | os.PathLike, n_cases: int, seed: int = 0,
                  timeout_s: float = 1800.0) -> FuzzReport:
    """Load n_cases seeded mutations of the model / mmproj files in worker subprocesses."""
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        todo = make_gguf_cases(model, mmproj, n_cases, seed, Path(tmp))
        rep = FuzzReport(cases=len(todo), seconds=0.0)
        _drive(GGUF_WORKER, [str(model), str(mmproj)], todo, rep, ("ok", "ModelLoadError"), t0 + timeout_s)
    rep.seconds = time.perf_counter() - t0
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", default="llava", choices=("llava", "qwen25vl"))
    ap.add_argument("--gguf", action="store_true", help="fuzz the model / mmproj files instead of image bytes")
    args = ap.parse_args(argv)
    from convert.fixtures import make_fixture

    fx = make_fixture(args.family, "tiny")
    run = run_gguf_fuzz if args.gguf else run_fuzz
    rep = run(fx.model, fx.mmproj, args.cases, args.seed)
    print(json.dumps({"target": "gguf" if args.gguf else "images", "family": args.family, "seed": args.seed,
                      **rep.summary()}, indent=2))
    return 0 if rep.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
