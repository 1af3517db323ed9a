"""Tiny real ComfyUI models of the SD1.5, SDXL, SD3 and Flux architectures, with seeded weights.

Each is built by ComfyUI's own model classes (``comfy.supported_models.*``) from a reduced
config of the real architecture and wrapped in a real ``ModelPatcher``. ComfyUI's layers skip
weight initialisation, so every parameter is filled from a seeded generator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import torch

FAMILIES = ("sd15", "sdxl", "sd3", "flux")


@dataclass(frozen=True)
class Family:
    name: str
    model_class: Callable[[dict], object]
    unet_config: dict
    latent_channels: int
    context_dim: int
    pooled_dim: int | None
    # keys of the diffusers-style names this family's LoRA fixtures target
    diffusers_targets: tuple[str, ...] = field(default=())


SD15_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

SDXL_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [1, 1, 1, 1],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

SD3_CONFIG = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 1024,
    "pos_embed_max_size": 32,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

FLUX_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "hidden_size": 64,
    "num_heads": 2,
    "axes_dim": [4, 14, 14],
    "mlp_ratio": 4.0,
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "depth": 1,
    "depth_single_blocks": 1,
}
# Since ComfyUI 0.4.0 FluxParams requires txt_ids_dims (model detection sets [] for Flux.1); 0.3.75
# rejects the key, so it is added only where the field exists.
if "txt_ids_dims" in getattr(comfy.ldm.flux.model.FluxParams, "__dataclass_fields__", {}):
    FLUX_CONFIG["txt_ids_dims"] = []

UNET_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "resnets.0.conv1",
)
MMDIT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "ff.net.0.proj")
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "proj_mlp", "proj_out")

FAMILY_SPECS: dict[str, Family] = {
    "sd15": Family("sd15", comfy.supported_models.SD15, SD15_CONFIG, 4, 768, None, UNET_TARGETS),
    "sdxl": Family("sdxl", comfy.supported_models.SDXL, SDXL_CONFIG, 4, 2048, 1280, UNET_TARGETS),
    "sd3": Family("sd3", comfy.supported_models.SD3, SD3_CONFIG, 16, 4096, 2048, MMDIT_TARGETS),
    "flux": Family("flux", comfy.supported_models.Flux, FLUX_CONFIG, 16, 4096, 768, FLUX_TARGETS),
}


def fill_seeded(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and float buffer (SD3's ``pos_embed`` is an uninitialised buffer):
    weights ~ N(0, 1/fan_in), norm scales ~ 1, biases ~ N(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if b.is_floating_point())]
    with torch.no_grad():
        for name, param in tensors:
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
            elif "norm" in name and name.endswith(("weight", "scale")):
                values = 1.0 + 0.05 * torch.randn(param.shape, generator=generator)
            else:
                values = 0.02 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))


@contextlib.contextmanager
def weights_allocated_now() -> Iterator[None]:
    """Models built in this block allocate every weight at once. Under newer ComfyUI's dynamic VRAM,
    layers allocate their weights only when a state dict is loaded; the tests fill theirs in place."""
    try:
        import comfy.memory_management as memory
    except ImportError:  # ComfyUI before dynamic VRAM
        yield
        return
    lazy = getattr(memory, "aimdo_enabled", False)
    memory.aimdo_enabled = False
    try:
        yield
    finally:
        memory.aimdo_enabled = lazy


def build_model(family: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A real, seeded ComfyUI model of ``family`` in float32, in a ModelPatcher that loads it on ComfyUI's
    device (the CPU unless the tests run on the GPU)."""
    spec = FAMILY_SPECS[family]
    model_config = spec.model_class(dict(spec.unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    with weights_allocated_now():
        model = model_config.get_model({})
    fill_seeded(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=device(), offload_device=comfy.model_management.unet_offload_device()
    )


def device() -> torch.device:
    """Where the tests' models run: ComfyUI's device (the CPU unless ``LORATORIO_TEST_DEVICE=gpu``)."""
    return comfy.model_management.get_torch_device()


def batch_tolerance() -> float:
    """The float32 tolerance for a row computed in batches of different sizes (scaled by the output's
    size where a test scales it): exact on the CPU; on a GPU, cuDNN's benchmark mode (which ComfyUI
    turns on) picks a convolution algorithm per shape, so a row's sums run in another order."""
    return 1e-5 if device().type == "cpu" else 2e-4


def merge_tolerance(on_cpu: float = 1e-5) -> float:
    """The float32 tolerance against ComfyUI's own LoRA merge (scaled as :func:`batch_tolerance`):
    ``on_cpu`` on the CPU; on a GPU, where newer releases merge LoRAs in float16
    (``lora_compute_dtype``), a rounding of about 5e-4 that the pack's float32 rows do not share."""
    if device().type == "cpu":
        return on_cpu
    lora_compute_dtype = getattr(comfy.model_management, "lora_compute_dtype", None)
    in_float16 = lora_compute_dtype is not None and lora_compute_dtype(device()) == torch.float16
    return max(on_cpu, 2e-3 if in_float16 else batch_tolerance())


def timesteps(*values: float) -> torch.Tensor:
    """A timestep per row for a direct ``BaseModel.apply_model`` call, on the models' device."""
    return torch.tensor(values, device=device())


def conditioning(family: str, batch: int = 1, tokens: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``BaseModel.apply_model``: a random prompt embedding (and pooled/y), on the
    models' device."""
    spec = FAMILY_SPECS[family]
    generator = torch.Generator().manual_seed(seed)
    kwargs: dict[str, torch.Tensor] = {"c_crossattn": torch.randn(batch, tokens, spec.context_dim, generator=generator)}
    if family == "sdxl":
        kwargs["y"] = torch.randn(batch, SDXL_CONFIG["adm_in_channels"], generator=generator)
    elif spec.pooled_dim is not None:
        kwargs["y"] = torch.randn(batch, spec.pooled_dim, generator=generator)
    if family == "flux":
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return {key: value.to(device()) for key, value in kwargs.items()}


def latent(family: str, batch: int = 1, size: int = 16, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, FAMILY_SPECS[family].latent_channels, size, size, generator=generator).to(device())


TINY_CLIP_L_CONFIG = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 49407,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 256, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}  # fmt: skip


class TinyClipL(comfy.sd1_clip.SDClipModel):
    """SD1.5's CLIP-L text encoder class with 2 layers and a narrow MLP (same width, tokenizer, keys)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - ComfyUI's signature
        super().__init__(device=device, dtype=dtype, textmodel_json_config=TINY_CLIP_L_CONFIG, return_projected_pooled=False,
                         model_options={**model_options, "model_name": "clip_l"})  # fmt: skip


def build_clip(seed: int = 0) -> comfy.sd.CLIP:
    """A real ComfyUI CLIP object (SD1.5 tokenizer and text model class), seeded, on the CPU."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    with weights_allocated_now():
        clip = comfy.sd.CLIP(target, model_options={"clip_l_class": TinyClipL})
    fill_seeded(clip.cond_stage_model, seed)
    return clip
