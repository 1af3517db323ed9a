"""All-in-one sampler nodes: KSampler's inputs plus each method's parameters."""

from __future__ import annotations

from ..loratorio_comfy import build
from ..loratorio_comfy.sampling import sample_latent
from .common import (
    CATEGORY,
    adapter_prompt_inputs,
    as_lora_stack,
    composition_inputs,
    extension_inputs,
    ksampler_inputs,
    loratorio_inputs,
    routing_inputs,
    with_preview,
)
from .guiders import tau_input

SAMPLER_CATEGORY = f"{CATEGORY}/sampling"
KSAMPLER_KEYS = ("seed", "steps", "sampler_name", "scheduler", "denoise")


def split_ksampler_args(values: dict) -> tuple[dict, dict]:
    """(KSampler arguments, method arguments) from one node call's keyword arguments."""
    ksampler = {k: values.pop(k) for k in KSAMPLER_KEYS}
    return ksampler, values


class LoRAtorioSampler:
    CATEGORY = SAMPLER_CATEGORY
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("LATENT", "weight_maps")
    OUTPUT_TOOLTIPS = ("The denoised latent.", "Which adapter shaped which region, per step (one colour per adapter).")
    FUNCTION = "sample"
    DESCRIPTION = "KSampler with LoRAtorio composition of the LoRA stack; also outputs the routing weight maps."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {**composition_inputs(), **ksampler_inputs(), **loratorio_inputs()},
            "optional": {**adapter_prompt_inputs(), **routing_inputs(), **extension_inputs()},
        }

    def sample(self, model, positive, negative, lora_stack, cfg, latent_image, **values):
        ksampler, params = split_ksampler_args(values)
        guider = build.loratorio_guider(model, positive, negative, as_lora_stack(lora_stack), cfg, **params)
        latent = sample_latent(guider, latent_image, **ksampler)
        weight_maps = build.weight_map_image(guider)
        return with_preview(weight_maps, (latent, weight_maps))


class LoRACompositeSampler:
    CATEGORY = SAMPLER_CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = "KSampler with LoRA Composite: the mean of every adapter's cond and uncond each step."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**composition_inputs(), **ksampler_inputs()}, "optional": adapter_prompt_inputs()}

    def sample(self, model, positive, negative, lora_stack, cfg, latent_image, **values):
        ksampler, prompts = split_ksampler_args(values)
        guider = build.composite_guider(model, positive, negative, as_lora_stack(lora_stack), cfg, **prompts)
        return (sample_latent(guider, latent_image, **ksampler),)


class LoRASwitchSampler:
    CATEGORY = SAMPLER_CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = "KSampler with LoRA Switch: one adapter at a time, each for tau steps, in stack order."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {**composition_inputs(), **ksampler_inputs(), "tau": tau_input()},
            "optional": adapter_prompt_inputs(),
        }

    def sample(self, model, positive, negative, lora_stack, cfg, latent_image, tau, **values):
        ksampler, prompts = split_ksampler_args(values)
        guider = build.switch_guider(model, positive, negative, as_lora_stack(lora_stack), cfg, tau, **prompts)
        return (sample_latent(guider, latent_image, **ksampler),)


NODE_CLASS_MAPPINGS = {
    "LoRAtorioSampler": LoRAtorioSampler,
    "LoRAtorioCompositeSampler": LoRACompositeSampler,
    "LoRAtorioSwitchSampler": LoRASwitchSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRAtorioSampler": "LoRAtorio Sampler",
    "LoRAtorioCompositeSampler": "LoRA Composite Sampler",
    "LoRAtorioSwitchSampler": "LoRA Switch Sampler",
}
