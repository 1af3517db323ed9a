"""Per-row adapters: each row of a batch gets its own adapter's weight delta, base weights untouched.

For a targeted layer with base output ``y = f(x; W0, b0)`` (linear or convolution), row ``b``
assigned to adapter ``a(b)`` gets ``y_b + f(x_b; dW_a, db_a)``; rows of the base model get nothing.
Because ``f`` is linear in its parameters this equals running the row through the merged layer.

Two forms of ``dW``:

* low-rank (LoRA, LoCon, and LoHa where its Khatri-Rao form is smaller than the weight):
  ``dW_a = up_a @ down_a`` (``strength * alpha / rank`` folded into ``up_a``). Adapters whose
  factors on a layer have the same rank and the same output slice (a fused q/k/v slice, or the
  whole output) are stacked into one :class:`LowRankGroup`, ``down [n, R, in]`` and
  ``up [n, size, R]``, so a gathered batched matmul per run of rows serves them all; each adapter
  keeps its own rank, a slice only touches its own output channels, and base rows cost nothing.
* dense (LoKr, OFT/BOFT, DoRA, GLoRA, Tucker, full diffs): ``dW_a = merge_a(W0) - W0`` from
  ComfyUI's own merge math, built once per set of LoRAs (:func:`.adapters.dense_delta`).

The deltas are applied by forward hooks that live for ONE model call: the ``APPLY_MODEL`` wrapper
(:func:`apply_model_with_rows`) installs them on the diffusion model that call runs (the main
model or a multi-GPU clone) with that call's row plan, and removes them when it returns. Which
adapter each row belongs to comes from the ``cond_or_uncond`` list ComfyUI's ``calc_cond_batch``
puts in ``transformer_options``, mapped through the row map the guider sets (list index ->
adapter index, -1 = base). Plans and their device tensors are cached per set of LoRAs, so a step
makes no host-to-device copy once the first step has run.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812

from .adapters import LowRankFactor
from .cross_attention_routing import cross_attention_routers
from .device_index import device_index
from .module_lookup import submodule
from .shared_input import JoinedDown, SharedInputProduct, join_downs, shared_input_siblings
from .token_routing import RoutedCall, conv_gate, token_gate, token_grids

LOG = logging.getLogger("comfyui-loratorio")
ROW_MAP_KEY = "loratorio_row_map"
BASE_ROW = -1
ROUTED_ROW = -2  # a row whose tokens each get their routed adapters' deltas (see .token_routing)
COND, UNCOND = 0, 1  # what ComfyUI's own cond_or_uncond values mean, and what patches expect
MAX_CACHED_PLANS = 16


@dataclass(frozen=True)
class LowRankGroup:
    """The low-rank deltas of ``adapters`` on one layer that share a rank and an output slice.

    ``down [n, R, in]`` (or ``[n, R, in, kh, kw]``) and ``up [n, size, R]`` hold adapter
    ``adapters[j]`` at index ``j``; the delta lands on output channels ``start:start + size``.
    """

    adapters: tuple[int, ...]
    down: torch.Tensor
    up: torch.Tensor
    start: int
    size: int
    _views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def to(self, device: torch.device, dtype: torch.dtype, down: torch.Tensor | None = None) -> LowRankGroup:
        """This group on ``device`` in ``dtype``; ``down``: its down stack there already (a view of a
        buffer it shares with other layers)."""
        down = self.down.to(device, dtype) if down is None else down.view(self.down.shape)
        return LowRankGroup(self.adapters, down, self.up.to(device, dtype), self.start, self.size)

    def transposed(self, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down[first:stop]`` as ``[m, in, R]``, ``up[first:stop]`` as ``[m, R, size])``: views of
        a linear layer's stacks, made once (a hook then queues only its two products)."""
        views = self._views.get((first, stop))
        if views is None:
            views = self._views[(first, stop)] = (self.down[first:stop].transpose(1, 2), self.up[first:stop].transpose(1, 2))
        return views

    @functools.cached_property
    def joined_down(self) -> torch.Tensor:
        """``[n * R, in...]``: every adapter's down, one after another (routed rows)."""
        return self.down.reshape(-1, *self.down.shape[2:])

    @functools.cached_property
    def joined_up(self) -> torch.Tensor:
        """``[size, n * R]``, matching :attr:`joined_down`."""
        return self.up.permute(1, 0, 2).reshape(self.size, -1)

    @functools.cached_property
    def joined_down_t(self) -> torch.Tensor:
        """``[in, n * R]``: :attr:`joined_down` of a linear layer, transposed."""
        return self.joined_down.T

    @functools.cached_property
    def joined_up_t(self) -> torch.Tensor:
        """``[n * R, size]``: :attr:`joined_up`, transposed."""
        return self.joined_up.T


@dataclass(frozen=True)
class DenseDelta:
    """One adapter's exact delta of one layer's parameters (either may be None)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x; dW, db)`` of a linear layer (a bias-only patch: the bias at every position)."""
        return self.bias.expand(*x.shape[:-1], -1) if self.weight is None else F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class LayerDeltas:
    """What one layer adds per row: groups of stacked low-rank factors and dense deltas by adapter index."""

    low_rank: tuple[LowRankGroup, ...] = ()
    dense: dict[int, DenseDelta] = field(default_factory=dict)

    def to(self, device: torch.device, dtype: torch.dtype, downs: Sequence[torch.Tensor] | None = None) -> LayerDeltas:
        """These deltas on ``device`` in ``dtype``; ``downs``: the groups' down stacks there already."""
        dense = {a: DenseDelta(_cast(d.weight, device, dtype), _cast(d.bias, device, dtype)) for a, d in self.dense.items()}
        placed = downs if downs is not None else [None] * len(self.low_rank)
        return LayerDeltas(tuple(group.to(device, dtype, down) for group, down in zip(self.low_rank, placed, strict=True)), dense)

    def numel(self) -> int:
        """How many numbers the deltas hold (their memory is this times the compute dtype's size)."""
        tensors = [t for g in self.low_rank for t in (g.down, g.up)]
        tensors += [t for d in self.dense.values() for t in (d.weight, d.bias) if t is not None]
        return sum(t.numel() for t in tensors)

    @property
    def adapters(self) -> set[int]:
        """The adapters with a delta on this layer."""
        return {a for group in self.low_rank for a in group.adapters} | set(self.dense)

    def whole_stack(self, adapters: tuple[int, ...], base: torch.Tensor) -> LowRankGroup | None:
        """This layer's one stack when it holds exactly ``adapters``, in order, over every output
        channel of ``base`` (its output), with nothing else on the layer; else None."""
        whole = self.low_rank[0] if len(self.low_rank) == 1 and not self.dense else None
        if whole is not None and whole.adapters == adapters and whole.size == base.shape[-1]:
            return whole
        return None

    def outputs_per_adapter(
        self, x: torch.Tensor, adapters: tuple[int, ...], base: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[1 + n, *base.shape]``: a linear layer's base output ``base = f(x; W0, b0)``, then ``base +
        f(x; dW_a)`` for each of ``adapters`` (``base`` again for one without a delta here).
        ``hidden``: ``x @`` the :meth:`whole_stack`'s joined down-projections, made already."""
        count, out_features = len(adapters), base.shape[-1]
        whole = self.whole_stack(adapters, base)
        if whole is not None and base.dtype == x.dtype:
            # every adapter in one stack, in order: one product for all of them, added onto the base output
            outputs = base.new_empty(count + 1, *base.shape)
            outputs[0] = base
            rank = whole.down.shape[1]
            if hidden is None:
                hidden = x.reshape(-1, x.shape[-1]).mm(whole.joined_down_t)
            hidden = hidden.view(-1, count, rank).transpose(0, 1)
            flat_base = base.reshape(1, -1, out_features).expand(count, -1, -1)
            torch.baddbmm(flat_base, hidden, whole.transposed(0, count)[1], out=outputs[1:].view(count, -1, out_features))
            return outputs
        outputs = base.unsqueeze(0).repeat(count + 1, *(1,) * base.ndim)
        slot = {adapter: j + 1 for j, adapter in enumerate(adapters)}
        for group in self.low_rank:
            members = [(j, slot[adapter]) for j, adapter in enumerate(group.adapters) if adapter in slot]
            if not members:
                continue
            stacked = device_index(tuple(j for j, _ in members), x.device)
            slots = device_index(tuple(s for _, s in members), x.device)
            down_t, up_t = group.down[stacked].transpose(1, 2), group.up[stacked].transpose(1, 2)  # [m, in, R], [m, R, size]
            batch = (len(members), *(1,) * (x.ndim - 2))  # the adapters, broadcast over x's batch dims
            hidden = torch.matmul(x.unsqueeze(0), down_t.reshape(*batch, *down_t.shape[1:]))
            delta = torch.matmul(hidden, up_t.reshape(*batch, *up_t.shape[1:]))
            outputs[slots, ..., group.start : group.start + group.size] += delta.to(outputs.dtype)
        for adapter, dense in self.dense.items():
            if adapter in slot:
                outputs[slot[adapter]] += dense.linear(x).to(outputs.dtype)
        return outputs


def group_low_rank(
    per_adapter: Sequence[Sequence[tuple[LowRankFactor, float]]], out_features: int, conv_kernel: tuple[int, ...] | None
) -> tuple[LowRankGroup, ...]:
    """Group ``[(factor, strength), ...]`` per adapter (empty for adapters that skip the layer).

    An adapter's factors on the same output slice are joined along the rank (``up1 @ down1 +
    up2 @ down2 = [up1 up2] @ [down1; down2]``); adapters are then stacked with the others of the
    same rank and slice."""
    pieces: dict[tuple, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for adapter, factors in enumerate(per_adapter):
        by_slice: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for factor, strength in factors:
            down = factor.down
            if conv_kernel is not None and down.ndim == 2:
                down = down.reshape(*down.shape, 1, 1)  # a linear LoRA on a 1x1 conv
            rows = factor.rows if factor.rows is not None else (0, out_features)
            downs, ups = by_slice.setdefault(rows, ([], []))
            downs.append(down)
            ups.append(factor.up * (factor.scale * strength))
        for (start, size), (downs, ups) in by_slice.items():
            down, up = torch.cat(downs), torch.cat(ups, dim=1)
            pieces.setdefault((start, size, tuple(down.shape)), []).append((adapter, down, up))
    return tuple(
        LowRankGroup(
            adapters=tuple(adapter for adapter, _, _ in members),
            down=torch.stack([down for _, down, _ in members]),
            up=torch.stack([up for _, _, up in members]),
            start=start,
            size=size,
        )
        for (start, size, _), members in sorted(pieces.items(), key=lambda item: item[0][:2])
    )


def _cast(tensor: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, dtype)


class RowSegment(NamedTuple):
    """A run of consecutive rows ``start:stop`` that a :class:`LowRankGroup` serves, made of blocks of
    ``repeat`` consecutive rows that carry the same adapter. ``index`` picks each block's factors
    from the group's stacks: a slice when the blocks hold the group's adapters in stack order (the
    stacks are viewed, not gathered). One product per block serves all its rows' tokens, so a run
    ordered adapter by adapter (cond and uncond of each together) costs two batched products."""

    start: int
    stop: int
    index: slice | torch.Tensor
    repeat: int

    @property
    def blocks(self) -> int:
        return (self.stop - self.start) // self.repeat


@dataclass(frozen=True)
class GroupRows:
    """The rows of one forward that a :class:`LowRankGroup` serves, as runs of consecutive rows."""

    segments: tuple[RowSegment, ...]


class RowPlan:
    """Which adapter each row of one forward carries (``BASE_ROW`` for the base model), with the
    per-group runs and per-adapter row indices the hooks need, built once per plan and device.

    ``everywhere``: adapters whose delta every row but the routed ones gets on top of its own, as if
    merged into the model (style LoRAs; a routed row gets them through its routing map)."""

    def __init__(self, rows: tuple[int, ...], device: torch.device, everywhere: tuple[int, ...] = ()) -> None:
        self.rows, self.device, self.everywhere = rows, device, everywhere
        if set(everywhere) & set(rows):
            raise ValueError(f"adapters {sorted(set(everywhere) & set(rows))} are applied everywhere and also have rows")
        self._groups: dict[tuple[int, ...], GroupRows] = {}
        self._everywhere_groups: dict[tuple[int, ...], GroupRows] = {}
        self._members: dict[int, torch.Tensor | None] = {}
        self.routed = tuple((start, stop) for start, stop, _ in runs_of([i for i, a in enumerate(rows) if a == ROUTED_ROW]))
        self.unrouted = runs_of([i for i, a in enumerate(rows) if a != ROUTED_ROW])

    @property
    def batch(self) -> int:
        return len(self.rows)

    @functools.cached_property
    def routed_index(self) -> torch.Tensor:
        """The routed rows' indices on the device, run after run."""
        rows = [i for start, stop in self.routed for i in range(start, stop)]
        return torch.tensor(rows, dtype=torch.long).to(self.device)

    def group_rows(self, adapters: tuple[int, ...]) -> GroupRows:
        cached = self._groups.get(adapters)
        if cached is None:
            cached = self._groups[adapters] = self._group_rows(adapters)
        return cached

    def _group_rows(self, adapters: tuple[int, ...]) -> GroupRows:
        position = {adapter: j for j, adapter in enumerate(adapters)}
        served = [i for i, adapter in enumerate(self.rows) if adapter in position]
        segments = []
        for start, stop, _ in runs_of(served):
            positions = tuple(position[self.rows[i]] for i in range(start, stop))
            repeat = block_length(positions)
            segments.append(RowSegment(start, stop, device_index(positions[::repeat], self.device), repeat))
        return GroupRows(tuple(segments))

    def everywhere_rows(self, adapters: tuple[int, ...]) -> GroupRows | None:
        """The runs of unrouted rows, once per adapter of a group's ``adapters`` applied everywhere
        (each run one block: one product over all its rows), or None when the group has none."""
        if adapters not in self._everywhere_groups:
            segments = [
                RowSegment(start, stop, slice(position, position + 1), stop - start)
                for position, adapter in enumerate(adapters)
                if adapter in self.everywhere
                for start, stop, _ in self.unrouted
            ]
            self._everywhere_groups[adapters] = GroupRows(tuple(segments)) if segments else None
        return self._everywhere_groups[adapters]

    def members(self, adapter: int) -> torch.Tensor | None:
        """The indices (on the device) of the rows carrying ``adapter`` (every unrouted row for an
        adapter applied everywhere), or None when none does."""
        if adapter not in self._members:
            carries = (lambda a: a != ROUTED_ROW) if adapter in self.everywhere else (lambda a: a == adapter)
            rows = [i for i, a in enumerate(self.rows) if carries(a)]
            self._members[adapter] = torch.tensor(rows, dtype=torch.long).to(self.device) if rows else None  # once per plan
        return self._members[adapter]


class RowLayers:
    """The deltas of one set of adapters, by module name, with copies cast per (device, dtype) on
    first use and the row plans of its forwards (kept as long as the set is: see
    ``AdapterSet.row_layers``).

    Registered for each run (:func:`row_layers_registered`) so that the per-call wrapper finds them
    by an id in ``transformer_options``: model options are copied (and by some nodes deep-copied)
    between calls, so they carry the id, never the tensors.
    """

    def __init__(self, layers: dict[str, LayerDeltas]) -> None:
        self.layers = layers
        self.paths = {name: tuple(name.split(".")) for name in layers}
        self.siblings = shared_input_siblings(layers)
        self.sibling_sets = tuple(dict.fromkeys(self.siblings.values()))  # each set of siblings once
        self._cast: dict[tuple[str, torch.device, torch.dtype], LayerDeltas] = {}
        self._joined: dict[tuple[tuple[str, ...], torch.device, torch.dtype], JoinedDown] = {}
        self._plans: dict[tuple[tuple[int, ...], torch.device, tuple[int, ...]], RowPlan] = {}
        self._lock = threading.Lock()  # multi-GPU threads cast and plan for their own devices at once

    def on(self, name: str, device: torch.device, dtype: torch.dtype) -> LayerDeltas:
        key = (name, device, dtype)
        cast = self._cast.get(key)
        if cast is None:
            siblings = self.siblings.get(name)
            if siblings is not None:
                return self._cast_siblings(siblings, device, dtype)[name]
            cast = self.layers[name].to(device, dtype)
            with self._lock:
                self._cast[key] = cast
        return cast

    def joined_down(self, siblings: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> JoinedDown:
        """The joined down-projections of layers that share an input (see :mod:`.shared_input`)."""
        joined = self._joined.get((siblings, device, dtype))
        if joined is None:
            self._cast_siblings(siblings, device, dtype)
            joined = self._joined[(siblings, device, dtype)]
        return joined

    def _cast_siblings(self, siblings: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> dict[str, LayerDeltas]:
        """Siblings are cast together: their down stacks are views of their one joined buffer."""
        joined = join_downs(siblings, self.layers, device, dtype)
        buffer = joined.transposed.T
        cast = {}
        for name in siblings:
            layer = self.layers[name]
            downs = [buffer[slice(*joined.columns[(name, index)])] for index in range(len(layer.low_rank))]
            cast[name] = layer.to(device, dtype, downs)
        with self._lock:
            self._joined.setdefault((siblings, device, dtype), joined)
            for name in siblings:
                self._cast.setdefault((name, device, dtype), cast[name])
        return {name: self._cast[(name, device, dtype)] for name in siblings}

    def plan(self, rows: tuple[int, ...], device: torch.device, everywhere: tuple[int, ...] = ()) -> RowPlan:
        """The plan of a forward whose rows carry ``rows`` (adapter index or ``BASE_ROW`` per row), with
        the adapters of ``everywhere`` on every unrouted row."""
        key = (rows, device, everywhere)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                if len(self._plans) >= MAX_CACHED_PLANS:
                    self._plans.pop(next(iter(self._plans)))
                plan = self._plans[key] = RowPlan(rows, device, everywhere)
        return plan

    def numel(self) -> int:
        return sum(layer.numel() for layer in self.layers.values())


@dataclass
class RunState:
    """What the per-call wrapper finds for a run: its deltas, and the routing map of its routed
    rows (``[B, N, H, W]`` at the latent's size; set by the guider before such rows are evaluated)."""

    layers: RowLayers
    routing: torch.Tensor | None = None


_RUNS: dict[int, RunState] = {}
_RUN_IDS = itertools.count()


@contextlib.contextmanager
def row_layers_registered(layers: RowLayers) -> Iterator[int]:
    """Make ``layers`` findable by the per-call wrapper for the duration of a run; yields its id."""
    run_id = next(_RUN_IDS)
    _RUNS[run_id] = RunState(layers)
    try:
        yield run_id
    finally:
        del _RUNS[run_id]


def set_routing(run_id: int, weights: torch.Tensor | None) -> None:
    """The routing map ``[B, N, H, W]`` the run's routed rows use from now on."""
    _RUNS[run_id].routing = weights


class RowLoRAHook:
    """The forward hook of one layer for one forward: adds each row's adapter delta to the output."""

    def __init__(
        self,
        module: torch.nn.Module,
        name: str,
        layers: RowLayers,
        plan: RowPlan,
        routed: RoutedCall | None = None,
        routed_elsewhere: bool = False,
        shared: SharedInputProduct | None = None,
    ) -> None:
        """``routed_elsewhere``: this layer's routed rows get their deltas from another hook (the
        per-query text keys and values of :mod:`.cross_attention_routing`), so this one skips them.
        ``shared``: the routed rows' product this layer shares with its siblings (:mod:`.shared_input`)."""
        self.name, self.layers, self.plan, self.routed, self.shared = name, layers, plan, routed, shared
        self.routed_rows = () if routed_elsewhere else plan.routed
        self.conv = isinstance(module, torch.nn.modules.conv._ConvNd)
        if self.conv:
            self.conv_args = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
            self.groups = module.groups
            self.conv_nd = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        x = args[0]
        if x.shape[0] != plan.batch:
            raise RuntimeError(
                f"comfyui-loratorio: a layer saw a batch of {x.shape[0]} rows where the step has {plan.batch}; "
                "this model family batches its layers in a way the per-row LoRA path does not support"
            )
        layer = self.layers.on(self.name, x.device, x.dtype)
        for group in layer.low_rank:
            self._add_low_rank(x, output, group, plan.group_rows(group.adapters))
            everywhere = plan.everywhere_rows(group.adapters) if plan.everywhere else None
            if everywhere is not None:
                self._add_low_rank(x, output, group, everywhere)
        for adapter, delta in layer.dense.items():
            rows = plan.members(adapter)
            if rows is not None:
                added = self._dense(x.index_select(0, rows), delta, output.shape)
                output.index_add_(0, rows, added.to(output.dtype))
        for start, stop in self.routed_rows:
            self._add_routed(x[start:stop], output[start:stop], layer, x)
        return output

    def _add_routed(self, x: torch.Tensor, output: torch.Tensor, layer: LayerDeltas, source: torch.Tensor) -> None:
        """Routed rows ``x`` of the layer's input ``source``: ``output += sum_i w_i(token) * f(x; dW_i)``
        (see :mod:`.token_routing`)."""
        call = self.routed
        if call is None:
            raise RuntimeError("comfyui-loratorio: a routed row arrived without a routing map")
        for index, group in enumerate(layer.low_rank):
            rank = group.down.shape[1]
            channels = slice(group.start, group.start + group.size)
            if self.conv and x.ndim == 4:
                hidden = self.conv_nd(x, group.joined_down, **self.conv_args)
                hidden = hidden * conv_gate(call, hidden.shape, group.adapters, x.dtype, rank)
                add_channel_product(output, hidden, group.joined_up, channels)
            elif not self.conv:
                hidden = None if self.shared is None else self.shared.hidden(self.name, index, x, source)
                if hidden is None:
                    gate = token_gate(call, self.name, x, group.adapters, rank)
                    hidden = x.reshape(-1, x.shape[-1]).mm(group.joined_down_t) * gate.reshape(-1, gate.shape[-1])
                if group.size == output.shape[-1] and output.is_contiguous() and output.dtype == hidden.dtype:
                    output.view(-1, group.size).addmm_(hidden, group.joined_up_t)
                else:
                    delta = hidden.mm(group.joined_up_t).reshape(*output.shape[:-1], group.size)
                    output[..., channels].add_(delta.to(output.dtype))
            else:
                raise RuntimeError(f"comfyui-loratorio: routed rows do not support the {x.ndim - 2}-d convolution {self.name}")
        for adapter, delta in layer.dense.items():
            added = self._dense(x, delta, output.shape)
            if self.conv:
                gate = conv_gate(call, added.shape, (adapter,), added.dtype)
            else:
                gate = token_gate(call, self.name, x, (adapter,)).to(added.dtype)
            output.add_((added * gate).to(output.dtype))

    def _dense(self, x: torch.Tensor, delta: DenseDelta, out_shape: torch.Size) -> torch.Tensor:
        if not self.conv:
            return delta.linear(x)
        if delta.weight is None:  # a bias-only patch: the bias broadcast over every output position
            return delta.bias.reshape(-1, *([1] * (len(out_shape) - 2))).expand(x.shape[0], *out_shape[1:])
        return self.conv_nd(x, delta.weight, delta.bias, groups=self.groups, **self.conv_args)

    def _add_low_rank(self, x: torch.Tensor, output: torch.Tensor, group: LowRankGroup, rows: GroupRows) -> None:
        """``output[rows, slice] += f(x[rows]; up @ down)`` per run of rows, accumulated in place."""
        channels = slice(group.start, group.start + group.size)
        for segment in rows.segments:
            start, stop, index = segment.start, segment.stop, segment.index
            whole_batch = start == 0 and stop == x.shape[0]
            x_rows = x if whole_batch else x[start:stop]
            out_rows = output if whole_batch else output[start:stop]
            if self.conv:
                self._add_low_rank_conv(x_rows, out_rows, group, segment, channels)
                continue
            count = segment.blocks  # a block's rows carry one adapter: one product over all their tokens
            if isinstance(index, slice):
                down_t, up_t = group.transposed(index.start, index.stop)
            else:
                down_t, up_t = group.down.index_select(0, index).transpose(1, 2), group.up.index_select(0, index).transpose(1, 2)
            hidden = torch.bmm(x_rows.reshape(count, -1, x.shape[-1]), down_t)
            if group.size == output.shape[-1] and out_rows.is_contiguous() and out_rows.dtype == hidden.dtype:
                out_rows.view(count, -1, output.shape[-1]).baddbmm_(hidden, up_t)
            else:
                delta = torch.bmm(hidden, up_t).reshape(*out_rows.shape[:-1], group.size)
                out_rows[..., channels].add_(delta.to(output.dtype))

    def _add_low_rank_conv(
        self, x_rows: torch.Tensor, out_rows: torch.Tensor, group: LowRankGroup, segment: RowSegment, channels: slice
    ) -> None:
        down, up = group.down[segment.index], group.up[segment.index]
        count, repeat = segment.blocks, segment.repeat
        if count == 1:
            hidden = self.conv_nd(x_rows, down[0], **self.conv_args)
            add_channel_product(out_rows, hidden, up[0], channels)
            return
        # the blocks side by side as channel groups: [repeat, count * C, ...], one grouped convolution
        grouped = x_rows.unflatten(0, (count, repeat)).transpose(0, 1).reshape(repeat, -1, *x_rows.shape[2:])
        hidden = self.conv_nd(grouped, down.reshape(-1, *down.shape[2:]), groups=count, **self.conv_args)
        hidden = hidden.unflatten(1, (count, down.shape[1]))
        delta = torch.einsum("kbr...,bor->bko...", hidden, up).to(out_rows.dtype)
        out_rows[:, channels].unflatten(0, (count, repeat)).add_(delta)


def add_channel_product(output: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor, channels: slice) -> None:
    """``output[:, channels] += up @ hidden`` at every position of a convolution's output
    ``[B, C, ...]``, with ``hidden [B, K, ...]`` and ``up [size, K]``: in place, one batched product
    when the delta covers every channel."""
    batch, width = output.shape[0], output.shape[1]
    if up.shape[0] == width and output.is_contiguous() and output.dtype == hidden.dtype:
        output.view(batch, width, -1).baddbmm_(up.expand(batch, -1, -1), hidden.reshape(batch, up.shape[1], -1))
    else:
        output[:, channels].add_(torch.einsum("bk...,ok->bo...", hidden, up).to(output.dtype))


@contextlib.contextmanager
def row_loras_installed(
    diffusion_model: torch.nn.Module, layers: RowLayers, plan: RowPlan, routed: RoutedCall | None = None
) -> Iterator[None]:
    """Hooks with ``plan`` on the layers of ``diffusion_model`` for the duration of the block, always
    removed; with routed rows, the cross-attentions' per-query text keys and values too."""
    routers = cross_attention_routers(diffusion_model, layers, plan, routed) if routed is not None else []
    per_query = {name for router in routers for name in router.text_layers.values()}
    products = {}
    if routed is not None and len(plan.routed) == 1:  # one run of routed rows: one product per set of siblings
        products = {  # not for siblings whose routed rows a cross-attention router serves (attn2's to_k, to_v)
            siblings: SharedInputProduct(siblings, layers, routed)
            for siblings in layers.sibling_sets
            if not per_query.issuperset(siblings)
        }
    handles = []
    try:
        for name, path in layers.paths.items():
            module = submodule(diffusion_model, path)
            shared = products.get(layers.siblings.get(name))
            hook = RowLoRAHook(module, name, layers, plan, routed, routed_elsewhere=name in per_query, shared=shared)
            handles.append(module.register_forward_hook(hook))
        for router in routers:  # after the layers' own hooks, so that the queries it keeps have their deltas
            handles += router.install()
        yield
    finally:
        for handle in handles:
            handle.remove()


def rows_for_forward(row_map: Sequence[int], cond_or_uncond: Sequence[int], batch: int) -> tuple[int, ...]:
    """The adapter index (or ``BASE_ROW``) of every row of one forward."""
    chunks = len(cond_or_uncond)
    if batch % chunks:
        raise RuntimeError(f"comfyui-loratorio: a forward of {batch} rows cannot hold {chunks} equal chunks")
    per_chunk = batch // chunks
    return tuple(row_map[i] for i in cond_or_uncond for _ in range(per_chunk))


def batching_order(adapters: Sequence[int]) -> list[int]:
    """The order in which to hand ``calc_cond_batch`` rows carrying ``adapters`` (list positions) so
    that a forward holds them adapter by adapter in stack order, base rows first: each adapter's
    rows then form one block of a stack-ordered run (see :class:`RowSegment`). ComfyUI batches the
    lists it is given last first (0.3.75 to 0.33); any other order costs calls, not correctness."""
    return sorted(range(len(adapters)), key=lambda i: adapters[i])[::-1]


def block_length(positions: Sequence[int]) -> int:
    """The length ``k`` when ``positions`` is runs of ``k`` equal values (``0, 0, 1, 1`` -> 2), else 1."""
    blocks = {len(list(block)) for _, block in itertools.groupby(positions)}
    return blocks.pop() if len(blocks) == 1 else 1


def runs_of(active: list[int]) -> tuple[tuple[int, int, int], ...]:
    """``(start, stop, first)`` for each run of consecutive indices in the sorted list ``active``."""
    runs, first = [], 0
    for position in range(1, len(active) + 1):
        if position == len(active) or active[position] != active[position - 1] + 1:
            runs.append((active[first], active[position - 1] + 1, first))
            first = position
    return tuple(runs)


def apply_model_with_rows(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    """``APPLY_MODEL`` wrapper: the per-row hooks, installed for this one model call and removed after.

    ``executor.class_obj`` is the ``BaseModel`` this call runs: the main model, or a clone on
    another GPU in ComfyUI's multi-GPU path, whose rows then carry their adapters too.
    """
    options = transformer_options or {}
    row_map = options.get(ROW_MAP_KEY)
    if row_map is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    state = _RUNS.get(row_map["run"])
    if state is None:
        raise RuntimeError("comfyui-loratorio: a model call arrived after its sampling run ended")
    rows = rows_for_forward(row_map["rows"], options["cond_or_uncond"], x.shape[0])
    everywhere = tuple(row_map.get("everywhere", ()))
    semantic_options = with_semantic_chunks(options, row_map)
    if all(row == BASE_ROW for row in rows) and not everywhere:
        return executor(x, t, c_concat, c_crossattn, control, semantic_options, **kwargs)
    plan = state.layers.plan(rows, x.device, everywhere)
    with eager_diffusion_model(executor.class_obj) as diffusion_model:
        routed = routed_call(state, plan, diffusion_model, x) if plan.routed else None
        with row_loras_installed(diffusion_model, state.layers, plan, routed):
            return executor(x, t, c_concat, c_crossattn, control, semantic_options, **kwargs)


def routed_call(state: RunState, plan: RowPlan, diffusion_model: torch.nn.Module, x: torch.Tensor) -> RoutedCall:
    """The routing of this call's routed rows: the run's map, one copy per routed chunk of the batch."""
    if state.routing is None:
        raise RuntimeError("comfyui-loratorio: a routed row arrived before any routing map was set")
    routed_rows = sum(stop - start for start, stop in plan.routed)
    samples = state.routing.shape[0]
    if routed_rows % samples:
        raise RuntimeError(f"comfyui-loratorio: {routed_rows} routed rows for a routing map of {samples} samples")
    weights = state.routing.to(x.device).repeat(routed_rows // samples, 1, 1, 1)
    grids, joint = token_grids(diffusion_model, x.shape[-2], x.shape[-1])
    return RoutedCall(weights, grids, joint)


@contextlib.contextmanager
def eager_diffusion_model(base_model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The diffusion model as plain modules for one call that carries adapter rows.

    ComfyUI's TorchCompileModel puts a ``torch.compile`` wrapper (an ``OptimizedModule``) in place of
    ``diffusion_model`` for each model call. A graph compiled before the per-row hooks existed does
    not see them (dynamo does not guard on module hooks by default), so the LoRAs would be dropped
    without a word; hooks created per call would force a recompile on every call. Calls with adapter
    rows therefore run the original modules; plain sampling keeps the compiled graph."""
    compiled = base_model.diffusion_model
    original = getattr(compiled, "_orig_mod", None)
    if original is None:
        yield compiled
        return
    _log_compile_bypass()
    base_model.diffusion_model = original
    try:
        yield original
    finally:
        base_model.diffusion_model = compiled


@functools.cache
def _log_compile_bypass() -> None:
    LOG.info("comfyui-loratorio: the model is compiled (torch.compile); model calls with LoRA rows run it uncompiled")


def with_semantic_chunks(transformer_options: dict, row_map: dict) -> dict:
    """Options whose ``cond_or_uncond`` says, as in plain ComfyUI, 0 (cond) or 1 (uncond) per chunk.

    ``calc_cond_batch`` numbers chunks by cond list, and a guider with many lists gives numbers past
    1; patches read the values as cond/uncond (SAG finds the uncond's attention at the first 1,
    TeaCache-style caches key on them)."""
    options = dict(transformer_options)
    options["cond_or_uncond"] = [row_map["kinds"][index] for index in transformer_options["cond_or_uncond"]]
    return options
