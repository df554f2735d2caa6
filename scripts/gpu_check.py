"""The GPU check: on a machine with a CUDA GPU, the GPU paths a user takes, timed, and compared with the CPU.

    python scripts/gpu_check.py                 # on the GPU machine (target: under 5 minutes; not yet run on one)
    python scripts/gpu_check.py --device cpu    # the same steps on the CPU: checks this script, not the GPU

Each step runs in a fresh process, writing below ``--out`` (default ``outputs/gpu_check/<date>_<time>``):

1. the default run (small CNN on the embedded shapes, chirality and class filters) with ``trainer=gpu``;
2. the same run with ``trainer=cpu`` and the same seed, the reference for the mismatch column;
3. the default run in bf16 mixed precision (``trainer.precision=bf16-mixed``);
4. ``analyze.py device=cuda`` with every analysis on a randomly initialised ResNet-18 (the weights-only
   values, chirality and the specialization weight graph, must equal the CPU's for the same seed);
5. ``analyze.py device=cpu``, the same, for that comparison;
6. ``scripts/bench_dissection.py --device cuda --size 224`` (the project's dissection at Broden's 224 px; add
   ``--lite PATH`` by hand to compare with NetDissect-Lite).

Measured with ``--device cpu`` on the 2-core development machine: 7.4 minutes in all (the specialization
weight graph of ResNet-18, 4,800 nodes, is CPU-bound spectral clustering: 113 s there with 5 shuffles, hence
2 shuffles and the weight part only here). It prints one table: step, exit status, seconds, and for the
comparisons the largest relative difference of the headline values against the CPU run (float32 on both:
~1e-5 is rounding; training values differ more, since GPU kernels sum in another order). Exit status 1 if a
step failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["logger=none", "seed=0", "trainer.max_epochs=2"]
ANALYSES = ["model=resnet18", "model.cifar_stem=false", "data=shapes", "seed=0", "logger=none",  # as timed above
            "analysis=[chirality,class_filters,specialization,dissection,linking]",
            "analysis.specialization.n_shuffles=2", "analysis.specialization.parts=[weights]",
            "analysis.dissection.synthbroden.n_images=200", "generator.epochs=1",
            "analysis.linking.pairs.n_per_class=20", "analysis.linking.pairs.heldout_per_class=5",
            "analysis.linking.cf.max_steps=20"]
# the values compared with the CPU run: (results file under the run dir, record key)
COMPARED = {
    "train": [("metrics.json", "val/acc"), ("analysis/chirality/results.jsonl", "chirality/model"),
              ("analysis/class_filters/results.jsonl", "class_filters/acc_full")],
    "analyze": [("analysis/chirality/results.jsonl", "chirality/model"),
                ("analysis/specialization/results.jsonl", "specialization/weights/ncut"),
                ("analysis/class_filters/results.jsonl", "class_filters/acc_full"),
                ("analysis/dissection/results.jsonl", "dissection/unique_detectors")],
}


def step(name: str, args: list[str], out: Path) -> tuple[int, float]:
    """Run ``python <args>`` in a fresh process, its output in ``<out>/<name>.log``; (exit status, seconds)."""
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - start


def values(run: Path, kind: str) -> dict[str, float]:
    """The compared values of a run dir (the last record of each results file)."""
    got = {}
    for file, key in COMPARED[kind]:
        path = run / file
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        record = json.loads(lines[-1]) if file.endswith(".jsonl") else json.loads(path.read_text())
        if isinstance(record.get(key), int | float):
            got[key] = float(record[key])
    return got


def mismatch(a: dict[str, float], b: dict[str, float]) -> str:
    """The largest relative difference over the keys both runs have, naming the key."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return "no values to compare"
    key = max(shared, key=lambda k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12))
    return f"{abs(a[key] - b[key]) / max(abs(b[key]), 1e-12):.2e} ({key}: {a[key]:.6g} vs {b[key]:.6g})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check" / datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    out, dev = args.out, args.device
    out.mkdir(parents=True, exist_ok=True)
    trainer = "trainer=gpu" if dev.startswith("cuda") else "trainer=cpu"
    runs = {
        f"default run, {dev}": ["train.py", trainer, *TRAIN, f"hydra.run.dir={out}/train_{dev}"],
        "default run, cpu": ["train.py", "trainer=cpu", *TRAIN, f"hydra.run.dir={out}/train_cpu"],
        f"default run, {dev}, bf16-mixed": ["train.py", trainer, "trainer.precision=bf16-mixed", *TRAIN,
                                            f"hydra.run.dir={out}/train_bf16"],
        f"analyze.py, every analysis, ResNet-18, {dev}": ["analyze.py", f"device={dev}", *ANALYSES,
                                                          f"hydra.run.dir={out}/analyze_{dev}"],
        "analyze.py, every analysis, ResNet-18, cpu": ["analyze.py", "device=cpu", *ANALYSES,
                                                       f"hydra.run.dir={out}/analyze_cpu"],
        f"dissection benchmark, 224 px, {dev}": ["scripts/bench_dissection.py", "--device", dev, "--size", "224",
                                                 "--n-images", "300", "--repeat", "1",
                                                 "--out", str(out / "bench_dissection.csv")],
    }
    # with --device cpu the device runs are the reference runs (same names): each runs once
    rows, failed = [], False
    for name, cmd in runs.items():
        print(f"running: {name} ...", flush=True)
        rc, seconds = step(name.replace(", ", "_").replace(" ", "_"), cmd, out)
        failed |= rc != 0
        rows.append((name, rc, seconds))
    cpu_train, cpu_analyze = values(out / "train_cpu", "train"), values(out / "analyze_cpu", "analyze")
    compare = {f"default run, {dev}": mismatch(values(out / f"train_{dev}", "train"), cpu_train),
               f"default run, {dev}, bf16-mixed": mismatch(values(out / "train_bf16", "train"), cpu_train),
               f"analyze.py, every analysis, ResNet-18, {dev}": mismatch(values(out / f"analyze_{dev}", "analyze"),
                                                                         cpu_analyze)}
    print(f"\n## GPU check ({dev}), outputs in {out}\n")
    print("| step | exit | seconds | largest relative difference from the CPU run |\n|---|---|---|---|")
    for name, rc, seconds in rows:
        print(f"| {name} | {rc} | {seconds:.1f} | {compare.get(name, '') if dev != 'cpu' else ''} |")
    bench = out / "bench_dissection.csv"
    if bench.exists():
        print(f"\ndissection benchmark:\n{bench.read_text()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
