"""Every bad input gets a clear error naming the problem and the fix; nothing the user had changes."""

from __future__ import annotations

import logging
import math
import os

import comfy.model_management
import comfy.samplers
import pytest
import safetensors.torch
import torch

from support.engine_helpers import ForwardCounter, assert_same_weights, make_guider, run_sampler, snapshot
from support.lora_files import write_lora


@pytest.fixture
def sd15(tiny_model_factory):
    return tiny_model_factory("sd15")


@pytest.fixture
def good_lora(sd15, loras_folder) -> str:
    return write_lora(loras_folder / "good.safetensors", "sd15", sd15.model, "kohya").name


def adapter_set(engine, sd15, entries):
    return engine.adapter_set.AdapterSet(sd15, entries)


def test_missing_lora_file(engine, sd15, loras_folder):
    with pytest.raises(engine.adapters.LoRAInputError, match=r"'nope.safetensors' is not in ComfyUI's loras folders .*Refresh"):
        adapter_set(engine, sd15, [("nope.safetensors", 1.0)])


def test_pickled_file_is_refused_and_never_unpickled(engine, sd15, loras_folder, pickled_lora, unpickled_marker):
    (loras_folder / "evil.ckpt").write_bytes(pickled_lora)
    with pytest.raises(engine.adapters.LoRAInputError, match=r"not a \.safetensors file.*convert the file"):
        adapter_set(engine, sd15, [("evil.ckpt", 1.0)])
    assert not unpickled_marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(engine, sd15, loras_folder, good_lora, damage):
    data = (loras_folder / good_lora).read_bytes()
    broken = data[: len(data) // 2] if damage == "truncated" else b"\x00\x01not a safetensors header" * 10
    (loras_folder / "broken.safetensors").write_bytes(broken)
    with pytest.raises(engine.adapters.LoRAInputError, match=r"'broken.safetensors' could not be read.*truncated or corrupt"):
        adapter_set(engine, sd15, [("broken.safetensors", 1.0)])


def test_lora_for_another_architecture(engine, sd15, tiny_model_factory, loras_folder):
    write_lora(loras_folder / "flux.safetensors", "flux", tiny_model_factory("flux").model, "kohya")
    with pytest.raises(engine.adapters.LoRAInputError, match=r"matches none of the layers of this model \(SD15\).*made for Flux"):
        adapter_set(engine, sd15, [("flux.safetensors", 1.0)])


def test_partly_matching_lora_warns_with_counts(engine, sd15, loras_folder, good_lora, caplog):
    state = safetensors.torch.load_file(str(loras_folder / good_lora))
    state["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 4)
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 4)
    safetensors.torch.save_file(state, str(loras_folder / "partial.safetensors"))
    with caplog.at_level(logging.WARNING):
        adapters = adapter_set(engine, sd15, [("partial.safetensors", 1.0)])
    assert "LoRA 'partial.safetensors' matched 75 of its 76 layers" in caplog.text
    assert len(adapters) == 1


def test_no_adapters_is_a_clear_error(engine, sd15):
    with pytest.raises(engine.adapters.LoRAInputError, match=r"the LoRA stack is empty.*KSampler"):
        adapter_set(engine, sd15, [])


def test_same_lora_twice(engine, sd15, good_lora):
    with pytest.raises(engine.adapters.LoRAInputError, match=r"'good.safetensors' is in the stack twice"):
        adapter_set(engine, sd15, [(good_lora, 1.0), (good_lora, 0.5)])


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf])
def test_non_finite_strength(engine, sd15, good_lora, strength):
    with pytest.raises(engine.adapters.LoRAInputError, match=r"has strength .*finite number"):
        adapter_set(engine, sd15, [(good_lora, strength)])


def test_patch_size_larger_than_the_latent_is_one_patch(engine, sd15, loras_folder, good_lora):
    second = write_lora(loras_folder / "second.safetensors", "sd15", sd15.model, "peft", seed=4).name
    guider = make_guider(engine, "loratorio", sd15, [(good_lora, 1.0, 1.0), (second, 1.0, 1.0)], patch_size=256)
    out = run_sampler(engine, guider)["samples"]
    assert torch.isfinite(out).all()
    maps = guider.weight_history.maps()
    assert torch.equal(maps, maps[..., :1, :1].expand_as(maps)), "one patch: one weight per adapter over the latent"


def test_more_adapters_than_fit_in_one_forward_split_and_agree(engine, sd15, loras_folder, good_lora, monkeypatch):
    others = [write_lora(loras_folder / f"o{i}.safetensors", "sd15", sd15.model, "comfy", seed=20 + i).name for i in range(2)]
    stack = [(n, 1.0, 1.0) for n in (good_lora, *others)]
    weights = snapshot(sd15)
    whole = run_sampler(engine, make_guider(engine, "composite", sd15, stack))["samples"]
    per_row = sd15.model.memory_required([1, 4, 16, 16])
    free = per_row * 2.5 * 1.5  # room for two rows at a time, as calc_cond_batch estimates it

    def little_free_memory(dev=None, torch_free_too=False):
        return (free, free) if torch_free_too else free

    monkeypatch.setattr(comfy.model_management, "get_free_memory", little_free_memory)
    with ForwardCounter(sd15) as counter:
        split = run_sampler(engine, make_guider(engine, "composite", sd15, stack))["samples"]
    assert max(counter.rows) < 6 and sum(counter.rows) == 6 * 3, counter.rows
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert_same_weights(sd15, weights)


def test_missing_negative_with_cfg_above_one(engine, sd15, good_lora):
    from support.tiny_models import conditioning

    positive = [[conditioning("sd15")["c_crossattn"], {}]]
    guider = engine.build.composite_guider(sd15, positive, None, [(good_lora, 1.0, 1.0)], 5.0)
    with pytest.raises(ValueError, match=r"no negative conditioning.*set cfg to 1"):
        run_sampler(engine, guider)


def test_lora_file_cache_reuses_and_invalidates_on_change(engine, sd15, loras_folder, good_lora):
    cache = engine.adapters.LoRAFileCache(max_entries=2)
    path = str(loras_folder / good_lora)
    first = cache.load(path, good_lora)
    assert cache.load(path, good_lora) is first
    write_lora(loras_folder / good_lora, "sd15", sd15.model, "kohya", seed=99)
    stat = os.stat(path)
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    changed = cache.load(path, good_lora)
    assert changed is not first
    key = next(k for k in first if k.endswith(".lora_up.weight"))
    assert not torch.equal(changed[key], first[key])
    for i in range(3):
        extra = write_lora(loras_folder / f"x{i}.safetensors", "sd15", sd15.model, "comfy", seed=i)
        cache.load(str(extra), extra.name)
    assert len(cache) == 2


NOT_CONNECTIONS = ["notalink", None, {}, 3]


@pytest.mark.parametrize("value", NOT_CONNECTIONS, ids=repr)
def test_every_socket_input_that_is_not_a_connection_names_the_input_and_the_fix(pack, engine, value):
    """An API prompt can hand a socket input a plain value, and ComfyUI passes it through unchecked."""
    from comfyui_loratorio.nodes.sockets import SOCKET_CHECKS

    checked = set()
    for node_class in pack.NODE_CLASS_MAPPINGS.values():
        input_types = node_class.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in input_types.get(section, {}).items():
                if not isinstance(spec[0], str) or spec[0] not in SOCKET_CHECKS or (value is None and section == "optional"):
                    continue
                pattern = rf"input '{name}' needs a {spec[0]} from a connected node.*Connect a {spec[0]} output"
                with pytest.raises(engine.adapters.LoRAInputError, match=pattern):
                    getattr(node_class(), node_class.FUNCTION)(**{name: value})
                checked.add(spec[0])
    expected = {"MODEL", "CLIP", "CONDITIONING", "LATENT", "MASK", "GUIDER", "LORA_STACK"}
    assert checked == expected | ({"LORA_CONDITIONING"} if value is not None else set())


def test_malformed_conditioning_is_refused_and_well_formed_sockets_pass(pack, engine, sd15, good_lora):
    guider_node = pack.NODE_CLASS_MAPPINGS["LoRAtorioCompositeGuider"]()
    cond = [[torch.zeros(1, 77, 32), {}]]
    (guider,) = guider_node.get_guider(sd15, cond, cond, [(good_lora, 1.0, 1.0)], 5.0)
    assert isinstance(guider, comfy.samplers.CFGGuider)
    with pytest.raises(engine.adapters.LoRAInputError, match="Composite Guider: input 'positive' needs a CONDITIONING"):
        guider_node.get_guider(sd15, [torch.zeros(1, 77, 32)], cond, [(good_lora, 1.0, 1.0)], 5.0)
    from comfyui_loratorio.nodes.sockets import is_conditioning

    assert is_conditioning([[None, {"pooled_output": None}]]) and is_conditioning([])  # as ComfyUI's convert_cond reads them


def test_text_encode_with_an_empty_stack_says_so(pack, engine):
    from support.tiny_models import build_clip

    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRATextEncode"]()
    with pytest.raises(engine.adapters.LoRAInputError, match="Multi-LoRA Text Encode: the LoRA stack is empty"):
        node.encode(build_clip(), "a prompt", [])
