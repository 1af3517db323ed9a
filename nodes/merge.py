"""``LoRAMerge``: the baseline. Every LoRA of a stack merged into the weights, ComfyUI's way."""

from __future__ import annotations

import logging

import comfy.sd

from ..loratorio_comfy.adapter_set import lora_path
from ..loratorio_comfy.adapters import LORA_FILES, diffusion_patches, has_diffusion_layers, parse_lora, text_encoder_part
from .common import CATEGORY, LORA_STACK, as_lora_stack

LOG = logging.getLogger("comfyui-loratorio")


class LoRAMerge:
    """``W = W0 + sum_i s_i * dW_i`` through ``comfy.sd.load_lora_for_models``, like chained LoraLoaders."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with every LoRA merged.", "The CLIP with every LoRA's text-encoder weights merged.")
    FUNCTION = "merge"
    DESCRIPTION = (
        "The LoRA Merge baseline: adds every LoRA of the stack to the model at its strength, exactly as "
        "chaining ComfyUI's Load LoRA nodes would. Compare the composition samplers against it. Step windows "
        "(LoRA Step Window) and regions (LoRA Region Mask) cannot apply here: merged weights act at every step, "
        "everywhere, so they are ignored with a warning."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model."}),
                "lora_stack": (LORA_STACK, {"tooltip": "The LoRAs to merge, e.g. from Multi-LoRA Loader."}),
            },
            "optional": {"clip": ("CLIP", {"tooltip": "The text encoder; left out, only the model is patched."})},
        }

    def merge(self, model, lora_stack, clip=None):
        """What ``comfy.sd.load_lora_for_models`` does per LoRA, with the composition nodes' key map,
        strength bound and fit check, so Merge and the composition methods apply the same layers."""
        stack = as_lora_stack(lora_stack)
        if stack.windows or stack.regions:
            LOG.warning(
                "comfyui-loratorio: LoRA Merge ignores the step windows and regions of %s: merged weights act at every "
                "step, everywhere. Use a composition sampler to honour them.",
                ", ".join({**stack.windows, **stack.regions}),
            )
        for entry in stack:
            clip_strength = entry.clip_strength if clip is not None else 0.0
            lora = LORA_FILES.load(lora_path(entry.lora_name), entry.lora_name) if entry.model_strength or clip_strength else {}
            if entry.model_strength and (has_diffusion_layers(lora) or clip is None):
                parse_lora(lora, model.model, entry.lora_name)  # warns about layers that do not fit; none fitting is an error
                model = model.clone()
                model.add_patches(diffusion_patches(lora, model.model), entry.model_strength)
            text_encoder = text_encoder_part(lora)
            if clip_strength and text_encoder:
                _, clip = comfy.sd.load_lora_for_models(None, clip, text_encoder, 0.0, clip_strength)
        return (model, clip)


NODE_CLASS_MAPPINGS = {"LoRAtorioMerge": LoRAMerge}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRAtorioMerge": "LoRA Merge (baseline)"}
