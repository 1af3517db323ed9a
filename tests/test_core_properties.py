"""Property-based tests of loratorio_core (hypothesis)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import loratorio_core as lc

settings.register_profile("loratorio", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# CI replays the same examples on every run; locally each run explores new ones
settings.register_profile("ci", parent=settings.get_profile("loratorio"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "loratorio")


@st.composite
def step_inputs(draw, max_adapters: int = 5):
    """Random base and adapter predictions of one step: (base [B,C,H,W], adapters [N,B,C,H,W], p)."""
    n = draw(st.integers(1, max_adapters))
    b = draw(st.integers(1, 2))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    p = draw(st.integers(1, 14))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, c, h, w, generator=g)
    adapters = base + draw(st.floats(0.05, 2.0)) * torch.randn(n, b, c, h, w, generator=g)
    return base, adapters, p


temperatures = st.one_of(st.just(0.0), st.floats(1e-3, 10.0), st.just(math.inf))


@given(step_inputs(), temperatures)
def test_weights_are_a_partition_of_unity(inputs, temperature):
    base, adapters, p = inputs
    weights = lc.routing_weights(adapters, base, lc.LoRAtorioParams(patch_size=p, temperature=temperature))
    assert weights.dtype == torch.float32
    assert weights.shape == (adapters.shape[0], base.shape[0], 1, *base.shape[-2:])
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]), rtol=0, atol=1e-5)


@given(step_inputs(), st.floats(1e-2, 5.0), st.randoms(use_true_random=False))
def test_permuting_adapters_permutes_weights(inputs, temperature, rnd):
    base, adapters, p = inputs
    perm = list(range(adapters.shape[0]))
    rnd.shuffle(perm)
    params = lc.LoRAtorioParams(patch_size=p, temperature=temperature)
    weights = lc.routing_weights(adapters, base, params)
    permuted = lc.routing_weights(adapters[perm], base, params)
    torch.testing.assert_close(permuted, weights[perm], rtol=1e-5, atol=1e-6)


@given(step_inputs(max_adapters=1), temperatures, st.floats(0.0, 1.0))
def test_single_adapter_returns_that_adapter(inputs, temperature, lam):
    base, adapters, p = inputs
    unconds = adapters + 0.3
    params = lc.LoRAtorioParams(patch_size=p, temperature=temperature, recentre_lambda=lam)
    result = lc.loratorio(base, base - 0.1, adapters, unconds, 5.0, params)
    torch.testing.assert_close(result.cond, adapters[0])
    torch.testing.assert_close(result.uncond, lam * (base - 0.1) + (1 - lam) * unconds[0], rtol=1e-5, atol=1e-5)


@given(step_inputs(max_adapters=1), st.integers(2, 5), temperatures)
def test_identical_adapters_get_equal_weights_and_compose_to_that_prediction(inputs, copies, temperature):
    base, one, p = inputs
    adapters = one.expand(copies, *one.shape[1:]).clone()
    result = lc.loratorio(
        base, base, adapters, None, 1.0, lc.LoRAtorioParams(patch_size=p, temperature=temperature, recentre_lambda=1.0)
    )
    torch.testing.assert_close(result.weights, torch.full_like(result.weights, 1.0 / copies))
    torch.testing.assert_close(result.cond, one[0])


@given(step_inputs())
def test_zero_temperature_selects_the_most_divergent_adapter_per_patch(inputs):
    base, adapters, p = inputs
    similarity = lc.patch_cosine_similarity(adapters, base, p)
    per_patch = lc.softmin_weights(similarity, 0.0)
    lowest = similarity == similarity.amin(0, keepdim=True)
    assert bool((per_patch[~lowest] == 0).all())
    unique = lowest.sum(0) == 1
    assert bool((per_patch.amax(0)[unique] == 1).all())
    # a small T converges to the same selection where the minimum is clear
    gap = (similarity.sort(0).values[1:2] - similarity.amin(0, keepdim=True)) if adapters.shape[0] > 1 else None
    if gap is not None:
        clear = (gap[0] > 1e-3) & unique
        near_zero = lc.softmin_weights(similarity, 1e-5)
        torch.testing.assert_close(near_zero.permute(1, 2, 3, 0)[clear], per_patch.permute(1, 2, 3, 0)[clear], rtol=0, atol=1e-4)


@given(step_inputs())
def test_large_temperature_gives_the_plain_mean(inputs):
    base, adapters, p = inputs
    result = lc.loratorio(base, base, adapters, None, 1.0, lc.LoRAtorioParams(patch_size=p, temperature=1e6, recentre_lambda=1.0))
    torch.testing.assert_close(result.cond, adapters.mean(0), rtol=1e-4, atol=1e-5)


@given(step_inputs())
def test_patch_size_one_and_whole_latent(inputs):
    base, adapters, _ = inputs
    per_pixel = lc.patch_cosine_similarity(adapters, base, 1)
    assert per_pixel.shape == (adapters.shape[0], base.shape[0], *base.shape[-2:])
    expected = torch.nn.functional.cosine_similarity(adapters, base.unsqueeze(0), dim=2, eps=0)
    torch.testing.assert_close(per_pixel, expected, rtol=1e-4, atol=1e-5)
    whole = lc.patch_cosine_similarity(adapters, base, max(base.shape[-2:]) + 3)
    assert whole.shape == (adapters.shape[0], base.shape[0], 1, 1)
    flat = torch.nn.functional.cosine_similarity(adapters.flatten(2), base.flatten(1).unsqueeze(0), dim=2, eps=0)
    torch.testing.assert_close(whole[..., 0, 0], flat, rtol=1e-4, atol=1e-5)


@given(step_inputs())
def test_sliding_layout_gives_every_pixel_the_cosine_of_its_window(inputs):
    base, adapters, p = inputs
    sliding = lc.patch_cosine_similarity(adapters, base, p, "sliding")
    height, width = base.shape[-2:]
    assert sliding.shape == (adapters.shape[0], base.shape[0], height, width)
    before = p // 2
    for y, x in {(0, 0), (height - 1, width - 1), (height // 2, width // 3)}:
        rows = slice(max(0, y - before), y - before + p)
        cols = slice(max(0, x - before), x - before + p)
        window = cosine_over(adapters[..., rows, cols], base[..., rows, cols])
        torch.testing.assert_close(sliding[..., y, x], window, rtol=1e-4, atol=1e-5)
    per_pixel = lc.patch_cosine_similarity(adapters, base, 1)
    torch.testing.assert_close(lc.patch_cosine_similarity(adapters, base, 1, "sliding"), per_pixel)
    every_window_is_the_latent = lc.patch_cosine_similarity(adapters, base, 2 * max(height, width), "sliding")
    whole = cosine_over(adapters, base)[..., None, None].expand_as(every_window_is_the_latent)
    torch.testing.assert_close(every_window_is_the_latent, whole, rtol=1e-4, atol=1e-5)


# T >= 0.05 keeps every step's weights above float32's underflow (cosine gaps <= 2, so exp(-40) at worst)
@given(step_inputs(), st.integers(2, 4), st.floats(0.05, 2.0), st.sampled_from(lc.PATCH_LAYOUTS))
def test_routing_memory_is_the_normalised_product_of_every_step_s_softmin(inputs, steps, temperature, layout):
    base, first, p = inputs
    g = torch.Generator().manual_seed(steps)
    step_adapters = [first] + [first + torch.randn(first.shape, generator=g) for _ in range(steps - 1)]
    params = lc.LoRAtorioParams(patch_size=p, temperature=temperature, patch_layout=layout, routing_memory="steps so far")
    paper = lc.LoRAtorioParams(patch_size=p, temperature=temperature, patch_layout=layout)
    evidence = lc.RoutingEvidence(first.shape[0])
    product = torch.ones(())
    for adapters in step_adapters:
        remembered = lc.routing_weights(adapters, base, params, evidence=evidence)
        product = product * lc.routing_weights(adapters, base, paper).double()
        torch.testing.assert_close(remembered.sum(0), torch.ones_like(remembered[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(remembered.double(), product / product.sum(dim=0, keepdim=True), rtol=1e-3, atol=1e-4)


def cosine_over(adapters: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Cosine of each adapter's ``[C, h, w]`` block with the base's, ``[N, B]`` (no zero-norm blocks)."""
    return torch.nn.functional.cosine_similarity(adapters.flatten(2), base.flatten(1).unsqueeze(0), dim=2, eps=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@given(inputs=step_inputs(), lam=st.floats(0.0, 1.0))
def test_half_precision_within_tolerance_of_float64(dtype, inputs, lam):
    base, adapters, p = inputs
    unconds = adapters.flip(0)
    params = lc.LoRAtorioParams(patch_size=p, temperature=0.5, recentre_lambda=lam)
    low = lc.loratorio(base.to(dtype), (base * 0.9).to(dtype), adapters.to(dtype), unconds.to(dtype), 4.0, params)
    ref = lc.loratorio(base.double(), base.double() * 0.9, adapters.double(), unconds.double(), 4.0, params)
    assert low.guided.dtype == dtype and low.weights.dtype == torch.float32
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    scale = ref.guided.abs().max().item() + 1
    torch.testing.assert_close(low.guided.double(), ref.guided, rtol=0, atol=tol * scale)
    torch.testing.assert_close(low.weights.double(), ref.weights.double(), rtol=0, atol=tol)


@pytest.mark.parametrize("magnitude", [0.0, 1e-30, 1e30, 3e38])
@given(inputs=step_inputs())
def test_no_nan_or_inf_for_zero_or_huge_inputs(magnitude, inputs):
    base, adapters, p = inputs
    base = base.sign() * magnitude
    adapters = adapters.sign() * magnitude
    result = lc.loratorio(base, base, adapters, adapters, 1.0, lc.LoRAtorioParams(patch_size=p, temperature=0.05))
    assert bool(torch.isfinite(result.weights).all())
    assert bool(torch.isfinite(result.cond).all())
    torch.testing.assert_close(result.weights.sum(0), torch.ones_like(result.weights[0]), rtol=0, atol=1e-5)


@given(step_inputs(), st.integers(1, 6), st.sampled_from(lc.TOP_K_MODES))
def test_top_k_keeps_k_least_similar_and_k_at_least_n_is_static(inputs, k, mode):
    base, adapters, p = inputs
    n = adapters.shape[0]
    similarity = lc.patch_cosine_similarity(adapters, base, p)
    mask = lc.top_k_mask(similarity, k, mode)
    assert bool((mask.sum(0) == min(k, n)).all())
    ranked = similarity if mode == "patch" else similarity.mean((-2, -1), keepdim=True)
    kept_max = torch.where(mask, ranked, torch.full_like(ranked, -math.inf)).amax(0)
    dropped_min = torch.where(mask, torch.full_like(ranked, math.inf), ranked).amin(0)
    assert bool((kept_max <= dropped_min).all())
    dynamic = lc.routing_weights(adapters, base, lc.LoRAtorioParams(patch_size=p, top_k=k, top_k_mode=mode))
    static = lc.routing_weights(adapters, base, lc.LoRAtorioParams(patch_size=p))
    assert bool((dynamic.squeeze(2).sum(0) - 1).abs().max() < 1e-5)
    if k >= n:
        torch.testing.assert_close(dynamic, static)


@given(step_inputs(), st.floats(0.0, 15.0))
def test_composite_is_mean_then_cfg(inputs, scale):
    _, adapters, _ = inputs
    unconds = adapters * 0.5
    result = lc.lora_composite(adapters, unconds, scale)
    mean_c, mean_u = adapters.mean(0), unconds.mean(0)
    torch.testing.assert_close(result.guided, mean_u + scale * (mean_c - mean_u), rtol=1e-5, atol=1e-5)


@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 60))
def test_switch_gives_every_adapter_tau_steps_in_turn(count, tau, steps):
    schedule = lc.SwitchSchedule(count, tau)
    actives = [schedule.adapter_at_step(i) for i in range(steps)]
    assert actives[: min(tau, steps)] == [0] * min(tau, steps)
    for i in range(steps):
        assert actives[i] == (i // tau) % count


@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=40, unique=True), st.floats(0.0, 1.0))
def test_switch_step_index_is_robust_between_listed_sigmas(raw, fraction):
    sigmas = [*sorted(raw, reverse=True), 0.0]
    steps = len(sigmas) - 1
    # listed sigmas closer than the float-noise tolerance cannot be told apart (no schedule has them)
    assume(all(sigmas[i + 1] < sigmas[i] * (1 - 1e-3) for i in range(steps - 1)))
    for i in range(steps):
        assert lc.step_index(sigmas[i], sigmas) == i
        assert lc.step_index(sigmas[i] * (1 + 1e-6), sigmas) == i  # float noise above a listed sigma
        between = sigmas[i + 1] + (sigmas[i] - sigmas[i + 1]) * max(fraction, 1e-3)
        if sigmas[i + 1] < between * (1 - 1e-4):
            assert lc.step_index(between, sigmas) == i
