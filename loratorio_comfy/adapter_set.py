"""A set of LoRA adapters bound to one model: parsed files, strengths and the stacked per-row layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import folder_paths
import torch

from .adapters import LORA_FILES, LoRAInputError, ParsedLoRA, check_strength, parse_lora
from .row_lora import StackedLayer, stack_layer

LOG = logging.getLogger("comfyui-loratorio")


@dataclass(frozen=True)
class Adapter:
    name: str
    strength: float
    parsed: ParsedLoRA
    state: dict[str, torch.Tensor]  # the file's tensors, for ComfyUI's hooks path

    @property
    def via_hooks(self) -> bool:
        """Adapters with parts the per-row path cannot express run whole through ComfyUI's hooks."""
        return self.parsed.needs_fallback


def lora_path(name: str) -> str:
    """The full path of a LoRA in ComfyUI's ``loras`` folders, or an error that says where we looked."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras"))
        raise LoRAInputError(
            f"LoRA file '{name}' is not in ComfyUI's loras folders ({folders}). "
            "Put the file there (or fix the name) and press Refresh in the graph editor."
        )
    return path


class AdapterSet:
    """The adapters of one composition, in order, for one model (a ComfyUI ``BaseModel``)."""

    def __init__(self, model, entries: Sequence[tuple[str, float]]) -> None:
        if not entries:
            raise LoRAInputError(
                "no LoRA to compose: the LoRA stack is empty. Add at least one enabled LoRA to the Multi-LoRA Loader "
                "(for plain sampling without adapters use KSampler)."
            )
        seen: set[str] = set()
        adapters = []
        for name, strength in entries:
            if name in seen:
                raise LoRAInputError(f"LoRA '{name}' is in the stack twice; compose each LoRA once (raise its strength instead).")
            seen.add(name)
            strength = check_strength(name, strength)
            state = LORA_FILES.load(lora_path(name), name)
            adapter = Adapter(name, strength, parse_lora(state, model, name), state)
            if adapter.via_hooks:
                kinds = sorted({getattr(p, "name", type(p).__name__) for p in adapter.parsed.fallback_patches.values()})
                LOG.info(
                    "comfyui-loratorio: LoRA '%s' has %s parts the batched per-row path does not apply; it runs through "
                    "ComfyUI's hooks path (exact, but its rows take forwards of their own)",
                    name,
                    "/".join(kinds),
                )
            adapters.append(adapter)
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
        batched = [a if not a.via_hooks else None for a in self.adapters]
        modules = sorted({m for a in batched if a is not None for m in a.parsed.factors})
        layers = {}
        for module_name in modules:
            module = diffusion_model.get_submodule(module_name)
            per_adapter = [[(f, a.strength) for f in a.parsed.factors.get(module_name, [])] if a else [] for a in batched]
            conv_kernel = tuple(module.weight.shape[2:]) if isinstance(module, torch.nn.Conv2d) else None
            layers[module_name] = stack_layer(per_adapter, module.weight.shape[0], conv_kernel)
        return layers
