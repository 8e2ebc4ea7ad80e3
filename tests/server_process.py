"""Start `python -m avis_llamacpp.server` on a free 127.0.0.1 port for a test and stop it afterwards. Its output
goes to a log file (a pipe nobody reads fills up after enough request logs and blocks the server mid-request)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: Sequence[str], log_path: Path, timeout_s: float = 90) -> Iterator[int]:
    """Run the server with `args` (plus --host/--port) until the block ends; yields the port. Fails the test with
    the log's tail if the server exits or does not answer /v1/models within timeout_s."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "avis_llamacpp.server", *args, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT)
        deadline = time.time() + timeout_s
        try:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        pytest.fail(f"server did not start: {Path(log_path).read_text(errors='replace')[-2000:]}")
                    time.sleep(0.3)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
