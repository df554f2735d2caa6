"""Benchmark: what the analysis callbacks cost per epoch, and the Lightning loop against a plain PyTorch loop.

    python scripts/bench_overhead.py [--model small_cnn] [--n-train 5000] [--batch-size 128] [--epochs 2]

Both loops train the same model from the same weights on the same in-memory data (the default run: small
CNN on 32-px shapes), with validation, logging and the progress bar off, so the difference is the loop
itself (the Lightning module still updates its torchmetrics); each reports its median epoch. Analysis cost
is the wall time of one analysis call at an epoch end, as a share of one training epoch.
Prints a markdown table per measurement.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from featurelens.analysis.chirality import Chirality
from featurelens.analysis.class_filters import ClassFilters
from featurelens.data import ImageDataModule
from featurelens.module import Classifier
from featurelens.runner import AnalysisContext, AnalysisRunner
from featurelens.runtime import CONF_DIR
from featurelens.train import build_net


def setup(model: str, n_train: int, batch_size: int, device: str):
    model_cfg = OmegaConf.load(Path(CONF_DIR) / "model" / f"{model}.yaml")
    data_cfg = OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "data" / "shapes.yaml"),
                               {"root": "data", "n_train": n_train, "batch_size": batch_size})
    model_cfg = OmegaConf.to_container(OmegaConf.merge({"data": data_cfg}, {"model": model_cfg}), resolve=True)["model"]
    net, model_cfg, width = build_net(model_cfg, data_cfg)
    dm = instantiate(data_cfg, input_size=width)
    dm.setup("fit")
    optimizer = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}
    return net, model_cfg, dm, optimizer


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(net: torch.nn.Module, dm: ImageDataModule, epochs: int, device: str) -> float:
    """Images per second of a hand-written training loop (median epoch)."""
    net = net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in dm.train_dataloader():
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return len(dm.train_set) / statistics.median(times)


class EpochTimer(pl.Callback):
    def __init__(self, device: str):
        self.device, self.times, self._start = device, [], 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        _sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def lightning_loop(module: Classifier, dm: ImageDataModule, epochs: int, device: str) -> float:
    """Images per second of the Lightning loop with the featurelens module (median epoch, metrics on)."""
    timer = EpochTimer(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(max_epochs=epochs, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                             default_root_dir=tmp, callbacks=[timer])
        trainer.fit(module, datamodule=dm)
    return len(dm.train_set) / statistics.median(timer.times)


def analysis_seconds(runner: AnalysisRunner, net: torch.nn.Module, dm: ImageDataModule, device: str,
                     repeats: int = 3) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        runner.run_dir = Path(tmp)
        ctx = AnalysisContext(Path(tmp), epoch=1, step=1, data=dm)
        runner.analyze(net, ctx)  # warm-up (figures' first draw, caches)
        start = time.perf_counter()
        for i in range(repeats):
            ctx.epoch = i + 2
            runner.analyze(net, ctx)
        return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop; the median epoch is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    net, model_cfg, dm, optimizer = setup(args.model, args.n_train, args.batch_size, args.device)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    plain = plain_loop(net, dm, args.epochs, args.device)
    net.load_state_dict(state)
    module = Classifier(model_cfg, optimizer, net=net)
    lightning = lightning_loop(module, dm, args.epochs, args.device)
    epoch_s = len(dm.train_set) / lightning

    print(f"\n## Training loop: {args.model}, {len(dm.train_set)} shapes images/epoch, batch {args.batch_size}, "
          f"{args.device}, torch threads {torch.get_num_threads()}\n")
    print("| loop | images/s | relative |\n|---|---|---|")
    print(f"| plain PyTorch | {plain:.0f} | 1.00 |")
    print(f"| Lightning (featurelens Classifier) | {lightning:.0f} | {lightning / plain:.2f} |")

    net = module.net.to(args.device)
    variants = {
        "chirality, kernels (every epoch)": AnalysisRunner(Chirality(fmap={"enabled": False})),
        "chirality, kernels + feature maps, 500 probes (default: epochs 0, 5, 10, …, last)":
            AnalysisRunner(Chirality(fmap={"n_probe": 500, "every_n_epochs": 1})),
        "chirality, kernels + feature maps, 100 probes":
            AnalysisRunner(Chirality(fmap={"n_probe": 100, "every_n_epochs": 1})),
    }
    print(f"\n## Analysis cost per call (figures excluded: drawn only at epochs 0, 5, 10, …, last) "
          f"vs one training epoch ({epoch_s:.1f} s)\n")
    print("| analysis | seconds per call | share of an epoch |\n|---|---|---|")
    cost = {}
    for label, runner in variants.items():
        cost[label] = analysis_seconds(runner, net, dm, args.device)
        print(f"| {label} | {cost[label]:.3f} | {100 * cost[label] / epoch_s:.1f}% |")
    kernels, with_fmap = list(cost.values())[:2]
    per_epoch = kernels + (with_fmap - kernels) / 5
    print(f"| **chirality as configured by default, per epoch (kernels every epoch, feature maps every 5th)** "
          f"| {per_epoch:.3f} | **{100 * per_epoch / epoch_s:.1f}%** |")
    for n_per_class, cache_mb in ((100, 64), (100, 0), (None, 64)):
        runner = AnalysisRunner(ClassFilters(n_per_class=n_per_class, cache_mb=cache_mb))
        s = analysis_seconds(runner, net, dm, args.device)
        label = (f"class_filters: selection over {n_per_class or 'all'} training images per class "
                 f"({'features cached for the fractional pass' if cache_mb else 'second forward pass'}) "
                 f"+ validation pass{' (default)' if (n_per_class, cache_mb) == (100, 64) else ''}")
        print(f"| {label} | {s:.3f} | {100 * s / epoch_s:.1f}% |")


if __name__ == "__main__":
    main()
