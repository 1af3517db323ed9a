"""LoRAtorio's single-pass routed mode: full steps build a routing map, the others reuse it.

A full step is LoRAtorio as in :mod:`.loratorio` (base cond, one cond per adapter, the unconds):
its weights ``Omega [N, B, 1, H, W]`` become the routing map. A routed step evaluates ONE cond
row in which every image token gets ``sum_i Omega_i(token) * dW_i`` (token-level gating; where
``sum_i Omega_i < 1`` the base model keeps the rest), plus the base uncond, which serves as the
uncond (``lambda = 1`` on routed steps): 2 rows whatever N is.

Full steps: the first ``full_steps`` steps, then every ``refresh_every``-th step after them
(0 = never). With ``full_steps = 0`` the map comes from the adapters' regions alone
(:func:`mask_routing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .regions import Region, region_maps, region_shares


@dataclass(frozen=True)
class RoutedSchedule:
    full_steps: int = 3
    refresh_every: int = 0

    def __post_init__(self) -> None:
        for name, value in (("full_steps", self.full_steps), ("refresh_every", self.refresh_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def is_full(self, step: int) -> bool:
        """Whether ``step`` runs every adapter's rows (and refreshes the routing map)."""
        if step < self.full_steps:
            return True
        return self.refresh_every > 0 and (step - self.full_steps + 1) % self.refresh_every == 0


def routing_map(weights: Tensor) -> Tensor:
    """``[B, N, H, W]`` from LoRAtorio's ``Omega [N, B, 1, H, W]``."""
    return weights.squeeze(2).transpose(0, 1)


def mask_routing(regions: Sequence[Region | None], batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """A routing map ``[B, N, H, W]`` from regions alone: ``w_i = allowed_i * exp(prior_i)``,
    normalised over the adapters; 0 (the base model) where no adapter is allowed."""
    if all(region is None for region in regions):
        raise ValueError("a routing map from masks alone needs at least one region (LoRA Region Mask), or full steps > 0")
    return region_shares(region_maps(regions, batch, height, width, device)).transpose(0, 1)
