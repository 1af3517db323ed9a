"""Per-row adapters: each row of a batch gets its own adapter's weight delta, base weights untouched.

For a targeted layer with base output ``y = f(x; W0, b0)`` (linear or convolution), row ``b``
assigned to adapter ``a(b)`` gets ``y_b + f(x_b; dW_a, db_a)``; rows of the base model get nothing.
Because ``f`` is linear in its parameters this equals running the row through the merged layer.

Two forms of ``dW``:

* low-rank (LoRA, LoCon): ``dW_a = up_a @ down_a`` (``strength * alpha / rank`` folded into
  ``up_a``). All adapters of a layer are stacked as ``down [N + 1, R, in]`` and ``up [N + 1, out, R]``
  (ranks zero-padded to the largest ``R``, fused-output slices zero-padded to the full output,
  index ``N`` all zeros for base rows), so one gathered batched matmul per layer serves every row.
* dense (LoHa, LoKr, OFT/BOFT, DoRA, GLoRA, Tucker, full diffs): ``dW_a = merge_a(W0) - W0`` from
  ComfyUI's own merge math, built once per run (:func:`.adapters.dense_delta`).

The deltas are applied by forward hooks that live for ONE model call: the ``APPLY_MODEL`` wrapper
(:func:`apply_model_with_rows`) installs them on the diffusion model that call runs (the main
model or a multi-GPU clone) with that call's row plan, and removes them when it returns. Which
adapter each row belongs to comes from the ``cond_or_uncond`` list ComfyUI's ``calc_cond_batch``
puts in ``transformer_options``, mapped through the row map the guider sets (list index ->
adapter index, -1 = base).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812

from .adapters import LowRankFactor

LOG = logging.getLogger("comfyui-loratorio")
ROW_MAP_KEY = "loratorio_row_map"
BASE_ROW = -1
COND, UNCOND = 0, 1  # what ComfyUI's own cond_or_uncond values mean, and what patches expect


@dataclass(frozen=True)
class StackedLayer:
    """Every adapter's low-rank delta for one layer, ready to gather per row."""

    down: torch.Tensor  # [N + 1, R, in] or [N + 1, R, in, kh, kw]
    up: torch.Tensor  # [N + 1, out, R]


@dataclass(frozen=True)
class DenseDelta:
    """One adapter's exact delta of one layer's parameters (either may be None)."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(frozen=True)
class LayerDeltas:
    """What one layer adds per row: stacked low-rank factors and/or dense deltas by adapter index."""

    low_rank: StackedLayer | None = None
    dense: dict[int, DenseDelta] = field(default_factory=dict)


def stack_layer(
    per_adapter: Sequence[Sequence[tuple[LowRankFactor, float]]], out_features: int, conv_kernel: tuple[int, ...] | None
) -> StackedLayer:
    """Stack ``[(factor, strength), ...]`` per adapter (empty for adapters that skip the layer)."""
    downs, ups = [], []
    for factors in per_adapter:
        adapter_downs, adapter_ups = [], []
        for factor, strength in factors:
            down = factor.down
            if conv_kernel is not None and down.ndim == 2:
                down = down.reshape(*down.shape, 1, 1)  # a linear LoRA on a 1x1 conv
            up = torch.zeros(out_features, factor.rank)
            start, size = factor.rows if factor.rows is not None else (0, out_features)
            up[start : start + size] = factor.up * (factor.scale * strength)
            adapter_downs.append(down)
            adapter_ups.append(up)
        downs.append(torch.cat(adapter_downs) if adapter_downs else None)
        ups.append(torch.cat(adapter_ups, dim=1) if adapter_ups else None)
    rank = max((d.shape[0] for d in downs if d is not None), default=0)
    in_shape = next(d.shape[1:] for d in downs if d is not None)
    down_stack = torch.zeros(len(per_adapter) + 1, rank, *in_shape)
    up_stack = torch.zeros(len(per_adapter) + 1, out_features, rank)
    for index, (down, up) in enumerate(zip(downs, ups, strict=True)):
        if down is not None:
            down_stack[index, : down.shape[0]] = down
            up_stack[index, :, : up.shape[1]] = up
    return StackedLayer(down=down_stack, up=up_stack)


def _cast(tensor: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, dtype)


class RowLayers:
    """The deltas of one set of adapters, by module name, with copies cast per (device, dtype) on
    first use (kept as long as the set is: see ``AdapterSet.row_layers``).

    Registered for each run (:func:`row_layers_registered`) so that the per-call wrapper finds them
    by an id in ``transformer_options``: model options are copied (and by some nodes deep-copied)
    between calls, so they carry the id, never the tensors.
    """

    def __init__(self, layers: dict[str, LayerDeltas]) -> None:
        self.layers = layers
        self._cast: dict[tuple[str, torch.device, torch.dtype], LayerDeltas] = {}
        self._lock = threading.Lock()  # multi-GPU threads cast for their own devices at once

    def on(self, name: str, device: torch.device, dtype: torch.dtype) -> LayerDeltas:
        key = (name, device, dtype)
        cast = self._cast.get(key)
        if cast is None:
            layer = self.layers[name]
            low_rank = layer.low_rank
            if low_rank is not None:
                low_rank = StackedLayer(low_rank.down.to(device, dtype), low_rank.up.to(device, dtype))
            dense = {a: DenseDelta(_cast(d.weight, device, dtype), _cast(d.bias, device, dtype)) for a, d in layer.dense.items()}
            cast = LayerDeltas(low_rank, dense)
            with self._lock:
                self._cast[key] = cast
        return cast


_RUNS: dict[int, RowLayers] = {}
_RUN_IDS = itertools.count()


@contextlib.contextmanager
def row_layers_registered(layers: RowLayers) -> Iterator[int]:
    """Make ``layers`` findable by the per-call wrapper for the duration of a run; yields its id."""
    run_id = next(_RUN_IDS)
    _RUNS[run_id] = layers
    try:
        yield run_id
    finally:
        del _RUNS[run_id]


@dataclass(frozen=True)
class RowPlan:
    """Which rows of one forward carry an adapter, and which one.

    ``adapter_rows[j]`` is the stacked-layer index of the j-th row that carries an adapter; base
    rows are left out, so their share of the low-rank work is skipped. ``segments`` are the runs
    of consecutive adapter rows, ``(start, stop, first)``: rows ``start:stop`` of the batch, whose
    indices are ``adapter_rows[first:first + stop - start]``. Working on each run as a slice of the
    batch (a view) lets the deltas be accumulated in place, with no copy of the input rows.
    ``rows_of`` lists each adapter's rows for the dense deltas.
    """

    batch: int
    adapter_rows: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    rows_of: dict[int, torch.Tensor]


class RowLoRAHook:
    """The forward hook of one layer for one forward: adds each row's adapter delta to the output."""

    def __init__(self, module: torch.nn.Module, name: str, layers: RowLayers, plan: RowPlan) -> None:
        self.name, self.layers, self.plan = name, layers, plan
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
        if layer.low_rank is not None:
            output = self._add_low_rank(x, output, layer.low_rank)
        for adapter, delta in layer.dense.items():
            rows = plan.rows_of.get(adapter)
            if rows is not None:
                added = self._dense(x.index_select(0, rows), delta, output.shape)
                output.index_add_(0, rows, added.to(output.dtype))
        return output

    def _dense(self, x: torch.Tensor, delta: DenseDelta, out_shape: torch.Size) -> torch.Tensor:
        if delta.weight is None:  # a bias-only patch: the bias broadcast over every output position
            channel_last = delta.bias if not self.conv else delta.bias.reshape(-1, *([1] * (len(out_shape) - 2)))
            return channel_last.expand(x.shape[0], *out_shape[1:])
        if self.conv:
            return self.conv_nd(x, delta.weight, delta.bias, groups=self.groups, **self.conv_args)
        return F.linear(x, delta.weight, delta.bias)

    def _add_low_rank(self, x: torch.Tensor, output: torch.Tensor, stacked: StackedLayer) -> torch.Tensor:
        """``output[rows] += f(x[rows]; up @ down)`` per run of adapter rows, accumulated in place."""
        for start, stop, first in self.plan.segments:
            rows = self.plan.adapter_rows[first : first + stop - start]
            down, up = stacked.down[rows], stacked.up[rows]
            x_rows, out_rows = x[start:stop], output[start:stop]
            if self.conv:
                count, channels = x_rows.shape[:2]
                hidden = self.conv_nd(
                    x_rows.reshape(1, count * channels, *x_rows.shape[2:]),
                    down.reshape(count * down.shape[1], *down.shape[2:]),
                    groups=count,
                    **self.conv_args,
                )
                hidden = hidden.reshape(count, down.shape[1], *hidden.shape[2:])
                out_rows.add_(torch.einsum("br...,bor->bo...", hidden, up).to(output.dtype))
                continue
            count = stop - start
            hidden = torch.bmm(x_rows.reshape(count, -1, x.shape[-1]), down.transpose(1, 2))
            if out_rows.is_contiguous() and out_rows.dtype == hidden.dtype:
                out_rows.view(count, -1, output.shape[-1]).baddbmm_(hidden, up.transpose(1, 2))
            else:
                out_rows.add_(torch.bmm(hidden, up.transpose(1, 2)).reshape(out_rows.shape).to(output.dtype))
        return output


@contextlib.contextmanager
def row_loras_installed(diffusion_model: torch.nn.Module, layers: RowLayers, plan: RowPlan) -> Iterator[None]:
    """Hooks with ``plan`` on the layers of ``diffusion_model`` for the duration of the block, always removed."""
    handles = []
    try:
        for name in layers.layers:
            module = diffusion_model.get_submodule(name)
            handles.append(module.register_forward_hook(RowLoRAHook(module, name, layers, plan)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def rows_for_forward(row_map: Sequence[int], cond_or_uncond: Sequence[int], batch: int, base_index: int) -> torch.Tensor:
    """The stacked-layer index of every row of one forward: ``base_index`` for base-model rows."""
    chunks = len(cond_or_uncond)
    if batch % chunks:
        raise RuntimeError(f"comfyui-loratorio: a forward of {batch} rows cannot hold {chunks} equal chunks")
    per_chunk = [row_map[i] if row_map[i] != BASE_ROW else base_index for i in cond_or_uncond]
    return torch.tensor(per_chunk, dtype=torch.long).repeat_interleave(batch // chunks)


def runs_of(active: list[int]) -> tuple[tuple[int, int, int], ...]:
    """``(start, stop, first)`` for each run of consecutive indices in the sorted list ``active``."""
    runs, first = [], 0
    for position in range(1, len(active) + 1):
        if position == len(active) or active[position] != active[position - 1] + 1:
            runs.append((active[first], active[position - 1] + 1, first))
            first = position
    return tuple(runs)


def row_plan(rows: torch.Tensor, base_index: int, device: torch.device, dense_adapters: set[int]) -> RowPlan:
    """The plan of one forward from its per-row stacked-layer indices (on the CPU), moved to ``device`` once."""
    active = (rows != base_index).nonzero().flatten()
    rows_of = {}
    for adapter in dense_adapters:
        members = (rows == adapter).nonzero().flatten()
        if members.numel():
            rows_of[adapter] = members.to(device)
    return RowPlan(rows.numel(), rows[active].to(device), runs_of(active.tolist()), rows_of)


def apply_model_with_rows(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    """``APPLY_MODEL`` wrapper: the per-row hooks, installed for this one model call and removed after.

    ``executor.class_obj`` is the ``BaseModel`` this call runs: the main model, or a clone on
    another GPU in ComfyUI's multi-GPU path, whose rows then carry their adapters too.
    """
    options = transformer_options or {}
    row_map = options.get(ROW_MAP_KEY)
    if row_map is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    layers = _RUNS.get(row_map["run"])
    if layers is None:
        raise RuntimeError("comfyui-loratorio: a model call arrived after its sampling run ended")
    base_index = row_map["base_index"]
    rows = rows_for_forward(row_map["rows"], options["cond_or_uncond"], x.shape[0], base_index)
    semantic_options = with_semantic_chunks(options, row_map)
    if bool((rows == base_index).all()):
        return executor(x, t, c_concat, c_crossattn, control, semantic_options, **kwargs)
    plan = row_plan(rows, base_index, x.device, row_map["dense_adapters"])
    with eager_diffusion_model(executor.class_obj) as diffusion_model, row_loras_installed(diffusion_model, layers, plan):
        return executor(x, t, c_concat, c_crossattn, control, semantic_options, **kwargs)


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
