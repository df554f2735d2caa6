"""Recording module outputs with forward hooks, safely; and running a model in eval mode without losing
any module's own train/eval flag.

A hooked module's output tensor is the very tensor the next module receives: an in-place op after it
(``nn.ReLU(inplace=True)`` in torchvision models and in this project's MLP and small CNN) rewrites it. A record
kept without a copy then holds post-ReLU values. Every analysis that records activations goes through
:func:`recorded` / :func:`record_outputs`, which reduce inside the hook and copy whatever would still alias.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def recorded(out: Any, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """A hooked module's output (the first element of a tuple output), detached, reduced by ``reduce`` inside
    the hook, and never sharing memory with the output itself (copied only when the reduction did not)."""
    t = (out[0] if isinstance(out, tuple | list) else out).detach()
    r = reduce(t) if reduce is not None else t
    return r.clone() if _storage(r) == _storage(t) else r


@contextlib.contextmanager
def record_outputs(modules: Mapping[str, nn.Module],
                   reduce: Callable[[Tensor], Tensor] | None = None) -> Iterator[dict[str, Tensor]]:
    """Hook ``modules`` (name -> module); yields a dict that every forward pass fills with each module's
    :func:`recorded` output under its name. The hooks are removed on exit, also on error."""
    outputs: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            outputs[name] = recorded(out, reduce)
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; on exit (also on error) each module gets back its own
    ``training`` flag. ``model.train(was_training)`` would instead overwrite them all, e.g. switch a BN the user
    froze in eval mode back to training."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
