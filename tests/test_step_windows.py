"""Per-LoRA step windows and the strength budget: the core rules, and every method honouring them in real sampling."""

from __future__ import annotations

import logging

import pytest
import torch

import loratorio_core as lc
from support.engine_helpers import ForwardCounter, comfy_conditioning, make_guider, run_sampler
from support.lora_files import write_lora

STEPS = 4  # step fractions 0, 0.25, 0.5, 0.75


def test_window_rules():
    window = lc.StepWindow(0.25, 0.75)
    assert [window.contains(step, STEPS) for step in range(STEPS)] == [False, True, True, False]
    assert lc.active_adapters((lc.FULL_WINDOW, window, lc.StepWindow(0.0, 0.5)), 0, STEPS) == (0, 2)
    for start, end in ((0.5, 0.5), (0.8, 0.2), (-0.1, 0.5), (0.0, 1.5)):
        with pytest.raises(ValueError, match="window"):
            lc.StepWindow(start, end)


def test_switch_skips_a_lora_outside_its_window():
    schedule = lc.SwitchSchedule(3, tau=1)
    assert [lc.switch_adapter(schedule, step, (0, 1, 2)) for step in range(3)] == [0, 1, 2]
    assert [lc.switch_adapter(schedule, step, (0, 2)) for step in range(3)] == [0, 2, 2]
    assert lc.switch_adapter(schedule, 0, ()) is None


def test_budget_factor():
    assert lc.budget_factor([0.6, 0.6, 0.6, -0.6], 1.6) == pytest.approx(1.6 / 2.4)
    assert lc.budget_factor([0.5, 0.5], 2.0) == 1.0
    with pytest.raises(ValueError, match="budget"):
        lc.budget_factor([1.0], 0.0)


@pytest.fixture
def stack(tiny_model_factory, loras_folder):
    model = tiny_model_factory("sd15").model
    return [
        (write_lora(loras_folder / f"w{i}.safetensors", "sd15", model, "kohya", seed=20 + i).name, 1.0, 1.0) for i in range(3)
    ]


def windowed(pack, stack, *windows: tuple[int, float, float]):
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioStepWindow"]()
    for position, start, end in windows:
        (stack,) = node.set_window(stack, position, start, end)
    return stack


@pytest.mark.parametrize(
    ("method", "rows_per_active", "fixed_rows"), [("loratorio", 2, 2), ("composite", 2, 0)]
)  # fmt: skip
def test_a_lora_outside_its_window_costs_no_rows(engine, pack, tiny_model_factory, stack, method, rows_per_active, fixed_rows):
    patcher = tiny_model_factory("sd15")
    # LoRA 1 in the first half, LoRA 2 in the second, LoRA 3 throughout
    guider = make_guider(engine, method, patcher, windowed(pack, stack, (1, 0.0, 0.5), (2, 0.5, 1.0)))
    with ForwardCounter(patcher) as counter:
        run_sampler(engine, guider, steps=STEPS)
    assert counter.rows == [fixed_rows + rows_per_active * 2] * STEPS


@pytest.mark.parametrize("method", ["loratorio", "composite", "switch"])
def test_a_lora_outside_its_window_contributes_nothing(engine, pack, tiny_model_factory, stack, method):
    """A LoRA whose window holds none of the steps gives the image of the stack without it."""
    patcher = tiny_model_factory("sd15")
    never = windowed(pack, stack, (2, 0.9, 1.0))  # 4 steps: fractions up to 0.75, none in [0.9, 1)
    with_never = run_sampler(engine, make_guider(engine, method, patcher, never), steps=STEPS)["samples"]
    without = run_sampler(engine, make_guider(engine, method, patcher, [stack[0], stack[2]]), steps=STEPS)["samples"]
    everything = run_sampler(engine, make_guider(engine, method, patcher, stack), steps=STEPS)["samples"]
    torch.testing.assert_close(with_never, without, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_never, everything, atol=1e-3)


def test_switch_takes_the_next_lora_in_its_window(engine, pack, tiny_model_factory, stack, monkeypatch):
    patcher = tiny_model_factory("sd15")
    guider = make_guider(engine, "switch", patcher, windowed(pack, stack[:2], (1, 0.5, 1.0)), tau=1)
    seen = []
    evaluate = guider.evaluate
    monkeypatch.setattr(guider, "evaluate", lambda rows, *a: seen.append(rows[0][1]) or evaluate(rows, *a))
    run_sampler(engine, guider, steps=STEPS)
    assert seen == [1, 1, 0, 1], "steps 0 and 1 skip LoRA 1 (window from 0.5); steps 2 and 3 alternate"


def test_no_lora_in_its_window_is_the_base_model(engine, pack, tiny_model_factory, stack):
    import comfy.samplers

    patcher = tiny_model_factory("sd15")
    late = windowed(pack, stack[:1], (1, 0.9, 1.0))
    loratorio = make_guider(engine, "loratorio", patcher, late)
    composed = run_sampler(engine, loratorio, steps=STEPS)["samples"]
    plain = comfy.samplers.CFGGuider(patcher)
    plain.set_conds(comfy_conditioning("sd15"), comfy_conditioning("sd15", seed=9))  # make_guider's prompts
    plain.set_cfg(loratorio.cfg)
    expected = run_sampler(engine, plain, steps=STEPS)["samples"]
    torch.testing.assert_close(composed, expected, rtol=1e-5, atol=1e-5)
    maps = loratorio.weight_history.maps()
    assert maps.shape[:2] == (STEPS, 1) and not maps.any(), "no LoRA acted: the weight maps are empty"


def test_window_node_errors_name_the_problem(pack, stack):
    node = pack.NODE_CLASS_MAPPINGS["LoRAtorioStepWindow"]()
    with pytest.raises(Exception, match=r"holds 3 LoRA.*between 1 and 3"):
        node.set_window(stack, 4, 0.0, 0.5)
    with pytest.raises(Exception, match="start before it ends"):
        node.set_window(stack, 1, 0.6, 0.2)


def test_windows_survive_the_loader_and_the_budget(pack, stack):
    (windowed_stack,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioStepWindow"]().set_window(stack, 2, 0.0, 0.4)
    chained, _ = pack.NODE_CLASS_MAPPINGS["LoRAtorioMultiLoRALoader"]().collect(lora_stack=windowed_stack)
    (budgeted,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioStrengthBudget"]().apply_budget(chained, 1.5)
    assert [tuple(row) for row in budgeted] == [(name, 0.5, 0.5) for name, _, _ in stack]
    assert {name: (w.start, w.end) for name, w in budgeted.windows.items()} == {stack[1][0]: (0.0, 0.4)}
    (within,) = pack.NODE_CLASS_MAPPINGS["LoRAtorioStrengthBudget"]().apply_budget(stack, 5.0)
    assert [tuple(row) for row in within] == [tuple(row) for row in stack]


def test_merge_says_it_ignores_windows(pack, tiny_model_factory, stack, caplog):
    patcher = tiny_model_factory("sd15")
    with caplog.at_level(logging.WARNING):
        pack.NODE_CLASS_MAPPINGS["LoRAtorioMerge"]().merge(patcher, windowed(pack, stack, (1, 0.0, 0.5)))
    assert "ignores the step windows" in caplog.text and stack[0][0] in caplog.text
