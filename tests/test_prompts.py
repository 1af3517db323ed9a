"""Per-adapter prompt encoding with each LoRA's text-encoder weights."""

from __future__ import annotations

import nodes as comfy_nodes
import pytest
import torch

from support.engine_helpers import STEPS, make_guider, run_sampler
from support.lora_files import write_kohya
from support.tiny_models import build_clip


@pytest.fixture(scope="module")
def clip():
    return build_clip()


@pytest.fixture
def te_lora(tiny_model_factory, loras_folder, clip) -> str:
    return write_kohya(loras_folder / "with_te.safetensors", "sd15", tiny_model_factory("sd15").model, seed=5, clip=clip).name


@pytest.fixture
def unet_only_lora(tiny_model_factory, loras_folder) -> str:
    return write_kohya(loras_folder / "unet_only.safetensors", "sd15", tiny_model_factory("sd15").model, seed=6).name


def encode(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def test_each_adapter_gets_its_text_encoder_weights(pack, clip, te_lora, unet_only_lora, tiny_model_factory):
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRATextEncode"]()
    (per_adapter,) = node.encode(clip, "a red disk", [(te_lora, 1.0, 0.6), (unet_only_lora, 1.0, 1.0)])
    base = encode(clip, "a red disk")
    _, patched_clip = comfy_nodes.LoraLoader().load_lora(tiny_model_factory("sd15"), clip, te_lora, 0.0, 0.6)
    expected = encode(patched_clip, "a red disk")
    torch.testing.assert_close(per_adapter[0][0][0], expected[0][0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_adapter[0][0][0], base[0][0], atol=1e-3)
    torch.testing.assert_close(per_adapter[1][0][0], base[0][0], rtol=0, atol=0)
    torch.testing.assert_close(encode(clip, "a red disk")[0][0], base[0][0], rtol=0, atol=0)  # the base CLIP is untouched


def test_composite_with_adapter_prompts_equals_lora_loader_pipeline(engine, pack, clip, te_lora, tiny_model_factory):
    model = tiny_model_factory("sd15")
    stack = [(te_lora, 0.9, 0.7)]
    encoder = pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRATextEncode"]()
    (adapter_positive,) = encoder.encode(clip, "a red disk", stack)
    (adapter_negative,) = encoder.encode(clip, "blurry", stack)
    guider = make_guider(engine, "composite", model, stack)
    guider.set_conds(encode(clip, "a red disk"), encode(clip, "blurry"), adapter_positive, adapter_negative)
    got = run_sampler(engine, guider)["samples"]

    merged_model, merged_clip = comfy_nodes.LoraLoader().load_lora(model, clip, te_lora, 0.9, 0.7)
    (expected,) = comfy_nodes.common_ksampler(
        merged_model, 3, STEPS, 5.0, "euler", "normal", encode(merged_clip, "a red disk"), encode(merged_clip, "blurry"),
        {"samples": torch.zeros(1, 4, 16, 16)},
    )  # fmt: skip
    torch.testing.assert_close(got, expected["samples"], rtol=1e-4, atol=1e-4 * expected["samples"].abs().max().item())


def test_adapter_prompt_count_must_match(engine, clip, te_lora, unet_only_lora, tiny_model_factory):
    guider = make_guider(engine, "composite", tiny_model_factory("sd15"), [(te_lora, 1.0, 1.0), (unet_only_lora, 1.0, 1.0)])
    with pytest.raises(ValueError, match="holds 1 conditionings for 2 LoRAs"):
        guider.set_conds(encode(clip, "x"), encode(clip, "y"), [encode(clip, "x")])


def test_text_encoder_layers_do_not_count_as_unmatched(engine, te_lora, tiny_model_factory, caplog):
    with caplog.at_level("WARNING"):
        adapters = engine.adapter_set.AdapterSet(tiny_model_factory("sd15"), [(te_lora, 1.0)])
    assert "matched" not in caplog.text
    assert adapters.adapters[0].parsed.matched == adapters.adapters[0].parsed.total == 75
