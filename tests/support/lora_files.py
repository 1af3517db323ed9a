"""Real LoRA files for the tiny models, in the key styles people share.

* kohya (sd-scripts): ``lora_unet_<name with underscores>.lora_down/.lora_up/.alpha``; diffusers
  names for the UNet families, the checkpoint's own names (fused qkv) for SD3 and Flux.
* diffusers/PEFT: written by the ``peft`` library itself (an independent writer) from a module
  tree named like the diffusers model: ``unet.<name>.lora_A/.lora_B`` or
  ``transformer.<name>.lora_A/.lora_B``; on SD3 and Flux ``to_q``/``to_k``/``to_v`` are slices of
  the checkpoint's fused qkv weights. UNet attention layers carry diffusers' attention-processor
  names (``attn1.processor.to_q``, ``attn1.processor.to_out``): ComfyUI 0.3.75 reads the UNet's
  attention keys only in that form, and these files must load fully through ComfyUI's own path.
* ComfyUI (what its LoRA save node writes): ``diffusion_model.<key>.lora_up/.lora_down/.alpha``.
* LyCORIS, written by the ``lycoris-lora`` library itself from the same diffusers-named module tree,
  under the prefixes sd-scripts (``lora_unet_``) and SimpleTuner (``lycoris_``) give it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import comfy.lora
import comfy.utils
import safetensors.torch
import torch

from .tiny_models import FAMILY_SPECS

KEY_STYLES = ("kohya", "peft", "comfy")
FUSED_FAMILY_KEYS = re.compile(r"(qkv|\.proj|mlp\.0|mlp\.2|linear1|linear2)\.weight$")


@dataclass(frozen=True)
class Target:
    """One layer a LoRA patches: its name in the file and the weight slice it changes."""

    file_name: str  # without the .lora_* suffix
    weight_key: str  # the ComfyUI state-dict key
    offset: tuple[int, int, int] | None  # (dim, start, size) of a fused weight, or None
    shape: tuple[int, ...]
    bias: bool = False  # whether the layer has a bias


def _diffusers_map(model) -> dict[str, object]:
    config = model.model_config.unet_config
    if "num_res_blocks" in config:
        return {k: f"diffusion_model.{v}" for k, v in comfy.utils.unet_to_diffusers(config).items()}
    if config.get("image_model") == "flux":
        return comfy.utils.flux_to_diffusers(config, output_prefix="diffusion_model.")
    return comfy.utils.mmdit_to_diffusers(config, output_prefix="diffusion_model.")


def diffusers_targets(family: str, model) -> list[Target]:
    """Layers named the diffusers way, restricted to the family's chosen targets."""
    state = model.state_dict()
    targets = []
    for name, mapped in _diffusers_map(model).items():
        if not name.endswith(".weight"):
            continue
        module_name = name[: -len(".weight")]
        if not any(module_name.endswith(t) for t in FAMILY_SPECS[family].diffusers_targets):
            continue
        key, offset = (mapped, None) if isinstance(mapped, str) else mapped
        if key not in state:
            continue
        weight = state[key] if offset is None else state[key].narrow(*offset)
        has_bias = f"{key[: -len('.weight')]}.bias" in state
        targets.append(Target(module_name, key, offset, tuple(weight.shape), has_bias))
    if not targets:
        raise AssertionError(f"no LoRA targets found for {family}")
    return sorted(targets, key=lambda t: t.file_name)


def checkpoint_targets(model) -> list[Target]:
    """Whole (fused) weights named the checkpoint's way, for kohya files of SD3 and Flux."""
    state = model.state_dict()
    return [
        Target(key[len("diffusion_model.") : -len(".weight")], key, None, tuple(state[key].shape))
        for key in sorted(state)
        if key.startswith("diffusion_model.") and "blocks." in key and FUSED_FAMILY_KEYS.search(key) and state[key].ndim == 2
    ]


def _low_rank_pair(shape: tuple[int, ...], rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` for a linear ``[out, in]`` or a conv ``[out, in, kh, kw]`` (LoCon)."""
    out_features = shape[0]
    down_shape = (rank, *shape[1:])
    up_shape = (out_features, rank) + (1,) * (len(shape) - 2)
    down = torch.randn(down_shape, generator=generator) / (torch.tensor(shape[1:]).prod().sqrt())
    up = torch.randn(up_shape, generator=generator) * 0.5
    return up, down


def text_encoder_targets(clip) -> list[Target]:
    """The CLIP-L layers kohya names ``lora_te_text_model_encoder_layers_<i>_<layer>``."""
    state = clip.cond_stage_model.state_dict()
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    return [
        Target(name, key, None, tuple(state[key].shape))
        for name, key in sorted(key_map.items())
        if name.startswith("lora_te_text_model_encoder_layers_")
    ]


def write_kohya(path: Path, family: str, model, rank: int = 4, alpha: float = 2.0, seed: int = 0, clip=None) -> Path:
    """kohya keys for the diffusion model, and for the text encoder too when ``clip`` is given."""
    generator = torch.Generator().manual_seed(seed)
    targets = diffusers_targets(family, model) if family in ("sd15", "sdxl") else checkpoint_targets(model)
    te_targets = text_encoder_targets(clip) if clip is not None else []
    tensors: dict[str, torch.Tensor] = {}
    for target in [*targets, *te_targets]:
        stem = target.file_name if target in te_targets else "lora_unet_" + target.file_name.replace(".", "_")
        up, down = _low_rank_pair(target.shape, rank, generator)
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    safetensors.torch.save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


def write_comfy(path: Path, family: str, model, rank: int = 4, alpha: float = 4.0, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for target in checkpoint_targets(model) if family in ("sd3", "flux") else diffusers_targets(family, model):
        stem = target.weight_key[: -len(".weight")]
        up, down = _low_rank_pair(target.shape, rank, generator)
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    safetensors.torch.save_file(tensors, str(path))
    return path


def _processor_name(module_name: str) -> str:
    name = module_name.replace(".to_", ".processor.to_")
    return name[: -len(".0")] if name.endswith(".to_out.0") else name


def module_tree(targets: list[Target]) -> torch.nn.Module:
    """Plain torch layers named and shaped like ``targets`` (a model named the diffusers way, for the
    training libraries to wrap): a linear layer per 2-D weight, a convolution per 4-D weight."""
    tree = torch.nn.Module()
    for target in targets:
        parent = tree
        *path_parts, leaf = target.file_name.split(".")
        for part in path_parts:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        out_features, in_features, *kernel = target.shape
        if kernel:
            layer = torch.nn.Conv2d(in_features, out_features, tuple(kernel), padding=kernel[0] // 2, bias=target.bias)
        else:
            layer = torch.nn.Linear(in_features, out_features, bias=target.bias)
        parent.add_module(leaf, layer)
    return tree


def write_peft(path: Path, family: str, model, rank: int = 4, seed: int = 0) -> Path:
    """A diffusers/PEFT LoRA written by ``peft`` (``lora_alpha = rank``: scale 1, no alpha key)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    targets = [t for t in diffusers_targets(family, model) if len(t.shape) == 2]
    if family in ("sd15", "sdxl"):
        targets = [replace(t, file_name=_processor_name(t.file_name)) for t in targets]
    tree = module_tree(targets)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=[t.file_name for t in targets], init_lora_weights=False)
    inject_adapter_in_model(config, tree)
    prefix = "unet." if family in ("sd15", "sdxl") else "transformer."
    state = {prefix + k: v.detach().contiguous() for k, v in get_peft_model_state_dict(tree).items()}
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    return path


# the prefix LyCORIS writes: sd-scripts names UNet layers lora_unet_<diffusers name>; SimpleTuner
# names transformer layers lycoris_<diffusers name> (ComfyUI reads both)
LYCORIS_PREFIXES = {"sd15": "lora_unet", "sdxl": "lora_unet", "sd3": "lycoris", "flux": "lycoris"}


def write_lycoris_trained(path: Path, family: str, model, options: dict, seed: int = 0) -> Path:
    """A LyCORIS file written by ``lycoris-lora`` itself (``create_lycoris(**options)``, then its own
    ``save_weights``) on the family's diffusers-named layers. Training is skipped: every trainable
    tensor is filled from a seeded generator, since LyCORIS starts from a zero delta."""
    from lycoris import LycorisNetwork, create_lycoris

    targets = diffusers_targets(family, model)
    LycorisNetwork.apply_preset(
        {"target_module": [], "target_name": [re.escape(t.file_name) for t in targets], "lora_prefix": LYCORIS_PREFIXES[family]}
    )
    network = create_lycoris(module_tree(targets), 1.0, linear_dim=4, linear_alpha=2.0, **options)
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            fan_in = math.prod(parameter.shape[1:]) if parameter.ndim > 1 else 1
            scale = 0.05 if "oft" in name else 0.5 / math.sqrt(fan_in)  # an orthogonal block far from 0 flips the layer
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path


def write_loha(path: Path, family: str, model, rank: int = 4, alpha: float = 4.0, seed: int = 0) -> Path:
    """A LyCORIS LoHa (Hadamard product) file on the linear layers (low-rank or dense per-row deltas)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for target in diffusers_targets(family, model):
        if len(target.shape) != 2:
            continue
        stem = "lora_unet_" + target.file_name.replace(".", "_")
        out_features, in_features = target.shape
        for name, shape in (
            ("w1_a", (out_features, rank)),
            ("w1_b", (rank, in_features)),
            ("w2_a", (out_features, rank)),
            ("w2_b", (rank, in_features)),
        ):
            tensors[f"{stem}.hada_{name}"] = torch.randn(shape, generator=generator) * 0.3
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    safetensors.torch.save_file(tensors, str(path))
    return path


def _lycoris_tensors(kind: str, target: Target, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS writes for one layer (suffix -> tensor), in the key names ComfyUI reads."""
    out_features, in_features = target.shape[0], target.shape[1]
    normal = lambda *shape: torch.randn(shape, generator=generator)  # noqa: E731
    if kind == "lokr":  # kron(w1, w2) with a full w1 and a low-rank w2
        return {
            "lokr_w1": normal(2, 2) * 0.5,
            "lokr_w2_a": normal(out_features // 2, 4) * 0.3,
            "lokr_w2_b": normal(4, in_features // 2) * 0.3,
            "alpha": torch.tensor(4.0),
        }
    if kind == "oft":  # block-diagonal rotation of the output channels, 4 blocks
        return {"oft_blocks": normal(4, out_features // 4, out_features // 4) * 0.05}
    if kind == "dora":  # a LoRA with a learned per-output magnitude
        up, down = _low_rank_pair(target.shape, 4, generator)
        magnitude = torch.linalg.vector_norm(normal(out_features, in_features), dim=1, keepdim=True) * 0.1
        return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(4.0), "dora_scale": magnitude}
    if kind == "full":  # a full weight and bias difference
        return {"diff": normal(*target.shape) * 0.02, "diff_b": normal(out_features) * 0.02}
    raise ValueError(f"unknown LyCORIS kind {kind!r}")


LYCORIS_KINDS = ("lokr", "oft", "dora", "full")


def write_lycoris(path: Path, family: str, model, kind: str, seed: int = 0) -> Path:
    """A LyCORIS-style file of ``kind`` (LoKr, OFT, DoRA or a full diff) on the linear layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for target in diffusers_targets(family, model):
        if len(target.shape) != 2 or target.offset is not None:
            continue
        stem = "lora_unet_" + target.file_name.replace(".", "_")
        tensors.update({f"{stem}.{suffix}": t.contiguous() for suffix, t in _lycoris_tensors(kind, target, generator).items()})
    safetensors.torch.save_file(tensors, str(path))
    return path


WRITERS = {"kohya": write_kohya, "peft": write_peft, "comfy": write_comfy, "loha": write_loha}


def write_lora(path: Path, family: str, model, style: str, seed: int = 0) -> Path:
    if style not in WRITERS:
        raise ValueError(f"unknown LoRA key style {style!r}; use one of {KEY_STYLES}")
    return WRITERS[style](path, family, model, seed=seed)
