"""Benchmark of network dissection: the streaming implementation against a NetDissect-Lite-style reference.

    python scripts/bench_dissection.py [--size 112] [--n-small 200] [--n-large 600] [--n-naive 200]
                                       [--batch-size 50] [--device cpu] [--out results.csv]

Both variants dissect the same model and layer (default: torchvision ResNet-18, random init with seed 0,
``weights=None``, 10 classes, ``layer4``; or ``--model small_cnn``) on the same procedural Broden-format data
(``featurelens.data.synthbroden``, images read from disk by ``BrodenDataset``), with q = 0.005:

- **streaming**: the public path, :func:`featurelens.analysis.dissection.dissect` (two forward passes, exact
  top-m thresholds, per-image tallies, nothing stored per image; spec dissection.md §8 "Design here").
- **naive**: written the way NetDissect-Lite works (spec §8 "Where [LITE] spends time and memory"): pass 1
  runs the model once and writes every activation of the layer to a float32 ``.npy`` memmap on disk (N×U×H×W),
  then computes per-unit thresholds from it with ``numpy.quantile`` (linear); pass 2 reads the memmap back and
  loops in Python over images × units: for each (image, unit) whose max activation exceeds the threshold it
  upsamples that one map (``F.interpolate``, bilinear, align_corners off), thresholds it, takes ``np.argwhere``
  and ``np.bincount`` over the mask layers and accumulates I, G, A^paper, A^lite in numpy arrays. It follows
  this project's semantics (layers OR-ed per label, image-level labels cover the whole grid, label 0 never
  counts; spec §2.4-§2.5) so that its integer tallies can be compared with the streaming ones exactly.

Every measurement runs in a fresh ``multiprocessing`` spawn process. Throughput is images / wall second of the
whole dissection (both passes, image and mask decoding included). Peak memory is the process's peak resident
set during the dissection: the high-water mark is reset (``/proc/self/clear_refs``) after imports, model and
dataset set-up, and ``VmHWM`` is read afterwards; "growth" is that peak minus the resident set at the reset.
Touched pages of the naive memmap count towards its resident set. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

Q = 0.005
TALLY_KEYS = ("intersection", "label_count", "act_paper", "act_lite")


# ---------------------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc)
# ---------------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (0 where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset the peak-RSS high-water mark of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def build(model_name: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """-> (model in eval mode, probed module, description). Same seed -> same weights in every process."""
    torch.manual_seed(seed)
    if model_name == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(weights=None, num_classes=10)
        return model.eval(), model.layer4, "ResNet-18 (random init) layer4"
    if model_name == "small_cnn":
        from featurelens.models import build_model

        model = build_model("small_cnn", 10, channels=[32, 64, 128, 256])
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        return model.eval(), convs[-1], "small_cnn [32,64,128,256] last conv"
    raise ValueError(f"unknown --model {model_name!r}")


# ---------------------------------------------------------------------------------------------------------------
# The reference-style (NetDissect-Lite) implementation
# ---------------------------------------------------------------------------------------------------------------
def naive_dissect(model: torch.nn.Module, layer: torch.nn.Module, ds, batch_size: int, q: float, device: str,
                  workdir: Path) -> dict:
    """NetDissect-Lite-style dissection: activations to a disk memmap, numpy quantiles, Python image×unit loop.

    Returns dict: ``thresholds`` (U,) float64, ``tally`` {intersection (U, C+1), label_count (C+1), act_paper
    (U, K), act_lite (U, K)} int64 numpy arrays, ``memmap_bytes``, ``t_pass1``, ``t_pass2`` (seconds).
    """
    n = len(ds)
    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out.detach().float()))
    path = workdir / "features.npy"
    mm = None
    t_fwd = 0.0
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for b0 in range(0, n, batch_size):
                idx = range(b0, min(b0 + batch_size, n))
                x = torch.stack([ds.load_image(i) for i in idx]).to(device)
                t0 = time.perf_counter()
                model(x)
                a = captured.pop("a").cpu().numpy()
                t_fwd += time.perf_counter() - t0
                if mm is None:
                    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *a.shape[1:]))
                mm[b0:b0 + len(idx)] = a
    finally:
        handle.remove()
    mm.flush()
    del mm
    feats = np.load(path, mmap_mode="r")  # (N, U, H, W), read back from disk as [LITE] does
    U = feats.shape[1]
    thresholds = np.empty(U, dtype=np.float64)
    t0 = time.perf_counter()
    chunk = 64
    for u0 in range(0, U, chunk):
        block = np.asarray(feats[:, u0:u0 + chunk], dtype=np.float64)  # (N, c, H, W)
        thresholds[u0:u0 + chunk] = np.quantile(block.transpose(1, 0, 2, 3).reshape(block.shape[1], -1), 1 - q,
                                                axis=1, method="linear")
    t_quant = time.perf_counter() - t0
    t_pass1 = time.perf_counter() - start

    t_masks = 0.0
    start = time.perf_counter()
    L, K = ds.num_labels, len(ds.categories)
    prim = np.asarray(ds.primary_category, dtype=np.int64).copy()
    prim[0] = -1
    inter = np.zeros((U, L), dtype=np.int64)
    G = np.zeros(L, dtype=np.int64)
    Ap = np.zeros((U, K), dtype=np.int64)
    Al = np.zeros((U, K), dtype=np.int64)
    for i in range(n):
        rec = ds.records[i]
        sh, sw = rec["sh"], rec["sw"]
        P = sh * sw
        t0 = time.perf_counter()
        labels = ds.load_labels(i)
        t_masks += time.perf_counter() - t0
        img, layers = [], []
        for cat, t in labels.items():
            arr = t.numpy()
            if ds.image_level[cat] or arr.ndim <= 1:
                img.extend(int(c) for c in arr.reshape(-1))
            else:
                layers.extend(arr.reshape(-1, sh, sw))
        img_set = np.unique(np.asarray([c for c in img if c > 0], dtype=np.int64))
        lay = np.stack(layers).astype(np.int64) if layers else np.zeros((0, sh, sw), dtype=np.int64)
        if img_set.size:  # an image-level label already covers the whole grid
            lay[np.isin(lay, img_set)] = 0
        for j in range(1, lay.shape[0]):  # OR per label: a label repeated at a pixel in a later layer counts once
            lay[j][(lay[:j] == lay[j]).any(axis=0)] = 0
        g = np.bincount(lay.ravel(), minlength=L)
        g[0] = 0
        g[img_set] += P
        G += g
        present = np.unique(prim[g > 0])
        present = present[present >= 0]
        fmap = feats[i]  # (U, H, W) from the memmap
        for k in range(U):
            if not fmap[k].max() > thresholds[k]:  # skip rule (spec §2.3)
                continue
            up = F.interpolate(torch.from_numpy(np.array(fmap[k]))[None, None], size=(sh, sw), mode="bilinear",
                               align_corners=False)[0, 0].numpy().astype(np.float64)
            where = np.argwhere(up > thresholds[k])
            na = len(where)
            if na == 0:
                continue
            bc = np.bincount(lay[:, where[:, 0], where[:, 1]].ravel(), minlength=L)
            bc[0] = 0
            bc[img_set] += na
            inter[k] += bc
            Ap[k, present] += na
            overlap = np.unique(prim[bc > 0])
            Al[k, overlap[overlap >= 0]] += na
    t_pass2 = time.perf_counter() - start
    size = path.stat().st_size
    del feats
    return {"thresholds": thresholds, "memmap_bytes": size, "t_pass1": t_pass1, "t_pass2": t_pass2,
            "t_forward": t_fwd, "t_metrics": t_quant + t_pass2 - t_masks,
            "tally": {"intersection": inter, "label_count": G, "act_paper": Ap, "act_lite": Al}}


def streaming_stage_times(model: torch.nn.Module, layer: torch.nn.Module, ds, batch_size: int, device: str) -> dict:
    """Time the streaming Metrics alone (forward passes and decoding excluded), driving them as ``dissect`` does.

    Returns ``t_forward`` (one forward pass over the data, s) and ``t_metrics`` (UnitQuantiles + IoUTally
    update/compute, s). Run after the measured dissection, so it does not affect its peak memory.
    """
    from featurelens.analysis.dissection import IoUTally, UnitQuantiles

    captured: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out.detach().float()))
    n, t_fwd, t_met = len(ds), 0.0, 0.0
    try:
        with torch.no_grad():
            quant = tally = thresholds = None
            for pass_ in (1, 2):
                for b0 in range(0, n, batch_size):
                    idx = range(b0, min(b0 + batch_size, n))
                    x = torch.stack([ds.load_image(i) for i in idx]).to(device)
                    labels = [ds.load_labels(i) for i in idx] if pass_ == 2 else None
                    t0 = time.perf_counter()
                    model(x)
                    a = captured.pop("a")
                    t1 = time.perf_counter()
                    if pass_ == 1:
                        if quant is None:
                            quant = UnitQuantiles(a.shape[1], n * a.shape[2] * a.shape[3], Q).to(device)
                        quant.update(a)
                    else:
                        if tally is None:
                            tally = IoUTally(a.shape[1], ds.num_labels, ds.primary_category,
                                             num_categories=len(ds.categories)).to(device)
                        tally.update(a, labels, thresholds)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    t_fwd += (t1 - t0) / 2  # two forward passes; report one
                    t_met += t2 - t1
                if pass_ == 1:
                    t0 = time.perf_counter()
                    thresholds = quant.compute()
                    t_met += time.perf_counter() - t0
            t0 = time.perf_counter()
            tally.compute()
            t_met += time.perf_counter() - t0
    finally:
        handle.remove()
    return {"t_forward": t_fwd, "t_metrics": t_met}


# ---------------------------------------------------------------------------------------------------------------
# One measurement, in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def measure(variant: str, root: str, args: dict, result_path: str) -> None:
    """Child process: set up, reset the RSS peak, dissect with ``variant``, pickle the results."""
    torch.set_num_threads(args["threads"])
    from featurelens.analysis.dissection import dissect
    from featurelens.data.broden import BrodenDataset

    ds = BrodenDataset(root)
    model, layer, _ = build(args["model"], args["seed"])
    model = model.to(args["device"])
    with torch.no_grad():  # warm-up (allocator, kernels) outside the measurement
        model(torch.stack([ds.load_image(0)]).to(args["device"]))
    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_dissection_") as work:
        if variant == "streaming":
            res = dissect(model, layer, ds, ds.num_labels, ds.primary_category, q=Q, device=args["device"],
                          batch_size=args["batch_size"])
            out = {"thresholds": res["thresholds"].numpy(), "memmap_bytes": 0,
                   "tally": {k: res["tally"][k].numpy() for k in TALLY_KEYS},
                   "detectors": res["counts"]["detectors"], "unique_A": res["counts"]["unique_A"]}
        else:
            out = naive_dissect(model, layer, ds, args["batch_size"], Q, args["device"], Path(work))
        if args["device"].startswith("cuda"):
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - start
    out.update(n_images=len(ds), rss0_kb=rss0, hwm_kb=_status_kb("VmHWM"), peak_reset=reset)
    if variant == "streaming" and args.get("stages"):
        out.update(streaming_stage_times(model, layer, ds, args["batch_size"], args["device"]))
    with open(result_path, "wb") as fh:
        pickle.dump(out, fh)


def run_in_child(variant: str, root: Path, args: dict, workdir: Path) -> dict:
    """Run :func:`measure` in a fresh spawn process and return its results."""
    result_path = workdir / f"{variant}_{root.name}.pkl"
    proc = mp.get_context("spawn").Process(target=measure, args=(variant, str(root), args, str(result_path)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{variant} on {root.name} failed with exit code {proc.exitcode}")
    with open(result_path, "rb") as fh:
        return pickle.load(fh)


def agreement(a: dict, b: dict, primary_category) -> dict:
    """Compare two results: thresholds (max relative difference), tallies (exact), paper IoUs (max |Δ|)."""
    from featurelens.analysis.dissection import iou

    ta, tb = a["thresholds"], b["thresholds"]
    rel = float(np.max(np.abs(ta - tb) / np.maximum(np.abs(ta), 1e-30)))
    equal = {k: bool(np.array_equal(a["tally"][k], b["tally"][k])) for k in TALLY_KEYS}
    ious = [iou({k: torch.from_numpy(r["tally"][k]) for k in TALLY_KEYS}, primary_category, "paper")
            for r in (a, b)]
    return {"threshold_max_rel_diff": rel, "tallies_equal": equal,
            "iou_max_abs_diff": float((ious[0] - ious[1]).abs().max())}


def _impl_hash() -> str:
    """md5 (first 12 hex digits) of the dissection module's source, to tie the numbers to a version."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("featurelens.analysis.dissection")
    return hashlib.md5(Path(spec.origin).read_bytes()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "small_cnn"])
    parser.add_argument("--size", type=int, default=112, help="synthbroden image side (masks are half)")
    parser.add_argument("--n-small", type=int, default=200, help="images, streaming run 1 (and the agreement check)")
    parser.add_argument("--n-large", type=int, default=600, help="images, streaming run 2 (memory stays flat)")
    parser.add_argument("--n-naive", type=int, nargs="+", default=[200],
                        help="image counts for the naive reference (its memmap grows with N); the first one "
                             "must equal --n-small for the agreement check")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0, help="model weights and synthbroden seed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None, help="where to write synthbroden (default: a temp dir)")
    parser.add_argument("--out", default=None, help="optional CSV of the table")
    args = parser.parse_args()
    cfg = {"model": args.model, "seed": args.seed, "batch_size": args.batch_size, "device": args.device,
           "threads": args.threads}
    _, _, model_desc = build(args.model, args.seed)
    impl_hash = _impl_hash()

    from featurelens.data.broden import BrodenDataset
    from featurelens.data.synthbroden import write_synthbroden

    tmp = tempfile.TemporaryDirectory(prefix="bench_dissection_")
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp.name)
    sizes = sorted({args.n_small, args.n_large, *args.n_naive})
    roots = {}
    for n in sizes:
        root = data_dir / f"synthbroden_{n}_{args.size}_{args.seed}"
        if not (root / "index.csv").is_file():
            write_synthbroden(root, n_images=n, size=args.size, seed=args.seed)
        roots[n] = root

    plan = [("streaming", args.n_small), ("streaming", args.n_large)] + [("naive", n) for n in args.n_naive]
    results = {}
    workdir = Path(tmp.name)
    for variant, n in plan:
        print(f"running {variant} on {n} images ...", flush=True)
        stages = variant == "naive" or n == args.n_small
        results[(variant, n)] = run_in_child(variant, roots[n], {**cfg, "stages": stages}, workdir)

    rows = []
    for (variant, n), r in results.items():
        rows.append({"implementation": "featurelens dissect (streaming)" if variant == "streaming"
                     else "NetDissect-Lite style (memmap + loop)", "images": n,
                     "seconds": round(r["seconds"], 2), "images/s": round(n / r["seconds"], 1),
                     "peak RSS MiB": round(r["hwm_kb"] / 1024, 1),
                     "peak growth MiB": round((r["hwm_kb"] - r["rss0_kb"]) / 1024, 1),
                     "activations on disk MiB": round(r["memmap_bytes"] / 2**20, 2),
                     "1 forward pass s": round(r["t_forward"], 2) if "t_forward" in r else None,
                     "thresholds+tally s": round(r["t_metrics"], 2) if "t_metrics" in r else None})
    table = pd.DataFrame(rows).astype(object).where(lambda df: df.notna(), "-")
    naive_n = args.n_naive[0]
    s_ips = args.n_small / results[("streaming", args.n_small)]["seconds"]
    n_ips = naive_n / results[("naive", naive_n)]["seconds"]
    table["speed-up"] = [round((r["images"] / r["seconds"]) / n_ips, 1) for r in rows]

    ds = BrodenDataset(roots[args.n_small])
    nr = results[("naive", naive_n)]
    print(f"\n## Network dissection: {model_desc}, synthbroden {args.size} px (masks {args.size // 2}), "
          f"q = {Q}, batch {args.batch_size}, {ds.num_labels - 1} labels, {len(ds.categories)} categories")
    print(table.to_markdown(index=False))
    print(f"\nspeed-up (streaming images/s at N={args.n_small} / naive images/s at N={naive_n}): "
          f"{s_ips / n_ips:.1f}x (target >= 20x)")
    print(f"naive pass 1 (forward + memmap + numpy quantiles) {nr['t_pass1']:.2f} s, "
          f"pass 2 (mask decoding + Python image x unit loop) {nr['t_pass2']:.2f} s")
    sr = results[("streaming", args.n_small)]
    if naive_n == args.n_small:
        print(f"thresholds+tally stage alone (forward passes and decoding excluded) at N={naive_n}: streaming "
              f"{sr['t_metrics']:.2f} s vs naive {nr['t_metrics']:.2f} s -> "
              f"{nr['t_metrics'] / sr['t_metrics']:.2f}x; streaming runs 2 forward passes, naive 1 "
              f"(one pass: {sr['t_forward']:.2f} s / {nr['t_forward']:.2f} s)")
    big = results[("streaming", args.n_large)]
    small = results[("streaming", args.n_small)]
    print(f"streaming peak growth N={args.n_small}: {(small['hwm_kb'] - small['rss0_kb']) / 1024:.1f} MiB, "
          f"N={args.n_large}: {(big['hwm_kb'] - big['rss0_kb']) / 1024:.1f} MiB")
    per_image = nr["memmap_bytes"] / naive_n
    print(f"naive activations on disk: {per_image / 1024:.1f} KiB/image float32 -> "
          f"{per_image * 63305 / 2**30:.2f} GiB for 63,305 Broden images at this layer size "
          f"(float64 as in [LITE]: twice that)")
    if naive_n == args.n_small:
        ag = agreement(results[("streaming", args.n_small)], nr, ds.primary_category)
        eq = ", ".join(f"{k} {'equal' if v else 'DIFFER'}" for k, v in ag["tallies_equal"].items())
        print(f"agreement at N={naive_n}: thresholds max rel diff {ag['threshold_max_rel_diff']:.2e}; "
              f"tallies: {eq}; max |dIoU| (paper) {ag['iou_max_abs_diff']:.2e}")
    else:
        print("agreement not checked: the first --n-naive differs from --n-small")
    print(f"streaming result at N={args.n_small}: {small['detectors']} detectors, "
          f"{small['unique_A']} unique (method A)")
    if not all(r["peak_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs unavailable, peaks include set-up")
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"\nmeasured: wall time of a full dissection (both passes, PNG decoding included) and peak RSS, each "
          f"in a fresh spawn process; machine: {os.cpu_count()} CPUs ({platform.machine()}, {dev}), "
          f"{args.threads} torch threads, torch {torch.__version__}, device {args.device}, "
          f"{platform.system()} {platform.release()}")
    now = _impl_hash()
    print(f"implementation: featurelens.analysis.dissection md5 {impl_hash}"
          + ("" if now == impl_hash else f" (CHANGED during the run, now {now}: results may mix versions)"))
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
