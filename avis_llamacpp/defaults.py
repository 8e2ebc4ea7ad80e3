"""The bundled default model and image: the Qwen2.5-VL-architecture VLM trained on the synthetic shapes task
(avis_llamacpp/data/shapes-qwen/) when it is bundled, else the older LLaVA-style one (data/shapes-vlm/), else the
tiny random-weight LLaVA-style fixture written by convert/ (only available in a source checkout)."""

from __future__ import annotations

import sys
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEMO_IMAGE = DATA_DIR / "shapes.png"
TRAINED_DIR = DATA_DIR / "shapes-qwen"  # the default: M-RoPE, 256 image tokens, trained for pruned inputs
LLAVA_SHAPES_DIR = DATA_DIR / "shapes-vlm"  # the first bundled model: 1-D RoPE, 196 tokens, whole images only
VIDEO_DIR = DATA_DIR / "shapes-qwen-video"  # the same architecture trained on clips as well as images
DEMO_CLIP = DATA_DIR / "shapes-clip.png"  # an animated PNG: 8 frames of a video-task test clip, 2 fps
DEMO_CLIP_QUESTION = DATA_DIR / "shapes-clip.json"  # its question, options and answer


def bundled_dir() -> Path | None:
    """The folder of the bundled model the demo uses, or None when neither is present."""
    for d in (TRAINED_DIR, LLAVA_SHAPES_DIR):
        if (d / "model.gguf").is_file() and (d / "mmproj.gguf").is_file():
            return d
    return None


def default_model_paths() -> tuple[Path, Path]:
    """(text model, mmproj) of the default model."""
    d = bundled_dir()
    if d is not None:
        return d / "model.gguf", d / "mmproj.gguf"
    root = Path(__file__).resolve().parents[1]
    if (root / "convert" / "fixtures.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from convert.fixtures import make_fixture

        fx = make_fixture("llava", "tiny")
        return fx.model, fx.mmproj
    raise FileNotFoundError("no bundled model in this install; pass --model and --mmproj")


def video_model_paths() -> tuple[Path, Path, Path | None]:
    """(text model, mmproj, policy or None) of the bundled clip-trained model (FileNotFoundError when absent)."""
    m, p = VIDEO_DIR / "model.gguf", VIDEO_DIR / "mmproj.gguf"
    if not (m.is_file() and p.is_file()):
        raise FileNotFoundError(f"no bundled video model in this install ({VIDEO_DIR})")
    policy = VIDEO_DIR / "policy.gguf"
    return m, p, policy if policy.is_file() else None


def default_policy_path() -> Path | None:
    """The bundled default model's calibrated policy, if it has one."""
    d = bundled_dir()
    return d / "policy.gguf" if d is not None and (d / "policy.gguf").is_file() else None
