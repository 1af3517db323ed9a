"""LoRA files and inputs as users and API clients send them: applied exactly as ComfyUI's LoraLoader
applies them, or refused before sampling with a message that names the file and the fix."""

from __future__ import annotations

import logging
import math

import comfy.utils
import nodes as comfy_nodes
import pytest
import safetensors.torch
import torch

from support.engine_helpers import STEPS, assert_same_weights, comfy_conditioning, make_guider, run_sampler, snapshot
from support.lora_files import write_kohya, write_lora
from support.tiny_models import build_clip, merge_tolerance

CROSS_ATTENTION_INPUTS = ("attn2_to_k.lora_down.weight", "attn2_to_v.lora_down.weight")


@pytest.fixture
def sd15(tiny_model_factory):
    return tiny_model_factory("sd15")


def ksampler(patcher) -> torch.Tensor:
    (out,) = comfy_nodes.common_ksampler(
        patcher, 3, STEPS, 5.0, "euler", "normal", comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9),
        {"samples": torch.zeros(1, 4, 16, 16)},
    )  # fmt: skip
    return out["samples"]


def assert_same_image_as_lora_loader(engine, sd15, guider, name: str, strength: float) -> None:
    """``guider`` samples what ComfyUI's LoraLoader + KSampler give for that file at that strength."""
    (merged,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(sd15, name, strength)
    expected = ksampler(merged)
    got = run_sampler(engine, guider)["samples"]
    tolerance = merge_tolerance(on_cpu=1e-4)
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def rewrite(folder, source: str, name: str, change) -> str:
    state = safetensors.torch.load_file(str(folder / source))
    change(state)
    safetensors.torch.save_file(state, str(folder / name))
    return name


def widen_cross_attention(state: dict, width: int = 2048) -> None:
    """What an SDXL file has where an SD1.5 one has 768: the text encoder's width at attn2's keys and values."""
    for key in [k for k in state if k.endswith(CROSS_ATTENTION_INPUTS)]:
        state[key] = torch.randn(state[key].shape[0], width) / width**0.5


def test_layers_of_another_sd_family_are_skipped_like_lora_loader_does(engine, sd15, loras_folder, caplog):
    good = write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "kohya", seed=4).name
    name = rewrite(loras_folder, good, "sdxl-like.safetensors", widen_cross_attention)
    with caplog.at_level(logging.WARNING):
        guider = make_guider(engine, "composite", sd15, [(name, 0.8, 0.8)])
    assert "LoRA 'sdxl-like.safetensors' does not fit" in caplog.text and "looks made for SDXL" in caplog.text
    assert "attn2.to_k" in caplog.text or "attn2.to_v" in caplog.text
    assert_same_image_as_lora_loader(engine, sd15, guider, name, 0.8)


def test_a_file_none_of_whose_layers_fit_is_refused_before_sampling(engine, sd15, loras_folder):
    good = write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "kohya", seed=4).name

    def only_cross_attention(state: dict) -> None:
        widen_cross_attention(state)
        for key in [k for k in state if "attn2_to_k" not in k and "attn2_to_v" not in k]:
            del state[key]

    name = rewrite(loras_folder, good, "all-wrong.safetensors", only_cross_attention)
    with pytest.raises(engine.adapters.LoRAInputError, match=r"'all-wrong.safetensors' fits none of the layers.*made for SDXL"):
        make_guider(engine, "loratorio", sd15, [(name, 1.0, 1.0)])
    with pytest.raises(engine.adapters.LoRAInputError, match=r"fits none of the layers"):
        comfy_nodes_merge().merge(sd15, [(name, 1.0, 1.0)])


def comfy_nodes_merge():
    import comfyui_loratorio

    return comfyui_loratorio.NODE_CLASS_MAPPINGS["LoRAtorioMerge"]()


def test_wrong_output_size_on_one_layer_is_skipped_with_a_warning(engine, sd15, loras_folder, caplog):
    good = write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "kohya", seed=4).name

    def shrink_one_output(state: dict) -> None:
        key = sorted(k for k in state if k.endswith(".lora_up.weight"))[0]
        state[key] = state[key][:-1].contiguous()

    name = rewrite(loras_folder, good, "one-bad-layer.safetensors", shrink_one_output)
    with caplog.at_level(logging.WARNING):
        guider = make_guider(engine, "switch", sd15, [(name, 1.0, 1.0)])
    assert "does not fit 1 of its" in caplog.text and "outputs" in caplog.text
    assert_same_image_as_lora_loader(engine, sd15, guider, name, 1.0)


def test_text_encoder_only_file_points_to_multi_lora_text_encode(engine, sd15, loras_folder):
    clip = build_clip()
    full = write_kohya(loras_folder / "te.safetensors", "sd15", sd15.model, seed=5, clip=clip).name
    name = rewrite(
        loras_folder, full, "te-only.safetensors", lambda s: [s.pop(k) for k in [k for k in s if k.startswith("lora_unet_")]]
    )
    with pytest.raises(
        engine.adapters.LoRAInputError, match=r"'te-only.safetensors' holds only text-encoder weights.*Multi-LoRA Text Encode"
    ):
        make_guider(engine, "composite", sd15, [(name, 1.0, 1.0)])


def test_text_encode_passes_only_text_encoder_keys(pack, sd15, loras_folder, caplog):
    clip = build_clip()
    name = write_kohya(loras_folder / "both.safetensors", "sd15", sd15.model, seed=5, clip=clip).name
    with caplog.at_level(logging.WARNING):
        pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRATextEncode"]().encode(clip, "a red disk", [(name, 1.0, 1.0)])
    assert "lora key not loaded" not in caplog.text


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_tensors_are_refused_naming_the_file(engine, sd15, loras_folder, bad):
    good = write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "comfy", seed=4).name

    def poison(state: dict) -> None:
        key = sorted(state)[3]
        state[key] = state[key].clone()
        state[key].view(-1)[0] = bad

    name = rewrite(loras_folder, good, "poisoned.safetensors", poison)
    for method in ("loratorio", "composite", "switch"):
        with pytest.raises(engine.adapters.LoRAInputError, match=r"'poisoned.safetensors' holds NaN or infinite values"):
            make_guider(engine, method, sd15, [(name, 1.0, 1.0)])
    with pytest.raises(engine.adapters.LoRAInputError, match=r"NaN or infinite"):
        comfy_nodes_merge().merge(sd15, [(name, 1.0, 1.0)])


@pytest.mark.parametrize("strength", [1e30, -1e30, math.nan, math.inf])
def test_strengths_are_bounded_in_every_node(pack, engine, sd15, loras_folder, strength):
    name = write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "kohya", seed=4).name
    stack_from_another_pack = [(name, strength, 1.0)]
    weights = snapshot(sd15)
    with pytest.raises(ValueError, match=r"strength .*between -100 and 100"):
        comfy_nodes_merge().merge(sd15, stack_from_another_pack)
    with pytest.raises(ValueError, match=r"strength .*between -100 and 100"):
        pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"]().collect(lora_stack=stack_from_another_pack)
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioCompositeSampler"]()
    positive, negative = comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9)
    sampling = {"seed": 1, "steps": 2, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    with pytest.raises(ValueError, match=r"strength .*between -100 and 100"):
        node.sample(sd15, positive, negative, stack_from_another_pack, 5.0, {"samples": torch.zeros(1, 4, 16, 16)}, **sampling)
    assert_same_weights(sd15, weights)


def test_cfg_nan_is_refused(pack, sd15, loras_folder):
    name = write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "kohya", seed=4).name
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioGuider"]()
    with pytest.raises(ValueError, match=r"cfg is nan; use a finite number"):
        node.get_guider(sd15, comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9), [(name, 1.0, 1.0)], math.nan,
                        patch_size=4, temperature=0.05, recentre_lambda=0.5, top_k=0, top_k_mode="image")  # fmt: skip


def test_loader_lists_only_safetensors(pack, loras_folder, pickled_lora):
    (loras_folder / "old.pt").write_bytes(pickled_lora)
    (loras_folder / "old.ckpt").write_bytes(pickled_lora)
    (loras_folder / "new.safetensors").write_bytes(b"")
    choices = pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"].INPUT_TYPES()["optional"]["lora_1"][0]
    assert choices == ["None", "new.safetensors"]


def test_messages_carry_no_absolute_path(engine, sd15, loras_folder):
    with pytest.raises(engine.adapters.LoRAInputError) as missing:
        make_guider(engine, "composite", sd15, [("nope.safetensors", 1.0, 1.0)])
    (loras_folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + b"\x00" * 64)
    with pytest.raises(engine.adapters.LoRAInputError) as broken:
        make_guider(engine, "composite", sd15, [("broken.safetensors", 1.0, 1.0)])
    for error in (missing.value, broken.value):
        assert str(loras_folder) not in str(error) and "/tmp" not in str(error), str(error)
    assert f"{type(missing.value).__module__}.{type(missing.value).__qualname__}" == "loratorio.LoRAInputError"


def test_loratorio_sampler_at_denoise_zero_returns_the_latent_like_ksampler(pack, sd15, loras_folder):
    name = write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "kohya", seed=4).name
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))}
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioSampler"]()
    shown = node.sample(sd15, comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9), [(name, 1.0, 1.0)], 5.0, latent,
                        seed=1, steps=4, sampler_name="euler", scheduler="normal", denoise=0.0, patch_size=4,
                        temperature=0.05, recentre_lambda=0.5, top_k=0, top_k_mode="image")  # fmt: skip
    out, weight_maps = shown["result"]
    (expected,) = comfy_nodes.common_ksampler(
        sd15, 1, 4, 5.0, "euler", "normal", comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9), latent, denoise=0.0
    )
    torch.testing.assert_close(out["samples"], expected["samples"])
    assert weight_maps.ndim == 4 and weight_maps.shape[-1] == 3


def test_diffusers_layout_unet_attention_layers_are_applied(engine, sd15, loras_folder, pack):
    """diffusers' own training scripts name UNet attention layers ``attn1.to_q`` (no ``processor``);
    ComfyUI drops them, the pack maps them, in composition and in Merge alike."""
    from support.lora_files import diffusers_targets

    generator = torch.Generator().manual_seed(8)
    tensors = {}
    for target in diffusers_targets("sd15", sd15.model):
        if len(target.shape) != 2:
            continue
        tensors[f"unet.{target.file_name}.lora_A.weight"] = torch.randn(4, target.shape[1], generator=generator) / 8
        tensors[f"unet.{target.file_name}.lora_B.weight"] = torch.randn(target.shape[0], 4, generator=generator) / 2
    safetensors.torch.save_file(tensors, str(loras_folder / "diffusers.safetensors"))
    adapters = engine.adapter_set.AdapterSet(sd15, [("diffusers.safetensors", 1.0)])
    parsed = adapters.adapters[0].parsed
    assert parsed.matched == parsed.total and any("attn1.to_q" in m for m in parsed.factors)
    (merged, _) = comfy_nodes_merge().merge(sd15, [("diffusers.safetensors", 1.0, 1.0)])
    expected = ksampler(merged)
    got = run_sampler(engine, make_guider(engine, "composite", sd15, [("diffusers.safetensors", 1.0, 1.0)]))["samples"]
    tolerance = merge_tolerance(on_cpu=1e-4)
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    state = comfy.utils.load_torch_file(str(loras_folder / "diffusers.safetensors"))
    assert len(engine.adapters.diffusion_patches(state, sd15.model)) == len(tensors) // 2


def test_a_diffusion_model_from_another_package_is_refused_by_name(engine, loras_folder, tiny_model_factory):
    """Nunchaku-style models replace ComfyUI's diffusion model class with their own."""
    from support.tiny_models import build_model

    class QuantisedUNet(torch.nn.Module):
        pass

    QuantisedUNet.__module__ = "nunchaku.models"
    patcher = build_model("sd15")
    name = write_lora(loras_folder / "good.safetensors", "sd15", patcher.model, "kohya", seed=4).name
    patcher.model.diffusion_model = QuantisedUNet()
    with pytest.raises(engine.adapters.LoRAInputError, match=r"nunchaku\.models\..*QuantisedUNet, not one of ComfyUI's own"):
        make_guider(engine, "composite", patcher, [(name, 1.0, 1.0)])
