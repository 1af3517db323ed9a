"""Guiders that compose adapters per step, for ``SamplerCustomAdvanced`` and our sampler nodes.

Each guider is a thin ``comfy.samplers.CFGGuider``: per step it names the rows it needs as
``(cond list, adapter)`` pairs, gets them from ONE ``calc_cond_batch`` call (ComfyUI batches them
into as few forwards as memory allows; the per-row LoRA hooks give each row its adapter), combines
them with ``loratorio_core`` and finishes with ``comfy.samplers.cfg_function`` so pre/post-CFG
hooks and the CFG++ samplers keep working. The adapters' deltas are built once per guider and
registered while ``sample`` runs; the per-row forward hooks exist only inside each model call.
No cond carries a ComfyUI hook: newer ComfyUI reloads the model when one does (dynamic VRAM).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch

from .. import loratorio_core as lc
from .adapter_set import AdapterSet
from .row_lora import (
    BASE_ROW,
    COND,
    ROUTED_ROW,
    ROW_MAP_KEY,
    UNCOND,
    apply_model_with_rows,
    batching_order,
    row_layers_registered,
    set_routing,
)

LOG = logging.getLogger("comfyui-loratorio")
WRAPPER_KEY = "loratorio"
POSITIVE, NEGATIVE = "positive", "negative"


def adapter_cond_name(name: str, adapter: int) -> str:
    """The key of adapter ``adapter``'s own cond list (its own prompt encoding or its LoRA hook)."""
    return f"{name}@{adapter}"


def reserve_memory_for_rows(rows_per_step: int, adapters: AdapterSet, executor, model, noise_shape, conds, *args, **kwargs):
    """``PREPARE_SAMPLING`` wrapper: ComfyUI reserves memory for 2 rows of activations; reserve it
    for the real row count, plus the adapters' deltas (counted as the rows they would weigh), so
    the memory manager offloads enough before they are cast onto the device.

    Everything after ``conds`` is passed on untouched: ComfyUI adds keywords here over time
    (``force_full_load`` since 0.6.0, ``force_offload`` later)."""
    base_model = model.model
    compute_dtype = getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()
    delta_bytes = adapters.row_layers.numel() * torch.empty((), dtype=compute_dtype).element_size()
    row_bytes = max(1.0, base_model.memory_required([1, *noise_shape[1:]]))
    rows = noise_shape[0] * rows_per_step + math.ceil(delta_bytes / row_bytes)
    return executor(model, [max(1, math.ceil(rows / 2)), *noise_shape[1:]], conds, *args, **kwargs)


def noise_to_signal_ratio(model_sampling, timestep: torch.Tensor) -> float:
    """The step's noise-to-signal ratio, read off the model's own noising (``noise_scaling``):
    sigma for SD1.5 and SDXL (``x = x0 + sigma * noise``), sigma / (1 - sigma) for the flow models
    SD3 and Flux (``x = (1 - sigma) * x0 + sigma * noise``). Reads the sigma from the device."""
    sigma = timestep.detach().flatten()[:1].float().cpu()
    noise = float(model_sampling.noise_scaling(sigma, torch.ones(1, 1), torch.zeros(1, 1)))
    signal = float(model_sampling.noise_scaling(sigma, torch.zeros(1, 1), torch.ones(1, 1)))
    return noise / signal if signal > 0 else math.inf


class AdapterRowsGuider(comfy.samplers.CFGGuider):
    """Shared machinery: the adapter set, the row batching and the hooks' lifetime."""

    def __init__(
        self,
        model_patcher,
        adapters: AdapterSet,
        cfg: float,
        windows: Sequence[lc.StepWindow] | None = None,
        regions: Sequence[lc.Region | None] | None = None,
    ) -> None:
        super().__init__(model_patcher)
        self.adapters = adapters
        self.windows = tuple(windows) if windows is not None else (lc.FULL_WINDOW,) * len(adapters)
        self.regions = tuple(regions) if regions is not None else (None,) * len(adapters)
        if len(self.windows) != len(adapters) or len(self.regions) != len(adapters):
            raise ValueError(f"step windows and regions must be given one per LoRA ({len(adapters)})")
        self.set_cfg(cfg)
        self.model_options = comfy.model_patcher.create_model_options_clone(model_patcher.model_options)
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING,
            WRAPPER_KEY,
            functools.partial(reserve_memory_for_rows, self.rows_per_step(), adapters),
            self.model_options,
            is_model_options=True,
        )

    def set_conds(self, positive, negative=None, adapter_positive=None, adapter_negative=None) -> None:
        """Set the prompts. A negative is optional: distilled models (cfg 1) never evaluate it.

        By default every adapter row sees the base prompt encoding. ``adapter_positive`` /
        ``adapter_negative`` (one CONDITIONING per adapter, e.g. encoded with each LoRA's
        text-encoder weights) replace it for the adapters' rows. Either way each adapter gets its
        own cond list, so its rows carry their own uuids: caches keyed by cond (EasyCache,
        LazyCache) keep adapter rows apart.
        """
        conds = {POSITIVE: positive}
        if negative is not None:
            conds[NEGATIVE] = negative
        per_adapter = {POSITIVE: adapter_positive, NEGATIVE: adapter_negative}
        for name, given in per_adapter.items():
            if given is not None and len(given) != len(self.adapters):
                raise ValueError(
                    f"adapter_{name} holds {len(given)} conditionings for {len(self.adapters)} LoRAs; give one per LoRA"
                )
            if name not in conds:
                continue
            for index in range(len(self.adapters)):
                conds[adapter_cond_name(name, index)] = conds[name] if given is None else given[index]
        if getattr(self, "routed", None) is not None:  # the routed row: its own copy, for caches keyed by cond
            conds[adapter_cond_name(POSITIVE, ROUTED_ROW)] = positive
        self.inner_set_conds(conds)

    @property
    def uses_uncond(self) -> bool:
        """Whether unconditional rows are evaluated at this guider's cfg (for memory estimates;
        per step, :meth:`needs_uncond` also honours the sampler's options)."""
        return not math.isclose(self.cfg, 1.0)

    def needs_uncond(self, model_options: dict) -> bool:
        """As ComfyUI's ``sampling_function``: no uncond at cfg 1 (distilled models) unless the
        sampler sets ``disable_cfg1_optimization`` (the CFG++ samplers need the uncond)."""
        wanted = self.uses_uncond or bool(model_options.get("disable_cfg1_optimization", False))
        return wanted and NEGATIVE in self.conds

    def rows_per_step(self) -> int:
        raise NotImplementedError

    def sample(self, noise, *args, **kwargs):
        if self.uses_uncond and NEGATIVE not in self.original_conds:
            raise ValueError(f"cfg is {self.cfg} but no negative conditioning was given; connect one or set cfg to 1")
        self.check_region_batches(noise.shape[0])
        with row_layers_registered(self.adapters.row_layers) as run_id:
            self._run_id = run_id
            return super().sample(noise, *args, **kwargs)

    def check_region_batches(self, batch: int) -> None:
        """Before any step: each region holds one mask, or one per image of the batch."""
        for name, region in zip(self.adapters.names, self.regions, strict=True):
            if region is not None:
                lc.check_mask_batch(region.mask, batch, f"the region mask of LoRA '{name}'")

    def outer_sample(self, *args, **kwargs):
        """The per-row ``APPLY_MODEL`` wrapper goes in here, innermost: by now ComfyUI has merged the
        model patcher's own wrappers into this run's options, and some of them (TorchCompileModel's)
        swap the diffusion model per call; the hooks must land on the modules that actually run."""
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL,
            WRAPPER_KEY,
            apply_model_with_rows,
            self.model_options,
            is_model_options=True,
        )
        return super().outer_sample(*args, **kwargs)

    def evaluate(
        self,
        rows: list[tuple[str, int]],
        x: torch.Tensor,
        timestep: torch.Tensor,
        model_options: dict,
        everywhere: tuple[int, ...] = (),
    ) -> list[torch.Tensor]:
        """Denoised predictions for ``(cond list name, adapter index or BASE_ROW)`` rows, one batch;
        every row but a routed one also carries the adapters of ``everywhere``."""
        order = batching_order([adapter for _, adapter in rows])
        handed = [rows[i] for i in order]
        options = model_options.copy()
        transformer_options = dict(options.get("transformer_options", {}))
        transformer_options[ROW_MAP_KEY] = {
            "run": self._run_id,
            "rows": tuple(adapter for _, adapter in handed),
            "kinds": tuple(COND if name == POSITIVE else UNCOND for name, _ in handed),
            "everywhere": everywhere,
        }
        options["transformer_options"] = transformer_options
        conds = [self.conds[name if adapter == BASE_ROW else adapter_cond_name(name, adapter)] for name, adapter in handed]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
        return [out[order.index(i)] for i in range(len(rows))]

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor | None, x, timestep, model_options) -> torch.Tensor:
        """CFG as ComfyUI's ``sampling_function`` finishes it: pre-CFG patches (APG, TCFG, ...) on
        ``[cond, uncond]``, then ``cfg_function`` with its post-CFG hooks."""
        conds = [self.conds.get(POSITIVE), self.conds.get(NEGATIVE) if uncond is not None else None]
        out = [cond, cond if uncond is None else uncond]
        for pre_cfg in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep, "input": x}
            out = pre_cfg({**args, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        return comfy.samplers.cfg_function(
            self.inner_model, out[0], out[1], self.cfg, x, timestep, model_options=model_options, cond=conds[0], uncond=conds[1]
        )

    def sample_sigmas(self, model_options: dict) -> torch.Tensor:
        """The sampler's sigmas as a CPU copy, made once per run (not a device read per step)."""
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            raise RuntimeError("the sampler's sigmas are missing from transformer_options['sample_sigmas']")
        if getattr(self, "_sigmas_of", None) is not sigmas:
            self._sigmas_of, self._sigmas_cpu = sigmas, torch.as_tensor(sigmas).detach().cpu()
        return self._sigmas_cpu

    def step_of(self, timestep: torch.Tensor, model_options: dict) -> int:
        """The sampling step an evaluation belongs to (see ``lc.step_index``). Reading ``timestep``
        waits for the device: only the methods whose rows depend on the step call this per step."""
        return lc.step_index(timestep, self.sample_sigmas(model_options))

    @property
    def has_windows(self) -> bool:
        return any(window != lc.FULL_WINDOW for window in self.windows)

    def active_at(self, step: int, model_options: dict) -> tuple[int, ...]:
        """The adapters whose step window holds ``step``: the others cost no row and add nothing."""
        return lc.active_adapters(self.windows, step, len(self.sample_sigmas(model_options)) - 1)

    def regions_of(self, active: Sequence[int]) -> tuple[lc.Region | None, ...] | None:
        """The regions of the ``active`` adapters, or None when none of them has one."""
        regions = tuple(self.regions[i] for i in active)
        return regions if any(region is not None for region in regions) else None

    def active_adapters(self, timestep: torch.Tensor, model_options: dict) -> tuple[int, ...]:
        """The adapters active for this evaluation: every one when no LoRA has a window (and then
        without reading the step from the device)."""
        if not self.has_windows:
            return tuple(range(len(self.adapters)))
        return self.active_at(self.step_of(timestep, model_options), model_options)


class LoRAtorioGuider(AdapterRowsGuider):
    """LoRAtorio: patch-wise SoftMin routing of the adapters' conds, re-centred CFG."""

    def __init__(
        self,
        model_patcher,
        adapters: AdapterSet,
        cfg: float,
        params: lc.LoRAtorioParams,
        windows=None,
        regions=None,
        routed: lc.RoutedSchedule | None = None,
    ):
        """``routed``: the single-pass mode (see ``lc.RoutedSchedule``); None runs every adapter's rows every step."""
        self.params, self.routed = params, routed
        super().__init__(model_patcher, adapters, cfg, windows, regions)
        if routed is not None and routed.full_steps == 0 and self.regions_of(range(len(adapters))) is None:
            raise ValueError(
                "single-pass routing with 0 full steps takes its routing map from region masks, and no LoRA has one: "
                "attach masks with LoRA Region Mask, or set full_steps to 1 or more"
            )
        self.weight_history = lc.WeightMapHistory()
        self.evidence = lc.RoutingEvidence(len(adapters))  # routing_memory "steps so far": this run's steps
        self.has_sampled = False  # a run with no step records no map, and is not an error to show

    def sample(self, *args, **kwargs):
        """Weight maps stay on the device while sampling runs and are filed by step at the end,
        so recording them costs no device read per step."""
        self.weight_history.clear()
        self.evidence.clear()
        self.has_sampled = True
        self._unfiled_maps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._routing: torch.Tensor | None = None  # routed mode: the last full step's map, [B, N, H, W]
        self._routing_over: frozenset[int] = frozenset()  # the LoRAs active when that map was made
        self._style_of: dict[int, bool] = {}  # style_loras "applied everywhere": each LoRA's verdict, once judged
        self._coverages: dict[int, list[float]] = {}  # and its coverages at the steps that judge it
        try:
            return super().sample(*args, **kwargs)
        finally:
            for timestep, weights, sigmas in self._unfiled_maps:
                self.weight_history.record(weights, step=lc.step_index(timestep, sigmas))
            self._unfiled_maps.clear()

    def rows_per_step(self) -> int:
        return len(self.row_plan(self.uses_uncond, range(len(self.adapters))))

    def row_plan(self, with_uncond: bool, active: Sequence[int]) -> list[tuple[str, int]]:
        """Base cond, adapter conds, adapter unconds, base uncond: the base rows at the two ends, so
        the adapter rows form one run in the batch whichever way ComfyUI orders the lists."""
        rows = [(POSITIVE, BASE_ROW)] + [(POSITIVE, i) for i in active]
        if with_uncond:
            if self.params.needs_adapter_unconds:
                rows += [(NEGATIVE, i) for i in active]
            rows.append((NEGATIVE, BASE_ROW))
        return rows

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - CFGGuider's signature
        if self.routed is not None:  # routed mode reads the step anyway: windows reuse it
            step = self.step_of(timestep, model_options)
            active = self.active_at(step, model_options)
            # a LoRA whose step window opened after the last full step is not in the map yet: a full step routes it
            joined = self.routed.full_steps > 0 and not self._routing_over.issuperset(active)
            if active and not self.routed.is_full(step) and not joined:  # no LoRA active: the base model's step
                return self._routed_step(x, timestep, model_options, active)
        else:
            active = self.active_adapters(timestep, model_options)
        everywhere = self.applied_everywhere(active)
        active = tuple(i for i in active if i not in everywhere)
        n = len(active)
        with_uncond = self.needs_uncond(model_options)
        out = self.evaluate(self.row_plan(with_uncond, active), x, timestep, model_options, everywhere)
        base_cond = out[0]
        uncond = out[-1] if with_uncond else None
        if n == 0:  # every LoRA is outside its window (or applied everywhere): the base model's step
            weights = x.new_zeros(len(self.adapters), x.shape[0], 1, *x.shape[2:])
            weights[list(everywhere)] = 1.0
            self._file_weight_map(weights, timestep, model_options)
            return self.guide(base_cond, uncond, x, timestep, model_options)
        adapter_conds = torch.stack(out[1 : 1 + n])
        # Omega and the styles' changes are affine in the prediction, so they apply to denoised ones
        # as they do to noise; the cosines and coverages are the same for (x - D) as for noise
        styles = self.styles_among(active, adapter_conds, base_cond)
        routed = [k for k in range(n) if not styles[k]]
        style_rows = [k for k in range(n) if styles[k]]
        routed_adapters = tuple(active[k] for k in routed)
        regions = self.regions_of(routed_adapters)
        noise_level = None
        if self.params.needs_noise_level:
            noise_level = noise_to_signal_ratio(self.model_patcher.get_model_object("model_sampling"), timestep)
        routed_noise = x.unsqueeze(0) - adapter_conds[routed]
        weights = lc.routing_weights(
            routed_noise, x - base_cond, self.params, regions, noise_level, self.evidence, routed_adapters
        )
        every_adapter = weights.new_zeros(len(self.adapters), *weights.shape[1:])
        every_adapter[list(routed_adapters)] = weights
        every_adapter[[active[k] for k in style_rows] + list(everywhere)] = 1.0  # a style acts at every position
        self._file_weight_map(every_adapter, timestep, model_options)
        self._routing, self._routing_over = lc.routing_map(every_adapter), frozenset(active + everywhere)
        if regions is None:
            cond = lc.weighted_sum(weights, adapter_conds[routed])
        else:  # where the regions leave no adapter, the base model's prediction
            cond = lc.weighted_with_base(weights, adapter_conds[routed], base_cond)
        if style_rows:
            cond = lc.with_style_changes(cond, adapter_conds[style_rows], base_cond)
        if with_uncond:
            adapter_unconds = torch.stack(out[1 + n : -1]) if self.params.needs_adapter_unconds else None
            routed_unconds = None if adapter_unconds is None else adapter_unconds[routed]
            uncond = lc.recentred_uncond(out[-1], routed_unconds, weights, self.params.recentre_lambda, regions is not None)
            if style_rows and adapter_unconds is not None:  # lambda = 1: the styles change the cond only
                uncond = lc.with_style_changes(uncond, adapter_unconds[style_rows], out[-1])
        return self.guide(cond, uncond, x, timestep, model_options)

    def applied_everywhere(self, active: tuple[int, ...]) -> tuple[int, ...]:
        """The ``active`` LoRAs found to be styles, once every one has its verdict: from then on each
        row carries their deltas in its weights (as if merged) and they have no rows of their own. At
        a step that still judges a LoRA, none: that step has every LoRA's rows."""
        if self.params.style_loras == "routed" or self._judges_styles(active):
            return ()
        return tuple(i for i in active if self._style_of.get(i, False))

    def _judges_styles(self, active: tuple[int, ...]) -> bool:
        """Whether a full step of ``active`` judges a LoRA: one without a region mask and without a
        verdict yet shares the step with another LoRA."""
        return len(active) >= 2 and any(self.regions[i] is None and i not in self._style_of for i in active)

    def styles_among(self, active: tuple[int, ...], adapter_conds: torch.Tensor, base_cond: torch.Tensor) -> tuple[bool, ...]:
        """Which ``active`` adapters are styles (``style_loras`` = ``applied everywhere``; see
        ``lc.styles``): each is judged on its first ``lc.STYLE_JUDGING_STEPS`` full steps shared with
        another LoRA, and keeps that verdict for the run, so the routing does not change its members
        from step to step."""
        if self.params.style_loras == "routed":
            return (False,) * len(active)
        if self._judges_styles(active):
            coverage = lc.delta_coverage(adapter_conds, base_cond, self.params.patch_size).tolist()
            for k, adapter in enumerate(active):
                if self.regions[adapter] is None and adapter not in self._style_of:
                    self._coverages.setdefault(adapter, []).append(coverage[k])
            judged = [lc.judged_coverage(self._coverages.get(adapter, ())) for adapter in active]
            ready = [value is not None and adapter not in self._style_of for value, adapter in zip(judged, active, strict=True)]
            verdicts = lc.detected_styles([value or 0.0 for value in judged], ready, self.params.style_coverage)
            for k, adapter in enumerate(active):
                if not ready[k]:
                    continue
                self._style_of[adapter] = verdicts[k]
                if verdicts[k]:
                    LOG.info(
                        "comfyui-loratorio: LoRA '%s' changes %.0f%% of the image alike: taken as a style and applied everywhere",
                        self.adapters.names[adapter],
                        100 * judged[k],
                    )
        return tuple(self._style_of.get(i, False) for i in active)

    def _routed_step(self, x, timestep, model_options: dict, active: tuple[int, ...]) -> torch.Tensor:
        """One routed cond row (each token gets its routed LoRAs' deltas) and the base uncond: 2 rows."""
        routing = self._routing
        if routing is None:  # full_steps = 0: the regions give the map
            routing = lc.mask_routing(self.regions, x.shape[0], x.shape[-2], x.shape[-1], x.device)
        inactive = [i for i in range(len(self.adapters)) if i not in active]
        if inactive:  # LoRAs outside their step window: their share goes to the base model
            routing = routing.clone()
            routing[:, inactive] = 0
        set_routing(self._run_id, routing)
        with_uncond = self.needs_uncond(model_options)
        rows = [(POSITIVE, ROUTED_ROW)] + ([(NEGATIVE, BASE_ROW)] if with_uncond else [])
        # the routed row gets the styles through its map; the base uncond carries them as a full step's does
        out = self.evaluate(rows, x, timestep, model_options, self.applied_everywhere(active))
        self._file_weight_map(routing.transpose(0, 1).unsqueeze(2), timestep, model_options)
        return self.guide(out[0], out[1] if with_uncond else None, x, timestep, model_options)

    def _file_weight_map(self, weights: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> None:
        kept = weights[:, : self.weight_history.sample + 1].detach()  # the sample the history keeps
        self._unfiled_maps.append((timestep.detach(), kept, self.sample_sigmas(model_options)))


class LoRACompositeGuider(AdapterRowsGuider):
    """LoRA Composite: every adapter's cond and uncond, averaged, then CFG."""

    def rows_per_step(self) -> int:
        return len(self.adapters) * (2 if self.uses_uncond else 1)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        members = self.active_adapters(timestep, model_options) or (BASE_ROW,)  # no LoRA in its window: the base model
        n = len(members)
        with_uncond = self.needs_uncond(model_options)
        rows = [(POSITIVE, i) for i in members] + ([(NEGATIVE, i) for i in members] if with_uncond else [])
        out = self.evaluate(rows, x, timestep, model_options)
        regions = self.regions_of(members) if BASE_ROW not in members else None
        if regions is None:
            cond = lc.adapter_mean(torch.stack(out[:n]))
            uncond = lc.adapter_mean(torch.stack(out[n:])) if with_uncond else None
        else:
            maps = lc.region_maps(regions, x.shape[0], x.shape[-2], x.shape[-1], x.device)
            cond = lc.regional_mean(torch.stack(out[:n]), maps)
            uncond = lc.regional_mean(torch.stack(out[n:]), maps) if with_uncond else None
        return self.guide(cond, uncond, x, timestep, model_options)


class LoRASwitchGuider(AdapterRowsGuider):
    """LoRA Switch: one adapter at a time for cond and uncond, advancing every ``tau`` steps."""

    def __init__(self, model_patcher, adapters: AdapterSet, cfg: float, schedule: lc.SwitchSchedule, windows=None) -> None:
        """Regions do not apply: one adapter acts at a time, over the whole image."""
        if schedule.adapter_count != len(adapters):
            raise ValueError(f"the switch schedule is for {schedule.adapter_count} adapters, the stack has {len(adapters)}")
        self.schedule = schedule
        super().__init__(model_patcher, adapters, cfg, windows)

    def rows_per_step(self) -> int:
        return 2 if self.uses_uncond else 1

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        step = self.step_of(timestep, model_options)
        active = lc.switch_adapter(self.schedule, step, self.active_at(step, model_options))
        active = BASE_ROW if active is None else active  # no LoRA in its window: the base model
        with_uncond = self.needs_uncond(model_options)
        rows = [(POSITIVE, active)] + ([(NEGATIVE, active)] if with_uncond else [])
        out = self.evaluate(rows, x, timestep, model_options)
        return self.guide(out[0], out[1] if with_uncond else None, x, timestep, model_options)
