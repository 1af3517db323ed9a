"""Collects the node classes of every node module.

Each module is imported on its own: one that fails (a missing optional dependency, a ComfyUI
version without an API it uses) is logged and skipped, and the rest of the pack still loads.
"""

from __future__ import annotations

import importlib
import logging

LOG = logging.getLogger("comfyui-loratorio")

NODE_MODULES = ("loaders", "prompts", "merge", "guiders", "samplers")


def collect_node_modules(package: str, module_names: tuple[str, ...]) -> tuple[dict[str, type], dict[str, str], dict[str, str]]:
    """Import ``package.<name>`` for each name: (class mappings, display names, failures by module)."""
    classes: dict[str, type] = {}
    display_names: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name in module_names:
        try:
            module = importlib.import_module(f".{name}", package)
        except Exception as error:
            failures[name] = f"{type(error).__name__}: {error}"
            LOG.exception("comfyui-loratorio: node module %r failed to load; its nodes are unavailable", name)
            continue
        classes.update(module.NODE_CLASS_MAPPINGS)
        display_names.update(module.NODE_DISPLAY_NAME_MAPPINGS)
    return classes, display_names, failures


def register_routes() -> bool:
    """Add the HTTP routes of ``routes.py``; a failure is logged and only the graph editor's extras are missing."""
    try:
        from . import routes

        return routes.register()
    except Exception:
        LOG.exception("comfyui-loratorio: HTTP routes failed to load; trigger words will not show in the graph editor")
        return False


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, FAILED_MODULES = collect_node_modules(__name__, NODE_MODULES)
ROUTES_REGISTERED = register_routes()
