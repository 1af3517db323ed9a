"""API-format prompts (what ``POST /prompt`` takes) for the pack's nodes."""

from __future__ import annotations


def composition_prompt(
    checkpoint: str,
    loras: list[tuple[str, float]],
    sampler_node: str = "LoRAtorioSampler",
    steps: int = 2,
    size: int = 64,
    method_inputs: dict | None = None,
) -> dict:
    """Checkpoint -> prompts -> Multi-LoRA Loader -> a composition sampler -> VAE decode -> save."""
    loader_rows = {}
    for slot, (name, strength) in enumerate(loras, start=1):
        loader_rows.update({f"lora_{slot}": name, f"strength_{slot}": strength, f"enabled_{slot}": True})
    method_defaults = {
        "LoRAtorioSampler": {"patch_size": 2, "temperature": 0.05, "recentre_lambda": 0.5, "top_k": 0, "top_k_mode": "image"},
        "LoRAtorioSwitchSampler": {"tau": 1},
        "LoRAtorioCompositeSampler": {},
    }[sampler_node]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a character in a garden, watercolour"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "LoRAtorioMultiLoRALoader", "inputs": loader_rows},
        "6": {
            "class_type": sampler_node,
            "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "lora_stack": ["5", 0], "latent_image": ["4", 0],
                "seed": 1, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                **method_defaults, **(method_inputs or {}),
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "loratorio-test"}},
    }  # fmt: skip
