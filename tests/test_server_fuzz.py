"""In-process fuzz of the chat-completions body against the real app (guard + llama_cpp.server + AVIS handler
on the tiny fixture): whatever a client sends, the answer is a 2xx or an OpenAI-shaped 4xx, never a 5xx, and no
image outside the operator's directory is ever read."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from avis_llamacpp.chat_handler import OVERRIDE_KEYS
from tests.server_process import ASGIClient

hypothesis_settings = settings(max_examples=150, deadline=None, derandomize=True,
                               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


def _png(w: int, h: int, color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


GOOD = _uri(_png(32, 24))
BIG = _uri(_png(300, 300))  # over the fuzz app's pixel limit
URLS = [GOOD, GOOD, BIG, _uri(_png(32, 24)[:40]), _uri(b"plain text"), "data:image/png;base64,%%%", "ok.png",
        "file:///etc/passwd", "/etc/passwd", "http://127.0.0.1:9/x.png", "missing.png"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-images")
    (root / "public").mkdir()
    (root / "public" / "ok.png").write_bytes(_png(32, 24, (10, 10, 200)))
    (root / "secret.png").write_bytes(_png(32, 24, (0, 255, 0)))
    return root / "public"


@pytest.fixture(scope="module")
def client(llava_fixture, image_dir):
    from avis_llamacpp.server import build_parser, create_avis_app

    args = build_parser().parse_args([
        "--model", str(llava_fixture.model), "--clip_model_path", str(llava_fixture.mmproj), "--chat_format", "avis",
        "--n_ctx", "512", "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "false",
        "--avis_slots", "4", "--avis_max_images", "3", "--avis_max_image_pixels", "40000",
        "--avis_max_request_bytes", "200000", "--avis_image_dir", str(image_dir)])
    app, _ = create_avis_app(args)
    c = ASGIClient(app)
    yield c
    c.close()


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 40, 2 ** 40), st.floats(), st.text(max_size=12))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                            max_size=3), max_leaves=6)
url = st.sampled_from(URLS) | st.text(max_size=16) | st.just("../secret.png") | st.just("ok.png/../../secret.png")
image_part = st.builds(lambda u, wrap: {"type": "image_url", "image_url": {"url": u} if wrap else u}, url,
                       st.booleans())
text_part = st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=30))
content = st.one_of(st.text(max_size=40), st.lists(st.one_of(image_part, text_part, text_part), max_size=4),
                    json_any)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "system", "assistant"]) | st.text(max_size=5),
                                 "content": content})
avis_value = st.one_of(st.integers(-1, 6), st.floats(-0.5, 3.5), st.booleans(), st.none(),
                       st.sampled_from(["parallel", "snapshot", "auto", "answer", "text", "/etc/passwd"]),
                       st.lists(st.sampled_from(["red", "blue", "A"]), max_size=3), json_any)
# one setting with a value of any type (hypothesis favours early branches: the odd types come first)
odd_value = st.one_of(st.text(max_size=6), st.lists(json_leaf, max_size=2), st.floats(), st.integers(-2 ** 70, 2 ** 70),
                      st.booleans(), st.none(), avis_value)
avis = (st.sampled_from(sorted(OVERRIDE_KEYS)).flatmap(lambda k: odd_value.map(lambda v: {k: v}))
        | st.dictionaries(st.sampled_from(sorted(OVERRIDE_KEYS)) | st.text(max_size=4), avis_value, max_size=3))
small_int = st.integers(-1, 24) | st.sampled_from([513, 10 ** 9]) | json_any
optional = {"avis": avis | json_any, "max_tokens": small_int, "temperature": st.floats(-1, 3) | json_any,
            "top_p": st.floats(0, 1) | json_any, "top_k": st.integers(-1, 50) | json_any, "seed": small_int,
            "stream": st.booleans() | json_any, "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2)
            | json_any, "n": st.integers(0, 2), "grammar": st.none() | st.text(max_size=8),
            "repeat_penalty": st.floats(0, 2) | json_any, "model": st.text(max_size=6), "logprobs": json_any,
            "min_p": st.floats(0, 1) | json_any, "response_format": json_any}
# near-valid bodies (mostly answered) and anything-goes bodies (mostly refused)
good_message = st.builds(lambda parts, q: {"role": "user", "content": parts + [{"type": "text", "text": q}]},
                         st.lists(st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}},
                                            st.sampled_from([GOOD, "ok.png", GOOD])), max_size=2),
                         st.text(max_size=20))
near_valid = st.fixed_dictionaries({"messages": st.lists(good_message, min_size=1, max_size=2),
                                    "max_tokens": st.integers(1, 6)},
                                   optional={"avis": st.fixed_dictionaries({}, optional={
                                       "k": st.integers(1, 5), "ratio": st.floats(0, 0.99), "seed": st.integers(0, 9),
                                       "mode": st.sampled_from(["parallel", "snapshot"]),
                                       "content": st.sampled_from(["auto", "answer", "text"]),
                                       "answer_tags": st.booleans(), "early_stop": st.booleans()}),
                                       "stream": st.booleans(), "temperature": st.floats(0, 1.5),
                                       "seed": st.integers(0, 2 ** 40)})
anything = st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | json_any}, optional=optional)
# a near-valid body with one field replaced by anything (the avis object most often): each check is reached
one_field = st.sampled_from(sorted(optional) + ["avis"] * 6).flatmap(lambda k: optional[k].map(lambda v: {k: v}))
mutated = st.builds(lambda b, extra: {**b, **extra}, near_valid, one_field)


def _encode(body: Any) -> bytes:
    return json.dumps(body).encode()


bodies = st.one_of(near_valid.map(_encode), mutated.map(_encode), mutated.map(_encode), anything.map(_encode),
                   json_any.map(_encode), st.binary(max_size=40))
FORBIDDEN = ("secret", "/etc/passwd")
STATUSES: Counter = Counter()  # status codes the fuzz drew, checked for a useful mix below


def _image_urls(body: bytes) -> list[str]:
    """Every image URL a body names (of any message), as the server would read them."""
    urls = []
    for m in json.loads(body)["messages"]:
        for p in m["content"] if isinstance(m.get("content"), list) else []:
            if isinstance(p, dict) and p.get("type") == "image_url":
                iu = p["image_url"]
                urls.append(iu["url"] if isinstance(iu, dict) else iu)
    return urls


def _check(status: int, payload: bytes, body: bytes) -> None:
    assert status < 500, (status, payload[:600], body[:600])
    if status != 200:
        err = json.loads(payload)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert set(err) == {"message", "type", "param", "code"}
        return
    assert not any(f in u for u in _image_urls(body) for f in FORBIDDEN), "read a file outside the image dir"
    if payload.startswith(b"data:"):
        events = [e[len("data: "):] for e in payload.decode().split("\r\n\r\n") if e.strip()]
        events = [e for line in payload.decode().splitlines() if line.startswith("data: ") for e in [line[6:]]]
        assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1])
    else:
        out = json.loads(payload)
        assert out["choices"][0]["message"]["role"] == "assistant" and "avis" in out


@hypothesis_settings
@given(body=bodies)
def test_fuzz_chat_body(client, body):
    status, payload = client.post("/v1/chat/completions", body)
    STATUSES[status] += 1
    _check(status, payload, body)


def test_fuzz_drew_answers_and_refusals():
    """The fuzz is only worth something if it reached the model often and was refused often."""
    print(f"fuzz status codes: {dict(sorted(STATUSES.items()))}")
    assert STATUSES[200] >= 20 and sum(n for s, n in STATUSES.items() if 400 <= s < 500) >= 20, STATUSES


def test_fuzz_examples_that_matter(client):
    """Named cases the fuzz should cover, so a regression here does not depend on the random draw."""
    msg = lambda u: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},  # noqa: E731
                                                  {"type": "text", "text": "What?"}]}]
    answered = 0
    for body in ({"messages": msg(GOOD), "max_tokens": 3}, {"messages": msg("ok.png"), "max_tokens": 3},
                 {"messages": msg(GOOD), "max_tokens": 3, "stream": True},
                 {"messages": msg(GOOD), "max_tokens": 3, "avis": {"k": 3, "seed": 1}},
                 {"messages": msg("../secret.png")}, {"messages": msg(BIG)}, {"messages": msg(GOOD), "avis": {"k": 9}},
                 {"messages": msg(GOOD), "max_tokens": 513}, {"messages": msg(GOOD), "stop": 5},
                 {"messages": msg(GOOD), "max_tokens": 3, "stream": True, "avis": {"k": "x"}},
                 {"messages": [{"role": "user", "content": "x " * 600}], "max_tokens": 3, "stream": True},
                 {"messages": [{"role": "user", "content": GOOD}]}):
        raw = _encode(body)
        status, payload = client.post("/v1/chat/completions", raw)
        _check(status, payload, raw)
        answered += status == 200
    assert answered == 5  # the last one is text that looks like a data URI: answered as text
    status, payload = client.post("/v1/chat/completions", b"x" * 200_001)
    assert status == 413 and json.loads(payload)["error"]["code"] == "request_too_large"


ODD_VALUES = ["x", "", -1, 0, 10 ** 30, 1.5, -0.5, float("inf"), True, None, [1], {"a": 1}, "parallel", "/etc/passwd"]


def test_every_avis_setting_with_odd_values(client):
    """Each `avis` key with each kind of odd value: answered, or a 400 naming exactly that key (the grid the
    random draw only samples)."""
    refused = 0
    for key in sorted(OVERRIDE_KEYS):
        for value in ODD_VALUES:
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": GOOD}},
                                                              {"type": "text", "text": "Hi"}]}],
                    "max_tokens": 2, "avis": {key: value}}
            raw = _encode(body)
            status, payload = client.post("/v1/chat/completions", raw)
            _check(status, payload, raw)
            if status != 200:
                assert json.loads(payload)["error"]["param"] == f"avis.{key}", (key, value, payload)
                refused += 1
    assert refused > len(OVERRIDE_KEYS) * len(ODD_VALUES) // 2


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/extras/detokenize", "/extras/tokenize", "/v1/completions", "/v1/embeddings"]),
       body=st.one_of(st.fixed_dictionaries({"tokens": st.lists(st.integers(-2 ** 40, 2 ** 40), max_size=4)}),
                      st.fixed_dictionaries({"prompt": st.text(max_size=8), "max_tokens": st.integers(1, 3)},
                                            optional={"logit_bias": st.dictionaries(
                                                st.integers(-5, 10 ** 9).map(str) | st.text(max_size=3),
                                                st.floats(-5, 5), max_size=2)}),
                      json_any))
def test_fuzz_other_routes(client, path, body):
    """llama_cpp.server's other routes behind the guard: token ids out of the vocabulary made llama.cpp abort the
    whole process in detokenize; now every answer is a 2xx or an OpenAI-shaped 4xx."""
    status, payload = client.post(path, _encode(body))
    assert status < 500, (path, body, payload[:300])
    if status != 200:
        assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}


def test_other_routes_named_cases(client):
    assert client.post("/extras/detokenize", b'{"tokens": [1000000000]}')[0] == 400  # was an abort (SIGABRT)
    assert client.post("/v1/completions", b'{"prompt": "a", "max_tokens": 2, "logit_bias": {"99999999": 1}}')[0] == 400
    status, payload = client.post("/v1/embeddings", b'{"input": "hi"}')
    assert status == 400 and json.loads(payload)["error"]["code"] == "unsupported_endpoint"
    assert client.post("/v1/completions", b"{broken")[0] == 400
    assert client.post("/extras/detokenize", b'{"tokens": [5, 6]}')[0] == 200
