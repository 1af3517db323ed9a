"""SoftMin routing weights over adapters and the dynamic top-k mask.

Default ``k = 3``: the composition testbeds use N = 2 to 5, and with more survivors each
adapter's share of a patch thins out towards the plain mean the method improves on.

``Omega_i = exp(-s_i / T) / sum_j exp(-s_j / T)`` over the adapters ``j`` that survive the mask:
the adapter whose prediction diverges most from the base model in a patch gets the most weight.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .tensors import SIMILARITY_DTYPE

TopKMode = Literal["patch", "image"]
TOP_K_MODES: tuple[TopKMode, ...] = ("patch", "image")
TemperatureScaling = Literal["fixed", "by LoRA count", "by LoRA count and noise level"]
TEMPERATURE_SCALINGS: tuple[TemperatureScaling, ...] = ("fixed", "by LoRA count", "by LoRA count and noise level")
# T * r**3 at noise-to-signal ratio r: chosen on the toy benchmark's tuning split over the powers
# -0.5 to 6 (0.471 recall at 0, 0.493 at 3, 0.486 at 4 and 6); docs/quality-single-pass.md
NOISE_TEMPERATURE_POWER = 3.0


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = hard selection, inf = plain mean), got {temperature!r}")


def check_temperature_scaling(scaling: str) -> None:
    if scaling not in TEMPERATURE_SCALINGS:
        raise ValueError(f"temperature_scaling must be one of {', '.join(TEMPERATURE_SCALINGS)}, got {scaling!r}")


def count_scaled_similarity(similarity: Tensor, keep: Tensor | None = None) -> Tensor:
    """``s * log2 N_p``, with ``N_p`` the adapters competing at each position (those ``keep`` keeps,
    all ``N`` without it; at least 2): a SoftMin at ``T`` of the result is one at ``T / log2 N_p``
    of ``s``, position by position.

    With a fixed ``T`` the SoftMin routes more weakly the more adapters share a patch: for the same
    gaps in similarity the winner's weight falls towards ``1 / N``. Dividing ``T`` by ``log2 N``
    (``T * ln 2 / ln N``) sharpens it with the count (``T / 2`` at N = 4, ``T / 3`` at N = 8), so
    ``T`` keeps the meaning it has for two adapters. Counting per position means a patch where
    regions or the top-k mask leave two adapters routes as two adapters do. An empirical rule,
    chosen on the toy benchmark's tuning split (``docs/quality-single-pass.md``); the paper keeps
    ``T`` fixed.
    """
    s = similarity.to(SIMILARITY_DTYPE)
    competing = torch.tensor(float(s.shape[0])) if keep is None else keep.expand_as(s).sum(dim=0, keepdim=True)
    return s * competing.to(SIMILARITY_DTYPE).clamp_min(2.0).log2()


def noise_scaled_similarity(similarity: Tensor, noise_level: float, floor: float = 0.0) -> Tensor:
    """``s / r**3`` for the step's noise-to-signal ratio ``r`` (at least ``floor``): a SoftMin at ``T``
    of the result is one at ``T * r**3`` of ``s``.

    The adapters' cosines to the base spread little at high noise (about 0.0006 at ``r = 14.6`` on
    SD1.5) and widely at low noise (about 0.47 at ``r <= 0.3``), so no fixed ``T`` suits both ends.
    ``T * r**3`` blends towards the plain mean while the noise dominates (``r > 1``), where routing
    would follow noise, and routes harder as the image forms; ``T`` is as given at ``r = 1``. An
    empirical rule (:data:`NOISE_TEMPERATURE_POWER`); the paper keeps ``T`` fixed.
    """
    if math.isnan(noise_level) or noise_level < 0:
        raise ValueError(f"the noise level must be a number >= 0, got {noise_level!r}")
    ratio = min(max(noise_level, floor, 1e-3), 1e3)  # r**3 stays finite in float32 and s / r**3 does not vanish
    return similarity.to(SIMILARITY_DTYPE) / ratio**NOISE_TEMPERATURE_POWER


def check_top_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")


def check_top_k_mode(mode: str) -> None:
    if mode not in TOP_K_MODES:
        raise ValueError(f"top_k mode must be one of {TOP_K_MODES}, got {mode!r}")


def softmin_weights(similarity: Tensor, temperature: float, keep: Tensor | None = None) -> Tensor:
    """``Omega = SoftMin_i(s / T)`` along dim 0 (the adapters), restricted to ``keep``.

    Args:
        similarity: ``[N, ...]``, e.g. the per-patch cosines ``[N, B, rows, cols]``.
        temperature: ``T >= 0``. ``T = 0`` is the limit: all weight on the least similar adapter
            (ties share it equally). ``T = inf`` gives equal weights (the plain mean).
        keep: optional boolean mask broadcastable to ``similarity``; adapters where it is False get
            weight 0. At least one adapter must be kept at every position.

    Returns:
        float32 weights of ``similarity``'s shape, non-negative, summing to 1 along dim 0.
    """
    check_temperature(temperature)
    if keep is not None and not bool(keep.expand_as(similarity).any(dim=0).all()):
        raise ValueError("the top-k mask keeps no adapter at some position; keep at least one (k >= 1)")
    return softmin_over_kept(similarity, temperature, keep)


def softmin_over_kept(similarity: Tensor, temperature: float, keep: Tensor | None, prior: Tensor | None = None) -> Tensor:
    """:func:`softmin_weights` without its checks, for masks that keep an adapter everywhere by
    construction (:func:`top_k_mask`'s): checking would read the mask back from the device.

    ``prior`` (``[N, ...]``, optional) is added to the scores as a log-prior (soft regions; it has
    no effect at ``T = 0``). Where ``keep`` keeps no adapter (hard regions can) every weight is 0.
    """
    s = similarity.to(SIMILARITY_DTYPE)
    keep = torch.ones_like(s, dtype=torch.bool) if keep is None else keep.expand_as(s)
    lowest = torch.where(keep, s, torch.full_like(s, math.inf)).amin(dim=0, keepdim=True)
    if temperature == 0:
        winners = (keep & (s == lowest)).to(SIMILARITY_DTYPE)
        return winners / winners.sum(dim=0, keepdim=True).clamp_min(1.0)
    # shifting by the lowest similarity keeps one score at 0, so a tiny T cannot
    # underflow every exponent of a position to zero
    scores = torch.zeros_like(s) if math.isinf(temperature) else -(s - lowest) / temperature
    return softmax_over_kept(scores, keep, prior)


def softmax_over_kept(scores: Tensor, keep: Tensor | None, prior: Tensor | None = None) -> Tensor:
    """``softmax_i(scores_i + prior_i)`` along dim 0 over the adapters ``keep`` keeps; 0 for the others,
    and 0 for every adapter where ``keep`` keeps none."""
    if prior is not None:
        scores = scores + prior
    if keep is None:
        return torch.softmax(scores, dim=0)
    # a position that keeps no adapter is all -inf: softmax gives NaN there, which becomes 0
    return torch.softmax(scores.masked_fill(~keep.expand_as(scores), -math.inf), dim=0).nan_to_num(0.0)


def top_k_mask(similarity: Tensor, k: int, mode: TopKMode = "image") -> Tensor:
    """Keep the ``k`` least similar (most divergent) adapters, per patch or per image.

    Args:
        similarity: ``[N, B, rows, cols]`` per-patch cosines.
        k: how many adapters survive; ``k >= N`` keeps them all (the static method).
        mode: ``"patch"`` ranks adapters separately in every patch; ``"image"`` ranks them by
            their mean similarity over the image, so one set of ``k`` adapters serves every patch
            of a sample. Ties are broken by adapter order.

    Which mode the paper means is not stated. Its description, a hard mask that at each step
    "keeps k of them" (adapters) from a pool, reads as choosing adapters for the whole image,
    so ``"image"`` is the default; ``"patch"`` is the finer reading, where each region may pick
    its own ``k``.

    Returns:
        boolean ``[N, B, rows, cols]`` (``"patch"``) or ``[N, B, 1, 1]`` (``"image"``).
    """
    check_top_k(k)
    check_top_k_mode(mode)
    if similarity.ndim != 4:
        raise ValueError(f"similarity must have shape [N, B, rows, cols], got {tuple(similarity.shape)}")
    count = similarity.shape[0]
    s = similarity.to(SIMILARITY_DTYPE)
    if mode == "image":
        s = s.mean(dim=(-2, -1), keepdim=True)
    if k >= count:
        return torch.ones_like(s, dtype=torch.bool)
    # a stable sort keeps adapter order among equal similarities
    order = torch.sort(s, dim=0, stable=True).indices[:k]
    mask = torch.zeros_like(s, dtype=torch.bool)
    return mask.scatter(0, order, True)
