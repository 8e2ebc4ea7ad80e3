"""Draw which image tokens KDV kept: pruned cells dimmed and hatched, kept cells untouched (PIL only)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .images import ImageInput, load_image


def render_overlay(image: ImageInput, kept: Sequence[int], grid: tuple[int, int], *, cell_px: int = 28,
                   dim: float = 0.25) -> Image.Image:
    """The image resized to the encoder's token grid (nx x ny cells of cell_px pixels), with every pruned
    token's cell darkened by `dim` and crossed; token i is cell (i % nx, i // nx), row-major as mtmd orders them."""
    nx, ny = grid
    if nx <= 0 or ny <= 0:
        raise ValueError(f"grid must be positive, got {grid}")
    kept_mask = np.zeros(nx * ny, dtype=bool)
    kept_mask[np.asarray(list(kept), dtype=np.int64)] = True
    img = Image.fromarray(load_image(image)).resize((nx * cell_px, ny * cell_px), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32)
    for i in np.flatnonzero(~kept_mask):
        x, y = (i % nx) * cell_px, (i // nx) * cell_px
        arr[y:y + cell_px, x:x + cell_px] *= dim
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for i in np.flatnonzero(~kept_mask):
        x, y = (i % nx) * cell_px, (i // nx) * cell_px
        draw.line((x, y, x + cell_px - 1, y + cell_px - 1), fill=(200, 40, 40))
    return out
