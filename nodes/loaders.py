"""``MultiLoRALoader``: pick several LoRA files with a strength and an on/off each."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from ..loratorio_comfy.adapter_set import lora_path
from ..loratorio_comfy.adapters import SAFETENSORS_SUFFIXES
from ..loratorio_comfy.lora_metadata import MetadataError, read_metadata, trigger_words
from .common import CATEGORY, LORA_STACK, NO_LORA, LoraStackEntry, as_lora_stack

MAX_LORA_SLOTS = 8


def lora_file_names() -> list[str]:
    """The safetensors files of ComfyUI's loras folders: the pack never unpickles ``.pt``/``.ckpt``."""
    return [name for name in folder_paths.get_filename_list("loras") if name.lower().endswith(SAFETENSORS_SUFFIXES)]


class MultiLoRALoader:
    """Collects up to ``MAX_LORA_SLOTS`` LoRAs (plus an incoming ``LORA_STACK``) into one stack."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_STACK, "STRING")
    RETURN_NAMES = ("lora_stack", "trigger_words")
    OUTPUT_TOOLTIPS = (
        "The enabled LoRAs as (lora_name, model_strength, clip_strength) rows, in slot order.",
        "The trigger words of every LoRA of the stack, in order, comma-separated: put them into the prompt.",
    )
    FUNCTION = "collect"
    DESCRIPTION = (
        "Choose the LoRA adapters to compose, each with a strength and an on/off switch. "
        "Rows from an incoming LORA_STACK come first."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        names = [NO_LORA, *lora_file_names()]
        optional: dict[str, tuple] = {
            "lora_stack": (LORA_STACK, {"tooltip": "LoRAs from another loader node, placed before this node's rows."}),
        }
        for slot in range(1, MAX_LORA_SLOTS + 1):
            optional[f"lora_{slot}"] = (names, {"default": NO_LORA, "tooltip": f"LoRA file of row {slot}."})
            optional[f"strength_{slot}"] = (
                "FLOAT",
                {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": f"Strength of row {slot} (model and CLIP)."},
            )
            optional[f"enabled_{slot}"] = ("BOOLEAN", {"default": True, "tooltip": f"Use row {slot}."})
        return {"required": {}, "optional": optional}

    def collect(self, lora_stack: object = None, **rows: object) -> tuple[list[LoraStackEntry]]:
        stack = as_lora_stack(lora_stack)
        for entry in stack:
            lora_path(entry.lora_name)
        for slot in range(1, MAX_LORA_SLOTS + 1):
            name = rows.get(f"lora_{slot}", NO_LORA)
            if name in (None, NO_LORA) or not rows.get(f"enabled_{slot}", True):
                continue
            lora_path(str(name))
            strength = float(rows.get(f"strength_{slot}", 1.0))  # type: ignore[arg-type]
            stack.append(LoraStackEntry(str(name), strength, strength))
        return (stack, stack_trigger_words(stack))


def stack_trigger_words(stack: list[LoraStackEntry]) -> str:
    """Every LoRA's trigger words from its file's metadata, in stack order, without repeats."""
    words: list[str] = []
    for entry in stack:
        try:
            found, _ = trigger_words(read_metadata(Path(lora_path(entry.lora_name))))
        except (MetadataError, OSError):
            continue  # a file without readable metadata has no trigger words to offer
        words += [word for word in found if word not in words]
    return ", ".join(words)


NODE_CLASS_MAPPINGS = {"LoRAtorioMultiLoRALoader": MultiLoRALoader}
NODE_DISPLAY_NAME_MAPPINGS = {"LoRAtorioMultiLoRALoader": "Multi-LoRA Loader"}
