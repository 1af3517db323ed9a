"""Small hand-computed examples that pin the exact value of each formula in loratorio_core."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loratorio_core as lc

CORE_DIR = Path(lc.__file__).parent


def test_core_imports_no_comfyui():
    forbidden = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "execution", "server"}
    for source in CORE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{source.name} imports ComfyUI: {names}"
    code = "import sys, loratorio_core; print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'nodes')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=CORE_DIR.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_noise_and_denoised_conversions():
    x = torch.tensor([[[[3.0, 1.0]]]])
    denoised = torch.tensor([[[[1.0, 2.0]]]])
    eps = lc.denoised_to_noise(x, denoised, torch.tensor([2.0]))
    assert eps.tolist() == [[[[1.0, -0.5]]]]
    assert lc.noise_to_denoised(x, eps, 2.0).tolist() == denoised.tolist()
    with pytest.raises(ValueError, match="sigma must be positive"):
        lc.denoised_to_noise(x, denoised, 0.0)


def test_patch_grid_remainder_rule():
    assert lc.patch_grid(10, 7, 4) == (3, 2)  # rows of 4, 4, 2 pixels; columns of 4, 3
    assert lc.patch_grid(5, 5, 64) == (1, 1)
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    full = lc.expand_patches(values, 3, 3, 2)
    assert full.tolist() == [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [3.0, 3.0, 4.0]]


def test_patch_cosine_hand_example():
    # one channel, 2x4 latent, patch size 2: two patches (left, right)
    base = torch.tensor([[[[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]])
    adapter = torch.tensor([[[[1.0, 1.0, -1.0, -1.0], [0.0, 0.0, -1.0, -1.0]]]])
    s = lc.patch_cosine_similarity(adapter.unsqueeze(0), base, 2)
    # left: dot 1, |a| sqrt(2), |b| 1 -> 1/sqrt(2); right: exactly opposite -> -1
    torch.testing.assert_close(s[0, 0, 0], torch.tensor([1 / math.sqrt(2), -1.0]))


def test_sliding_patch_layout_routes_at_the_shape_s_edge_not_the_grid_s():
    """Adapter 0 departs from the base right of column 6, adapter 1 left of it; 6 is inside a patch of 4."""
    generator = torch.Generator().manual_seed(0)
    base, shift = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 4, 16, 16, generator=generator)
    right = torch.zeros(16, 16)
    right[:, 6:] = 1.0
    adapters = torch.stack([base + 2 * shift * right, base + 2 * shift * (1 - right)])
    distance_to_edge = (torch.arange(16) - 5.5).abs().expand(16, 16)

    def misrouted(layout: str) -> torch.Tensor:
        weights = lc.routing_weights(adapters, base, lc.LoRAtorioParams(patch_size=4, patch_layout=layout))
        return (weights[0, 0, 0] > 0.5) != right.bool()

    assert (misrouted("grid")[:, 4:8].sum(dim=1) >= 2).all()  # the patch of columns 4 to 7 goes wholly to one side
    assert misrouted("sliding").any() and distance_to_edge[misrouted("sliding")].max() <= 1.5  # only at the edge
    assert misrouted("sliding").sum() < misrouted("grid").sum() / 2
    with pytest.raises(ValueError, match="patch_layout must be one of grid, sliding"):
        lc.LoRAtorioParams(patch_layout="overlapping")


def test_routing_memory_keeps_a_claim_that_held_over_the_steps():
    """One patch, three LoRAs. Step 1: LoRA 0 departs most; step 2: LoRA 1 departs a little more than 0.
    The paper routes step 2 to LoRA 1; with memory LoRA 0 keeps it, by SoftMin_1 * SoftMin_2."""
    at = lambda *cosines: torch.tensor(cosines).reshape(3, 1, 1, 1)  # noqa: E731
    steps = [at(0.2, 0.8, 0.9), at(0.55, 0.5, 0.9)]
    params = lc.LoRAtorioParams(patch_size=1, temperature=0.1, routing_memory="steps so far")

    def adapters(cosines: torch.Tensor) -> torch.Tensor:  # unit predictions at those cosines to the base
        return torch.stack([cosines, (1 - cosines**2).sqrt()], dim=2).reshape(3, 1, 2, 1, 1)

    base = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    evidence = lc.RoutingEvidence(3)
    first, second = (lc.routing_weights(adapters(s), base, params, evidence=evidence) for s in steps)
    softmin = [lc.softmin_weights(s, 0.1) for s in steps]
    torch.testing.assert_close(first[:, :, 0], softmin[0], rtol=1e-5, atol=1e-6)  # the first step is the paper's
    product = softmin[0] * softmin[1]
    torch.testing.assert_close(second[:, :, 0], product / product.sum(), rtol=1e-4, atol=1e-6)
    assert second.flatten().argmax() == 0 and softmin[1].flatten().argmax() == 1
    this_step = lc.LoRAtorioParams(patch_size=1, temperature=0.1)
    torch.testing.assert_close(lc.routing_weights(adapters(steps[1]), base, this_step, evidence=evidence)[:, :, 0], softmin[1])
    hard = lc.LoRAtorioParams(patch_size=1, temperature=0.0, routing_memory="steps so far")  # an argmin has no memory
    assert lc.routing_weights(adapters(steps[1]), base, hard, evidence=evidence)[:, 0, 0, 0, 0].tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="routing_memory must be one of this step, steps so far"):
        lc.LoRAtorioParams(routing_memory="always")


def test_routing_memory_starts_a_late_lora_from_the_average_claim_and_adds_a_prior_once():
    generator = torch.Generator().manual_seed(3)
    base, adapters = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(3, 1, 4, 8, 8, generator=generator)
    params = lc.LoRAtorioParams(patch_size=4, temperature=0.05, routing_memory="steps so far")
    paper = lc.LoRAtorioParams(patch_size=4, temperature=0.05)
    # step 1: LoRAs 0 and 1 alike (no evidence between them); step 2: LoRA 2 joins
    evidence = lc.RoutingEvidence(3)
    lc.routing_weights(torch.stack([adapters[0], adapters[0]]), base, params, evidence=evidence, active=[0, 1])
    joined = lc.routing_weights(adapters, base, params, evidence=evidence, active=[0, 1, 2])
    torch.testing.assert_close(joined, lc.routing_weights(adapters, base, paper), rtol=1e-5, atol=1e-6)
    # a soft region's prior is added once, however many steps add evidence
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    regions = [lc.Region(left, hard=False, strength=2.0), None, None]
    same = torch.stack([adapters[0]] * 3)
    evidence = lc.RoutingEvidence(3)
    for _ in range(4):
        remembered = lc.routing_weights(same, base, params, regions, evidence=evidence)
    torch.testing.assert_close(remembered, lc.routing_weights(same, base, paper, regions), rtol=1e-5, atol=1e-6)
    assert bool((remembered[0, ..., :4] > remembered[1, ..., :4]).all())
    with pytest.raises(ValueError, match="evidence holds 3 adapters' rows for 2 active adapters"):
        lc.routing_weights(adapters, base, params, evidence=evidence, active=[0, 2])


def test_routing_memory_stops_hardening_the_noise_level_temperature_once_the_image_has_formed():
    """With memory the noise-to-signal ratio is floored at MEMORY_NOISE_FLOOR, so the last steps' evidence
    cannot outweigh every earlier step's by 1 / r^3; without memory the rule is T * r^3 all the way down."""
    generator = torch.Generator().manual_seed(4)
    base, adapters = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(3, 1, 4, 8, 8, generator=generator)
    scaling = "by LoRA count and noise level"
    memory = lc.LoRAtorioParams(patch_size=4, temperature_scaling=scaling, routing_memory="steps so far")
    paper = lc.LoRAtorioParams(patch_size=4, temperature_scaling=scaling)

    def first_step(params: lc.LoRAtorioParams, ratio: float) -> torch.Tensor:
        return lc.routing_weights(adapters, base, params, noise_level=ratio, evidence=lc.RoutingEvidence(3))

    floor = lc.MEMORY_NOISE_FLOOR
    torch.testing.assert_close(first_step(memory, 0.03), first_step(paper, floor))
    torch.testing.assert_close(first_step(memory, 2.0), first_step(paper, 2.0))
    assert not torch.allclose(first_step(paper, 0.03), first_step(paper, floor), atol=1e-3)


def test_zero_norm_patches_are_defined():
    zero = torch.zeros(1, 1, 2, 2)
    one = torch.ones(1, 1, 2, 2)
    assert lc.patch_cosine_similarity(zero.unsqueeze(0), zero, 2).item() == 1.0
    assert lc.patch_cosine_similarity(zero.unsqueeze(0), one, 2).item() == 0.0
    assert lc.patch_cosine_similarity(one.unsqueeze(0), zero, 2).item() == 0.0


def test_softmin_hand_example():
    s = torch.tensor([0.9, 0.8, 0.7]).reshape(3, 1)
    w = lc.softmin_weights(s, 0.1)
    e = torch.exp(torch.tensor([-9.0, -8.0, -7.0]))
    torch.testing.assert_close(w[:, 0], e / e.sum())
    assert lc.softmin_weights(s, 0.0)[:, 0].tolist() == [0.0, 0.0, 1.0]
    ties = lc.softmin_weights(torch.tensor([0.5, 0.5, 0.9]).reshape(3, 1), 0.0)
    assert ties[:, 0].tolist() == [0.5, 0.5, 0.0]
    keep = torch.tensor([True, True, False]).reshape(3, 1)
    masked = lc.softmin_weights(s, 0.1, keep)
    torch.testing.assert_close(
        masked[:, 0], torch.tensor([math.exp(-9) / (math.exp(-9) + math.exp(-8)), 1 / (1 + math.exp(-1)), 0.0])
    )


def test_loratorio_hand_example():
    # 1 sample, 1 channel, 1x2 latent, patch size 1: each pixel is a patch
    base_c = torch.tensor([[[[1.0, 1.0]]]])
    base_u = torch.tensor([[[[0.0, 0.0]]]])
    a1 = torch.tensor([[[[1.0, -1.0]]]])  # agrees with the base left (s=1), opposes it right (s=-1)
    a2 = torch.tensor([[[[-2.0, 2.0]]]])  # opposes left (s=-1), agrees right (s=1)
    u1, u2 = torch.tensor([[[[1.0, 1.0]]]]), torch.tensor([[[[3.0, 3.0]]]])
    params = lc.LoRAtorioParams(patch_size=1, temperature=1.0, recentre_lambda=0.5)
    r = lc.loratorio(base_c, base_u, torch.stack([a1, a2]), torch.stack([u1, u2]), 2.0, params)
    lo, hi = 1 / (1 + math.exp(2)), 1 / (1 + math.exp(-2))  # SoftMin of (1, -1) with T = 1
    torch.testing.assert_close(r.weights[:, 0, 0, 0], torch.tensor([[lo, hi], [hi, lo]]))
    cond = torch.tensor([lo * 1 + hi * -2, hi * -1 + lo * 2])
    uncond = 0.5 * 0 + 0.5 * torch.tensor([lo * 1 + hi * 3, hi * 1 + lo * 3])
    torch.testing.assert_close(r.cond[0, 0, 0], cond)
    torch.testing.assert_close(r.uncond[0, 0, 0], uncond)
    torch.testing.assert_close(r.guided[0, 0, 0], uncond + 2.0 * (cond - uncond))


def test_lambda_one_needs_no_adapter_unconds():
    base = torch.randn(1, 4, 8, 8)
    adapters = torch.randn(3, 1, 4, 8, 8)
    r = lc.loratorio(base, base * 0.5, adapters, None, 7.0, lc.LoRAtorioParams(recentre_lambda=1.0))
    assert torch.equal(r.uncond, base * 0.5)
    assert not lc.LoRAtorioParams(recentre_lambda=1.0).needs_adapter_unconds
    with pytest.raises(ValueError, match="needs the adapters' unconditional predictions"):
        lc.loratorio(base, base, adapters, None, 7.0, lc.LoRAtorioParams(recentre_lambda=0.5))


def test_temperature_scaled_by_lora_count():
    generator = torch.Generator().manual_seed(0)
    base, adapters = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(4, 1, 4, 8, 8, generator=generator)

    def weights(temperature: float, scaling: str = "fixed", top_k: int | None = None, count: int = 4) -> torch.Tensor:
        params = lc.LoRAtorioParams(patch_size=4, temperature=temperature, temperature_scaling=scaling, top_k=top_k)
        return lc.routing_weights(adapters[:count], base, params)

    torch.testing.assert_close(weights(0.05, "by LoRA count"), weights(0.025))  # T / log2 4
    torch.testing.assert_close(weights(0.06, "by LoRA count", count=3), weights(0.06 / math.log2(3), count=3))
    torch.testing.assert_close(weights(0.05, "by LoRA count", top_k=2), weights(0.05, top_k=2))  # 2 of them compete
    torch.testing.assert_close(weights(0.05, "by LoRA count", count=2), weights(0.05, count=2))  # two LoRAs: T as given
    with pytest.raises(ValueError, match="temperature_scaling must be one of fixed, by LoRA count"):
        lc.LoRAtorioParams(temperature_scaling="sigma")


def test_temperature_by_lora_count_counts_the_loras_a_patch_s_regions_allow():
    generator = torch.Generator().manual_seed(1)
    base, adapters = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(4, 1, 4, 8, 8, generator=generator)
    left = torch.zeros(8, 8)
    left[:, :4] = 1.0
    regions = [lc.Region(left), lc.Region(left), None, None]  # left half: 4 LoRAs compete, right half: 2

    def weights(temperature: float, scaling: str = "fixed") -> torch.Tensor:
        params = lc.LoRAtorioParams(patch_size=4, temperature=temperature, temperature_scaling=scaling)
        return lc.routing_weights(adapters, base, params, regions)

    scaled = weights(0.05, "by LoRA count")
    torch.testing.assert_close(scaled[..., :4], weights(0.025)[..., :4])
    torch.testing.assert_close(scaled[..., 4:], weights(0.05)[..., 4:])
    assert torch.all(scaled[:2, ..., 4:] == 0)


def test_temperature_by_lora_count_and_noise_level_is_t_times_r_cubed():
    generator = torch.Generator().manual_seed(2)
    base, adapters = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(4, 1, 4, 8, 8, generator=generator)

    def weights(temperature: float, scaling: str, noise_level: float | None = None) -> torch.Tensor:
        params = lc.LoRAtorioParams(patch_size=4, temperature=temperature, temperature_scaling=scaling)
        return lc.routing_weights(adapters, base, params, noise_level=noise_level)

    for ratio in (0.3, 1.0, 2.5):
        scaled = weights(0.05, "by LoRA count and noise level", ratio)
        torch.testing.assert_close(scaled, weights(0.05 * ratio**3, "by LoRA count"), rtol=1e-5, atol=1e-6)
    high, low = weights(0.05, "by LoRA count and noise level", 14.6), weights(0.05, "by LoRA count and noise level", 0.03)
    torch.testing.assert_close(high, torch.full_like(high, 0.25), atol=1e-3, rtol=0)  # noise dominates: the plain mean
    assert torch.all(low.amax(dim=0) > 0.99)  # the image has formed: each patch goes to one LoRA
    with pytest.raises(ValueError, match="needs the step's noise level"):
        weights(0.05, "by LoRA count and noise level")
    with pytest.raises(ValueError, match="noise level must be a number >= 0"):
        weights(0.05, "by LoRA count and noise level", math.nan)


def test_top_k_hand_example():
    # 3 adapters, 1 sample, 1x2 patches
    s = torch.tensor([[[[0.9, 0.1]]], [[[0.5, 0.5]]], [[[0.1, 0.9]]]])
    assert lc.top_k_mask(s, 1, "patch")[:, 0, 0].tolist() == [[False, True], [False, False], [True, False]]
    # per image the means are 0.5, 0.5, 0.5: a tie, broken by adapter order
    assert lc.top_k_mask(s, 2, "image")[:, 0, 0, 0].tolist() == [True, True, False]


def test_composite_hand_example():
    conds = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1, 1)
    unconds = torch.tensor([0.0, 2.0]).reshape(2, 1, 1, 1, 1)
    r = lc.lora_composite(conds, unconds, 3.0)
    assert (r.cond.item(), r.uncond.item(), r.guided.item()) == (2.0, 1.0, 4.0)


def test_switch_schedule_hand_example():
    schedule = lc.SwitchSchedule(3, tau=2, order=(2, 0, 1))
    assert [schedule.adapter_at_step(i) for i in range(8)] == [2, 2, 0, 0, 1, 1, 2, 2]
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert [lc.step_index(s, sigmas) for s in (14.6, 10.0, 7.0, 5.0, 3.0, 0.5, 0.03)] == [0, 0, 1, 1, 2, 3, 3]
    # heun evaluates step 1 at 7.0 and at 3.0; the corrector at 3.0 sees step 2's adapter
    assert schedule.active_adapter(torch.tensor([7.0]), sigmas) == 2
    assert schedule.active_adapter(5.0, torch.tensor(sigmas)) == 2
    assert schedule.active_adapter(3.0, sigmas) == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: lc.patch_cosine_similarity(torch.zeros(2, 4, 8, 8), torch.zeros(4, 8, 8), 2), r"\[B, C, H, W\]"),
        (lambda: lc.patch_cosine_similarity(torch.zeros(2, 1, 4, 8, 8), torch.zeros(1, 4, 8, 9), 2), "same shape"),
        (lambda: lc.patch_cosine_similarity(torch.zeros(0, 1, 4, 8, 8), torch.zeros(1, 4, 8, 8), 2), "no adapter"),
        (lambda: lc.patch_grid(8, 8, 0), "patch_size"),
        (lambda: lc.softmin_weights(torch.zeros(2, 1), -1.0), "temperature"),
        (lambda: lc.top_k_mask(torch.zeros(2, 1, 1, 1), 0), "top_k"),
        (lambda: lc.top_k_mask(torch.zeros(2, 1, 1, 1), 1, "pixel"), "mode"),
        (lambda: lc.LoRAtorioParams(recentre_lambda=1.5), "recentre_lambda"),
        (lambda: lc.SwitchSchedule(2, tau=0), "tau"),
        (lambda: lc.SwitchSchedule(2, order=(0, 0)), "order"),
        (lambda: lc.step_index(1.0, [1.0]), "at least 2"),
        (lambda: lc.lora_composite(torch.zeros(2, 1, 1, 2, 2), torch.zeros(3, 1, 1, 2, 2), 1.0), "one of each"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_weight_map_history_and_colours():
    history = lc.WeightMapHistory()
    weights = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1, 1).expand(2, 1, 1, 3, 4)
    history.record(weights)
    history.record(weights.flip(0))
    maps = history.maps()
    assert maps.shape == (2, 2, 3, 4)
    palette = lc.adapter_palette(2)
    image = lc.colourise(maps[0], palette)
    assert image.shape == (3, 4, 3)
    torch.testing.assert_close(image[0, 0], palette[0])
    torch.testing.assert_close(lc.colourise(maps[1], palette)[0, 0], palette[1])


def test_style_coverage_is_the_share_of_patches_a_lora_changes_alike():
    base = torch.zeros(1, 4, 8, 8)
    everywhere = base + 0.3  # changes every 4x4 patch alike
    one_patch = base.clone()
    one_patch[..., :4, :4] = 5.0  # one of the four patches, at any strength
    two_patches = base.clone()
    two_patches[..., :4, :] = -0.01  # two of four, alike
    unchanged = base.clone()
    coverage = lc.delta_coverage(torch.stack([everywhere, one_patch, two_patches, unchanged]), base, patch_size=4)
    torch.testing.assert_close(coverage, torch.tensor([1.0, 0.25, 0.5, 0.0]))
    half = base.clone()
    half[0, :, :4, :4] = 1.0  # a batch: the first image's change covers a quarter, the second's all of it
    batch = torch.cat([half, everywhere])
    coverage = lc.delta_coverage(torch.stack([batch]), torch.cat([base, base]), patch_size=4)
    torch.testing.assert_close(coverage, torch.tensor([(0.25 + 1.0) / 2]))


def test_a_lora_is_judged_on_its_lowest_coverage_over_its_first_judging_steps():
    assert lc.STYLE_JUDGING_STEPS == 2
    assert lc.judged_coverage([]) is None and lc.judged_coverage([0.9]) is None  # one look: not judged yet
    assert lc.judged_coverage([0.64, 0.56]) == 0.56  # a subject with a palette shift: a style only at the first step
    assert lc.judged_coverage([0.89, 0.88, 0.1]) == 0.88  # looks after the judging steps do not count


def test_detected_styles_leave_region_masked_loras_and_never_take_every_candidate():
    assert lc.detected_styles([0.9, 0.2, 0.3], [True, True, True], 0.6) == (True, False, False)
    assert lc.detected_styles([0.9, 0.9, 0.3], [True, False, True], 0.6) == (True, False, False)  # a region: routed
    assert lc.detected_styles([0.9, 0.8], [True, True], 0.6) == (False, False)  # only styles: nothing to keep apart
    assert lc.detected_styles([0.9, 0.2], [True, False], 0.6) == (True, False)  # beside a region-masked subject
    assert lc.detected_styles([0.9, 0.9], [True, False], 0.6) == (True, False)
    assert lc.detected_styles([0.59, 0.2], [True, True], 0.6) == (False, False)
    with pytest.raises(ValueError, match="2 coverages for 3 adapters"):
        lc.detected_styles([0.9, 0.2], [True, True, True])


def test_a_style_s_change_is_added_at_every_position():
    base = torch.full((1, 4, 2, 2), 1.0)
    composed = torch.full((1, 4, 2, 2), 2.0)
    styles = torch.stack([torch.full((1, 4, 2, 2), 1.5), torch.full((1, 4, 2, 2), 0.75)])
    torch.testing.assert_close(lc.with_style_changes(composed, styles, base), torch.full((1, 4, 2, 2), 2.25))
    assert lc.with_style_changes(composed.half(), styles, base).dtype == torch.float16
    with pytest.raises(ValueError, match="style_loras must be one of routed, applied everywhere"):
        lc.LoRAtorioParams(style_loras="merged")
    with pytest.raises(ValueError, match="style_coverage must lie in"):
        lc.LoRAtorioParams(style_loras="applied everywhere", style_coverage=0.0)
