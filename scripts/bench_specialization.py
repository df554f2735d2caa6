"""Benchmark of the local-specialization analysis: weight-graph partitions of big nets, lesion throughput,
and the callback's cost in the default run.

    python scripts/bench_specialization.py [--skip-resnet50]

Prints a markdown table. Targets (issue 4): VGG-16 weight partition (4,224 channels) under 30 s on the
2-core development machine; the analysis under 30% of the default run's training time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from featurelens.analysis import specialization as spec


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def graph_rows(skip_resnet50: bool) -> list[tuple[str, str]]:
    rows = []
    nets = {"vgg16": torchvision.models.vgg16, "resnet18": torchvision.models.resnet18}
    if not skip_resnet50:
        nets["resnet50"] = torchvision.models.resnet50
    for name, ctor in nets.items():
        net = ctor(weights=None, num_classes=10).eval()
        graph, t_graph = timed(spec.weight_graph, net)
        labels, t_part = timed(spec.spectral_partition, graph.adjacency, 12, 0)
        ncut, t_ncut = timed(spec.ncut, graph.adjacency, labels)
        rows.append((f"{name}: weight graph ({graph.n} nodes) build / partition k=12 / n-cut",
                     f"{t_graph:.1f} s / {t_part:.1f} s / {t_ncut:.3f} s (total {t_graph + t_part + t_ncut:.1f} s)"))
    return rows


def lesion_rows() -> list[tuple[str, str]]:
    """Lesion test of 20 unit sets (1 + 19 random) on the default small CNN over 1,000 shapes images."""
    from featurelens.analysis.importance import lesion_test, lesion_test_naive
    from featurelens.data import ImageDataModule
    from featurelens.models import build_model

    dm = ImageDataModule("shapes", root="data")
    dm.setup("fit")
    net = build_model("small_cnn", 10, 3).eval()
    gen = torch.Generator().manual_seed(0)
    sets = [torch.randperm(64, generator=gen)[:16] for _ in range(20)]
    loader = dm.loader(dm.val_set)
    rows = []
    for label, fn in (("prefix-shared", lesion_test), ("one full pass per set", lesion_test_naive)):
        _, seconds = timed(fn, net, loader, "features.8", sets, 10)
        rows.append((f"lesion test, 20 sets of 16 channels at features.8, 1,000 images: {label}",
                     f"{seconds:.2f} s ({20 * len(dm.val_set) / seconds:.0f} lesioned images/s)"))
    return rows


def default_run_rows() -> list[tuple[str, str]]:
    """Training epoch time of the default run vs one call of the specialization callback as configured."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from featurelens.runtime import CONF_DIR
    from featurelens.train import train

    rows = []
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        results = {}
        for label, analysis in (("no analysis", "none"), ("specialization", "[specialization]")):
            cfg = compose("config", overrides=[f"analysis={analysis}", "logger=none", "test=false",
                                               "callbacks.progress_bar.refresh_rate=0"], return_hydra_config=True)
            with open_dict(cfg):
                cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(Path(tmp) / label.replace(" ", "_"))
                cfg.hydra.job.num, cfg.hydra.job.override_dirname = 0, ""
            HydraConfig.instance().set_config(cfg)
            _, results[label] = timed(train, cfg)
        extra = results["specialization"] - results["no analysis"]
        epochs = cfg.trainer.max_epochs
        rows.append((f"default run ({epochs} epochs) without / with the specialization callback (epochs 0 and "
                     f"{epochs}: weights + activations, each against 10 shuffles, 3 clustering seeds)",
                     f"{results['no analysis']:.1f} s / {results['specialization']:.1f} s "
                     f"(+{extra:.1f} s = {100 * extra / results['no analysis']:.0f}% of training)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-resnet50", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = graph_rows(args.skip_resnet50) + lesion_rows() + default_run_rows()
    print(f"\n## Local specialization, CPU, torch threads {torch.get_num_threads()}\n")
    print("| measurement | result |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
