"""Per-LoRA step windows and a total-strength budget for a ``LORA_STACK``."""

from __future__ import annotations

from .. import loratorio_core as lc
from ..loratorio_comfy.adapters import LoRAInputError
from .common import CATEGORY, LORA_STACK, LoraStack, LoraStackEntry, as_lora_stack, tip


def check_position(stack: LoraStack, lora_position: int) -> None:
    if not 1 <= lora_position <= len(stack):
        raise LoRAInputError(
            f"lora_position is {lora_position}, but the stack holds {len(stack)} LoRA(s)"
            + (f" ({', '.join(e.lora_name for e in stack)})" if stack else "")
            + f"; set it between 1 and {max(1, len(stack))}."
        )


class LoRAStepWindow:
    """Limits one LoRA of a stack to a fraction of the sampling steps."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_STACK,)
    RETURN_NAMES = ("lora_stack",)
    OUTPUT_TOOLTIPS = ("The same stack, with this LoRA acting only inside its window.",)
    FUNCTION = "set_window"
    DESCRIPTION = (
        "Lets one LoRA act only from start to end, as fractions of the sampling steps: e.g. 0 to 0.4 for a "
        "composition or pose LoRA, 0.6 to 1 for a detail LoRA. LoRAtorio, Composite and Switch honour it: outside "
        "its window a LoRA costs no rows and adds nothing. LoRA Merge cannot (merged weights act at every step)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.05}
        return {
            "required": {
                "lora_stack": (LORA_STACK, tip("The stack holding the LoRA, e.g. from Multi-LoRA Loader.")),
                "lora_position": (
                    "INT",
                    tip("Which LoRA of the stack, counted from 1.", default=1, min=1, max=64),
                ),
                "start": ("FLOAT", tip("Fraction of the steps at which the LoRA starts acting.", default=0.0, **fraction)),
                "end": ("FLOAT", tip("Fraction of the steps at which it stops (1 = to the end).", default=1.0, **fraction)),
            }
        }

    def set_window(self, lora_stack, lora_position: int, start: float, end: float) -> tuple[LoraStack]:
        stack = as_lora_stack(lora_stack)
        check_position(stack, lora_position)
        try:
            window = lc.StepWindow(float(start), float(end))
        except ValueError as error:
            raise LoRAInputError(f"Step Window for '{stack[lora_position - 1].lora_name}': {error}") from None
        return (LoraStack(stack, {**stack.windows, stack[lora_position - 1].lora_name: window}, stack.regions),)


class LoRAStrengthBudget:
    """Scales a stack's strengths down when together they exceed a budget."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_STACK,)
    RETURN_NAMES = ("lora_stack",)
    OUTPUT_TOOLTIPS = ("The stack with every strength scaled by the same factor, if its total was over the budget.",)
    FUNCTION = "apply_budget"
    DESCRIPTION = (
        "Keeps a stack from over-baking: when the absolute model strengths add up to more than total_strength, every "
        "strength (model and CLIP) is scaled by total_strength / sum, so 4 LoRAs at 0.6 with a budget of 1.6 run at "
        "0.4 each. A stack within the budget passes unchanged. Step windows and regions are kept."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        budget = tip("The most the absolute strengths may add up to.", default=2.0, min=0.01, max=100.0, step=0.05)
        return {
            "required": {
                "lora_stack": (LORA_STACK, tip("The LoRAs, e.g. from Multi-LoRA Loader.")),
                "total_strength": ("FLOAT", budget),
            }
        }

    def apply_budget(self, lora_stack, total_strength: float) -> tuple[LoraStack]:
        stack = as_lora_stack(lora_stack)
        try:
            factor = lc.budget_factor([e.model_strength for e in stack], float(total_strength))
        except ValueError as error:
            raise LoRAInputError(f"Strength Budget: {error}") from None
        entries = [LoraStackEntry(e.lora_name, e.model_strength * factor, e.clip_strength * factor) for e in stack]
        return (LoraStack(entries, stack.windows, stack.regions),)


NODE_CLASS_MAPPINGS = {"LoRAtorioStepWindow": LoRAStepWindow, "LoRAtorioStrengthBudget": LoRAStrengthBudget}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRAtorioStepWindow": "LoRA Step Window", "LoRAtorioStrengthBudget": "LoRA Strength Budget"}
