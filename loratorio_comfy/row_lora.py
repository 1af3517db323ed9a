"""Per-row LoRA: each row of a batch gets its own adapter's low-rank delta, base weights untouched.

For a targeted layer with base output ``y = f(x; W0)``, row ``b`` assigned to adapter ``a(b)``
gets ``y_b + up_a @ (down_a @ x_b)`` (``strength * alpha / rank`` folded into ``up_a``); rows of the
base model get nothing. All adapters of a layer are stacked as ``down [N + 1, R, in]`` and
``up [N + 1, out, R]`` (ranks zero-padded to the largest ``R``, fused-output slices zero-padded to
the full output, index ``N`` all zeros for base rows), so one gathered batched matmul per layer
serves every row: no loop over adapters, no weight written.

The delta is added by a forward hook on the layer, installed only while a guider samples
(:func:`row_loras_installed`). Which adapter each row belongs to comes from the
``cond_or_uncond`` list ComfyUI's ``calc_cond_batch`` puts in ``transformer_options`` for every
forward, mapped through the row map the guider sets (list index -> adapter index, -1 = base), by
an ``APPLY_MODEL`` wrapper that publishes it to the hooks for the duration of that forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn.functional import conv2d

from .adapters import LowRankFactor

ROW_MAP_KEY = "loratorio_row_map"
BASE_ROW = -1


@dataclass(frozen=True)
class RowPlan:
    """Which rows of the forward in flight carry an adapter, and which one.

    ``adapter_rows[j]`` is the stacked-layer index of row ``active[j]``; base-model rows are left
    out, so their share of the low-rank work is skipped. ``active`` is None when every row carries
    an adapter (no gather needed).
    """

    batch: int
    adapter_rows: torch.Tensor
    active: torch.Tensor | None


_CURRENT_ROWS: contextvars.ContextVar[RowPlan | None] = contextvars.ContextVar("loratorio_rows", default=None)


@dataclass(frozen=True)
class StackedLayer:
    """Every adapter's delta for one layer, ready to gather per row."""

    down: torch.Tensor  # [N + 1, R, in] or [N + 1, R, in, kh, kw]
    up: torch.Tensor  # [N + 1, out, R]


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


class RowLoRAHook:
    """The forward hook of one layer: adds each row's adapter delta to the layer's output."""

    def __init__(self, module: torch.nn.Module, layer: StackedLayer) -> None:
        self.layer = layer
        self.conv = isinstance(module, torch.nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = module.stride, module.padding, module.dilation
        self._cast: dict[tuple[torch.device, torch.dtype], StackedLayer] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> StackedLayer:
        key = (device, dtype)
        if key not in self._cast:
            self._cast[key] = StackedLayer(self.layer.down.to(device, dtype), self.layer.up.to(device, dtype))
        return self._cast[key]

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        plan = _CURRENT_ROWS.get()
        if plan is None:
            return None
        x = args[0]
        if x.shape[0] != plan.batch:
            raise RuntimeError(
                f"comfyui-loratorio: a layer saw a batch of {x.shape[0]} rows where the step has {plan.batch}; "
                "this model family batches its layers in a way the per-row LoRA path does not support"
            )
        if plan.active is not None:
            x = x.index_select(0, plan.active)
        layer = self._on(x.device, x.dtype)
        down, up = layer.down[plan.adapter_rows], layer.up[plan.adapter_rows]
        if self.conv:
            batch, channels = x.shape[:2]
            hidden = conv2d(
                x.reshape(1, batch * channels, *x.shape[2:]),
                down.reshape(batch * down.shape[1], *down.shape[2:]),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=batch,
            )
            hidden = hidden.reshape(batch, down.shape[1], *hidden.shape[2:])
            delta = torch.einsum("brhw,bor->bohw", hidden, up)
        else:
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, down.transpose(1, 2)), up.transpose(1, 2))
        delta = delta.reshape(x.shape[0], *output.shape[1:]).to(output.dtype)
        return output + delta if plan.active is None else output.index_add(0, plan.active, delta)


@contextlib.contextmanager
def row_loras_installed(diffusion_model: torch.nn.Module, layers: dict[str, StackedLayer]) -> Iterator[None]:
    """Hooks on the named layers of ``diffusion_model`` for the duration of the block, always removed."""
    handles = []
    try:
        for name, layer in layers.items():
            module = diffusion_model.get_submodule(name)
            handles.append(module.register_forward_hook(RowLoRAHook(module, layer)))
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


def apply_model_with_rows(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
    """``APPLY_MODEL`` wrapper: publishes the per-row adapter indices to the hooks for one forward."""
    options = transformer_options or {}
    row_map = options.get(ROW_MAP_KEY)
    if row_map is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    base_index = row_map["base_index"]
    rows = rows_for_forward(row_map["rows"], options["cond_or_uncond"], x.shape[0], base_index)
    active = (rows != base_index).nonzero().flatten()
    plan = None
    if active.numel():
        # built and moved to the device once per forward, not once per layer
        all_active = active.numel() == rows.numel()
        plan = RowPlan(x.shape[0], rows[active].to(x.device), None if all_active else active.to(x.device))
    token = _CURRENT_ROWS.set(plan)
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        _CURRENT_ROWS.reset(token)
