"""comfyui-loratorio: compose several LoRA adapters in one generation without training.

ComfyUI imports this file as a package; it only collects the node classes from ``nodes/`` and
points the frontend at ``web/``. The composition math lives in ``loratorio_core/`` (plain torch).
"""

WEB_DIRECTORY = "./web"

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a lone module, not as a package: pytest does this to the clone's root when its
    # folder name is not a Python identifier (``comfyui-loratorio``). There is nothing to register.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
