"""Reading LoRA files into per-row adapter deltas, through ComfyUI's own parser.

ComfyUI's key maps (``comfy.lora.model_lora_keys_unet``), format conversion
(``comfy.lora_convert.convert_lora``) and adapter parser (``comfy.lora.load_lora``) decide which
layer each tensor of a file belongs to, so every key style ComfyUI reads (kohya, diffusers/PEFT,
LyCORIS, ComfyUI, fused-qkv slices of SD3 and Flux, conversion functions) is read the same way here.

Plain LoRA / LoCon becomes low-rank factors. Every other adapter type (LoHa, LoKr, OFT/BOFT, DoRA,
GLoRA, Tucker LoCon, full diffs) is kept as ComfyUI patches, turned into an exact dense delta by
ComfyUI's own merge math (:func:`dense_delta`). Nothing goes through ComfyUI's hooks path, which
newer ComfyUI does not support under dynamic VRAM.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter
import safetensors
import torch

LOG = logging.getLogger("comfyui-loratorio")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
DIFFUSION_PREFIX = "diffusion_model."


class LoRAInputError(ValueError):
    """A LoRA file or stack cannot be used; the message names the problem and the fix."""


# ComfyUI reports an error's type as "<module>.<name>"; a custom node's module is named after its
# install path, which must not reach API clients.
LoRAInputError.__module__ = "loratorio"

# Strengths people use sit within +-10 (the loader's widget range); past this bound a LoRA only
# overflows the activations into a black image.
MAX_STRENGTH = 100.0


@dataclass(frozen=True)
class LowRankFactor:
    """``delta_W = scale * up @ down`` for one layer, optionally on a slice of its output rows.

    ``down``: ``[rank, in]`` (linear) or ``[rank, in, kh, kw]`` (conv); ``up``: ``[out, rank]``
    (a conv's 1x1 up is flattened). ``scale`` is ``alpha / rank`` (1 without alpha); the user's
    strength is applied later. ``rows`` is ``(start, size)`` of a fused output, or None.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    rows: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class WeightPatch:
    """One ComfyUI patch of a parameter (``weight`` or ``bias``) of a diffusion-model module (its
    name is the key it is filed under in ``ParsedLoRA.dense_patches``), applied per row as the
    exact delta ComfyUI's merge would make (:func:`dense_delta`)."""

    parameter: str  # "weight" or "bias"
    adapter: object  # a comfy.weight_adapter adapter, or a raw ("diff", ...) patch
    offset: tuple[int, int, int] | None
    function: object | None  # ComfyUI's conversion function for the key, if any

    @property
    def kind(self) -> str:
        return getattr(self.adapter, "name", None) or str(self.adapter[0] if isinstance(self.adapter, tuple) else "diff")


@dataclass
class ParsedLoRA:
    """A LoRA file read against one model: low-rank factors and dense patches, by module name."""

    name: str
    factors: dict[str, list[LowRankFactor]] = field(default_factory=dict)  # module name -> factors
    dense_patches: dict[str, list[WeightPatch]] = field(default_factory=dict)  # module name -> patches
    matched: int = 0
    total: int = 0
    unsupported: list[str] = field(default_factory=list)  # targets no per-row form can apply
    absent: list[str] = field(default_factory=list)  # targets the model has no parameter for

    @property
    def dense_kinds(self) -> list[str]:
        return sorted({patch.kind for patches in self.dense_patches.values() for patch in patches})


TEXT_ENCODER_KEY = re.compile(r"^(lora_te\d*_|text_encoder(_\d)?\.|text_encoders\.)")


LAYER_SUFFIX_MARKERS = (
    ".lora_", "_lora.", ".lora.", ".alpha", ".hada_", ".lokr_", ".oft_", ".diff", ".dora_scale", ".w_norm", ".b_norm",
    ".rescale", ".scalar",
)  # fmt: skip
GLORA_TENSOR = re.compile(r"\.[ab][12]\.weight$")  # LyCORIS GLoRA's a1, a2, b1, b2


def _lora_stems(state: dict[str, torch.Tensor]) -> set[str]:
    """The distinct diffusion-model layer names of a file: keys without their ``.lora_*``/``.alpha``
    style suffix; text-encoder layers (read by the CLIP side) are not counted."""
    stems = set()
    for key in state:
        if TEXT_ENCODER_KEY.match(key):
            continue
        for marker in LAYER_SUFFIX_MARKERS:
            if marker in key:
                stems.add(key.split(marker)[0])
                break
        else:
            glora = GLORA_TENSOR.search(key)
            stems.add(key[: glora.start()] if glora else key.rsplit(".", 1)[0])
    return stems


# the width of cross-attention keys (the text encoder's output) tells the UNet families apart
CONTEXT_WIDTHS = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}
CROSS_ATTENTION_KEY = re.compile(r"attn2.?to_k.*(lora_down|lora_A|lora\.down)")


def guess_file_family(keys: list[str], state: dict[str, torch.Tensor] | None = None) -> str:
    """A human description of which model family a LoRA's keys (and shapes) look like, for messages."""
    for key in keys if state is not None else ():
        if CROSS_ATTENTION_KEY.search(key) and state[key].ndim == 2 and state[key].shape[1] in CONTEXT_WIDTHS:
            return CONTEXT_WIDTHS[state[key].shape[1]]
    text = " ".join(keys[:4000])
    if "double_blocks" in text or "single_blocks" in text or "single_transformer_blocks" in text:
        return "Flux"
    if "joint_blocks" in text or "context_block" in text or ("transformer_blocks" in text and "add_q_proj" in text):
        return "SD3"
    if "lora_te2_" in text or "text_encoder_2" in text or "label_emb" in text or "add_embedding" in text:
        return "SDXL"
    if "down_blocks" in text or "input_blocks" in text or "lora_unet_" in text:
        return "an SD1.5/SDXL-style UNet"
    return "an unknown architecture"


def model_family_name(model) -> str:
    return type(model.model_config).__name__


def without_folders(text: str, path: str) -> str:
    """``text`` (e.g. a loader's error) with the file's folder removed: messages reach API clients."""
    folder = os.path.dirname(path)
    return text.replace(folder + os.sep, "").replace(folder, "") if folder else text


def read_safetensors(path: str, display_name: str) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file; anything else is refused (never unpickled). A file with NaN or
    infinite values is refused too: it can only give a black image."""
    if not path.lower().endswith(SAFETENSORS_SUFFIXES):
        raise LoRAInputError(
            f"LoRA '{display_name}' is not a .safetensors file. Pickled formats (.ckpt, .pt, .bin) can run code when "
            "loaded and are refused; convert the file to .safetensors."
        )
    try:
        state = comfy.utils.load_torch_file(path, safe_load=True)
    # newer ComfyUI parses safetensors itself (with comfy-aimdo) and raises struct.error / KeyError
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError, struct.error, KeyError, TypeError) as error:
        reason = without_folders(str(error), path).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoRAInputError(
            f"LoRA '{display_name}' could not be read as safetensors ({reason}); the file is truncated or corrupt. "
            "Download or copy it again."
        ) from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoRAInputError(
                f"LoRA '{display_name}' holds NaN or infinite values (first in '{key}'); it can only give a black image. "
                "The file was saved from a diverged training run or is damaged: use another checkpoint of the LoRA."
            )
    return state


def _as_factor(adapter: object, target_shape: torch.Size, offset: tuple[int, int, int] | None) -> LowRankFactor | None:
    """The low-rank per-row form of a ComfyUI adapter, or None when it needs the dense form.
    Called after :func:`lora_shape_mismatch` has set aside layers whose widths do not fit."""
    if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    if offset is not None and offset[0] != 0:
        return None
    rank = down.shape[0]
    out_features = target_shape[0] if offset is None else offset[2]
    if up.shape[0] != out_features or down.ndim not in (2, 4) or up.flatten(1).shape[1] != rank:
        return None
    if len(target_shape) not in (2, 4):  # Conv1d/Conv3d layers take the dense form
        return None
    if down.ndim == 4 and (len(target_shape) != 4 or down.shape[2:] != target_shape[2:]):
        return None
    scale = float(alpha) / rank if alpha is not None else 1.0
    return LowRankFactor(
        down=down.float(), up=up.flatten(1).float(), scale=scale, rows=None if offset is None else (offset[1], offset[2])
    )


def _loha_as_factor(adapter: object, target_shape: torch.Size, offset: tuple[int, int, int] | None) -> LowRankFactor | None:
    """A LoHa's low-rank form when it is smaller than the weight, else None (the dense form).

    LoHa's ``dW = (A1 @ B1) * (A2 @ B2)`` (element-wise; ``A [out, r]``, ``B [r, in]``) is the
    rank ``r1 * r2`` product ``up @ down`` with ``up[:, i*r2 + j] = A1[:, i] * A2[:, j]`` and
    ``down[i*r2 + j] = B1[i] * B2[j]`` (a Khatri-Rao product), since
    ``sum_ij A1[o,i] A2[o,j] B1[i,k] B2[j,k] = (A1 @ B1)[o,k] * (A2 @ B2)[o,k]``."""
    if not isinstance(adapter, comfy.weight_adapter.LoHaAdapter) or offset is not None or len(target_shape) not in (2, 4):
        return None
    w1a, w1b, alpha, w2a, w2b, t1, _, dora_scale = adapter.weights[:8]
    if t1 is not None or dora_scale is not None or w1b.ndim != 2 or w2b.ndim != 2:
        return None
    out_features, in_flat = target_shape[0], math.prod(target_shape[1:])
    rank = w1b.shape[0] * w2b.shape[0]
    if (w1a.shape[0], w2a.shape[0], w1b.shape[1], w2b.shape[1]) != (out_features, out_features, in_flat, in_flat):
        return None
    if rank * (in_flat + out_features) >= in_flat * out_features:
        return None
    up = (w1a.float()[:, :, None] * w2a.float()[:, None, :]).reshape(out_features, rank)
    down = (w1b.float()[:, None, :] * w2b.float()[None, :, :]).reshape(rank, *target_shape[1:])
    scale = float(alpha) / w1b.shape[0] if alpha is not None else 1.0
    return LowRankFactor(down=down, up=up, scale=scale)


def split_target(target: object) -> tuple[str, tuple[int, int, int] | None, object | None]:
    """``(key, offset, function)`` of a ``load_lora`` target: a key, ``(key, offset)`` or
    ``(key, offset, function)`` (the form ``ModelPatcher.add_patches`` reads)."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], target[2] if len(target) > 2 else None


PARAMETER_SUFFIXES = (".weight", ".bias")
# layers whose output is linear in their weight and bias, so a row's delta is just added to it
PER_ROW_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def lora_shape_mismatch(adapter: object, weight_shape: torch.Size, offset: tuple[int, int, int] | None) -> str | None:
    """For a plain LoRA, how its shapes fail to fit the layer (as a phrase), or None when they fit."""
    if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down = adapter.weights[0], adapter.weights[1]
    out_features = weight_shape[0] if offset is None or offset[0] != 0 else offset[2]
    in_features = weight_shape[1] if len(weight_shape) > 1 else None
    if adapter.weights[3] is None and in_features is not None and down.ndim >= 2 and down.shape[1] != in_features:
        return f"the layer takes {in_features} inputs, the file's LoRA {down.shape[1]}"
    if up.shape[0] != out_features:
        return f"the layer gives {out_features} outputs, the file's LoRA {up.shape[0]}"
    return None


def lora_key_map(model) -> dict[str, object]:
    """ComfyUI's key map for ``model``, plus the UNet attention names diffusers' own training scripts
    write (``unet.<block>.attn1.to_q``): ComfyUI maps them only in the attention-processor form
    (``attn1.processor.to_q``) and would drop every attention layer of such a file."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    config = model.model_config.unet_config
    if "num_res_blocks" not in config or not hasattr(comfy.utils, "unet_to_diffusers"):
        return key_map
    for name, unet_key in comfy.utils.unet_to_diffusers(config).items():
        if name.endswith(".weight") and ".to_" in name:
            for prefix in ("", "unet."):
                key_map.setdefault(prefix + name[: -len(".weight")], f"{DIFFUSION_PREFIX}{unet_key}")
    return key_map


def text_encoder_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-encoder tensors of a LoRA file (what the CLIP side reads)."""
    return {key: value for key, value in state.items() if TEXT_ENCODER_KEY.match(key)}


def has_diffusion_layers(state: dict[str, torch.Tensor]) -> bool:
    return any(not TEXT_ENCODER_KEY.match(key) for key in state)


def diffusion_patches(state: dict[str, torch.Tensor], model) -> dict[object, object]:
    """ComfyUI's patches of ``state`` for ``model``'s diffusion model, keyed as ``add_patches`` reads them."""
    return comfy.lora.load_lora(comfy.lora_convert.convert_lora(state), lora_key_map(model), log_missing=False)


def parse_lora(state: dict[str, torch.Tensor], model, display_name: str) -> ParsedLoRA:
    """Split a LoRA state dict into low-rank factors and dense patches for ``model`` (a BaseModel).

    Layers whose shapes do not fit the model are skipped with one warning that names the file, a
    layer and the family the file looks made for (ComfyUI's LoraLoader skips them too); a file none
    of whose layers fit is an error.
    """
    if state and not has_diffusion_layers(state):
        raise LoRAInputError(
            f"LoRA '{display_name}' holds only text-encoder weights, no diffusion-model layers, so composing it changes "
            "nothing. Apply it with Multi-LoRA Text Encode (connect its output to adapter_positive) or with Load LoRA."
        )
    patches = diffusion_patches(state, model)
    model_state = model.state_dict()
    parsed = ParsedLoRA(name=display_name, total=len(_lora_stems(state)), matched=len(patches))
    mismatched: list[tuple[str, str]] = []
    for target, adapter in patches.items():
        key, offset, function = split_target(target)
        weight = model_state.get(key)
        if weight is None:
            parsed.absent.append(key)
            continue
        if not key.startswith(DIFFUSION_PREFIX) or not key.endswith(PARAMETER_SUFFIXES):
            parsed.unsupported.append(key)
            continue
        mismatch = lora_shape_mismatch(adapter, weight.shape, offset) if key.endswith(".weight") else None
        if mismatch is not None:
            mismatched.append((key[len(DIFFUSION_PREFIX) :], mismatch))
            continue
        module, parameter = key[len(DIFFUSION_PREFIX) :].rsplit(".", 1)
        if not isinstance(model.diffusion_model.get_submodule(module), PER_ROW_MODULES):
            parsed.unsupported.append(key)
            continue
        factor = None
        if parameter == "weight" and function is None:
            factor = _as_factor(adapter, weight.shape, offset) or _loha_as_factor(adapter, weight.shape, offset)
        if factor is not None:
            parsed.factors.setdefault(module, []).append(factor)
        else:
            parsed.dense_patches.setdefault(module, []).append(WeightPatch(parameter, adapter, offset, function))
    family = model_family_name(model)
    if not patches or len(mismatched) == len(patches):
        sample = ", ".join(sorted(state)[:3])
        what = "fits none" if patches else "matches none"
        raise LoRAInputError(
            f"LoRA '{display_name}' {what} of the layers of this model ({family}); the file looks made for "
            f"{guess_file_family(sorted(state), state)} (keys like {sample}). Use a LoRA trained for this model's family."
        )
    if mismatched:
        layer, reason = mismatched[0]
        LOG.warning(
            "comfyui-loratorio: LoRA '%s' does not fit %d of its %d layers in this model (%s), e.g. %s: %s. The file "
            "looks made for %s. Those layers are skipped, as ComfyUI's LoraLoader skips them; use a LoRA trained for %s.",
            display_name,
            len(mismatched),
            len(patches),
            family,
            layer,
            reason,
            guess_file_family(sorted(state), state),
            family,
        )
    if parsed.absent:
        # e.g. ComfyUI maps a full diff's bias (diff_b) on a slice of a fused weight to the key "().bias"
        LOG.warning(
            "comfyui-loratorio: LoRA '%s' patches %d parameters this model does not have (e.g. %s); they are skipped, "
            "as ComfyUI's LoraLoader skips them (its log says NOT LOADED)",
            display_name,
            len(parsed.absent),
            ", ".join(parsed.absent[:3]),
        )
    if parsed.unsupported:
        LOG.warning(
            "comfyui-loratorio: LoRA '%s' patches %d parameters that are not the weight or bias of a linear or "
            "convolution layer (e.g. %s); the per-row path cannot apply them and skips them",
            display_name,
            len(parsed.unsupported),
            ", ".join(parsed.unsupported[:3]),
        )
    if parsed.matched < parsed.total:
        LOG.warning(
            "comfyui-loratorio: LoRA '%s' matched %d of its %d layers to this model (%s); the rest is ignored",
            display_name,
            parsed.matched,
            parsed.total,
            model_family_name(model),
        )
    return parsed


def dense_delta(patches: list[WeightPatch], key_patches: list, strength: float, key: str) -> torch.Tensor | None:
    """``delta = merge(W, patches) - W`` with ComfyUI's own merge math (``comfy.lora.calculate_weight``)
    in float32, as ``ModelPatcher`` merges: exactly what LoraLoader adds to the parameter, for
    any adapter type. ``W`` is the original weight with the model patcher's own patches applied
    (``key_patches`` is ``[(original, convert), *patches]`` from ``ModelPatcher.get_key_patches``),
    so a LoRA loaded upstream is respected. Returned in the weight's dtype; None when the merge
    changes nothing (ComfyUI logs a patch whose shapes do not fit the layer and skips it)."""
    (original, convert), *upstream = key_patches
    weight = convert(original.detach().to(torch.float32, copy=True), inplace=True)
    if upstream:
        weight = comfy.lora.calculate_weight(upstream, weight, key)
    ours = [(strength, patch.adapter, 1.0, patch.offset, patch.function) for patch in patches]
    delta = comfy.lora.calculate_weight(ours, weight.clone(), key) - weight
    if not torch.any(delta):
        return None
    return delta.to(original.dtype)


class LoRAFileCache:
    """A bounded cache of parsed LoRA state dicts, invalidated when a file changes on disk."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[tuple[float, int], dict[str, torch.Tensor]]] = OrderedDict()

    def load(self, path: str, display_name: str) -> dict[str, torch.Tensor]:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise LoRAInputError(f"LoRA '{display_name}' cannot be opened ({error.strerror}).") from None
        stamp = (stat.st_mtime, stat.st_size)
        cached = self._entries.get(path)
        if cached is not None and cached[0] == stamp:
            self._entries.move_to_end(path)
            return cached[1]
        state = read_safetensors(path, display_name)
        self._entries[path] = (stamp, state)
        self._entries.move_to_end(path)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return state

    def stamp(self, path: str) -> tuple[float, int] | None:
        """(modification time, size) of the file as last loaded, or None when it is not cached."""
        cached = self._entries.get(path)
        return None if cached is None else cached[0]

    def __len__(self) -> int:
        return len(self._entries)


LORA_FILES = LoRAFileCache()


def check_strength(name: str, strength: float) -> float:
    """A finite strength within +-``MAX_STRENGTH``, or an error naming the LoRA."""
    if not math.isfinite(strength) or abs(strength) > MAX_STRENGTH:
        raise LoRAInputError(
            f"LoRA '{name}' has strength {strength}; use a finite number between -{MAX_STRENGTH:g} and {MAX_STRENGTH:g} "
            "(1.0 applies it as trained)"
        )
    return float(strength)
