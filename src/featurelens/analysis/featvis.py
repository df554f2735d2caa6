"""Feature visualisation of unit sets and its coherence test (spec §2.7 "Feature visualisation", §8, §10).

* :class:`FourierImage` -- Lucid-style image parameterisation: a per-image, per-channel real/imag spectrum
  initialised ``N(0, 0.01^2)`` from the image's own :class:`torch.Generator`, scaled by
  ``1 / max(f, 1/max(H, W))`` (``f`` = spatial frequency in cycles/pixel), an orthonormal inverse real FFT,
  ``/ 4``, colour decorrelation (3 channels only) with the fixed ImageNet colour-correlation square root

      [[0.26,  0.09,  0.02],
       [0.27,  0.00, -0.05],
       [0.27, -0.09,  0.03]]

  divided by its largest column L2 norm (applied per pixel as ``rgb = M_norm @ t``), then a sigmoid to [0, 1].
  One-channel images skip decorrelation.
* ReLU gradient redirection (:func:`redirect_relus`) -- while active, every ``nn.ReLU`` module of the model
  runs a custom autograd function: the ordinary ReLU gradient is used for an image whenever it is not all
  zero; otherwise the incoming gradient passes through negative inputs except where gradient descent would
  push them lower (input < 0 and gradient of the minimised loss > 0).  Only ``nn.ReLU`` *modules* are
  patched (functional ``F.relu`` / ``torch.relu`` calls inside ``forward`` are not).
* :func:`visualise` -- optimises one image per unit set, all sets in one batch, with Adam (lr 0.05, 64 steps,
  no transforms) maximising ``J_S(x) = sum_{u in S} |mean_{h,w} z_u(x)|`` on the output of ``z_module``
  (the pre-activation), ReLU redirection for the first ``relu_redirect_steps`` steps.  The loss is
  ``-sum_i J_{S_i}(x_i)``, so every image gets exactly its own gradient; Adam is elementwise and the model is
  in eval mode, so a batch equals the separate single runs (spec §8).
* :func:`vis_coherence` -- per set, the true set and ``n_random`` random same-size sets from ``candidates``
  are optimised as one batch; score = final J (right-sided percentile), entropy = natural-log entropy of the
  model's softmax on the final image (left-sided), effects ``mean_j t/(t + r_j)`` (only for ``t > 0``), and a
  summary with the shifted-Fisher p and ``2 x`` mean effect +- SEM (spec §2.6 aggregation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurelens.analysis.hooks import StopForward, eval_mode, forward_hooks, frozen, run_forward
from featurelens.analysis.specialization.measure import (
    fisher_combine,
    mean_sem,
    percentile_left,
    percentile_right,
    seed_sequence_ints,
)

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "FourierImage",
    "RedirectedReLU",
    "redirect_relus",
    "visualise",
    "vis_coherence",
]

# Lucid's ImageNet colour-correlation square root (lucid/optvis/param/color.py facts, spec §2.7).
COLOR_CORRELATION_SVD_SQRT = np.array(
    [[0.26, 0.09, 0.02],
     [0.27, 0.00, -0.05],
     [0.27, -0.09, 0.03]], dtype=np.float32)
_MAX_NORM_SVD_SQRT = float(np.max(np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0)))
COLOR_CORRELATION_NORMALIZED = COLOR_CORRELATION_SVD_SQRT / _MAX_NORM_SVD_SQRT


def _rfft2d_freqs(h: int, w: int) -> np.ndarray:
    """Spatial frequency magnitude (cycles/pixel) of each bin of a 2-D real FFT of an ``h x w`` image."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


class FourierImage(nn.Module):
    """A batch of ``batch`` images of ``channels x size x size`` parameterised by Fourier spectra.

    ``generator`` is one :class:`torch.Generator` (all images drawn from it in turn) or a sequence of
    ``batch`` generators (image ``i`` from generator ``i``, so a batch equals single-image runs).  The spectrum
    is fp32 on ``device``; :meth:`images` returns ``(B, C, H, W)`` in ``[0, 1]``.
    """

    def __init__(self, batch: int, channels: int, size: int | tuple[int, int],
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 *, sd: float = 0.01, device: torch.device | str | None = None) -> None:
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.batch, self.channels, self.h, self.w = int(batch), int(channels), int(h), int(w)
        freqs = _rfft2d_freqs(self.h, self.w)
        fh, fw = freqs.shape
        if generator is None or isinstance(generator, torch.Generator):
            gens = [generator] * self.batch
        else:
            gens = list(generator)
            if len(gens) != self.batch:
                raise ValueError(f"need {self.batch} generators, got {len(gens)}")
        # Drawn on the CPU (the generators are CPU generators) so results do not depend on the device.
        init = torch.stack([torch.randn((2, self.channels, fh, fw), generator=g, dtype=torch.float32)
                            for g in gens]) * sd
        self.spectrum = nn.Parameter(init.to(device))  # (B, 2, C, fh, fw)
        scale = 1.0 / np.maximum(freqs, 1.0 / max(self.h, self.w))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32, device=device))
        self.register_buffer("color", torch.as_tensor(COLOR_CORRELATION_NORMALIZED, device=device))

    def images(self) -> Tensor:
        spec = torch.complex(self.spectrum[:, 0], self.spectrum[:, 1]) * self.scale
        img = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho") / 4.0  # (B, C, H, W)
        if self.channels == 3:
            img = torch.einsum("ij,bjhw->bihw", self.color, img)
        return torch.sigmoid(img)

    def forward(self) -> Tensor:  # pragma: no cover - alias
        return self.images()


# ----------------------------------------------------------------------------------------------------------
# ReLU gradient redirection
# ----------------------------------------------------------------------------------------------------------


class RedirectedReLU(torch.autograd.Function):
    """``relu(x)`` whose backward falls back, per image (dim 0), to the redirected gradient when the ordinary
    ReLU gradient of that image is all zero (Lucid ``redirected_relu_grad``; ``grad`` is of the minimised
    loss, so ``grad > 0`` at a negative input would push it lower and is dropped)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        zero = torch.zeros_like(grad)
        relu_grad = torch.where(x > 0, grad, zero)
        redirected = torch.where((x < 0) & (grad > 0), zero, grad)
        if x.dim() == 0:
            return relu_grad if bool(relu_grad != 0) else redirected
        flat = relu_grad.reshape(relu_grad.shape[0], -1)
        passes = (flat != 0).any(dim=1).view((-1,) + (1,) * (x.dim() - 1))
        return torch.where(passes, relu_grad, redirected)


class _Switch:
    def __init__(self, active: bool = True) -> None:
        self.active = active


@contextlib.contextmanager
def redirect_relus(model: nn.Module, active: bool = True) -> Iterator[_Switch]:
    """Temporarily replace the ``forward`` of every ``nn.ReLU`` module in ``model`` by a version that uses
    :class:`RedirectedReLU` while ``switch.active`` (the yielded object) is true and the ordinary ReLU
    otherwise.  The instance attributes are restored in ``finally`` (also on errors)."""
    switch = _Switch(active)
    saved: list[tuple[nn.Module, bool, Any]] = []

    def make(mod: nn.Module) -> Callable[[Tensor], Tensor]:
        def fwd(x: Tensor) -> Tensor:
            if switch.active and torch.is_grad_enabled():
                return RedirectedReLU.apply(x)
            return F.relu(x, inplace=mod.inplace)
        return fwd

    try:
        for mod in model.modules():
            if isinstance(mod, nn.ReLU):
                had = "forward" in mod.__dict__
                saved.append((mod, had, mod.__dict__.get("forward")))
                mod.forward = make(mod)  # type: ignore[method-assign]
        yield switch
    finally:
        for mod, had, old in reversed(saved):
            if had:
                mod.forward = old  # type: ignore[method-assign]
            else:
                mod.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------------------------------------
# Visualisation
# ----------------------------------------------------------------------------------------------------------


def _unit_means(z: Tensor) -> Tensor:
    """``(B, U)`` per-unit values: ``mean_{h,w}`` for conv maps, as is for MLP layers."""
    return z.flatten(2).mean(-1) if z.dim() > 2 else z


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, (int, np.integer)):
        return seed_sequence_ints(int(seed), n)
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"need {n} seeds, got {len(seeds)}")
    return seeds


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def visualise(model: nn.Module, z_module: nn.Module, unit_sets: Sequence[Tensor | Sequence[int]], *,
              size: int | tuple[int, int], channels: int = 3,
              preprocess: Callable[[Tensor], Tensor] | None = None, steps: int = 64, lr: float = 0.05,
              relu_redirect_steps: int = 16, seed: int | Sequence[int] = 0,
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Feature-visualise each unit set of ``z_module``'s output, all sets as one batch (spec §2.7, §8).

    Returns ``(images (S, C, H, W) in [0, 1], J_final (S,), J_initial (S,), entropy (S,))`` on the CPU, fp32
    (entropy in nats of ``softmax(model(preprocess(images)))``).  ``seed``: an int (image ``i`` uses
    ``seed_sequence_ints(seed, S)[i]``; child ``i`` of a SeedSequence does not depend on ``S``, so a batch's
    first image equals a single run with the same int seed) or one int per set (exact batch = single runs).
    ``preprocess`` is the model's normalisation (identity if None).  Eval mode with parameter gradients off
    is used and the modules' train flags and ``requires_grad`` flags are restored; safe inside
    ``torch.inference_mode`` / ``no_grad``.
    """
    n_sets = len(unit_sets)
    if n_sets == 0:
        raise ValueError("unit_sets is empty")
    pre = preprocess if preprocess is not None else (lambda x: x)
    device = _model_device(model)
    seeds = _seeds(seed, n_sets)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    captured: dict[str, Tensor] = {}
    stop_early = [True]

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        captured["z"] = out[0] if isinstance(out, (tuple, list)) else out
        if stop_early[0]:
            raise StopForward

    def objective(x: Tensor, mask: Tensor) -> Tensor:
        captured.clear()
        run_forward(model, pre(x))
        if "z" not in captured:
            raise RuntimeError("z_module was not called during the forward pass")
        return (_unit_means(captured["z"]).float().abs() * mask).sum(1)

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(eval_mode(model))
        stack.enter_context(frozen(model))
        stack.enter_context(forward_hooks([(z_module, hook)]))
        param = FourierImage(n_sets, channels, size, gens, device=device)
        opt = torch.optim.Adam(param.parameters(), lr=lr)
        mask: Tensor | None = None
        with torch.no_grad():
            x0 = param.images()
            captured.clear()
            run_forward(model, pre(x0))
            n_units = _unit_means(captured["z"]).shape[1]
            mask = torch.zeros(n_sets, n_units, device=device)
            for i, s in enumerate(unit_sets):
                idx = torch.as_tensor(s, dtype=torch.long).reshape(-1).to(device)
                mask[i, idx] = 1.0
            j_init = objective(x0, mask)
        switch = stack.enter_context(redirect_relus(model, active=relu_redirect_steps > 0))
        for step in range(steps):
            switch.active = step < relu_redirect_steps
            opt.zero_grad(set_to_none=True)
            loss = -objective(param.images(), mask).sum()
            loss.backward()
            opt.step()
        switch.active = False
        with torch.no_grad():
            imgs = param.images().detach()
            j_final = objective(imgs, mask)
            stop_early[0] = False  # the whole forward, for the class entropy
            logits = model(pre(imgs)).float()
            logp = torch.log_softmax(logits, dim=1)
            entropy = -(logp.exp() * logp).sum(1)
    return (imgs.float().cpu().clone(), j_final.detach().cpu().clone(), j_init.detach().cpu().clone(),
            entropy.cpu().clone())


# ----------------------------------------------------------------------------------------------------------
# Coherence test
# ----------------------------------------------------------------------------------------------------------


def _effect(t: float, null: np.ndarray) -> float:
    """``mean_j t/(t + r_j)`` for ``t > 0`` (spec §2.7), else NaN (excluded from the aggregate)."""
    if not (t > 0) or not np.isfinite(t):
        return float("nan")
    return float(np.mean(t / (t + null)))


def vis_coherence(model: nn.Module, z_module: nn.Module, sets: Sequence[Tensor | Sequence[int]],
                  layer_size: int, candidates: Tensor | Sequence[int] | None = None, *, n_random: int = 19,
                  seed: int = 0, min_size: int = 3, max_frac: float = 0.99,
                  **vis_kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Feature-visualisation coherence of unit sets of one layer (spec §2.7) against ``n_random`` random
    same-size sets drawn without replacement from ``candidates`` (default ``arange(layer_size)``; pass the
    layer's non-isolated units).  Sets outside ``min_size <= |S| < max_frac * layer_size`` are skipped.

    Per set (one batch of ``1 + n_random`` images): ``vis_score`` (final J), ``p_vis_score`` (right-sided),
    ``vis_entropy``, ``p_vis_entropy`` (left-sided), ``effect_vis_score`` / ``effect_vis_entropy`` =
    ``mean_j t/(t + r_j)`` (NaN when ``t <= 0``), plus ``vis_score_initial``, the null means and ``set_index``.
    Summary: ``n_sets``, ``fisher_p_vis_score``, ``fisher_stat_vis_score`` (shifted-Fisher),
    ``effect_vis_score`` = 2 x mean effect and ``effect_vis_score_sem``, the same for ``vis_entropy``.

    Randomness: ``SeedSequence(seed)`` spawns one child per set (by position in ``sets``); each child spawns
    the random-set generator and the ``1 + n_random`` image seeds.  ``vis_kwargs`` go to :func:`visualise`.
    """
    cand = np.arange(layer_size) if candidates is None else np.asarray(
        torch.as_tensor(candidates).cpu().numpy(), dtype=np.int64).reshape(-1)
    children = np.random.SeedSequence(seed).spawn(len(sets))
    rows: list[dict[str, Any]] = []
    for i, (s, child) in enumerate(zip(sets, children, strict=True)):
        s_idx = torch.as_tensor(s, dtype=torch.long).reshape(-1)
        k = int(s_idx.numel())
        if k < min_size or k >= max_frac * layer_size or k > cand.size:
            continue
        set_ss, img_ss = child.spawn(2)
        rng = np.random.default_rng(set_ss)
        rand_sets = [torch.as_tensor(rng.choice(cand, size=k, replace=False), dtype=torch.long)
                     for _ in range(n_random)]
        _, j_fin, j_ini, ent = visualise(model, z_module, [s_idx] + rand_sets,
                                         seed=seed_sequence_ints(img_ss, 1 + n_random), **vis_kwargs)
        j_fin, j_ini, ent = j_fin.double().numpy(), j_ini.double().numpy(), ent.double().numpy()
        t_s, null_s = float(j_fin[0]), j_fin[1:]
        t_h, null_h = float(ent[0]), ent[1:]
        rows.append({
            "set_index": i,
            "size": k,
            "vis_score": t_s,
            "vis_score_initial": float(j_ini[0]),
            "vis_score_null_mean": float(null_s.mean()),
            "p_vis_score": percentile_right(t_s, null_s),
            "effect_vis_score": _effect(t_s, null_s),
            "vis_entropy": t_h,
            "vis_entropy_null_mean": float(null_h.mean()),
            "p_vis_entropy": percentile_left(t_h, null_h),
            "effect_vis_entropy": _effect(t_h, null_h),
        })
    summary: dict[str, Any] = {"n_sets": len(rows)}
    for stat in ("vis_score", "vis_entropy"):
        if rows:
            fr = fisher_combine([r[f"p_{stat}"] for r in rows], n_random=n_random)
            summary[f"fisher_p_{stat}"] = float(fr.pvalue)
            summary[f"fisher_stat_{stat}"] = float(fr.fisher_stat)
        else:
            summary[f"fisher_p_{stat}"] = float("nan")
            summary[f"fisher_stat_{stat}"] = float("nan")
        eff, sem = mean_sem([r[f"effect_{stat}"] for r in rows], scale=2)
        summary[f"effect_{stat}"] = eff
        summary[f"effect_{stat}_sem"] = sem
    return rows, summary
