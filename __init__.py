"""comfyui-loratorio: compose several LoRA adapters in one generation without training.

ComfyUI imports this file; it only collects the node classes from ``nodes/`` and points the
frontend at ``web/``. The composition math lives in ``loratorio_core/`` (plain torch).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
