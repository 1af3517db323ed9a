"""A set of LoRA adapters bound to one model: parsed files, strengths and the stacked per-row layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import folder_paths
import torch

from .adapters import LORA_FILES, LoRAFileError, ParsedLoRA, check_strength, parse_lora
from .row_lora import StackedLayer, stack_layer

LOG = logging.getLogger("comfyui-loratorio")


@dataclass(frozen=True)
class Adapter:
    name: str
    strength: float
    parsed: ParsedLoRA


def lora_path(name: str) -> str:
    """The full path of a LoRA in ComfyUI's ``loras`` folders, or an error that says where we looked."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras"))
        raise LoRAFileError(
            f"LoRA file '{name}' is not in ComfyUI's loras folders ({folders}). "
            "Put the file there (or fix the name) and press Refresh in the graph editor."
        )
    return path


class AdapterSet:
    """The adapters of one composition, in order, for one model (a ComfyUI ``BaseModel``)."""

    def __init__(self, model, entries: Sequence[tuple[str, float]]) -> None:
        if not entries:
            raise LoRAFileError(
                "no LoRA to compose: the LoRA stack is empty. Add at least one enabled LoRA to the Multi-LoRA Loader "
                "(for plain sampling without adapters use KSampler)."
            )
        seen: set[str] = set()
        adapters = []
        for name, strength in entries:
            if name in seen:
                raise LoRAFileError(f"LoRA '{name}' is in the stack twice; compose each LoRA once (raise its strength instead).")
            seen.add(name)
            strength = check_strength(name, strength)
            state = LORA_FILES.load(lora_path(name), name)
            adapters.append(Adapter(name, strength, parse_lora(state, model, name)))
        fallback = [a.name for a in adapters if a.parsed.needs_fallback]
        if fallback:
            raise LoRAFileError(
                f"LoRA {', '.join(repr(n) for n in fallback)} uses adapter types the per-row path does not apply yet "
                "(LoHa, LoKr, OFT, DoRA, Tucker LoCon or full diffs); use LoRA Merge for these files for now."
            )
        self.adapters: tuple[Adapter, ...] = tuple(adapters)
        self._model = model

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def stacked_layers(self) -> dict[str, StackedLayer]:
        """Every targeted layer with all adapters' deltas stacked (see :mod:`.row_lora`)."""
        diffusion_model = self._model.diffusion_model
        modules = sorted({m for a in self.adapters for m in a.parsed.factors})
        layers = {}
        for module_name in modules:
            module = diffusion_model.get_submodule(module_name)
            per_adapter = [[(f, a.strength) for f in a.parsed.factors.get(module_name, [])] for a in self.adapters]
            conv_kernel = tuple(module.weight.shape[2:]) if isinstance(module, torch.nn.Conv2d) else None
            layers[module_name] = stack_layer(per_adapter, module.weight.shape[0], conv_kernel)
        return layers
