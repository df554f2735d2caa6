"""Layer names as papers write them, for the figures, tables and report page (the results keep module paths).

torchvision's AlexNet and VGG (and the small CNN) keep their layers in index-named ``nn.Sequential``\\ s
(``features.17``); papers number the weight layers instead, as VGG-16 counts its 16: conv1 … conv13, then
fc14 … fc16 (AlexNet: conv1 … conv5, fc6 … fc8). The ReLU, BN or dropout after a weight layer carries that
layer's name (its units' activations: what dissection reads), pools are pool1, pool2, …; paths that already
name themselves (ResNet's ``layer1.0.conv1``) are kept.
"""

from __future__ import annotations

import re

from torch import nn

_INDEXED = re.compile(r"^[A-Za-z_]\w*\.\d+$")  # known only by its index in a top-level Sequential


def paper_layer_names(model: nn.Module) -> dict[str, str]:
    """Module path -> the name papers use (see the module docstring); every module of ``model`` is a key."""
    names: dict[str, str] = {}
    weights = pools = 0
    last: str | None = None
    for path, module in model.named_modules():
        if not _INDEXED.match(path):
            names[path] = path
            if isinstance(module, nn.Conv2d | nn.Linear):
                weights += 1
            continue
        if isinstance(module, nn.Conv2d | nn.Linear):
            weights += 1
            last = f"{'conv' if isinstance(module, nn.Conv2d) else 'fc'}{weights}"
            names[path] = last
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            pools += 1
            names[path] = f"pool{pools}"
        else:
            names[path] = last or path
    return names


def display_name(path: str, names: dict[str, str]) -> str:
    """``conv13 (features.28)`` where the paper name differs from the module path, else the path."""
    name = names.get(path, path)
    return path if name == path else f"{name} ({path})"
