"""Style LoRAs, found by what they change: applied everywhere instead of competing for patches
(``style_loras = "applied everywhere"``, beyond the paper).

LoRAtorio routes every patch to the LoRAs whose prediction differs most from the base model's. A
style LoRA (a palette, a medium, a lighting) changes every patch of the image, so it competes with
the subjects for theirs, and a subject that loses its edges to the style loses its shape. A subject
LoRA changes the patches where its subject is. So each adapter's *coverage* is measured from the
rows a full step already has, with ``e_ip = ||eps_i(c) - eps_0(c)||^2`` summed over patch ``p`` of
``P`` (the routing's patch grid) and the mean taken over the batch:

    coverage_i = (sum_p e_ip)^2 / (P * sum_p e_ip^2)       in [1/P, 1],

the participation ratio of the change over the patches: 1 when the LoRA changes every patch alike,
``k / P`` when it changes ``k`` patches alike, whatever its strength. An adapter is judged on the
lowest of its coverages over the first :data:`STYLE_JUDGING_STEPS` full steps it shares with
another adapter, and is a style when that reaches :data:`DEFAULT_STYLE_COVERAGE`: at the noisiest
first step a subject LoRA that also shifts the palette reads as a style, and its subject shows from
the next step on. Styles leave the routing: the others are routed among themselves. At the step
that finds the styles, each one's change is added at every position,

    c~ = sum_{i routed} Omega_i * eps_i(c) + sum_{g style} (eps_g(c) - eps_0(c)),

and the same for the re-centred uncond with the styles' unconds (with ``lambda = 1`` there are none,
and the styles change the cond only). From the next step on the styles are merged into the model
for the run, in effect: every row, the base model's included, carries their deltas in its weights
(``loratorio_comfy.row_lora``), and they have no rows of their own. An adapter with a region mask
was placed by the user and is never a style; when every adapter would be a style there is nothing
to keep apart and all stay routed.

In the toy benchmark the style's coverage is 0.88 to 0.90 at the first step (0.71 to 0.95 over the
run), and the subjects' 0.26 to 0.35 (0.19 to 0.42), a full-width stripe included. A subject LoRA
with a quarter of the style's palette shift in it reads 0.64 at the first step and 0.56 at the
second (``docs/quality-single-pass.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from .patches import check_patch_size, patch_sums
from .tensors import SIMILARITY_DTYPE, check_latent, check_stack

StyleLoRAs = Literal["routed", "applied everywhere"]
STYLE_LORAS: tuple[StyleLoRAs, ...] = ("routed", "applied everywhere")
DEFAULT_STYLE_COVERAGE = 0.6
STYLE_JUDGING_STEPS = 2


def check_style_loras(handling: str) -> None:
    if handling not in STYLE_LORAS:
        raise ValueError(f"style_loras must be one of {', '.join(STYLE_LORAS)}, got {handling!r}")


def delta_coverage(adapter_preds: Tensor, base_pred: Tensor, patch_size: int) -> Tensor:
    """``coverage [N]`` (float32): the participation ratio over patches of each adapter's change
    ``eps_i - eps_0`` (module docstring), averaged over the batch. ``adapter_preds [N, B, C, H, W]``
    and ``base_pred [B, C, H, W]`` in noise space. An adapter that changes nothing covers nothing (0)."""
    check_latent(base_pred, "base_pred")
    check_stack(adapter_preds, base_pred, "adapter_preds")
    check_patch_size(patch_size)
    change = adapter_preds.to(SIMILARITY_DTYPE) - base_pred.to(SIMILARITY_DTYPE).unsqueeze(0)
    change = change / change.abs().amax().clamp_min(1e-30)  # squares cannot overflow; the ratio is scale-free
    energy = patch_sums(change.square(), patch_size).flatten(2)  # [N, B, P]
    total = energy.sum(dim=-1)
    spread = energy.shape[-1] * energy.square().sum(dim=-1)
    coverage = total.square() / spread.clamp_min(1e-30)
    return coverage.mean(dim=1)


def detected_styles(
    coverage: Sequence[float], candidates: Sequence[bool], threshold: float = DEFAULT_STYLE_COVERAGE
) -> tuple[bool, ...]:
    """Which adapters are styles: the ``candidates`` (no region mask) whose coverage reaches
    ``threshold``, unless that would be every adapter (then none: all stay routed)."""
    if len(coverage) != len(candidates):
        raise ValueError(f"{len(coverage)} coverages for {len(candidates)} adapters")
    styles = tuple(bool(c) and value >= threshold for value, c in zip(coverage, candidates, strict=True))
    return (False,) * len(styles) if all(styles) else styles


def judged_coverage(looks: Sequence[float]) -> float | None:
    """The coverage an adapter is judged on: the lowest of its first :data:`STYLE_JUDGING_STEPS`
    coverages, or None while it has fewer."""
    return min(looks[:STYLE_JUDGING_STEPS]) if len(looks) >= STYLE_JUDGING_STEPS else None


def with_style_changes(composed: Tensor, style_preds: Tensor, base_pred: Tensor) -> Tensor:
    """``composed + sum_g (eps_g - eps_0)`` over the styles' predictions ``style_preds [S, B, C, H, W]``
    (float32 sums, ``composed``'s dtype)."""
    check_latent(composed, "composed")
    check_stack(style_preds, base_pred, "style_preds")
    change = (style_preds.to(SIMILARITY_DTYPE) - base_pred.to(SIMILARITY_DTYPE).unsqueeze(0)).sum(dim=0)
    return (composed.to(SIMILARITY_DTYPE) + change).to(composed.dtype)
