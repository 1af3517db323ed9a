#!/usr/bin/env python3
"""Write the demo's model files: a ComfyUI-loadable SD1.5-architecture checkpoint and LoRAs for it.

    python3 tools/host.py run -- tools/demo_assets.py [--models-dir DIR]

No model weights can be downloaded here, so the weights are seeded random numbers: the images
are abstract. The checkpoint has SD1.5's full CLIP-L text encoder and VAE and a reduced UNet
(320 channels, two levels, one res block each) that ComfyUI's ``CheckpointLoaderSimple`` detects
as SD1.5 and samples at 256x256 in seconds on a CPU. The LoRAs use different key styles (kohya
with text-encoder weights, diffusers/PEFT written by ``peft``, ComfyUI, LyCORIS LoHa).

Files are written under ``DIR/checkpoints`` and ``DIR/loras`` (default: the host ComfyUI's
``models`` folder) and skipped when an up-to-date copy exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSET_VERSION = "2"
CHECKPOINT_NAME = "loratorio-demo-sd15.safetensors"
# (file name, key style, seed, metadata): one LoRA per concept of the demo prompt; the metadata
# records trigger words the way different trainers do (the background LoRA has none)
DEMO_LORAS = (
    (
        "demo-character-kohya.safetensors", "kohya", 1,
        {"ss_tag_frequency": json.dumps({"10_knight": {"knight": 24, "red shield": 17, "armour": 9}})},
    ),
    ("demo-style-peft.safetensors", "peft", 2, {"modelspec.trigger_phrase": "watercolour, soft wash"}),
    ("demo-background-comfy.safetensors", "comfy", 3, {}),
    ("demo-object-loha.safetensors", "loha", 4, {"trigger_words": json.dumps(["brass lantern"])}),
)  # fmt: skip
SD_VAE_CONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}  # fmt: skip


def build_checkpoint(path: Path) -> None:
    import comfy.ldm.models.autoencoder
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import torch

    from support.tiny_models import SD15_CONFIG, fill_seeded

    # the tests' tiny SD1.5 UNet at SD1.5's real width: 320 channels is what detection calls SD1.5
    model_config = comfy.supported_models.SD15({**SD15_CONFIG, "model_channels": 320})
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    fill_seeded(model.diffusion_model, 0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel))
    fill_seeded(clip.cond_stage_model, 1)

    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    fill_seeded(autoencoder, 2)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict())

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    comfy.sd.save_checkpoint(str(partial), patcher, clip, vae, metadata={"loratorio_demo_assets": ASSET_VERSION})
    partial.replace(path)


def build_loras(folder: Path, checkpoint: Path) -> None:
    import comfy.sd
    import comfy.utils

    from support.lora_files import write_kohya, write_lora

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    folder.mkdir(parents=True, exist_ok=True)
    for name, style, seed, metadata in DEMO_LORAS:
        target = folder / name
        if is_current(target):
            continue
        partial = target.with_suffix(".partial")
        if style == "kohya":
            write_kohya(partial, "sd15", model.model, seed=seed, clip=clip)
        else:
            write_lora(partial, "sd15", model.model, style, seed=seed)
        stamp(partial, metadata)
        partial.replace(target)


def is_current(path: Path) -> bool:
    if not path.is_file():
        return False
    import safetensors

    with safetensors.safe_open(str(path), "pt") as handle:
        return (handle.metadata() or {}).get("loratorio_demo_assets") == ASSET_VERSION


def stamp(path: Path, metadata: dict[str, str]) -> None:
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, "loratorio_demo_assets": ASSET_VERSION})


def ensure_demo_assets(models_dir: Path) -> tuple[Path, list[Path]]:
    """Create the checkpoint and LoRAs under ``models_dir`` unless up to date; return their paths."""
    checkpoint = models_dir / "checkpoints" / CHECKPOINT_NAME
    if not is_current(checkpoint):
        print(f"[demo-assets] writing {checkpoint} (seeded weights)", flush=True)
        build_checkpoint(checkpoint)
    loras = models_dir / "loras"
    if not all(is_current(loras / name) for name, *_ in DEMO_LORAS):
        print(f"[demo-assets] writing the demo LoRAs into {loras}", flush=True)
        build_loras(loras, checkpoint)
    return checkpoint, [loras / name for name, *_ in DEMO_LORAS]


def main() -> int:
    from host_env import comfyui_on_path

    comfyui = comfyui_on_path("demo_assets.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=comfyui / "models")
    options = parser.parse_args()
    checkpoint, loras = ensure_demo_assets(options.models_dir)
    print(f"[demo-assets] checkpoint: {checkpoint}")
    for lora in loras:
        print(f"[demo-assets] LoRA: {lora}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
