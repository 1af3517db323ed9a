"""Routing by the evidence of every step so far (``routing_memory = "steps so far"``, beyond the paper).

The paper routes each step on that step's cosines alone, ``Omega_t = SoftMin_i(s_it / T)``. Late in
a run, where two LoRAs claim the same object, that near-argmin can flip from step to step. With
memory a claim has to hold up over the steps:

    Omega_t  ~  Omega_(t-1) * SoftMin_i(s_it / T),   that is   Omega_it = softmax_i(E_it),
    E_it = sum over steps tau <= t of z_i,tau,   z_i,tau = -(s_i,tau - mean_j s_j,tau) / T,

the mean taken over the adapters competing at that position and step (after top-k and hard
regions). Only competing adapters add evidence, and centring keeps every step's evidence summing
to 0 over them, so an adapter that joins late (a step window) or was left out for a while (top-k)
starts from the average claim, neither ahead nor behind. A soft region's prior is added once, when
the weights are taken, so it does not compound over the steps. The first step's weights are the
paper's; at ``T = 0`` (a hard argmin) or ``T = inf`` (the plain mean) each step stands alone.

With the noise-level temperature (``T * r**3``) the evidence of a step at noise-to-signal ratio
``r`` is ``1 / r**3`` times that of a step at ``r = 1``: the last steps (``r`` about 0.03) would
outweigh all the others by thousands, and the memory would be the last step alone, routed as a
near-argmin on what is by then residual noise. So with memory the ratio is floored at
:data:`MEMORY_NOISE_FLOOR`: routing stops hardening once the image has formed, and every step
from there on weighs the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .tensors import SIMILARITY_DTYPE

RoutingMemory = Literal["this step", "steps so far"]
ROUTING_MEMORIES: tuple[RoutingMemory, ...] = ("this step", "steps so far")
# chosen on the toy benchmark's tuning split with the noise-level temperature and sliding patches:
# 0.511 recall without a floor, 0.524 at 0.5, 0.514 at 1 (without memory a floor of 0.5 changes
# nothing: 0.499 against 0.501); docs/quality-single-pass.md
MEMORY_NOISE_FLOOR = 0.5


def check_routing_memory(memory: str) -> None:
    if memory not in ROUTING_MEMORIES:
        raise ValueError(f"routing_memory must be one of {', '.join(ROUTING_MEMORIES)}, got {memory!r}")


def remembers(memory: RoutingMemory, temperature: float) -> bool:
    """Whether steps accumulate evidence: only between a hard argmin and the plain mean."""
    return memory == "steps so far" and 0 < temperature < math.inf


def step_evidence(similarity: Tensor, temperature: float, keep: Tensor | None = None) -> Tensor:
    """``z_i = -(s_i - mean_j s_j) / T`` over the adapters ``keep`` keeps at each position (dim 0 are
    the adapters), 0 for the others: one step's SoftMin scores, centred. ``0 < T < inf``."""
    s = similarity.to(SIMILARITY_DTYPE)
    kept = torch.ones_like(s) if keep is None else keep.expand_as(s).to(SIMILARITY_DTYPE)
    mean = (s * kept).sum(dim=0, keepdim=True) / kept.sum(dim=0, keepdim=True).clamp_min(1.0)
    return -(s - mean) * kept / temperature


class RoutingEvidence:
    """``E [N, B, rows, cols]``: every adapter's evidence summed over the steps of one run.

    Holds all of a run's ``N`` adapters; each step adds to the ones active in it. A step of another
    shape (a new run's batch or latent size) starts afresh, as :meth:`clear` does.
    """

    def __init__(self, adapters: int):
        self.adapters = adapters
        self._sums: Tensor | None = None

    def clear(self) -> None:
        self._sums = None

    def add(self, evidence: Tensor, active: Sequence[int] | None = None) -> Tensor:
        """Add one step's ``evidence`` (:func:`step_evidence`, one row per adapter of ``active``, all
        ``N`` when None) and return the running sums of those adapters."""
        rows = list(range(self.adapters)) if active is None else list(active)
        if len(rows) != evidence.shape[0]:
            raise ValueError(f"evidence holds {evidence.shape[0]} adapters' rows for {len(rows)} active adapters")
        shape = (self.adapters, *evidence.shape[1:])
        if self._sums is None or self._sums.shape != shape or self._sums.device != evidence.device:
            self._sums = evidence.new_zeros(shape)
        self._sums[rows] += evidence
        return self._sums[rows]
