"""The bundled default model and image: the small VLM trained on the synthetic shapes task when it is
bundled (avis_llamacpp/data/shapes-vlm/), else the tiny random-weight LLaVA-style fixture written by
convert/ (only available in a source checkout)."""

from __future__ import annotations

import sys
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEMO_IMAGE = DATA_DIR / "shapes.png"
TRAINED_DIR = DATA_DIR / "shapes-vlm"


def default_model_paths() -> tuple[Path, Path]:
    """(text model, mmproj) of the default model."""
    model, mmproj = TRAINED_DIR / "model.gguf", TRAINED_DIR / "mmproj.gguf"
    if model.is_file() and mmproj.is_file():
        return model, mmproj
    root = Path(__file__).resolve().parents[1]
    if (root / "convert" / "fixtures.py").is_file():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from convert.fixtures import make_fixture

        fx = make_fixture("llava", "tiny")
        return fx.model, fx.mmproj
    raise FileNotFoundError("no bundled model in this install; pass --model and --mmproj")
