"""LoRA Composite (arXiv 2402.16843): average every adapter's cond and uncond, then CFG.

``guided = mean_i eps_i(u) + g * (mean_i eps_i(c) - mean_i eps_i(u))``. All 2N predictions are
needed every step; batched into one forward they cost one batch of 2N rows, not 2N forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .tensors import SIMILARITY_DTYPE, check_stack, classifier_free_guidance


@dataclass(frozen=True)
class CompositeResult:
    cond: Tensor  # mean cond [B, C, H, W]
    uncond: Tensor  # mean uncond [B, C, H, W]
    guided: Tensor  # CFG result [B, C, H, W]


def adapter_mean(predictions: Tensor) -> Tensor:
    """``mean_i pred_i`` over dim 0 of ``[N, B, C, H, W]``, in float32, returned in its dtype."""
    return predictions.to(SIMILARITY_DTYPE).mean(dim=0).to(predictions.dtype)


def lora_composite(adapter_conds: Tensor, adapter_unconds: Tensor, cfg_scale: float) -> CompositeResult:
    """One LoRA Composite step; works on noise-space and denoised predictions alike."""
    if adapter_conds.ndim != 5:
        raise ValueError(f"adapter_conds must have shape [N, B, C, H, W], got {tuple(adapter_conds.shape)}")
    check_stack(adapter_unconds, adapter_conds[0], "adapter_unconds")
    if adapter_unconds.shape[0] != adapter_conds.shape[0]:
        raise ValueError(
            f"got {adapter_conds.shape[0]} adapter conds but {adapter_unconds.shape[0]} unconds; give one of each per adapter"
        )
    cond = adapter_mean(adapter_conds)
    uncond = adapter_mean(adapter_unconds)
    return CompositeResult(cond=cond, uncond=uncond, guided=classifier_free_guidance(cond, uncond, cfg_scale))
