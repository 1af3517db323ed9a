"""LoRAtorio (arXiv 2508.11624): patch-wise SoftMin routing of adapter predictions.

Per step, with base predictions ``eps_0(c)``, ``eps_0(u)`` and adapter predictions ``eps_i(c)``
(and ``eps_i(u)`` when ``lambda < 1``), all in noise space:

1. ``s_ip = cos(eps_i(c)|p, eps_0(c)|p)`` for every adapter ``i`` and patch ``p`` (the paper's
   grid of patches, or a sliding window around every latent pixel: :mod:`.patches`);
2. optional dynamic selection: a top-k mask keeps the ``k`` least similar adapters;
3. ``Omega_ip = SoftMin_i(s_ip / T)`` over the kept adapters, upsampled to latent pixels (``T``
   fixed as in the paper, or divided by log2 of the adapters competing there:
   :func:`.weights.count_scaled_similarity`, and also scaled by the noise level:
   :func:`.weights.noise_scaled_similarity`; as an option, the SoftMin of every step so far:
   :mod:`.memory`);
4. composed cond ``c~ = sum_i Omega_i * eps_i(c)``;
5. re-centred uncond ``u~ = lambda * eps_0(u) + (1 - lambda) * sum_i Omega_i * eps_i(u)``;
6. guidance ``u~ + g * (c~ - u~)``.

Steps 4 to 6 are convex (or affine, weights summing to 1) combinations, so they may be applied
to denoised predictions as well; only the similarity in step 1 must see noise-space inputs.

Defaults for what the paper leaves open (all overridable):

* ``patch_size = 8`` latent pixels: with the 8x VAE of SD1.5, SDXL, SD3 and Flux a patch covers
  64x64 image pixels, an 8x8 grid at SD1.5's 512x512 and 16x16 at SDXL's 1024x1024: fine enough
  to separate a subject from its background, coarse enough that a patch holds a recognisable part
  of an object rather than texture noise. On SD3 and Flux it is 4x4 of their 2x2 tokens.
* ``temperature = 0.05``: cosines between adapter and base predictions of one patch are close to
  each other (they share the same noisy latent), typically within a few hundredths. T must be on
  that scale for the SoftMin to route at all; ``T = 1`` would be almost the plain mean, ``T -> 0``
  a hard argmin that flickers between steps. A gap of 0.05 gives a weight ratio of e.
* ``lambda = 0.5``: the paper's value.
* ``patch_layout = "grid"``: the paper's partition; ``"sliding"`` is an option beyond it.
* ``routing_memory = "this step"``: the paper's; ``"steps so far"`` is an option beyond it.
* ``style_loras = "routed"``: the paper's; ``"applied everywhere"`` takes the LoRAs that change the
  whole image out of the routing (:mod:`.styles`).
* ``top_k = 3`` and ``top_k_mode = "image"`` for the dynamic pool: see :mod:`.weights`.
  ``top_k = None`` (or any ``k >= N``) is the static method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .memory import MEMORY_NOISE_FLOOR, RoutingEvidence, RoutingMemory, check_routing_memory, remembers, step_evidence
from .patches import PatchLayout, check_patch_layout, check_patch_size, expand_patches, patch_cosine_similarity
from .regions import Region, region_maps, weighted_with_base
from .styles import DEFAULT_STYLE_COVERAGE, StyleLoRAs, check_style_loras
from .tensors import check_latent, check_stack, classifier_free_guidance
from .weights import (
    TemperatureScaling,
    TopKMode,
    check_temperature,
    check_temperature_scaling,
    check_top_k,
    check_top_k_mode,
    count_scaled_similarity,
    noise_scaled_similarity,
    softmax_over_kept,
    softmin_over_kept,
    top_k_mask,
)

DEFAULT_PATCH_SIZE = 8
DEFAULT_TEMPERATURE = 0.05
DEFAULT_LAMBDA = 0.5
DEFAULT_TOP_K = 3
DEFAULT_TOP_K_MODE: TopKMode = "image"


@dataclass(frozen=True)
class LoRAtorioParams:
    """The method's open parameters; ``top_k = None`` is the static method (every adapter)."""

    patch_size: int = DEFAULT_PATCH_SIZE
    temperature: float = DEFAULT_TEMPERATURE
    recentre_lambda: float = DEFAULT_LAMBDA
    top_k: int | None = None
    top_k_mode: TopKMode = DEFAULT_TOP_K_MODE
    temperature_scaling: TemperatureScaling = "fixed"
    patch_layout: PatchLayout = "grid"
    routing_memory: RoutingMemory = "this step"
    style_loras: StyleLoRAs = "routed"
    style_coverage: float = DEFAULT_STYLE_COVERAGE

    def __post_init__(self) -> None:
        check_patch_size(self.patch_size)
        check_patch_layout(self.patch_layout)
        check_routing_memory(self.routing_memory)
        check_temperature(self.temperature)
        check_temperature_scaling(self.temperature_scaling)
        if not 0.0 <= self.recentre_lambda <= 1.0:
            raise ValueError(
                f"recentre_lambda must lie in [0, 1] (1 = the base model's uncond only), got {self.recentre_lambda!r}"
            )
        if self.top_k is not None:
            check_top_k(self.top_k)
        check_top_k_mode(self.top_k_mode)
        check_style_loras(self.style_loras)
        if not 0.0 < self.style_coverage <= 1.0:
            raise ValueError(
                f"style_coverage must lie in (0, 1] (the share of the image a style changes), got {self.style_coverage!r}"
            )

    @property
    def needs_adapter_unconds(self) -> bool:
        """Whether the adapters' unconditional predictions enter the result (``lambda < 1``)."""
        return self.recentre_lambda < 1.0

    @property
    def needs_noise_level(self) -> bool:
        """Whether :func:`routing_weights` needs the step's noise-to-signal ratio."""
        return self.temperature_scaling == "by LoRA count and noise level"

    @property
    def remembers(self) -> bool:
        """Whether :func:`routing_weights` routes on the evidence of every step so far."""
        return remembers(self.routing_memory, self.temperature)


def routing_weights(
    adapter_conds: Tensor,
    base_cond: Tensor,
    params: LoRAtorioParams,
    regions: Sequence[Region | None] | None = None,
    noise_level: float | None = None,
    evidence: RoutingEvidence | None = None,
    active: Sequence[int] | None = None,
) -> Tensor:
    """``Omega [N, B, 1, H, W]`` (float32) from noise-space cond predictions (steps 1 to 3), within
    the adapters' ``regions`` (see :mod:`.regions`; where they leave no adapter, Omega sums to 0).
    ``noise_level``: the step's noise-to-signal ratio, needed by ``temperature_scaling`` = ``by LoRA
    count and noise level``. ``evidence``: the run's earlier steps, for ``routing_memory`` = ``steps
    so far`` (this step is added to it; ``active``: which of its adapters the rows are, all when
    None); without it a step routes on its own."""
    similarity = patch_cosine_similarity(adapter_conds, base_cond, params.patch_size, params.patch_layout)
    keep = None if params.top_k is None else top_k_mask(similarity, params.top_k, params.top_k_mode)
    prior = None
    if regions is not None and any(region is not None for region in regions):
        batch, rows, cols = similarity.shape[1:]
        maps = region_maps(regions, batch, rows, cols, similarity.device)
        keep = maps.allowed if keep is None else keep & maps.allowed
        prior = maps.prior
    remembered = evidence is not None and params.remembers
    if params.temperature_scaling != "fixed":
        similarity = count_scaled_similarity(similarity, keep)
    if params.needs_noise_level:
        if noise_level is None:
            raise ValueError("temperature_scaling 'by LoRA count and noise level' needs the step's noise level")
        similarity = noise_scaled_similarity(similarity, noise_level, MEMORY_NOISE_FLOOR if remembered else 0.0)
    if remembered:
        so_far = evidence.add(step_evidence(similarity, params.temperature, keep), active)
        weights = softmax_over_kept(so_far, keep, prior)
    else:
        weights = softmin_over_kept(similarity, params.temperature, keep, prior)  # params were checked when made
    if params.patch_layout == "grid":
        weights = expand_patches(weights, *base_cond.shape[-2:], params.patch_size)
    return weights.unsqueeze(2)


def weighted_sum(weights: Tensor, predictions: Tensor) -> Tensor:
    """``sum_i Omega_i * pred_i`` over dim 0, computed in float32, in ``predictions``' dtype."""
    combined = (weights * predictions.to(weights.dtype)).sum(dim=0)
    return combined.to(predictions.dtype)


def recentred_uncond(
    base_uncond: Tensor, adapter_unconds: Tensor | None, weights: Tensor, recentre_lambda: float, regional: bool = False
) -> Tensor:
    """``u~ = lambda * eps_0(u) + (1 - lambda) * sum_i Omega_i * eps_i(u)`` (step 5).

    With ``lambda = 1`` this is ``eps_0(u)`` and ``adapter_unconds`` may be None: the adapters'
    unconditional rows need not be evaluated at all. ``regional``: Omega may sum to less than 1
    (regions), and the base uncond fills the rest of the adapters' share.
    """
    check_latent(base_uncond, "base_uncond")
    if recentre_lambda >= 1.0:
        return base_uncond
    if adapter_unconds is None:
        raise ValueError(f"recentre_lambda = {recentre_lambda} < 1 needs the adapters' unconditional predictions")
    check_stack(adapter_unconds, base_uncond, "adapter_unconds")
    mixed = weighted_with_base(weights, adapter_unconds, base_uncond) if regional else weighted_sum(weights, adapter_unconds)
    return (base_uncond * recentre_lambda + mixed * (1.0 - recentre_lambda)).to(base_uncond.dtype)


@dataclass(frozen=True)
class LoRAtorioResult:
    cond: Tensor  # composed cond [B, C, H, W]
    uncond: Tensor  # re-centred uncond [B, C, H, W]
    guided: Tensor  # CFG result [B, C, H, W]
    weights: Tensor  # Omega, float32 [N, B, 1, H, W]


def loratorio(
    base_cond: Tensor,
    base_uncond: Tensor,
    adapter_conds: Tensor,
    adapter_unconds: Tensor | None,
    cfg_scale: float,
    params: LoRAtorioParams = LoRAtorioParams(),
    noise_level: float | None = None,
) -> LoRAtorioResult:
    """One LoRAtorio step in noise space (steps 1 to 6 of the module docstring).

    Args:
        base_cond, base_uncond: the base model's predictions ``[B, C, H, W]``.
        adapter_conds: ``[N, B, C, H, W]``, adapter ``i``'s cond prediction in row ``i``.
        adapter_unconds: the same for the uncond, or None when ``params.recentre_lambda == 1``.
        cfg_scale: ``g``.
        noise_level: the step's noise-to-signal ratio (for ``temperature_scaling`` by noise level).
    """
    check_latent(base_cond, "base_cond")
    check_latent(base_uncond, "base_uncond")
    if base_uncond.shape != base_cond.shape:
        raise ValueError(f"base_uncond has shape {tuple(base_uncond.shape)}, base_cond {tuple(base_cond.shape)}; they must match")
    check_stack(adapter_conds, base_cond, "adapter_conds")
    weights = routing_weights(adapter_conds, base_cond, params, noise_level=noise_level)
    cond = weighted_sum(weights, adapter_conds)
    uncond = recentred_uncond(base_uncond, adapter_unconds, weights, params.recentre_lambda)
    return LoRAtorioResult(cond=cond, uncond=uncond, guided=classifier_free_guidance(cond, uncond, cfg_scale), weights=weights)
