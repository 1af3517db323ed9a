"""Guider nodes for ``SamplerCustomAdvanced``: any sampler, scheduler and noise."""

from __future__ import annotations

from ..loratorio_comfy import build
from .common import (
    CATEGORY,
    adapter_prompt_inputs,
    as_lora_stack,
    composition_inputs,
    extension_inputs,
    loratorio_inputs,
    routing_inputs,
    tip,
    with_preview,
)

GUIDER_CATEGORY = f"{CATEGORY}/guiders"


class LoRAtorioGuiderNode:
    CATEGORY = GUIDER_CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    DESCRIPTION = (
        "LoRAtorio: each adapter steers the patches where its prediction departs most from the base model's "
        "(SoftMin of cosine similarity), with CFG re-centred on the base model's uncond. Set top_k for a dynamic pool."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {**composition_inputs(), **loratorio_inputs()},
            "optional": {**adapter_prompt_inputs(), **routing_inputs(), **extension_inputs()},
        }

    def get_guider(self, model, positive, negative, lora_stack, cfg, **params):
        return (build.loratorio_guider(model, positive, negative, as_lora_stack(lora_stack), cfg, **params),)


class LoRACompositeGuiderNode:
    CATEGORY = GUIDER_CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    DESCRIPTION = "LoRA Composite: every adapter predicts cond and uncond each step; their means go into CFG."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": composition_inputs(), "optional": adapter_prompt_inputs()}

    def get_guider(self, model, positive, negative, lora_stack, cfg, **prompts):
        return (build.composite_guider(model, positive, negative, as_lora_stack(lora_stack), cfg, **prompts),)


def tau_input() -> tuple:
    return ("INT", tip("Steps each adapter stays active before the next takes over (the paper: 5).", default=5, min=1, max=1000))


class LoRASwitchGuiderNode:
    CATEGORY = GUIDER_CATEGORY
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    DESCRIPTION = "LoRA Switch: one adapter at a time, in stack order, each for tau steps, cycling."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**composition_inputs(), "tau": tau_input()}, "optional": adapter_prompt_inputs()}

    def get_guider(self, model, positive, negative, lora_stack, cfg, tau, **prompts):
        return (build.switch_guider(model, positive, negative, as_lora_stack(lora_stack), cfg, tau, **prompts),)


class LoRAtorioWeightMaps:
    """Reads the weight maps a LoRAtorio Guider recorded during a SamplerCustomAdvanced run."""

    CATEGORY = GUIDER_CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("weight_maps",)
    FUNCTION = "render"
    DESCRIPTION = (
        "The per-step routing weight maps of a LoRAtorio Guider (one colour per adapter, with a legend). Connect the "
        "guider and the sampler's output latent, so that this node runs after the sampling it shows."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "guider": ("GUIDER", tip("The LoRAtorio Guider used by SamplerCustomAdvanced.")),
                "samples": ("LATENT", tip("SamplerCustomAdvanced's output: only orders this node after the sampling.")),
            }
        }

    def render(self, guider, samples):
        weight_maps = build.weight_map_image(guider)
        return with_preview(weight_maps, (weight_maps,))


NODE_CLASS_MAPPINGS = {
    "LoRAtorioGuider": LoRAtorioGuiderNode,
    "LoRAtorioCompositeGuider": LoRACompositeGuiderNode,
    "LoRAtorioSwitchGuider": LoRASwitchGuiderNode,
    "LoRAtorioWeightMaps": LoRAtorioWeightMaps,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRAtorioGuider": "LoRAtorio Guider",
    "LoRAtorioCompositeGuider": "LoRA Composite Guider",
    "LoRAtorioSwitchGuider": "LoRA Switch Guider",
    "LoRAtorioWeightMaps": "LoRAtorio Weight Maps",
}
