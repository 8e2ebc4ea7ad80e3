"""The server's request rules without a model: which image sources a request may name (and that a local-file
probe learns nothing), and which bodies are client mistakes (4xx naming the field)."""

from __future__ import annotations

import base64
import io
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image

from avis_llamacpp import ImageError
from avis_llamacpp.chat_handler import OVERRIDE_KEYS, _image_source
from avis_llamacpp.errors import InvalidArgumentError
from avis_llamacpp.images import (LOCAL_IMAGE_UNAVAILABLE, ImageSourcePolicy, fetch_request_image, request_images)
from avis_llamacpp.server import RequestError, ServerLimits, _error_for_exception, validate_chat_request


def _png(w: int = 8, h: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture()
def image_tree(tmp_path: Path) -> dict[str, Path]:
    """An image directory (with a real image, a subfolder, a symlink out, a FIFO) next to a secret image."""
    root = tmp_path / "public"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(_png())
    (root / "sub" / "deep.png").write_bytes(_png(5, 5))
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(3, 3))
    (root / "escape.png").symlink_to(secret)
    (root / "inside_link.png").symlink_to(root / "ok.png")
    (root / "dangling.png").symlink_to(tmp_path / "nothing.png")
    os.mkfifo(root / "fifo.png")
    return {"root": root, "secret": secret}


def test_data_uris_always_and_their_limits():
    png = _png(8, 6)
    assert fetch_request_image(_data_uri(png), ImageSourcePolicy()) == png
    with pytest.raises(ImageError, match="over this server's limit of 50 bytes"):
        fetch_request_image(_data_uri(png), ImageSourcePolicy(max_bytes=50))
    with pytest.raises(ImageError, match="8x6 = 48 pixels, over this server's limit of 47"):
        fetch_request_image(_data_uri(png), ImageSourcePolicy(max_pixels=47))
    assert fetch_request_image(_data_uri(png), ImageSourcePolicy(max_pixels=48)) == png
    with pytest.raises(ImageError, match="not a readable image"):
        fetch_request_image(_data_uri(b"hello, not an image"), ImageSourcePolicy())
    with pytest.raises(ImageError, match="truncated or corrupt"):
        fetch_request_image(_data_uri(png[:20]), ImageSourcePolicy())
    with pytest.raises(ImageError, match="invalid base64"):
        fetch_request_image("data:image/png;base64,@@@@", ImageSourcePolicy())
    with pytest.raises(ImageError, match="base64-encoded"):
        fetch_request_image("data:image/png,rawbytes", ImageSourcePolicy())
    with pytest.raises(ImageError, match="unsupported image URL scheme 'ftp'"):
        fetch_request_image("ftp://example.org/x.png", ImageSourcePolicy())


def test_local_files_refused_without_an_image_dir(image_tree):
    for url in (str(image_tree["root"] / "ok.png"), (image_tree["root"] / "ok.png").as_uri(), "ok.png"):
        with pytest.raises(ImageError, match="local image paths and file:// URLs are disabled"):
            fetch_request_image(url, ImageSourcePolicy())


def test_local_files_only_inside_the_image_dir(image_tree):
    root = image_tree["root"]
    policy = ImageSourcePolicy(image_dir=str(root))
    ok = (root / "ok.png").read_bytes()
    # inside: relative, absolute, file:// URL, through a symlink that stays inside, in a subfolder
    for url in ("ok.png", str(root / "ok.png"), (root / "ok.png").as_uri(), "inside_link.png", "sub/../ok.png",
                "file://localhost" + str(root / "ok.png")):
        assert fetch_request_image(url, policy) == ok, url
    assert fetch_request_image("sub/deep.png", policy) == (root / "sub" / "deep.png").read_bytes()
    # outside, escaping, missing or unreadable: one message, whatever the reason
    secret = image_tree["secret"]
    probes = ["../secret.png", str(secret), secret.as_uri(), "escape.png", "/etc/passwd", "file:///etc/passwd",
              "/etc/no-such-file", "missing.png", "sub/missing.png", "../../../../etc/passwd", "dangling.png",
              "fifo.png", "sub", ".", str(root), "bad\x00name.png", "file://otherhost/etc/passwd",
              "%2e%2e/secret.png", "file://" + str(root) + "/..%2fsecret.png"]
    messages = set()
    for url in probes:
        with pytest.raises(ImageError) as e:
            fetch_request_image(url, policy)
        messages.add(str(e.value))
    assert messages == {LOCAL_IMAGE_UNAVAILABLE}
    # a real file inside that is not an image is the operator's business: it says so
    (root / "notes.png").write_bytes(b"just text")
    with pytest.raises(ImageError, match="not a readable image"):
        fetch_request_image("notes.png", policy)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_inside_gives_the_same_message(image_tree):
    p = image_tree["root"] / "locked.png"
    p.write_bytes(_png())
    p.chmod(0)
    with pytest.raises(ImageError, match=LOCAL_IMAGE_UNAVAILABLE):
        fetch_request_image("locked.png", ImageSourcePolicy(image_dir=str(image_tree["root"])))


def test_image_dir_must_exist(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not a directory"):
        ImageSourcePolicy(image_dir=str(tmp_path / "nope"))


class _ImageHTTP(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's API
        if self.path == "/redirect-file":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x.png")  # urllib itself refuses file://
            self.end_headers()
            return
        body = _png() if self.path == "/ok.png" else b"x" * 5000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


def test_remote_urls_only_when_enabled():
    srv = HTTPServer(("127.0.0.1", 0), _ImageHTTP)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        with pytest.raises(ImageError, match="remote image URLs are disabled"):
            fetch_request_image(f"{base}/ok.png", ImageSourcePolicy())
        on = ImageSourcePolicy(allow_remote=True, max_bytes=4000)
        assert fetch_request_image(f"{base}/ok.png", on) == _png()
        with pytest.raises(ImageError, match="over this server's limit of 4000 bytes"):
            fetch_request_image(f"{base}/big", on)
        with pytest.raises(ImageError, match="non-http"):
            fetch_request_image(f"{base}/redirect-file", on)
    finally:
        srv.shutdown()


def test_handler_takes_only_fetched_images_inside_a_request(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(_png())
    assert _image_source(str(p)) == str(p)  # library use: the path as given
    with request_images({"data:a": b"bytes"}):
        assert _image_source("data:a") == b"bytes"
        with pytest.raises(ImageError, match="not fetched under the server's image policy"):
            _image_source(str(p))
    assert _image_source(str(p)) == str(p)


# --------------------------------------------------------------------------- #
# request bodies
# --------------------------------------------------------------------------- #

LIMITS = ServerLimits(max_images=2, slots=4)
IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def _body(**kw):
    return {"messages": [{"role": "user", "content": [IMG, {"type": "text", "text": "hi"}]}], **kw}


def _refused(body, n_ctx=512) -> RequestError:
    with pytest.raises(RequestError) as e:
        validate_chat_request(body, LIMITS, n_ctx)
    err = e.value
    assert 400 <= err.status < 500 and err.payload()["error"]["message"] == err.message
    return err


def test_valid_bodies_pass_with_their_overrides_and_images():
    plan = validate_chat_request(_body(avis={"k": 4, "tau": 0.5, "seed": 3, "mode": "snapshot"}, max_tokens=512,
                                       stream=True), LIMITS, 512)
    assert plan.overrides == {"k": 4, "tau": 0.5, "seed": 3, "mode": "snapshot"} and plan.stream
    assert plan.images == [("messages[0].content[0].image_url", IMG["image_url"]["url"])]
    plain = validate_chat_request({"messages": [{"role": "user", "content": "text only"}]}, LIMITS, None)
    assert plain.overrides == {} and plain.images == []
    assert validate_chat_request(_body(avis={"ratio": None, "tau": 1.0}), LIMITS, 512).overrides["tau"] == 1.0


@pytest.mark.parametrize("body, param, words", [
    (_body(avis={"k": "lots"}), "avis.k", "an integer from 1 to 4"),
    (_body(avis={"k": 5}), "avis.k", "this server's rollout slots"),
    (_body(avis={"k": 0}), "avis.k", "from 1 to 4"),
    (_body(avis={"k": True}), "avis.k", "integer"),
    (_body(avis={"kk": 3}), "avis.kk", "unknown avis setting"),
    (_body(avis=[1]), "avis", "an object"),
    (_body(avis={"ratio": 1.0}), "avis.ratio", "0 <= ratio < 1"),
    (_body(avis={"tau": math.pi}), "avis.tau", "0 < tau < pi"),
    (_body(avis={"ratio": 0.5, "tau": 0.5}), "avis.tau", "at most one"),
    (_body(avis={"mode": "fast"}), "avis.mode", '"parallel"'),
    (_body(avis={"seed": 1.5}), "avis.seed", "an integer"),
    (_body(avis={"policy": "/etc/passwd"}), "avis.policy", "the operator chooses"),
    (_body(avis={"options": "ABCD"}), "avis.options", "list of 1 to 26"),
    (_body(avis={"top_p": 0}), "avis.top_p", "0 < top_p <= 1"),
    (_body(max_tokens=513), "max_tokens", "from 1 to 512 (the model's context)"),
    (_body(max_tokens=0), "max_tokens", "from 1 to 512"),
    (_body(max_tokens="8"), "max_tokens", "an integer"),
    (_body(top_p=0.0), "top_p", "0 < top_p <= 1"),
    (_body(repeat_penalty=0), "repeat_penalty", "> 0"),
    (_body(temperature=float("nan")), "temperature", "a number >= 0"),
    (_body(n=2), "n", "one choice"),
    (_body(grammar="root ::= x"), "grammar", "not supported"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ([], "body", "a JSON object"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "\"system\", \"user\" or \"assistant\""),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "\"system\", \"user\""),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].image_url",
     "non-empty URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
     "messages[0].content[0].image_url", "non-empty URL"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type",
     '"text", "image_url" or "video_url"'),
    ({"messages": [{"role": "user", "content": [IMG, IMG, IMG]}]}, "messages[0].content[2].image_url",
     "at most 2 per request"),
])
def test_client_mistakes_name_the_field_and_the_expected_value(body, param, words):
    err = _refused(body)
    assert err.status == 400 and err.param == param and words in err.message, err.message


def test_every_override_key_has_a_check():
    from avis_llamacpp.server import _avis_checks
    assert set(_avis_checks(8)) == OVERRIDE_KEYS


def test_exception_mapping_4xx_for_client_errors_5xx_for_faults():
    from avis_llamacpp.errors import CaptureError, ContextOverflowError
    assert _error_for_exception(ContextOverflowError("x")).status == 400
    assert _error_for_exception(ContextOverflowError("x")).code == "context_length_exceeded"
    assert _error_for_exception(ImageError("bad")).status == 400
    assert _error_for_exception(BaseExceptionGroup("g", [ValueError("v"), ImageError("bad")])).status == 400
    fault = _error_for_exception(CaptureError("secret detail"))
    assert fault.status == 500 and "secret detail" not in fault.message
    assert _error_for_exception(RuntimeError("boom")).status == 500


# --------------------------------------------------------------------------- #
# the ASGI guard around a stub app (no model)
# --------------------------------------------------------------------------- #

async def _post(app, body: bytes, headers=()) -> tuple[int, dict, dict]:
    import asyncio
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    out: dict = {"body": b""}

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"], out["headers"] = msg["status"], dict(msg["headers"])
        else:
            out["body"] += msg.get("body", b"")

    await app({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": list(headers)},
              receive, send)
    import json
    return out["status"], out["headers"], json.loads(out["body"])


def test_guard_queue_limit_429_and_body_limit_413():
    import asyncio
    import json

    from avis_llamacpp.server import AVISGuard

    release = asyncio.Event()
    seen = []

    async def slow_app(scope, receive, send):  # answers once released; records what reached it
        body = (await receive())["body"]
        seen.append(json.loads(body))
        await release.wait()
        payload = b'{"choices": []}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    guard = AVISGuard(slow_app, ServerLimits(max_queue=2, max_request_bytes=5000))
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()

    async def scenario():
        first = [asyncio.create_task(_post(guard, good)) for _ in range(2)]
        await asyncio.sleep(0.05)
        try:
            busy = await asyncio.wait_for(_post(guard, good), 10)  # a third request must not wait its turn
        finally:
            release.set()
        done = [await t for t in first]
        big = await _post(guard, b"x" * 6000, headers=[(b"content-length", b"6000")])
        big_chunked = await _post(guard, b"x" * 6000)  # no content-length: counted while read
        return done, busy, big, big_chunked

    done, busy, big, big_chunked = asyncio.run(scenario())
    assert [s for s, _, _ in done] == [200, 200] and len(seen) == 2
    assert busy[0] == 429 and busy[2]["error"]["code"] == "server_busy" and busy[1][b"retry-after"] == b"1"
    assert big[0] == big_chunked[0] == 413 and big[2]["error"]["code"] == "request_too_large"
    assert guard.active == 0


def test_bad_operator_settings_stop_the_launcher_before_loading(tmp_path):
    from avis_llamacpp.server import main
    with pytest.raises(SystemExit, match="not a directory"):
        main(["--model", str(tmp_path / "never-loaded.gguf"), "--avis_image_dir", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="max_images must be an int >= 1"):
        main(["--model", str(tmp_path / "never-loaded.gguf"), "--avis_max_images", "0"])


def test_route_faults_are_500_without_internals():
    """A non-AVIS exception inside llama_cpp.server's route is a 500 whose message names only its type."""
    from llama_cpp.server.errors import RouteErrorHandler

    from avis_llamacpp.server import install
    install({})
    status, err = RouteErrorHandler.error_message_wrapper(None, RuntimeError("/secret/path exploded"), None)
    assert status == 500 and err["message"] == "internal server error (RuntimeError)"
    status, err = RouteErrorHandler.error_message_wrapper(None, ImageError("bad image"), None)
    assert status == 400 and "bad image" in err["message"] and err["code"] == "invalid_image"
