"""Finding a model's layers by name at every model call, cheaply."""

from __future__ import annotations

import torch


def submodule(root: torch.nn.Module, path: tuple[str, ...]) -> torch.nn.Module:
    """``root.get_submodule(".".join(path))`` through the modules' own tables: the same module, found
    without ``nn.Module.__getattr__`` at every level (a call looks up every targeted layer)."""
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            return root.get_submodule(".".join(path))  # what it raises names the missing part
        module = child
    return module
