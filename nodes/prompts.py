"""``MultiLoRATextEncode``: the prompt encoded once per LoRA with that LoRA's text-encoder weights."""

from __future__ import annotations

from ..loratorio_comfy.adapters import LoRAInputError
from ..loratorio_comfy.prompts import encode_per_adapter
from .common import CATEGORY, LORA_CONDITIONING, LORA_STACK, as_lora_stack, tip


class MultiLoRATextEncode:
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_CONDITIONING,)
    RETURN_NAMES = ("adapter_conditioning",)
    OUTPUT_TOOLTIPS = ("One conditioning per LoRA, in stack order; connect to adapter_positive or adapter_negative.",)
    FUNCTION = "encode"
    DESCRIPTION = (
        "Encodes the prompt once per LoRA with that LoRA's text-encoder weights (at its clip strength). Optional: "
        "without it every adapter sees the base encoding, which suits LoRAs that train only the diffusion model."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("CLIP", tip("The base text encoder.")),
                "text": ("STRING", tip("The prompt.", multiline=True, dynamicPrompts=True)),
                "lora_stack": (LORA_STACK, tip("The same stack the composition node gets.")),
            }
        }

    def encode(self, clip, text, lora_stack):
        stack = as_lora_stack(lora_stack)
        if not stack:
            raise LoRAInputError(
                "Multi-LoRA Text Encode: the LoRA stack is empty, so there is nothing to encode per LoRA. Connect the "
                "same stack the composition node gets (e.g. from Multi-LoRA Loader)."
            )
        return (encode_per_adapter(clip, text, stack),)


NODE_CLASS_MAPPINGS = {"LoRAtorioMultiLoRATextEncode": MultiLoRATextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRAtorioMultiLoRATextEncode": "Multi-LoRA Text Encode (per adapter)"}
