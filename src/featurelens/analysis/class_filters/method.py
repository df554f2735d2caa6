"""Badola et al.'s whole method on one model: select S_c, score the decomposed heads, test the sets.

Each run streams over a class-balanced subset of the training images (no augmentation, eval mode) to select,
for every class c, the penultimate features S_c it relies on (the fractional-k histogram needs a second pass,
over features cached up to ``cache_mb`` or recomputed), then over the evaluation images to score the full
head, the decomposed heads (every k of ``k_grid`` and every fraction) and the noise test. All accumulators are
``torchmetrics.Metric``s, so under DDP every rank takes its share of the images and the counts are summed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from featurelens.analysis.base import Analysis, Data, Result, register
from featurelens.analysis.class_filters import stats as cf
from featurelens.analysis.hooks import capture_head_input, find_head, record_outputs
from featurelens.errors import ConfigError

TABLE_COLUMNS = ["class", "class_name", "S_c", "h_c_on_S", "n_images", "acc_full", "acc_decomposed",
                 "noise_at_S_correct", "noise_at_rest_correct"]


@dataclass
class FinetuneConfig:
    """``analyze.py`` only: fine-tune the decomposed model as its own fit (Adam, the mask fixed)."""

    enabled: bool = False
    epochs: int = 1
    lr: float = 1e-4
    head_only: bool = False  # freeze the backbone, train the masked head only


@dataclass
class ClassFiltersConfig:
    """The parameters of the class-filters analysis (``analysis.class_filters.<key>``)."""

    k: int = 5  # features per class (k1 = k2 = k)
    # every k also scored (clipped to the head's input width D; D itself, the exact control, is always added)
    k_grid: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10, 15, 20, 30, 64])
    # fractional k = f (a second streaming pass); Ψ and features-per-class use f = 0.5 when listed
    fractions: list[float] = field(default_factory=lambda: [0.5])
    f_hist: float | None = None  # histogram-mass threshold of fractional selection (None = f, the authors' choice)
    # training images per class for the selection (None = all); never evaluation images. 100 keeps the default
    # run's analysis cheap; against all 500 the k=5 sets agree at Jaccard 0.67-1.0 per class on the default
    # run's model (README), so the paper experiments (class_filters_*) select on all images.
    n_per_class: int | None = 100
    selection_seed: int = 0
    noise_seed: int = 0  # the N(0,1) replacement of the essentiality test (plus the epoch)
    head_module: str | None = None  # the final nn.Linear (None = the model's last Linear)
    psi_layers: list[str] = field(default_factory=list)  # extra module names for Ψ of their pooled outputs
    reference_indices: str | None = None  # JSON file of reference sets (list of lists) -> jaccard_vs_reference
    figures_every: int = 5  # figures at epoch 0, every figures_every-th and the last epoch
    batch_size: int = 256
    cache_mb: float = 64  # selection features kept for the fractional pass up to this size, else recomputed
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig(**self.finetune)
        self.k_grid, self.fractions, self.psi_layers = list(self.k_grid), list(self.fractions), list(self.psi_layers)
        if self.k < 1 or any(K < 1 for K in self.k_grid):
            raise ConfigError(f"analysis.class_filters.k={self.k}, k_grid={self.k_grid}: set sizes must be >= 1")
        if not self.fractions or any(not 0 < f < 1 for f in self.fractions) or (
                self.f_hist is not None and not 0 < self.f_hist < 1):
            raise ConfigError(f"analysis.class_filters.fractions={self.fractions}, f_hist={self.f_hist}: "
                              "give at least one fraction, each in (0, 1)")
        if self.n_per_class is not None and self.n_per_class < 1:
            raise ConfigError(f"analysis.class_filters.n_per_class={self.n_per_class}: use null (all) or >= 1")
        if self.batch_size < 1 or self.figures_every < 1:
            raise ConfigError(f"analysis.class_filters.batch_size={self.batch_size}, figures_every="
                              f"{self.figures_every}: both must be >= 1")
        if self.reference_indices is not None and not Path(self.reference_indices).is_file():
            raise ConfigError(f"analysis.class_filters.reference_indices={self.reference_indices!r}: no such file")


@dataclass
class ClassFiltersResult(Result):
    """One analysed epoch. ``values`` holds every number of the results file; ``masks`` the class × feature
    selections by name (``k<K>`` for each scored k, ``frac<f>`` for each fraction)."""

    name: ClassVar[str] = "class_filters"
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    class_names: list[str] = field(default_factory=list)  # the data's (``data.class_names``), else indices

    @property
    def sets(self) -> list[list[int]]:
        """S_c at the default k, one list of feature indices per class."""
        return self.values["sets"]

    @property
    def mask(self) -> torch.Tensor:
        """The class × feature selection at the default k."""
        return self.masks[f"k{self.values['k']}"]

    def to_frame(self):
        """The per-class table: S_c, h_c on it, images, full/decomposed accuracy, the noise test's counts."""
        import pandas as pd

        v, k = self.values, self.values["k"]
        names = self.class_names or [str(c) for c in range(len(v["sets"]))]
        rows = [[c, names[c], " ".join(map(str, s)), " ".join(map(str, h)), n, a_full, a_dec, ns, nr]
                for c, (s, h, n, a_full, a_dec, ns, nr) in enumerate(zip(
                    v["sets"], v["h_on_sets"], v["n_images"], v["per_class_acc"]["full"],
                    v["per_class_acc"][f"k{k}"], v["per_class_correct"]["noise_at_S"],
                    v["per_class_correct"]["noise_at_rest"], strict=True))]
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)


@register
class ClassFilters(Analysis):
    """Badola et al.: per-class feature sets of the final layer's input and the decomposed head."""

    name = "class_filters"
    Config = ClassFiltersConfig
    headline = ("acc_full", "acc_decomposed", "jaccard_mean")
    constants = ("dim", "num_classes", "k", "depth", "selection_images")
    sharded = True

    def __init__(self, config: ClassFiltersConfig | None = None, **params: Any):
        super().__init__(config, **params)
        c = self.config
        self.reference = json.loads(Path(c.reference_indices).read_text()) if c.reference_indices else None
        self.masks: dict[str, torch.Tensor] = {}  # the last epoch's selections: the next epoch's stability

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state.get("masks", {}))

    def _batches(self, model: nn.Module, batches, modules: dict[str, nn.Module], device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
        """(captured inputs of the head, GAP'd outputs of ``modules``, labels) per batch."""
        layers = {n: m for n, m in modules.items() if n != "__head__"}
        with (record_outputs(layers, lambda o: o.flatten(2).mean(-1) if o.dim() > 2 else o) as pooled,
              capture_head_input(modules["__head__"]) as feats):
            for x, y in batches:
                model(x.to(device))
                yield feats.pop(), dict(pooled), y.to(device)

    def run(self, model: nn.Module, data: Data, *, epoch: int = 0, shard: tuple[int, int] = (0, 1),
            final: bool = True) -> ClassFiltersResult:
        c = self.config
        try:
            head_name, head = find_head(model, head_module=c.head_module)
        except ValueError as e:
            raise ConfigError(f"analysis.class_filters.head_module: {e}") from None
        device = head.weight.device
        num_classes, dim = head.out_features, head.in_features
        ks = sorted({dim, *(min(K, dim) for K in (*c.k_grid, c.k))})  # k = D: the exact control
        k_default = min(c.k, dim)
        modules = {"__head__": head, **{n: model.get_submodule(n) for n in c.psi_layers}}

        def select():
            return data.batches("train", c.batch_size, shard, n_per_class=c.n_per_class, seed=c.selection_seed)

        stats = cf.ClassFeatureStats(num_classes, dim, ks, c.fractions).to(device)
        layer_stats: dict[str, cf.ClassFeatureStats] = {}
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # features for the 2nd pass, while small
        cached_bytes = 0
        for a, pooled, y in self._batches(model, select(), modules, device):
            stats.update(a, y)
            cached_bytes += a.numel() * a.element_size()
            if cache is not None and cached_bytes <= c.cache_mb * 2**20:
                cache.append((a, y))
            else:
                cache = None
            for n, feat in pooled.items():
                if n not in layer_stats:
                    layer_stats[n] = cf.ClassFeatureStats(num_classes, feat.shape[1], (), c.fractions).to(device)
                layer_stats[n].update(feat, y)
        st = stats.compute()
        frac_hist = cf.FractionalHistogram(cf.fractional_k1(st["nhist"]), dim=dim).to(device)
        second_pass = cache if cache is not None else (
            (a, y) for a, _, y in self._batches(model, select(), {"__head__": head}, device))
        for a, y in second_pass:
            frac_hist.update(a, y)
        fh = frac_hist.compute()

        masks = {f"k{K}": cf.indices_to_mask(cf.select_topk(st["hist"][i], st["mass"], K), dim)
                 for i, K in enumerate(ks)}
        for i, f in enumerate(c.fractions):
            masks[f"frac{f:g}"] = cf.select_fraction(fh[i], c.f_hist or f)
        default = masks[f"k{k_default}"]

        names = ["full", *masks, "noise_at_S", "noise_at_rest"]
        counts = cf.EvalCounts(num_classes, len(names)).to(device)
        gen = torch.Generator(device=device).manual_seed(c.noise_seed + epoch)
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        for a, _, y in self._batches(model, data.batches("val", c.batch_size, shard), {"__head__": head}, device):
            a = a.to(weight.dtype)
            noisy_s, noisy_rest = cf.noise_corrupt(a, y, default, gen)
            counts.update([F.linear(a, weight, bias),
                           *(cf.decomposed_logits(a, weight, bias, m) for m in masks.values()),
                           F.linear(noisy_s, weight, bias),
                           F.linear(noisy_rest, weight, bias)], y)
        ev = counts.compute()
        total = ev["total"].clamp_min(1).double()
        acc = {n: float(ev["correct"][i].sum() / ev["total"].sum().clamp_min(1)) for i, n in enumerate(names)}
        per_class = {n: (ev["correct"][i].double() / total).tolist() for i, n in enumerate(names)}

        count = st["count"].clamp_min(1).double()
        idx = cf.select_topk(st["hist"][ks.index(k_default)], st["mass"], k_default)
        frac_index = c.fractions.index(0.5) if 0.5 in c.fractions else 0
        psi_med, psi_mean = cf.psi(st["nhist"][frac_index], dim)
        values: dict[str, Any] = {
            "head": head_name, "dim": dim, "num_classes": num_classes, "k": k_default,
            "acc_full": acc["full"], "acc_decomposed": acc[f"k{k_default}"],
            "acc_gap": acc["full"] - acc[f"k{k_default}"],
            **{f"k{K}/acc_decomposed": acc[f"k{K}"] for K in ks},
            **{f"frac{f:g}/acc_decomposed": acc[f"frac{f:g}"] for f in c.fractions},
            **{f"frac{f:g}/set_size_mean": float(masks[f"frac{f:g}"].sum(1).double().mean()) for f in c.fractions},
            "mass_topk": float((st["captured"][ks.index(k_default)] / count).mean()),
            "mass_S": float(((st["mass"] * default).sum(1) / count).mean()),
            "features_per_class": float(cf.features_per_class(st["nhist"][frac_index]).double().mean()),
            "set_size_mean": float(masks[f"frac{c.fractions[frac_index]:g}"].sum(1).double().mean()),
            "psi/penultimate": float(psi_med.mean()), "psi_mean/penultimate": float(psi_mean.mean()),
            **{k: v for k, v in cf.overlap_stats(default).items() if k != "set_size_mean"},  # = k here
            **cf.mutual_info(default),
            "noise/acc_at_S": acc["noise_at_S"], "noise/acc_at_rest": acc["noise_at_rest"],
            "weight_align": cf.weight_alignment(weight, default),
            "mac_reduction": cf.head_macs(default, num_classes, dim)[2],
            "n_skipped": int(st["skipped"]),
            "depth": sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules()),
            "sets": idx.tolist(),
            "h_on_sets": torch.gather(st["hist"][ks.index(k_default)], 1, idx).tolist(),
            "n_images": st["count"].tolist(),
            "selection": "all" if c.n_per_class is None else f"{c.n_per_class} per class",
            "selection_images": int(st["count"].sum()),
            "per_class_acc": {n: per_class[n] for n in ("full", f"k{k_default}", "noise_at_S", "noise_at_rest")},
            "per_class_correct": {n: ev["correct"][names.index(n)].tolist() for n in ("noise_at_S", "noise_at_rest")},
        }
        for n, ls in layer_stats.items():
            lst = ls.compute()
            med, mean = cf.psi(lst["nhist"][frac_index], lst["mass"].shape[1])
            values[f"psi/{n}"], values[f"psi_mean/{n}"] = float(med.mean()), float(mean.mean())
        if f"k{k_default}" in self.masks and self.masks[f"k{k_default}"].shape == default.shape:
            values["stability"] = float(cf.jaccard_per_class(self.masks[f"k{k_default}"], default.cpu()).mean())
        if self.reference is not None:
            ref = cf.indices_to_mask(torch.tensor(self.reference), dim)
            values["jaccard_vs_reference"] = float(cf.jaccard_per_class(ref, default.cpu()).mean())
        self.masks = {n: m.cpu() for n, m in masks.items()}
        return ClassFiltersResult(epoch, values, dict(self.masks), list(getattr(data, "class_names", None) or []))

    def report(self, result: Result, out_dir: Path, *, final: bool = True, history: list[dict] | None = None):
        from featurelens.analysis.class_filters.report import report

        return report(result, out_dir, self.config, final=final)

    @staticmethod
    def tables(jobs, grouped_by, out: Path) -> list[Path]:
        from featurelens.analysis.class_filters.report import tables

        return tables(jobs, grouped_by, out)


class MaskedLinear(nn.Linear):
    """A linear layer restricted to a fixed class × feature mask: z = (M ⊙ W) a + b."""

    def __init__(self, head: nn.Linear, mask: torch.Tensor):
        super().__init__(head.in_features, head.out_features, head.bias is not None)
        with torch.no_grad():
            self.weight.copy_(head.weight)
            if head.bias is not None:
                self.bias.copy_(head.bias)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def decomposed_model(model: nn.Module, head_name: str, mask: torch.Tensor, head_only: bool = False) -> nn.Module:
    """A copy of ``model`` whose head is a :class:`MaskedLinear` over ``mask`` (the original W is not in it, so
    it cannot drift); ``head_only`` freezes everything but that head."""
    import copy

    net = copy.deepcopy(model)
    parent, _, child = head_name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, MaskedLinear(net.get_submodule(head_name), mask))
    if head_only:
        for name, param in net.named_parameters():
            param.requires_grad_(name.startswith(head_name + "."))
    return net
