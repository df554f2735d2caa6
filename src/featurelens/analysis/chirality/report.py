"""What the chirality analysis writes: per-epoch tables and figures (the trajectory figures read the run's
history of records), and the sweep tables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import f_oneway

from featurelens import plots
from featurelens.analysis.base import Report
from featurelens.analysis.chirality import measure as chi
from featurelens.tables import SweepJob, mean_sd, without_empty_setting


def report(result, out_dir: Path, config, *, final: bool, history: list[dict]) -> Report:
    """W&B-ready ρ histograms every epoch; at epoch 0, every ``hist_every``-th and the last (figures cost more
    than the measure itself): ``table_epoch<E>.csv`` and ``chirality_vs_epoch.png`` (C_ℓ per layer and C_model
    vs epoch), ``rho_hist_first_last.png`` (per-kernel ρ, first vs latest epoch), ``c_norm_by_layer.png`` (C_ℓ/c₀
    per layer, one curve per histogram epoch); at the last epoch ``conv1_by_rho.png`` (first-layer filters
    sorted by ρ)."""
    layers, epoch = result.layers, result.epoch
    rep = Report()
    if not layers:
        return rep
    edges = np.linspace(-1, 1, config.hist_bins + 1)
    rep.histograms = {f"rho_hist/{n}": (result.values[f"hist/{n}"], edges) for n in layers}
    out_dir.mkdir(parents=True, exist_ok=True)
    if epoch == 0 or epoch % config.hist_every == 0 or final:
        table = result.to_frame()
        path = out_dir / f"table_epoch{epoch}.csv"
        table.to_csv(path, index=False)
        split = table.to_dict("split")
        rep.tables["table"] = (split["columns"], split["data"])
        names = result.layer_names
        rep.figures["chirality_vs_epoch"] = _trajectory(history, layers, names, out_dir)
        rep.figures["rho_hist_first_last"] = _histograms(history, layers, names, edges, out_dir)
        rep.figures["c_norm_by_layer"] = _layer_profile(history, layers, names, config.hist_every, out_dir)
    if final and result.conv1 is not None:
        path, weight = result.conv1
        rep.figures["conv1_by_rho"] = _conv1(result.layer_names.get(path, path), weight, config.eps, out_dir)
    return rep


C0_3X3 = chi.c0_gaussian(3, 3)  # what random 3x3 kernels score (spec §5.3): the line to compare C with


def _trajectory(history: list[dict], layers: list[str], names: dict[str, str], out_dir: Path) -> Path:
    epochs = [r["epoch"] for r in history]
    series = {"model (mean of layers)": [r.get("chirality/model") for r in history],
              **{names.get(n, n): [r.get(f"chirality/layer/{n}/c") for r in history] for n in layers}}
    return plots.line_plot(epochs, series, out_dir / "chirality_vs_epoch.png", xlabel="epoch",
                           ylabel="kernel chirality C (mean over slices)", title="Feature chirality per layer",
                           legend_cols=2, hline={f"c₀ = {C0_3X3:.4f} (i.i.d. 3×3 kernels)": C0_3X3})


def _histograms(history: list[dict], layers: list[str], names: dict[str, str], edges: np.ndarray,
                out_dir: Path) -> Path:
    first, last = history[0], history[-1]
    hists = {names.get(n, n): {f"epoch {first['epoch']}": first[f"chirality/hist/{n}"],
                 **({f"epoch {last['epoch']}": last[f"chirality/hist/{n}"]} if last is not first else {})}
             for n in layers if f"chirality/hist/{n}" in first}
    return plots.histogram_grid(edges, hists, out_dir / "rho_hist_first_last.png", xlabel="ρ = cos(w, Tw)",
                                title="Per-kernel ρ, first vs latest epoch")


def _layer_profile(history: list[dict], layers: list[str], names: dict[str, str], hist_every: int,
                   out_dir: Path) -> Path:
    hist_records = [r for r in history if r["epoch"] == 0 or r["epoch"] % hist_every == 0 or r is history[-1]]
    series = {f"epoch {r['epoch']}": [r.get(f"chirality/layer/{n}/c_norm") for n in layers] for r in hist_records}
    return plots.line_plot(list(range(len(layers))), series, out_dir / "c_norm_by_layer.png", xlabel="layer",
                           ylabel="C / c₀ (1 = random init)", hline=1.0, xticks=[names.get(n, n) for n in layers],
                           title="Chirality relative to the random-init baseline")


def _conv1(name: str, w: torch.Tensor, eps: float, out_dir: Path) -> Path:
    rho = chi.layer_stats(w, eps=eps, flips=("h",))["rho_filter"].nan_to_num(-2.0)  # dead filters last
    order = torch.argsort(rho, descending=True)[:64]
    labels = [f"{rho[i]:+.2f}" if rho[i] >= -1 else "zero" for i in order]
    return plots.filter_montage(w[order].numpy(), labels, out_dir / "conv1_by_rho.png",
                                title=f"{name} filters sorted by per-filter ρ (pooled over input channels)")


SHOWN = ("init", "data.flip_aug")  # the overrides the table shows as its own init and flip_aug columns


def _frame(jobs: list[SweepJob]) -> pd.DataFrame:
    """One row per job and analysed epoch."""
    rows = []
    for job in jobs:
        for r in job.records:
            if r.get("chirality/model") is None:
                continue
            rows.append({**job.row(SHOWN), "init": job.config.init.method,
                         "flip_aug": bool(job.config.data.get("flip_aug")), "epoch": r["epoch"],
                         "C": r["chirality/model"], "C_pooled": r.get("chirality/model_pooled"),
                         "C_norm": r.get("chirality/model_norm"), "C_paramw": r.get("chirality/model_paramw"),
                         "val_acc": r.get("val/acc")})
    return pd.DataFrame(rows)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values."""
    order = np.argsort(pvalues)
    adjusted, running = np.empty(len(pvalues)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted.tolist()


def init_anova(final: pd.DataFrame) -> pd.DataFrame:
    """Spec §7: one-way ANOVA of final C_model over inits, per model, flip augmentation and swept setting (never
    pooled across them; needs >= 2 seeds per init)."""
    rows = []
    for (model, flip_aug, setting), g in final.groupby(["model", "flip_aug", "setting"]):
        groups = [s["C"].to_numpy() for _, s in g.groupby("init")]
        if len(groups) < 2 or min(len(x) for x in groups) < 2:
            continue
        res = f_oneway(*groups)
        grand = np.concatenate(groups).mean()
        ss_between = sum(len(x) * (x.mean() - grand) ** 2 for x in groups)
        ss_total = sum(((x - grand) ** 2).sum() for x in groups)
        means = [x.mean() for x in groups]
        s_w = np.sqrt(np.mean([x.var(ddof=1) for x in groups]))
        n = min(len(x) for x in groups)
        rows.append({"model": model, "flip_aug": flip_aug, "setting": setting, "F": res.statistic, "p": res.pvalue,
                     "eta2": ss_between / ss_total if ss_total > 0 else np.nan,
                     "range": max(means) - min(means), "range_limit": max(0.01, 4 * s_w / np.sqrt(n))})
    table = without_empty_setting(pd.DataFrame(rows))
    if not table.empty:
        table["p_holm"] = holm(table["p"].tolist())
        table["init_does_not_matter"] = (table["p_holm"] >= 0.05) & (table["range"] <= table["range_limit"])
    return table


def tables(jobs: list[SweepJob], grouped_by: Callable[..., str], out: Path) -> list[Path]:
    """``chirality_init.{csv,md}`` (C at init and after training per model × init × flip augmentation, mean ± sd
    over seeds, with val accuracy), ``chirality_init_anova.csv`` (spec §7: does the init matter?) and
    ``chirality_init_vs_epoch.png`` (C_model vs epoch, one line per init)."""
    frame = _frame(jobs)
    if frame.empty:
        return []
    name = "chirality_init"
    keys = ["model", "init", "flip_aug", "setting"]
    first = frame[frame.epoch == 0]
    last = frame.loc[frame.groupby("job").epoch.idxmax()]
    rows = []
    for key, g in last.groupby(keys):
        g0 = first.set_index(keys).loc[[key]] if key in first.set_index(keys).index else pd.DataFrame()
        rows.append({**dict(zip(keys, key, strict=True)), "n_seeds": g.seed.nunique(),
                     "epochs": int(g.epoch.max()),
                     "C_init_mean": g0["C"].mean() if len(g0) else np.nan,
                     "C_init_sd": g0["C"].std(ddof=1) if len(g0) > 1 else np.nan,
                     "C_final_mean": g["C"].mean(), "C_final_sd": g["C"].std(ddof=1) if len(g) > 1 else np.nan,
                     "C_pooled_final": g["C_pooled"].mean(), "C_norm_final": g["C_norm"].mean(),
                     "val_acc_final": g["val_acc"].mean(),
                     "C_init": mean_sd(g0["C"]) if len(g0) else "–", "C_final": mean_sd(g["C"]),
                     "val_acc": mean_sd(g["val_acc"])})
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.csv", out / f"{name}.md"]
    table = without_empty_setting(table)
    table.drop(columns=["C_init", "C_final", "val_acc"]).to_csv(written[0], index=False)
    shown = [k for k in keys if k in table]
    md = ["# Feature chirality at init and after training (mean ± sd over seeds)", "",
          grouped_by(["model", "init", "flip_aug"], SHOWN), "",
          table[[*shown, "n_seeds", "epochs", "C_init", "C_final", "C_pooled_final", "C_norm_final", "val_acc"]]
          .to_markdown(index=False, floatfmt=".4f")]
    anova = init_anova(last)
    if not anova.empty:
        md += ["", "## Does the init matter after training? (one-way ANOVA over inits, Holm over models)", "",
               anova.to_markdown(index=False, floatfmt=".4g")]
        anova.to_csv(out / f"{name}_anova.csv", index=False)
        written.append(out / f"{name}_anova.csv")
    written[1].write_text("\n".join(md) + "\n")
    written.append(_figure(frame, out / f"{name}_vs_epoch.png"))
    return written


def _figure(frame: pd.DataFrame, path: Path) -> Path:
    """C_model vs epoch, mean ± sd over seeds, one line per init; models side by side in one figure each."""
    series, bands = {}, {}
    epochs = sorted(frame.epoch.unique())
    for (model, init, setting), g in frame.groupby(["model", "init", "setting"]):
        stats = g.groupby("epoch")["C"].agg(["mean", "std"]).reindex(epochs)
        label = f"{model} / {init}" if frame.model.nunique() > 1 else init
        label += f" ({setting})" if setting else ""
        series[label], bands[label] = stats["mean"].to_numpy(), stats["std"].fillna(0).to_numpy()
    return plots.line_plot(epochs, series, path, xlabel="epoch", ylabel="C_model (kernel chirality)",
                           title="Feature chirality during training, one line per init", bands=bands,
                           hline={f"c₀ = {C0_3X3:.4f} (i.i.d. 3×3 kernels)": C0_3X3})
