"""The drop-in chat handler (Llama.create_chat_completion) and the server launcher with the openai client."""

from __future__ import annotations

import base64
from pathlib import Path

import llama_cpp
import pytest
from llama_cpp import llama_chat_format as lcf

from avis_llamacpp import ImageError
from avis_llamacpp.chat_handler import AVISChatHandler, request_overrides
from avis_llamacpp.kdv import n_keep_for_ratio

STOCK = {"llava": lcf.Llava15ChatHandler, "qwen25vl": lcf.Qwen25VLChatHandler}
Q = "What shapes do you see?"


def _messages(url: str, text: str = Q) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def data_url(demo_image) -> str:
    return "data:image/png;base64," + base64.b64encode(demo_image.read_bytes()).decode()


@pytest.fixture(scope="module")
def llm(vlm_fixture):
    handler = AVISChatHandler(clip_model_path=str(vlm_fixture.mmproj))
    llm = llama_cpp.Llama(model_path=str(vlm_fixture.model), chat_handler=handler, n_ctx=2048, verbose=False)
    yield llm
    llm.close()


def test_k1_matches_the_stock_handler(vlm_fixture, data_url):
    # flash attention off, as the stock handler runs the encoder and llama_cpp.Llama the text model
    handler = AVISChatHandler(clip_model_path=str(vlm_fixture.mmproj), flash_attn=False)
    llm = llama_cpp.Llama(model_path=str(vlm_fixture.model), chat_handler=handler, n_ctx=2048, verbose=False)
    stock = llama_cpp.Llama(model_path=str(vlm_fixture.model), n_ctx=2048, verbose=False,
                            chat_handler=STOCK[vlm_fixture.family](clip_model_path=str(vlm_fixture.mmproj), verbose=False))
    try:
        want = stock.create_chat_completion(messages=_messages(data_url), temperature=0.0, repeat_penalty=1.0,
                                            max_tokens=16)
    finally:
        stock.close()
    try:
        got = llm.create_chat_completion(messages=_messages(data_url), temperature=0.0, repeat_penalty=1.0,
                                         max_tokens=16)
    finally:
        llm.close()
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert got["object"] == "chat.completion" and got["choices"][0]["message"]["role"] == "assistant"
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    assert got["avis"]["k"] == 1 and got["avis"]["images"][0]["kept"] == got["avis"]["images"][0]["tokens"]


def test_overrides_rollouts_and_pruning(llm, data_url):
    with request_overrides(k=3, ratio=0.5, seed=4):
        out = llm.create_chat_completion(messages=_messages(data_url), max_tokens=8)
    av = out["avis"]
    n = av["images"][0]["tokens"]
    assert av["k"] == 3 and len(av["rollouts"]) == 3 and len(av["decode_tokens"]) == 3
    assert av["images"][0]["kept"] == n_keep_for_ratio(n, 0.5)
    assert out["usage"]["completion_tokens"] == sum(av["decode_tokens"])
    assert 0 < av["flops_vs_vanilla"] < 3.5
    # overrides end with the block
    assert llm.create_chat_completion(messages=_messages(data_url), max_tokens=2)["avis"]["k"] == 1
    with pytest.raises(Exception, match="unknown AVIS setting"):
        with request_overrides(kk=3):
            pass


def test_handler_equals_pipeline(llm, vlm_fixture, demo_image, data_url):
    """Same settings through the chat handler and through VLM.ask give the same rollouts and vote."""
    from avis_llamacpp import VLM

    with request_overrides(k=3, ratio=0.5, seed=4, content="text"):
        out = llm.create_chat_completion(messages=_messages(data_url), max_tokens=8)
    with VLM(vlm_fixture.model, vlm_fixture.mmproj, n_ctx=2048) as vlm:
        ans = vlm.ask(demo_image, Q, k=3, ratio=0.5, seed=4, max_tokens=8)
    assert out["avis"]["rollouts"] == [r.text for r in ans.rollouts]
    assert out["choices"][0]["message"]["content"] == ans.text
    assert out["avis"]["votes"] == ans.votes and out["avis"]["images"][0]["kept"] == ans.kept_tokens[0]


def test_streaming(llm, data_url):
    whole = llm.create_chat_completion(messages=_messages(data_url), temperature=0.0, max_tokens=12)
    chunks = list(llm.create_chat_completion(messages=_messages(data_url), temperature=0.0, max_tokens=12, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "avis" in chunks[-1]
    with request_overrides(k=3, seed=1, content="text"):
        voted = llm.create_chat_completion(messages=_messages(data_url), max_tokens=6)
        streamed = list(llm.create_chat_completion(messages=_messages(data_url), max_tokens=6, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == \
        voted["choices"][0]["message"]["content"]


def test_image_sources_and_refusals(llm, demo_image, data_url):
    by_path = llm.create_chat_completion(messages=_messages(str(demo_image)), temperature=0.0, max_tokens=6)
    by_file_url = llm.create_chat_completion(messages=_messages(Path(demo_image).as_uri()), temperature=0.0, max_tokens=6)
    by_data = llm.create_chat_completion(messages=_messages(data_url), temperature=0.0, max_tokens=6)
    assert by_path["choices"][0]["message"]["content"] == by_data["choices"][0]["message"]["content"] == \
        by_file_url["choices"][0]["message"]["content"]
    with pytest.raises(ImageError, match="remote images are disabled"):
        llm.create_chat_completion(messages=_messages("http://127.0.0.1:9/x.png"), max_tokens=2)
    # still usable after the refusal, and nothing of the refused request leaked into the next one: the same
    # text and token counts as before it (ids and timings differ)
    again = llm.create_chat_completion(messages=_messages(data_url), temperature=0.0, max_tokens=6)
    assert again["choices"][0]["message"]["content"] == by_data["choices"][0]["message"]["content"]
    assert again["usage"] == by_data["usage"] and again["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
def server(vlm_fixture, tmp_path_factory):
    from tests.server_process import running_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(vlm_fixture.model), "--clip_model_path", str(vlm_fixture.mmproj), "--chat_format", "avis",
            "--n_ctx", "2048", "--avis_k", "1"]
    with running_server(args, log) as port:  # one server per fixture family
        yield f"http://127.0.0.1:{port}/v1"


def test_server_with_openai_client(server, data_url):
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused", timeout=120, max_retries=0)
    r = client.chat.completions.create(model="m", messages=_messages(data_url), max_tokens=6, temperature=0.0)
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 0
    assert r.model_extra["avis"]["k"] == 1
    r3 = client.chat.completions.create(model="m", messages=_messages(data_url), max_tokens=6,
                                        extra_body={"avis": {"k": 3, "ratio": 0.75, "seed": 2}})
    av = r3.model_extra["avis"]
    assert av["k"] == 3 and av["images"][0]["kept"] == n_keep_for_ratio(av["images"][0]["tokens"], 0.75)
    stream = client.chat.completions.create(model="m", messages=_messages(data_url), max_tokens=6, temperature=0.0,
                                            stream=True)
    text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    assert text == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="unknown avis setting"):
        client.chat.completions.create(model="m", messages=_messages(data_url), max_tokens=2,
                                       extra_body={"avis": {"kk": 3}})
    # concurrent requests are serialised by the server and stay correct
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: client.chat.completions.create(
            model="m", messages=_messages(data_url), max_tokens=6, temperature=0.0).choices[0].message.content, range(3)))
    assert outs == [r.choices[0].message.content] * 3


def test_quiet_when_not_verbose(llava_fixture, demo_image):
    """Llama(verbose=False) with the handler's verbose=False writes no llama.cpp / clip / mtmd line on stderr
    (fd 2 of a fresh process: the C libraries write there directly); verbose=True shows clip's loader log."""
    import subprocess
    import sys

    script = (
        "import base64, sys\n"
        "from llama_cpp import Llama\n"
        "from avis_llamacpp.chat_handler import AVISChatHandler\n"
        "model, mmproj, image, verbose = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == '1'\n"
        "llm = Llama(model_path=model, n_ctx=1024, n_threads=1, verbose=verbose,\n"
        "            chat_handler=AVISChatHandler(clip_model_path=mmproj, tau=0.785, verbose=verbose))\n"
        "url = 'data:image/png;base64,' + base64.b64encode(open(image, 'rb').read()).decode()\n"
        "msgs = [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}},\n"
        "                                     {'type': 'text', 'text': 'What is it?'}]}]\n"
        "print(llm.create_chat_completion(messages=msgs, max_tokens=2, temperature=0.0)['avis']['k'])\n"
        "llm.close()\n")
    runs = {v: subprocess.run([sys.executable, "-c", script, str(llava_fixture.model), str(llava_fixture.mmproj),
                               str(demo_image), v], capture_output=True, text=True, timeout=300) for v in "01"}
    for v, r in runs.items():
        assert r.returncode == 0 and r.stdout.strip() == "1", (v, r.stderr[-2000:])
    assert runs["0"].stderr == ""
    assert "clip_model_loader" in runs["1"].stderr
