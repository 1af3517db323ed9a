"""Shape checks and conversions between denoised (x0) and noise-space predictions.

A ComfyUI model call returns a denoised prediction ``D(x, sigma)``. The composition methods are
defined on noise-space predictions ``eps = (x - D) / sigma`` (epsilon for EPS models, the velocity
for flow models, the implied epsilon for v-prediction). Because ``x`` and ``sigma`` are shared
by every row of a step, any convex combination of ``eps`` equals the same combination of ``D``.
"""

from __future__ import annotations

import torch
from torch import Tensor

SIMILARITY_DTYPE = torch.float32


def check_latent(tensor: Tensor, name: str) -> None:
    """Require a floating-point latent batch of shape ``[B, C, H, W]``."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, C, H, W], got {type(tensor).__name__}")
    if tensor.ndim != 4:
        raise ValueError(
            f"{name} must have shape [B, C, H, W] (a batch of latents), got shape {tuple(tensor.shape)}; "
            "video or 5-D latents are not supported"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_stack(stack: Tensor, like: Tensor, name: str) -> None:
    """Require ``[N, B, C, H, W]`` with ``N >= 1`` and per-row shape equal to ``like``."""
    if not isinstance(stack, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, B, C, H, W], got {type(stack).__name__}")
    if stack.ndim != 5:
        raise ValueError(
            f"{name} must stack one [B, C, H, W] prediction per adapter as [N, B, C, H, W], got shape {tuple(stack.shape)}"
        )
    if stack.shape[0] < 1:
        raise ValueError(f"{name} holds no adapter (N = 0); give at least one")
    if stack.shape[1:] != like.shape:
        raise ValueError(
            f"{name} rows have shape {tuple(stack.shape[1:])}, but the base prediction has shape "
            f"{tuple(like.shape)}; every prediction of one step must have the same shape"
        )


def _sigma_column(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` as ``[B, 1, 1, 1]`` (or a scalar) on ``x``'s device, checked to be positive."""
    sigma_t = torch.as_tensor(sigma, device=x.device)
    if sigma_t.ndim > 1 or (sigma_t.ndim == 1 and sigma_t.shape[0] not in (1, x.shape[0])):
        raise ValueError(f"sigma must be a scalar or have shape [B] = [{x.shape[0]}], got shape {tuple(sigma_t.shape)}")
    if bool((sigma_t <= 0).any()):
        raise ValueError("sigma must be positive: a prediction at sigma = 0 has no noise-space equivalent")
    return sigma_t.reshape(-1, 1, 1, 1) if sigma_t.ndim == 1 else sigma_t


def denoised_to_noise(x: Tensor, denoised: Tensor, sigma: Tensor | float) -> Tensor:
    """``eps = (x - D) / sigma``, computed in float32 and returned in ``denoised``'s dtype."""
    check_latent(x, "x")
    check_latent(denoised, "denoised")
    s = _sigma_column(sigma, x).to(SIMILARITY_DTYPE)
    eps = (x.to(SIMILARITY_DTYPE) - denoised.to(SIMILARITY_DTYPE)) / s
    return eps.to(denoised.dtype)


def noise_to_denoised(x: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """``D = x - sigma * eps``, the inverse of :func:`denoised_to_noise`."""
    check_latent(x, "x")
    check_latent(noise, "noise")
    s = _sigma_column(sigma, x).to(SIMILARITY_DTYPE)
    denoised = x.to(SIMILARITY_DTYPE) - s * noise.to(SIMILARITY_DTYPE)
    return denoised.to(noise.dtype)


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """``uncond + scale * (cond - uncond)``; valid in noise space and in denoised space alike."""
    check_latent(cond, "cond")
    check_latent(uncond, "uncond")
    return uncond + (cond - uncond) * scale
