"""The module plumbing every analysis shares: forward hooks that are always removed (:func:`forward_hooks`),
recording module outputs with them (safely), the classifier head and its input, and running a model in eval
mode without losing any module's own flag.

A hooked module's output tensor is the very tensor the next module receives: an in-place op after it
(``nn.ReLU(inplace=True)`` in torchvision models and in this project's MLP and small CNN) rewrites it. A record
kept without a copy then holds post-ReLU values. Every analysis that records activations goes through
:func:`recorded` / :func:`record_outputs`, which reduce inside the hook and copy whatever would still alias.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


Reduce = Callable[[Tensor], Tensor]


def recorded(out: Any, reduce: Reduce | None = None) -> Tensor:
    """A hooked module's output (the first element of a tuple output), detached, reduced by ``reduce`` inside
    the hook, and never sharing memory with the output itself (copied only when the reduction did not)."""
    t = (out[0] if isinstance(out, tuple | list) else out).detach()
    if t.is_mkldnn:  # oneDNN's blocked layout (:func:`onednn_forward`): read into a new dense tensor
        t = t.to_dense()
        return reduce(t) if reduce is not None else t
    r = reduce(t) if reduce is not None else t
    return r.clone() if _storage(r) == _storage(t) else r


class StopForward(Exception):
    """Raised by a hook once the forward has given it what it needs (:func:`record_outputs` with ``stop=True``:
    every module recorded); caught by :func:`run_forward`."""


def run_forward(model: nn.Module, x: Tensor) -> None:
    """``model(x)``, ending quietly where a ``stop=True`` recording has everything it needs."""
    try:
        model(x)
    except StopForward:
        pass


@contextlib.contextmanager
def onednn_forward(model: nn.Module, record: Callable[[nn.Module, Tensor], dict[str, Tensor]],
                   x: Tensor, concurrent: bool = False) -> Iterator[tuple[bool, dict[str, Tensor]]]:
    """Yields ``(exact, outputs)``: ``outputs`` is ``record(model, x)`` (e.g. from :func:`outputs_of`), the
    plain forward of the caller's first batch ``x``; ``exact`` says whether, inside the block,
    ``record(model, y.to_mkldnn())`` is an exact, faster forward of ``model`` (float32, in eval mode, on the CPU)
    for batches ``y`` of ``x``'s shape: it gave bitwise those outputs on ``x``.

    torch runs a float32 NCHW convolution on the CPU through oneDNN, converting its input and output between
    NCHW and oneDNN's blocked layout at every layer, and pools NCHW with scalar loops. Given a oneDNN tensor,
    torch's own conv, ReLU, pooling and residual-add kernels keep the blocked layout from layer to layer, and
    mostly compute the same values: oneDNN picks its algorithm per shape and layout, and some convolutions (e.g.
    ResNet-50's 1 × 1 ones at some batch sizes) then sum in another order, hence the check at the caller's batch
    shape. Its oneDNN batch norm rounds differently from the dense kernel's ``fma(x, α, β)`` (α = w·rsqrt(var + ε),
    β = fma(−mean, α, b)); inside the block each eval-mode ``BatchNorm2d`` therefore computes that on oneDNN
    tensors as a depthwise 1 × 1 convolution with weights α and bias β, which rounds the same way. Dense inputs
    take every module's own path. A model with an op that has no oneDNN kernel fails the check.

    oneDNN may also pick its algorithm by the number of threads, so call this at the intra-op thread count the
    batches will run at. ``concurrent``: run the two forwards of the check in two threads at once (``record``
    must then be thread-safe, as :func:`outputs_of`'s is)."""
    cpu32 = (torch.backends.mkldnn.is_available() and x.device.type == "cpu" and x.dtype == torch.float32
             and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()))
    bns = [m for m in model.modules() if cpu32 and isinstance(m, nn.BatchNorm2d) and not m.training
           and m.running_mean is not None]

    def onednn_outputs() -> dict[str, Tensor]:
        if not cpu32:
            return {}
        try:
            return record(model, x.to_mkldnn())
        except Exception:  # noqa: BLE001 -- the plain forward raises the model's own errors: an op without a
            return {}  # oneDNN kernel

    try:
        for bn in bns:  # dense inputs (the plain forward) take the class's forward
            bn.forward = _onednn_batch_norm(bn)
        if concurrent:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(onednn_outputs)
                plain = record(model, x)
                fast = pending.result()
        else:
            plain = record(model, x)
            fast = onednn_outputs()
        yield bool(fast) and plain.keys() == fast.keys() and all(torch.equal(plain[k], fast[k]) for k in plain), plain
    finally:
        for bn in bns:
            del bn.forward  # back to the class's


def _onednn_batch_norm(bn: nn.BatchNorm2d) -> Callable[[Tensor], Tensor]:
    """``bn``'s eval-mode forward, on oneDNN tensors rounded as the dense kernel rounds (:func:`onednn_forward`)."""
    with torch.no_grad():
        alpha = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            alpha = alpha * bn.weight
        beta = torch.zeros_like(alpha) if bn.bias is None else bn.bias.detach()
        beta = torch.addcmul(beta, bn.running_mean, alpha, value=-1)  # fma(-mean, alpha, bias)
        c = alpha.numel()
        weight = torch._C._nn.mkldnn_reorder_conv2d_weight(alpha.view(c, 1, 1, 1).to_mkldnn(), [0, 0], [1, 1],
                                                          [1, 1], c)

    def forward(x: Tensor) -> Tensor:
        if not x.is_mkldnn:
            return type(bn).forward(bn, x)
        return torch.mkldnn_convolution(x, weight, beta, [0, 0], [1, 1], [1, 1], c)

    return forward


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable[..., Any]]], pre: bool = False) -> Iterator[None]:
    """Register each ``(module, hook)`` as a forward hook (``pre``: a forward pre-hook) for the block; they are
    removed on exit, also on error. A hook that raises :class:`StopForward` ends the forward early (call the
    model through :func:`run_forward`)."""
    handles = [m.register_forward_pre_hook(h) if pre else m.register_forward_hook(h) for m, h in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _recording(modules: Mapping[str, nn.Module], reduce: Reduce | Mapping[str, Reduce] | None, stop: bool,
               sink: Callable[[], dict[str, Tensor]]) -> contextlib.AbstractContextManager[None]:
    """The hooks of :func:`record_outputs` / :func:`outputs_of`: each writes its :func:`recorded` output into the
    dict ``sink()`` returns."""
    def make_hook(name: str):
        fn = reduce.get(name) if isinstance(reduce, Mapping) else reduce

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            outputs = sink()
            outputs[name] = recorded(out, fn)
            if stop and len(outputs) == len(modules):
                raise StopForward
        return hook

    return forward_hooks((m, make_hook(n)) for n, m in modules.items())


@contextlib.contextmanager
def record_outputs(modules: Mapping[str, nn.Module], reduce: Reduce | Mapping[str, Reduce] | None = None,
                   stop: bool = False) -> Iterator[dict[str, Tensor]]:
    """Hook ``modules`` (name -> module; several names may hook one module); yields a dict that every forward
    pass fills with each module's :func:`recorded` output under its name, reduced by ``reduce`` (one callable,
    or one per name). ``stop``: once all names are recorded the forward stops (the layers above need not run;
    call the model with :func:`run_forward` and clear the dict between passes). The hooks are removed on exit,
    also on error."""
    outputs: dict[str, Tensor] = {}
    with _recording(modules, reduce, stop, lambda: outputs):
        yield outputs


@contextlib.contextmanager
def outputs_of(modules: Mapping[str, nn.Module],
               reduce: Reduce | Mapping[str, Reduce] | None = None) -> Iterator[Callable[[nn.Module, Tensor],
                                                                                        dict[str, Tensor]]]:
    """:func:`record_outputs` with ``stop=True`` for forward passes run from several threads at once: yields
    ``record(model, x)``, which runs the forward (without gradients) and returns its own dict of the recorded
    outputs (each thread records into its own)."""
    local = threading.local()

    def record(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
        local.outputs = {}
        with torch.no_grad():  # grad mode is per thread
            run_forward(model, x)
        out, local.outputs = local.outputs, None
        return out

    with _recording(modules, reduce, True, lambda: local.outputs):
        yield record


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


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires a gradient inside the block (each gets its own flag back on exit): an
    analysis that differentiates through the model (linking's counterfactuals, feature visualisation) neither
    fills the parameters' ``.grad`` nor fires DDP's gradient hooks, which would wait for the other ranks."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def analysis_mode(model: nn.Module) -> Iterator[None]:
    """What every analysis runs under: :func:`eval_mode`, :func:`frozen` parameters, no gradients, a forked RNG
    (the global torch RNG, and the current CUDA device's, are as before afterwards), so that analysing never
    perturbs training."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.no_grad(), eval_mode(model), \
            frozen(model):
        yield


def find_head(model: nn.Module, num_classes: int | None = None,
              head_module: str | None = None) -> tuple[str, nn.Linear]:
    """The final linear layer ``(name, module)`` of ``model``: the classifier head whose input is the
    penultimate feature vector (class-filters spec §2.1, linking's r).

    With ``head_module`` the named submodule is returned (it must be an ``nn.Linear``).  Otherwise the last
    ``nn.Linear`` in registration order is taken, restricted to ``out_features == num_classes`` when given.
    Raises ``ValueError`` when nothing fits (callers name their config key).
    """
    if head_module:
        try:
            mod = model.get_submodule(head_module)
        except AttributeError as err:
            raise ValueError(f"{type(model).__name__} has no submodule {head_module!r}") from err
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"head_module {head_module!r} is a {type(mod).__name__}, not an nn.Linear; the "
                             "analysis needs a linear head over penultimate features")
        return head_module, mod
    found: tuple[str, nn.Linear] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (num_classes is None or mod.out_features == num_classes):
            found = (name, mod)
    if found is None:
        suffix = "" if num_classes is None else f" with out_features={num_classes}"
        raise ValueError(f"{type(model).__name__} has no final nn.Linear{suffix}; expected an nn.Linear head over "
                         "penultimate features (set the analysis' head_module)")
    return found


@contextlib.contextmanager
def capture_head_input(head: nn.Module) -> Iterator[list[Tensor]]:
    """Record the head's input during forwards inside the ``with`` block.

    Yields a list to which every forward of ``head`` appends its input, flattened to ``(B, D)`` and detached
    (not copied: nothing after the head can rewrite it).  The forward pre-hook is removed on exit, also on error.
    """
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().flatten(1))

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
