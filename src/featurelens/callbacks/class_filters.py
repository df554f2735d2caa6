"""Class-specific filters and the decomposed final layer per epoch (spec: ``shared/spec/class_filters.md``).

Each analysed epoch streams over a class-balanced subset of the training images (no augmentation, eval
mode) to select, for every class c, the penultimate features S_c it relies on (the fractional-k histogram
needs a second pass, over features cached up to ``cache_mb`` or recomputed), then over the validation
split to score the full head, the decomposed heads (every k of ``k_grid`` and every fraction) and the
noise test. All accumulators are ``torchmetrics.Metric``s, so
under DDP every rank takes its share of the images and the counts are summed across ranks.

Files under ``<run_dir>/analysis/class_filters/``: ``results.jsonl`` (every value and the sets S_c per
epoch), ``table_epoch<E>.csv`` (one row per class), ``sets_epoch<E>.json`` and, at epochs 0, every
``figures_every``-th and last, ``selection_mask.png`` (class × feature), ``classes_per_feature.png`` and
``acc_vs_k.png``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from featurelens import plots
from featurelens.analysis import class_filters as cf
from featurelens.analysis.hooks import capture_head_input, find_head, record_outputs
from featurelens.callbacks.base import AnalysisCallback, AnalysisContext, wandb_loggers
from featurelens.errors import ConfigError

TABLE_COLUMNS = ["class", "S_c", "h_c_on_S", "n_images", "acc_full", "acc_decomposed", "noise_at_S_correct",
                 "noise_at_rest_correct"]


class ClassFiltersCallback(AnalysisCallback):
    """Badola et al.: per-class feature sets of the final layer's input and the decomposed head.

    ``k``: the default integer set size (``k1 = k2 = k``); ``k_grid``: every k also scored, always with
    k = D (the exact control: the decomposed head is the full head); ``fractions``
    with ``f_hist`` (default = f): fractional k; ``n_per_class``: selection images per class (null = all; logged
    as ``selection``/``selection_images``);
    ``head_module``: the final ``nn.Linear`` (default: the last Linear of the model); ``psi_layers``:
    extra module names whose global-average-pooled outputs get the selectivity Ψ; ``reference_indices``:
    a JSON file of reference sets (list of lists) for ``jaccard_vs_reference``; ``cache_mb``: the selection
    features are kept for the fractional pass while they fit in this many MiB, else recomputed by a second
    forward pass, so memory stays bounded whatever the dataset size.
    """

    name = "class_filters"
    headline = ("acc_full", "acc_decomposed", "jaccard_mean")
    rank_zero_only = False

    def __init__(self, every_n_epochs: int = 1, k: int = 5, k_grid: Sequence[int] = (1, 2, 3, 5, 10, 15, 20, 30, 64),
                 fractions: Sequence[float] = (0.5,), f_hist: float | None = None, n_per_class: int | None = 100,
                 selection_seed: int = 0, noise_seed: int = 0, head_module: str | None = None,
                 psi_layers: Sequence[str] = (), reference_indices: str | None = None, figures_every: int = 5,
                 batch_size: int = 256, cache_mb: float = 64, finetune: dict[str, Any] | None = None):
        super().__init__(every_n_epochs)
        if k < 1 or any(K < 1 for K in k_grid):
            raise ConfigError(f"analysis.class_filters.k={k}, k_grid={list(k_grid)}: set sizes must be >= 1")
        if not fractions or any(not 0 < f < 1 for f in fractions) or (f_hist is not None and not 0 < f_hist < 1):
            raise ConfigError(f"analysis.class_filters.fractions={list(fractions)}, f_hist={f_hist}: "
                              "give at least one fraction, each in (0, 1)")
        if n_per_class is not None and n_per_class < 1:
            raise ConfigError(f"analysis.class_filters.n_per_class={n_per_class}: use null (all) or >= 1")
        self.k, self.k_grid, self.fractions, self.f_hist = k, tuple(k_grid), tuple(fractions), f_hist
        self.n_per_class, self.selection_seed, self.noise_seed = n_per_class, selection_seed, noise_seed
        self.head_module, self.psi_layers = head_module, tuple(psi_layers)
        self.reference = json.loads(Path(reference_indices).read_text()) if reference_indices else None
        self.figures_every, self.batch_size, self.cache_mb = figures_every, batch_size, cache_mb
        self.finetune = {"enabled": False, "epochs": 1, "lr": 1e-4, "head_only": False, **(finetune or {})}
        self.head_name: str | None = None
        self.masks: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ passes
    def _batches(self, model: nn.Module, ctx: AnalysisContext, dataset, modules: dict[str, nn.Module]):
        """Yield (captured inputs of the head, GAP'd outputs of ``modules``, labels) per batch."""
        layers = {n: m for n, m in modules.items() if n != "__head__"}
        with (record_outputs(layers, lambda o: o.flatten(2).mean(-1) if o.dim() > 2 else o) as pooled,
              capture_head_input(modules["__head__"]) as feats):
            for x, y in ctx.datamodule.loader(dataset, self.batch_size, ctx.shard):
                model(x.to(ctx.device))
                yield feats.pop(), dict(pooled), y.to(ctx.device)

    def compute(self, model: nn.Module, ctx: AnalysisContext) -> dict[str, Any]:
        if ctx.datamodule is None:
            raise RuntimeError("class_filters needs the data module (training or validation images)")
        try:
            self.head_name, head = find_head(model, head_module=self.head_module)
        except ValueError as e:
            raise ConfigError(f"analysis.class_filters.head_module: {e}") from None
        num_classes, dim = head.out_features, head.in_features
        ks = sorted({dim, *(min(K, dim) for K in (*self.k_grid, self.k))})  # k = D: the exact control
        k_default = min(self.k, dim)
        modules = {"__head__": head, **{n: model.get_submodule(n) for n in self.psi_layers}}
        select = ctx.datamodule.class_subset(self.n_per_class, self.selection_seed)

        stats = cf.ClassFeatureStats(num_classes, dim, ks, self.fractions).to(ctx.device)
        layer_stats: dict[str, cf.ClassFeatureStats] = {}
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # features for the 2nd pass, while small
        cached_bytes = 0
        for a, pooled, y in self._batches(model, ctx, select, modules):
            stats.update(a, y)
            cached_bytes += a.numel() * a.element_size()
            if cache is not None and cached_bytes <= self.cache_mb * 2**20:
                cache.append((a, y))
            else:
                cache = None
            for n, feat in pooled.items():
                if n not in layer_stats:
                    layer_stats[n] = cf.ClassFeatureStats(num_classes, feat.shape[1], (), self.fractions).to(ctx.device)
                layer_stats[n].update(feat, y)
        st = stats.compute()
        frac_hist = cf.FractionalHistogram(cf.fractional_k1(st["nhist"]), dim=dim).to(ctx.device)
        second_pass = cache if cache is not None else (
            (a, y) for a, _, y in self._batches(model, ctx, select, {"__head__": head}))
        for a, y in second_pass:
            frac_hist.update(a, y)
        fh = frac_hist.compute()

        masks = {f"k{K}": cf.indices_to_mask(cf.select_topk(st["hist"][i], st["mass"], K), dim)
                 for i, K in enumerate(ks)}
        for i, f in enumerate(self.fractions):
            masks[f"frac{f:g}"] = cf.select_fraction(fh[i], self.f_hist or f)
        default = masks[f"k{k_default}"]

        names = ["full", *masks, "noise_at_S", "noise_at_rest"]
        counts = cf.EvalCounts(num_classes, len(names)).to(ctx.device)
        gen = torch.Generator(device=ctx.device).manual_seed(self.noise_seed + ctx.epoch)
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        for a, _, y in self._batches(model, ctx, ctx.datamodule.val_set, {"__head__": head}):
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
        frac_index = self.fractions.index(0.5) if 0.5 in self.fractions else 0
        psi_med, psi_mean = cf.psi(st["nhist"][frac_index], dim)
        values: dict[str, Any] = {
            "head": self.head_name, "dim": dim, "num_classes": num_classes, "k": k_default,
            "acc_full": acc["full"], "acc_decomposed": acc[f"k{k_default}"],
            "acc_gap": acc["full"] - acc[f"k{k_default}"],
            **{f"k{K}/acc_decomposed": acc[f"k{K}"] for K in ks},
            **{f"frac{f:g}/acc_decomposed": acc[f"frac{f:g}"] for f in self.fractions},
            **{f"frac{f:g}/set_size_mean": float(masks[f"frac{f:g}"].sum(1).double().mean()) for f in self.fractions},
            "mass_topk": float((st["captured"][ks.index(k_default)] / count).mean()),
            "mass_S": float(((st["mass"] * default).sum(1) / count).mean()),
            "features_per_class": float(cf.features_per_class(st["nhist"][frac_index]).double().mean()),
            "set_size_mean": float(masks[f"frac{self.fractions[frac_index]:g}"].sum(1).double().mean()),
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
            "selection": "all" if self.n_per_class is None else f"{self.n_per_class} per class",
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
        return values

    def state_dict(self) -> dict[str, Any]:  # the last sets, for the next epoch's stability after a resume
        return {**super().state_dict(), "masks": self.masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.masks = dict(state_dict.get("masks", {}))

    # ------------------------------------------------------------------ reporting
    def report(self, model: nn.Module, ctx: AnalysisContext, record: dict[str, Any]) -> None:
        p = "class_filters/"
        sets, k = record[p + "sets"], int(record[p + "k"])
        rows = [[c, " ".join(map(str, s)), " ".join(map(str, h)), n, a_full, a_dec, ns, nr]
                for c, (s, h, n, a_full, a_dec, ns, nr) in enumerate(zip(
                    sets, record[p + "h_on_sets"], record[p + "n_images"],
                    record[p + "per_class_acc"]["full"], record[p + "per_class_acc"][f"k{k}"],
                    record[p + "per_class_correct"]["noise_at_S"], record[p + "per_class_correct"]["noise_at_rest"],
                    strict=True))]
        import pandas as pd

        self.out_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=TABLE_COLUMNS).to_csv(self.out_dir / f"table_epoch{ctx.epoch}.csv", index=False)
        (self.out_dir / f"sets_epoch{ctx.epoch}.json").write_text(json.dumps(sets))
        for lg in wandb_loggers(ctx.loggers):
            lg.log_table(key="class_filters/table", columns=TABLE_COLUMNS, data=rows, step=ctx.step)
        if not (ctx.epoch == 0 or ctx.epoch % self.figures_every == 0 or ctx.final):
            return
        mask = self.masks[f"k{k}"].numpy()
        plots.heatmap(mask, self.out_dir / "selection_mask.png", xlabel="feature (final-layer input)",
                      ylabel="class", title=f"Selected features S_c (k = {k}, head {record[p + 'head']})")
        per_feature = mask.sum(0)
        plots.bar_plot(np.arange(mask.shape[1]), per_feature, self.out_dir / "classes_per_feature.png",
                       xlabel="feature", ylabel="classes selecting it", title="How many classes use each feature")
        ks = sorted(int(key.split("/")[1][1:]) for key in record
                    if key.startswith(p + "k") and key.endswith("/acc_decomposed"))
        plots.line_plot(ks, {"decomposed head": [record[f"{p}k{K}/acc_decomposed"] for K in ks]},
                        self.out_dir / "acc_vs_k.png", xlabel="k (features per class)", ylabel="accuracy",
                        hline=record[p + "acc_full"], title="Decomposed-head accuracy vs k (dashed: full head)")
        for key in ("selection_mask", "classes_per_feature", "acc_vs_k"):
            for lg in wandb_loggers(ctx.loggers):
                lg.log_image(key=f"class_filters/{key}", images=[str(self.out_dir / f"{key}.png")], step=ctx.step)

    # ------------------------------------------------------------------ fine-tuning (analyze.py)
    def run_finetune(self, model: nn.Module, ctx: AnalysisContext) -> list[float]:
        """Fine-tune the decomposed model (the spec's decomposed softmax) as its own fit; returns val acc per epoch.

        The head becomes a ``MaskedLinear`` initialised from W and b with the default-k mask fixed; the
        original W is not in the model, so it cannot drift. ``finetune.head_only`` freezes the backbone.
        """
        from featurelens.module import Classifier

        mask = self.masks[f"k{min(self.k, model.get_submodule(self.head_name).in_features)}"]
        net = copy.deepcopy(model)
        head = net.get_submodule(self.head_name)
        parent, _, child = self.head_name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, MaskedLinear(head, mask))
        if self.finetune["head_only"]:
            for name, param in net.named_parameters():
                param.requires_grad_(name.startswith(self.head_name + "."))
        module = Classifier({"num_classes": head.out_features},
                            {"_target_": "torch.optim.Adam", "_partial_": True, "lr": self.finetune["lr"]}, net=net)
        recorder = _FinetuneRecorder(self.out_dir)
        trainer = pl.Trainer(max_epochs=self.finetune["epochs"], logger=ctx.loggers or False,
                             enable_checkpointing=False, default_root_dir=str(self.out_dir / "finetune"),
                             callbacks=[recorder], num_sanity_val_steps=0, accelerator="auto", devices=1)
        trainer.fit(module, datamodule=ctx.datamodule)
        return recorder.accuracies


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


class _FinetuneRecorder(pl.Callback):
    """Logs ``class_filters/ft/acc_decomposed`` after every fine-tuning epoch and keeps a JSON copy."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.accuracies = out_dir, []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        acc = float(trainer.callback_metrics["val/acc"])
        self.accuracies.append(acc)
        for lg in trainer.loggers:
            lg.log_metrics({"class_filters/ft/acc_decomposed": acc, "class_filters/ft/epoch": len(self.accuracies)},
                           step=trainer.global_step)
        if trainer.is_global_zero:
            (self.out_dir / "finetune.json").write_text(json.dumps({"val_acc_per_epoch": self.accuracies}))
