"""What the chirality analysis writes: per-epoch tables and figures (the trajectory figures read the run's
history of records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featurelens import plots
from featurelens.analysis.base import Report
from featurelens.analysis.chirality import measure as chi


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
        rep.figures["chirality_vs_epoch"] = _trajectory(history, layers, out_dir)
        rep.figures["rho_hist_first_last"] = _histograms(history, layers, edges, out_dir)
        rep.figures["c_norm_by_layer"] = _layer_profile(history, layers, config.hist_every, out_dir)
    if final and result.conv1 is not None:
        rep.figures["conv1_by_rho"] = _conv1(*result.conv1, config.eps, out_dir)
    return rep


def _trajectory(history: list[dict], layers: list[str], out_dir: Path) -> Path:
    epochs = [r["epoch"] for r in history]
    series = {"model (mean of layers)": [r.get("chirality/model") for r in history],
              **{n: [r.get(f"chirality/layer/{n}/c") for r in history] for n in layers}}
    return plots.line_plot(epochs, series, out_dir / "chirality_vs_epoch.png", xlabel="epoch",
                           ylabel="kernel chirality C (mean over slices)", title="Feature chirality per layer",
                           legend_cols=2)


def _histograms(history: list[dict], layers: list[str], edges: np.ndarray, out_dir: Path) -> Path:
    first, last = history[0], history[-1]
    hists = {n: {f"epoch {first['epoch']}": first[f"chirality/hist/{n}"],
                 **({f"epoch {last['epoch']}": last[f"chirality/hist/{n}"]} if last is not first else {})}
             for n in layers if f"chirality/hist/{n}" in first}
    return plots.histogram_grid(edges, hists, out_dir / "rho_hist_first_last.png", xlabel="ρ = cos(w, Tw)",
                                title="Per-kernel ρ, first vs latest epoch")


def _layer_profile(history: list[dict], layers: list[str], hist_every: int, out_dir: Path) -> Path:
    hist_records = [r for r in history if r["epoch"] == 0 or r["epoch"] % hist_every == 0 or r is history[-1]]
    series = {f"epoch {r['epoch']}": [r.get(f"chirality/layer/{n}/c_norm") for n in layers] for r in hist_records}
    return plots.line_plot(list(range(len(layers))), series, out_dir / "c_norm_by_layer.png", xlabel="layer",
                           ylabel="C / c₀ (1 = random init)", hline=1.0, xticks=layers,
                           title="Chirality relative to the random-init baseline")


def _conv1(name: str, w: torch.Tensor, eps: float, out_dir: Path) -> Path:
    rho = chi.layer_stats(w, eps=eps, flips=("h",))["rho_filter"].nan_to_num(-2.0)  # dead filters last
    order = torch.argsort(rho, descending=True)[:64]
    labels = [f"{rho[i]:+.2f}" if rho[i] >= -1 else "zero" for i in order]
    return plots.filter_montage(w[order].numpy(), labels, out_dir / "conv1_by_rho.png",
                                title=f"{name} filters sorted by per-filter ρ (pooled over input channels)")
