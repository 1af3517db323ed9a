"""Token-level routing for a single routed row: every image token of every targeted layer gets
its routed adapters' deltas, weighted by a routing map (LoRAtorio's single-pass mode).

With routing weights ``w_i(t)`` for token ``t`` (``sum_i w_i <= 1``; the rest is the base
model), a routed row's layer output is ``y + sum_i w_i(t) * f(x_t; dW_i)``. For low-rank deltas
this is ONE low-rank product of rank ``sum_i R_i``: ``((x @ [down_1; ...; down_N]^T) * w) @
[up_1 ... up_N]^T``, with each adapter's weight repeated over its ranks.

Which tokens are image tokens, and on which grid: a layer's input ``[B, T, C]`` is spatial when
``T`` is the token count of the latent at one of the model's resolutions (UNets: the latent
halved 0 to 4 times; DiTs: the latent in ``patch x patch`` tokens), and a joint layer (Flux's
single blocks) holds text tokens first and the image tokens last. Convolutions are spatial at
their output size. The UNets' cross-attention keys and values are chosen per image query instead
(:mod:`.cross_attention_routing`). Every other input (text tokens: the text stream of SD3 and
Flux; per-sample vectors: time and pooled embeddings) gets each adapter's mean weight over the
image: a DiT's text keys and values in a routed row are the weighted blend of the adapters'.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812

from .device_index import device_index

TEXT_STREAM_MARKERS = ("attn2.to_k", "attn2.to_v", "txt", "context_block", "context_embedder")


@dataclass
class RoutedCall:
    """The routing of one model call: ``weights [R, N, H, W]`` for its ``R`` routed rows at the
    latent's size, the image-token grids the model may use, and what the call's layers derive from
    them (resized maps, gates), made once per call and shared by the layers at one resolution. A
    warm call copies nothing from the host to a GPU; it reads back which adapters are active, once."""

    weights: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    joint_grid: tuple[int, int] | None  # DiTs: the one grid whose tokens may follow text tokens
    _derived: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _active: tuple[int, ...] | None = None

    def derived(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, once per call and ``key``."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    def on_grid(self, height: int, width: int, adapters: tuple[int, ...]) -> torch.Tensor:
        """``[R, n, height, width]`` for ``adapters``, by area averaging."""

        def resized() -> torch.Tensor:
            source = self.weights[:, device_index(adapters, self.weights.device)]
            return source if source.shape[-2:] == (height, width) else F.interpolate(source, size=(height, width), mode="area")

        return self.derived(("grid", height, width, adapters), resized)

    def active(self) -> tuple[int, ...]:
        """The adapters with some weight anywhere in the map (read back once per call)."""
        if self._active is None:
            peaks = self.weights.amax(dim=(0, 2, 3)).tolist()
            self._active = tuple(adapter for adapter, peak in enumerate(peaks) if peak > 0)
        return self._active

    def mean(self, adapters: tuple[int, ...]) -> torch.Tensor:
        """``[R, n]``: the mean weight over the image of each of ``adapters``."""
        return self.derived(
            ("mean", adapters), lambda: self.weights[:, device_index(adapters, self.weights.device)].mean(dim=(-2, -1))
        )


def token_grids(
    diffusion_model: torch.nn.Module, height: int, width: int
) -> tuple[tuple[tuple[int, int], ...], tuple[int, int] | None]:
    """The image-token grids of a model at a latent of ``height x width``, and its joint grid (DiTs)."""
    patch = getattr(diffusion_model, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    if isinstance(patch, int) and patch >= 1:
        grid = (math.ceil(height / patch), math.ceil(width / patch))
        return (grid,), grid
    grids, h, w = [], height, width
    for _ in range(5):
        grids.append((h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return tuple(grids), None


def on_image_tokens(module_name: str, x: torch.Tensor) -> bool:
    """Whether a linear layer's input ``x`` holds image tokens (``[R, T, C]`` off the text stream),
    which get the map's weights token by token; other inputs get each adapter's mean weight."""
    return x.ndim == 3 and not any(marker in module_name for marker in TEXT_STREAM_MARKERS)


def token_weights(call: RoutedCall, module_name: str, x: torch.Tensor, adapters: tuple[int, ...]) -> torch.Tensor:
    """Weights of ``adapters`` for every token of a linear layer's input ``x [R, T, C]`` (or ``[R, C]``):
    ``[R, T, n]`` (or ``[R, n]``)."""
    mean = call.mean(adapters)
    if not on_image_tokens(module_name, x):
        return mean if x.ndim == 2 else mean.unsqueeze(1).expand(-1, x.shape[1], -1)
    tokens = x.shape[1]
    for height, width in call.grids:
        if tokens == height * width:
            return call.on_grid(height, width, adapters).flatten(2).transpose(1, 2)
    joint = call.joint_grid
    if joint is not None and tokens > joint[0] * joint[1]:  # text tokens first, then the image's
        image = call.on_grid(*joint, adapters).flatten(2).transpose(1, 2)
        text = mean.unsqueeze(1).expand(-1, tokens - image.shape[1], -1)
        return torch.cat([text, image], dim=1)
    return mean.unsqueeze(1).expand(-1, tokens, -1)


def token_gate(call: RoutedCall, module_name: str, x: torch.Tensor, adapters: tuple[int, ...], rank: int = 1) -> torch.Tensor:
    """:func:`token_weights` in ``x``'s dtype, each adapter's weight repeated over its ``rank``
    channels of a joined low-rank product: ``[R, T, n * rank]`` (or ``[R, n * rank]``), once per call."""
    key = ("token", on_image_tokens(module_name, x), tuple(x.shape[:-1]), adapters, rank, x.dtype)
    return call.derived(key, lambda: token_weights(call, module_name, x, adapters).to(x.dtype).repeat_interleave(rank, dim=-1))


def conv_gate(
    call: RoutedCall, out_shape: torch.Size, adapters: tuple[int, ...], dtype: torch.dtype, rank: int = 1
) -> torch.Tensor:
    """``[R, n * rank, H', W']`` at a convolution's output size (each weight over its ``rank``
    channels), in ``dtype``, once per call."""
    height, width = out_shape[-2], out_shape[-1]
    return call.derived(
        ("conv", height, width, adapters, rank, dtype),
        lambda: call.on_grid(height, width, adapters).to(dtype).repeat_interleave(rank, dim=1),
    )
