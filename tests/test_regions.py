"""Per-LoRA regions: the core rules, and LoRAtorio and Composite honouring them in real sampling."""

from __future__ import annotations

import logging

import pytest
import torch

import loratorio_core as lc
from support.engine_helpers import make_guider, run_sampler
from support.lora_files import write_lora


def halves(height: int = 64, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    left = torch.zeros(height, width)
    left[:, : width // 2] = 1.0
    return left, 1.0 - left


def test_masks_are_resized_by_area_to_any_grid():
    left, _ = halves(60, 90)
    resized = lc.resize_mask(left, 2, 4, 6)
    assert resized.shape == (2, 4, 6)
    assert torch.equal(resized[:, :, :3], torch.ones(2, 4, 3)) and torch.equal(resized[:, :, 3:], torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="one per image"):
        lc.resize_mask(torch.zeros(3, 8, 8), 2, 4, 4)


def predictions(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_hard_regions_confine_the_routing_and_leave_the_rest_to_the_base():
    adapters, base = predictions(2), predictions(1, seed=1)[0]
    params = lc.LoRAtorioParams(patch_size=4)
    left, _ = halves()
    weights = lc.routing_weights(adapters, base, params, [lc.Region(left), None])
    assert torch.all(weights[0, ..., 8:] == 0), "the left-half LoRA does not act on the right"
    torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]))
    both_left = lc.routing_weights(adapters, base, params, [lc.Region(left), lc.Region(left)])
    assert torch.all(both_left[..., 8:] == 0) and torch.allclose(both_left[..., :8].sum(0), torch.ones(1, 1, 16, 8))
    composed = lc.weighted_with_base(both_left, adapters, base)
    torch.testing.assert_close(composed[..., 8:], base[..., 8:]), "where no LoRA may act, the base model's prediction"
    assert torch.equal(lc.routing_weights(adapters, base, params, [None, None]), lc.routing_weights(adapters, base, params))


def test_a_soft_region_favours_its_lora_inside_only():
    adapters, base = predictions(2), predictions(1, seed=1)[0]
    params = lc.LoRAtorioParams(patch_size=4, temperature=0.05)
    left, _ = halves()
    plain = lc.routing_weights(adapters, base, params)
    soft = lc.routing_weights(adapters, base, params, [lc.Region(left, hard=False, strength=4.0), None])
    assert torch.all(soft[0, ..., :8] >= plain[0, ..., :8]) and torch.any(soft[0, ..., :8] > plain[0, ..., :8] + 0.01)
    torch.testing.assert_close(soft[..., 8:], plain[..., 8:])


def test_composite_regions_pick_each_lora_in_its_half():
    adapters = predictions(3)
    left, right = halves(16, 16)
    maps = lc.region_maps([lc.Region(left), lc.Region(right), lc.Region(torch.zeros(16, 16))], 1, 16, 16, torch.device("cpu"))
    mixed = lc.regional_mean(adapters, maps)
    torch.testing.assert_close(mixed[..., :8], adapters[0, ..., :8])
    torch.testing.assert_close(mixed[..., 8:], adapters[1, ..., 8:])
    nowhere = lc.region_maps([lc.Region(torch.zeros(16, 16))] * 3, 1, 16, 16, torch.device("cpu"))
    torch.testing.assert_close(lc.regional_mean(adapters, nowhere), lc.adapter_mean(adapters)), "no region: the plain mean"


@pytest.fixture
def stack(tiny_model_factory, loras_folder):
    model = tiny_model_factory("sd15").model
    return [
        (write_lora(loras_folder / f"r{i}.safetensors", "sd15", model, "kohya", seed=30 + i).name, 1.0, 1.0) for i in range(2)
    ]


def with_regions(pack, stack, *regions: tuple[int, torch.Tensor, str]):
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioRegionMask"]()
    for position, mask, mode in regions:
        (stack,) = node.set_region(stack, position, mask.unsqueeze(0), mode, 4.0)
    return stack


def test_loratorio_routes_each_lora_only_inside_its_region(engine, pack, tiny_model_factory, stack):
    patcher = tiny_model_factory("sd15")
    left, right = halves()  # image-sized masks (64 px) on a 16x16 latent: resized
    regional = make_guider(engine, "loratorio", patcher, with_regions(pack, stack, (1, left, "hard"), (2, right, "hard")))
    got = run_sampler(engine, regional)["samples"]
    maps = regional.weight_history.maps()  # [steps, N, H, W]
    assert torch.all(maps[:, 0, :, 8:] == 0) and torch.all(maps[:, 1, :, :8] == 0)
    assert torch.allclose(maps.sum(1), torch.ones_like(maps[:, 0]))
    plain = run_sampler(engine, make_guider(engine, "loratorio", patcher, stack))["samples"]
    assert not torch.allclose(got, plain, atol=1e-3)


def test_composite_uses_regions_and_switch_says_it_does_not(engine, pack, tiny_model_factory, stack, caplog):
    patcher = tiny_model_factory("sd15")
    left, right = halves()
    regional_stack = with_regions(pack, stack, (1, left, "hard"), (2, right, "soft"))
    got = run_sampler(engine, make_guider(engine, "composite", patcher, regional_stack))["samples"]
    plain = run_sampler(engine, make_guider(engine, "composite", patcher, stack))["samples"]
    assert torch.isfinite(got).all() and not torch.allclose(got, plain, atol=1e-3)
    with caplog.at_level(logging.WARNING):
        make_guider(engine, "switch", patcher, regional_stack)
    assert "LoRA Switch ignores the regions" in caplog.text


def test_region_node_errors_name_the_problem(pack, stack):
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioRegionMask"]()
    with pytest.raises(Exception, match="between 1 and 2"):
        node.set_region(stack, 3, torch.ones(1, 8, 8), "hard", 4.0)
    with pytest.raises(Exception, match="finite values"):
        node.set_region(stack, 1, torch.full((1, 8, 8), float("nan")), "hard", 4.0)
    with pytest.raises(Exception, match=r"\[H, W\]"):
        node.set_region(stack, 1, torch.ones(1, 1, 8, 8), "hard", 4.0)
    # a hard region does not use its soft strength, but NaN is still refused
    with pytest.raises(Exception, match=r"soft strength must lie in \[0, 50\], got nan"):
        node.set_region(stack, 1, torch.ones(1, 8, 8), "hard", float("nan"))


def test_a_mask_batch_that_fits_no_latent_batch_names_the_lora(engine, pack, tiny_model_factory, stack):
    patcher = tiny_model_factory("sd15")
    (regional,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioRegionMask"]().set_region(stack, 2, torch.ones(3, 64, 64), "hard", 4.0)
    for method in ("loratorio", "composite"):
        guider = make_guider(engine, method, patcher, regional)
        with pytest.raises(ValueError, match=rf"region mask of LoRA '{stack[1][0]}' holds 3 masks for a batch of 2 images"):
            run_sampler(engine, guider, {"samples": torch.zeros(2, 4, 16, 16)})
        assert torch.isfinite(run_sampler(engine, guider, {"samples": torch.zeros(3, 4, 16, 16)})["samples"]).all()
