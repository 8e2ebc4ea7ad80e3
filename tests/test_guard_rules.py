"""Every server guard rule and every `avis` request key takes effect end to end (issue #34).

Image sources: a local path is inside --avis_image_dir by its resolved path, not by string prefix (`/srv/img-private`
is not inside `/srv/img`), a symlinked folder leading out is refused while one staying inside is followed, and an
image dir given through a symlink still serves its files; each rule is checked on ImageSourcePolicy and through the
server's ASGI app. Request keys: each `avis` key, sent to a server running the bundled trained shapes VLM (it gives
real answers, so the voting, stopping and content keys have something to act on), changes the response the way the
docs say, against a request without it (the control) and, where a number is involved, a hand count or the
library's own query with the same setting."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from avis_llamacpp.chat_handler import OVERRIDE_KEYS
from avis_llamacpp.errors import ImageError
from avis_llamacpp.images import LOCAL_IMAGE_UNAVAILABLE, ImageSourcePolicy, fetch_request_image
from tests.server_process import ASGIClient

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "avis_llamacpp" / "data"
BUNDLE = DATA / "shapes-vlm"
ITEMS = [json.loads(line) for line in (DATA / "shapes-test" / "items.jsonl").read_text().splitlines()[:6]] \
    if (DATA / "shapes-test" / "items.jsonl").exists() else []
MAX_REQUEST, MAX_IMAGE_BYTES = 256_000, 2_000  # the server's limits (every image used here is a 224 x 224 PNG)
CONSISTENT, DIVERSE = 0, 5  # items the bundled model answers the same way every time / differently per rollout
needs_bundle = pytest.mark.skipif(not ((BUNDLE / "model.gguf").exists() and (BUNDLE / "policy.gguf").exists()
                                       and len(ITEMS) > DIVERSE), reason="bundled shapes VLM not present")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """srv/img (the image dir: an image, a subfolder, a symlinked folder out, one inside, one to the parent),
    srv/img-private (a sibling whose name starts with the image dir's), srv/outside, and a symlink to srv/img."""
    srv = tmp_path_factory.mktemp("srv")
    img, private, outside = srv / "img", srv / "img-private", srv / "outside"
    for d in (img / "sub", private, outside):
        d.mkdir(parents=True)
    png = (DATA / "shapes.png").read_bytes()
    for p in (img / "ok.png", img / "sub" / "deep.png", private / "secret.png", outside / "x.png"):
        p.write_bytes(png)
    (img / "out").symlink_to(outside, target_is_directory=True)
    (img / "alias").symlink_to(img / "sub", target_is_directory=True)
    (img / "up").symlink_to(srv, target_is_directory=True)
    (srv / "img-link").symlink_to(img, target_is_directory=True)
    return {"srv": srv, "img": img, "private": private, "outside": outside, "png": png}


def _refused(url: str, policy: ImageSourcePolicy) -> None:
    with pytest.raises(ImageError) as e:
        fetch_request_image(url, policy)
    assert str(e.value) == LOCAL_IMAGE_UNAVAILABLE, (url, str(e.value))


def _outside_probes(tree: dict[str, Path]) -> list[str]:
    secret = tree["private"] / "secret.png"
    return ["../img-private/secret.png", str(secret), secret.as_uri(), "file://localhost" + str(secret),
            "ok.png/../../img-private/secret.png", "out/x.png", str(tree["img"] / "out" / "x.png"),
            (tree["img"] / "out" / "x.png").as_uri(), "up/img-private/secret.png", "up/outside/x.png"]


def test_containment_is_by_path_not_by_string_prefix_and_symlinked_folders_are_resolved(tree):
    policy = ImageSourcePolicy(image_dir=str(tree["img"]))
    assert str(tree["private"]).startswith(policy.image_dir)  # the trap: a string-prefix check would pass these
    for url in _outside_probes(tree):
        _refused(url, policy)
    # inside: directly, in a subfolder, and through a symlinked folder that stays inside
    for url in ("ok.png", "sub/deep.png", "alias/deep.png", str(tree["img"] / "alias" / "deep.png"),
                "up/img/ok.png"):
        assert fetch_request_image(url, policy) == tree["png"], url


def test_an_image_dir_given_through_a_symlink_serves_its_files(tree):
    policy = ImageSourcePolicy(image_dir=str(tree["srv"] / "img-link"))
    assert fetch_request_image("ok.png", policy) == tree["png"]
    assert fetch_request_image(str(tree["srv"] / "img-link" / "sub" / "deep.png"), policy) == tree["png"]
    _refused("../img-private/secret.png", policy)


# --------------------------------------------------------------------------- #
# through the server
# --------------------------------------------------------------------------- #

class _Client(ASGIClient):
    def chat(self, body: dict) -> tuple[int, dict]:
        status, raw = self.post("/v1/chat/completions", json.dumps(body).encode())
        return status, json.loads(raw)


@pytest.fixture(scope="module")
def server(tree):
    if not ((BUNDLE / "model.gguf").exists() and (BUNDLE / "policy.gguf").exists() and len(ITEMS) > DIVERSE):
        pytest.skip("bundled shapes VLM not present")
    from avis_llamacpp.server import build_parser, create_avis_app

    args = build_parser().parse_args([
        "--model", str(BUNDLE / "model.gguf"), "--clip_model_path", str(BUNDLE / "mmproj.gguf"), "--chat_format",
        "avis", "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "false",
        "--avis_flash_attn", "off", "--avis_slots", "5", "--avis_max_images", "2",
        "--avis_max_request_bytes", str(MAX_REQUEST), "--avis_max_image_bytes", str(MAX_IMAGE_BYTES),
        "--avis_max_image_pixels", str(224 * 224),  # exactly the shapes images' size
        "--avis_policy", str(BUNDLE / "policy.gguf"), "--avis_image_dir", str(tree["img"])])
    app, _ = create_avis_app(args)
    c = _Client(app)
    yield c
    c.close()


@pytest.fixture(scope="module")
def library():
    """The library on the same files, for the counts a response must repeat."""
    from avis_llamacpp import VLM

    with VLM(BUNDLE / "model.gguf", BUNDLE / "mmproj.gguf", n_ctx=1024, n_seq_max=5, flash_attn=False, n_threads=1,
             n_threads_batch=1) as v:
        yield v


def _uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _item(i: int) -> tuple[Path, str]:
    return DATA / "shapes-test" / ITEMS[i]["image"], ITEMS[i]["question"]


def _body(urls: Sequence[str], question: str, avis: dict | None = None, **kw: Any) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": question}]
    settings = {"policy": None, "answer_tags": True, **(avis or {})}
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 80, "temperature": 0.0,
            "avis": {k: v for k, v in settings.items() if v is not ...}, **kw}  # ...: the key left out


def ask(server: _Client, avis: dict | None = None, item: int = CONSISTENT, **kw: Any) -> dict:
    """The response to item `item` with these avis settings (the server's policy off and answer tags on unless
    the settings say otherwise)."""
    image, question = _item(item)
    status, out = server.chat(_body([_uri(image)], question, avis, **kw))
    assert status == 200, out
    return out


@needs_bundle
def test_the_image_dir_rules_hold_through_the_server(server, tree):
    _, question = _item(CONSISTENT)
    for url in _outside_probes(tree):
        status, err = server.chat(_body([url], question))
        assert status == 400 and err["error"]["message"].endswith(LOCAL_IMAGE_UNAVAILABLE), (url, err)
        assert err["error"]["param"] == "messages[0].content[0].image_url"
    answers = []
    for url in ("ok.png", "alias/deep.png", (tree["img"] / "sub" / "deep.png").as_uri(), _uri(DATA / "shapes.png")):
        status, out = server.chat(_body([url], question, {"reuse_prefix": False}))
        assert status == 200, (url, out)
        answers.append(out["choices"][0]["message"]["content"])
    assert len(set(answers)) == 1  # the same pixels, whichever way they were named


@needs_bundle
def test_the_image_count_limit_is_exact_through_the_server(server):
    image, question = _item(CONSISTENT)
    status, out = server.chat(_body([_uri(image)] * 2, question, max_tokens=2))
    assert status == 200 and len(out["avis"]["images"]) == 2
    status, err = server.chat(_body([_uri(image)] * 3, question, max_tokens=2))
    assert status == 400 and err["error"]["code"] == "too_many_images"
    assert err["error"]["param"] == "messages[0].content[2].image_url"


@needs_bundle
def test_the_size_limits_are_exact_through_the_server(server):
    """At each limit a request is served, one byte or pixel over it is refused with the limit's status."""
    import io

    from PIL import Image

    image, question = _item(CONSISTENT)
    png = image.read_bytes()
    exact = png + bytes(MAX_IMAGE_BYTES - len(png))  # zero padding after IEND: the same image, MAX_IMAGE_BYTES long
    status, out = server.chat(_body(["data:image/png;base64," + base64.b64encode(exact).decode()], question,
                                    max_tokens=2))
    assert status == 200, out
    status, err = server.chat(_body(["data:image/png;base64," + base64.b64encode(exact + b"\0").decode()],
                                    question, max_tokens=2))
    assert status == 400 and f"limit of {MAX_IMAGE_BYTES} bytes" in err["error"]["message"], err
    buf = io.BytesIO()
    Image.open(image).convert("RGB").resize((225, 224)).save(buf, "PNG")
    status, err = server.chat(_body(["data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()],
                                    question, max_tokens=2))
    assert status == 400 and "225x224 = 50400 pixels, over this server's limit of 50176" in err["error"]["message"]
    raw = json.dumps(_body([_uri(image)], question, max_tokens=2)).encode()
    at_limit = raw[:-1] + b" " * (MAX_REQUEST - len(raw)) + raw[-1:]  # JSON padded with spaces to the limit
    status, body = server.post("/v1/chat/completions", at_limit)
    assert status == 200, body[:300]
    status, body = server.post("/v1/chat/completions", at_limit[:-1] + b" " + at_limit[-1:])
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


# -- each avis key ---------------------------------------------------------------------------------------------

def _all_same(out: dict) -> bool:
    return len(set(out["avis"]["rollouts"])) == 1


def _check_k(server, library):
    out = ask(server, {"k": 3})
    assert out["avis"]["k"] == 3 and len(out["avis"]["rollouts"]) == 3
    assert ask(server)["avis"]["k"] == 1


def _check_ratio(server, library):
    out = ask(server, {"ratio": 0.75})
    n = out["avis"]["images"][0]["tokens"]
    assert out["avis"]["images"][0]["kept"] == math.floor(0.25 * n) < n
    assert ask(server)["avis"]["images"][0]["kept"] == n


def _check_rho(server, library):
    out, by_ratio = ask(server, {"rho": 0.75}), ask(server, {"ratio": 0.75})
    n = out["avis"]["images"][0]["tokens"]
    assert out["avis"]["images"][0]["kept"] == math.floor(0.25 * n)
    assert out["avis"]["rollouts"] == by_ratio["avis"]["rollouts"]


def _check_tau(server, library):
    out = ask(server, {"tau": 1.2})
    image, question = _item(CONSISTENT)
    want = library.ask(image, question, answer_tags=True, tau=1.2, max_tokens=1).kept_tokens[0]
    assert out["avis"]["images"][0]["kept"] == want < out["avis"]["images"][0]["tokens"]


def _check_mode(server, library):
    assert ask(server, {"mode": "snapshot", "k": 2})["avis"]["mode"] == "snapshot"
    staged = ask(server, {"mode": "staged", "k": 2, "wave": 1})
    assert staged["avis"]["mode"] == "staged" and staged["avis"]["waves"] >= 1
    assert ask(server, {"k": 2})["avis"]["mode"] == "parallel"


def _check_seed(server, library):
    a, b, c = (ask(server, {"k": 3, "seed": s}, item=DIVERSE) for s in (1, 1, 2))
    assert a["avis"]["rollouts"] == b["avis"]["rollouts"] != c["avis"]["rollouts"]


def _check_early_stop(server, library):
    on = ask(server, {"k": 5, "mode": "snapshot", "early_stop": True})
    off = ask(server, {"k": 5, "mode": "snapshot"})
    assert on["avis"]["early_stopped"] > 0 and off["avis"]["early_stopped"] == 0
    assert on["avis"]["answer"] == off["avis"]["answer"] is not None


def _check_answer_tags(server, library):
    on, off = ask(server), ask(server, {"answer_tags": False})
    image, question = _item(CONSISTENT)
    want = library.ask(image, question, answer_tags=True, max_tokens=1).prompt_tokens
    assert on["usage"]["prompt_tokens"] == want > off["usage"]["prompt_tokens"]
    assert on["avis"]["rollouts"][0].endswith("</answer>")


def _check_content(server, library):
    text, answer = ask(server, {"k": 3, "content": "text"}), ask(server, {"k": 3, "content": "answer"})
    assert answer["choices"][0]["message"]["content"] == answer["avis"]["answer"] is not None
    assert text["choices"][0]["message"]["content"] in text["avis"]["rollouts"]
    assert text["choices"][0]["message"]["content"] != answer["choices"][0]["message"]["content"]
    auto = ask(server, {"content": "auto"})  # K = 1: the text
    assert auto["choices"][0]["message"]["content"] == auto["avis"]["rollouts"][0]


def _check_options(server, library):
    opts = ITEMS[CONSISTENT]["options"]
    with_opts, without = ask(server, {"k": 3, "options": opts}), ask(server, {"k": 3})
    assert with_opts["avis"]["answer"] in "ABCD" and without["avis"]["answer"] is not None
    assert with_opts["avis"]["answer"] == without["avis"]["answer"].upper() != without["avis"]["answer"]


def _sampling_check(key: str, value: float) -> Callable:
    def check(server, library):
        assert not _all_same(ask(server, {"k": 3, "seed": 3}, item=DIVERSE))  # the control: the paper's sampling
        assert _all_same(ask(server, {"k": 3, "seed": 3, key: value}, item=DIVERSE))
    return check


def _check_policy(server, library):
    on = ask(server, {"policy": ...})  # the server's policy (the key left out)
    off = ask(server)
    assert isinstance(on["avis"]["p_hat"], float) and off["avis"]["p_hat"] is None


def _check_wave(server, library):
    one = ask(server, {"k": 5, "mode": "staged", "wave": 1})
    assert one["avis"]["waves"] == len(one["avis"]["rollouts"]) > 1
    whole = ask(server, {"k": 5, "mode": "staged", "wave": 5})
    assert whole["avis"]["waves"] == 1 and len(whole["avis"]["rollouts"]) == 5


def _check_stopping(server, library):
    posterior = ask(server, {"k": 5, "mode": "staged", "wave": 1})
    unanimity = ask(server, {"k": 5, "mode": "staged", "wave": 1, "stopping": "unanimity"})
    assert posterior["avis"]["waves"] > 1
    assert unanimity["avis"]["waves"] == 1 and unanimity["avis"]["rollouts_saved"] == 4


def _check_stop_threshold(server, library):
    strict = ask(server, {"k": 5, "mode": "staged", "wave": 1, "stop_threshold": 0.999})
    loose = ask(server, {"k": 5, "mode": "staged", "wave": 1, "stop_threshold": 0.5})
    assert loose["avis"]["waves"] == 1 < strict["avis"]["waves"]


def _check_reuse_prefix(server, library):
    ask(server)
    assert ask(server)["avis"]["tokens_skipped"] > 0  # the control: the same request again reuses its prompt
    assert ask(server, {"reuse_prefix": False})["avis"]["tokens_skipped"] == 0


_CLIP: list[bytes] = []
VQ = "What moves?"


def _video_body(avis: dict | None) -> dict:
    """A question about a 3 s, 24-frame 64x64 mp4 (a video_url data URI) with these avis settings (at most 4
    frames unless they say otherwise: the bundled model takes 196 tokens a frame, and the context is 1024)."""
    if not _CLIP:
        import tempfile

        from convert.video_files import moving_shapes_clip, write_video
        with tempfile.TemporaryDirectory() as d:
            _CLIP.append(write_video(moving_shapes_clip(24, 64), Path(d) / "clip.mp4", fps=8).read_bytes())
    uri = "data:video/mp4;base64," + base64.b64encode(_CLIP[0]).decode()
    return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri}},
                                                      {"type": "text", "text": VQ}]}],
            "max_tokens": 2, "temperature": 0.0, "avis": {"policy": None, "max_frames": 4, **(avis or {})}}


def _video_ask(server: _Client, avis: dict | None = None) -> dict:
    status, out = server.chat(_video_body(avis))
    assert status == 200, out
    return out


def _check_fps(server, library):
    # 3 s at 1 fps: qwen-vl-utils' minimum of 4 frames; at 2 fps: 6 frames, which do not fit the context
    out = _video_ask(server, {"fps": 1, "max_frames": 32})["avis"]["video"]
    want = library.ask(None, VQ, video=_CLIP[0], fps=1, max_frames=32, max_tokens=1).video["frames"]
    assert out["frames"] == 4 == want
    status, err = server.chat(_video_body({"fps": 2, "max_frames": 32}))
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def _check_max_frames(server, library):
    assert _video_ask(server, {"max_frames": 2})["avis"]["video"]["frames"] == 2
    assert _video_ask(server)["avis"]["video"]["frames"] == 4


def _check_max_pixels(server, library):
    small = _video_ask(server, {"max_pixels": 1024})["avis"]["video"]
    assert small["size"][0] * small["size"][1] <= 1024 and small["size"] == library.ask(
        None, VQ, video=_CLIP[0], max_frames=4, max_pixels=1024, max_tokens=1).video["size"]
    assert _video_ask(server)["avis"]["video"]["size"] == [64, 64]


def _check_video_selection(server, library):
    from avis_llamacpp.kdv import n_keep_for_ratio

    joint = _video_ask(server, {"ratio": 0.5})["avis"]["images"]
    per_chunk = _video_ask(server, {"ratio": 0.5, "video_selection": "per_chunk"})["avis"]["images"]
    assert len(per_chunk) > 1 and [im["kept"] for im in per_chunk] == [n_keep_for_ratio(im["tokens"], 0.5)
                                                                         for im in per_chunk]
    assert sum(im["kept"] for im in joint) == n_keep_for_ratio(sum(im["tokens"] for im in joint), 0.5)
    want = library.ask(None, VQ, video=_CLIP[0], max_frames=4, ratio=0.5, max_tokens=1)
    assert [im["kept"] for im in joint] == want.kept_tokens != [im["kept"] for im in per_chunk]


KEY_CHECKS: dict[str, Callable] = {
    "k": _check_k, "ratio": _check_ratio, "rho": _check_rho, "tau": _check_tau, "mode": _check_mode,
    "seed": _check_seed, "early_stop": _check_early_stop, "answer_tags": _check_answer_tags,
    "content": _check_content, "options": _check_options, "temperature": _sampling_check("temperature", 0.0),
    "top_p": _sampling_check("top_p", 1e-6), "top_k": _sampling_check("top_k", 1),
    "min_p": _sampling_check("min_p", 1.0), "policy": _check_policy, "wave": _check_wave,
    "stopping": _check_stopping, "stop_threshold": _check_stop_threshold, "reuse_prefix": _check_reuse_prefix,
    "fps": _check_fps, "max_frames": _check_max_frames, "max_pixels": _check_max_pixels,
    "video_selection": _check_video_selection,
}


def test_every_avis_key_has_an_end_to_end_check():
    missing, stale = sorted(OVERRIDE_KEYS - set(KEY_CHECKS)), sorted(set(KEY_CHECKS) - OVERRIDE_KEYS)
    assert not missing, f"avis key(s) {missing} have no end-to-end check: add one to KEY_CHECKS here"
    assert not stale, f"KEY_CHECKS names keys the server no longer takes: {stale}"


@needs_bundle
@pytest.mark.parametrize("key", sorted(KEY_CHECKS))
def test_each_avis_key_takes_effect(server, library, key):
    KEY_CHECKS[key](server, library)


# -- token ids at the vocabulary's edge (in a child process: a missed rule aborts llama.cpp in detokenize) -------

EDGE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from avis_llamacpp.server import _n_vocab, build_parser, create_avis_app
from tests.server_process import ASGIClient
args = build_parser().parse_args(["--model", sys.argv[2], "--clip_model_path", sys.argv[3], "--chat_format", "avis",
                                  "--n_ctx", "256", "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "false"])
app, _ = create_avis_app(args)
client = ASGIClient(app)
n = _n_vocab()
print(json.dumps({"n_vocab": n}), flush=True)
def completion(token):
    return {"prompt": "a", "max_tokens": 1, "logit_bias": {str(token): 1}}
for name, path, body in (("detokenize_last", "/extras/detokenize", {"tokens": [n - 1]}),
                         ("detokenize_past", "/extras/detokenize", {"tokens": [n]}),
                         ("logit_bias_last", "/v1/completions", completion(n - 1)),
                         ("logit_bias_past", "/v1/completions", completion(n))):
    print(json.dumps({"start": name}), flush=True)
    status, raw = client.post(path, json.dumps(body).encode())
    print(json.dumps({"case": name, "status": status}), flush=True)
"""


def test_token_ids_are_checked_against_the_vocabulary_exactly(llava_fixture):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", EDGE, str(ROOT), str(llava_fixture.model), str(llava_fixture.mmproj)],
                          capture_output=True, text=True, timeout=300)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    started = [x["start"] for x in lines if "start" in x]
    assert proc.returncode == 0, (f"the server process died (exit {proc.returncode}) on {started[-1:]}: "
                                  f"{proc.stderr[-1500:]}")
    got = {x["case"]: x["status"] for x in lines if "case" in x}
    assert lines[0]["n_vocab"] > 1
    assert got == {"detokenize_last": 200, "detokenize_past": 400, "logit_bias_last": 200, "logit_bias_past": 400}
