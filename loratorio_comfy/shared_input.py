"""One product for the routed rows of layers that take the same input: a self-attention's ``to_q``,
``to_k`` and ``to_v`` (the image tokens), a cross-attention's ``to_k`` and ``to_v`` (the text).

A routed row's linear layer adds ``((x @ D^T) * gate) @ U^T`` (:mod:`.token_routing`), where ``D``
joins every adapter's down-projection. For siblings that read the same ``x``, the first of them
computes ``(x @ [D_q; D_k; D_v]^T) * [gate_q gate_k gate_v]`` once and each takes its own columns:
one matrix product and one multiplication instead of three of each. On a GPU that outruns Python,
every kernel launch saved is time saved. The joined down-projections are one buffer whose rows the
layers' own stacks view (:meth:`.row_lora.RowLayers.on`), so nothing is stored twice. The
cross-attention's per-query keys and values (:mod:`.cross_attention_routing`) take their one
ungated product from the same buffer.

Which layers: the UNets' ``attn1`` (``context`` defaults to the image tokens themselves) and
``attn2``'s ``to_k`` and ``to_v``. The siblings must also receive the same tensor at run time (an
``attn1`` patch may pass another context to ``to_k`` and ``to_v``, an ``attn2`` patch another
value to ``to_v``); a sibling whose input is not the one the product was made from computes its
own, as without this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from .token_routing import RoutedCall, token_gate

if TYPE_CHECKING:
    from .row_lora import LayerDeltas, RowLayers

SIBLING_PROJECTIONS = {".attn1": ("to_q", "to_k", "to_v"), ".attn2": ("to_k", "to_v")}  # by attention


class JoinedDown(NamedTuple):
    """``transposed [in, sum of ranks]``: the siblings' joined down-projections, and the columns
    ``(start, stop)`` of each ``(layer name, group index)``. ``gate_key``: each group's adapters and
    rank in column order, what their joined gate depends on besides the tokens (siblings of other
    blocks with the same key share one gate per call)."""

    transposed: torch.Tensor
    columns: dict[tuple[str, int], tuple[int, int]]
    gate_key: tuple[tuple[tuple[int, ...], int], ...]


def shared_input_siblings(layers: Mapping[str, LayerDeltas]) -> dict[str, tuple[str, ...]]:
    """Each layer that has siblings sharing its input, mapped to all of them (first: the one whose
    hook runs first). Every low-rank group of the siblings must be linear with the same
    input width, and none may hold a dense delta (those keep their own path)."""
    siblings: dict[str, tuple[str, ...]] = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        projections = next((p for marker, p in SIBLING_PROJECTIONS.items() if parent.endswith(marker)), None)
        if projections is None or leaf != projections[0]:
            continue
        names = tuple(f"{parent}.{projection}" for projection in projections)
        if not all(n in layers and layers[n].low_rank and not layers[n].dense for n in names):
            continue
        downs = [group.down for n in names for group in layers[n].low_rank]
        if all(down.ndim == 3 for down in downs) and len({down.shape[-1] for down in downs}) == 1:
            siblings.update(dict.fromkeys(names, names))
    return siblings


def join_downs(
    siblings: tuple[str, ...], layers: Mapping[str, LayerDeltas], device: torch.device, dtype: torch.dtype
) -> JoinedDown:
    """The siblings' down-projections (each group's ``[n * R, in]``), one after another in one buffer
    on ``device`` in ``dtype``; ``JoinedDown.transposed`` is that buffer transposed (a view)."""
    pieces, columns, gate_key, start = [], {}, [], 0
    for name in siblings:
        for index, group in enumerate(layers[name].low_rank):
            pieces.append(group.joined_down)
            columns[(name, index)] = (start, start + group.joined_down.shape[0])
            gate_key.append((group.adapters, group.down.shape[1]))
            start += group.joined_down.shape[0]
    return JoinedDown(torch.cat(pieces).to(device, dtype).T, columns, tuple(gate_key))


class SharedInputProduct:
    """One model call's gated product of one set of siblings, made by the first sibling's hook and
    handed out column by column; released once every sibling group has taken its columns."""

    def __init__(self, siblings: tuple[str, ...], layers: RowLayers, call: RoutedCall) -> None:
        self.siblings, self.layers, self.call = siblings, layers, call
        self._source: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._columns: dict[tuple[str, int], tuple[int, int]] = {}
        self._left = 0

    def hidden(self, name: str, group_index: int, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor | None:
        """``(x @ D^T) * gate`` of group ``group_index`` of layer ``name`` for the routed rows ``x`` of
        the layer's input ``source``, as ``[tokens, n * R]``; None where the layer must compute its own."""
        if source is not self._source:
            if name != self.siblings[0]:
                return None
            joined = self.layers.joined_down(self.siblings, x.device, x.dtype)
            gate = self.call.derived(("joined gate", joined.gate_key, tuple(x.shape[:-1]), x.dtype), lambda: self._gate(x))
            self._hidden = x.reshape(-1, x.shape[-1]).mm(joined.transposed) * gate.reshape(-1, gate.shape[-1])
            self._source, self._columns, self._left = source, joined.columns, len(joined.columns)
        start, stop = self._columns[(name, group_index)]
        hidden = self._hidden[:, start:stop]
        self._left -= 1
        if self._left == 0:
            self._source = self._hidden = None
        return hidden

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        gates = []
        for name in self.siblings:
            for group in self.layers.on(name, x.device, x.dtype).low_rank:
                gates.append(token_gate(self.call, name, x, group.adapters, group.down.shape[1]))
        return torch.cat(gates, dim=-1)
