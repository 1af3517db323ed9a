"""LoRA Switch (arXiv 2402.16843): one adapter at a time, advancing every ``tau`` steps.

Step ``i`` (counted from 0 over the sampler's listed sigmas) uses adapter ``order[(i // tau) % N]``
for both cond and uncond. The first adapter gets exactly ``tau`` steps; the official code switches
only after step ``i > 0, i % tau == 0`` has run, which gives it ``tau + 1`` (an off-by-one we do
not copy). ``tau = 5`` is the paper's best value.

Mapping a model evaluation to its step: the sampler lists ``sigmas = [s_0 > s_1 > ... > s_n]`` and
step ``i`` integrates from ``s_i`` to ``s_{i+1}``. An evaluation at ``sigma`` belongs to the step
``i = max{j < n : s_j > sigma}``, unless ``sigma`` equals a listed ``s_j`` up to a relative
tolerance (float noise, 1e-4), in which case it is step ``j``; listed sigmas closer to each other
than that cannot be told apart (no real schedule has them). Evaluations between two listed sigmas
(dpm_2, uni_pc, SDE midpoints) therefore belong to the step they fall in. Second-order samplers
that evaluate exactly at ``s_{i+1}`` (heun's corrector) see the adapter of step ``i + 1`` there,
which only differs at a switch boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_TAU = 5
SIGMA_RTOL = 1e-4


def step_index(sigma: float | Tensor, sample_sigmas: Sequence[float] | Tensor) -> int:
    """The sampling step an evaluation at ``sigma`` belongs to (see the module docstring)."""
    sigmas = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten()
    if sigmas.numel() < 2:
        raise ValueError(f"sample_sigmas must list at least 2 sigmas (one step), got {sigmas.numel()}")
    value = float(torch.as_tensor(sigma, dtype=torch.float64).flatten().max())
    listed = sigmas[:-1]
    relative_gap = (listed - value).abs() / listed.abs().clamp_min(torch.finfo(torch.float64).tiny)
    nearest = int(relative_gap.argmin())
    if relative_gap[nearest] <= SIGMA_RTOL:
        return nearest  # at a listed sigma, up to float noise
    above = (listed > value).nonzero()
    return int(above.max()) if above.numel() else 0


@dataclass(frozen=True)
class SwitchSchedule:
    """Which adapter is active at each step: ``order[(step // tau) % len(order)]``."""

    adapter_count: int
    tau: int = DEFAULT_TAU
    order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.adapter_count, bool) or not isinstance(self.adapter_count, int) or self.adapter_count < 1:
            raise ValueError(f"LoRA Switch needs at least one adapter, got {self.adapter_count!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise ValueError(f"tau (steps per adapter) must be an integer >= 1, got {self.tau!r}")
        if self.order is not None and sorted(self.order) != list(range(self.adapter_count)):
            raise ValueError(
                f"order must list each adapter index 0..{self.adapter_count - 1} exactly once, got {list(self.order)}"
            )

    @property
    def sequence(self) -> tuple[int, ...]:
        return tuple(range(self.adapter_count)) if self.order is None else tuple(self.order)

    def adapter_at_step(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        sequence = self.sequence
        return sequence[(step // self.tau) % len(sequence)]

    def active_adapter(self, sigma: float | Tensor, sample_sigmas: Sequence[float] | Tensor) -> int:
        """The adapter index active for a model evaluation at ``sigma``."""
        return self.adapter_at_step(step_index(sigma, sample_sigmas))
