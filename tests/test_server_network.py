"""The server as a network client meets it: a real `python -m avis_llamacpp.server` process on 127.0.0.1 and the
official openai client. Client mistakes are 4xx naming the field, local-file probes learn nothing, the load
script's short run passes, and concurrent clients get the single-client answers."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
Q = "What shapes do you see?"


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (30, 160, 90)).save(buf, "PNG")
    return buf.getvalue()


def _messages(*urls: str, text: str = Q) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def served(llava_fixture, demo_image, tmp_path_factory):
    """(openai client, image dir, secret path) for a server with an image dir and small limits."""
    root = tmp_path_factory.mktemp("served")
    public = root / "public"
    public.mkdir()
    (public / "shapes.png").write_bytes(demo_image.read_bytes())
    secret = root / "secret.png"
    secret.write_bytes(demo_image.read_bytes())  # a real image the server must not read
    (public / "escape.png").symlink_to(secret)
    from tests.server_process import running_server

    args = ["--model", str(llava_fixture.model), "--clip_model_path", str(llava_fixture.mmproj), "--chat_format",
            "avis", "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1", "--avis_image_dir", str(public),
            "--avis_slots", "4", "--avis_max_images", "2", "--avis_max_image_pixels", str(500 * 500),
            "--avis_max_image_bytes", "300000", "--avis_max_request_bytes", "600000"]
    with running_server(args, root / "server.log") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        yield client, public, secret, port
    # a fault would have been logged with a traceback; client mistakes never are
    assert "Traceback" not in (root / "server.log").read_text()


def _ask(client, messages, **kw):
    return client.chat.completions.create(model="m", messages=messages, **kw)


def test_client_mistakes_are_400_naming_the_field(served, demo_image):
    client = served[0]
    demo = _uri(demo_image.read_bytes())
    cases = [
        (dict(messages=_messages(demo), extra_body={"avis": {"k": "lots"}}), "avis.k", "an integer from 1 to 4"),
        (dict(messages=_messages(demo), extra_body={"avis": {"kk": 3}}), "avis.kk", "unknown avis setting"),
        (dict(messages=_messages(demo), extra_body={"avis": {"k": 5}}), "avis.k", "this server's rollout slots"),
        (dict(messages=_messages(demo), max_tokens=1025), "max_tokens", "from 1 to 1024 (the model's context)"),
        (dict(messages=_messages(_uri(b"GIF89a broken"))), "messages[0].content[0].image_url", "truncated or corrupt"),
        (dict(messages=_messages(_uri(_png(64, 64)[:50]))), "messages[0].content[0].image_url", "truncated"),
        (dict(messages=_messages(_uri(_png(501, 500)))), "messages[0].content[0].image_url",
         "over this server's limit of 250000"),
        (dict(messages=_messages(demo, demo, demo)), "messages[0].content[2].image_url", "at most 2 per request"),
        (dict(messages=_messages("http://127.0.0.1:9/x.png")), "messages[0].content[0].image_url",
         "remote image URLs are disabled"),
        (dict(messages=_messages(demo, text="word " * 1500), max_tokens=4), "messages", "does not fit"),
        (dict(messages=_messages(demo, text="word " * 1500), max_tokens=4, stream=True), "messages", "does not fit"),
        (dict(messages=_messages(_uri(b"junk")), stream=True), "messages[0].content[0].image_url", "not a readable"),
        (dict(messages=_messages(demo), stop=5), "stop", "valid string"),
    ]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            out = _ask(client, **kwargs)
            if kwargs.get("stream"):
                list(out)
        assert e.value.status_code == 400 and e.value.param == param and words in e.value.message, (
            kwargs.get("extra_body"), e.value.message)
        assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as e:  # the body limit
        _ask(client, _messages(demo, text="x" * 700_000))
    assert e.value.status_code == 413 and e.value.code == "request_too_large"


def test_local_file_probe_learns_nothing(served, demo_image):
    client, public, secret, _ = served
    probes = ["../secret.png", str(secret), secret.as_uri(), "escape.png", "missing.png", "/etc/passwd",
              "file:///etc/passwd", "file:///etc/no-such-file", "sub/../../secret.png"]
    messages = set()
    for url in probes:
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, _messages(url), max_tokens=2)
        messages.add(e.value.message)
    assert len(messages) == 1 and "local image not available" in messages.pop()
    # inside the directory, a path, an absolute path and a file:// URL are the same image as its data URI
    answers = {_ask(client, _messages(url), max_tokens=5, temperature=0.0).choices[0].message.content
               for url in ("shapes.png", str(public / "shapes.png"), (public / "shapes.png").as_uri(),
                           _uri(demo_image.read_bytes()))}
    assert len(answers) == 1


def test_concurrent_clients_get_single_client_answers(served, demo_image):
    client = served[0]
    demo, other = _uri(demo_image.read_bytes()), _uri(_png(80, 60))
    requests = [
        dict(messages=_messages(demo), max_tokens=6, temperature=0.0),
        dict(messages=_messages(other), max_tokens=6, temperature=0.9, seed=11),
        dict(messages=_messages(demo), max_tokens=6, extra_body={"avis": {"k": 3, "ratio": 0.5, "seed": 4}}),
        dict(messages=_messages(other, demo), max_tokens=6, extra_body={"avis": {"k": 2, "tau": 0.7, "seed": 1,
                                                                               "mode": "snapshot"}}),
        dict(messages=_messages(demo), max_tokens=6, temperature=0.0, stream=True),
    ]

    def answer(i: int):
        kw = requests[i]
        out = _ask(client, **kw)
        if kw.get("stream"):
            chunks = list(out)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None
        av = out.model_extra["avis"]
        return out.choices[0].message.content, (av["rollouts"], av["votes"], [im["kept"] for im in av["images"]])

    single = [answer(i) for i in range(len(requests))]
    order = [i for _ in range(4) for i in range(len(requests))]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(answer, order))
    assert concurrent == [single[i] for i in order]
    assert single[2][1][0] and len(single[2][1][0]) == 3  # the K=3 request really ran 3 rollouts


def test_load_script_short_run(llava_fixture, tmp_path):
    """benchmarks/load_server.py at a small size: no 5xx, expected 4xx, single-client answers, bounded RSS."""
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_server.py"), "--clients", "2", "--requests",
                        "12", "--max-tokens", "3", "--model", str(llava_fixture.model), "--mmproj",
                        str(llava_fixture.mmproj), "--json", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["requests"] == 24 and res["n_5xx"] == 0 and res["n_problems"] == 0
    assert set(res["status_counts"]) <= {"200", "400", "413"} and res["good"] > 0 and res["bad"] > 0
