"""How many torch calls that queue work (a kernel launch on a GPU) one warm sampling step makes, per
method, next to plain KSampler (not a test).

    python3 tools/host.py run -- tools/benchmark.py --dispatch [--models sd15,sdxl-dispatch] [--adapters 4]

On a GPU that outruns Python (an H200 with SD1.5 at 512, or even SDXL at 1024), a step takes about
as long as its calls take to dispatch, so this count predicts the wall time where a timing on a
slower machine cannot. It is exact and machine-independent: it counts calls, it times nothing.

Counted: every torch function or tensor method called during the step, except those that only
make a view, allocate or read metadata (``VIEWS``; ``to`` too, a no-op for tensors already in
place, as in a warm step). A step's count is ``(count(5 steps) - count(3 steps)) / 2``, so set-up
cancels; single pass runs 1 full step first, so its figure is a routed step's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch.overrides import TorchFunctionMode

VIEWS = frozenset(
    {
        "__get__", "__getitem__", "reshape", "view", "transpose", "expand", "unsqueeze", "squeeze", "permute", "t",
        "flatten", "unflatten", "size", "dim", "contiguous", "is_contiguous", "chunk", "split", "unbind", "narrow",
        "movedim", "__len__", "numel", "data_ptr", "stride", "is_floating_point", "new_empty", "empty", "__format__",
        "__hash__", "__eq__", "__bool__", "get_device", "__iter__", "type", "element_size", "to", "float", "detach",
        "__set__", "__repr__", "untyped_storage", "__index__", "__int__", "item", "tolist",
        "_has_compatible_shallow_copy_type",
    }
)  # fmt: skip
METHODS = ("merge", "loratorio", "loratorio-routed", "composite", "switch")


class ComputeCalls(TorchFunctionMode):
    """Counts the torch calls made inside the block that are not views or metadata reads."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in VIEWS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def calls_per_step(sample: Callable[[int], object]) -> float:
    """Compute calls of one warm step of ``sample(steps)``, a whole sampling run of ``steps`` steps."""
    sample(3)
    counts = []
    for steps in (3, 5):
        with ComputeCalls() as counter:
            sample(steps)
        counts.append(sum(counter.calls.values()))
    return (counts[1] - counts[0]) / 2


def run(bench_for: Callable[[str], object], models: list[str], adapters: list[int]) -> list[str]:
    """A Markdown table: each method's compute calls per step, and as a ratio to KSampler's."""
    lines = ["| model | N | method | calls per step | x KSampler |", "|---|---|---|---|---|"]
    for model in models:
        bench = bench_for(model)
        ksampler = bench.guider("ksampler", 0)
        base = calls_per_step(lambda steps, b=bench, g=ksampler: b.sample_seconds(g, steps))
        lines.append(f"| {model} | - | ksampler | {base:.0f} | 1.00 |")
        for n in adapters:
            for method in METHODS:
                guider = bench.guider(method, n, 1, 0)
                count = calls_per_step(lambda steps, b=bench, g=guider: b.sample_seconds(g, steps))
                label = "single pass (a routed step)" if method == "loratorio-routed" else method
                lines.append(f"| {model} | {n} | {label} | {count:.0f} | {count / base:.2f} |")
                print(lines[-1], flush=True)
    return lines
