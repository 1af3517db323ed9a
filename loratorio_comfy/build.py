"""Guiders built from node inputs: the one place that turns widget values into method objects."""

from __future__ import annotations

import logging
import math

from .. import loratorio_core as lc
from .adapter_set import AdapterSet
from .adapters import LoRAInputError
from .guiders import LoRACompositeGuider, LoRASwitchGuider, LoRAtorioGuider
from .weight_map_image import render_no_steps, render_weight_maps

LOG = logging.getLogger("comfyui-loratorio")
SINGLE_PASS = "single pass"
ROUTING_MODES = ("every step", SINGLE_PASS)


def check_cfg(cfg: float) -> float:
    if not math.isfinite(cfg) or cfg < 0:
        raise LoRAInputError(f"cfg is {cfg}; use a finite number of 0 or more (1 for distilled models such as Flux-dev)")
    return float(cfg)


def _adapters(model, lora_stack) -> AdapterSet:
    return AdapterSet(model, [(name, model_strength) for name, model_strength, _ in lora_stack])


def _regions(lora_stack) -> tuple[lc.Region | None, ...]:
    """Each LoRA's region (set by the Region Mask node), None (global) for the rest."""
    regions = getattr(lora_stack, "regions", {})
    return tuple(regions.get(name) for name, _, _ in lora_stack)


def _warn_ignored_regions(lora_stack, method: str) -> None:
    if getattr(lora_stack, "regions", None):
        LOG.warning(
            "comfyui-loratorio: %s ignores the regions of %s (one LoRA acts at a time over the whole image); "
            "use LoRAtorio or LoRA Composite to honour them.",
            method,
            ", ".join(lora_stack.regions),
        )


def _windows(lora_stack) -> tuple[lc.StepWindow, ...]:
    """Each LoRA's step window (set by the Step Window node), every step for the rest."""
    windows = getattr(lora_stack, "windows", {})
    return tuple(windows.get(name, lc.FULL_WINDOW) for name, _, _ in lora_stack)


def loratorio_guider(
    model,
    positive,
    negative,
    lora_stack,
    cfg,
    patch_size,
    temperature,
    recentre_lambda,
    top_k,
    top_k_mode,
    adapter_positive=None,
    adapter_negative=None,
    routing="every step",
    full_steps=lc.DEFAULT_FULL_STEPS,
    refresh_every=lc.DEFAULT_REFRESH_EVERY,
    temperature_scaling="fixed",
    patch_layout="grid",
    routing_memory="this step",
    style_loras="routed",
    style_coverage=lc.DEFAULT_STYLE_COVERAGE,
):
    if routing not in ROUTING_MODES:
        raise LoRAInputError(f"routing is {routing!r}; use one of {', '.join(ROUTING_MODES)}")
    routed = lc.RoutedSchedule(int(full_steps), int(refresh_every)) if routing == SINGLE_PASS else None
    params = lc.LoRAtorioParams(
        patch_size=patch_size,
        temperature=temperature,
        recentre_lambda=recentre_lambda,
        top_k=top_k if top_k > 0 else None,
        top_k_mode=top_k_mode,
        temperature_scaling=temperature_scaling,
        patch_layout=patch_layout,
        routing_memory=routing_memory,
        style_loras=style_loras,
        style_coverage=style_coverage,
    )
    adapters = _adapters(model, lora_stack)
    guider = LoRAtorioGuider(model, adapters, check_cfg(cfg), params, _windows(lora_stack), _regions(lora_stack), routed)
    guider.set_conds(positive, negative, adapter_positive, adapter_negative)
    return guider


def composite_guider(model, positive, negative, lora_stack, cfg, adapter_positive=None, adapter_negative=None):
    guider = LoRACompositeGuider(model, _adapters(model, lora_stack), check_cfg(cfg), _windows(lora_stack), _regions(lora_stack))
    guider.set_conds(positive, negative, adapter_positive, adapter_negative)
    return guider


def switch_guider(model, positive, negative, lora_stack, cfg, tau, adapter_positive=None, adapter_negative=None):
    _warn_ignored_regions(lora_stack, "LoRA Switch")
    adapters = _adapters(model, lora_stack)
    guider = LoRASwitchGuider(model, adapters, check_cfg(cfg), lc.SwitchSchedule(len(adapters), tau), _windows(lora_stack))
    guider.set_conds(positive, negative, adapter_positive, adapter_negative)
    return guider


def weight_map_image(guider):
    """The IMAGE of a LoRAtorio guider's recorded per-step weight maps, with a legend of LoRA names.

    A guider that sampled with no step (denoise 0 or empty sigmas leave the latent as it was, as in
    KSampler) gives the legend alone instead of an error."""
    if not isinstance(guider, LoRAtorioGuider):
        raise ValueError(f"weight maps come from a LoRAtorio Guider; this guider is a {type(guider).__name__}")
    if len(guider.weight_history) == 0:
        if guider.has_sampled:
            return render_no_steps(guider.adapters.names)
        raise ValueError("the LoRAtorio Guider has not sampled yet; connect the sampler's output latent to 'samples'")
    return render_weight_maps(guider.weight_history.maps(), guider.adapters.names)
