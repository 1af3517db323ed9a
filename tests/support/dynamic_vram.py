"""Starting ComfyUI's dynamic VRAM (``ModelPatcherDynamic`` with comfy-aimdo, newer releases on NVIDIA)
in the test process the way ComfyUI's ``main.py`` starts it, for the device check."""

from __future__ import annotations

STATE = "off: the tests run on the CPU (LORATORIO_TEST_DEVICE=gpu runs them on ComfyUI's GPU)"


def start() -> None:
    """Start it where this ComfyUI and machine have it; ``STATE`` then says "on", or "off: <why>"."""
    global STATE
    STATE = _started()


def _started() -> str:
    import comfy.cli_args

    if not hasattr(comfy.cli_args, "enables_dynamic_vram"):
        return "off: this ComfyUI has no dynamic VRAM (it came after 0.3.75)"
    try:
        import comfy_aimdo.control
    except ImportError as error:
        return f"off: comfy-aimdo is not installed ({error})"
    if not comfy.cli_args.enables_dynamic_vram():
        return "off: ComfyUI's arguments turn dynamic VRAM off"
    try:  # the newest protocol first, then the older ones, as main.py does
        comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=True)
    except TypeError:
        comfy_aimdo.control.init()
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    if not comfy.model_management.is_nvidia():
        return "off: dynamic VRAM needs an NVIDIA GPU"
    devices = comfy.model_management.get_all_torch_devices()
    try:
        started = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
    except TypeError:
        started = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not started:
        return "off: comfy-aimdo did not start on this GPU"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return "on"
