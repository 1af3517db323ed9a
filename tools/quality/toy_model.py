"""The toy world's model: ComfyUI's own SD1.5 UNet class at a tiny size, and its token embedding.

The model config is ComfyUI's ``SD15`` with a tiny UNet (three levels of 32/32/64 channels,
attention only at 8x8 so that it trains in minutes on a CPU), 4 latent channels at scale 1 (the latent is the RGB image plus a
zero channel) and v-prediction. The "text encoder" is a learned embedding of the toy vocabulary;
a prompt's conditioning is its padded token embeddings, as ComfyUI's CONDITIONING.

Files: ``toy-base.safetensors`` holds ``diffusion_model.*`` (the UNet) and ``token_embedding``;
each concept LoRA is a ComfyUI-format LoRA (``diffusion_model.<layer>.lora_up/lora_down/alpha``)
that ComfyUI's LoRA loader and the Multi-LoRA Loader read like any other.
"""

from __future__ import annotations

from pathlib import Path

import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models
import safetensors.torch
import torch

from .world import LATENT_CHANNELS, VOCABULARY, Concept, token_ids

CONTEXT_DIM = 64
BASE_FILE = "toy-base.safetensors"
TOKEN_EMBEDDING_KEY = "token_embedding"
UNET_PREFIX = "diffusion_model."
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 1, 2],
    "transformer_depth": [0, 0, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 0, 1, 1],
    "use_linear_in_transformer": True,
    "context_dim": CONTEXT_DIM,
    "num_heads": 4,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


class ToyLatent(comfy.latent_formats.LatentFormat):
    latent_channels = LATENT_CHANNELS
    scale_factor = 1.0


class ToyWorld(comfy.supported_models.SD15):
    """ComfyUI's SD1.5 model config with the toy latent and v-prediction."""

    latent_format = ToyLatent

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.V_PREDICTION


def initialise(module: torch.nn.Module, seed: int) -> None:
    """PyTorch's default initialisation (ComfyUI's layers skip it), from a seeded generator."""
    torch.manual_seed(seed)
    module.apply(_reset)


def _reset(layer: torch.nn.Module) -> None:
    for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
        if isinstance(layer, cls):
            cls.reset_parameters(layer)
            return


def new_model(seed: int) -> tuple[comfy.model_base.BaseModel, torch.nn.Embedding]:
    """A freshly initialised toy UNet (a real ComfyUI ``BaseModel``) and token embedding."""
    model = ToyWorld(dict(UNET_CONFIG)).get_model({})
    initialise(model.diffusion_model, seed)
    torch.manual_seed(seed + 1)
    embedding = torch.nn.Embedding(len(VOCABULARY), CONTEXT_DIM)
    return model, embedding


def lora_file(concept: Concept) -> str:
    return f"toy-{concept.name}.safetensors"


def save_base(
    path: Path, model: comfy.model_base.BaseModel, embedding: torch.nn.Embedding, metadata: dict[str, str] | None = None
) -> None:
    # half precision keeps the shipped file small; it loads back into the float32 model
    tensors = {UNET_PREFIX + k: v.detach().half().contiguous() for k, v in model.diffusion_model.state_dict().items()}
    tensors[TOKEN_EMBEDDING_KEY] = embedding.weight.detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata={"toy_world": "base", **(metadata or {})})


def load_base(path: Path) -> tuple[comfy.model_patcher.ModelPatcher, torch.Tensor]:
    """The base model in a real ``ModelPatcher`` (CPU, float32) and its token embedding table."""
    tensors = safetensors.torch.load_file(str(path))
    model = ToyWorld(dict(UNET_CONFIG)).get_model({})
    unet = {k[len(UNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    model.diffusion_model.load_state_dict(unet, strict=True)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return patcher, with_every_word(tensors[TOKEN_EMBEDDING_KEY])


def with_every_word(table: torch.Tensor) -> torch.Tensor:
    """``table`` with a row for every word of ``VOCABULARY``. A base trained before words were added
    lacks their rows; like every trigger it never saw, each gets an untrained embedding (N(0, 1),
    ``nn.Embedding``'s initialisation), drawn from a generator seeded by the word's id."""
    missing = range(table.shape[0], len(VOCABULARY))
    rows = [torch.randn(CONTEXT_DIM, generator=torch.Generator().manual_seed(1_000 + index)) for index in missing]
    return torch.cat([table, torch.stack(rows).to(table.dtype)]) if rows else table


def conditioning(table: torch.Tensor, words: list[str]) -> list:
    """ComfyUI CONDITIONING for a prompt of toy words (``[]`` is the empty prompt); ComfyUI repeats
    it over the latent batch."""
    return [[table[token_ids(words)].unsqueeze(0), {}]]
