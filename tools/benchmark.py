#!/usr/bin/env python3
"""What composing N adapters costs, side by side, as ratios to the floor (not a test).

    python3 tools/host.py run -- tools/benchmark.py [--models small,sd15] [--adapters 1,2,3,4,5] [--pools 8,16]

For each model and adapter count N it times sampling steps of:

* ours: LoRAtorio (lambda 0.5 and 1), LoRA Composite, LoRA Switch, and dynamic LoRAtorio over a
  pool of M adapters (top-k 3);
* the floor: one plain forward of the same model with the same number of rows and no adapter;
* ComfyUI's hooks way: each adapter as a LoRA hook on its own copy of the conds (what a user can
  wire today), averaged like Composite;
* naive re-merging: each adapter merged into the weights through its ModelPatcher before its
  forward, every step;
* LoRA Merge: all adapters merged once, one CFG pair per step.

``--interleaved 2:3,2:0`` times warm whole runs instead (``--whole-run-steps``, default 20) of
KSampler, LoRA Merge, LoRAtorio and single pass at each ``full_steps:refresh_every`` schedule,
interleaved round by round (KSampler first in each round, every ratio against that round's
KSampler), so that a machine whose speed drifts between minutes skews them alike; each timed run
follows an untimed short one of the same method, so ComfyUI's weight patching when it switches
between the merged and the base model is not counted. The median of ``--repeats`` rounds and
their range are printed, with each method's rows against KSampler's.

``--dispatch`` counts, instead of timing, the torch calls a warm step makes per method against
KSampler (:mod:`dispatch_count`): what a GPU that outruns Python pays for, exact on any machine.

Per-step time is ``(T(steps_long) - T(steps_short)) / (steps_long - steps_short)`` of whole
sampling runs, so set-up costs cancel; each figure is the median of ``--repeats`` runs. Peak
memory is the process RSS above its level before the run (CPU) or ``max_memory_allocated``
(GPU). Results go to ``--out`` as JSON, a Markdown table and a PNG plot; the table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR / "tools"))
from host_env import comfyui_on_path, load_pack  # noqa: E402

DEFAULT_RANK = 32
STEPS_SHORT, STEPS_LONG = 2, 5
SD15_FULL = {
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
SDXL_FULL = {
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
}
MODELS = {
    # name: (family, changes to the tests' tiny config of that family, latent side)
    "small": ("sd15", {"model_channels": 64}, 32),  # reduced width, CPU
    "sd15": ("sd15", SD15_FULL, 16),  # the full-size SD1.5 UNet at a small latent, CPU
    "sd15-512": ("sd15", SD15_FULL, 64),  # GPU: SD1.5 at 512x512
    "sdxl-1024": ("sdxl", SDXL_FULL, 128),  # GPU: SDXL at 1024x1024
    # SDXL's depth at a tenth of its width on an 8x8 latent: next to no arithmetic, so a step costs
    # what its Python and kernel dispatch cost, as on a GPU that outruns the CPU (an H200 at 1024x1024)
    "sdxl-dispatch": ("sdxl", {**SDXL_FULL, "model_channels": 32}, 8),
    "sd15-dispatch": ("sd15", {**SD15_FULL, "model_channels": 32}, 8),  # the same for SD1.5's depth
}  # fmt: skip


@dataclass
class Result:
    model: str
    method: str
    adapters: int
    rows_per_step: int
    step_seconds: float
    forwards_per_step: float
    rows_per_forward: float
    peak_memory_mb: float
    ratio_to_floor: float | None = None
    # a cold run: guider built from the node inputs, stacks built, STEPS_LONG steps (set-up included)
    first_run_seconds: float | None = None
    first_step_seconds: float | None = None  # from building the guider to the first step's callback
    first_run_vs_ksampler: float | None = None
    first_step_vs_ksampler: float | None = None
    whole_run_vs_ksampler: float | None = None  # warm, --whole-run-steps steps


class PeakMemory:
    """Peak process RSS (CPU) or allocated memory (GPU) above the level at start, in MB."""

    def __init__(self, device) -> None:
        import psutil
        import torch

        self.torch, self.device, self.process = torch, device, psutil.Process()
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
            self.start = self.torch.cuda.memory_allocated()
        else:
            self.start = self.process.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.start)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = self.torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self.thread.join()
        self.peak_mb = self.peak / 2**20


def make_baselines():
    """Guiders for the floor and the alternatives; defined here so ComfyUI is imported first."""
    import comfy.hooks
    import comfy.model_management
    import comfy.samplers
    import comfy.sd
    import torch

    class FloorGuider(comfy.samplers.CFGGuider):
        """``rows`` copies of the positive cond through the plain model: the cost floor."""

        def __init__(self, patcher, rows: int) -> None:
            super().__init__(patcher)
            self.rows = rows

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            out = comfy.samplers.calc_cond_batch(
                self.inner_model, [self.conds["positive"]] * self.rows, x, timestep, model_options
            )
            return out[0]

    class HooksGuider(comfy.samplers.CFGGuider):
        """ComfyUI's own way: each adapter a LoRA hook on a copy of the conds, Composite's math."""

        def __init__(self, patcher, states: list[dict], cfg: float) -> None:
            super().__init__(patcher)
            self.states = states
            self.set_cfg(cfg)

        def set_conds(self, positive, negative):
            conds = {}
            for index, state in enumerate(self.states):
                hooks = comfy.hooks.create_hook_lora(state, 1.0, 0.0)
                conds[f"c{index}"] = comfy.hooks.set_hooks_for_conditioning(positive, hooks)
                conds[f"u{index}"] = comfy.hooks.set_hooks_for_conditioning(negative, hooks)
            self.inner_set_conds(conds)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            n = len(self.states)
            names = [f"c{i}" for i in range(n)] + [f"u{i}" for i in range(n)]
            out = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[k] for k in names], x, timestep, model_options)
            cond, uncond = torch.stack(out[:n]).mean(0), torch.stack(out[n:]).mean(0)
            return comfy.samplers.cfg_function(self.inner_model, cond, uncond, self.cfg, x, timestep, model_options)

    class NaiveGuider(comfy.samplers.CFGGuider):
        """Re-merge each adapter into the weights (ModelPatcher) before its forward, every step."""

        def __init__(self, patcher, states: list[dict], cfg: float) -> None:
            super().__init__(patcher)
            self.patchers = [comfy.sd.load_lora_for_models(patcher, None, s, 1.0, 0.0)[0] for s in states]
            self.set_cfg(cfg)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            conds, unconds = [], []
            for patcher in self.patchers:
                comfy.model_management.unload_all_models()  # the merge must be redone for this adapter
                comfy.model_management.load_models_gpu([patcher])
                cond, uncond = comfy.samplers.calc_cond_batch(
                    patcher.model, [self.conds["positive"], self.conds["negative"]], x, timestep, model_options
                )
                conds.append(cond)
                unconds.append(uncond)
            comfy.model_management.unload_all_models()
            comfy.model_management.load_models_gpu([self.model_patcher])
            cond, uncond = torch.stack(conds).mean(0), torch.stack(unconds).mean(0)
            return comfy.samplers.cfg_function(self.inner_model, cond, uncond, self.cfg, x, timestep, model_options)

    return FloorGuider, HooksGuider, NaiveGuider


class Bench:
    def __init__(self, model_name: str, options: argparse.Namespace, work: Path) -> None:
        import comfy.model_management
        import comfy.model_patcher
        import folder_paths
        import torch

        from support.engine_helpers import comfy_conditioning
        from support.lora_files import write_kohya
        from support.tiny_models import FAMILY_SPECS, fill_seeded

        family, changes, self.side = MODELS[model_name]
        self.name, self.options = model_name, options
        self.device = comfy.model_management.get_torch_device()
        self.dtype = torch.float32 if self.device.type == "cpu" else getattr(torch, options.dtype)
        spec = FAMILY_SPECS[family]
        config = spec.model_class({**spec.unet_config, **changes})
        config.set_inference_dtype(self.dtype, None)
        model = config.get_model({})
        fill_seeded(model.diffusion_model, 0)
        self.patcher = comfy.model_patcher.ModelPatcher(
            model, load_device=self.device, offload_device=comfy.model_management.unet_offload_device()
        )
        loras = work / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths["loras"] = ([str(loras)], folder_paths.supported_pt_extensions)
        count = max(max(options.adapters), max(options.pools, default=0))
        self.lora_names = []
        for index in range(count):
            path = loras / f"{model_name}-r{options.rank}-{index}.safetensors"
            if not path.exists():
                write_kohya(path, family, model, rank=options.rank, alpha=options.rank, seed=100 + index)
            self.lora_names.append(path.name)
        self.positive = comfy_conditioning(family)
        self.negative = comfy_conditioning(family, seed=9)

    def states(self, n: int) -> list[dict]:
        from comfyui_loratorio.loratorio_comfy.adapter_set import lora_path
        from comfyui_loratorio.loratorio_comfy.adapters import LORA_FILES

        return [LORA_FILES.load(lora_path(name), name) for name in self.lora_names[:n]]

    def guider(self, method: str, n: int, routed_full_steps: int = 1, routed_refresh_every: int = 0):
        import comfy.samplers
        import nodes as comfy_nodes
        from comfyui_loratorio.loratorio_comfy import build

        floor_guider, hooks_guider, naive_guider = make_baselines()
        stack = [(name, 1.0, 1.0) for name in self.lora_names[:n]]
        cfg = 5.0
        loratorio = {"patch_size": 8, "temperature": 0.05, "top_k": 0, "top_k_mode": "image"}
        if method == "loratorio":
            return build.loratorio_guider(
                self.patcher, self.positive, self.negative, stack, cfg, recentre_lambda=0.5, **loratorio
            )
        if method == "loratorio-lambda1":
            return build.loratorio_guider(
                self.patcher, self.positive, self.negative, stack, cfg, recentre_lambda=1.0, **loratorio
            )
        if method == "loratorio-routed":  # single pass: full steps, then one routed row + the base uncond
            return build.loratorio_guider(
                self.patcher, self.positive, self.negative, stack, cfg, recentre_lambda=0.5, **loratorio,
                routing="single pass", full_steps=routed_full_steps, refresh_every=routed_refresh_every,
            )  # fmt: skip
        if method == "loratorio-dynamic":
            return build.loratorio_guider(
                self.patcher, self.positive, self.negative, stack, cfg, recentre_lambda=1.0, **{**loratorio, "top_k": 3}
            )
        if method == "composite":
            return build.composite_guider(self.patcher, self.positive, self.negative, stack, cfg)
        if method == "switch":
            return build.switch_guider(self.patcher, self.positive, self.negative, stack, cfg, 1)
        if method == "hooks":
            guider = hooks_guider(self.patcher, self.states(n), cfg)
        elif method == "naive-remerge":
            guider = naive_guider(self.patcher, self.states(n), cfg)
        elif method == "merge":
            merged = self.patcher
            for name, strength, _ in stack:
                (merged,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(merged, name, strength)
            guider = comfy.samplers.CFGGuider(merged)
            guider.set_cfg(cfg)
        elif method == "ksampler":
            guider = comfy.samplers.CFGGuider(self.patcher)
            guider.set_cfg(cfg)
        elif method.startswith("floor-"):
            guider = floor_guider(self.patcher, int(method.split("-")[1]))
        else:
            raise ValueError(method)
        guider.set_conds(self.positive, self.negative)
        return guider

    def cold_run(self, method: str, n: int) -> tuple[float, float]:
        """(whole run, time to the first step's callback) from the node inputs, nothing cached."""
        from comfyui_loratorio.loratorio_comfy import adapter_set

        adapter_set.ROW_LAYERS.clear()
        first_step: list[float] = []
        start = time.perf_counter()
        guider = self.guider(method, n)
        total = self.sample_seconds(guider, STEPS_LONG, lambda *_: first_step or first_step.append(time.perf_counter()))
        setup = time.perf_counter() - start - total
        return setup + total, first_step[0] - start

    def sample_seconds(self, guider, steps: int, callback=None) -> float:
        import comfy.samplers
        import torch

        sigmas = comfy.samplers.calculate_sigmas(self.patcher.get_model_object("model_sampling"), "normal", steps)
        noise = torch.randn(1, 4, self.side, self.side, generator=torch.Generator().manual_seed(0))
        latent = torch.zeros_like(noise)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, callback=callback, disable_pbar=True, seed=0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    @contextlib.contextmanager
    def forward_rows(self) -> Iterator[list[int]]:
        """The row count of every forward of the model while the block runs (appended as they come)."""
        counts: list[int] = []
        handle = self.patcher.model.diffusion_model.register_forward_pre_hook(lambda _m, a: counts.append(a[0].shape[0]))
        try:
            yield counts
        finally:
            handle.remove()

    def settled_run(self, guider, steps: int) -> tuple[float, int]:
        """(seconds, rows evaluated) of one sampling run after an untimed short one, so that ComfyUI's
        patching of this guider's weights (Merge's LoRAs, or restoring the base after them) is not timed."""
        self.sample_seconds(guider, STEPS_SHORT)
        with self.forward_rows() as counts:
            seconds = self.sample_seconds(guider, steps)
        return seconds, sum(counts)

    def whole_run_seconds(self, method: str, n: int, steps: int) -> float:
        """A warm whole run of ``steps`` steps (single pass: the node's default schedule)."""
        from comfyui_loratorio import loratorio_core as lc

        guider = self.guider(method, n, lc.DEFAULT_FULL_STEPS, lc.DEFAULT_REFRESH_EVERY)
        self.sample_seconds(guider, STEPS_SHORT)  # warm-up
        return statistics.median(self.sample_seconds(guider, steps) for _ in range(self.options.repeats))

    def measure(self, method: str, n: int, rows: int) -> Result:
        first_run, first_step = self.cold_run(method, n) if not method.startswith("floor-") else (None, None)
        guider = self.guider(method, n)
        with self.forward_rows() as counts:
            self.sample_seconds(guider, STEPS_SHORT)  # warm-up: loads, caches, allocator
            counts.clear()
            self.sample_seconds(guider, 1)
            forwards, total_rows = len(counts), sum(counts)
            per_step = []
            with PeakMemory(self.device) as memory:
                for _ in range(self.options.repeats):
                    short = self.sample_seconds(guider, STEPS_SHORT)
                    long = self.sample_seconds(guider, STEPS_LONG)
                    per_step.append((long - short) / (STEPS_LONG - STEPS_SHORT))
        return Result(
            self.name,
            method,
            n,
            rows,
            statistics.median(per_step),
            float(forwards),
            total_rows / max(forwards, 1),
            memory.peak_mb,
            first_run_seconds=first_run,
            first_step_seconds=first_step,
        )


def rows_for(method: str, n: int) -> int:
    return {
        "loratorio": 2 + 2 * n, "loratorio-lambda1": 2 + n, "loratorio-dynamic": 2 + n, "loratorio-routed": 2,
        "composite": 2 * n, "switch": 2,
        "hooks": 2 * n, "naive-remerge": 2 * n, "merge": 2,
    }[method]  # fmt: skip


def run(options: argparse.Namespace, save) -> list[Result]:
    """Every figure of the plan; ``save(results)`` runs after each, so a long run leaves its JSON."""
    import torch

    results: list[Result] = []
    work = options.out / "work"
    for model_name in options.models:
        bench = Bench(model_name, options, work)
        floors: dict[int, Result] = {}

        def floor(rows: int, bench=bench, floors=floors) -> Result:
            if rows not in floors:
                floors[rows] = bench.measure(f"floor-{rows}", 0, rows)
                results.append(floors[rows])
                save(results)
                print(f"  {bench.name} floor {rows} rows: {floors[rows].step_seconds * 1000:.1f} ms/step", flush=True)
            return floors[rows]

        ksampler = bench.cold_run("ksampler", 0)  # plain KSampler on the base model, the same way
        print(f"  {bench.name} plain KSampler: first run {ksampler[0]:.2f} s, first step {ksampler[1]:.2f} s", flush=True)
        whole_ksampler = bench.whole_run_seconds("ksampler", 0, options.whole_run_steps) if options.whole_run_steps else 0.0
        plan = [(m, n) for n in options.adapters for m in options.methods]
        plan += [("loratorio-dynamic", m) for m in options.pools]
        for method, n in plan:
            rows = rows_for(method, n)
            result = bench.measure(method, n, rows)
            result.ratio_to_floor = result.step_seconds / floor(rows).step_seconds
            result.first_run_vs_ksampler = result.first_run_seconds / ksampler[0]
            result.first_step_vs_ksampler = result.first_step_seconds / ksampler[1]
            if options.whole_run_steps:
                result.whole_run_vs_ksampler = bench.whole_run_seconds(method, n, options.whole_run_steps) / whole_ksampler
            results.append(result)
            save(results)
            print(
                f"  {model_name} {method} N={n}: {result.step_seconds * 1000:.1f} ms/step, x{result.ratio_to_floor:.2f} floor",
                flush=True,
            )
        del bench
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def parse_schedules(text: str) -> list[tuple[int, int]]:
    """``"2:3,2:0"`` -> ``[(2, 3), (2, 0)]``: single pass ``full_steps:refresh_every`` schedules."""
    schedules = []
    for item in filter(None, text.split(",")):
        full, _, refresh = item.partition(":")
        try:
            schedules.append((int(full), int(refresh or 0)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not full_steps:refresh_every, e.g. 2:3") from None
    return schedules


def interleaved_whole_runs(options: argparse.Namespace, meta: dict, save) -> str:
    """Warm whole runs against KSampler, interleaved round by round; a Markdown table of the ratios
    of time and of rows evaluated (their gap is what each row costs beyond a plain one).
    ``save(table)`` runs after each adapter count, so a long run leaves what it measured."""
    steps = options.whole_run_steps or 20
    lines = [
        f"Measured {meta['date']} on {meta['device']} ({meta['dtype']}): warm whole runs of {steps} euler steps against "
        f"plain KSampler, LoRA rank {options.rank}, interleaved over {options.repeats} rounds (median, and the range "
        "over the rounds).",
        "",
        "| model | N | method | rows x KSampler | time x KSampler | range |",
        "|---|---|---|---|---|---|",
    ]
    table = "\n".join(lines) + "\n"
    for model_name in options.models:
        bench = Bench(model_name, options, options.out / "work")
        for n in options.adapters:
            variants = {"merge": bench.guider("merge", n), "loratorio": bench.guider("loratorio", n)}
            for full, refresh in options.interleaved:
                label = f"single pass, {full} full step{'s' * (full != 1)}" + (
                    f", then every {refresh}" if refresh else ", no refresh"
                )
                variants[label] = bench.guider("loratorio-routed", n, full, refresh)
            ksampler = bench.guider("ksampler", 0)
            times: dict[str, list[float]] = {label: [] for label in variants}
            rows: dict[str, int] = {}
            for round_index in range(options.repeats):
                plain, plain_rows = bench.settled_run(ksampler, steps)
                for label, guider in variants.items():
                    seconds, rows[label] = bench.settled_run(guider, steps)
                    times[label].append(seconds / plain)
                print(f"  {model_name} N={n} round {round_index + 1}: KSampler {plain:.1f} s", flush=True)
            for label, ratios in times.items():
                lines.append(
                    f"| {model_name} | {n} | {label} | {rows[label] / plain_rows:.2f} | {statistics.median(ratios):.2f} "
                    f"| {min(ratios):.2f} to {max(ratios):.2f} |"
                )
            table = "\n".join(lines) + "\n"
            save(table)
    return table


def markdown(results: list[Result], meta: dict) -> str:
    by_key = {(r.model, r.method, r.adapters): r for r in results}
    lines = [
        f"Measured {meta['date']} on {meta['device']} ({meta['dtype']}), LoRA rank {meta['rank']} on attention and feed-forward "
        f"layers, euler, median of {meta['repeats']} runs; per-step time from {STEPS_SHORT}- and {STEPS_LONG}-step runs.",
        "",
        "| model | method | N | rows/step | forwards/step | rows/forward | ms/step | x floor | vs hooks | vs naive | peak MB "
        "| first run x KSampler | first step x KSampler | warm whole run x KSampler |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.method.startswith("floor-"):
            continue
        hooks = by_key.get((r.model, "hooks", r.adapters))
        naive = by_key.get((r.model, "naive-remerge", r.adapters))
        vs_hooks = f"{hooks.step_seconds / r.step_seconds:.2f}x" if hooks and r.method != "hooks" else ""
        vs_naive = f"{naive.step_seconds / r.step_seconds:.2f}x" if naive and r.method != "naive-remerge" else ""
        lines.append(
            f"| {r.model} | {r.method} | {r.adapters} | {r.rows_per_step} | {r.forwards_per_step:g} | {r.rows_per_forward:.1f} | "
            f"{r.step_seconds * 1000:.1f} | {r.ratio_to_floor:.2f} | {vs_hooks} | {vs_naive} | {r.peak_memory_mb:.0f} | "
            f"{r.first_run_vs_ksampler:.2f} | {r.first_step_vs_ksampler:.2f} | "
            + (f"{r.whole_run_vs_ksampler:.2f} |" if r.whole_run_vs_ksampler is not None else " |")
        )
    return "\n".join(lines) + "\n"


def plot(results: list[Result], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in results})
    figure, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        methods = sorted({r.method for r in results if r.model == model and not r.method.startswith("floor-")})
        for method in methods:
            points = sorted(
                (r.adapters, r.ratio_to_floor, r.peak_memory_mb) for r in results if r.model == model and r.method == method
            )
            xs = [p[0] for p in points]
            axes[0][column].plot(xs, [p[1] for p in points], marker="o", label=method)
            axes[1][column].plot(xs, [p[2] for p in points], marker="o", label=method)
        axes[0][column].set(title=f"{model}: step time / floor (same rows)", xlabel="adapters N", ylabel="ratio", yscale="log")
        axes[1][column].set(title=f"{model}: peak memory above start", xlabel="adapters N", ylabel="MB")
        axes[0][column].axhline(1.10, color="grey", linestyle="--", linewidth=0.8)
        axes[0][column].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(target, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,sd15", type=lambda s: s.split(","), help=f"of {list(MODELS)}")
    parser.add_argument("--adapters", default="1,2,3,4,5", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--pools", default="8,16", type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument(
        "--methods",
        default="loratorio,loratorio-lambda1,loratorio-routed,composite,switch,hooks,naive-remerge,merge",
        type=lambda s: s.split(","),
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--whole-run-steps", type=int, default=0, help="also time warm whole runs of this many steps against KSampler"
    )
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK, help="LoRA rank of every adapter")
    parser.add_argument("--dtype", default="float16", help="GPU compute dtype (float16 or bfloat16); CPU runs float32")
    parser.add_argument("--out", type=Path, default=PACK_DIR / "out" / "benchmark")
    parser.add_argument(
        "--per-layer", action="store_true", help="hook cost over base matmul per layer shape (tools/layer_benchmark.py)"
    )
    parser.add_argument(
        "--ranks", default="16,32,64,128", type=lambda s: [int(x) for x in s.split(",")], help="--per-layer ranks"
    )
    parser.add_argument("--layer-threads", type=int, default=1, help="--per-layer torch threads")
    parser.add_argument(
        "--dispatch",
        action="store_true",
        help="count the torch calls of a warm step per method against KSampler instead (tools/dispatch_count.py)",
    )
    parser.add_argument(
        "--interleaved",
        type=parse_schedules,
        help="time warm whole runs interleaved with KSampler instead, single pass at these full_steps:refresh_every "
        "schedules (e.g. 2:3,2:0)",
    )
    options = parser.parse_args()
    import torch

    # the GPU when there is one (the host's torch is a CUDA build that also runs on a CPU)
    comfyui_on_path("benchmark.py", cpu=not torch.cuda.is_available())
    pack = load_pack()
    if options.per_layer:
        import layer_benchmark

        layer_benchmark.run(pack.loratorio_comfy.row_lora, options.ranks, options.adapters, options.layer_threads)
        return 0
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    options.out.mkdir(parents=True, exist_ok=True)
    cpu = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "dtype": options.dtype if device.type == "cuda" else "float32",
        "repeats": options.repeats,
        "rank": options.rank,
        "torch": torch.__version__,
    }
    if options.dispatch:
        import dispatch_count

        lines = dispatch_count.run(lambda model: Bench(model, options, options.out), options.models, options.adapters)
        (options.out / "dispatch.md").write_text("\n".join(lines) + "\n")
        print(f"\nwrote {options.out / 'dispatch.md'}\n")
        print("\n".join(lines))
        return 0
    if options.interleaved is not None:
        table = interleaved_whole_runs(options, meta, (options.out / "interleaved.md").write_text)
        print(f"\nwrote {options.out / 'interleaved.md'}\n")
        print(table)
        return 0

    def save(results: list[Result]) -> None:
        report = {"meta": meta, "results": [asdict(r) for r in results]}
        (options.out / "results.json").write_text(json.dumps(report, indent=2))

    results = run(options, save)
    table = markdown(results, meta)
    (options.out / "results.md").write_text(table)
    plot(results, options.out / "results.png")
    print(f"\nwrote {options.out / 'results.json'}, results.md and results.png\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
