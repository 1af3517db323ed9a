"""Render LoRAtorio's per-step routing weights as one IMAGE: a row of step tiles and a legend."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import loratorio_core as lc

MAX_TILES = 8
TILE_PIXELS = 128
TILE_GAP = 4
LABEL_ROW = 14
LEGEND_ROW = 18


def pick_steps(step_count: int, tiles: int = MAX_TILES) -> list[int]:
    """Up to ``tiles`` evenly spaced step indices, always including the first and the last."""
    if step_count <= tiles:
        return list(range(step_count))
    return sorted({round(i * (step_count - 1) / (tiles - 1)) for i in range(tiles)})


def legend_top(tile_height: int) -> int:
    return LABEL_ROW + tile_height + 4


def render_weight_maps(maps: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``maps [steps, N, h, w]`` -> ComfyUI IMAGE ``[1, H, W, 3]`` in ``[0, 1]``."""
    palette = lc.adapter_palette(maps.shape[1])
    steps = pick_steps(maps.shape[0])
    height, width = maps.shape[-2:]
    tile_w = TILE_PIXELS
    tile_h = max(1, round(TILE_PIXELS * height / width))
    legend_h = LEGEND_ROW * (len(names) + 1)
    width = len(steps) * (tile_w + TILE_GAP) - TILE_GAP
    canvas = Image.new("RGB", (width, LABEL_ROW + tile_h + legend_h), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for column, step in enumerate(steps):
        rgb = (lc.colourise(maps[step], palette).numpy() * 255).astype(np.uint8)
        tile = Image.fromarray(rgb).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        left = column * (tile_w + TILE_GAP)
        canvas.paste(tile, (left, LABEL_ROW))
        draw.text((left + 2, 1), f"step {step + 1}", fill=(230, 230, 230))
    for row, name in enumerate(names):
        y = legend_top(tile_h) + row * LEGEND_ROW
        colour = tuple(int(c * 255) for c in palette[row].tolist())
        draw.rectangle((4, y, 16, y + 12), fill=colour)
        draw.text((22, y), name, fill=(230, 230, 230))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).unsqueeze(0)


def render_no_steps(names: list[str], note: str = "no sampling step ran (denoise 0 or no sigmas)") -> torch.Tensor:
    """The legend alone, with ``note``: what a LoRAtorio sampler shows when it had no step to route."""
    palette = lc.adapter_palette(len(names))
    canvas = Image.new("RGB", (TILE_PIXELS * 2, LABEL_ROW + LEGEND_ROW * (len(names) + 1)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), note, fill=(230, 230, 230))
    for row, name in enumerate(names):
        y = LABEL_ROW + 4 + row * LEGEND_ROW
        draw.rectangle((4, y, 16, y + 12), fill=tuple(int(c * 255) for c in palette[row].tolist()))
        draw.text((22, y), name, fill=(230, 230, 230))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).unsqueeze(0)
