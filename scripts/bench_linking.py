"""Benchmark of the linking analysis: time to train the generator, build pairs, fit the map, sweep units and
make counterfactuals, on the embedded data.

    python scripts/bench_linking.py [--data digits|shapes] [--size 32] [--epochs 5] [--gen-epochs 20]
                                    [--n-per-class 500] [--units 32] [--cf-steps 2000]

Trains the default small CNN for ``--epochs`` epochs (plain PyTorch loop, on the ImageDataModule's training
split), trains the default cVAE on the same data (``featurelens.models.generators.store.train_from_config``),
then times each stage of the linking callback with its default settings (classes 0-3, psi 0.7, draw factor 20,
OLS) and prints a table with the stage's result (keep rate, R², fidelity, counterfactual success).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time

import pandas as pd
import torch

from featurelens.analysis import linking as lk
from featurelens.analysis.base import model_input
from featurelens.data import ImageDataModule
from featurelens.models import build_model
from featurelens.models.generators.store import train_from_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", choices=["digits", "shapes"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5, help="classifier training epochs")
    parser.add_argument("--gen-epochs", type=int, default=20)
    parser.add_argument("--n-per-class", type=int, default=500)
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--cf-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    def stage(name: str, fn, result=lambda out: ""):
        start = time.perf_counter()
        out = fn()
        rows.append({"stage": name, "seconds": round(time.perf_counter() - start, 2), "result": result(out)})
        print(f"{name}: {rows[-1]['seconds']} s {rows[-1]['result']}", flush=True)
        return out

    root = tempfile.mkdtemp(prefix="bench_linking_")
    data_cfg = {"name": args.data, "root": root, "image_size": args.size, "channels": 1 if args.data == "digits" else 3,
                "num_classes": 10, "seed": 0, "n_train": 5000, "flip_aug": False}
    dm = ImageDataModule(**data_cfg)
    dm.prepare_data()
    dm.setup("fit")
    model = build_model("small_cnn", 10, data_cfg["channels"])

    def train_classifier():
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        model.train()
        for _ in range(args.epochs):
            for x, y in dm.train_dataloader():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in dm.val_dataloader())
        return correct / len(dm.val_set)

    stage(f"train small CNN ({args.epochs} epochs)", train_classifier, lambda acc: f"val acc {acc:.3f}")
    gen = stage(f"train cVAE ({args.gen_epochs} epochs)",
                lambda: train_from_config({"epochs": args.gen_epochs}, data_cfg, progress=False))
    E = lk.FeatureExtractor(model, "classifier", model_input(dm))
    classes = [0, 1, 2, 3]
    with torch.no_grad():
        train = stage(f"build pairs ({args.n_per_class}/class, 4 classes)",
                      lambda: lk.build_pairs(gen, E, None, classes, args.n_per_class, 20, 0, 0.7, batch_size=256),
                      lambda p: f"{len(p)} pairs, keep rate {float(p.keep_rate.mean()):.3f}")
        held = lk.build_pairs(gen, E, None, classes, 100, 20, 1_000_000, 0.7, batch_size=256)

    def fit():
        stats = lk.LinkingStats(train.r.shape[1], gen.w_dim)
        stats.update(train.r.double(), train.w.double())
        return stats.solve(0.0)

    lmap = stage("fit the map (OLS, float64)", fit,
                 lambda m: f"held-out R2 {lk.evaluate_map(m, held.r.double(), held.w.double())['r2_mean']:.3f}")
    w_ref = torch.cat([gen.sample_w(8, c, 0.7, 136 + 1000 * c) for c in classes])
    with torch.no_grad():
        r_ref = E(gen.synthesize(w_ref))[0].double()
    mins, maxs, _ = lk.activation_ranges(r_ref)
    units = torch.randperm(r_ref.shape[1], generator=torch.Generator().manual_seed(0))[: args.units].tolist()

    def sweep():
        with torch.no_grad():
            changes, _ = lk.sweep_units(gen, lmap, E, None, r_ref[:4], torch.tensor(classes), units, mins, maxs,
                                        r_ref.std(0))
        return lk.summarise_units(changes)

    stage(f"sweep {args.units} units x 4 samples x 3 steps", sweep,
          lambda s: f"fidelity rate {lk.fidelity_rate(s):.3f}")

    def counterfactuals():
        results = []
        for o, t in itertools.permutations(classes, 2):
            r = held.r[(held.labels == o).nonzero()[0, 0]].double()

            def check(r_prime):
                return E(gen.synthesize(lmap(r_prime)))[1]

            results.append(lk.counterfactual(r, o, t, E.weight.double(), E.bias.double(), lmap, check,
                                             max_steps=args.cf_steps))
        return results

    stage(f"counterfactuals (12 ordered pairs, <= {args.cf_steps} steps)", counterfactuals,
          lambda rs: f"success {sum(r.success for r in rs)}/{len(rs)}, steps {[r.steps for r in rs]}")
    print(f"\n## Linking: small CNN on {args.data} at {args.size} px, cVAE generator")
    print(pd.DataFrame(rows).to_markdown(index=False))
    print(f"\nmeasured: wall seconds per stage; machine: {os.cpu_count()} CPUs ({platform.machine()}), "
          f"{args.threads} torch threads, torch {torch.__version__}, CPU")


if __name__ == "__main__":
    main()
