"""Video decoding and frame sampling (avis_llamacpp.video): frames decoded from generated mp4 / webm / mkv / avi /
mov files are the frames the generator drew at the sampled times; sample counts follow a transcription of
qwen-vl-utils' smart_nframes; the pixel budget downscales; every malformed file gives a VideoError."""

from __future__ import annotations

import base64
import math
import sys

import av  # the [video] extra is part of the test extra: these tests fail rather than skip without it
import numpy as np
import pytest
from PIL import Image

import avis_llamacpp.video as video
from avis_llamacpp import ImageError, VideoError
from avis_llamacpp.images import load_frames
from avis_llamacpp.video import (Video, frame_size, is_video_file, load_video, pixel_budget, probe_video,
                                 sample_count, sample_indices)
from convert.video_files import malformed_videos, moving_shapes_clip, write_video

N, FPS, SIZE = 30, 10, (64, 48)  # a 3 s clip


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    return moving_shapes_clip(N, SIZE, seed=3)


@pytest.fixture(scope="module")
def files(clip, tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("videos")
    return {ext: write_video(clip, d / f"clip{ext}", FPS).read_bytes() for ext in (".mp4", ".webm", ".mkv",
                                                                                   ".avi", ".mov")}


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- the oracle: qwen-vl-utils' rule as published (FRAME_FACTOR 2), transcribed independently ---------------
def _qwen_nframes(total_frames: int, video_fps: float, fps: float = 2.0, min_frames: int = 4,
                  max_frames: int = 32) -> int:
    factor = 2
    min_f = math.ceil(min_frames / factor) * factor
    max_f = math.floor(max_frames / factor) * factor
    nframes = total_frames / video_fps * fps
    nframes = min(min(max(nframes, min_f), max_f), total_frames)
    return math.floor(nframes / factor) * factor


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mkv", ".avi", ".mov"])
def test_decoded_frames_are_the_drawn_frames(ext, clip, files, tmp_path):
    path = tmp_path / f"c{ext}"
    path.write_bytes(files[ext])
    v = load_video(path)
    # 3 s at 2 fps = 6 frames, at round(linspace(0, 29, 6)) = 0, 5.8, 11.6, 17.4, 23.2, 29 (worked by hand)
    assert v.indices == [0, 6, 12, 17, 23, 29]
    assert v.timestamps == pytest.approx([i / FPS for i in v.indices], abs=1e-3)
    assert v.source_fps == pytest.approx(FPS) and v.duration == pytest.approx(3.0)
    assert v.size == SIZE and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in v.frames)
    for f, t in zip(v.frames, v.timestamps):
        drawn = round(t * FPS)  # the frame the generator drew at this time
        assert _mad(f, clip[drawn]) < 8.0  # codec error (4:2:0 chroma on small shapes); neighbours differ by > 12
        assert int(np.argmin([_mad(f, g) for g in clip])) == drawn
    assert v.settings["source"].split(":")[0] in ("mov", "matroska", "avi")
    assert v.settings["frames"] == 6 and v.settings["temporal_patch"] == 2 and v.settings["padded"] == 0


def test_bytes_data_uri_and_file_url_give_the_same_frames(files, tmp_path):
    path = tmp_path / "c.webm"
    path.write_bytes(files[".webm"])
    a = load_video(path)
    b = load_video(files[".webm"])
    c = load_video("data:video/webm;base64," + base64.b64encode(files[".webm"]).decode())
    d = load_video(f"file://{path}")
    for other in (b, c, d):
        assert other.indices == a.indices and all(np.array_equal(x, y) for x, y in zip(a.frames, other.frames))
    assert load_video(a) is a


@pytest.mark.parametrize("total,src_fps", [(30, 10), (8, 8), (100, 25), (600, 30), (7, 30), (3, 30), (45, 15),
                                           (250, 25), (1000, 24), (17, 2.5)])
@pytest.mark.parametrize("fps,min_frames,max_frames", [(2.0, 4, 32), (1.0, 4, 32), (0.5, 5, 16), (4.0, 4, 9)])
def test_sample_count_follows_qwen_vl_utils(total, src_fps, fps, min_frames, max_frames):
    got = sample_count(total, src_fps, fps=fps, min_frames=min_frames, max_frames=max_frames, temporal_patch=2)
    assert got == _qwen_nframes(total, src_fps, fps, min_frames, max_frames)
    assert got % 2 == 0


def test_sample_counts_worked_by_hand():
    assert sample_count(30, 10) == 6  # 3 s * 2 fps
    assert sample_count(8, 8) == 4  # 1 s * 2 = 2, raised to min_frames 4
    assert sample_count(600, 30) == 32  # 20 s * 2 = 40, capped at max_frames
    assert sample_count(3, 30) == 2  # capped by the source's 3 frames, rounded down to the temporal patch
    assert sample_count(250, 25, fps=0.5) == 4  # 10 s * 0.5 = 5, rounded down to 4
    assert sample_count(250, 25, fps=0.5, temporal_patch=1) == 5  # no temporal patches: no rounding
    assert sample_count(1, 30) == 1  # shorter than one temporal patch: the caller pads
    assert sample_indices(100, 8) == [0, 14, 28, 42, 57, 71, 85, 99]  # round(99 * k / 7)
    assert sample_indices(8, 4) == [0, 2, 5, 7]


def test_short_sources_are_padded_to_the_temporal_patch(clip, tmp_path):
    one = load_video(write_video(clip[:1], tmp_path / "one.mp4", FPS))
    assert one.indices == [0, 0] and one.settings["padded"] == 1 and np.array_equal(*one.frames)
    three = load_video(clip[:3])  # a list is taken whole at `fps` and padded with its last frame (qwen-vl-utils)
    assert three.indices == [0, 1, 2, 2] and three.timestamps == [0.0, 0.5, 1.0, 1.0]
    assert np.array_equal(three.frames[0], clip[0]) and np.array_equal(three.frames[3], clip[2])
    solo = load_video(clip[:3], temporal_patch=1)
    assert solo.indices == [0, 1, 2]
    thinned = load_video(clip, max_frames=8)  # a list longer than max_frames is thinned evenly
    assert thinned.indices == sample_indices(N, 8)
    assert all(np.array_equal(f, clip[i]) for f, i in zip(thinned.frames, thinned.indices))
    stacked = load_video(np.stack(clip[:4]))
    assert stacked.indices == [0, 1, 2, 3]


def test_pixel_budget_downscales(tmp_path):
    frames = moving_shapes_clip(20, (128, 96), seed=1)
    path = write_video(frames, tmp_path / "big.mp4", FPS)
    full = load_video(path)
    assert full.size == (128, 96) and len(full.frames) == 4  # 2 s * 2 fps
    budget = pixel_budget(16)  # 16 tokens of 28x28 px for the whole clip = 12544 px
    assert budget == 16 * 28 * 28
    small = load_video(path, total_pixels=budget, min_pixels=1)
    cap = budget * 2 / 4  # per frame: the clip's 4 frames make 2 temporal patches
    s = math.sqrt(cap / (128 * 96))
    assert small.size == (math.floor(128 * s), math.floor(96 * s)) == (91, 68)
    assert len(small.frames) * small.size[0] * small.size[1] / 2 <= budget
    assert small.indices == full.indices
    for f, i in zip(small.frames, small.indices):  # the drawn frame, downscaled
        ref = np.asarray(Image.fromarray(frames[i]).resize(small.size, Image.Resampling.BICUBIC))
        assert _mad(f, ref) < 8.0
    # with qwen-vl-utils' per-frame floor (min_pixels) in force, a tight budget takes fewer frames first
    fewer = load_video(path, total_pixels=budget, min_pixels=128 * 96)
    assert fewer.indices == [0, 19] and fewer.size == (128, 96)
    assert fewer.settings["total_pixels"] == budget


def test_frame_size_rule():
    # 1080p, 32 frames, default budget: cap = min(768*784, 4096*784*2/32) = 200704 px per frame
    w, h = frame_size(1920, 1080, 32)
    cap = min(768 * 784, 4096 * 784 * 2 / 32)
    assert w * h <= cap < (w + 2) * (h + 2) and abs(w / h - 1920 / 1080) < 0.01
    assert frame_size(64, 48, 32) == (64, 48)  # never upscaled
    w, h = frame_size(4000, 3000, 2)  # a short clip: the per-frame cap (qwen VIDEO_MAX_PIXELS) binds
    assert w * h <= 768 * 784 < (w + 2) * (h + 2)
    assert frame_size(100, 100, 4, total_pixels=5000, temporal_patch=1) == (35, 35)  # 1250 px each


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_are_sampled_by_their_frame_times(fmt, clip, tmp_path):
    gif = tmp_path / f"a.{fmt.lower()}"
    imgs = [Image.fromarray(f) for f in clip[:20]]
    imgs[0].save(gif, format=fmt, save_all=True, append_images=imgs[1:], duration=100, loop=0,
                 **({"lossless": True} if fmt == "WEBP" else {}))  # 20 frames, 2 s
    v = load_video(gif)
    assert v.settings["source"] == f"animation:{fmt}"
    assert v.indices == sample_indices(20, 4) and v.source_fps == pytest.approx(10.0)
    assert v.timestamps == pytest.approx([i / 10 for i in v.indices])
    for f, i in zip(v.frames, v.indices):
        assert int(np.argmin([_mad(f, g) for g in clip[:20]])) == i  # GIF palette error only
    assert load_video(gif.read_bytes()).indices == v.indices
    with Image.open(gif) as im:
        assert load_video(im).indices == v.indices



@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animated_images_with_held_frames_are_sampled_by_time(fmt, clip, tmp_path):
    """A frame held longer counts for its time (Pillow merges identical frames into one long frame when it saves
    GIF / APNG; GIFs hold frames on purpose): 0.5 s A, 1.5 s B, 0.5 s C at 2 fps are A B B B C, padded to the
    temporal patch, what the same clip saved frame by frame at 2 fps (A B B B C, 2.5 s) gives: 4 of its 5 frames."""
    a, b, c = (Image.fromarray(f) for f in clip[:3])
    path = tmp_path / f"held.{fmt.lower()}"
    a.save(path, format=fmt, save_all=True, append_images=[b, c], duration=[500, 1500, 500], loop=0)
    v = load_video(path, temporal_patch=2)
    frame_by_frame = sample_indices(5, 4)  # the constant-rate rule on A B B B C
    assert [[0, 1, 1, 1, 2][i] for i in frame_by_frame] == v.indices == [0, 1, 1, 2]
    assert v.timestamps == pytest.approx([i / 2 for i in frame_by_frame])
    for f, i in zip(v.frames, v.indices):
        assert int(np.argmin([_mad(f, g) for g in clip[:3]])) == i
    # the bundled demo clip: its still first frames are merged by the APNG writer, yet it loads back as the task's
    # 8 frames, pixel for pixel
    from convert import video_task
    from convert.video_task import write_demo_clip

    item = write_demo_clip(tmp_path / "demo.png", tmp_path / "demo.json", "test", 9)
    with Image.open(tmp_path / "demo.png") as im:
        assert im.n_frames < 8  # the writer merged identical frames
    loaded = load_video(tmp_path / "demo.png", temporal_patch=2).frames
    assert len(loaded) == 8 and all(np.array_equal(x, y) for x, y in zip(loaded, video_task.render_clip(item.clip)))

def test_is_video_file_and_load_frames_unchanged(clip, files, tmp_path):
    path = tmp_path / "c.mkv"
    path.write_bytes(files[".mkv"])
    gif = tmp_path / "a.gif"
    Image.fromarray(clip[0]).save(gif, save_all=True, append_images=[Image.fromarray(c) for c in clip[1:6]])
    uri = "data:video/webm;base64," + base64.b64encode(files[".webm"]).decode()
    for src in (path, str(path), f"file://{path}", files[".mp4"], files[".avi"], uri):
        assert is_video_file(src)
    for src in (gif, gif.read_bytes(), clip[:3], clip[0], tmp_path / "missing.mp4", "data:image/png;base64,AA==",
                b"", "https://example.invalid/a.mp4"):
        assert not is_video_file(src)
    # images.load_frames (lists and animated images) keeps its behaviour; video files go to load_video
    assert len(load_frames([Image.fromarray(c) for c in clip[:5]], max_frames=3)) == 3
    assert len(load_frames(gif, max_frames=3)) == 3


# --- malformed input ---------------------------------------------------------------------------------------
# a phrase each file's VideoError must contain (the files: convert.video_files.malformed_videos)
MALFORMED = {
    "zero-length": "empty",
    "truncated-mp4": "truncated or corrupt",
    "truncated-mkv": "truncated",
    "truncated-webm": "truncated",
    "truncated-avi": "truncated",
    "header-only-mkv": "truncated or corrupt",
    "mp4-magic-garbage": "corrupt",
    "garbage": "not a readable video",
    "audio-only-mka": "audio but no video stream",
    "audio-only-mp4": "audio but no video stream",
    "huge-resolution": "144000000 pixels, over the",
}


@pytest.fixture(scope="module")
def malformed(tmp_path_factory) -> dict[str, bytes]:
    return malformed_videos(tmp_path_factory.mktemp("bad"))


def test_the_malformed_set_is_complete(malformed):
    assert set(malformed) == set(MALFORMED)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_give_a_video_error(name, malformed, tmp_path):
    data, phrase = malformed[name], MALFORMED[name]
    path = tmp_path / f"bad-{name}.bin"
    path.write_bytes(data)
    for src in (path, data):
        with pytest.raises(VideoError, match=phrase):
            load_video(src)
    assert issubclass(VideoError, ImageError)


def test_server_limits(files, tmp_path):
    path = tmp_path / "c.mkv"
    path.write_bytes(files[".mkv"])
    with pytest.raises(VideoError, match="lasts 3.0 s, over the limit of 2 s"):
        load_video(path, max_duration_s=2)
    with pytest.raises(VideoError, match="more than 10 frames"):  # mkv has no frame count: counted packets
        load_video(path, max_source_frames=10)
    with pytest.raises(VideoError, match="30 frames, over the limit of 10"):  # mp4's header has one
        load_video(files[".mp4"], max_source_frames=10)
    with pytest.raises(VideoError, match="3072 pixels, over the 3000-pixel limit"):
        load_video(path, max_source_pixels=3000)
    with pytest.raises(VideoError, match="over the 1000-byte limit"):
        load_video(path, max_bytes=1000)
    with pytest.raises(VideoError, match="over the 1000-byte limit"):
        load_video(files[".mkv"], max_bytes=1000)
    assert load_video(path, max_duration_s=3, max_source_frames=30, max_source_pixels=3072).indices
    info = probe_video(path)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (64, 48, N, FPS)
    with pytest.raises(VideoError, match="lasts"):
        probe_video(files[".mp4"], max_duration_s=1)


def test_other_refusals(tmp_path, monkeypatch, files):
    with pytest.raises(VideoError, match="not found"):
        load_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty file"):
        load_video(tmp_path / "empty.mp4")
    with pytest.raises(VideoError, match="remote videos are disabled"):
        load_video("https://example.invalid/clip.mp4")
    with pytest.raises(VideoError, match="base64"):
        load_video("data:video/mp4,notbase64")
    with pytest.raises(VideoError, match="at least one frame"):
        load_video([])
    with pytest.raises(VideoError, match="unsupported video type"):
        load_video(3.5)
    with pytest.raises(ValueError, match="fps"):
        load_video(files[".mp4"], fps=0)
    with pytest.raises(ValueError, match="max_frames"):
        load_video(files[".mp4"], max_frames=1)
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV missing: a clear error naming the extra
    with pytest.raises(VideoError, match=r"avis-llamacpp\[video\]"):
        load_video(files[".mp4"])
    assert isinstance(load_video([np.zeros((8, 8, 3), np.uint8)] * 2), Video)  # frame lists need no PyAV


@pytest.mark.parametrize("ext", [".mp4", ".webm", ".mkv", ".avi"])
def test_seeking_takes_the_same_frames_as_decoding_in_order(ext, tmp_path, monkeypatch):
    frames = moving_shapes_clip(160, (48, 32), seed=2)
    path = write_video(frames, tmp_path / f"long{ext}", 20, gop=12)  # 8 s: 16 samples, 10 frames apart
    monkeypatch.setattr(video, "SEEK_MIN_GAP", 10 ** 9)
    ordered = load_video(path)
    monkeypatch.setattr(video, "SEEK_MIN_GAP", 4)
    seeking = load_video(path)
    assert ordered.settings["decode"] == "in order" and seeking.settings["decode"] == "seek"
    assert seeking.indices == ordered.indices == sample_indices(160, 16)
    assert seeking.timestamps == pytest.approx(ordered.timestamps, abs=1e-3)
    for a, b, i in zip(seeking.frames, ordered.frames, seeking.indices):
        assert np.array_equal(a, b) and int(np.argmin([_mad(a, g) for g in frames])) == i


@pytest.mark.parametrize("angle,turns", [(90, 1), (-90, 3), (180, 2)])
def test_display_rotation_is_applied(angle, turns, tmp_path):
    frames = moving_shapes_clip(20, (64, 32), seed=4)  # stored landscape, 2 s at 10 fps
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        st.width, st.height, st.pix_fmt = 64, 32, "yuv420p"
        st.set_display_rotation(angle)  # counter-clockwise degrees a player turns the frames by
        for f in frames:
            out.mux(st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(st.encode())
    v = load_video(path)
    upright = [np.rot90(f, turns) for f in frames]
    assert v.size == (upright[0].shape[1], upright[0].shape[0]) and v.settings["rotated"] == (turns % 2 == 1)
    for f, i in zip(v.frames, v.indices):
        assert _mad(f, upright[i]) < 8.0 and int(np.argmin([_mad(f, g) for g in upright])) == i
    small = load_video(path, total_pixels=1024, min_pixels=1)  # the budget's downscale keeps the orientation
    assert small.size[1] > small.size[0] if turns % 2 else small.size[0] > small.size[1]


def test_a_header_that_overcounts_by_a_frame_is_sampled_as_decoded(clip, files, monkeypatch):
    real_probe = video._probe

    def overcounting(*args, extra=1):
        info = real_probe(*args)
        return {**info, "frames": info["frames"] + extra}

    monkeypatch.setattr(video, "_probe", overcounting)
    v = load_video(files[".mp4"])  # the header says 31 frames, 30 decode: sampled as the 30 there are
    assert v.indices == [0, 6, 12, 17, 23, 29] and v.settings["source_frames"] == N
    assert [int(np.argmin([_mad(f, g) for g in clip])) for f in v.frames] == v.indices
    monkeypatch.setattr(video, "_probe", lambda *a: overcounting(*a, extra=5))
    with pytest.raises(VideoError, match="header counts 35 frames but only 30 could be decoded"):
        load_video(files[".mp4"])
