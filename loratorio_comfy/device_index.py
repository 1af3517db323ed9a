"""Indices into a stack of per-adapter tensors that cost the GPU nothing after their first use.

Indexing a GPU tensor with a Python list copies the list to the device from pageable memory, and
such a copy waits for every kernel already queued: done in every layer of every model call, it
keeps the GPU idle while Python queues the next layer. Consecutive ascending positions become a
slice (a view, no copy); any other order becomes an index tensor made once per device and kept.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1024)
def device_index(positions: tuple[int, ...], device: torch.device) -> slice | torch.Tensor:
    """``positions`` as a slice when they run ``k, k + 1, ...``, else as a long tensor on ``device``."""
    if not positions:
        raise ValueError("an index needs at least one position")
    first = positions[0]
    if positions == tuple(range(first, first + len(positions))):
        return slice(first, first + len(positions))
    return torch.tensor(positions, dtype=torch.long).to(device)
