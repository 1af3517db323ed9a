"""Per-adapter regions: where an adapter may act (hard) or is favoured (soft).

A region is a mask ``m`` in ``[0, 1]`` over the image, resized by area to whatever grid the
method works on (LoRAtorio's patch grid, Composite's latent pixels). Per position ``p``:

* hard: adapter ``i`` may act only where ``m_i(p) >= 0.5``;
* soft: its score gains a log-prior ``beta * m_i(p)``, i.e. its weight is multiplied by
  ``exp(beta * m_i(p))`` before normalising (``beta`` = the region's strength);
* no region: the adapter is global (a style LoRA), allowed everywhere with no prior.

LoRAtorio: ``Omega_i(p) = softmax_i(-s_i(p) / T + prior_i(p))`` over the allowed adapters, and
where no adapter is allowed the base model's prediction is used: ``c~ = sum_i Omega_i eps_i +
(1 - sum_i Omega_i) eps_0``. Composite (no base rows): ``w_i = allowed_i * exp(prior_i)``,
normalised; where no adapter is allowed, the plain mean. Without regions both are the papers'
methods unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .tensors import SIMILARITY_DTYPE

HARD_THRESHOLD = 0.5


@dataclass(frozen=True)
class Region:
    """An adapter's mask ``[H, W]`` or ``[B, H, W]`` (values in [0, 1]) and how it applies."""

    mask: Tensor
    hard: bool = True
    strength: float = 4.0  # soft regions: the log-prior at mask value 1

    def __post_init__(self) -> None:
        if self.mask.ndim not in (2, 3) or self.mask.shape[-1] < 1 or self.mask.shape[-2] < 1:
            raise ValueError(f"a region mask must have shape [H, W] or [B, H, W], got {tuple(self.mask.shape)}")
        if not 0.0 <= self.strength <= 50.0:  # also refuses NaN, which a hard region would carry unused
            raise ValueError(f"a region's soft strength must lie in [0, 50], got {self.strength!r}")


@dataclass(frozen=True)
class RegionMaps:
    """Every adapter's region on one grid: ``allowed`` (bool) and ``prior`` (float32), ``[N, B, h, w]``."""

    allowed: Tensor
    prior: Tensor


def check_mask_batch(mask: Tensor, batch: int, what: str = "a region mask") -> None:
    """A mask ``[H, W]`` or ``[B, H, W]`` serves a batch of ``batch`` images when ``B`` is 1 or ``batch``."""
    if mask.ndim == 3 and mask.shape[0] not in (1, batch):
        raise ValueError(
            f"{what} holds {mask.shape[0]} masks for a batch of {batch} images; give it one mask, or {batch} (one per image)"
        )


def resize_mask(mask: Tensor, batch: int, height: int, width: int) -> Tensor:
    """``mask`` as ``[batch, height, width]`` float32 by area averaging (any size to any size)."""
    check_mask_batch(mask, batch)
    mask = mask.to(SIMILARITY_DTYPE)
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    resized = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="area").squeeze(1)
    return resized.expand(batch, height, width).clamp(0.0, 1.0)


def region_maps(regions: Sequence[Region | None], batch: int, height: int, width: int, device: torch.device) -> RegionMaps:
    """The regions of ``N`` adapters (None = global) on a ``height x width`` grid."""
    allowed, prior = [], []
    for region in regions:
        if region is None:
            allowed.append(torch.ones(batch, height, width, dtype=torch.bool, device=device))
            prior.append(torch.zeros(batch, height, width, dtype=SIMILARITY_DTYPE, device=device))
            continue
        mask = resize_mask(region.mask.to(device), batch, height, width)
        allowed.append(mask >= HARD_THRESHOLD if region.hard else torch.ones_like(mask, dtype=torch.bool))
        prior.append(torch.zeros_like(mask) if region.hard else mask * region.strength)
    return RegionMaps(torch.stack(allowed), torch.stack(prior))


def weighted_with_base(weights: Tensor, predictions: Tensor, base: Tensor) -> Tensor:
    """``sum_i w_i * pred_i + (1 - sum_i w_i) * base`` (weights ``[N, B, 1, H, W]``), in ``base``'s dtype:
    where regions leave no adapter, the base model's prediction."""
    mixed = (weights * predictions.to(weights.dtype)).sum(dim=0)
    return (mixed + (1.0 - weights.sum(dim=0)) * base.to(weights.dtype)).to(base.dtype)


def region_shares(maps: RegionMaps) -> Tensor:
    """``w_i = allowed_i * exp(prior_i) / sum_j allowed_j * exp(prior_j)``, ``[N, B, H, W]``; 0 for
    every adapter where none is allowed."""
    weights = torch.where(maps.allowed, maps.prior.exp(), torch.zeros_like(maps.prior))
    total = weights.sum(dim=0, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(1e-30), torch.zeros_like(weights))


def regional_mean(predictions: Tensor, maps: RegionMaps) -> Tensor:
    """Composite with regions: ``sum_i w_i pred_i`` with :func:`region_shares` (maps ``[N, B, H, W]``
    at the predictions' size); the plain mean where no adapter is allowed."""
    weights = region_shares(maps)
    nowhere = weights.sum(dim=0, keepdim=True) == 0
    weights = torch.where(nowhere, torch.full_like(weights, 1.0 / weights.shape[0]), weights)
    per_channel = weights.reshape(*weights.shape[:2], *([1] * (predictions.ndim - 4)), *weights.shape[2:])
    combined = (per_channel * predictions.to(SIMILARITY_DTYPE)).sum(dim=0)
    return combined.to(predictions.dtype)
