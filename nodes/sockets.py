"""Checks that each socket input of a node holds what its socket carries, before the node runs.

ComfyUI validates widget values, but hands a socket input that is not a connection (a string, a
number or ``null`` in an API prompt) to the node as it is; the node would then fail deep inside
sampling with an ``AttributeError`` that names neither the input nor the fix. Every node of the
pack is registered through :func:`socket_checked`, so it names the input and the fix instead.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import comfy.model_patcher
import comfy.samplers
import comfy.sd
import torch

from ..loratorio_comfy.adapters import LoRAInputError
from .common import LORA_CONDITIONING, LORA_STACK


def is_conditioning(value: object) -> bool:
    """A ``CONDITIONING``: a list of ``[tensor, options]`` pairs (ComfyUI accepts None for the tensor)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(item, (list, tuple))
        and len(item) == 2
        and (item[0] is None or isinstance(item[0], torch.Tensor))
        and isinstance(item[1], dict)
        for item in value
    )


def is_latent(value: object) -> bool:
    return isinstance(value, dict) and isinstance(value.get("samples"), torch.Tensor)


def is_adapter_conditioning(value: object) -> bool:
    """A ``LORA_CONDITIONING``: one CONDITIONING per LoRA (Multi-LoRA Text Encode's output)."""
    return isinstance(value, (list, tuple)) and all(is_conditioning(item) for item in value)


SOCKET_CHECKS: dict[str, Callable[[object], bool]] = {
    "MODEL": lambda value: isinstance(value, comfy.model_patcher.ModelPatcher),
    "CLIP": lambda value: isinstance(value, comfy.sd.CLIP),
    "CONDITIONING": is_conditioning,
    "LATENT": is_latent,
    "MASK": lambda value: isinstance(value, torch.Tensor),
    "GUIDER": lambda value: isinstance(value, comfy.samplers.CFGGuider),
    LORA_STACK: lambda value: isinstance(value, (list, tuple)),  # its rows: common.as_lora_stack
    LORA_CONDITIONING: is_adapter_conditioning,
}


def describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return f"a {type(value).__name__} ({text[:40]}{'...' if len(text) > 40 else ''})"


def check_sockets(title: str, input_types: dict, inputs: dict) -> None:
    """Raise :class:`LoRAInputError` for the first socket input of ``inputs`` that does not hold its
    type. An optional input given as None counts as not connected."""
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind = spec[0]
            check = SOCKET_CHECKS.get(kind) if isinstance(kind, str) else None
            if check is None or name not in inputs or (section == "optional" and inputs[name] is None):
                continue
            if not check(inputs[name]):
                raise LoRAInputError(
                    f"{title}: input '{name}' needs a {kind} from a connected node, but got {describe(inputs[name])}. "
                    f"Connect a {kind} output to '{name}' (in an API prompt a connection is [\"<node id>\", <output index>])."
                )


def bound_inputs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """The call's inputs by name, keyword catch-alls (``**values``) flattened in."""
    inputs = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        catch_all = signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
        inputs.update(value if catch_all else {name: value})
    return inputs


def socket_checked(node_class: type, title: str) -> type:
    """``node_class`` with its ``FUNCTION`` checking the socket inputs first (see the module's docstring)."""
    function = getattr(node_class, node_class.FUNCTION)
    if getattr(function, "checks_sockets", False):
        return node_class
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args, **kwargs):
        check_sockets(title, node_class.INPUT_TYPES(), bound_inputs(signature, args, kwargs))
        return function(*args, **kwargs)

    checked.checks_sockets = True
    setattr(node_class, node_class.FUNCTION, checked)
    return node_class
