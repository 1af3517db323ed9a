"""MultiLoRALoader and the LoRAMerge baseline inside the real ComfyUI node API."""

from __future__ import annotations

import comfy.model_management
import nodes as comfy_nodes
import pytest
import torch

from support.lora_files import write_lora
from support.tiny_models import conditioning, latent, timesteps


def predict(patcher) -> torch.Tensor:
    comfy.model_management.load_models_gpu([patcher])
    with torch.no_grad():
        out = patcher.model.apply_model(latent("sd15"), timesteps(2.0), **conditioning("sd15"))
    comfy.model_management.unload_all_models()
    return out


@pytest.fixture
def sd15_loras(loras_folder, tiny_model_factory):
    model = tiny_model_factory("sd15").model
    return [
        write_lora(loras_folder / f"{style}.safetensors", "sd15", model, style, seed=i).name
        for i, style in enumerate(("kohya", "peft", "comfy"))
    ]


def test_nodes_are_registered(pack):
    assert {"LoRAtorioMultiLoRALoader", "LoRAtorioMerge"} <= set(pack.NODE_CLASS_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web"
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert name in pack.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("loratorio")
        cls.INPUT_TYPES()


def test_multi_lora_loader_outputs_the_trigger_words_of_enabled_loras_in_order(pack, sd15_loras, loras_folder):
    import safetensors.torch

    for name, metadata in (
        ("character.safetensors", {"modelspec.trigger_phrase": "knight, red shield"}),
        ("style.safetensors", {"trigger_words": '["watercolour", "knight"]'}),
        ("off.safetensors", {"modelspec.trigger_phrase": "never shown"}),
    ):
        tensors = safetensors.torch.load_file(str(loras_folder / sd15_loras[0]))
        safetensors.torch.save_file(tensors, str(loras_folder / name), metadata=metadata)
    loader = pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"]()
    rows = {"lora_1": "style.safetensors", "lora_2": "off.safetensors", "enabled_2": False, "lora_3": sd15_loras[1]}
    (stack, words) = loader.collect(lora_stack=[("character.safetensors", 1.0, 1.0)], **rows)
    assert [entry.lora_name for entry in stack] == ["character.safetensors", "style.safetensors", sd15_loras[1]]
    assert words == "knight, red shield, watercolour"
    assert pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"].RETURN_TYPES == ("LORA_STACK", "STRING")


def test_multi_lora_loader_collects_enabled_rows_in_order(pack, sd15_loras):
    loader = pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"]()
    incoming = [(sd15_loras[2], 0.3, 0.2)]
    (stack, _) = loader.collect(
        lora_stack=incoming,
        lora_1=sd15_loras[0],
        strength_1=0.8,
        enabled_1=True,
        lora_2=sd15_loras[1],
        strength_2=1.0,
        enabled_2=False,
        lora_3="None",
        strength_3=1.0,
        enabled_3=True,
        lora_4=sd15_loras[1],
        strength_4=-0.5,
        enabled_4=True,
    )
    assert [tuple(e) for e in stack] == [(sd15_loras[2], 0.3, 0.2), (sd15_loras[0], 0.8, 0.8), (sd15_loras[1], -0.5, -0.5)]
    assert incoming == [(sd15_loras[2], 0.3, 0.2)], "the incoming stack must not be modified"
    assert sd15_loras[0] in pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"].INPUT_TYPES()["optional"]["lora_1"][0]


def test_lora_merge_equals_chained_lora_loaders(pack, sd15_loras, tiny_model_factory):
    base = tiny_model_factory("sd15")
    before = predict(base)
    stack = [(sd15_loras[0], 0.7, 0.7), (sd15_loras[1], 1.2, 1.2)]
    (merged, clip) = pack.NODE_CLASS_MAPPINGS["LoRAtorioMerge"]().merge(base, stack)
    assert clip is None
    chained = base
    for name, strength, _ in stack:
        (chained,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(chained, name, strength)
    torch.testing.assert_close(predict(merged), predict(chained), rtol=0, atol=0)
    assert not torch.allclose(predict(merged), before, atol=1e-3)
    torch.testing.assert_close(predict(base), before, rtol=0, atol=0)  # the input MODEL is untouched


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        ([("missing.safetensors", 1.0, 1.0)], "missing.safetensors' is not in ComfyUI's loras folders"),
        ("a string", "input .lora_stack. needs a LORA_STACK from a connected node"),
        ([("x.safetensors", 1.0)], "row 1"),
        ([("x.safetensors", "strong", 1.0)], "non-numeric strengths"),
    ],
)
def test_bad_lora_stacks_raise_clear_errors(pack, loras_folder, stack, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"]().collect(lora_stack=stack)


def test_a_failing_node_module_does_not_take_the_pack_down(pack, caplog):
    collect = pack.nodes.collect_node_modules
    with caplog.at_level("ERROR"):
        classes, names, failures = collect(pack.nodes.__name__, ("loaders", "no_such_module", "merge"))
    assert {"LoRAtorioMultiLoRALoader", "LoRAtorioMerge"} <= set(classes) and set(classes) == set(names)
    assert list(failures) == ["no_such_module"] and "ModuleNotFoundError" in failures["no_such_module"]
    assert "no_such_module" in caplog.text
    assert pack.nodes.FAILED_MODULES == {}


def test_every_node_has_a_help_page_and_a_description(pack):
    from pathlib import Path

    docs = Path(pack.__file__).parent / "web" / "docs"
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        if getattr(cls, "DEPRECATED", False):
            continue  # an old id: its node's page is under the new id
        page = docs / f"{name}.md"
        assert page.is_file(), f"no help page web/docs/{name}.md"
        assert page.read_text().startswith("# "), f"{page.name} has no title"
        assert len(cls.DESCRIPTION) > 40
