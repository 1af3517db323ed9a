"""Collects the node classes of every node module.

Each module is imported on its own: one that fails (a missing optional dependency, a ComfyUI
version without an API it uses) is logged and skipped, and the rest of the pack still loads.
"""

from __future__ import annotations

import importlib
import logging

LOG = logging.getLogger("comfyui-loratorio")

NODE_MODULES = ("loaders", "merge")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
FAILED_MODULES: dict[str, str] = {}

for _name in NODE_MODULES:
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except Exception as error:
        FAILED_MODULES[_name] = f"{type(error).__name__}: {error}"
        LOG.exception("comfyui-loratorio: the node module %r failed to load; its nodes are unavailable", _name)
        continue
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
