"""The generator protocol of the linking analysis (linking spec §6) and the helpers every generator shares.

A generator maps a class-conditional latent ``w`` (``(n, w_dim)``) to images. ``sample_w`` is deterministic
in ``seed`` and truncates toward the *class* mean: ``w <- w_avg(c) + psi * (w - w_avg(c))``. ``synthesize``
returns float32 NCHW images in [0, 1] on the generator's device. Generators are frozen: ``freeze`` puts a
module in eval mode and switches off its parameters' gradients.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

PART_NAMES: tuple[str, ...] = ("background", "body", "rim")
"""Part masks of generators that know them (shapes data): index 0, 1, 2 of ``synthesize_with_masks``."""


@runtime_checkable
class Generator(Protocol):
    w_dim: int
    num_ws: int
    num_classes: int
    resolution: int

    def w_avg(self, c: int) -> torch.Tensor: ...

    def sample_w(self, n: int, class_idx: int, psi: float = 0.7, seed: int = 0) -> torch.Tensor: ...

    def synthesize(self, w: torch.Tensor) -> torch.Tensor: ...


def truncate(w: torch.Tensor, w_avg: torch.Tensor, psi: float) -> torch.Tensor:
    """Truncation toward the class mean; ``psi = 0`` gives exactly ``w_avg``, ``psi = 1`` leaves ``w``."""
    if psi == 1:
        return w
    if psi == 0:
        return w_avg.expand_as(w).clone()
    return w_avg + psi * (w - w_avg)


def check_class(c: int, num_classes: int) -> None:
    if not 0 <= int(c) < num_classes:
        raise ValueError(f"class_idx={c} is out of range: this generator has {num_classes} classes "
                         f"(0..{num_classes - 1})")


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
