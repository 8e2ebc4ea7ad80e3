"""Peer benchmark: the plugin (Python, on llama-cpp-python) against llama.cpp's own llama-server built from the
llama.cpp that the installed llama-cpp-python vendors, on one fixture, the same images, questions and token counts,
each side on its defaults. Writes a markdown table (with the command and the machine's load) and the raw JSON under
benchmarks/results/.

    .venv/bin/python benchmarks/bench_llama_server.py --size bench -t 2 -R 5
    .venv/bin/python benchmarks/bench_llama_server.py --size real -t 2 -R 5 --side 336 -N 32   # 144 image tokens

llama-server is found from --server, else $AVIS_LLAMA_SERVER, else the build folder below; when none exists the
script prints the commands that build it (offline, from llama-cpp-python's sdist; ~15 min on 2 cores) and exits 2:

    python benchmarks/bench_llama_server.py --print-build

Scenarios (R repeats each; the two sides alternate which goes first per repeat and never run at the same time):
  a  cold question about a new image (a new numpy seed per repeat): wall time and time to first token (TTFT).
  b  turn 2 about the same image: [user: image + Q1, assistant: A1, user: Q2] after an untimed turn 1 (image + Q1).
     A1 is one fixed sentence on both sides, so both reuse turn 1's prompt and prefill the rest.
  c  K sampled answers sharing one prefill: llama-server `n: K` against the plugin's k=K (parallel mode), both with
     the plugin's K > 1 sampling (temperature 0.7, top-p 0.9, top-k and min-p off); a new image per repeat.
  d  the plugin with KDV pruning (ratio 0.75, then tau pi/4) on a's images, against llama-server's a times (it has
     no pruning).
  e  a's questions on the plugin with reuse_prefix=False (a bare VLM's default), against llama-server's a times.

Both sides keep a prompt cache, as each serves by default: llama-server's cache_prompt, the plugin's
VLM(prefix_cache=True) (the default of its chat handler and server). So in a, c and d a new image's request still
reuses the system prompt's tokens before the image from the previous request, on both sides; e shows the cost of
not doing so.

Equal work: greedy everywhere but c; every answer decodes exactly N tokens on both sides (llama-server:
ignore_eos; the plugin has no such knob, so its model's is_eog is wrapped to report no end of generation: an EOS
it samples is then an ordinary token). Token counts of both sides are checked; a mismatch exits 1.

Timing: llama-server streams (timings_per_token); its TTFT is the client's time to the first SSE chunk minus that
chunk's own predicted_ms (non-zero only when the first token(s) were held back as incomplete UTF-8). The plugin's
TTFT is the time from the call to its first sampled token. Wall: from sending the request (body already
JSON-encoded) / calling the method, to the last byte / the returned Answer. The plugin gets each image as the same
PNG data URI the server gets, and decodes it inside the timed call as the server does. Ratios are per repeat
(plugin / server on the same image), reported as their median and min-max.

Known differences, left at each side's defaults (also in the JSON under info.differences): the prompt (the GGUF's
chat template vs llama-cpp-python's Qwen2.5-VL format: one newline fewer on the plugin side), n_batch (2048 vs 512;
n_ubatch 512 on both), the plugin's KDV key capture in the encoder, loopback HTTP + JSON + SSE on the server side.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages (convert, avis_llamacpp) importable
    sys.path.insert(0, str(ROOT))

Q1 = "What is in the image?"
Q2 = "How many shapes are there, and which colours?"
A1 = "The image shows coloured rectangles and ellipses on a plain background."  # scenario b's turn-1 answer
PLUGIN_URL = "avis-image://0"  # placeholder URL for VLM.render_messages
K_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0}  # the plugin's K > 1 defaults, spelt out


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python's version (its sdist vendors the llama.cpp that llama-server is built from)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "0.3.36"  # the version scripts/setup.sh installs


# ------------------------------------------------------------------------------------------------ llama-server
def cache_dir() -> Path:
    """The project's cache root (scripts/setup.sh's AVIS_CACHE_DIR rule)."""
    env = os.environ.get("AVIS_CACHE_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "avis-llamacpp"


def build_dir(version: str) -> Path:
    return cache_dir() / f"llama-server-{version}"


def build_commands(version: str) -> str:
    """Shell commands that build llama-server offline from llama-cpp-python's sdist (same llama.cpp commit)."""
    d = build_dir(version)
    src = d / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    return "\n".join([
        f"mkdir -p {d}",
        f"pip download --no-deps --no-binary :all: llama-cpp-python=={version} -d {d}",
        f"tar xzf {d}/llama_cpp_python-{version}.tar.gz -C {d}",
        f"cmake -S {src} -B {d}/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON "
        "-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF",
        f"cmake --build {d}/build --target llama-server -j2",
        "# (LLAMA_USE_PREBUILT_UI=OFF keeps the build offline; add nice -n 19 / -j1 on a shared machine)",
    ])


def find_server(explicit: str | None, version: str) -> str | None:
    """--server, else $AVIS_LLAMA_SERVER, else the build folder of build_commands, else llama-server on PATH."""
    default = str(build_dir(version) / "build" / "bin" / "llama-server")
    for cand in (explicit, os.environ.get("AVIS_LLAMA_SERVER"), default):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
        if cand and cand == explicit:
            raise SystemExit(f"--server {explicit}: not an executable file")
    return shutil.which("llama-server")


class Server:
    """One llama-server process on 127.0.0.1, stopped by its PID only."""

    def __init__(self, binary: str, model: str, mmproj: str, threads: int, ctx: int, extra: list[str],
                 log_path: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [binary, "-m", model, "--mmproj", mmproj, "-t", str(threads), "-c", str(ctx),
                    "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log: Any = None

    def start(self, timeout: float = 900.0) -> float:
        """Start and wait for /health; returns the seconds it took (model load and warm-up)."""
        t0 = time.perf_counter()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                r = c.getresponse()
                body = r.read()
                c.close()
                if r.status == 200 and b"ok" in body:
                    return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"llama-server not healthy after {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.25)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        out = json.loads(c.getresponse().read())
        c.close()
        return out

    def chat(self, body: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
        """POST /v1/chat/completions; a streaming answer is read event by event (first-chunk time, per-choice
        text, finish reasons, usage, last timings). The clock starts after the body is JSON-encoded."""
        payload = json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=payload, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:2000]!r}")
        out: dict[str, Any] = {"content": {}, "finish": {}, "usage": None, "timings": None, "ttft_s": None}
        if not body.get("stream"):
            data = json.loads(resp.read())
            out["wall_s"] = time.perf_counter() - t0
            for ch in data["choices"]:
                out["content"][ch["index"]] = ch["message"].get("content") or ""
                out["finish"][ch["index"]] = ch["finish_reason"]
            out["usage"], out["timings"] = data.get("usage"), data.get("timings")
            conn.close()
            return out
        first_t, first_pred_ms = None, 0.0
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            raw = line[5:].strip()
            if raw == b"[DONE]":
                break
            ev = json.loads(raw)
            if "error" in ev:
                raise RuntimeError(f"llama-server stream error: {ev['error']}")
            if first_t is None and ev.get("choices"):
                first_t = time.perf_counter()
                first_pred_ms = (ev.get("timings") or {}).get("predicted_ms", 0.0)
            for ch in ev.get("choices", []):
                i = ch.get("index", 0)
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    out["content"][i] = out["content"].get(i, "") + piece
                if ch.get("finish_reason"):
                    out["finish"][i] = ch["finish_reason"]
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            if ev.get("timings"):
                out["timings"] = ev["timings"]  # the last event's are the request's totals
        out["wall_s"] = time.perf_counter() - t0
        out["ttft_s"] = None if first_t is None else first_t - t0 - first_pred_ms / 1000.0
        conn.close()
        return out


def server_body(messages: list[dict], n: int, *, k: int = 1, seed: int | None = None) -> dict[str, Any]:
    """A chat request decoding exactly n tokens: streamed and greedy at k = 1, n = k sampled completions else."""
    body: dict[str, Any] = {"messages": messages, "max_tokens": n, "ignore_eos": True, "stream": k == 1}
    if k == 1:
        body.update(temperature=0.0, stream_options={"include_usage": True}, timings_per_token=True)
    else:
        body.update(K_SAMPLING, n=k)
        if seed is not None:
            body["seed"] = seed
    return body


def user_msg(image_url: str, text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


# ------------------------------------------------------------------------------------------------------ plugin
class EogHook:
    """Wraps a plugin Model's is_eog (called right after each sampled token): records when a query's first token
    was sampled and how many end-of-generation tokens were, and reports none, so every rollout decodes exactly
    max_tokens tokens (llama-server's ignore_eos)."""

    def __init__(self, model: Any) -> None:
        self.orig = model.is_eog
        model.is_eog = self
        self.reset()

    def reset(self) -> None:
        self.t_first: float | None = None
        self.n_eog = 0

    def __call__(self, tok: int) -> bool:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.n_eog += bool(self.orig(tok))
        return False


def plugin_call(vlm: Any, hook: EogHook, fn: str, *args: Any, **kw: Any) -> dict[str, Any]:
    hook.reset()
    t0 = time.perf_counter()
    a = getattr(vlm, fn)(*args, **kw)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ttft_s": None if hook.t_first is None else hook.t_first - t0,
            "decode_tokens": list(a.decode_tokens), "prompt_tokens": a.prompt_tokens,
            "image_tokens": sum(a.image_tokens), "kept_tokens": sum(a.kept_tokens), "tokens_skipped": a.tokens_skipped,
            "timings": dict(a.timings), "eog_sampled": hook.n_eog}


# ---------------------------------------------------------------------------------------------------- images
def make_png(seed: int, side: int) -> bytes:
    """A side x side RGB PNG from numpy's default_rng(seed): a random background, 12 random rectangles /
    ellipses and N(0, 6) pixel noise (KDV's adaptive tau then prunes a share of the tokens, as on a photo)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (side, side), tuple(int(x) for x in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = (int(v) for v in rng.integers(0, max(1, side - 60), 2))
        w, h = (int(v) for v in rng.integers(max(2, side // 16), max(3, side // 3), 2))
        colour = tuple(int(x) for x in rng.integers(0, 256, 3))
        box = [x0, y0, min(side - 1, x0 + w), min(side - 1, y0 + h)]
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    noisy = np.asarray(im).astype(np.int16) + rng.normal(0, 6, (side, side, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ------------------------------------------------------------------------------------------------- summaries
def spread(xs: list[float]) -> str:
    """median [min-max] of a list of seconds or ratios."""
    if not xs:
        return "-"
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def verdict(ratios: list[float]) -> str:
    """Where the plugin stands over the repeats: behind / ahead when every paired ratio is above / below 1."""
    if not ratios:
        return "-"
    return "behind" if min(ratios) > 1.0 else "ahead" if max(ratios) < 1.0 else "level"


def server_tokens(res: dict[str, Any], k: int) -> str:
    """llama-server's decoded tokens per completion (usage.completion_tokens; with n > 1 every choice must also
    have stopped on length, i.e. reached max_tokens)."""
    u = (res.get("usage") or {}).get("completion_tokens")
    if k == 1:
        return str(u)
    fin = [res["finish"].get(i) for i in range(k)]
    return f"{k}x{u}" if all(f == "length" for f in fin) else f"{u}, finish {fin}"


def plugin_tokens(res: dict[str, Any]) -> str:
    d = res["decode_tokens"]
    return str(d[0]) if len(d) == 1 else f"{len(d)}x{d[0]}" if len(set(d)) == 1 else "+".join(map(str, d))


def summarise(raw: dict[str, dict[str, list[dict]]], n: int, k: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Table rows (wall and TTFT per scenario, medians with min-max, paired ratios) and token-count mismatches."""
    rows: list[dict[str, Any]] = []
    mismatches: list[str] = []
    specs = [("a", "a. cold question", 1, None), ("b", "b. turn 2, cached prefix", 1, None),
             ("c", f"c. K={k} sampled, one shared prefill", k, None),
             ("d_ratio", "d. plugin KDV ratio 0.75 (server: a)", 1, "a"),
             ("d_tau", "d. plugin KDV tau pi/4 (server: a)", 1, "a"),
             ("e", "e. plugin without prefix reuse (server: a)", 1, "a")]
    for name, label, kk, server_from in specs:
        if name not in raw:
            continue
        sres, pres = raw[server_from or name]["server"], raw[name]["plugin"]
        s_tok = sorted({server_tokens(x, kk) for x in sres})
        p_tok = sorted({plugin_tokens(x) for x in pres})
        want = [str(n)] if kk == 1 else [f"{kk}x{n}"]
        if s_tok != want or p_tok != want:
            mismatches.append(f"{label}: server tokens {s_tok}, plugin tokens {p_tok}, expected {want}")
        for metric in ("wall_s", "ttft_s") if kk == 1 else ("wall_s",):
            sv, pv = [x[metric] for x in sres], [x[metric] for x in pres]
            ratios = [p / s for p, s in zip(pv, sv) if p is not None and s]
            rows.append({"scenario": label, "metric": "wall" if metric == "wall_s" else "TTFT",
                         "server_s": sv, "plugin_s": pv, "ratios": ratios, "verdict": verdict(ratios),
                         "tokens": f"{'/'.join(s_tok)} / {'/'.join(p_tok)}"})
    return rows, mismatches


def details(raw: dict[str, dict[str, list[dict]]]) -> list[dict[str, Any]]:
    """Where each side's time went (medians): server prompt / predicted ms, plugin encode / prefill / decode ms."""
    med = lambda xs: round(statistics.median(xs), 1) if xs else None  # noqa: E731
    out = []
    for name, sides in raw.items():
        for side, rs in sides.items():
            if not rs:
                continue
            if side == "server":
                tm = [x.get("timings") or {} for x in rs]
                us = [x.get("usage") or {} for x in rs]
                out.append({"scenario": name, "side": side,
                            "prompt_tokens": sorted({u.get("prompt_tokens") for u in us}),
                            "cached_tokens": sorted({(u.get("prompt_tokens_details") or {}).get("cached_tokens")
                                                     for u in us}, key=str),
                            "prompt_ms": med([t.get("prompt_ms", 0.0) for t in tm]),
                            "predicted_ms": med([t.get("predicted_ms", 0.0) for t in tm])})
            else:
                tm = [x["timings"] for x in rs]
                out.append({"scenario": name, "side": side,
                            "prompt_tokens": sorted({x["prompt_tokens"] for x in rs}),
                            "cached_tokens": sorted({x["tokens_skipped"] for x in rs}),
                            "kept_of_image_tokens": sorted({f"{x['kept_tokens']}/{x['image_tokens']}" for x in rs}),
                            "encode_ms": med([t["encode_s"] * 1000 for t in tm]),
                            "prefill_ms": med([t["prefill_s"] * 1000 for t in tm]),
                            "decode_ms": med([t["decode_s"] * 1000 for t in tm]),
                            "eog_sampled_and_ignored": sorted({x["eog_sampled"] for x in rs})})
    return out


def markdown(info: dict[str, Any], rows: list[dict[str, Any]], det: list[dict[str, Any]],
             mismatches: list[str]) -> str:
    lines = [f"# bench_llama_server.py: plugin vs llama-server, qwen25vl {info['size']} fixture", "",
             f"Command: `{info['command']}`", "",
             f"Started {info['started']} on {info['host']} ({info['cpus']} CPUs); load average before "
             f"{info['load_before']}, after {info['load_after']}, 1-min load during the run {info['load_during']} "
             f"(its own {info['threads']} threads count). {info['image_tokens']} image tokens "
             f"({info['image_side']} px), {info['max_tokens']} decoded tokens per answer, {info['threads']} threads, "
             f"R = {info['repeat']} repeats (median [min-max]; ratio = plugin / server per repeat, same image).", "",
             f"- llama-server: `{info['llama_server_command']}` ({info['llama_server_version']})",
             f"- plugin: `{info['plugin_constructor']}` (llama-cpp-python {info['llama_cpp_python']}, "
             f"avis-llamacpp {info['avis_llamacpp_commit']}; {info['plugin_settings']})", "",
             "| scenario | metric | llama-server s | plugin s | plugin / server | plugin is | tokens server / plugin |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['metric']} | {spread(r['server_s'])} | {spread(r['plugin_s'])} | "
                     f"{spread(r['ratios'])} | {r['verdict']} | {r['tokens']} |")
    lines += ["", "Where the time went (medians):", "", "```"] + [json.dumps(d) for d in det] + ["```"]
    lines += ["", "Differences left at each side's defaults:", ""] + [f"- {d}" for d in info["differences"]]
    if mismatches:
        lines += ["", "TOKEN COUNT MISMATCH:", ""] + [f"- {m}" for m in mismatches]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=None, help="llama-server binary (default: $AVIS_LLAMA_SERVER, then "
                   f"{build_dir(llama_cpp_python_version())}/build/bin/llama-server, then PATH)")
    p.add_argument("--print-build", action="store_true", help="print the commands that build llama-server, exit")
    p.add_argument("--size", choices=["tiny", "bench", "real"], default="bench", help="qwen25vl fixture size")
    p.add_argument("--model", default=None, help="text GGUF instead of the fixture's (with --mmproj)")
    p.add_argument("--mmproj", default=None, help="mmproj GGUF instead of the fixture's")
    p.add_argument("-t", "--threads", type=int, default=2, help="threads on both sides (never above free cores)")
    p.add_argument("-R", "--repeat", type=int, default=5, help="repeats per scenario")
    p.add_argument("-N", "--max-tokens", type=int, default=64, help="tokens every answer decodes")
    p.add_argument("-K", "--k", type=int, default=7, help="completions in scenario c")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="context size, both sides")
    p.add_argument("--side", type=int, default=644, help="image side in pixels (644: 529 image tokens, 336: 144)")
    p.add_argument("--seed", type=int, default=1234, help="base numpy seed of the images")
    p.add_argument("--scenarios", default="a,b,c,d,e", help="comma list of a, b, c, d, e (d and e need a)")
    p.add_argument("--server-args", default="-np 8 -kvu", help="extra llama-server flags (default: 8 slots in one "
                   "unified KV cache, like the plugin's n_seq_max=8 context; n=K needs >= K slots)")
    p.add_argument("--no-repack", action="store_true", help="both sides without llama.cpp's CPU weight repacking "
                   "(AMX, interleaved layouts): llama-server -nr, the plugin Model(repack=False); for a host whose "
                   "AMX faults on quantized models")
    p.add_argument("--gap", type=float, default=0.5, help="idle seconds between timed calls")
    p.add_argument("--out", type=Path, default=None, help="results prefix (default: "
                   "benchmarks/results/llama_server_qwen25vl_<size>; .md and .json are written)")
    p.add_argument("--log", default=None, help="llama-server's output (default: a file in the temp dir)")
    a = p.parse_args(argv)
    if a.print_build:
        print(build_commands(llama_cpp_python_version()))
        return 0
    scen = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if set(scen) - set("abcde") or (set(scen) & set("de") and "a" not in scen):
        p.error(f"--scenarios {a.scenarios!r}: a comma list of a, b, c, d, e (d and e are compared with a: include a)")
    binary = find_server(a.server, llama_cpp_python_version())
    if binary is None:
        print("llama-server not found; build it (offline) with:\n" + build_commands(llama_cpp_python_version())
              + "\nor pass --server PATH", file=sys.stderr)
        return 2
    if (a.model is None) != (a.mmproj is None):
        p.error("--model and --mmproj go together")

    import llama_cpp

    from avis_llamacpp import VLM
    from avis_llamacpp.native import Model
    from convert.fixtures import make_fixture

    if a.model:
        model, mmproj = a.model, a.mmproj
    else:
        fx = make_fixture("qwen25vl", a.size)
        model, mmproj = str(fx.model), str(fx.mmproj)
    N, R, T, K = a.max_tokens, a.repeat, a.threads, a.k

    def on_term(signum: int, frame: Any) -> None:  # unwind so the finally below stops llama-server
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    ver = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    info: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()], "size": a.size, "threads": T, "repeat": R,
        "max_tokens": N, "k": K, "ctx": a.ctx, "image_side": a.side, "image_seed": a.seed, "model": model,
        "mmproj": mmproj, "llama_server_version": " ".join((ver.stdout + ver.stderr).split()),
        "llama_cpp_python": llama_cpp.__version__, "avis_llamacpp_commit": commit, "questions": [Q1, Q2],
        "turn1_answer": A1, "k_sampling": K_SAMPLING,
        "command": " ".join(map(shlex.quote, [os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(
            str(ROOT)) else sys.executable, "benchmarks/bench_llama_server.py", *(argv if argv is not None
                                                                                   else sys.argv[1:])])),
    }
    if info["load_before"][0] > 0.5:
        print(f"warning: load average {info['load_before']} before the run: timings are indicative only",
              file=sys.stderr)
    seeds = {name: [a.seed + off + r for r in range(R)] for name, off in (("a", 100), ("b", 200), ("c", 300))}
    seeds.update(warm=[a.seed + 900], warm_k=[a.seed + 950])
    info["image_seeds"] = seeds
    images = {s: data_uri(make_png(s, a.side)) for ss in seeds.values() for s in ss}  # all encoded before timing

    log_path = a.log or os.path.join(tempfile.gettempdir(), f"avis-llama-server-{os.getpid()}.log")
    srv = Server(binary, model, mmproj, T, a.ctx, shlex.split(a.server_args) + (["-nr"] if a.no_repack else []),
                 log_path)
    info["llama_server_command"] = " ".join(map(shlex.quote, srv.cmd))
    text_model = "Model(model, repack=False)" if a.no_repack else "model"
    info["plugin_constructor"] = f"VLM({text_model}, mmproj, n_threads={T}, n_ctx={a.ctx}, prefix_cache=True)"
    info["differences"] = [
        "prompt: llama-server renders the GGUF's chat template, the plugin llama-cpp-python's Qwen2.5-VL format "
        "(no newline after the final 'assistant'): see prompt_tokens",
        "n_batch: llama-server 2048, the plugin 512 (n_ubatch 512 on both)",
        f"llama-server extra flags {a.server_args!r}; everything else at its defaults (flash attention auto, "
        "prompt cache, warm-up at load)",
        "the plugin's defaults include KDV key capture in the vision encoder, also when nothing is pruned",
        "EOS: llama-server's ignore_eos bans EOS tokens; the plugin's is_eog wrapper samples them and goes on",
        "llama-server's times include loopback HTTP, JSON and SSE streaming",
        "both sides keep their prompt cache on (llama-server's cache_prompt default; the plugin's prefix_cache, "
        "the default of its chat handler and server, not of a bare VLM): a new image's request reuses the system "
        "prompt's tokens before the image (cached_tokens); e is the plugin without it",
    ]
    print("llama-server:", info["llama_server_command"], flush=True)
    raw: dict[str, dict[str, list[dict]]] = {}

    loads: list[float] = []  # 1-minute load average after each timed call (this run's own 2 threads included)

    def record(name: str, side: str, res: dict[str, Any]) -> None:
        raw.setdefault(name, {"server": [], "plugin": []})[side].append(res)
        loads.append(round(os.getloadavg()[0], 2))

    def both(r: int, name: str, run_server: Callable[[], dict], run_plugin: Callable[[], dict]) -> None:
        order = [("server", run_server), ("plugin", run_plugin)]
        for side, fn in order if r % 2 == 0 else order[::-1]:
            record(name, side, fn())
            time.sleep(a.gap)

    def load_text() -> Any:  # the text model, repacked or not; VLM.close frees it, the finally below again
        m = Model(model, repack=not a.no_repack)
        models.append(m)
        return m

    vlms: list[Any] = []
    models: list[Any] = []
    try:
        info["server_load_s"] = round(srv.start(), 2)
        vlm = VLM(load_text(), mmproj, n_threads=T, n_ctx=a.ctx, prefix_cache=True)
        vlms.append(vlm)
        hook = EogHook(vlm.model)
        info["plugin_settings"] = {"flash_attn": vlm.settings.flash_attn, "n_batch": vlm.settings.n_batch,
                                   "n_ubatch": vlm.settings.n_ubatch, "n_seq_max": vlm.settings.n_seq_max,
                                   "threads": list(vlm.settings.resolved_threads())}
        info["prompt_server"] = srv.post("/apply-template", {"messages": [user_msg(images[seeds["warm"][0]], Q1)]}
                                         ).get("prompt")
        info["prompt_plugin"] = vlm.render_question(Q1)

        # untimed warm-up on both sides: graph allocation and first-use costs of each path
        w, wk = images[seeds["warm"][0]], images[seeds["warm_k"][0]]
        srv.chat(server_body([user_msg(w, Q1)], N))
        info["image_tokens"] = plugin_call(vlm, hook, "ask", w, Q1, max_tokens=N)["image_tokens"]
        if "c" in scen:
            srv.chat(server_body([user_msg(wk, Q1)], N, k=K))
            plugin_call(vlm, hook, "ask", wk, Q1, max_tokens=N, k=K)
        if "d" in scen:
            plugin_call(vlm, hook, "ask", w, Q1, max_tokens=N, ratio=0.75)

        if "a" in scen:
            for r, s in enumerate(seeds["a"]):
                both(r, "a", lambda s=s: srv.chat(server_body([user_msg(images[s], Q1)], N)),
                     lambda s=s: plugin_call(vlm, hook, "ask", images[s], Q1, max_tokens=N))
                print(f"a {r + 1}/{R}", flush=True)
        if "d" in scen:
            for name, kw in (("d_ratio", {"ratio": 0.75}), ("d_tau", {"tau": math.pi / 4})):
                for s in seeds["a"]:
                    record(name, "plugin", plugin_call(vlm, hook, "ask", images[s], Q1, max_tokens=N, **kw))
                    time.sleep(a.gap)
                print(f"{name} done", flush=True)
        if "c" in scen:
            for r, s in enumerate(seeds["c"]):
                both(r, "c", lambda s=s: srv.chat(server_body([user_msg(images[s], Q1)], N, k=K, seed=s)),
                     lambda s=s: plugin_call(vlm, hook, "ask", images[s], Q1, max_tokens=N, k=K, seed=s))
                print(f"c {r + 1}/{R}", flush=True)
        if "b" in scen:
            def turn2(m1: list[dict]) -> list[dict]:
                return m1 + [{"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]

            def server_b(s: int) -> dict[str, Any]:
                m1 = [user_msg(images[s], Q1)]
                t1 = srv.chat(server_body(m1, N))
                t2 = srv.chat(server_body(turn2(m1), N))
                t2["turn1"] = {key: t1[key] for key in ("wall_s", "ttft_s", "usage", "timings")}
                return t2

            def plugin_b(s: int) -> dict[str, Any]:
                m1 = [user_msg(PLUGIN_URL, Q1)]
                t1 = plugin_call(vlm, hook, "generate", vlm.render_messages(m1, [PLUGIN_URL]), [images[s]],
                                 max_tokens=N)
                t2 = plugin_call(vlm, hook, "generate", vlm.render_messages(turn2(m1), [PLUGIN_URL]), [images[s]],
                                 max_tokens=N)
                t2["turn1"] = {key: t1[key] for key in ("wall_s", "ttft_s", "prompt_tokens", "timings")}
                return t2

            for r, s in enumerate(seeds["b"]):
                both(r, "b", lambda s=s: server_b(s), lambda s=s: plugin_b(s))
                print(f"b {r + 1}/{R}", flush=True)
        if "e" in scen:  # the library's default VLM(prefix_cache=False): nothing reused, same context
            for s in seeds["a"]:
                record("e", "plugin", plugin_call(vlm, hook, "ask", images[s], Q1, max_tokens=N, reuse_prefix=False))
                time.sleep(a.gap)
            print("e done", flush=True)
    finally:
        for v in vlms:
            v.close()
        for m in models:
            m.close()
        srv.stop()
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    info["load_during"] = [min(loads), max(loads)] if loads else None

    rows, mismatches = summarise(raw, N, K)
    det = details(raw)
    report = markdown(info, rows, det, mismatches)
    print(report)
    out = a.out or ROOT / "benchmarks" / "results" / f"llama_server_qwen25vl_{a.size}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(report)
    Path(f"{out}.json").write_text(json.dumps({"info": info, "table": rows, "details": det, "mismatches": mismatches,
                                              "raw": raw}, indent=2, default=str))
    print(f"wrote {out}.md and {out}.json")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
