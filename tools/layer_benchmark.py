"""What the per-row hook costs at one layer, as a ratio to the layer's own matmul (not a test).

    python3 tools/host.py run -- tools/benchmark.py --per-layer [--layer-threads 1]

One line per configuration, for scripts to read::

    layer tokens=1024 in=1280 out=1280 rank=32 method=loratorio adapters=4 ratio=0.05

``ratio`` is the time of the hook (every row's low-rank delta, accumulated into the layer output)
over the time of ``F.linear`` on the same rows: the base layer's own cost, which the pack adds to.
Each figure is the minimum over ``repeats`` timings of ``iterations`` calls. The first shape, 4
tokens of 64 channels, has next to no arithmetic: its ratio is the hook's own dispatch (Python and
kernel launches) in plain layer calls, what a fast GPU pays at every hooked layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

# (tokens, in, out): SD1.5 at 512 (64x64 latent, 320 and 640 channels), SDXL at 1024 (1280 channels
# at 32x32 tokens, 640 at 64x64), Flux at 1024 (3072 hidden, 4096 tokens)
LAYER_SHAPES = ((4, 64, 64), (4096, 320, 320), (1024, 640, 640), (1024, 1280, 1280), (4096, 640, 640), (4096, 3072, 3072))


@dataclass(frozen=True)
class MethodRows:
    """The rows a method sends through a layer for N adapters: adapter index per row (-1 = base)."""

    name: str
    rows: Callable[[int], list[int]]


METHODS = (
    # base cond, adapter conds, adapter unconds, base uncond (the guider's order)
    MethodRows("loratorio", lambda n: [-1, *range(n), *range(n), -1]),
    MethodRows("loratorio-lambda1", lambda n: [-1, *range(n), -1]),
    MethodRows("composite", lambda n: [*range(n), *range(n)]),
    MethodRows("switch", lambda n: [0, 0]),
    MethodRows("single-pass", lambda n: [-2, -1]),  # a routed row (an even map over the adapters) and the base uncond
)


def best_time(call: Callable[[], object], iterations: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            call()
        synchronize()
        times.append((time.perf_counter() - start) / iterations)
    return min(times)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """The GPU in half precision when there is one (what users run), else the CPU in float32."""
    return (torch.device("cuda"), torch.float16) if torch.cuda.is_available() else (torch.device("cpu"), torch.float32)


def layer_ratio(row_lora, tokens: int, width_in: int, width_out: int, rank: int, method: MethodRows, adapters: int,
                iterations: int = 5, repeats: int = 3) -> float:  # fmt: skip
    """Hook time over base matmul time for one layer shape and method."""
    generator = torch.Generator().manual_seed(0)
    device, dtype = device_and_dtype()
    rows = tuple(method.rows(adapters))
    module = torch.nn.Linear(width_in, width_out, bias=False).to(device, dtype)
    x = torch.randn(len(rows), tokens, width_in, generator=generator).to(device, dtype)
    factors = [
        [(_factor(row_lora, width_in, width_out, rank, generator), 1.0)] for _ in range(adapters)
    ]  # one rank-``rank`` LoRA per adapter
    layers = row_lora.RowLayers({"layer": row_lora.LayerDeltas(row_lora.group_low_rank(factors, width_out, None), {})})
    plan = layers.plan(rows, device)
    routed = None
    if row_lora.ROUTED_ROW in rows:  # an even map over the adapters, on the tokens' square grid
        side = int(tokens**0.5)
        routed = row_lora.RoutedCall(torch.full((1, adapters, side, side), 1 / adapters, device=device), ((side, side),), None)
    hook = row_lora.RowLoRAHook(module, "layer", layers, plan, routed)
    output = F.linear(x, module.weight)
    with torch.no_grad():
        hook(module, (x,), output)  # casts the stacks once, as the first forward of a run does
        base = best_time(lambda: F.linear(x, module.weight), iterations, repeats)
        added = best_time(lambda: hook(module, (x,), output), iterations, repeats)
    return added / base


def _factor(row_lora, width_in: int, width_out: int, rank: int, generator: torch.Generator):
    from comfyui_loratorio.loratorio_comfy.adapters import LowRankFactor

    return LowRankFactor(
        down=torch.randn(rank, width_in, generator=generator) / width_in**0.5,
        up=torch.randn(width_out, rank, generator=generator),
        scale=1.0,
    )


def run(row_lora, ranks: list[int], adapters: list[int], threads: int) -> list[str]:
    torch.set_num_threads(threads)
    lines = []
    for tokens, width_in, width_out in LAYER_SHAPES:
        for rank in ranks:
            for n in adapters:
                for method in METHODS:
                    iterations = max(5, 20000 // tokens)  # the dispatch shape needs many calls to time
                    ratio = layer_ratio(row_lora, tokens, width_in, width_out, rank, method, n, iterations)
                    line = (
                        f"layer tokens={tokens} in={width_in} out={width_out} rank={rank} method={method.name} "
                        f"adapters={n} ratio={ratio:.3f}"
                    )
                    print(line, flush=True)
                    lines.append(line)
    return lines
