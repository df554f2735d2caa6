"""What the class-filters analysis writes: per-epoch files and figures, and the sweep tables."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from featurelens import plots
from featurelens.analysis.base import Report
from featurelens.tables import SweepJob, final_frame, mean_sd, without_empty_setting


def report(result, out_dir: Path, config, *, final: bool = True) -> Report:
    """``table_epoch<E>.csv`` (one row per class) and ``sets_epoch<E>.json`` every epoch; at epoch 0, every
    ``figures_every``-th and the last: ``selection_mask.png`` (class × feature), ``classes_per_feature.png`` and
    ``acc_vs_k.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    v, epoch = result.values, result.epoch
    table = result.to_frame()
    table.to_csv(out_dir / f"table_epoch{epoch}.csv", index=False)
    (out_dir / f"sets_epoch{epoch}.json").write_text(json.dumps(v["sets"]))
    split = table.to_dict("split")  # plain Python values, for any logger
    rep = Report(tables={"table": (split["columns"], split["data"])})
    if not (epoch == 0 or epoch % config.figures_every == 0 or final):
        return rep
    mask = result.mask.numpy()
    used = np.flatnonzero(mask.any(0))  # at D = 2048 the unselected columns would hide the selected ones
    rep.figures["selection_mask"] = plots.heatmap(
        mask[:, used], out_dir / "selection_mask.png", ylabel="class", yticks=result.class_names or None,
        xlabel=f"the {len(used)} features of D = {mask.shape[1]} that some class selects (in feature order)",
        title=f"Selected features S_c (k = {v['k']}, head {v['head']})")
    rep.figures["classes_per_feature"] = plots.bar_plot(
        np.arange(mask.shape[1]), mask.sum(0), out_dir / "classes_per_feature.png", xlabel="feature",
        ylabel="classes selecting it", title="How many classes use each feature")
    ks = sorted(int(key.split("/")[0][1:]) for key in v if key.startswith("k") and key.endswith("/acc_decomposed"))
    rep.figures["acc_vs_k"] = plots.line_plot(
        ks, {"decomposed head": [v[f"k{K}/acc_decomposed"] for K in ks]}, out_dir / "acc_vs_k.png",
        xlabel="k (features per class)", ylabel="accuracy",
        hline={"full head": v["acc_full"], "chance": 1 / v["num_classes"]}, title="Decomposed-head accuracy vs k")
    return rep


def tables(jobs: list[SweepJob], grouped_by: Callable[..., str], out: Path) -> list[Path]:
    """The sweep tables from the jobs' final records (see ``featurelens.tables``):
    ``class_filters_k.{csv,md}`` (decomposed accuracy per k with the full head's, mean ± sd over seeds, plus the
    sets' statistics at the default k), ``class_filters_acc_vs_k.png`` and ``class_filters_depth.{csv,md}``
    (features per class against depth, with the Spearman correlation of both readings of "proportional")."""
    frame = final_frame(jobs, "class_filters")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    k_cols = sorted((c for c in frame.columns if c.startswith("k") and c.endswith("/acc_decomposed")),
                    key=lambda c: int(c.split("/")[0][1:]))
    rows = []
    for (model, setting), g in frame.groupby(["model", "setting"]):
        for col in k_cols:
            if g[col].notna().any():
                rows.append({"model": model, "setting": setting, "D": int(g["dim"].iloc[0]),
                             "k": int(col.split("/")[0][1:]),
                             "n_seeds": g.seed.nunique(), "acc_full": mean_sd(g["acc_full"]),
                             "acc_decomposed": mean_sd(g[col]),
                             "acc_decomposed_mean": g[col].mean(), "acc_full_mean": g["acc_full"].mean()})
    k_table = pd.DataFrame(rows)
    default_cols = ["k", "union", "overlap_mean", "jaccard_mean", "mi_incl_self", "mi_excl_self", "mac_reduction",
                    "mass_topk", "noise/acc_at_S", "noise/acc_at_rest", "stability"]
    groups = ["model", "setting"]
    at_default = without_empty_setting(frame.groupby(groups)[[c for c in default_cols if c in frame]].mean()
                                        .reset_index())
    series = {f"{m} ({st})" if st else m: g.sort_values("k")["acc_decomposed_mean"].to_numpy()
              for (m, st), g in k_table.groupby(groups)}
    xs = sorted(k_table.k.unique())
    same_ks = k_table.groupby(groups).k.apply(list).map(lambda ks: ks == xs).all()
    k_table = without_empty_setting(k_table)
    shown = [c for c in ("model", "setting") if c in k_table]
    k_table.drop(columns=["acc_full", "acc_decomposed"]).to_csv(out / "class_filters_k.csv", index=False)
    (out / "class_filters_k.md").write_text("\n".join([
        "# Decomposed final layer: accuracy per k (mean ± sd over seeds; no retraining)", "",
        grouped_by(["model"]), "",
        k_table[[*shown, "D", "k", "n_seeds", "acc_full", "acc_decomposed"]].to_markdown(index=False), "",
        "## Sets at the default k (means over seeds)", "",
        at_default.to_markdown(index=False, floatfmt=".4g"), ""]))
    written += [out / "class_filters_k.csv", out / "class_filters_k.md"]
    if len(series) == 1 or same_ks:
        refs = {"full head": k_table["acc_full_mean"].mean()} if len(series) == 1 else {}
        if "num_classes" in frame and frame["num_classes"].notna().any():
            refs["chance"] = 1 / frame["num_classes"].max()
        written.append(plots.line_plot(xs, series, out / "class_filters_acc_vs_k.png", xlabel="k (features per class)",
                                       ylabel="accuracy, decomposed head", title="Decomposed head vs k", hline=refs))

    depth_cols = ["dim", "depth", "features_per_class", "set_size_mean", "psi/penultimate", "acc_full",
                  "acc_decomposed", "union", "overlap_mean"]
    depth = without_empty_setting(frame.groupby(groups)[[c for c in depth_cols if c in frame]].mean().reset_index())
    depth["features_per_class_over_D"] = depth["features_per_class"] / depth["dim"]
    depth = depth.sort_values("depth")
    lines = ["# Features per class against depth (final epoch, mean over seeds)", "", grouped_by(["model"]), "",
             depth.to_markdown(index=False, floatfmt=".4g"), ""]
    if depth["depth"].nunique() >= 3:
        for col, reading in (("features_per_class", "absolute count K(0.5)"),
                             ("features_per_class_over_D", "share of the layer K(0.5)/D")):
            rho = spearmanr(depth["depth"], depth[col]).statistic
            lines.append(f"- Spearman(depth, {reading}) = {rho:.3f} over {len(depth)} models")
    else:
        lines.append("- fewer than 3 depths: no correlation reported")
    depth.to_csv(out / "class_filters_depth.csv", index=False)
    (out / "class_filters_depth.md").write_text("\n".join(lines) + "\n")
    return [*written, out / "class_filters_depth.csv", out / "class_filters_depth.md"]
