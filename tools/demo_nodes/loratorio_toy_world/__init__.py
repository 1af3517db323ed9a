"""Demo-only ComfyUI nodes for the toy world of ``tools/quality`` (never part of the pack's node list).

The demo, ``make serve`` and the tests load this folder as a custom node through an
``extra_model_paths.yaml`` with a ``custom_nodes:`` entry (``tools/toy_world.py`` writes it). The
nodes put the trained toy model into a real ComfyUI MODEL and turn toy words into CONDITIONING, so
the pack's own nodes (Multi-LoRA Loader, the samplers, LoRA Merge) compose the concept LoRAs as
they would any SD1.5 LoRA:

* Toy World Loader: ``toy-base.safetensors`` -> MODEL (ComfyUI's SD1.5 UNet class, tiny);
* Toy World Prompt: toy words (``ruby lemon dusk``) -> CONDITIONING, with the base file's token embedding;
* Empty Toy Latent: a 32x32 latent batch;
* Toy Latent to Image: the toy latent is the RGB image -> IMAGE (optionally enlarged, nearest neighbour).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import comfy.model_management
import comfy.model_patcher
import folder_paths
import safetensors
import safetensors.torch
import torch

QUALITY_DIR = Path(__file__).resolve().parents[2] / "quality"
QUALITY_PACKAGE = "loratorio_toy_quality"
FOLDER = "toy_world"  # where the base models are listed from
CATEGORY = "loratorio toy world (demo)"


def quality_module(name: str) -> ModuleType:
    """``tools/quality/<name>.py``, imported under a package name of its own (nothing added to ``sys.path``)."""
    if QUALITY_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            QUALITY_PACKAGE, QUALITY_DIR / "__init__.py", submodule_search_locations=[str(QUALITY_DIR)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[QUALITY_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{QUALITY_PACKAGE}.{name}")


toy_model = quality_module("toy_model")
world = quality_module("world")
folder_paths.add_model_folder_path(FOLDER, str(QUALITY_DIR / "models" / "seed-0"))


def base_files() -> list[str]:
    return [name for name in folder_paths.get_filename_list(FOLDER) if Path(name).name == toy_model.BASE_FILE]


def base_path(name: str) -> Path:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None or Path(name).name != toy_model.BASE_FILE:
        raise ValueError(f"{name!r} is not a toy base model; choose one of {base_files()}")
    return Path(path)


@functools.lru_cache(maxsize=4)
def token_table(path: Path) -> torch.Tensor:
    with safetensors.safe_open(str(path), "pt") as handle:
        return toy_model.with_every_word(handle.get_tensor(toy_model.TOKEN_EMBEDDING_KEY)).float()


def words_of(text: str) -> list[str]:
    """The toy words of a prompt (spaces or commas between them), each checked against the vocabulary."""
    words = [word for word in re.split(r"[\s,]+", text.strip().lower()) if word]
    known = [word for word in world.VOCABULARY if word != world.PAD]
    unknown = [word for word in words if word not in known]
    if unknown:
        raise ValueError(f"the toy world does not know {unknown}; its words are: {', '.join(known)}")
    if len(words) > world.CONTEXT_TOKENS:
        raise ValueError(f"a toy prompt has at most {world.CONTEXT_TOKENS} words, got {len(words)}: {words}")
    return words


class ToyWorldLoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    DESCRIPTION = "The toy world's trained base model (a tiny SD1.5-class UNet, 32x32 RGB latent) as a ComfyUI MODEL."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"base": (base_files(), {"tooltip": "The toy base model (tools/quality/models/seed-0)."})}}

    def load(self, base: str) -> tuple:
        tensors = safetensors.torch.load_file(str(base_path(base)))
        model = toy_model.ToyWorld(dict(toy_model.UNET_CONFIG)).get_model({})
        prefix = toy_model.UNET_PREFIX
        model.diffusion_model.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        model.eval()
        devices = {
            "load_device": comfy.model_management.get_torch_device(),
            "offload_device": comfy.model_management.unet_offload_device(),
        }
        return (comfy.model_patcher.ModelPatcher(model, **devices),)


class ToyWorldPrompt:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    DESCRIPTION = (
        "Toy words as CONDITIONING: shapes (disk triangle square stripe), triggers (ruby amber cobalt lemon dusk), "
        "characters with their class word (jade disk, aqua disk)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "text": ("STRING", {"default": "ruby lemon dusk", "tooltip": "Toy words; empty for the negative prompt."}),
                "base": (base_files(), {"tooltip": "The toy base model whose token embedding encodes the words."}),
            }
        }

    def encode(self, text: str, base: str) -> tuple:
        table = token_table(base_path(base))
        return ([[table[world.token_ids(words_of(text))].unsqueeze(0), {}]],)


class EmptyToyLatent:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    DESCRIPTION = "A batch of empty 32x32 toy latents (the toy world's only size)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"batch_size": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def generate(self, batch_size: int) -> tuple:
        size = world.IMAGE_SIZE
        return ({"samples": torch.zeros(batch_size, world.LATENT_CHANNELS, size, size)},)


class ToyLatentToImage:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    DESCRIPTION = "The toy latent is the RGB image: no VAE, only a copy (enlarged by `scale`, nearest neighbour, for viewing)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "samples": ("LATENT",),
                "scale": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Enlarge each pixel to scale x scale."}),
            }
        }

    def decode(self, samples: dict, scale: int) -> tuple:
        images = world.as_images(samples["samples"].float().cpu())
        if scale > 1:
            images = images.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        return (images,)


NODE_CLASS_MAPPINGS = {
    "ToyWorldLoader": ToyWorldLoader,
    "ToyWorldPrompt": ToyWorldPrompt,
    "EmptyToyLatent": EmptyToyLatent,
    "ToyLatentToImage": ToyLatentToImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ToyWorldLoader": "Toy World Loader",
    "ToyWorldPrompt": "Toy World Prompt",
    "EmptyToyLatent": "Empty Toy Latent",
    "ToyLatentToImage": "Toy Latent to Image",
}
