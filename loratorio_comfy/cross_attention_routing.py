"""Per-query text keys and values for the UNets' cross-attention in routed rows.

A LoRA on a cross-attention's ``to_k`` / ``to_v`` changes the keys and values of the prompt's
tokens, which every image query shares, so the token-level gate of :mod:`.token_routing` has no
image token to gate there. In a routed row each image query ``t`` instead attends through the
keys and values of the adapters it is routed to (``loratorio_core.per_query_attention_shift``):

    a(t) = sum_i w_i(t) Attn(q_t, K_i, V_i) + (1 - sum_i w_i(t)) Attn(q_t, K_0, V_0)

with ``K_i = K_0 + f(c; dK_i)`` (likewise ``V_i``) over the adapters that have a delta on this
layer's ``to_k`` or ``to_v`` and some weight in the map; the others attend like the base model.

How, for one model call: the routed rows' ``to_k`` / ``to_v`` get no delta (their outputs stay
``K_0, V_0``, :func:`.row_lora.row_loras_installed` skips them), hooks keep the routed rows'
queries, base keys and values and the text they came from, and a pre-hook on ``to_out`` adds the
shift to the attention output the module computed, so whatever an attention patch added to that
output (an ``attn2`` replace patch such as IPAdapter's) is kept. UNets pass no attention mask to
their cross-attention (ComfyUI 0.3.75 to 0.33), so none is applied here.

DiTs have no separate cross-attention (SD3 and Flux attend over text and image tokens jointly):
their text stream keeps each adapter's mean weight over the image (:mod:`.token_routing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import loratorio_core as lc
from .module_lookup import submodule
from .token_routing import RoutedCall, token_gate

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .row_lora import RowLayers, RowPlan

TEXT_PROJECTIONS = ("to_k", "to_v")


def is_cross_attention(module: torch.nn.Module) -> bool:
    """Whether ``module`` is laid out as ComfyUI's ``CrossAttention`` (the UNets' ``attn2``)."""
    to_out = getattr(module, "to_out", None)
    return (
        all(isinstance(getattr(module, name, None), torch.nn.Module) for name in ("to_q", "to_k", "to_v"))
        and isinstance(to_out, torch.nn.Sequential)
        and len(to_out) > 0
        and isinstance(getattr(module, "heads", None), int)
    )


def routed_cross_attentions(diffusion_model: torch.nn.Module, layer_names: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The cross-attentions (by module name) whose text keys or values some adapter changes."""
    parents = sorted({name.rsplit(".", 1)[0] for name in layer_names if name.endswith((".attn2.to_k", ".attn2.to_v"))})
    modules = {name: submodule(diffusion_model, tuple(name.split("."))) for name in parents}
    return {name: module for name, module in modules.items() if is_cross_attention(module)}


class CrossAttentionRouter:
    """The hooks of one cross-attention for one model call with routed rows (see the module doc)."""

    def __init__(self, attention: torch.nn.Module, name: str, layers: RowLayers, plan: RowPlan, call: RoutedCall) -> None:
        self.attention, self.name, self.layers, self.plan, self.call = attention, name, layers, plan, call
        self.text_layers = {p: f"{name}.{p}" for p in TEXT_PROJECTIONS if f"{name}.{p}" in layers.layers}
        changed = {a for layer_name in self.text_layers.values() for a in layers.layers[layer_name].adapters}
        self.adapters = tuple(sorted(changed & set(call.active())))
        self.kept: dict[str, torch.Tensor] = {}

    def install(self) -> list[RemovableHandle]:
        attention = self.attention
        return [
            attention.to_q.register_forward_hook(self._keeper("q")),
            attention.to_k.register_forward_hook(self._keeper("k")),
            attention.to_v.register_forward_hook(self._keeper("v")),
            attention.to_out[0].register_forward_pre_hook(self._shift),
        ]

    def _routed(self, tensor: torch.Tensor) -> torch.Tensor:
        runs = self.plan.routed
        pieces = [tensor[start:stop] for start, stop in runs]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # the order of RowPlan.routed_index

    def _keeper(self, projection: str):
        def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.shape[0] == self.plan.batch:
                self.kept[projection] = self._routed(output)
                if projection != "q":
                    self.kept[f"{projection}_input"] = self._routed(args[0])
                    self.kept[f"{projection}_source"] = args[0]

        return keep

    def _shift(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        attended, kept = args[0], self.kept
        self.kept = {}
        if not self.adapters or attended.shape[0] != self.plan.batch or not all(p in kept for p in ("q", "k", "v")):
            return None
        keys, values = self._keys_and_values(kept)
        query = kept["q"]
        coefficients = self.call.derived(
            ("attention shift", tuple(query.shape[:-1]), self.adapters, query.dtype),
            lambda: lc.attention_shift_coefficients(token_gate(self.call, f"{self.name}.to_out.0", query, self.adapters)),
        )
        shift = lc.per_query_attention_shift(query, keys, values, coefficients, self.attention.heads)
        return (attended.index_add(0, self.plan.routed_index, shift.to(attended.dtype)), *args[1:])

    def _keys_and_values(self, kept: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[1 + n, R, L, C]`` each: the base keys (values), then each routed adapter's. When ``to_k``
        and ``to_v`` read the same text, one product of their joined down-projections serves both."""
        k_name, v_name = self.text_layers.get("to_k"), self.text_layers.get("to_v")
        text = kept["k_input"]
        if self.layers.siblings.get(k_name) == (k_name, v_name) and kept["k_source"] is kept["v_source"]:
            k_layer, v_layer = (self.layers.on(name, text.device, text.dtype) for name in (k_name, v_name))
            stacks = (k_layer.whole_stack(self.adapters, kept["k"]), v_layer.whole_stack(self.adapters, kept["v"]))
            if all(stack is not None for stack in stacks):
                joined = self.layers.joined_down((k_name, v_name), text.device, text.dtype)
                hidden = text.reshape(-1, text.shape[-1]).mm(joined.transposed)
                k_hidden, v_hidden = (hidden[:, slice(*joined.columns[(name, 0)])] for name in (k_name, v_name))
                keys = k_layer.outputs_per_adapter(text, self.adapters, kept["k"], k_hidden)
                return keys, v_layer.outputs_per_adapter(text, self.adapters, kept["v"], v_hidden)
        return self._per_adapter("to_k", kept["k"], text), self._per_adapter("to_v", kept["v"], kept["v_input"])

    def _per_adapter(self, projection: str, base: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[1 + n, R, L, C]``: the base keys (or values), then each routed adapter's."""
        name = self.text_layers.get(projection)
        if name is None:
            return base.unsqueeze(0).expand(1 + len(self.adapters), *base.shape)
        return self.layers.on(name, text.device, text.dtype).outputs_per_adapter(text, self.adapters, base)


def cross_attention_routers(
    diffusion_model: torch.nn.Module, layers: RowLayers, plan: RowPlan, call: RoutedCall
) -> list[CrossAttentionRouter]:
    """One router per cross-attention whose text keys or values an adapter with weight in the map changes."""
    routers = [
        CrossAttentionRouter(module, name, layers, plan, call)
        for name, module in routed_cross_attentions(diffusion_model, list(layers.layers)).items()
    ]
    return [router for router in routers if router.adapters]
