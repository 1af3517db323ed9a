"""Framework-agnostic multi-LoRA composition math: plain torch, no ComfyUI.

Every function takes predictions as ``[B, C, H, W]`` tensors (adapters stacked as
``[N, B, C, H, W]``), computes similarities and weights in float32 and returns results in the
inputs' dtype, on their device. See ``shared/docs/methods.md`` in the project for the papers.
"""

from .composite import CompositeResult, adapter_mean, lora_composite
from .diagnostics import WeightMapHistory, adapter_palette, colourise
from .loratorio import (
    DEFAULT_LAMBDA,
    DEFAULT_PATCH_SIZE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_K_MODE,
    LoRAtorioParams,
    LoRAtorioResult,
    loratorio,
    recentred_uncond,
    routing_weights,
    weighted_sum,
)
from .memory import MEMORY_NOISE_FLOOR, ROUTING_MEMORIES, RoutingEvidence, RoutingMemory, step_evidence
from .patches import PATCH_LAYOUTS, expand_patches, patch_cosine_similarity, patch_grid
from .regions import Region, RegionMaps, check_mask_batch, region_maps, regional_mean, resize_mask, weighted_with_base
from .routed import (
    DEFAULT_FULL_STEPS,
    DEFAULT_REFRESH_EVERY,
    RoutedSchedule,
    attention_shift_coefficients,
    mask_routing,
    per_query_attention_shift,
    routing_map,
)
from .schedule import FULL_WINDOW, StepWindow, active_adapters, budget_factor, switch_adapter
from .styles import (
    DEFAULT_STYLE_COVERAGE,
    STYLE_JUDGING_STEPS,
    STYLE_LORAS,
    StyleLoRAs,
    delta_coverage,
    detected_styles,
    judged_coverage,
    with_style_changes,
)
from .switch import DEFAULT_TAU, SwitchSchedule, step_index
from .tensors import classifier_free_guidance, denoised_to_noise, noise_to_denoised
from .weights import (
    TEMPERATURE_SCALINGS,
    TOP_K_MODES,
    TemperatureScaling,
    TopKMode,
    count_scaled_similarity,
    noise_scaled_similarity,
    softmin_weights,
    top_k_mask,
)

__all__ = [
    "DEFAULT_FULL_STEPS",
    "DEFAULT_LAMBDA",
    "DEFAULT_PATCH_SIZE",
    "DEFAULT_REFRESH_EVERY",
    "DEFAULT_STYLE_COVERAGE",
    "DEFAULT_TAU",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_K_MODE",
    "FULL_WINDOW",
    "MEMORY_NOISE_FLOOR",
    "PATCH_LAYOUTS",
    "ROUTING_MEMORIES",
    "STYLE_JUDGING_STEPS",
    "STYLE_LORAS",
    "TEMPERATURE_SCALINGS",
    "TOP_K_MODES",
    "CompositeResult",
    "LoRAtorioParams",
    "LoRAtorioResult",
    "Region",
    "RegionMaps",
    "RoutedSchedule",
    "RoutingEvidence",
    "RoutingMemory",
    "StepWindow",
    "StyleLoRAs",
    "SwitchSchedule",
    "TemperatureScaling",
    "TopKMode",
    "WeightMapHistory",
    "active_adapters",
    "adapter_mean",
    "adapter_palette",
    "attention_shift_coefficients",
    "budget_factor",
    "check_mask_batch",
    "classifier_free_guidance",
    "colourise",
    "count_scaled_similarity",
    "delta_coverage",
    "denoised_to_noise",
    "detected_styles",
    "expand_patches",
    "judged_coverage",
    "lora_composite",
    "loratorio",
    "mask_routing",
    "noise_scaled_similarity",
    "noise_to_denoised",
    "patch_cosine_similarity",
    "patch_grid",
    "per_query_attention_shift",
    "recentred_uncond",
    "region_maps",
    "regional_mean",
    "resize_mask",
    "routing_map",
    "routing_weights",
    "softmin_weights",
    "step_evidence",
    "step_index",
    "switch_adapter",
    "top_k_mask",
    "weighted_sum",
    "weighted_with_base",
    "with_style_changes",
]
