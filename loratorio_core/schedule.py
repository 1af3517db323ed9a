"""Per-adapter step windows and the total-strength budget of a stack.

A window ``[start, end)`` is a fraction of sampling: with ``n`` steps (the sampler's listed
sigmas ``s_0 > ... > s_n``), an adapter with window ``[a, b)`` is active at step ``i`` when
``a <= i / n < b``. ``[0, 1)`` is every step; ``[0, 0.3)`` the first 30 % (composition, pose),
``[0.6, 1)`` the last 40 % (detail). With ``denoise < 1`` the steps are those actually run.

The budget caps the sum of the absolute strengths: ``s_i' = s_i * min(1, B / sum_j |s_j|)``,
so four LoRAs at 0.6 with a budget of 1.6 run at 0.4 each, and a stack within budget is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .switch import SwitchSchedule


@dataclass(frozen=True)
class StepWindow:
    """The fraction of sampling ``[start, end)`` in which an adapter acts."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"a step window's {name} must be a fraction of sampling in [0, 1], got {value!r}")
        if self.start >= self.end:
            raise ValueError(
                f"a step window must start before it ends, got start {self.start} and end {self.end} "
                "(e.g. 0 to 0.4 for the first 40 % of the steps)"
            )

    def contains(self, step: int, steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``steps`` falls in the window."""
        return self.start <= step / steps < self.end


FULL_WINDOW = StepWindow()


def active_adapters(windows: Sequence[StepWindow], step: int, steps: int) -> tuple[int, ...]:
    """The indices of the adapters whose window contains ``step`` of ``steps``, in order."""
    if steps < 1 or not 0 <= step < steps:
        raise ValueError(f"step must lie in [0, {steps}), got {step}")
    return tuple(i for i, window in enumerate(windows) if window.contains(step, steps))


def switch_adapter(schedule: SwitchSchedule, step: int, active: Sequence[int]) -> int | None:
    """LoRA Switch with windows: the scheduled adapter if it is active at ``step``, else the next
    active one in the schedule's order (wrapping round); None when no adapter is active."""
    if not active:
        return None
    sequence = schedule.sequence
    first = sequence.index(schedule.adapter_at_step(step))
    return next(a for a in (sequence[(first + k) % len(sequence)] for k in range(len(sequence))) if a in active)


def budget_factor(strengths: Sequence[float], budget: float) -> float:
    """``min(1, budget / sum_j |s_j|)``: what every strength is multiplied by to keep to the budget."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"the strength budget must be a finite number above 0, got {budget!r}")
    total = sum(abs(s) for s in strengths)
    return 1.0 if total <= budget else budget / total
