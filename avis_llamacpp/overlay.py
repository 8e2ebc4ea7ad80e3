"""Draw which image tokens KDV kept: pruned cells dimmed and crossed, kept cells untouched, and a legend strip
saying so (PIL only)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .images import ImageInput, load_image


PRUNED_LINE = (200, 40, 40)


def render_overlay(image: ImageInput, kept: Sequence[int], grid: tuple[int, int], *, cell_px: int = 28,
                   dim: float = 0.25) -> Image.Image:
    """The image resized to the encoder's token grid (nx x ny cells of cell_px pixels), with every cell not in
    `kept` darkened by `dim` and crossed; `kept` holds row-major cell indices (cell i is (i % nx, i // nx)): LLM
    token indices of a family whose tokens run otherwise go through Family.token_cells first."""
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
        draw.line((x, y, x + cell_px - 1, y + cell_px - 1), fill=PRUNED_LINE)
    return out


def add_legend(overlay: Image.Image, n_kept: int, n_tokens: int, how: str = "", *, dim: float = 0.25,
               font_px: int = 14) -> Image.Image:
    """The overlay with a legend strip under it: a kept and a pruned (dark, crossed) swatch with their token
    counts, and `how` (e.g. "KDV tau = 0.785 rad"); the strip widens the image when the text needs it."""
    font = ImageFont.load_default(size=font_px)
    pad, sw = 6, font_px + 2
    lines = [f"kept (as is): {n_kept} of {n_tokens} image tokens ({n_kept / max(n_tokens, 1):.0%})",
             f"pruned (dark, crossed): {n_tokens - n_kept}"] + ([how] if how else [])
    probe = ImageDraw.Draw(overlay)
    text_w = max(int(probe.textlength(t, font=font)) for t in lines)
    width = max(overlay.width, pad * 3 + sw + text_w)
    height = overlay.height + pad + len(lines) * (sw + pad)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    out.paste(overlay.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    grey = (90, 90, 90)
    for row, text in enumerate(lines):
        y = overlay.height + pad + row * (sw + pad)
        if row < 2:
            shade = 200 if row == 0 else int(200 * dim)
            draw.rectangle((pad, y, pad + sw - 1, y + sw - 1), fill=(shade, shade, shade), outline=(0, 0, 0))
            if row == 1:
                draw.line((pad, y, pad + sw - 1, y + sw - 1), fill=PRUNED_LINE)
        draw.text((pad * 2 + sw, y + sw // 2), text, fill=(0, 0, 0) if row < 2 else grey, font=font, anchor="lm")
    return out


def render_video_overlay(frames: Sequence[np.ndarray], chunks: Sequence[tuple[Sequence[int], tuple[int, int]]],
                         *, temporal_patch: int = 1, timestamps: Sequence[float] | None = None, cell_px: int = 14,
                         columns: int = 4, dim: float = 0.25, font_px: int = 12) -> Image.Image:
    """A contact sheet of a video's sampled frames, each drawn as render_overlay draws an image with the tokens
    of its chunk (kept indices, grid): frame f belongs to chunk f // temporal_patch, since a temporal patch's
    frames share their tokens. Tiles run left to right, `columns` a row, each labelled "#frame time cchunk"."""
    if temporal_patch < 1 or len(chunks) * temporal_patch < len(frames):
        raise ValueError(f"{len(frames)} frames need {math.ceil(len(frames) / max(temporal_patch, 1))} chunks of "
                         f"{temporal_patch} frame(s), got {len(chunks)}")
    if not frames:
        raise ValueError("a contact sheet needs at least one frame")
    tiles = [render_overlay(f, chunks[i // temporal_patch][0], tuple(chunks[i // temporal_patch][1]),
                            cell_px=cell_px, dim=dim) for i, f in enumerate(frames)]
    font = ImageFont.load_default(size=font_px)
    labels = [f"#{i + 1}" + (f" {timestamps[i]:.2f}s" if timestamps is not None else "")
              + f" c{i // temporal_patch + 1}" for i in range(len(tiles))]
    probe = ImageDraw.Draw(tiles[0])
    tw = max(max(t.width for t in tiles), max(int(probe.textlength(t, font=font)) + 4 for t in labels))
    th = max(t.height for t in tiles)
    label_h, gap = font_px + 6, 6
    cols = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * tw + (cols - 1) * gap, rows * (th + label_h) + (rows - 1) * gap),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        x, y = (i % cols) * (tw + gap), (i // cols) * (th + label_h + gap)
        sheet.paste(tile, (x, y + label_h))
        draw.text((x + 2, y + label_h // 2), labels[i], fill=(0, 0, 0), font=font, anchor="lm")
    return sheet
