"""scripts/make_tables.py on hand-made job directories: rows are grouped by every swept setting (issue 12 item 4)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT

spec = importlib.util.spec_from_file_location("make_tables", ROOT / "scripts/make_tables.py")
make_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_tables)


def _job(root: Path, name: str, model: str, init: str, seed: int, acc: float, extra: tuple[str, ...] = (),
         metrics: dict | None = None, data: dict | None = None) -> Path:
    """A finished job: composed config, overrides, metrics and one class-filters and chirality record."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    method = {"kaiming": "kaiming_normal", "xavier": "xavier_normal"}[init]
    config = {"seed": seed, "model": {"arch": model}, "init": {"method": method},
              "data": {"name": "shapes", "flip_aug": True, **(data or {})}}
    (job / ".hydra/config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"model={model}", f"init={init}", f"seed={seed}", "logger=csv", *extra]
    (job / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.json").write_text(json.dumps(metrics or {}))
    p = "class_filters/"
    records = {"class_filters": {"epoch": 3, p + "dim": 8, p + "acc_full": acc, p + "k5/acc_decomposed": acc / 2,
                                 p + "k8/acc_decomposed": acc, p + "depth": 5, p + "features_per_class": 2.0,
                                 p + "set_size_mean": 3.0, p + "union": 8},
               "chirality": {"epoch": 3, "chirality/model": 0.5 + acc / 10, "val/acc": acc}}
    for analysis, record in records.items():
        (job / f"analysis/{analysis}").mkdir(parents=True)
        (job / f"analysis/{analysis}/results.jsonl").write_text(json.dumps(record) + "\n")
    return job


@pytest.fixture
def grid(tmp_path) -> Path:
    """2 models x 2 inits x 2 seeds, one job per cell and seed, with accuracies known in advance."""
    sweep = tmp_path / "sweep"
    i = 0
    for model in ("vgg16", "resnet50"):
        for init, acc in (("kaiming", 0.8), ("xavier", 0.4)):
            for seed in (0, 1):
                _job(sweep, str(i), model, init, seed, acc + 0.01 * seed)
                i += 1
    return sweep


def test_the_settings_are_the_overrides_that_differ_except_seed_model_and_data(grid):
    jobs, failed = make_tables.find_jobs([grid])
    settings = make_tables.Settings(jobs)
    assert not failed and settings.swept == ["init"]  # logger=csv is the same everywhere; seed is averaged
    assert {settings.job(j, "chirality").setting() for j in jobs} == {"init=kaiming", "init=xavier"}
    assert settings.job(jobs[0], "chirality").setting(shown=("init",)) == ""


def test_a_2_init_x_2_model_grid_keeps_the_inits_apart(grid, tmp_path):
    out = tmp_path / "tables"
    assert make_tables.main([str(grid), "--out", str(out)]) == 0
    k = pd.read_csv(out / "class_filters_k.csv")
    k5 = k[k.k == 5].sort_values(["model", "setting"])
    assert list(zip(k5.model, k5.setting, strict=True)) == [("resnet50", "init=kaiming"), ("resnet50", "init=xavier"),
                                                            ("vgg16", "init=kaiming"), ("vgg16", "init=xavier")]
    assert (k5.n_seeds == 2).all()  # each cell averages its own two seeds, not the other init's
    assert k5.acc_full_mean.tolist() == pytest.approx([0.805, 0.405, 0.805, 0.405])
    assert k5.acc_decomposed_mean.tolist() == pytest.approx([0.4025, 0.2025, 0.4025, 0.2025])
    md = (out / "class_filters_k.md").read_text()
    assert "Rows grouped by model and the swept setting (init); seeds averaged." in md
    chir = pd.read_csv(out / "chirality_init.csv")  # init is its own column there: no setting column
    assert "setting" not in chir and sorted(chir.init) == ["kaiming_normal"] * 2 + ["xavier_normal"] * 2
    assert (chir.n_seeds == 2).all()


def test_another_swept_key_is_a_setting_and_missing_values_show_a_dash(tmp_path):
    sweep = tmp_path / "sweep"
    for i, lr in enumerate(("0.1", "0.01")):
        for seed in (0, 1):
            _job(sweep, f"{i}{seed}", "vgg16", "kaiming", seed, 0.5 + i / 10, extra=(f"optimizer.lr={lr}",))
    _job(sweep, "plain", "vgg16", "kaiming", 0, 0.3)  # from another sweep: no optimizer.lr override
    settings = make_tables.Settings(make_tables.find_jobs([sweep])[0])
    assert settings.swept == ["optimizer.lr"]
    out = tmp_path / "tables"
    assert make_tables.main([str(sweep), "--out", str(out)]) == 0
    k = pd.read_csv(out / "class_filters_k.csv")
    assert sorted(k[k.k == 5].setting) == ["optimizer.lr=0.01", "optimizer.lr=0.1", "optimizer.lr=–"]
    assert dict(zip(k[k.k == 5].setting, k[k.k == 5].n_seeds, strict=True))["optimizer.lr=–"] == 1


def test_the_init_anova_runs_per_model_and_flip_setting(grid, tmp_path):
    out = tmp_path / "tables"
    assert make_tables.main([str(grid), "--out", str(out)]) == 0
    anova = pd.read_csv(out / "chirality_init_anova.csv")
    assert sorted(anova.model) == ["resnet50", "vgg16"] and anova.flip_aug.all()
    # C = 0.5 + acc/10: 0.58/0.581 (kaiming) vs 0.54/0.541 (xavier), so the init clearly matters here
    assert (anova.p < 1e-3).all() and not anova.init_does_not_matter.any()
    assert anova.range.tolist() == pytest.approx([0.04, 0.04])


def test_jobs_whose_model_stayed_at_chance_are_left_out_and_named(tmp_path, capsys):
    """10 classes, 1,000 val images: 0.85 is trained; 0.11 is within chance (binomial p ~ 0.16), 0.14 is not."""
    sweep = tmp_path / "sweep"
    data = {"num_classes": 10, "n_val": 1000}
    for i, (model, init, best) in enumerate((("vgg16", "kaiming", 0.85), ("vgg16", "xavier", 0.11),
                                             ("resnet50", "kaiming", 0.14))):
        _job(sweep, str(i), model, init, seed=0, acc=best, metrics={"val/acc_best": best}, data=data)
    jobs, _ = make_tables.find_jobs([sweep])
    assert [make_tables.at_chance(j) is None for j in jobs] == [True, False, True]
    assert "best val acc 0.110 with 10 classes on 1000 images" in make_tables.at_chance(jobs[1])
    out = tmp_path / "tables"
    assert make_tables.main([str(sweep), "--out", str(out)]) == 0
    assert "skipping not trained: best val acc 0.110" in capsys.readouterr().err
    assert sorted(pd.read_csv(out / "class_filters_k.csv").acc_full_mean.round(3).unique()) == [0.14, 0.85]
    assert make_tables.main([str(sweep), "--out", str(out), "--keep-untrained"]) == 0
    assert 0.11 in pd.read_csv(out / "class_filters_k.csv").acc_full_mean.round(3).tolist()


def test_specialization_dissection_and_linking_tables_keep_the_inits_apart(grid, tmp_path):
    """The grid's jobs get hand-made records of the other three analyses, each a known function of the init and
    seed: every table has one row per model × init cell averaging its two seeds."""
    for job in sorted(grid.iterdir()):
        cfg = yaml.safe_load((job / ".hydra/config.yaml").read_text())
        cfg["analysis"] = {"linking": {"head_module": None}}
        (job / ".hydra/config.yaml").write_text(yaml.safe_dump(cfg))
        x = (1.0 if cfg["init"]["method"] == "kaiming_normal" else 2.0) + cfg["seed"]  # 1, 2 | 2, 3
        records = {
            "specialization": [{"epoch": 0, "specialization/weights/ncut": 10 * x},
                               {"epoch": 3, "specialization/weights/ncut": x,
                                "specialization/weights/ncut_z": -x, "specialization/weights/ncut_percentile": 0.0}],
            "dissection": [{"epoch": e, "dissection/layer4/unique_detectors": x + e,
                            "dissection/layer4/unique_detectors_percat": x, "dissection/layer4/detectors": 2 * x,
                            "dissection/layer4/mean_score": 0.1} for e in (0, 3)],
            "linking": [{"epoch": 3, "linking/keep_rate": x / 10, "linking/r2_heldout": 0.5}]}
        for analysis, recs in records.items():
            (job / f"analysis/{analysis}").mkdir()
            (job / f"analysis/{analysis}/results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "tables"
    assert make_tables.main([str(grid), "--out", str(out)]) == 0
    cells = [("resnet50", "init=kaiming"), ("resnet50", "init=xavier"), ("vgg16", "init=kaiming"),
             ("vgg16", "init=xavier")]

    spec = pd.read_csv(out / "specialization.csv").sort_values(["model", "setting", "state"])
    assert list(zip(spec.model, spec.setting, spec.state, strict=True)) == [
        (m, s, state) for m, s in cells for state in ("init", "trained")]
    assert (spec.n_seeds == 2).all()
    assert spec.ncut.tolist() == ["15.0000 ± 7.0711", "1.5000 ± 0.7071", "25.0000 ± 7.0711", "2.5000 ± 0.7071"] * 2
    assert spec.ncut_z.dropna().tolist() == pytest.approx([-1.5, -2.5] * 2)

    layers = pd.read_csv(out / "dissection_layers.csv").sort_values(["model", "setting"])
    assert list(zip(layers.model, layers.setting, strict=True)) == cells and set(layers.layer) == {"layer4"}
    assert layers.unique_A.tolist() == ["4.5 ± 0.7", "5.5 ± 0.7"] * 2  # the last epoch: x + 3
    epochs = pd.read_csv(out / "dissection_epochs.csv").sort_values(["model", "setting", "epoch"])
    assert epochs.unique_A.tolist() == pytest.approx([1.5, 4.5, 2.5, 5.5] * 2)
    assert "Rows grouped by model, data, layer and the swept setting (init)" in (
        out / "dissection_layers.md").read_text()

    link = pd.read_csv(out / "linking.csv").sort_values(["model", "setting"])
    assert list(zip(link.model, link.setting, strict=True)) == cells and (link.n_seeds == 2).all()
    assert link.keep_rate.tolist() == ["0.1500 ± 0.0707", "0.2500 ± 0.0707"] * 2
    assert set(link.layer) == {"input of last Linear"}
