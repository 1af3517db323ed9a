"""Per-step routing weight maps, kept for the nodes to render.

A :class:`WeightMapHistory` records ``Omega`` after each LoRAtorio step as one ``[N, H, W]`` map
per step (one ``[H, W]`` map per adapter, for one sample of the batch), detached and on the CPU.
Samplers that evaluate the model several times per step keep the step's last evaluation.
:func:`colourise` turns a map into an RGB image in which each adapter has its own colour and a
pixel's colour is the weight-mixed colour of the adapters there.
"""

from __future__ import annotations

import colorsys

import torch
from torch import Tensor


def adapter_palette(count: int) -> Tensor:
    """``count`` well-separated, saturated RGB colours in ``[0, 1]``, shape ``[count, 3]``."""
    if count < 1:
        raise ValueError(f"a palette needs at least one colour, got {count}")
    golden = 0.618033988749895
    colours = [colorsys.hsv_to_rgb((i * golden) % 1.0, 0.85, 1.0) for i in range(count)]
    return torch.tensor(colours, dtype=torch.float32)


def colourise(weight_map: Tensor, palette: Tensor | None = None) -> Tensor:
    """RGB ``[H, W, 3]`` from ``weight_map [N, H, W]``: ``sum_i w_i * colour_i``."""
    if weight_map.ndim != 3:
        raise ValueError(f"weight_map must have shape [N, H, W], got {tuple(weight_map.shape)}")
    colours = adapter_palette(weight_map.shape[0]) if palette is None else palette
    image = torch.einsum("nhw,nc->hwc", weight_map.float().cpu(), colours.float())
    return image.clamp(0.0, 1.0)


class WeightMapHistory:
    """Collects ``Omega`` per step; ``maps()`` gives float32 ``[steps, N, H, W]`` in step order."""

    def __init__(self, sample: int = 0) -> None:
        self.sample = sample
        self._maps: dict[int, Tensor] = {}

    def record(self, weights: Tensor, step: int | None = None) -> None:
        """Keep sample ``self.sample`` of ``weights [N, B, 1, H, W]`` (or ``[N, B, H, W]``) as ``step``
        (default: the step after the last recorded one); a later record of the same step replaces it."""
        if weights.ndim == 5:
            weights = weights.squeeze(2)
        if weights.ndim != 4:
            raise ValueError(f"weights must have shape [N, B, 1, H, W], got {tuple(weights.shape)}")
        index = min(self.sample, weights.shape[1] - 1)
        if step is None:
            step = max(self._maps, default=-1) + 1
        self._maps[step] = weights[:, index].detach().to("cpu", torch.float32)

    def __len__(self) -> int:
        return len(self._maps)

    def clear(self) -> None:
        self._maps.clear()

    def maps(self) -> Tensor:
        if not self._maps:
            raise ValueError("no LoRAtorio step was recorded")
        return torch.stack([self._maps[step] for step in sorted(self._maps)])
