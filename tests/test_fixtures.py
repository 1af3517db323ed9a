"""The test fixtures are real: ComfyUI models of each family and LoRA files ComfyUI reads fully."""

from __future__ import annotations

import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.model_management
import comfy.sd
import comfy.utils
import pytest
import torch

from support.lora_files import KEY_STYLES, write_lora
from support.tiny_models import FAMILIES, build_model, conditioning, latent, timesteps

MODEL_CLASSES = {
    "sd15": comfy.model_base.BaseModel,
    "sdxl": comfy.model_base.SDXL,
    "sd3": comfy.model_base.SD3,
    "flux": comfy.model_base.Flux,
}


def predict(patcher, family: str) -> torch.Tensor:
    with torch.no_grad():
        return patcher.model.apply_model(latent(family), timesteps(2.0), **conditioning(family))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_the_real_architecture_with_filled_weights(family, tiny_model_factory):
    patcher = tiny_model_factory(family)
    assert type(patcher.model) is MODEL_CLASSES[family]
    assert all(torch.isfinite(p).all() for p in patcher.model.parameters())
    out = predict(patcher, family)
    assert out.shape == latent(family).shape
    assert torch.isfinite(out).all() and out.std() > 0.1
    # seeded: a second build is identical, another seed is not
    torch.testing.assert_close(predict(build_model(family, 0), family), out, rtol=0, atol=0)
    assert not torch.equal(predict(build_model(family, 1), family), out)


@pytest.mark.parametrize("style", KEY_STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_files_load_fully_through_comfyui(family, style, tiny_model_factory, tmp_path, caplog):
    patcher = tiny_model_factory(family)
    path = write_lora(tmp_path / f"{family}_{style}.safetensors", family, patcher.model, style)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    with caplog.at_level("WARNING"):
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map)
    assert "lora key not loaded" not in caplog.text
    suffixes = (".lora_up.weight", ".lora_B.weight")
    assert len(patches) == sum(k.endswith(suffixes) for k in lora)
    if style == "peft" and family in ("sd3", "flux"):
        assert any(isinstance(target, tuple) for target in patches), "diffusers q/k/v must map to fused-qkv slices"
    merged, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    base_out = predict(patcher, family)
    comfy.model_management.load_models_gpu([merged])
    assert not torch.allclose(predict(merged, family), base_out, atol=1e-3), "the LoRA must change the prediction"
    comfy.model_management.unload_all_models()
    torch.testing.assert_close(predict(patcher, family), base_out, rtol=0, atol=0)


def test_peft_file_is_written_by_peft(tiny_model_factory, tmp_path):
    path = write_lora(tmp_path / "p.safetensors", "sd15", tiny_model_factory("sd15").model, "peft")
    keys = comfy.utils.load_torch_file(str(path), safe_load=True).keys()
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)


def test_demo_checkpoint_loads_as_sd15_with_full_text_encoder_and_vae(demo_models):
    import comfy.supported_models

    models_dir, checkpoint, _ = demo_models
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(models_dir / "checkpoints" / checkpoint))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    text_params = sum(p.numel() for p in clip.cond_stage_model.parameters())
    assert 120e6 < text_params < 125e6, "SD1.5's CLIP-L text encoder has about 123 M parameters"
    assert sum(p.numel() for p in vae.first_stage_model.parameters()) > 80e6
    assert model.model.model_config.unet_config["channel_mult"] == [1, 2]  # the reduced UNet
