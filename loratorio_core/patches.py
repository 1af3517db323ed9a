"""Spatial patches of a latent and the per-patch cosine similarity LoRAtorio routes on.

Partition rule: a latent of ``H x W`` pixels is cut into a grid of ``ceil(H / p) x ceil(W / p)``
patches, starting at the top-left corner. Every patch is ``p x p`` except those in the last row
and column, which hold the remainder (``H mod p`` rows, ``W mod p`` columns) when ``H`` or ``W``
is not divisible by ``p``. Every latent pixel therefore belongs to exactly one patch, and a patch
size at least as large as the latent gives a single patch covering it.

Padding to a multiple of ``p`` with zeros implements this rule exactly: zeros add nothing to the
dot products and norms a cosine is made of.

Sliding layout (``patch_layout = "sliding"``, beyond the paper): every latent pixel gets the cosine
of the ``p x p`` window around it (``floor(p / 2)`` pixels up and left of it, ``p - 1 - floor(p / 2)``
down and right; windows at the border keep their part inside the latent, by the same zero padding).
The windows keep a patch's statistics, but where one adapter takes over from another now follows
where their balance flips, not the grid lines, so a routed shape is not cut square at a patch edge.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor
from torch.nn.functional import pad

from .tensors import SIMILARITY_DTYPE, check_latent, check_stack

PatchLayout = Literal["grid", "sliding"]
PATCH_LAYOUTS: tuple[PatchLayout, ...] = ("grid", "sliding")


def check_patch_size(patch_size: int) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer number of latent pixels, got {patch_size!r}")


def check_patch_layout(layout: str) -> None:
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"patch_layout must be one of {', '.join(PATCH_LAYOUTS)}, got {layout!r}")


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Rows and columns of the patch grid: ``(ceil(H / p), ceil(W / p))``."""
    check_patch_size(patch_size)
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def patch_sums(values: Tensor, patch_size: int) -> Tensor:
    """Sum ``values [..., C, H, W]`` over channels and each patch: ``[..., rows, cols]``."""
    height, width = values.shape[-2:]
    rows, cols = patch_grid(height, width, patch_size)
    padded = pad(values.sum(dim=-3), (0, cols * patch_size - width, 0, rows * patch_size - height))
    lead = padded.shape[:-2]
    blocks = padded.reshape(*lead, rows, patch_size, cols, patch_size)
    return blocks.sum(dim=(-3, -1))


def _window_sums(values: Tensor, patch_size: int) -> Tensor:
    """Sum ``values [..., C, H, W]`` over channels and the sliding window of every pixel: ``[..., H, W]``."""
    summed = values.sum(dim=-3)
    lead, (height, width) = summed.shape[:-2], summed.shape[-2:]
    before = patch_size // 2
    after = patch_size - 1 - before
    padded = pad(summed.reshape(-1, 1, height, width), (before, after, before, after))
    sums = torch.nn.functional.avg_pool2d(padded, patch_size, stride=1, divisor_override=1)
    return sums.reshape(*lead, height, width)


def _unit_scale(values: Tensor) -> Tensor:
    """Divide each latent by its largest magnitude so squares cannot overflow float32.

    Cosine similarity is invariant to a positive scale of either argument, so this changes
    nothing but the range the sums are computed in.
    """
    peak = values.abs().amax(dim=(-3, -2, -1), keepdim=True)
    return values / torch.where(peak > 0, peak, torch.ones_like(peak))


def patch_cosine_similarity(adapters: Tensor, base: Tensor, patch_size: int, layout: PatchLayout = "grid") -> Tensor:
    """``s_ip = cos(eps_i|p, eps_0|p)`` over channels and the pixels of each patch.

    Args:
        adapters: noise-space predictions ``[N, B, C, H, W]``, one per adapter.
        base: the base model's noise-space prediction ``[B, C, H, W]``.
        patch_size: ``p`` in latent pixels (see the module docstring for the partition rule).
        layout: ``"grid"``, the paper's partition, or ``"sliding"``, a window around every pixel.

    Returns:
        float32 ``[N, B, rows, cols]`` (grid) or ``[N, B, H, W]`` (sliding) in ``[-1, 1]``.
        Zero-norm patches are defined, never NaN: two all-zero patches agree (similarity 1); an
        all-zero patch against a non-zero one shares no direction (similarity 0).
    """
    check_latent(base, "base")
    check_stack(adapters, base, "adapters")
    check_patch_size(patch_size)
    check_patch_layout(layout)
    sums = patch_sums if layout == "grid" else _window_sums
    a = _unit_scale(adapters.to(SIMILARITY_DTYPE))
    b = _unit_scale(base.to(SIMILARITY_DTYPE)).unsqueeze(0)
    dot = sums(a * b, patch_size)
    norm_a = sums(a * a, patch_size).sqrt()
    norm_b = sums(b * b, patch_size).sqrt()
    norms = norm_a * norm_b
    cosine = dot / torch.where(norms > 0, norms, torch.ones_like(norms))
    both_zero = (norm_a == 0) & (norm_b == 0)
    cosine = torch.where(both_zero, torch.ones_like(cosine), cosine)
    return cosine.clamp(-1.0, 1.0)


def expand_patches(per_patch: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """Upsample ``[..., rows, cols]`` to ``[..., H, W]``: each pixel takes its patch's value."""
    check_patch_size(patch_size)
    rows, cols = patch_grid(height, width, patch_size)
    if tuple(per_patch.shape[-2:]) != (rows, cols):
        raise ValueError(
            f"per-patch values have grid {tuple(per_patch.shape[-2:])}, expected ({rows}, {cols}) for "
            f"a {height}x{width} latent with patch_size {patch_size}"
        )
    full = per_patch.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return full[..., :height, :width]
