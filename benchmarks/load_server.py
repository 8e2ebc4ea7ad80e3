"""Load test of the AVIS server on 127.0.0.1: C clients x N mixed good and bad requests at once.

Starts `python -m avis_llamacpp.server` on a generated fixture (or --model/--mmproj), answers every good request
kind once from a single client (the reference), then lets --clients threads send --requests requests each,
drawn (seeded) from the good kinds and a catalogue of client mistakes. Checks: no 5xx; every bad request gets its
expected 4xx with an OpenAI-shaped error; every good answer equals the single-client answer (text, finish reason,
token counts, and for K > 1 every rollout and the vote); the local-file probes (outside / missing) get one and the
same message; the server's RSS after the run stays within --rss-limit-mb of its RSS after the reference pass.

    .venv/bin/python benchmarks/load_server.py --clients 4 --requests 200 [--family llava] \\
        [--out benchmarks/results/load_server_tiny.md] [--json out.json]

Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("load_server")
DEMO_IMAGE = ROOT / "avis_llamacpp" / "data" / "shapes.png"
N_CTX = 1024
LIMITS = {"--avis_slots": "4", "--avis_max_images": "2", "--avis_max_image_pixels": str(1024 * 1024),
          "--avis_max_image_bytes": str(512 * 1024), "--avis_max_request_bytes": str(1024 * 1024),
          "--avis_max_queue": "16"}


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _msgs(url: str | list[str] | None, text: str = "What shapes do you see?") -> list[dict[str, Any]]:
    urls = [] if url is None else [url] if isinstance(url, str) else url
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


def request_kinds(image_dir: Path, max_tokens: int) -> tuple[dict[str, dict], dict[str, tuple[Any, int, str]]]:
    """Good kinds (name -> body) and bad kinds (name -> (body or raw bytes, expected status, expected param))."""
    demo = _uri(DEMO_IMAGE.read_bytes())
    other = _uri(_png(64, 48))
    good = {
        "k1_greedy": {"messages": _msgs(demo), "max_tokens": max_tokens, "temperature": 0.0},
        "k1_sampled_seed": {"messages": _msgs(other), "max_tokens": max_tokens, "temperature": 0.8, "seed": 7},
        "k3_ratio": {"messages": _msgs(demo), "max_tokens": max_tokens, "avis": {"k": 3, "ratio": 0.5, "seed": 5}},
        "k2_tau_snapshot": {"messages": _msgs(other), "max_tokens": max_tokens,
                            "avis": {"k": 2, "tau": 0.785, "seed": 2, "mode": "snapshot", "content": "text"}},
        "stream_k1": {"messages": _msgs(demo), "max_tokens": max_tokens, "temperature": 0.0, "stream": True},
        "image_dir_file": {"messages": _msgs("shapes.png"), "max_tokens": max_tokens, "temperature": 0.0},
        "two_images": {"messages": _msgs([demo, other]), "max_tokens": max_tokens, "temperature": 0.0},
        "text_only": {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens},
    }
    bad: dict[str, tuple[Any, int, str | None]] = {
        "avis_k_type": ({"messages": _msgs(demo), "avis": {"k": "lots"}}, 400, "avis.k"),
        "avis_unknown_key": ({"messages": _msgs(demo), "avis": {"kk": 3}}, 400, "avis.kk"),
        "k_above_slots": ({"messages": _msgs(demo), "avis": {"k": 99}}, 400, "avis.k"),
        "avis_policy_path": ({"messages": _msgs(demo), "avis": {"policy": "/etc/passwd"}}, 400, "avis.policy"),
        "max_tokens_over_ctx": ({"messages": _msgs(demo), "max_tokens": N_CTX + 1}, 400, "max_tokens"),
        "undecodable_image": ({"messages": _msgs(_uri(b"not an image at all"))}, 400,
                              "messages[0].content[0].image_url"),
        "truncated_image": ({"messages": _msgs(_uri(_png(64, 48)[:60]))}, 400, "messages[0].content[0].image_url"),
        "too_many_pixels": ({"messages": _msgs(_uri(_png(1100, 1000)))}, 400, "messages[0].content[0].image_url"),
        "too_many_images": ({"messages": _msgs([demo, demo, demo])}, 400, "messages[0].content[2].image_url"),
        "probe_outside": ({"messages": _msgs("../secret.png")}, 400, "messages[0].content[0].image_url"),
        "probe_missing": ({"messages": _msgs("no-such-file.png")}, 400, "messages[0].content[0].image_url"),
        "probe_etc_passwd": ({"messages": _msgs("file:///etc/passwd")}, 400, "messages[0].content[0].image_url"),
        "remote_url": ({"messages": _msgs("http://127.0.0.1:9/x.png")}, 400, "messages[0].content[0].image_url"),
        "prompt_over_ctx": ({"messages": _msgs(demo, "word " * 1200), "max_tokens": 4}, 400, "messages"),
        "stream_prompt_over_ctx": ({"messages": _msgs(demo, "word " * 1200), "max_tokens": 4, "stream": True}, 400,
                                   "messages"),
        "media_marker_in_text": ({"messages": _msgs(demo, "look at <__media__> this"), "max_tokens": 4}, 400,
                                 "messages"),
        "stop_type": ({"messages": _msgs(demo), "stop": 5}, 400, "stop"),
        "empty_messages": ({"messages": []}, 400, "messages"),
        "invalid_json": (b'{"messages": [', 400, None),
        "body_too_large": (b'{"messages": "' + b"x" * (1024 * 1024 + 10) + b'"}', 413, None),
    }
    return good, bad


class Server:
    """The AVIS server as a subprocess on a free 127.0.0.1 port."""

    def __init__(self, model: Path, mmproj: Path, image_dir: Path, log_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "avis_llamacpp.server", "--model", str(model), "--clip_model_path", str(mmproj),
               "--chat_format", "avis", "--n_ctx", str(N_CTX), "--n_threads", "1", "--n_threads_batch", "1",
               "--host", "127.0.0.1", "--port", str(self.port), "--avis_image_dir", str(image_dir)]
        for k, v in LIMITS.items():
            cmd += [k, v]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + 120
        while True:
            try:
                self.get("/v1/models")
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.close()
                    raise RuntimeError(f"server did not start; see {log_path}")
                time.sleep(0.3)

    def get(self, path: str) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post(self, body: bytes) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def rss_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the server process in KiB."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                      if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def answer_key(status: int, payload: bytes) -> Any:
    """What must be identical between runs: text, finish reason, token counts, rollouts and votes."""
    if payload.startswith(b"data:"):
        events = [json.loads(line[6:]) for line in payload.decode().splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        last = events[-1]
        return status, text, last["choices"][0]["finish_reason"], last["avis"]["rollouts"], last["avis"]["votes"]
    out = json.loads(payload)
    av = out["avis"]
    return (status, out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"],
            out["usage"]["completion_tokens"], out["usage"]["prompt_tokens"], av["rollouts"], av["votes"], av["k"],
            [im["kept"] for im in av["images"]])


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.model:
        model, mmproj = Path(args.model), Path(args.mmproj)
    else:
        from convert.fixtures import make_fixture
        fx = make_fixture(args.family, "tiny")
        model, mmproj = fx.model, fx.mmproj
    work = Path(tempfile.mkdtemp(prefix="avis-load-"))
    image_dir = work / "public"
    image_dir.mkdir()
    (image_dir / "shapes.png").write_bytes(DEMO_IMAGE.read_bytes())
    (work / "secret.png").write_bytes(DEMO_IMAGE.read_bytes())  # a real image just outside the image dir
    good, bad = request_kinds(image_dir, args.max_tokens)
    encoded = {k: json.dumps(v).encode() for k, v in good.items()}
    bad_encoded = {k: (v if isinstance(v, bytes) else json.dumps(v).encode(), st, p) for k, (v, st, p) in bad.items()}
    server = Server(model, mmproj, image_dir, work / "server.log")
    result: dict[str, Any] = {"clients": args.clients, "requests_per_client": args.requests, "seed": args.seed,
                              "max_tokens": args.max_tokens, "model": str(model), "limits": LIMITS}
    try:
        t0 = time.perf_counter()
        reference = {}
        for name, body in encoded.items():  # single client, one request at a time
            status, payload = server.post(body)
            if status != 200:
                raise RuntimeError(f"reference request {name} failed: {status} {payload[:300]!r}")
            reference[name] = answer_key(status, payload)
        result["reference_s"] = round(time.perf_counter() - t0, 2)
        rss_before, _ = server.rss_kib()

        lock = threading.Lock()
        statuses: Counter = Counter()
        by_kind: dict[str, Counter] = defaultdict(Counter)
        problems: list[str] = []
        probe_messages: set[str] = set()
        rss_samples: list[int] = []

        def client(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            names = list(good) + list(bad)
            for _ in range(args.requests):
                name = rng.choice(list(good)) if rng.random() < args.good_fraction else rng.choice(list(bad))
                if name in good:
                    status, payload = server.post(encoded[name])
                else:
                    body, want, param = bad_encoded[name]
                    status, payload = server.post(body)
                with lock:
                    statuses[status] += 1
                    by_kind[name][status] += 1
                if status >= 500:
                    with lock:
                        problems.append(f"{name}: {status} {payload[:200]!r}")
                    continue
                if name in good:
                    if status != 200:
                        with lock:
                            problems.append(f"{name}: {status} {payload[:200]!r}")
                    elif answer_key(status, payload) != reference[name]:
                        with lock:
                            problems.append(f"{name}: answer differs from the single-client answer")
                    continue
                try:
                    err = json.loads(payload)["error"]
                    shaped = set(err) == {"message", "type", "param", "code"} and bool(err["message"])
                except (ValueError, KeyError, TypeError):
                    shaped, err = False, {}
                if status != want or not shaped or (param is not None and err.get("param") != param):
                    with lock:
                        problems.append(f"{name}: want {want} param {param}, got {status} {payload[:200]!r}")
                if name.startswith("probe_"):
                    with lock:
                        probe_messages.add(err.get("message", "").split(": ", 1)[-1])
            del names

        def sample_rss(stop: threading.Event) -> None:
            while not stop.wait(0.5):
                try:
                    rss_samples.append(server.rss_kib()[0])
                except OSError:
                    return

        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(stop,), daemon=True)
        sampler.start()
        t1 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t1
        stop.set()
        sampler.join()
        rss_after, hwm = server.rss_kib()
        # the probes that name local files must be indistinguishable (outside, missing, /etc/passwd)
        local_probe = {m for m in probe_messages}
        if len(local_probe) > 1:
            problems.append(f"local-file probes got different messages: {sorted(local_probe)}")
        n = sum(statuses.values())
        n_good = sum(sum(c.values()) for k, c in by_kind.items() if k in good)
        result.update({
            "requests": n, "good": n_good, "bad": n - n_good, "wall_s": round(wall, 2),
            "requests_per_s": round(n / wall, 2) if wall else None,
            "status_counts": {str(k): v for k, v in sorted(statuses.items())},
            "by_kind": {k: {str(s): c for s, c in sorted(v.items())} for k, v in sorted(by_kind.items())},
            "n_5xx": sum(v for k, v in statuses.items() if k >= 500),
            "rss_before_mib": round(rss_before / 1024, 1), "rss_after_mib": round(rss_after / 1024, 1),
            "rss_max_during_mib": round(max(rss_samples + [rss_after]) / 1024, 1), "vm_hwm_mib": round(hwm / 1024, 1),
            "rss_growth_mib": round((rss_after - rss_before) / 1024, 1), "rss_limit_mib": args.rss_limit_mb,
            "probe_messages": sorted(local_probe), "problems": problems[:50], "n_problems": len(problems),
        })
        result["ok"] = (not problems and result["n_5xx"] == 0
                        and result["rss_growth_mib"] <= args.rss_limit_mb)
    finally:
        server.close()
    return result


def markdown(r: dict[str, Any], command: str) -> str:
    lines = [f"# Server load test ({r['clients']} clients x {r['requests_per_client']} requests, tiny fixture)", "",
             f"Command: `{command}`", "",
             f"- requests: {r['requests']} ({r['good']} good, {r['bad']} bad), wall {r['wall_s']} s "
             f"({r['requests_per_s']} req/s), reference pass {r['reference_s']} s",
             f"- status codes: {r['status_counts']}; 5xx: {r['n_5xx']}",
             f"- server RSS: {r['rss_before_mib']} MiB after the single-client reference pass, {r['rss_after_mib']} MiB "
             f"after the run (growth {r['rss_growth_mib']} MiB, limit {r['rss_limit_mib']}); max sampled "
             f"{r['rss_max_during_mib']} MiB, VmHWM {r['vm_hwm_mib']} MiB",
             f"- good answers identical to the single-client run, bad requests with their expected 4xx and param: "
             f"{'yes' if not r['n_problems'] else 'NO (' + str(r['n_problems']) + ' problems)'}",
             f"- local-file probe messages (outside / missing / /etc/passwd): {r['probe_messages']}",
             f"- result: {'PASS' if r['ok'] else 'FAIL'}", "", "| request kind | status counts |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in r["by_kind"].items()]
    if r["problems"]:
        lines += ["", "Problems:", *(f"- {p}" for p in r["problems"])]
    lines += ["", f"Limits: {r['limits']}; n_ctx {N_CTX}, n_threads 1, max_tokens {r['max_tokens']}, seed {r['seed']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--good-fraction", type=float, default=0.5, help="share of good requests in the mix")
    p.add_argument("--max-tokens", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", default="llava", help="generated tiny fixture family (without --model)")
    p.add_argument("--model")
    p.add_argument("--mmproj")
    p.add_argument("--rss-limit-mb", type=float, default=64.0, help="allowed RSS growth over the run")
    p.add_argument("--out", help="write a markdown summary here")
    p.add_argument("--json", help="write the full result as JSON here")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = run(args)
    command = " ".join([".venv/bin/python", "benchmarks/load_server.py", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(r, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
