"""A set of LoRA adapters bound to one model: parsed files, strengths and the per-row deltas."""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import folder_paths
import torch

from .adapters import DIFFUSION_PREFIX, LORA_FILES, LoRAInputError, ParsedLoRA, check_strength, dense_delta, parse_lora
from .row_lora import DenseDelta, LayerDeltas, LowRankGroup, RowLayers, group_low_rank

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
        raise LoRAInputError(
            f"LoRA file '{name}' is not in ComfyUI's loras folders (models/loras and any loras folder of "
            "extra_model_paths.yaml). Put the file there (or fix the name) and press Refresh in the graph editor."
        )
    return path


def check_model_class(model) -> None:
    """Per-row deltas hook ComfyUI's own layers; a diffusion model from another package (Nunchaku's
    SVDQuant models and the like) has layers they cannot reach, so it is refused by name."""
    diffusion_model = model.diffusion_model
    kind = type(diffusion_model)
    if not kind.__module__.startswith("comfy."):
        raise LoRAInputError(
            f"this MODEL's diffusion model is {kind.__module__}.{kind.__qualname__}, not one of ComfyUI's own model "
            "classes (quantised models such as Nunchaku's are); the composition nodes cannot apply LoRAs to it. Use a "
            "regular checkpoint, or that model's own LoRA loader."
        )


# the row layers of the last adapter sets used: a second run with the same LoRAs rebuilds nothing
ROW_LAYERS: OrderedDict[Hashable, RowLayers] = OrderedDict()
MAX_CACHED_SETS = 2


class AdapterSet:
    """The adapters of one composition, in order, for one model (a ComfyUI ``ModelPatcher``)."""

    def __init__(self, model_patcher, entries: Sequence[tuple[str, float]]) -> None:
        model = model_patcher.model
        check_model_class(model)
        if not entries:
            raise LoRAInputError(
                "no LoRA to compose: the LoRA stack is empty. Add at least one enabled LoRA to the Multi-LoRA Loader "
                "(for plain sampling without adapters use KSampler)."
            )
        seen: set[str] = set()
        adapters = []
        files = []
        for name, strength in entries:
            if name in seen:
                raise LoRAInputError(f"LoRA '{name}' is in the stack twice; compose each LoRA once (raise its strength instead).")
            seen.add(name)
            strength = check_strength(name, strength)
            path = lora_path(name)
            parsed = parse_lora(LORA_FILES.load(path, name), model, name)
            files.append((path, LORA_FILES.stamp(path), strength))
            if parsed.dense_patches:
                LOG.info(
                    "comfyui-loratorio: LoRA '%s' has %s parts; they are applied per row as exact dense deltas "
                    "(ComfyUI's merge math, built once per run: more memory than low-rank LoRA parts)",
                    name,
                    "/".join(parsed.dense_kinds),
                )
            adapters.append(Adapter(name, strength, parsed))
        self.adapters: tuple[Adapter, ...] = tuple(adapters)
        self._model_patcher = model_patcher
        # what the deltas depend on: the model, its patcher's own patches, each file as loaded, each strength
        self.key: Hashable = (id(model), model_patcher.patches_uuid, tuple(files))

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @functools.cached_property
    def dense_adapters(self) -> set[int]:
        """The indices of adapters with dense deltas (built against the patcher's own weights)."""
        return {index for index, adapter in enumerate(self.adapters) if adapter.parsed.dense_patches}

    @property
    def row_layers(self) -> RowLayers:
        """Every targeted layer's per-row deltas (see :mod:`.row_lora`), built on first use and kept
        across runs (with their copies on the compute device) while the LoRAs and the model stay."""
        cached = ROW_LAYERS.get(self.key)
        if cached is None:
            cached = ROW_LAYERS[self.key] = self._build_row_layers()
            while len(ROW_LAYERS) > MAX_CACHED_SETS:
                ROW_LAYERS.popitem(last=False)
        ROW_LAYERS.move_to_end(self.key)
        return cached

    def _build_row_layers(self) -> RowLayers:
        diffusion_model = self._model_patcher.model.diffusion_model
        modules = sorted({m for a in self.adapters for m in (*a.parsed.factors, *a.parsed.dense_patches)})
        key_patches = self._model_patcher.get_key_patches(DIFFUSION_PREFIX) if self.dense_adapters else {}
        layers = {}
        for module_name in modules:
            module = diffusion_model.get_submodule(module_name)
            layer = LayerDeltas(self._low_rank(module_name, module), self._dense(module_name, key_patches))
            if layer.low_rank or layer.dense:
                layers[module_name] = layer
        return RowLayers(layers)

    def _low_rank(self, module_name: str, module: torch.nn.Module) -> tuple[LowRankGroup, ...]:
        per_adapter = [[(f, a.strength) for f in a.parsed.factors.get(module_name, [])] for a in self.adapters]
        if not any(per_adapter):
            return ()
        conv_kernel = tuple(module.weight.shape[2:]) if isinstance(module, torch.nn.Conv2d) else None
        return group_low_rank(per_adapter, module.weight.shape[0], conv_kernel)

    def _dense(self, module_name: str, key_patches: dict[str, list]) -> dict[int, DenseDelta]:
        """Dense deltas against the weights this patcher samples with: its original weights (not
        whatever another clone left merged in the shared model) plus its own patches."""
        dense = {}
        for index, adapter in enumerate(self.adapters):
            patches = adapter.parsed.dense_patches.get(module_name, [])
            deltas = {}
            for parameter in ("weight", "bias"):
                own = [p for p in patches if p.parameter == parameter]
                key = f"{DIFFUSION_PREFIX}{module_name}.{parameter}"
                if own and key in key_patches:
                    deltas[parameter] = dense_delta(own, key_patches[key], adapter.strength, key)
            if deltas.get("weight") is not None or deltas.get("bias") is not None:
                dense[index] = DenseDelta(deltas.get("weight"), deltas.get("bias"))
        return dense
