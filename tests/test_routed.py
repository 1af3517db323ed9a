"""LoRAtorio's single-pass routed mode: token-level gating on the per-row engine, and its 2-row steps."""

from __future__ import annotations

import sys

import comfy.model_management
import comfy.utils
import pytest
import torch
from torch.overrides import TorchFunctionMode

import loratorio_core as lc
from support.engine_helpers import STEPS, ForwardCounter, make_guider, merged_prediction, row_predictions, run_sampler
from support.lora_files import write_lora
from support.tiny_models import FAMILIES, batch_tolerance, device, latent, merge_tolerance


def one_hot_routing(family: str, adapters: int, chosen: int) -> torch.Tensor:
    height, width = latent(family).shape[-2:]
    routing = torch.zeros(1, adapters, height, width)
    routing[:, chosen] = 1.0
    return routing


@pytest.mark.parametrize("family", FAMILIES)
def test_a_routed_row_routed_wholly_to_one_lora_is_that_loras_row(engine, family, tiny_model_factory, loras_folder):
    """Every targeted layer of every family (image tokens on each grid, text tokens, vectors, convs)
    gives a routed row, routed to one LoRA everywhere, exactly that LoRA's delta."""
    patcher = tiny_model_factory(family)
    style = "kohya" if family in ("sd15", "sdxl") else "comfy"
    files = [write_lora(loras_folder / f"routed{i}.safetensors", family, patcher.model, style, seed=40 + i) for i in range(2)]
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, 0.9) for f in files])
    tolerance = batch_tolerance()
    for chosen in (0, 1):
        routed, own = row_predictions(engine, patcher, family, adapters, (-2, chosen), one_hot_routing(family, 2, chosen))
        torch.testing.assert_close(routed, own, rtol=tolerance, atol=tolerance * own.abs().max().item())
    expected = merged_prediction(patcher, family, comfy.utils.load_torch_file(str(files[1]), safe_load=True), 0.9)
    tolerance = merge_tolerance()
    torch.testing.assert_close(own, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_token_gating_follows_the_map(engine, tiny_model_factory, loras_folder):
    """Left half to LoRA 0 and right half to LoRA 1: a routed row is neither LoRA's row, and a
    map of zeros (every token to the base model) gives the base row."""
    patcher = tiny_model_factory("sd15")
    files = [write_lora(loras_folder / f"gate{i}.safetensors", "sd15", patcher.model, "kohya", seed=50 + i) for i in range(2)]
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, 1.0) for f in files])
    routing = torch.zeros(1, 2, 16, 16)
    routing[:, 0, :, :8] = 1.0
    routing[:, 1, :, 8:] = 1.0
    routed, first, second = row_predictions(engine, patcher, "sd15", adapters, (-2, 0, 1), routing)
    assert not torch.allclose(routed, first, atol=1e-3) and not torch.allclose(routed, second, atol=1e-3)
    # the left half leans on LoRA 0, the right half on LoRA 1
    left_error = ((routed - first)[..., :8].abs().mean(), (routed - second)[..., :8].abs().mean())
    right_error = ((routed - first)[..., 8:].abs().mean(), (routed - second)[..., 8:].abs().mean())
    assert left_error[0] < left_error[1] and right_error[1] < right_error[0]
    nothing, base = row_predictions(engine, patcher, "sd15", adapters, (-2, -1), torch.zeros(1, 2, 16, 16))
    torch.testing.assert_close(nothing, base, rtol=1e-5, atol=1e-6)


class PythonDataToDevice(TorchFunctionMode):
    """Records the pack's torch calls that build a tensor from Python data, index with a Python list
    or read a tensor back to Python: on a GPU each one waits for every queued kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[str] = []
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code
        if "loratorio_comfy" in caller.co_filename:
            name = getattr(func, "__name__", str(func))
            where = f"{name} in {caller.co_name} ({caller.co_filename.rsplit('/', 1)[-1]})"
            indices = args[1] if name in ("__getitem__", "__setitem__") else ()
            if name in ("tensor", "as_tensor") or any(
                isinstance(i, list) for i in (indices if isinstance(indices, tuple) else (indices,))
            ):
                self.sends.append(where)
            elif name in ("tolist", "item"):
                self.reads.append(where)
        return func(*args, **(kwargs or {}))


def test_a_warm_model_call_sends_no_python_data_to_the_device(engine, tiny_model_factory, loras_folder):
    """Once a plan has run, a model call with adapter rows (in stack order, reversed as ComfyUI
    batches LoRAtorio's, one adapter on every row as Switch's, routed with an adapter left out of
    the map) builds no tensor from Python data and indexes with no Python list, and a routed call
    reads back only which adapters are active; rows of one adapter, in any order, are its own rows."""
    patcher = tiny_model_factory("sd15")
    files = [write_lora(loras_folder / f"warm{i}.safetensors", "sd15", patcher.model, "kohya", seed=60 + i) for i in range(3)]
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, 1.0) for f in files])
    routing = torch.zeros(1, 3, 16, 16)
    routing[:, 0, :, :8] = 1.0
    routing[:, 2, :, 8:] = 0.7  # adapter 1 has no weight: the routed layers take adapters (0, 2)
    outputs = {}
    for row_map in ((-1, 0, 1, 2), (2, 1, 0, -1), (1, 1), (-2, -1)):
        map_of_call = routing if -2 in row_map else None
        row_predictions(engine, patcher, "sd15", adapters, row_map, map_of_call)
        with PythonDataToDevice() as watch:
            outputs[row_map] = row_predictions(engine, patcher, "sd15", adapters, row_map, map_of_call)
        assert not watch.sends, f"rows {row_map}: {watch.sends[:3]}"
        assert len(watch.reads) <= (1 if -2 in row_map else 0), f"rows {row_map}: {watch.reads[:3]}"
    in_order, reversed_order, shared = outputs[(-1, 0, 1, 2)], outputs[(2, 1, 0, -1)], outputs[(1, 1)]
    for row in range(4):
        torch.testing.assert_close(reversed_order[3 - row], in_order[row], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[0], in_order[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], in_order[2], rtol=1e-5, atol=1e-5)


def cross_attention_rows(engine, patcher, adapters, routing: torch.Tensor, row_map: tuple[int, ...]) -> list[torch.Tensor]:
    """One call of the first full-resolution cross-attention (``attn2``) with rows of ``row_map``,
    the per-row and per-query hooks installed as for a model call; its output per row."""
    from comfyui_loratorio.loratorio_comfy.token_routing import RoutedCall, token_grids

    diffusion_model = patcher.model.diffusion_model
    layers = adapters.row_layers
    name = next(n.rsplit(".", 1)[0] for n in layers.layers if n.endswith("attn2.to_k"))
    attention = diffusion_model.get_submodule(name)
    height, width = routing.shape[-2:]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, height * width, attention.to_q.in_features, generator=generator).repeat(len(row_map), 1, 1)
    context = torch.randn(1, 7, attention.to_k.in_features, generator=generator).repeat(len(row_map), 1, 1)
    comfy.model_management.load_models_gpu([patcher])
    x, context, routing = x.to(device()), context.to(device()), routing.to(device())
    call = RoutedCall(routing, *token_grids(diffusion_model, height, width))
    plan = layers.plan(row_map, x.device)
    with torch.no_grad(), engine.row_lora.row_loras_installed(diffusion_model, layers, plan, call):
        out = attention(x, context=context)
    return list(out.chunk(len(row_map)))


@pytest.mark.parametrize("second", ["lokr", "kohya"])
def test_each_image_query_attends_through_its_own_loras_text_keys(engine, tiny_model_factory, loras_folder, second):
    """Left half routed to LoRA 0 (low rank), right half to LoRA 1 (LoKr, a dense delta; or low rank
    too, so both share one stack and the text keys and values one product): every token of a
    cross-attention's routed row is exactly that token's LoRA's row (its query, the text keys and
    values of its own LoRA, the output projection); a soft map gives neither."""
    from support.lora_files import write_lycoris

    patcher = tiny_model_factory("sd15")
    second_path = loras_folder / f"query1-{second}.safetensors"
    files = [
        write_lora(loras_folder / "query0.safetensors", "sd15", patcher.model, "kohya", seed=70),
        write_lora(second_path, "sd15", patcher.model, "kohya", seed=71)
        if second == "kohya"
        else write_lycoris(second_path, "sd15", patcher.model, "lokr", seed=71),
    ]
    adapters = engine.adapter_set.AdapterSet(patcher, [(f.name, 1.0) for f in files])
    routing = torch.zeros(1, 2, 16, 16)
    routing[:, 0, :, :8] = 1.0
    routing[:, 1, :, 8:] = 1.0
    routed, first, second, base = cross_attention_rows(engine, patcher, adapters, routing, (-2, 0, 1, -1))
    left = torch.zeros(16, 16, dtype=torch.bool)
    left[:, :8] = True
    expected = torch.where(left.flatten()[None, :, None].to(first.device), first, second)
    assert not torch.allclose(first, second, atol=1e-3) and not torch.allclose(first, base, atol=1e-3)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    half, *_ = cross_attention_rows(engine, patcher, adapters, torch.full((1, 2, 16, 16), 0.5), (-2, 0, 1))
    assert not torch.allclose(half, first, atol=1e-3) and not torch.allclose(half, second, atol=1e-3)


def test_a_self_attentions_q_k_v_share_one_routed_product(engine, tiny_model_factory, loras_folder):
    """A routed row's to_q, to_k and to_v of a self-attention take their deltas from one product of
    their joined down-projections, stored once (the layers' own stacks view it), and give what each
    computes alone; a to_k and to_v handed another input (an attn1 patch's context) compute their own."""
    from comfyui_loratorio.loratorio_comfy.token_routing import RoutedCall, token_grids
    from dispatch_count import ComputeCalls  # a routed row's linear layer makes one `mm` to its joined down-projections

    patcher = tiny_model_factory("sd15")
    files = [write_lora(loras_folder / f"siblings{i}.safetensors", "sd15", patcher.model, "kohya", seed=80 + i) for i in range(2)]
    layers = engine.adapter_set.AdapterSet(patcher, [(f.name, 1.0) for f in files]).row_layers
    alone = engine.row_lora.RowLayers(layers.layers)
    alone.siblings, alone.sibling_sets = {}, ()
    name = next(n.rsplit(".", 1)[0] for n in layers.layers if n.endswith("attn1.to_q"))
    siblings = layers.siblings[f"{name}.to_q"]
    assert siblings == tuple(f"{name}.{projection}" for projection in ("to_q", "to_k", "to_v"))
    joined = layers.joined_down(siblings, device(), torch.float32)
    for sibling in siblings:
        down = layers.on(sibling, device(), torch.float32).low_rank[0].down
        assert down.untyped_storage().data_ptr() == joined.transposed.untyped_storage().data_ptr()

    diffusion_model = patcher.model.diffusion_model
    attention = diffusion_model.get_submodule(name)
    generator = torch.Generator().manual_seed(6)
    routing = torch.softmax(torch.randn(1, 2, 16, 16, generator=generator), dim=1).to(device())
    x, other = (torch.randn(2, 256, attention.to_q.in_features, generator=generator).to(device()) for _ in range(2))
    comfy.model_management.load_models_gpu([patcher])
    for context, products_saved in ((None, 2), (other, 0)):
        outputs, products = [], []
        for row_layers in (layers, alone):
            plan = row_layers.plan((-2, -1), x.device)
            call = RoutedCall(routing, *token_grids(diffusion_model, 16, 16))
            with (
                torch.no_grad(),
                ComputeCalls() as counter,
                engine.row_lora.row_loras_installed(diffusion_model, row_layers, plan, call),
            ):
                outputs.append(attention(x, context=context))
            products.append(counter.calls["mm"])
        tolerance = batch_tolerance()  # one product of a wider matrix: on a GPU, another GEMM kernel
        torch.testing.assert_close(outputs[0], outputs[1], rtol=tolerance, atol=tolerance * outputs[1].abs().max().item())
        assert products[1] - products[0] == products_saved
        with torch.no_grad():
            assert not torch.allclose(outputs[0][0], attention(x, context=context)[0], atol=1e-3)


def test_outputs_per_adapter_add_each_adapters_own_delta(engine):
    """The text keys and values of every adapter at once: the base output, then the base plus each
    adapter's ``x @ dW^T``, whether the adapters share one stack (one product), are a reordered or
    partial choice of it, have stacks of their own, or a dense delta."""
    row_lora = engine.row_lora
    generator = torch.Generator().manual_seed(3)
    x, base = torch.randn(2, 7, 6, generator=generator), torch.randn(2, 7, 5, generator=generator)
    down, up = torch.randn(3, 2, 6, generator=generator), torch.randn(3, 5, 2, generator=generator)
    dense = torch.randn(5, 6, generator=generator)
    stacked = row_lora.LowRankGroup((0, 1, 2), down, up, 0, 5)
    alone = tuple(row_lora.LowRankGroup((a,), down[a : a + 1], up[a : a + 1], 0, 5) for a in range(3))
    low_rank = [up[a] @ down[a] for a in range(3)]
    layers = {  # each layer, and each adapter's delta of its weight on it
        "one stack": (row_lora.LayerDeltas((stacked,)), low_rank),
        "a stack each": (row_lora.LayerDeltas(alone), low_rank),
        "with a dense delta": (row_lora.LayerDeltas(alone[:2], {2: row_lora.DenseDelta(dense, None)}), [*low_rank[:2], dense]),
    }
    for label, (layer, own) in layers.items():
        for adapters in ((0, 1, 2), (2, 0), (1,)):
            outputs = layer.outputs_per_adapter(x, adapters, base)
            expected = torch.stack([base, *(base + x @ own[a].T for a in adapters)])
            torch.testing.assert_close(
                outputs,
                expected,
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m, label=label, adapters=adapters: f"{label}, adapters {adapters}: {m}",
            )
    partial = row_lora.LayerDeltas(alone[:1])
    torch.testing.assert_close(partial.outputs_per_adapter(x, (1, 0), base)[1], base, msg="no delta here: the base output")


def test_per_query_attention_shift_is_each_querys_own_attention():
    """The core formula against attention computed query by query."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 5, 8, generator=generator)
    keys, values = torch.randn(3, 2, 4, 8, generator=generator), torch.randn(3, 2, 4, 8, generator=generator)
    weights = torch.rand(2, 5, 2, generator=generator) / 2

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # two heads of 4
        heads = [torch.softmax(q[:, h] @ k[:, h].T / 2, dim=-1) @ v[:, h] for h in range(2)]
        return torch.cat(heads, dim=-1)

    coefficients = lc.attention_shift_coefficients(weights)
    shift = lc.per_query_attention_shift(query, keys, values, coefficients, heads=2)
    for r in range(2):
        q = query[r].reshape(5, 2, 4)
        own = [attention(q, keys[i, r].reshape(4, 2, 4), values[i, r].reshape(4, 2, 4)) for i in range(3)]
        expected = sum(weights[r, :, i - 1 : i] * (own[i] - own[0]) for i in (1, 2))
        torch.testing.assert_close(shift[r], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="heads"):
        lc.per_query_attention_shift(query, keys, values, coefficients, heads=3)


def test_token_weights_use_the_right_grid():
    from comfyui_loratorio.loratorio_comfy.token_routing import RoutedCall, token_grids, token_weights

    unet = torch.nn.Module()
    grids, joint = token_grids(unet, 15, 9)
    assert grids[:3] == ((15, 9), (8, 5), (4, 3)) and joint is None
    routing = torch.zeros(1, 2, 15, 9)
    routing[:, 0, :, :4] = 1.0
    call = RoutedCall(routing, grids, joint)
    spatial = token_weights(call, "input_blocks.1.1.transformer_blocks.0.attn1.to_q", torch.zeros(1, 40, 8), (0, 1))
    assert spatial.shape == (1, 40, 2) and spatial[0, :, 0].unique().numel() > 1
    text = token_weights(call, "input_blocks.1.1.transformer_blocks.0.attn2.to_k", torch.zeros(1, 40, 8), (0,))
    assert torch.allclose(text, torch.full((1, 40, 1), 4 / 9)), "text tokens get the adapter's mean weight"
    dit = torch.nn.Module()
    dit.patch_size = 2
    grids, joint = token_grids(dit, 8, 8)
    assert grids == ((4, 4),) and joint == (4, 4)
    joint_weights = token_weights(
        RoutedCall(torch.ones(1, 1, 8, 8), grids, joint), "single_blocks.0.linear1", torch.zeros(1, 20, 4), (0,)
    )
    assert joint_weights.shape == (1, 20, 1)


@pytest.fixture
def stack(tiny_model_factory, loras_folder):
    model = tiny_model_factory("sd15").model
    return [
        (write_lora(loras_folder / f"s{i}.safetensors", "sd15", model, "kohya", seed=60 + i).name, 1.0, 1.0) for i in range(3)
    ]


def test_single_pass_runs_two_rows_on_routed_steps(engine, tiny_model_factory, stack):
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, "loratorio", patcher, stack, routing="single pass", full_steps=1, refresh_every=0)
    with ForwardCounter(patcher) as counter:
        out = run_sampler(engine, guider)["samples"]
    assert counter.rows == [2 + 2 * len(stack)] + [2] * (STEPS - 1)
    assert torch.isfinite(out).all()
    assert guider.weight_history.maps().shape[0] == STEPS, "routed steps show the map they used"
    every_step = run_sampler(engine, make_guider(engine, "loratorio", patcher, stack))["samples"]
    assert not torch.allclose(out, every_step, atol=1e-4)


def test_single_pass_routes_a_lora_whose_window_opens_after_the_full_steps(engine, pack, tiny_model_factory, stack):
    """STEPS = 3, one full step: LoRA 3 joins at step 2 (window from 0.5), so step 2 is a full step that maps it;
    a LoRA whose window holds no full step is never absent from the map it is routed by."""
    patcher = tiny_model_factory("sd15")
    (late,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioStepWindow"]().set_window(stack, 3, 0.5, 1.0)
    guider = make_guider(engine, "loratorio", patcher, late, routing="single pass", full_steps=1, refresh_every=0)
    with ForwardCounter(patcher) as counter:
        out = run_sampler(engine, guider)["samples"]
    assert counter.rows == [2 + 2 * 2, 2, 2 + 2 * 3] and torch.isfinite(out).all()
    maps = guider.weight_history.maps()
    assert maps[2, 2].amax() > 0.05 and not maps[:2, 2].any()
    (only_late,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioStepWindow"]().set_window(stack[:1], 1, 0.5, 1.0)
    guider = make_guider(engine, "loratorio", patcher, only_late, routing="single pass", full_steps=1, refresh_every=0)
    with ForwardCounter(patcher) as counter:
        run_sampler(engine, guider)  # no LoRA at the full step: it waits for the LoRA instead of failing
    assert counter.rows == [2, 2, 2 + 2]


def test_single_pass_with_only_full_steps_is_loratorio(engine, tiny_model_factory, stack):
    patcher = tiny_model_factory("sd15")
    all_full = make_guider(engine, "loratorio", patcher, stack, routing="single pass", full_steps=STEPS)
    every_step = make_guider(engine, "loratorio", patcher, stack)
    torch.testing.assert_close(run_sampler(engine, all_full)["samples"], run_sampler(engine, every_step)["samples"])


def test_single_pass_from_masks_alone(engine, pack, tiny_model_factory, stack):
    patcher = tiny_model_factory("sd15")
    with pytest.raises(ValueError, match="region masks"):
        make_guider(engine, "loratorio", patcher, stack, routing="single pass", full_steps=0)
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1.0
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioRegionMask"]()
    (regional,) = node.set_region(stack[:2], 1, left, "hard", 4.0)
    (regional,) = node.set_region(regional, 2, 1.0 - left, "hard", 4.0)
    guider = make_guider(engine, "loratorio", patcher, regional, routing="single pass", full_steps=0)
    with ForwardCounter(patcher) as counter:
        out = run_sampler(engine, guider)["samples"]
    assert counter.rows == [2] * STEPS and torch.isfinite(out).all()
    maps = guider.weight_history.maps()
    assert torch.all(maps[:, 0, :, 8:] == 0) and torch.all(maps[:, 1, :, :8] == 0)


def test_routed_schedule_rules():
    schedule = lc.RoutedSchedule(full_steps=2, refresh_every=3)
    assert [schedule.is_full(step) for step in range(9)] == [True, True, False, False, True, False, False, True, False]
    masks_only = lc.RoutedSchedule(full_steps=0, refresh_every=3)
    assert not any(masks_only.is_full(step) for step in range(9)), "the map from the masks alone is never refreshed"
    assert lc.RoutedSchedule() == lc.RoutedSchedule(lc.DEFAULT_FULL_STEPS, lc.DEFAULT_REFRESH_EVERY)
    with pytest.raises(ValueError, match="full_steps"):
        lc.RoutedSchedule(full_steps=-1)
