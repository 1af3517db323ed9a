"""LoRA files whose layers ComfyUI maps in special ways, applied per row exactly as LoraLoader applies them."""

from __future__ import annotations

from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import pytest
import safetensors.torch
import torch

from support.engine_helpers import adapter_row_prediction, merged_prediction
from support.tiny_models import conditioning, latent, merge_tolerance, timesteps


def diffusers_lora(model, layers: dict[str, str], seed: int) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-layout file (``transformer.<name>.lora_A/.lora_B``) on ``layers``
    (diffusers name -> the checkpoint weight it maps to, for its shape)."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    tensors = {}
    for name, weight_key in layers.items():
        out_features, in_features = state[weight_key].shape
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_features, generator=generator) / in_features**0.5
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator) * 0.5
    return tensors


# layers ComfyUI maps through a conversion function (swap_scale_shift): the final modulation of SD3
# and Flux, and SD3's last context-block modulation
CONVERTED_LAYERS = {
    "sd3": {
        "norm_out.linear": "diffusion_model.final_layer.adaLN_modulation.1.weight",
        "transformer_blocks.1.norm1_context.linear": "diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.weight",
        "transformer_blocks.0.attn.to_out.0": "diffusion_model.joint_blocks.0.x_block.attn.proj.weight",
    },
    "flux": {
        "norm_out.linear": "diffusion_model.final_layer.adaLN_modulation.1.weight",
        "single_transformer_blocks.0.proj_out": "diffusion_model.single_blocks.0.linear2.weight",
    },
}


@pytest.mark.parametrize("family", sorted(CONVERTED_LAYERS))
def test_conversion_function_layers_equal_lora_loader(engine, family, tiny_model_factory, loras_folder: Path):
    patcher = tiny_model_factory(family)
    tensors = diffusers_lora(patcher.model, CONVERTED_LAYERS[family], seed=5)
    safetensors.torch.save_file(tensors, str(loras_folder / f"converted-{family}.safetensors"))
    expected = merged_prediction(
        patcher, family, comfy.utils.load_torch_file(str(loras_folder / f"converted-{family}.safetensors")), 0.9
    )
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        plain = patcher.model.apply_model(latent(family), timesteps(2.0), **conditioning(family))
    assert not torch.allclose(expected, plain, atol=1e-3)
    got = adapter_row_prediction(engine, patcher, family, f"converted-{family}.safetensors", 0.9)
    tolerance = merge_tolerance()
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
