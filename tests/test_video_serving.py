"""Video where a user asks: OpenAI-style video_url parts through the chat handler and a real server process (openai
client), the server guard's rules for videos (sources, limits from the header, one video per request, broken
files), and `avis ask --video` / `avis show --video`. The oracle for every answer is VLM.ask(video=...) with the
same settings; limits are checked against clips whose duration / frames / size the test chose."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from PIL import Image

from avis_llamacpp import VLM, InvalidArgumentError
from avis_llamacpp.chat_handler import AVISChatHandler, request_overrides

pytest.importorskip("av")
openai = pytest.importorskip("openai")

from convert.video_files import malformed_videos, moving_shapes_clip, write_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
Q = "What moves in the video?"
N_CTX = 1024
PART = "messages[0].content[0].video_url"


def _uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _video_messages(url: str, text: str = Q, kind: str = "video_url") -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Clips made for the limits the served fixture sets (4 s, 40 frames, 500x500 pixels, 150000 bytes)."""
    d = tmp_path_factory.mktemp("clips")
    noise = np.random.default_rng(0).integers(0, 256, (24, 160, 160, 3), dtype=np.uint8)
    return {
        "good": write_video(moving_shapes_clip(24, 64, seed=1), d / "good.mp4", fps=8),  # 3 s, 24 frames
        "other": write_video(moving_shapes_clip(16, 64, seed=2), d / "other.webm", fps=8),  # 2 s, 16 frames
        "long": write_video(moving_shapes_clip(36, 64), d / "long.mp4", fps=8),  # 4.5 s, 36 frames
        "many": write_video(moving_shapes_clip(48, 64), d / "many.mp4", fps=16),  # 3 s, 48 frames
        "many_webm": write_video(moving_shapes_clip(48, 64), d / "many.webm", fps=16),  # no frame count in header
        "wide": write_video(moving_shapes_clip(4, 512), d / "wide.mp4", fps=8),  # 512 x 512 = 262144 pixels
        "heavy": write_video(list(noise), d / "heavy.mp4", fps=8),  # 3 s, 24 frames, 160x160, noise: many bytes
    }


@pytest.fixture(scope="module")
def oracle(qwen_fixture):
    """The VLM the served answers must equal (the server's context size and threads)."""
    with VLM(qwen_fixture.model, qwen_fixture.mmproj, n_ctx=N_CTX, n_threads=1, n_threads_batch=1) as v:
        yield v


@pytest.fixture(scope="module")
def served(qwen_fixture, clips, demo_image, tmp_path_factory):
    """(openai client, image dir) for a server with an image dir and small video limits."""
    root = tmp_path_factory.mktemp("served-video")
    public = root / "public"
    public.mkdir()
    (public / "good.mp4").write_bytes(clips["good"].read_bytes())
    (public / "shapes.png").write_bytes(demo_image.read_bytes())
    secret = root / "secret.mp4"
    secret.write_bytes(clips["good"].read_bytes())  # a real video the server must not read
    (public / "escape.mp4").symlink_to(secret)
    from tests.server_process import running_server

    args = ["--model", str(qwen_fixture.model), "--clip_model_path", str(qwen_fixture.mmproj), "--chat_format",
            "avis", "--n_ctx", str(N_CTX), "--n_threads", "1", "--n_threads_batch", "1", "--avis_image_dir",
            str(public), "--avis_slots", "2", "--avis_max_image_pixels", str(500 * 500),
            "--avis_max_video_bytes", "150000", "--avis_max_video_seconds", "4", "--avis_max_video_frames", "40"]
    with running_server(args, root / "server.log") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        yield client, public, secret
    assert "Traceback" not in (root / "server.log").read_text()  # client mistakes are never logged as faults


def _ask(client, messages, **kw):
    return client.chat.completions.create(model="m", messages=messages, **kw)


def _refused(client, messages, **kw):
    with pytest.raises(openai.BadRequestError) as e:
        out = _ask(client, messages, **kw)
        if kw.get("stream"):
            list(out)
    assert e.value.status_code == 400 and e.value.type == "invalid_request_error"
    return e.value


def test_video_url_round_trips_through_the_server(served, oracle, clips):
    client = served[0]
    data = clips["good"].read_bytes()
    knobs = {"ratio": 0.5, "fps": 4, "max_frames": 8}
    out = _ask(client, _video_messages(_uri(data)), max_tokens=8, temperature=0.0, extra_body={"avis": knobs})
    want = oracle.ask(None, Q, video=data, max_tokens=8, **knobs)
    avis = out.model_extra["avis"]
    assert out.choices[0].message.content == want.text
    assert [im["kept"] for im in avis["images"]] == want.kept_tokens
    assert [im["tokens"] for im in avis["images"]] == want.image_tokens
    assert avis["video"] == json.loads(json.dumps(want.video))
    # the sampling asked for: 3 s at 4 fps = 12 frames, capped at 8; one selection keeps half of all tokens
    assert avis["video"]["frames"] == 8 and len(avis["images"]) == 4
    assert sum(want.kept_tokens) == sum(want.image_tokens) // 2
    # a second question about the same video reuses the first one's encoded, pruned prefix
    again = _ask(client, _video_messages(_uri(data), text="And then?"), max_tokens=4, temperature=0.0,
                 extra_body={"avis": knobs}).model_extra["avis"]
    assert again["prefix_reused"] and again["tokens_skipped"] >= sum(want.kept_tokens)
    assert again["timings"]["encode_s"] <= avis["timings"]["encode_s"] / 10
    # streamed, per-chunk selection and defaults: still the oracle's answers
    stream = _ask(client, _video_messages(_uri(data)), max_tokens=8, temperature=0.0, stream=True,
                  extra_body={"avis": {"ratio": 0.5, "video_selection": "per_chunk"}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == oracle.ask(None, Q, video=data, max_tokens=8, ratio=0.5, video_selection="per_chunk").text
    other = clips["other"].read_bytes()
    out = _ask(client, _video_messages(_uri(other, "video/webm")), max_tokens=6, temperature=0.0)
    want = oracle.ask(None, Q, video=other, max_tokens=6)
    assert out.choices[0].message.content == want.text
    assert out.model_extra["avis"]["video"]["frames"] == want.video["frames"] == 4  # 2 s at the default 2 fps


def test_local_video_paths_follow_the_image_rules(served, oracle, clips):
    client, public, secret = served
    probes = ["../secret.mp4", str(secret), secret.as_uri(), "escape.mp4", "missing.mp4", "/etc/passwd",
              "file:///etc/passwd", "sub/../../secret.mp4"]
    image_answers = {_refused(client, _video_messages(url, kind="image_url"), max_tokens=2).message for url in probes}
    video_answers = {_refused(client, _video_messages(url), max_tokens=2).message for url in probes}
    assert len(image_answers) == 1 and "local image not available" in next(iter(image_answers))
    assert {m.replace("video_url", "image_url") for m in video_answers} == image_answers  # the same one answer
    # inside the directory: a path, an absolute path, a file:// URL and the data URI are the same video
    answers = {_ask(client, _video_messages(url), max_tokens=5, temperature=0.0).choices[0].message.content
               for url in ("good.mp4", str(public / "good.mp4"), (public / "good.mp4").as_uri(),
                           _uri(clips["good"].read_bytes()))}
    assert answers == {oracle.ask(None, Q, video=clips["good"], max_tokens=5).text}
    assert "remote video URLs are disabled" in _refused(client, _video_messages("http://127.0.0.1:9/a.mp4")).message


def test_each_video_limit_is_a_400_naming_the_part(served, clips):
    client = served[0]
    assert len(clips["heavy"].read_bytes()) > 150000 and len(clips["good"].read_bytes()) < 150000
    cases = [("long", "video_too_long", "lasts 4.5 s, over this server's limit of 4 s"),
             ("many", "video_too_many_frames", "has 48 frames, over this server's limit of 40"),
             ("many_webm", "video_too_many_frames", "has 48 frames, over this server's limit of 40"),
             ("wide", "video_too_many_pixels", "512x512 = 262144 pixels, over this server's limit of 250000"),
             ("heavy", "video_too_large", "over this server's limit of 150000 bytes")]
    for name, code, words in cases:
        e = _refused(client, _video_messages(_uri(clips[name].read_bytes())), max_tokens=2)
        assert (e.param, e.code) == (PART, code) and words in e.message, (name, e.message)
    # an animated GIF is a video too: its frame count is checked from its headers
    frames = [Image.fromarray(f) for f in moving_shapes_clip(48, 32)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=60)
    e = _refused(client, _video_messages(_uri(gif.getvalue(), "image/gif")), max_tokens=2)
    assert (e.param, e.code) == (PART, "video_too_many_frames") and "has 48 frames" in e.message
    # a local file over the byte limit is refused by its size, like an image
    (served[1] / "heavy.mp4").write_bytes(clips["heavy"].read_bytes())
    e = _refused(client, _video_messages("heavy.mp4"), max_tokens=2)
    assert (e.param, e.code) == (PART, "video_too_large")
    # one video per request, and then no images; the video knobs are validated like the other avis keys
    good = _uri(clips["good"].read_bytes())
    two = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": good}},
                                        {"type": "video_url", "video_url": {"url": good}},
                                        {"type": "text", "text": Q}]}]
    mixed = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "shapes.png"}},
                                          {"type": "video_url", "video_url": {"url": good}}]}]
    for messages, param, got in ((two, "messages[0].content[1].video_url", "got 2 videos"),
                                 (mixed, "messages[0].content[1].video_url", "got a video and 1 image")):
        e = _refused(client, messages, max_tokens=2)
        assert e.param == param and "one video and no images" in e.message and got in e.message
    for key, value in (("fps", 0), ("fps", "2"), ("max_frames", 0), ("max_frames", 2.5), ("max_pixels", -1),
                       ("video_selection", "each")):
        e = _refused(client, _video_messages(good), max_tokens=2, extra_body={"avis": {key: value}})
        assert e.param == f"avis.{key}", (key, value, e.message)


def test_broken_videos_are_400_and_the_server_keeps_answering(served, oracle, clips, tmp_path):
    client = served[0]
    broken = malformed_videos(tmp_path / "broken")
    for name, data in broken.items():
        e = _refused(client, _video_messages(_uri(data)), max_tokens=2)
        assert e.param in (PART, "messages") and ("video" in e.message or "empty" in e.message), (name, e.message)
    # truncated-avi has a sound header: it is refused only once decoding finds the frames missing (the handler)
    e = _refused(client, _video_messages(_uri(broken["truncated-avi"])), max_tokens=2, stream=True)
    assert e.code == "invalid_video" and "truncated" in e.message
    data = clips["good"].read_bytes()
    out = _ask(client, _video_messages(_uri(data)), max_tokens=5, temperature=0.0)
    assert out.choices[0].message.content == oracle.ask(None, Q, video=data, max_tokens=5).text


def test_chat_handler_video_parts_in_process(qwen_fixture, oracle, clips):
    """Library use: a local path / file:// URL video_url part equals ask; request overrides set the sampling; a
    video with images (or a second video) is an InvalidArgumentError naming the rule."""
    llm = llama_cpp.Llama(model_path=str(qwen_fixture.model), n_ctx=N_CTX, n_threads=1, n_threads_batch=1,
                          verbose=False, chat_handler=AVISChatHandler(str(qwen_fixture.mmproj)))
    path = clips["good"]
    with request_overrides(tau=0.7, fps=2.0, max_frames=4):
        out = llm.create_chat_completion(messages=_video_messages(path.as_uri()), max_tokens=6, temperature=0.0)
    want = oracle.ask(None, Q, video=path, max_tokens=6, tau=0.7, fps=2.0, max_frames=4)
    assert out["choices"][0]["message"]["content"] == want.text and want.video["frames"] == 4
    assert out["avis"]["video"] == want.video and [im["kept"] for im in out["avis"]["images"]] == want.kept_tokens
    out = llm.create_chat_completion(messages=_video_messages(str(path)), max_tokens=6, temperature=0.0)
    assert out["choices"][0]["message"]["content"] == oracle.ask(None, Q, video=path, max_tokens=6).text
    two = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(path)}},
                                        {"type": "image_url", "image_url": {"url": str(path)}}]}]
    with pytest.raises(InvalidArgumentError, match="one video and no images"):
        llm.create_chat_completion(messages=two, max_tokens=2)
    llm.close()


def test_cli_ask_and_show_video(qwen_fixture, oracle, clips, tmp_path):
    model = ["-m", str(qwen_fixture.model), "--mmproj", str(qwen_fixture.mmproj), "--n-ctx", str(N_CTX),
             "--threads", "1", "--threads-batch", "1"]
    video = ["--video", str(clips["good"]), "--fps", "1", "--max-frames", "8"]  # 3 s at 1 fps: 4 frames (the minimum)
    run = subprocess.run([sys.executable, "-m", "avis_llamacpp.cli", "ask", *model, *video, "--rho", "0.5",
                          "--max-tokens", "6", "--no-answer-tags", Q], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    want = oracle.ask(None, Q, video=clips["good"], max_tokens=6, ratio=0.5, fps=1, max_frames=8)
    assert run.stdout.rstrip("\n") == want.text
    assert f"image tokens kept {want.kept_tokens} of {want.image_tokens}" in run.stderr  # 2 chunks: 4 frames
    out = tmp_path / "sheet.png"
    cell = 40  # tiles (3 x 40 px) wider than their labels: tile i sits at column i % 4, row i // 4
    run = subprocess.run([sys.executable, "-m", "avis_llamacpp.cli", "show", *model, *video, "--rho", "0.5",
                          "--cell-px", str(cell), "--no-legend", "-o", str(out), "Describe."], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    shown = oracle.ask(None, "Describe.", video=clips["good"], max_tokens=1, ratio=0.5, fps=1, max_frames=8)
    assert f"kept {sum(shown.kept_tokens)} of {sum(shown.image_tokens)} video tokens over 4 frames" in run.stdout
    # each sampled frame's cells: dark where its chunk (frames 2c, 2c+1 -> chunk c) pruned, as bright as the
    # frame itself where it kept them
    from avis_llamacpp.video import load_video

    frames = load_video(clips["good"], fps=1, max_frames=8).frames
    assert len(frames) == 4 == want.video["frames"]
    sheet = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    nx, ny = shown.images[0]["grid"]
    label_h, gap = 12 + 6, 6
    for f, frame in enumerate(frames):
        x0, y0 = (f % 4) * (nx * cell + gap), (f // 4) * (ny * cell + label_h + gap) + label_h
        plain = np.asarray(Image.fromarray(frame).resize((nx * cell, ny * cell), Image.BICUBIC).convert("L"),
                           dtype=np.float64)
        dark = set()
        for i in range(nx * ny):
            cx, cy = (i % nx) * cell, (i // nx) * cell
            drawn = sheet[y0 + cy:y0 + cy + cell, x0 + cx:x0 + cx + cell].mean()
            if drawn < 0.5 * plain[cy:cy + cell, cx:cx + cell].mean():
                dark.add(i)
        assert dark == set(range(nx * ny)) - set(shown.images[f // 2]["kept"]), f
    bad = subprocess.run([sys.executable, "-m", "avis_llamacpp.cli", "ask", *model, "--video", str(tmp_path / "no.mp4"),
                          Q], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--video" in bad.stderr and "no such file" in bad.stderr


def test_remote_videos_follow_the_remote_image_rule(clips):
    """http(s) video URLs: refused unless remote media are allowed, then fetched within the video byte limit (not
    the image one), as images are within theirs."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from avis_llamacpp.errors import ImageError
    from avis_llamacpp.images import ImageSourcePolicy, fetch_request_bytes

    body = clips["good"].read_bytes()

    class Serve(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's API
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/clip.mp4"
    try:
        with pytest.raises(ImageError, match="remote video URLs are disabled"):
            fetch_request_bytes(url, ImageSourcePolicy(), video=True)
        on = ImageSourcePolicy(allow_remote=True, max_bytes=len(body) - 1, max_video_bytes=len(body))
        assert fetch_request_bytes(url, on, video=True) == body
        with pytest.raises(ImageError, match=f"video is over this server's limit of {len(body) - 1} bytes"):
            fetch_request_bytes(url, ImageSourcePolicy(allow_remote=True, max_video_bytes=len(body) - 1), video=True)
    finally:
        srv.shutdown()
