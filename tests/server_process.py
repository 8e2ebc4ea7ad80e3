"""Start `python -m avis_llamacpp.server` on a free 127.0.0.1 port for a test and stop it afterwards. Its output
goes to a log file (a pipe nobody reads fills up after enough request logs and blocks the server mid-request).
ASGIClient posts to the server's ASGI app in process instead."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

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


class ASGIClient:
    """Posts to an ASGI app in process, on one event loop (llama_cpp.server's locks are created once)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()

    def post(self, path: str, body: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
             client: str = "127.0.0.1") -> tuple[int, bytes]:
        """POST body to path with extra headers from the client address; (status, response body)."""
        return self.loop.run_until_complete(self._post(path, body, list(headers), client))

    async def _post(self, path: str, body: bytes, headers: list[tuple[bytes, bytes]], client: str) -> tuple[int, bytes]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        status: list[int] = []
        chunks: list[bytes] = []

        async def receive() -> dict:
            if incoming:
                return incoming.pop(0)
            await asyncio.sleep(3600)  # the client stays connected
            return {"type": "http.disconnect"}

        async def send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             *headers],
                 "client": (client, 5000), "server": ("127.0.0.1", 8000)}
        await self.app(scope, receive, send)
        assert len(status) == 1, f"one response start expected, got {status}"
        return status[0], b"".join(chunks)

    def close(self) -> None:
        """Cancel what the app left running on the loop (sse-starlette's shutdown watcher polls until a server
        exits; a test client never does), let the cancellations run, then close the loop, so no pending task is
        destroyed at exit ('Task was destroyed but it is pending!')."""
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()
