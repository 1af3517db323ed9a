"""The composition guiders beside ComfyUI's own model patches: guidance patches, caches and row-aware patches."""

from __future__ import annotations

import comfy.patcher_extension
import nodes as comfy_nodes
import pytest
import torch
from comfy_extras.nodes_apg import APG
from comfy_extras.nodes_easycache import EasyCacheNode

from support.engine_helpers import comfy_conditioning, make_guider, run_sampler
from support.lora_files import write_lora


@pytest.fixture
def sd15(tiny_model_factory):
    return tiny_model_factory("sd15")


@pytest.fixture
def one_lora(sd15, loras_folder) -> str:
    return write_lora(loras_folder / "one.safetensors", "sd15", sd15.model, "kohya", seed=3).name


def ksampler(patcher, sampler: str, cfg: float, steps: int = 3) -> torch.Tensor:
    (out,) = comfy_nodes.common_ksampler(
        patcher, 3, steps, cfg, sampler, "normal", comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9),
        {"samples": torch.zeros(1, 4, 16, 16)},
    )  # fmt: skip
    return out["samples"]


def composite_of_one(engine, patcher, lora: str, sampler: str, cfg: float) -> torch.Tensor:
    guider = make_guider(engine, "composite", patcher, [(lora, 0.8, 0.8)], cfg=cfg)
    return run_sampler(engine, guider, sampler=sampler)["samples"]


def merged(patcher, lora: str):
    (model,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, lora, 0.8)
    return model


def assert_equal_images(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_pre_cfg_patches_are_honoured(engine, sd15, one_lora):
    """APG is a ``sampler_pre_cfg_function`` patch: Composite of one LoRA with APG equals KSampler with APG."""
    (with_apg,) = APG.execute(sd15, eta=0.0, norm_threshold=2.0, momentum=-0.5).result
    expected = ksampler(merged(with_apg, one_lora), "euler", 5.0)
    assert not torch.allclose(expected, ksampler(merged(sd15, one_lora), "euler", 5.0), atol=1e-3), "APG changes the image"
    assert_equal_images(composite_of_one(engine, with_apg, one_lora, "euler", 5.0), expected)


def test_cfg_pp_sampler_at_cfg_one_gets_the_real_uncond(engine, sd15, one_lora):
    """CFG++ samplers set ``disable_cfg1_optimization``: at cfg 1 the uncond is still evaluated."""
    expected = ksampler(merged(sd15, one_lora), "euler_cfg_pp", 1.0)
    assert_equal_images(composite_of_one(engine, sd15, one_lora, "euler_cfg_pp", 1.0), expected)


def test_easycache_keeps_adapter_rows_apart(engine, sd15, tiny_model_factory, loras_folder, caplog):
    """EasyCache reuses a per-uuid output difference on skipped steps; adapter rows with the base
    cond's uuid would all become the same row and LoRAtorio's weights would go uniform."""
    stack = [
        (write_lora(loras_folder / f"c{i}.safetensors", "sd15", sd15.model, "kohya", seed=30 + i).name, 1.0, 1.0)
        for i in range(2)
    ]
    (cached,) = EasyCacheNode.execute(sd15, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0, verbose=True).result
    guider = make_guider(engine, "loratorio", cached, stack, recentre_lambda=0.5)
    with caplog.at_level("INFO"):
        run_sampler(engine, guider, steps=8)
    assert "EasyCache [verbose] - skipping step" in caplog.text, "the test needs steps that EasyCache skips"
    maps = guider.weight_history.maps()  # [steps, N, H, W]
    for step, weights in enumerate(maps):
        # identical rows give exactly equal cosines, so exactly uniform weights; routing at high noise is only near-uniform
        assert not torch.equal(weights, torch.full_like(weights, 0.5)), f"identical adapter rows at step {step + 1}"


def test_patches_see_cond_or_uncond_as_zero_or_one(engine, sd15, tiny_model_factory, loras_folder):
    """Patches read ``cond_or_uncond`` as 0 = cond, 1 = uncond (SAG looks for the first 1)."""
    stack = [
        (write_lora(loras_folder / f"c{i}.safetensors", "sd15", sd15.model, "kohya", seed=40 + i).name, 1.0, 1.0)
        for i in range(3)
    ]
    seen = []

    def record(executor, *args, **kwargs):
        seen.append(
            list(args[-1]["cond_or_uncond"])
            if isinstance(args[-1], dict)
            else list(kwargs["transformer_options"]["cond_or_uncond"])
        )
        return executor(*args, **kwargs)

    patcher = sd15.clone()
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "record", record)
    run_sampler(engine, make_guider(engine, "loratorio", patcher, stack, recentre_lambda=0.5))
    assert seen and all(set(values) <= {0, 1} for values in seen), seen
    assert all(values.count(1) == 1 + 3 and values.count(0) == 1 + 3 for values in seen), seen


@pytest.mark.parametrize("method", ["loratorio", "composite", "switch"])
def test_torch_compile_model_gives_the_same_images(engine, sd15, tiny_model_factory, loras_folder, method):
    """ComfyUI's TorchCompileModel swaps in a compiled diffusion model per call: compiled before the
    per-row hooks existed (a plain KSampler run first), it must not drop the LoRAs."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    stack = [
        (write_lora(loras_folder / f"c{i}.safetensors", "sd15", sd15.model, "kohya", seed=50 + i).name, 1.0, 1.0)
        for i in range(2)
    ]
    expected = run_sampler(engine, make_guider(engine, method, sd15, stack))["samples"]
    compiled = sd15.clone()
    set_torch_compile_wrapper(compiled, backend="eager")
    torch._dynamo.reset()
    ksampler(compiled, "euler", 5.0)  # compiles the plain model first
    counters = torch._dynamo.utils.counters
    breaks_before = sum(counters["graph_break"].values())
    got = run_sampler(engine, make_guider(engine, method, compiled, stack))["samples"]
    assert_equal_images(got, expected)
    assert sum(counters["graph_break"].values()) - breaks_before < 10
    assert_equal_images(ksampler(compiled, "euler", 5.0), ksampler(sd15, "euler", 5.0))
