"""Types and helpers the node modules share."""

from __future__ import annotations

from typing import NamedTuple

CATEGORY = "loratorio"
LORA_STACK = "LORA_STACK"
NO_LORA = "None"


class LoraStackEntry(NamedTuple):
    """One row of a ``LORA_STACK``, the list type other LoRA packs exchange."""

    lora_name: str
    model_strength: float
    clip_strength: float


def as_lora_stack(value: object) -> list[LoraStackEntry]:
    """Validate a ``LORA_STACK`` from any pack: a list of ``(name, model, clip)`` triples."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"LORA_STACK must be a list of (lora_name, model_strength, clip_strength), got {type(value).__name__}")
    entries = []
    for position, row in enumerate(value, start=1):
        if not isinstance(row, (list, tuple)) or len(row) != 3:
            raise ValueError(f"LORA_STACK row {position} is {row!r}; each row must be (lora_name, model_strength, clip_strength)")
        name, model_strength, clip_strength = row
        if not isinstance(name, str) or not name:
            raise ValueError(f"LORA_STACK row {position} has no LoRA file name: {row!r}")
        try:
            entries.append(LoraStackEntry(name, float(model_strength), float(clip_strength)))
        except (TypeError, ValueError):
            raise ValueError(f"LORA_STACK row {position} has non-numeric strengths: {row!r}") from None
    return entries
