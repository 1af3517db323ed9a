"""LoRAtorio's single-pass routed mode: full steps build a routing map, the others reuse it.

A full step is LoRAtorio as in :mod:`.loratorio` (base cond, one cond per adapter, the unconds):
its weights ``Omega [N, B, 1, H, W]`` become the routing map. A routed step evaluates ONE cond
row in which every image token gets ``sum_i Omega_i(token) * dW_i`` (token-level gating; where
``sum_i Omega_i < 1`` the base model keeps the rest), plus the base uncond, which serves as the
uncond (``lambda = 1`` on routed steps): 2 rows whatever N is.

Full steps: the first ``full_steps`` steps, then every ``refresh_every``-th step after them
(0 = never). With ``full_steps = 0`` the map comes from the adapters' regions alone
(:func:`mask_routing`) on every step, and ``refresh_every`` is ignored.

Text tokens are shared by every image query, so a LoRA's delta on the keys and values a
cross-attention computes from the prompt cannot be gated per token. Each image query instead
attends through the keys and values of the adapters it is routed to
(:func:`per_query_attention_shift`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .regions import Region, region_maps, region_shares

# Chosen on the toy benchmark's tuning split (docs/quality-single-pass.md): without refreshes the
# map of the first, noisiest steps is nearly flat, and single pass scores below LoRA Merge.
DEFAULT_FULL_STEPS = 2
DEFAULT_REFRESH_EVERY = 3


@dataclass(frozen=True)
class RoutedSchedule:
    full_steps: int = DEFAULT_FULL_STEPS
    refresh_every: int = DEFAULT_REFRESH_EVERY

    def __post_init__(self) -> None:
        for name, value in (("full_steps", self.full_steps), ("refresh_every", self.refresh_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")

    def is_full(self, step: int) -> bool:
        """Whether ``step`` runs every adapter's rows (and refreshes the routing map)."""
        if step < self.full_steps:
            return True
        return self.full_steps > 0 and self.refresh_every > 0 and (step - self.full_steps + 1) % self.refresh_every == 0


def routing_map(weights: Tensor) -> Tensor:
    """``[B, N, H, W]`` from LoRAtorio's ``Omega [N, B, 1, H, W]``."""
    return weights.squeeze(2).transpose(0, 1)


def mask_routing(regions: Sequence[Region | None], batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """A routing map ``[B, N, H, W]`` from regions alone: ``w_i = allowed_i * exp(prior_i)``,
    normalised over the adapters; 0 (the base model) where no adapter is allowed."""
    if all(region is None for region in regions):
        raise ValueError("a routing map from masks alone needs at least one region (LoRA Region Mask), or full steps > 0")
    return region_shares(region_maps(regions, batch, height, width, device)).transpose(0, 1)


def attention_shift_coefficients(weights: Tensor) -> Tensor:
    """``c [R, T, 1 + n]`` from each image query's routing weights ``w [R, T, n]``: ``c_0 = -sum_i w_i``
    (the base model's attention), then ``c_i = w_i`` (see :func:`per_query_attention_shift`)."""
    return torch.cat([-weights.sum(dim=-1, keepdim=True), weights], dim=-1)


def per_query_attention_shift(query: Tensor, keys: Tensor, values: Tensor, coefficients: Tensor, heads: int) -> Tensor:
    """What per-query text keys and values add to a routed row's cross-attention output.

    ``query [R, T, H*d]`` (the routed row's image queries), ``keys [1 + n, R, L, H*d]`` and
    ``values [1 + n, R, L, H*d]`` (index 0: the base model's ``K_0, V_0``; index ``i``: adapter
    ``i``'s, ``K_i = K_0 + dK_i``), ``coefficients [R, T, 1 + n]`` from each query's routing weights
    ``w_i(t)`` (:func:`attention_shift_coefficients`). With ``Attn`` the scaled dot-product
    attention over ``heads`` heads::

        shift(t) = sum_i w_i(t) * (Attn(q_t, K_i, V_i) - Attn(q_t, K_0, V_0))
                 = sum_{i=0..n} c_i(t) * Attn(q_t, K_i, V_i)

    Added to ``Attn(q_t, K_0, V_0)`` it gives ``sum_i w_i Attn(q_t, K_i, V_i) + (1 - sum_i w_i)
    Attn(q_t, K_0, V_0)``: a query routed wholly to adapter ``i`` attends exactly as in adapter
    ``i``'s own row. Returns ``[R, T, H*d]``.
    """
    sets, rows, tokens, inner = keys.shape[0], query.shape[0], query.shape[1], query.shape[-1]
    if inner % heads:
        raise ValueError(f"{inner} query channels do not split into {heads} heads")

    def split_heads(tensor: Tensor) -> Tensor:  # [S, R, L, H*d] -> [S*R, H, L, d]
        return tensor.reshape(sets * rows, tensor.shape[2], heads, -1).transpose(1, 2)

    queries = split_heads(query.unsqueeze(0).expand(sets, -1, -1, -1))
    attended = F.scaled_dot_product_attention(queries, split_heads(keys), split_heads(values))
    attended = attended.transpose(1, 2).reshape(sets, rows, tokens, -1)
    return torch.einsum("rti,irtc->rtc", coefficients.to(attended.dtype), attended)
