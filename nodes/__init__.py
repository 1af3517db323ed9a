"""Collects the node classes of every node module.

Each module is imported on its own: one that fails (a missing optional dependency, a ComfyUI
version without an API it uses) is logged and skipped, and the rest of the pack still loads.
Every node class is registered socket-checked (:mod:`.sockets`).
"""

from __future__ import annotations

import importlib
import logging

LOG = logging.getLogger("comfyui-loratorio")

NODE_MODULES = ("loaders", "schedule", "regions", "prompts", "merge", "guiders", "samplers")


def collect_node_modules(package: str, module_names: tuple[str, ...]) -> tuple[dict[str, type], dict[str, str], dict[str, str]]:
    """Import ``package.<name>`` for each name: (class mappings, display names, failures by module)."""
    from .sockets import socket_checked

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
        display_names.update(module.NODE_DISPLAY_NAME_MAPPINGS)
        for node_id, node_class in module.NODE_CLASS_MAPPINGS.items():
            classes[node_id] = socket_checked(node_class, module.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id))
    return classes, display_names, failures


def register_routes() -> bool:
    """Add the HTTP routes of ``routes.py``; a failure is logged and only the graph editor's extras are missing."""
    try:
        from . import routes

        return routes.register()
    except Exception:
        LOG.exception("comfyui-loratorio: HTTP routes failed to load; trigger words will not show in the graph editor")
        return False


# The ids before the pack prefixed them (generic ids that other packs' nodes also use, ignoring case):
# workflows saved with them keep loading and running through hidden, deprecated aliases.
LEGACY_NODE_IDS = {
    "MultiLoRALoader": "LoRAtorioMultiLoRALoader",
    "MultiLoRATextEncode": "LoRAtorioMultiLoRATextEncode",
    "LoRAMerge": "LoRAtorioMerge",
    "LoRACompositeSampler": "LoRAtorioCompositeSampler",
    "LoRASwitchSampler": "LoRAtorioSwitchSampler",
    "LoRACompositeGuider": "LoRAtorioCompositeGuider",
    "LoRASwitchGuider": "LoRAtorioSwitchGuider",
}


def legacy_aliases(classes: dict[str, type], display_names: dict[str, str]) -> tuple[dict[str, type], dict[str, str]]:
    """A deprecated subclass (hidden from the node search) under each old id whose new node loaded."""
    aliases, names = {}, {}
    for old, new in LEGACY_NODE_IDS.items():
        if new in classes:
            aliases[old] = type(old, (classes[new],), {"DEPRECATED": True})
            names[old] = f"{display_names[new]} (old id)"
    return aliases, names


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, FAILED_MODULES = collect_node_modules(__name__, NODE_MODULES)
_aliases, _alias_names = legacy_aliases(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
NODE_CLASS_MAPPINGS.update(_aliases)
NODE_DISPLAY_NAME_MAPPINGS.update(_alias_names)
ROUTES_REGISTERED = register_routes()
