"""Wehrheim et al.'s linking of a classifier's features to a generator: per analysed epoch, draw latents per
class from the frozen generator (``generator``: the default cVAE is trained once per data config and cached),
synthesise, keep the pairs the classifier labels correctly, fit the linear map ``w = A r + b`` from the head's
input ``r`` (closed form, float64), score it on held-out pairs (``r2_heldout``, ``r2_pooled``, ``mse_heldout``)
and through the cycle ``E(G(L(E(x))))`` (``cycle_top1``, ``w_cos``, ``r_cycle_corr_unit``,
``r_cycle_corr_sample``); sweep a fixed random subset of units over their observed range and measure how logits,
other units, the image and (shapes) the part masks change (``units/...``); and push samples across class
boundaries with the counterfactual loss (``cf/...``)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from featurelens.analysis.base import Analysis, Data, Result, model_device, model_input, register
from featurelens.analysis.linking import measure as lk
from featurelens.errors import ConfigError
from featurelens.models.generators.base import PART_NAMES

SELECTIVITY_MEASURES = ("area", "luminance", "entropy_mean", "cx", "cy")


@dataclass
class PairsConfig:
    # kept pairs per class; None: max(500, 1.25 * min_pairs / #classes) (ResNet-50, 4 classes: 1,280)
    n_per_class: int | None = None
    heldout_per_class: int = 100
    draw_factor: int = 20  # at most draw_factor * n_per_class draws per class
    seed_base: int = 0
    heldout_base: int | None = None  # None: the seed after the last training seed (disjoint for any class ids)


@dataclass
class FitConfig:
    alpha: float = 0.0  # 0: OLS (minimum norm); > 0: ridge
    mlp: bool = False  # also fit the non-linear baseline


@dataclass
class RefSetConfig:
    samples_per_class: int = 8
    seed: int = 136


@dataclass
class SweepConfig:
    n_steps: int = 3
    units_per_epoch: int = 32
    samples: int = 4
    seed: int = 0
    measures: list[str] = field(default_factory=lambda: list(SELECTIVITY_MEASURES))


@dataclass
class CounterfactualConfig:
    pairs: list[list[int]] = field(default_factory=list)  # [origin, target] class pairs; []: all ordered pairs
    lr: float = 0.5
    w_origin: float = 0.6
    w_identity: float = 10.0
    max_steps: int = 2000
    seed: int = 0


@dataclass
class LinkingConfig:
    """The parameters of the linking analysis (``analysis.linking.<key>``)."""

    # the generator config (train.py: the `generator` group; default cvae, or stylegan_xl with checkout= and pkl=)
    generator: dict[str, Any] = field(default_factory=lambda: {"name": "cvae"})
    head_module: str | None = None  # the final nn.Linear whose input is r; None: the model's last nn.Linear
    classes: list[int] | None = field(default_factory=lambda: [0, 1, 2, 3])  # class subset (None: all classes)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    psi: float = 0.7  # truncation toward the class mean
    fit: FitConfig = field(default_factory=FitConfig)
    min_pairs: int | None = None  # below it no map is fitted (NaN logged); None: 2 * d
    ref_set: RefSetConfig = field(default_factory=RefSetConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    cf: CounterfactualConfig = field(default_factory=CounterfactualConfig)
    batch_size: int = 256
    # central fraction of a generated image the classifier sees, then resized to its input size; None: the
    # generator's own (StyleGAN-XL 224/256 = the reference's Resize 256 + CenterCrop 224; cvae 1); 1: whole image
    crop: float | None = None

    def __post_init__(self):
        for name, cls in (("pairs", PairsConfig), ("fit", FitConfig), ("ref_set", RefSetConfig),
                          ("sweep", SweepConfig), ("cf", CounterfactualConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        self.generator = dict(self.generator or {"name": "cvae"})
        problems = []
        if not 0 <= self.psi <= 1:
            problems.append(f"psi={self.psi} (need 0 <= psi <= 1)")
        if self.fit.alpha < 0:
            problems.append(f"fit.alpha={self.fit.alpha} (need >= 0; 0 is OLS)")
        p = self.pairs
        n_per_class = 1 if p.n_per_class is None else p.n_per_class
        if n_per_class < 1 or p.heldout_per_class < 1 or p.draw_factor < 1:
            problems.append(f"pairs: n_per_class={p.n_per_class}, heldout_per_class={p.heldout_per_class}, "
                            f"draw_factor={p.draw_factor} (need >= 1)")
        s = self.sweep
        if s.n_steps < 2 or s.units_per_epoch < 0 or s.samples < 1:
            problems.append(f"sweep: n_steps={s.n_steps} (>= 2), units_per_epoch={s.units_per_epoch} (>= 0), "
                            f"samples={s.samples} (>= 1)")
        bad = [m for m in s.measures if m not in lk.PART_MEASURES]
        if bad:
            problems.append(f"sweep.measures={bad} (choose from {list(lk.PART_MEASURES)})")
        if self.cf.max_steps < 0 or self.cf.lr <= 0:
            problems.append(f"cf: max_steps={self.cf.max_steps} (>= 0), lr={self.cf.lr} (> 0)")
        if any(len(pair) != 2 for pair in self.cf.pairs):
            problems.append(f"cf.pairs={self.cf.pairs} (a list of [origin, target] class pairs)")
        if self.crop is not None and not 0 < self.crop <= 1:
            problems.append(f"crop={self.crop} (the central fraction of a generated image: 0 < crop <= 1, or null)")
        if self.ref_set.samples_per_class < 2:
            problems.append(f"ref_set.samples_per_class={self.ref_set.samples_per_class} (need >= 2)")
        if problems:
            raise ConfigError("analysis.linking: " + "; ".join(problems))


@dataclass
class LinkingResult(Result):
    """One analysed epoch. ``details``: the fitted map (``lmap``), the classes, keep rates and seeds, and the
    tables behind the unit and counterfactual values (``ranges``, ``changes``, ``summary``, ``selective``,
    ``cf``) with the images of the figures (``sweep_images``, ``cf_strips``)."""

    name: ClassVar[str] = "linking"
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_frame(self):
        """The counterfactuals, one row per (origin, target) pair (empty without a fitted map)."""
        return self.details.get("cf", pd.DataFrame())


@register
class Linking(Analysis):
    """Linear map from the classifier's penultimate features to a generator's latent, with unit sweeps and
    counterfactuals (spec §3-§5, §8)."""

    name = "linking"
    Config = LinkingConfig
    headline = ("r2_heldout", "rank", "mse_train")
    constants = ("min_pairs", "n_per_class")
    hydra_defaults: ClassVar[dict[str, str]] = {"generator": "${generator}"}

    def __init__(self, config: LinkingConfig | None = None, **params: Any):
        super().__init__(config, **params)
        self._gen = None
        self._last: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _data_config(data: Data) -> dict[str, Any]:
        keys = ("name", "image_size", "channels", "num_classes", "seed", "n_train")
        missing = [k for k in keys if not hasattr(data, k)]
        if missing:
            raise ConfigError(f"linking finds (or trains) its generator for the classifier's data config: give "
                              f"data= a featurelens ImageDataModule (this data has no {missing})")
        return {k: getattr(data, k) for k in keys}

    def prepare(self, data: Data) -> None:
        """Train and cache the default cVAE now if it is not cached yet, so no rank trains it inside a callback."""
        from featurelens.models.generators.store import ensure_cached

        ensure_cached(dict(self.config.generator), self._data_config(data))

    def generator(self, data: Data, device: torch.device):
        """The frozen generator (loaded once; a cVAE not yet cached is trained for this data config)."""
        if self._gen is None:
            from featurelens.models.generators.store import load_generator

            self._gen = load_generator(dict(self.config.generator), self._data_config(data), device)
        return self._gen

    def _classes(self, gen) -> list[int]:
        given = self.config.classes
        classes = list(range(gen.num_classes)) if given is None else [int(c) for c in given]
        if not classes or any(not 0 <= c < gen.num_classes for c in classes) or len(set(classes)) != len(classes):
            raise ConfigError(f"analysis.linking.classes={given}: distinct classes in 0..{gen.num_classes - 1}")
        return classes

    def _pair_counts(self, d: int, classes: list[int]) -> tuple[int, int, int, int]:
        """``(min_pairs, n_per_class, seed_base, heldout_base)``: null settings derived from the head width ``d``
        and the classes. min_pairs = 2 d; n_per_class = max(500, 1.25 min_pairs / #classes), so a map is fitted
        even when a few classes stop at the draw cap (ResNet-50, 4 classes: 1,280 per class); held-out seeds
        start right after the last training seed, disjoint for any class ids (ImageNet's up to 999)."""
        p = self.config.pairs
        min_pairs = self.config.min_pairs if self.config.min_pairs is not None else 2 * d
        n_per_class = p.n_per_class or max(500, math.ceil(1.25 * min_pairs / len(classes)))
        train_seeds = self._seed_range(p.seed_base, n_per_class, classes)
        heldout_base = train_seeds[1] if p.heldout_base is None else p.heldout_base
        held_seeds = self._seed_range(heldout_base, p.heldout_per_class, classes)
        if train_seeds[0] < held_seeds[1] and held_seeds[0] < train_seeds[1]:
            raise ConfigError(f"analysis.linking.pairs: held-out seeds {held_seeds} overlap the training seeds "
                              f"{train_seeds}; move heldout_base (null: right after the training seeds)")
        return min_pairs, n_per_class, p.seed_base, heldout_base

    def _view(self, data: Data, gen, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """Generated images -> the classifier's input: the central ``crop`` of each image (default: the
        generator's ``classifier_crop``; StyleGAN-XL 224/256, the reference's Resize 256 + CenterCrop 224),
        then the model's own preprocessing (resize to its input size, its normalisation)."""
        crop = self.config.crop if self.config.crop is not None else float(getattr(gen, "classifier_crop", 1.0))
        prep = model_input(data, device)
        return prep if crop == 1 else (lambda x: prep(lk.centre_crop(x, crop)))

    def _seed_range(self, base: int, n_per_class: int, classes: list[int]) -> tuple[int, int]:
        """[first, last) seed that build_pairs may use (seed = base + class * max_draws + k)."""
        stride = math.ceil(self.config.pairs.draw_factor * n_per_class)
        return base, base + (max(classes) + 1) * stride

    # ------------------------------------------------------------------ analysis
    def run(self, model: nn.Module, data: Data, *, epoch: int = 0, shard: tuple[int, int] = (0, 1),
            final: bool = True) -> LinkingResult:
        device = model_device(model)
        gen = self.generator(data, device)
        classes = self._classes(gen)
        try:
            E = lk.FeatureExtractor(model, self.config.head_module, self._view(data, gen, device))
            E(gen.synthesize(gen.sample_w(1, classes[0], self.config.psi, seed=0)))  # is the head the final layer?
        except ValueError as e:
            raise ConfigError(f"analysis.linking.head_module: {e}") from None
        p = self.config.pairs
        d, m = E.weight.shape[1], gen.w_dim
        min_pairs, n_per_class, seed_base, heldout_base = self._pair_counts(d, classes)
        train = lk.build_pairs(gen, E, None, classes, n_per_class, p.draw_factor, seed_base, self.config.psi,
                               batch_size=self.config.batch_size)
        values: dict[str, Any] = {"n_pairs": len(train), "keep_rate": float(train.keep_rate.mean()),
                                  "keep_rates": dict(zip(map(str, classes), train.keep_rate.tolist(), strict=True)),
                                  "min_pairs": min_pairs, "n_per_class": n_per_class}
        self._last = {"epoch": epoch, "classes": classes, "keep_rates": train.keep_rate.tolist(),
                      "layer": E.head_name,
                      "seed_base": seed_base, "heldout_base": heldout_base,
                      "n_draws": train.n_draws.tolist()}
        if len(train) < min_pairs:
            warnings.warn(f"linking: epoch {epoch}: {len(train)} kept pairs < min_pairs={min_pairs} "
                          "(keep rate near chance); no map fitted, NaN logged", stacklevel=2)
            values.update({k: math.nan for k in ("r2_heldout", "r2_pooled", "mse_train", "mse_heldout", "cycle_top1",
                                                 "w_cos")})
            return LinkingResult(epoch, values, dict(self._last))
        stats = lk.LinkingStats(d, m, sync_on_compute=False)  # rank 0 runs linking alone (not sharded)
        stats.update(train.r.double(), train.w.double())
        lmap = stats.solve(self.config.fit.alpha)
        values["mse_train"] = stats.train_scores(lmap)["mse"]
        values["rank"] = int(lmap.rank) if lmap.rank is not None else d
        held = lk.build_pairs(gen, E, None, classes, p.heldout_per_class, p.draw_factor, heldout_base,
                              self.config.psi, batch_size=self.config.batch_size)
        if len(held):
            scores = lk.evaluate_map(lmap, held.r.double(), held.w.double())
            values.update(r2_heldout=scores["r2_mean"], r2_pooled=scores["r2_pooled"], mse_heldout=scores["mse"])
            values.update(self._cycle(gen, E, lmap, held))
            if self.config.fit.mlp:
                mlp = lk.fit_mlp_baseline(train.r.double(), train.w.double())
                with torch.no_grad():
                    values["mlp_r2"] = lk.r2_scores(held.w.double(), mlp(held.r.double()))[0]
        self._last.update(lmap=lmap, rank=values["rank"])
        values.update(self._units(gen, E, lmap, classes, d))
        values.update(self._counterfactuals(gen, E, lmap, classes, held))
        return LinkingResult(epoch, values, dict(self._last))

    def _synth_encode(self, gen, E, lmap, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """r -> L -> G -> E: (images, r', logits)."""
        with torch.no_grad():
            images = gen.synthesize(lmap(r.double().cpu()))  # generators cast w to their device and dtype
            r2, logits = E(images)
        return images, r2, logits

    def _cycle(self, gen, E, lmap, held) -> dict[str, float]:
        _, r_c, logits_c = self._synth_encode(gen, E, lmap, held.r)
        # held-out pairs passed the keep filter, so argmax E(x) is their label: no second forward pass needed
        with torch.no_grad():
            w_c = lmap(r_c.double().cpu())
        r, rc = held.r.double().cpu(), r_c.double().cpu()
        return {"cycle_top1": float((logits_c.argmax(1).cpu() == held.labels).double().mean()),
                "w_cos": float(torch.nn.functional.cosine_similarity(held.w.double().cpu(), w_c.cpu(), dim=1).mean()),
                "r_cycle_corr_unit": _median_corr(r, rc, dim=0), "r_cycle_corr_sample": _median_corr(r, rc, dim=1)}

    def _units(self, gen, E, lmap, classes, d) -> dict[str, Any]:
        """§4: reference set, activation ranges, sweeps of a fixed random unit subset, selectivity."""
        n = self.config.ref_set.samples_per_class
        w_ref = torch.cat([gen.sample_w(n, c, self.config.psi, self.config.ref_set.seed + 1000 * c) for c in classes])
        with torch.no_grad():
            r_ref, _ = E(gen.synthesize(w_ref))
        r_ref = r_ref.double().cpu()
        labels = torch.tensor(classes).repeat_interleave(n)
        mins, maxs, dead = lk.activation_ranges(r_ref)
        units = torch.randperm(d, generator=torch.Generator().manual_seed(self.config.sweep.seed))
        units = units[: self.config.sweep.units_per_epoch].sort().values.tolist()
        spread = torch.linspace(0, len(r_ref) - 1, self.config.sweep.samples).round().long()
        changes, images = lk.sweep_units(gen, lmap, E, None, r_ref[spread], labels[spread], units, mins, maxs,
                                         r_ref.std(0), n_steps=self.config.sweep.n_steps, keep_images=units)
        summary = lk.summarise_units(changes)
        has_parts = any("/" in c for c in changes.columns)
        selective = lk.selectivity(summary, PART_NAMES, self.config.sweep.measures) if has_parts and len(summary) > 2 \
            else pd.DataFrame(columns=["unit", "part", "measure", "z", "value"])
        self._last.update(ranges=pd.DataFrame({"unit": range(d), "min": mins.numpy(), "max": maxs.numpy(),
                                               "dead": dead.numpy()}),
                          changes=changes, summary=summary, selective=selective, sweep_images=images)
        leak = changes["leakage"].dropna() if "leakage" in changes else pd.Series(dtype=float)
        return {"units/n_dead": int(dead.sum()), "units/n_swept": int(summary.shape[0]),
                "units/fidelity_rate": lk.fidelity_rate(summary) if len(summary) else math.nan,
                "units/n_selective": int(selective["unit"].nunique()),
                "units/leakage_median": float(leak.median()) if len(leak) else math.nan}

    def _counterfactuals(self, gen, E, lmap, classes, held) -> dict[str, Any]:
        """§5 on one correctly classified held-out sample per origin class and every configured pair."""
        pairs = ([tuple(int(c) for c in pair) for pair in self.config.cf.pairs]
                 or list(itertools.permutations(classes, 2)))
        rows, strips = [], []
        for o, t in tqdm(pairs, desc="linking: counterfactuals", leave=False, disable=len(pairs) < 4):
            idx = (held.labels == o).nonzero().flatten() if len(held) else torch.zeros(0)
            if not len(idx):
                continue
            r = held.r[int(idx[0])].double()

            def check(r_prime: torch.Tensor) -> torch.Tensor:
                return self._synth_encode(gen, E, lmap, r_prime)[2]

            res = lk.counterfactual(r, o, t, E.weight.double(), E.bias.double(), lmap, check, lr=self.config.cf.lr,
                                    w_origin=self.config.cf.w_origin, w_identity=self.config.cf.w_identity,
                                    max_steps=self.config.cf.max_steps, seed=self.config.cf.seed)
            top = torch.argsort(res.s.abs(), descending=True)[:10].tolist()
            rows.append({"origin": o, "target": t, "success": res.success, "steps": res.steps,
                         "shift_l1": res.shift_l1, "frac_clipped": res.frac_clipped, "p_target": float(res.p_t[-1])
                         if len(res.p_t) else math.nan, "top10_units": ";".join(map(str, top))})
            if len(strips) < 4:
                path = torch.stack([torch.relu(r - a * res.s) for a in torch.linspace(0, 1, 5, dtype=torch.float64)])
                strips.append((o, t, res.success, self._synth_encode(gen, E, lmap, path)[0].cpu()))
        table = pd.DataFrame(rows)
        self._last.update(cf=table, cf_strips=strips)
        if table.empty:
            return {"cf/success_rate": math.nan}
        ok = table[table.success]
        return {"cf/n_pairs": len(table), "cf/success_rate": float(table.success.mean()),
                "cf/steps_median": float(ok.steps.median()) if len(ok) else math.nan,
                "cf/shift_l1_mean": float(table.shift_l1.mean()),
                "cf/frac_clipped_mean": float(table.frac_clipped.mean())}

    def report(self, result: Result, out_dir, *, final: bool = True, history: list[dict] | None = None):
        from featurelens.analysis.linking.report import report

        return report(result, out_dir, self.config)

    @staticmethod
    def tables(jobs, grouped_by, out: Path) -> list[Path]:
        from featurelens.analysis.linking.report import tables

        return tables(jobs, grouped_by, out)


def _median_corr(a: torch.Tensor, b: torch.Tensor, dim: int) -> float:
    """Median Pearson correlation between matching columns (dim=0: per unit) or rows (dim=1: per sample)."""
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    den = (a.norm(dim=dim) * b.norm(dim=dim))
    corr = (a * b).sum(dim) / den
    corr = corr[den > 0]
    return float(corr.median()) if corr.numel() else math.nan
