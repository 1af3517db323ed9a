"""``LoRAtorioRegionMask``: confine one LoRA of a stack to a region of the image, or favour it there."""

from __future__ import annotations

import torch

from .. import loratorio_core as lc
from ..loratorio_comfy.adapters import LoRAInputError
from .common import CATEGORY, LORA_STACK, LoraStack, as_lora_stack, tip
from .schedule import check_position

MODES = ("hard", "soft")


class LoRARegionMask:
    """Attaches a MASK to one LoRA of a stack: where it may act (hard) or where it is favoured (soft)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_STACK,)
    RETURN_NAMES = ("lora_stack",)
    OUTPUT_TOOLTIPS = ("The same stack, with this LoRA's region attached.",)
    FUNCTION = "set_region"
    DESCRIPTION = (
        "Gives one LoRA its own region of the image, e.g. one character per side. hard: the LoRA acts only inside "
        "the mask (white); where no LoRA may act the base model draws. soft: the LoRA is favoured inside the mask "
        "by soft_strength and may still act elsewhere. LoRAs without a region stay global (styles). LoRAtorio and "
        "LoRA Composite use regions; LoRA Switch and LoRA Merge ignore them with a warning."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lora_stack": (LORA_STACK, tip("The stack holding the LoRA, e.g. from Multi-LoRA Loader.")),
                "lora_position": ("INT", tip("Which LoRA of the stack, counted from 1.", default=1, min=1, max=64)),
                "mask": ("MASK", tip("The region, white = inside; any size (it is resized to the latent).")),
                "mode": (list(MODES), tip("hard: only inside the mask; soft: favoured inside it.", default="hard")),
                "soft_strength": (
                    "FLOAT",
                    tip("soft mode: the log-weight added inside the mask (4 = about 55x).", default=4.0, min=0.0, max=50.0),
                ),
            }
        }

    def set_region(self, lora_stack, lora_position: int, mask, mode: str, soft_strength: float) -> tuple[LoraStack]:
        stack = as_lora_stack(lora_stack)
        check_position(stack, lora_position)
        name = stack[lora_position - 1].lora_name
        if mode not in MODES:
            raise LoRAInputError(f"Region Mask for '{name}': mode is {mode!r}; use one of {', '.join(MODES)}")
        if not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or not bool(torch.isfinite(mask).all()):
            raise LoRAInputError(f"Region Mask for '{name}': the mask must be a MASK of finite values (connect a mask node)")
        try:
            region = lc.Region(mask.detach().float().cpu().clamp(0.0, 1.0), hard=mode == "hard", strength=float(soft_strength))
        except ValueError as error:
            raise LoRAInputError(f"Region Mask for '{name}': {error}") from None
        return (LoraStack(stack, stack.windows, {**stack.regions, name: region}),)


NODE_CLASS_MAPPINGS = {"LoRAtorioRegionMask": LoRARegionMask}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRAtorioRegionMask": "LoRA Region Mask"}
