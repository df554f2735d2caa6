"""Benchmark of network dissection: featurelens' streaming ``dissect`` against the real NetDissect-Lite.

    python scripts/bench_dissection.py [--lite PATH] [--model resnet18|small_cnn] [--size PX]
                                       [--n-images 300 600] [--batch-size 64] [--workers 0] [--repeat 3]
                                       [--device cpu|cuda] [--threads T] [--seed 0] [--data-dir DIR] [--no-check]
                                       [--out table.csv]

``--lite PATH`` is a checkout of https://github.com/CSAILVision/NetDissect-Lite (written against 2163454, the
commit spec dissection.md cites as [LITE]). Without it only the project is measured (same table, project rows).

What runs
---------
Both implementations dissect the same model weights, layer and data with q = 0.005:

- model: torchvision ResNet-18 (``weights=None``, 10 classes), random init under ``--seed``, layer ``layer4``,
  at 112 px (``--size``); or ``--model small_cnn``: the project's small CNN (``build_model('small_cnn', 10)``,
  channels 32-32-64-64-128-128) at 32 px, its last block (the last ReLU of ``features``). The parent saves the
  weights to a file once; every process loads that file.
- data: ``featurelens.data.synthbroden`` written once per size (``--n-images``, default 300 and 600) in the
  Broden directory format; both read the images and masks from disk.
- input: Lite's own preprocessing (BGR mean (109.5388, 118.6897, 124.6901) subtracted, / (255·0.224)); the
  project gets the same arithmetic through ``dissect(preprocess=...)``, so both models see bit-identical input.
- project: ``featurelens.analysis.dissection.dissect``: pass 1 exact thresholds, pass 2 streaming tallies (over
  the activations and parsed masks pass 1 kept where they fit its budget, else a second forward pass or mask
  read; the table says which), ``denominator='lite'`` so its IoUs are Lite's, ``num_workers=--workers`` (default
  0, the project's default: decoding in the same process; on 2 cores a worker only slowed the forward pass down),
  ``--batch-size``, and its defaults otherwise: on the CPU ``--threads`` batches side by side, one per thread
  (each ⌈batch size / threads⌉ images), and the model on oneDNN tensors where that is bitwise exact (checked on
  the first batch; the row's name says both).
- Lite: a temporary copy of the checkout with the shims below; a driver (this script's Lite child) runs
  steps 1-3 of Lite's ``main.py``: ``FeatureOperator.feature_extraction`` (forward passes, every activation
  into a float64 memmap on disk), ``quantile_threshold`` (``util/vecquantile.py`` sketch, readout 994 of 1000)
  and ``tally`` (``tally_job``: the Python loop over images x units, masks decoded by its multiprocessing
  prefetcher with ``cpu_count()`` workers, then IoU and ``tally.csv``). Step 4 (HTML report) and ``CLEAN`` are
  not run. ``settings.BATCH_SIZE`` is ``--batch-size``; ``TALLY_BATCH_SIZE`` / ``TALLY_AHEAD`` stay 16 / 4. The
  driver sets the ``fork`` start method, Linux's default that Lite's ``multiprocessing.Pool`` was written for
  (inherited from the benchmark's spawn start method, every pool worker would re-import this script).

What is measured
----------------
Every measurement runs in a fresh ``multiprocessing`` spawn process (a fresh Lite copy each), after imports,
model loading, dataset parsing (and Lite's prefetcher pool) and one warm-up forward. Each size is run
``--repeat`` times (default 3), the project and Lite alternating, so that a slow spell of the machine hits both;
each row is the run with the median total (its stages are that run's), with the range of the totals:

- total s: wall time of the dissection (project: the ``dissect`` call; Lite: steps 1-3); images/s = N / total.
- features s: Lite step 1 (image decoding, forward, memmap writes). Project: its image decoding and forward
  passes (one or two; it keeps no feature store on disk). Decoding is timed by a ``BrodenDataset`` subclass,
  in this process and in forked DataLoader workers alike (shared counters).
- forward s: model input to the probed layer's output (``model.forward`` wrapped, a hook on the layer; CUDA
  synchronised), summed over all forward calls; part of "features". Where the project runs batches side by side
  in threads, its forward and decoding seconds (summed over the threads) are divided by the number of threads:
  their share of the wall time, as the stage columns below count it.
- threshold s: Lite step 2. Project: pass 1 minus its forward and the decoding done in this process (top-m
  buffers and readout).
- tally s: Lite step 3 (its masks decoded by its prefetcher, tallies, IoU, ``tally.csv``). Project: pass 2
  minus its forward and image decoding, plus the mask decoding and label parsing wherever it ran (pass 1, which
  decodes the masks when their parsed labels fit the budget, or workers): tallies, IoU, labels, table and every
  mask. The pass boundary is the first ``IoUTally`` built (once the thresholds are known).
- peak RSS / growth: ``VmHWM`` of the measured process after the high-water mark was reset
  (``/proc/self/clear_refs``) at the end of the set-up; growth = peak - resident set at the reset. Touched pages
  of Lite's memmaps count; the memory of Lite's prefetcher worker processes does not.
- on disk: Lite's feature memmaps (``<layer>.mmap``, ``<layer>_max.mmap``).
- ratios: Lite seconds / project seconds, end to end and for the tally stage.

Agreement check (unless ``--no-check``; untimed, after the measurement, at every size)
------------------------------------------------------------------------------------------
Lite's thresholds are a sketch estimate, the project's exact, so its own tally cannot match integer for integer.
The Lite child therefore calls Lite's ``tally`` again with the project's thresholds (twice: with Lite's
upsampling as shimmed, PIL; and with torch's bilinear interpolation, the project's arithmetic) and saves the raw
tallies. They are compared with the project's: I (intersection, U x C+1), G (label pixels, C+1), A^lite (U x
categories, matched by name) and sum|M| (U). Semantic difference ([LITE] ``tally_job``, spec §2.4): Lite sums
every occurrence of a label at a pixel -- an image-level (scene/texture) label adds sh·sw *and* its pixel-level
copies in the same image count again (synthbroden: ``striped`` is a texture and a material), and a label in two
mask layers counts twice -- where the project counts the union once. The project child measures that excess
exactly by a second ``dissect`` on a view of the data in which each occurrence Lite counts on top of the first
gets its own virtual label number; Lite = project + excess must then hold exactly. Also reported: whether
Lite's stored features reproduce the project's thresholds (same features), the unit labels of Lite's tally.csv,
and Lite's own end-to-end result (sketch thresholds, the share of raw values above them) against the project's.

Shims applied to the temporary copy of Lite (nothing else is changed; each text must be found as expected)
---------------------------------------------------------------------------------------------------------
- ``settings.py``: overrides appended: ``GPU`` (``--device cuda``), ``MODEL``, ``NUM_CLASSES = 10``,
  ``MODEL_FILE`` (the saved weights), ``MODEL_PARALLEL = False``, ``FEATURE_NAMES`` (the layer),
  ``DATA_DIRECTORY`` (the synthbroden directory), ``IMG_SIZE``, ``QUANTILE = 0.005``, ``CATAGORIES`` (all six
  categories, as the project; Lite's default omits material), ``BATCH_SIZE``, ``OUTPUT_FOLDER``, ``CLEAN = False``.
- ``loader/model_loader.py``: ``torch.load(..., weights_only=False)`` (torch >= 2.6 refuses whole pickled
  models by default; small_cnn is handed to Lite as a whole pickled model, Lite's own non-state-dict branch --
  ResNet-18 goes through Lite's state-dict branch); ``model.get_submodule(name)`` instead of
  ``model._modules.get(name)`` so a nested layer (small_cnn's ``features.19``) can be hooked.
- ``feature_operation.py``: ``scipy.misc.imresize`` (removed in SciPy 1.3) replaced by what it did for
  ``mode='F'``: a PIL bilinear resize of the float32 map (``UPSAMPLE = 'torch'``, set by the driver for one
  agreement tally, uses ``torch.nn.functional.interpolate`` instead); ``Variable(input, volatile=True)``
  (``volatile`` is ignored today, with a warning) replaced by the tensor, the driver running everything under
  ``torch.no_grad()`` as ``volatile`` meant; ``tally`` also saves its raw arrays to ``<tally csv>.npz``.
- ``loader/data_loader.py``: ``scipy.misc.imread`` (removed in SciPy 1.2) replaced by PIL (``Image.open`` ->
  RGB array, as it was); ``raise StopIteration`` in the two batch generators -> ``return`` (PEP 479, Python 3.7);
  mask decoding ``R + G * 256`` on uint8 arrays casts to int32 first (NumPy 2 raises on the uint8 overflow where
  NumPy 1 promoted); ``onehot`` indexes with a tuple (NumPy >= 1.23 reads the old list as one array index and
  silently fills the wrong cells of ``labelcat``); ``scipy.ndimage.interpolation.zoom`` ->
  ``scipy.ndimage.zoom`` (deprecated namespace, gone in SciPy 2.0).
- ``util/vecquantile.py``: ``numpy.NaN`` -> ``numpy.nan`` (removed in NumPy 2.0).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import multiprocessing as mp
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

Q = 0.005
TAU = 0.04
LITE_URL = "https://github.com/CSAILVision/NetDissect-Lite"
LITE_MEAN_RGB = (124.6901, 118.6897, 109.5388)  # Lite's FeatureOperator.mean is this in BGR order
LITE_SCALE = 255.0 * 0.224


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
# Model, input and timing (shared by both children)
# ---------------------------------------------------------------------------------------------------------------
def build(model_name: str) -> tuple[torch.nn.Module, str, str]:
    """-> (model, probed layer name, description); weights as initialised by the current torch seed."""
    if model_name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None, num_classes=10), "layer4", "ResNet-18 (random init) layer4"
    if model_name == "small_cnn":
        from featurelens.models import build_model

        model = build_model("small_cnn", 10)
        name = [n for n, m in model.named_modules() if n.startswith("features.") and isinstance(m, torch.nn.ReLU)][-1]
        return model, name, f"small_cnn 32-32-64-64-128-128 (random init) {name} (last block)"
    raise ValueError(f"unknown --model {model_name!r}")


def lite_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Lite's input normalisation for [0, 1] float32 images (the dataset's), with Lite's exact roundings.

    Lite: uint8 -> float32, minus the mean in float64 rounded to float32 (numpy in-place ``-=``), then
    ``div_(255·0.224)`` on the CPU tensor. Done here on the CPU too (CUDA divides by a scalar via its reciprocal).
    """
    v = (x.cpu() * 255).round().double()  # the uint8 pixel values, exactly
    y = (v - torch.tensor(LITE_MEAN_RGB, dtype=torch.float64).view(1, 3, 1, 1)).float()
    return (y / LITE_SCALE).to(x.device)


class ForwardClock:
    """Seconds from the model's input to ``layer``'s output, summed per phase (``phase()`` -> 0 or 1) over every
    forward, in whichever thread it ran.

    The start is taken by wrapping ``model.forward`` (Lite calls ``model.forward(x)`` directly, which skips the
    module's hooks), the end by a hook on ``layer`` that runs before any other.
    """

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module, device: str, phase=lambda: 0):
        self.seconds = [0.0, 0.0]
        self._start = threading.local()
        self._lock = threading.Lock()
        self._cuda = device.startswith("cuda")
        self._phase = phase
        self._model, forward = model, model.forward

        def timed_forward(*args, **kwargs):
            self._start.t0 = self._now()
            return forward(*args, **kwargs)

        model.forward = timed_forward
        self._handle = layer.register_forward_hook(self._stop, prepend=True)

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _stop(self, _module, _args, _out) -> None:
        dt = self._now() - self._start.t0
        with self._lock:
            self.seconds[self._phase()] += dt

    def remove(self) -> None:
        del self._model.forward  # back to the class's method
        self._handle.remove()


def _quiet(log_path: str) -> None:
    """Send this process's prints (Lite prints every batch) to a log file."""
    sys.stdout = sys.stderr = open(log_path, "w", buffering=1)  # open as long as the process lives


# ---------------------------------------------------------------------------------------------------------------
# The project, in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def _timed_broden():
    from featurelens.analysis.dissection import parse_labels
    from featurelens.data.broden import BrodenDataset

    class TimedBroden(BrodenDataset):
        """BrodenDataset that sums the seconds spent decoding images and decoding + parsing masks, in this process
        and in its DataLoader workers (forked, so they inherit the shared counters)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.decode_s = {"images": mp.Value("d", 0.0), "masks": mp.Value("d", 0.0)}

        def seconds(self) -> dict[str, float]:
            return {k: v.value for k, v in self.decode_s.items()}

        def _timed(self, key: str, fn, i: int):
            t0 = time.perf_counter()
            out = fn(i)
            with self.decode_s[key].get_lock():
                self.decode_s[key].value += time.perf_counter() - t0
            return out

        def load_image(self, i):
            return self._timed("images", super().load_image, i)

        def load_labels(self, i):
            return self._timed("masks", lambda j: parse_labels(super(TimedBroden, self).load_labels(j)), i)

        def __getitem__(self, i):
            return self.load_image(i), self.load_labels(i)

    return TimedBroden


class PassClock:
    """The start of ``dissect``'s pass 2 (the tallies are built once the thresholds are known) and the decoding
    seconds of ``ds`` at that moment: wraps ``IoUTally.__init__``."""

    def __init__(self, ds):
        from featurelens.analysis.dissection import measure

        self.start: float | None = None
        self.decoded: dict[str, float] | None = None
        self._cls, self._init = measure.IoUTally, measure.IoUTally.__init__
        init = self._init

        def timed_init(tally, *args, **kwargs):
            if self.start is None:
                self.start, self.decoded = time.perf_counter(), ds.seconds()
            init(tally, *args, **kwargs)

        self._cls.__init__ = timed_init

    def phase(self) -> int:
        return int(self.start is not None)

    def remove(self) -> None:
        self._cls.__init__ = self._init


class LiteCounting(torch.utils.data.Dataset):
    """The data with NetDissect-Lite's multiplicities made explicit, for the agreement check.

    Lite adds, per image and pixel, one count per occurrence of a label: each listing of an image-level label
    (whole grid) and each mask layer holding it; the project counts the union once. Here every occurrence after
    the first keeps the project's semantics but gets a virtual label ``offset·r + c`` (r = its rank, offset =
    C + 1), so ``dissect`` on this view tallies Lite's excess in the virtual columns and the real ones unchanged.
    """

    def __init__(self, ds):
        self.ds, self.offset = ds, ds.num_labels
        self.categories = ds.categories
        most = max((sum(len(rec[c]) for c in ds.categories) for rec in ds.records), default=1)
        self.ranks = max(1, most - 1)  # the highest r possible
        self.num_labels = self.offset * (self.ranks + 1)
        prim = np.asarray(ds.primary_category)
        self.primary_category = np.tile(prim, self.ranks + 1)

    def __len__(self) -> int:
        return len(self.ds)

    def load_image(self, i):
        return self.ds.load_image(i)

    def load_labels(self, i):
        from featurelens.data.broden import BrodenDataset

        labels = BrodenDataset.load_labels(self.ds, i)  # the masks as read (the timed subclass parses them)
        image_level = [labels[c].reshape(-1) for c in self.categories if self.ds.image_level[c]]
        img = torch.cat(image_level) if image_level else torch.zeros(0, dtype=torch.int64)
        img = img[img > 0]
        listed = torch.bincount(img, minlength=self.offset)  # listings per label
        extra_img = [self.offset * r + int(c) for c in img.unique() for r in range(1, int(listed[c]))]
        pixel = [labels[c] for c in self.categories if not self.ds.image_level[c]]
        pix = torch.cat(pixel) if pixel else torch.zeros(0, 1, 1, dtype=torch.int64)
        extra_pix = []
        for j in range(pix.shape[0]):
            lab = pix[j]
            rank = (pix[:j] == lab).sum(dim=0) + listed[lab]  # occurrences of this label before this one
            extra_pix.append(torch.where((lab > 0) & (rank > 0), self.offset * rank + lab, 0))
        out = dict(labels)
        out["lite_excess_image"] = torch.tensor(extra_img, dtype=torch.int64)
        out["lite_excess_pixel"] = torch.stack(extra_pix) if extra_pix else pix[:0]
        return out

    def __getitem__(self, i):
        return self.load_image(i), self.load_labels(i)


def _tally_arrays(res: dict) -> dict:
    return {k: res["tally"][k].numpy() for k in ("intersection", "label_count", "act_lite", "act_total")}


def project_child(root: str, cfg: dict, result_path: str) -> None:
    """Set up, reset the RSS peak, ``dissect``, pickle timings, tallies and (for the check) Lite's excess."""
    _quiet(result_path + ".log")
    torch.set_num_threads(cfg["threads"])
    mp.set_start_method("fork", force=True)  # DataLoader workers as on Linux by default (this child was spawned)
    from featurelens.analysis.dissection import dissect

    dev = cfg["device"]
    ds = _timed_broden()(root)
    model, layer_name, _ = build(cfg["model"])
    model.load_state_dict(torch.load(cfg["weights"]))
    model = model.eval().to(dev)
    layer = model.get_submodule(layer_name)
    with torch.no_grad():  # warm-up (allocator, kernels) outside the measurement
        model(lite_preprocess(ds.load_image(0)[None].to(dev)))
    passes = PassClock(ds)
    clock = ForwardClock(model, layer, dev, phase=passes.phase)
    kw = {"q": Q, "denominator": "lite", "device": dev, "batch_size": cfg["batch_size"], "preprocess": lite_preprocess,
          "num_workers": cfg["workers"]}
    decoded0 = ds.seconds()
    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    res = dissect(model, layer, ds, ds.num_labels, ds.primary_category, **kw)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    hwm = _status_kb("VmHWM")
    clock.remove()
    passes.remove()
    # seconds summed over the threads that run batches side by side, as seconds of the pass's wall time
    per = 1 / res["threads"]
    fwd = [per * s for s in clock.seconds]
    pass1 = {k: per * (v - decoded0[k]) for k, v in passes.decoded.items()}  # decoding seconds per pass
    pass2 = {k: per * (v - decoded0[k]) - pass1[k] for k, v in ds.seconds().items()}
    # decoding in this process is inside its pass's wall time; in DataLoader workers it runs beside it
    inside = 0 if cfg["workers"] else 1
    out = {"seconds": t1 - t0, "rss0_kb": rss0, "hwm_kb": hwm, "peak_reset": reset, "disk_bytes": 0,
           "forward_passes": res["forward_passes"], "labels_cached": res["labels_cached"],
           "onednn": res["onednn"], "threads": res["threads"],
           "forward": sum(fwd), "features": sum(fwd) + pass1["images"] + pass2["images"],
           "threshold": passes.start - t0 - fwd[0] - inside * (pass1["images"] + pass1["masks"]),
           # the tally stage's work includes every mask decoded and parsed, in whichever pass
           "tally": t1 - passes.start - fwd[1] - inside * (pass2["images"] + pass2["masks"])
           + pass1["masks"] + pass2["masks"],
           "thresholds": res["thresholds"].numpy(), "tally_arrays": _tally_arrays(res),
           "detectors": res["counts"]["detectors"], "unit_score": res["labels"]["score"].numpy(),
           "unit_label": [ds.label_names[c] for c in res["labels"]["label"].tolist()],
           "categories": list(ds.categories), "label_names": list(ds.label_names),
           "primary": [ds.categories[k] if k >= 0 else None for k in ds.primary_category]}
    np.save(cfg["thresholds_out"], out["thresholds"])
    if cfg["check"]:
        view = LiteCounting(ds)
        ex = dissect(model, layer, view, view.num_labels, view.primary_category, categories=ds.categories, **kw)
        assert np.array_equal(ex["thresholds"].numpy(), out["thresholds"]), "thresholds changed between runs"
        t = _tally_arrays(ex)
        U, L = t["intersection"].shape[0], ds.num_labels
        out["excess"] = {"intersection": t["intersection"].reshape(U, -1, L)[:, 1:].sum(axis=1),
                         "label_count": t["label_count"].reshape(-1, L)[1:].sum(axis=0),
                         "act_lite": t["act_lite"] - out["tally_arrays"]["act_lite"],
                         "act_total": t["act_total"] - out["tally_arrays"]["act_total"]}
    with open(result_path, "wb") as fh:
        pickle.dump(out, fh)


# ---------------------------------------------------------------------------------------------------------------
# NetDissect-Lite: temporary copy, shims, and the driver (in a fresh process)
# ---------------------------------------------------------------------------------------------------------------
IMRESIZE = '''\
# bench_dissection shim: scipy.misc.imresize is gone (SciPy 1.3). For mode='F' it was a PIL bilinear resize of
# the float32 map (toimage -> Image.resize(size[::-1], BILINEAR) -> fromimage); UPSAMPLE = 'torch' (set by the
# benchmark for one agreement tally) uses torch's bilinear interpolation, the project's arithmetic, instead.
UPSAMPLE = 'pil'
UPSAMPLE_DEVICE = 'cpu'


def imresize(arr, size, mode=None):
    arr = np.asarray(arr, dtype=np.float32)
    if UPSAMPLE == 'torch':
        t = torch.from_numpy(arr)[None, None].to(UPSAMPLE_DEVICE)
        t = torch.nn.functional.interpolate(t, size=tuple(size), mode='bilinear', align_corners=False)
        return t[0, 0].cpu().numpy()
    from PIL import Image
    im = Image.frombytes('F', (arr.shape[1], arr.shape[0]), arr.tobytes())
    return np.asarray(im.resize((size[1], size[0]), Image.BILINEAR))
'''

IMREAD = '''\
def imread(path):  # bench_dissection shim: scipy.misc.imread is gone (SciPy 1.2); it was PIL's open + array
    from PIL import Image
    with Image.open(path) as im:
        return numpy.array(im.convert('RGB'))
'''

SAVE_TALLY = '''\
        if savepath:  # bench_dissection shim: keep the raw tallies next to the csv
            np.savez(csvpath + '.npz', tally_both=tally_both, tally_labels=tally_labels, tally_units=tally_units,
                     tally_units_cat=tally_units_cat)
        primary_categories = self.data.primary_categories_per_index()
'''

# (file, old text, new text, number of occurrences expected)
LITE_SHIMS = [
    ("loader/model_loader.py", "torch.load(settings.MODEL_FILE)", "torch.load(settings.MODEL_FILE, weights_only=False)",
     1),
    ("loader/model_loader.py", "model._modules.get(name)", "model.get_submodule(name)", 1),
    ("feature_operation.py", "from scipy.misc import imresize\n", "", 1),
    ("feature_operation.py", "\nfeatures_blobs = []", "\n" + IMRESIZE + "\n\nfeatures_blobs = []", 1),
    ("feature_operation.py", "input_var = V(input,volatile=True)", "input_var = input  # driver: no_grad", 1),
    ("feature_operation.py", "        primary_categories = self.data.primary_categories_per_index()\n", SAVE_TALLY, 1),
    ("loader/data_loader.py", "from scipy.misc import imread\n", "", 1),
    ("loader/data_loader.py", "from scipy.ndimage.interpolation import zoom\n",
     "from scipy.ndimage import zoom\n\n\n" + IMREAD, 1),
    ("loader/data_loader.py", "raise StopIteration", "return", 2),
    ("loader/data_loader.py", "[:,:,1] * 256", "[:,:,1].astype(numpy.int32) * 256", 4),
    ("loader/data_loader.py", "result[list(np.indices(arr.shape)) + [arr]] = 1",
     "result[tuple(np.indices(arr.shape)) + (arr,)] = 1", 1),
    ("util/vecquantile.py", "numpy.NaN", "numpy.nan", 1),
]

LITE_OUTPUT = "result/bench"


def prepare_lite(src: Path, dst: Path, cfg: dict, root: Path, categories: list[str]) -> None:
    """Copy the Lite checkout (code only) to ``dst``, apply :data:`LITE_SHIMS` and the settings overrides."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "dataset", "zoo", "result", "__pycache__"))
    for rel, old, new, count in LITE_SHIMS:
        path = dst / rel
        text = path.read_text()
        if text.count(old) != count:
            raise RuntimeError(f"NetDissect-Lite {rel}: expected {count} x {old!r}, found {text.count(old)}; "
                               f"this script's shims are written for commit 2163454")
        path.write_text(text.replace(old, new))
    overrides = {"GPU": cfg["device"].startswith("cuda"), "MODEL": cfg["model"], "DATASET": "synthbroden",
                 "NUM_CLASSES": 10, "MODEL_FILE": cfg["lite_model_file"], "MODEL_PARALLEL": False,
                 "FEATURE_NAMES": [cfg["layer"]], "DATA_DIRECTORY": str(root), "IMG_SIZE": cfg["size"],
                 "QUANTILE": Q, "CATAGORIES": categories, "BATCH_SIZE": cfg["batch_size"],
                 "OUTPUT_FOLDER": LITE_OUTPUT, "CLEAN": False}
    with open(dst / "settings.py", "a") as fh:
        fh.write("\n# ---- bench_dissection.py overrides: this benchmark's data, model, layer and q ----\n")
        fh.writelines(f"{k} = {v!r}\n" for k, v in overrides.items())


def _lite_arrays(csv_path: str) -> dict:
    z = np.load(csv_path + ".npz")
    return {"intersection": z["tally_both"], "label_count": z["tally_labels"], "act_lite": z["tally_units_cat"],
            "act_total": z["tally_units"]}


def lite_child(copy_dir: str, cfg: dict, result_path: str) -> None:
    """Lite's main.py steps 1-3 in ``copy_dir``, timed; then (check) its tally with the project's thresholds."""
    _quiet(result_path + ".log")
    os.chdir(copy_dir)
    sys.path.insert(0, copy_dir)
    torch.set_num_threads(cfg["threads"])
    torch.set_grad_enabled(False)  # what Variable(volatile=True) meant
    mp.set_start_method("fork", force=True)  # Lite's prefetcher pools, as on Linux (this child was spawned)
    import feature_operation
    import settings
    from feature_operation import FeatureOperator, hook_feature
    from loader.model_loader import loadmodel

    dev = cfg["device"]
    fo = FeatureOperator()
    model = loadmodel(hook_feature)
    layer = model.get_submodule(settings.FEATURE_NAMES[0])
    model(torch.zeros(1, 3, settings.IMG_SIZE, settings.IMG_SIZE, device=dev))  # warm-up
    del feature_operation.features_blobs[:]
    clock = ForwardClock(model, layer, dev)
    reset = _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    features, _ = fo.feature_extraction(model=model)
    t1 = time.perf_counter()
    thresholds = fo.quantile_threshold(features[0], savepath="quantile.npy")
    t2 = time.perf_counter()
    fo.tally(features[0], thresholds, savepath="tally.csv")
    t3 = time.perf_counter()
    hwm = _status_kb("VmHWM")
    clock.remove()
    out_dir = Path(settings.OUTPUT_FOLDER)
    disk = sum(f.stat().st_size for f in out_dir.glob("*.mmap"))
    out = {"seconds": t3 - t0, "rss0_kb": rss0, "hwm_kb": hwm, "peak_reset": reset, "disk_bytes": disk,
           "forward": clock.seconds[0], "features": t1 - t0, "threshold": t2 - t1, "tally": t3 - t2,
           "thresholds": np.asarray(thresholds, dtype=np.float64),
           "tally_arrays": _lite_arrays(str(out_dir / "tally.csv")),
           "detectors": int((pd.read_csv(out_dir / "tally.csv")["score"] > TAU).sum()),
           "categories": fo.data.category_names(),
           "primary": [fo.data.category_names()[k] for k in fo.data.primary_categories_per_index()]}
    if cfg["check"]:
        proj_t = np.load(cfg["thresholds_in"])
        vals = np.sort(np.asarray(features[0]).transpose(1, 0, 2, 3).reshape(len(proj_t), -1), axis=1)
        r = (1 - Q) * (vals.shape[1] - 1)  # spec §2.2, the project's exact quantile
        lo = int(np.floor(r))
        exact = vals[:, lo] + (r - lo) * (vals[:, min(lo + 1, vals.shape[1] - 1)] - vals[:, lo])
        out["feature_check"] = float(np.max(np.abs(exact - proj_t) / np.maximum(np.abs(proj_t), 1e-30)))
        out["share_above"] = {"lite": float((vals > out["thresholds"][:, None]).mean()),
                              "project": float((vals > proj_t[:, None]).mean())}
        feature_operation.UPSAMPLE_DEVICE = dev
        for upsample in ("pil", "torch"):
            feature_operation.UPSAMPLE = upsample
            path = f"tally_project_thresholds_{upsample}.csv"
            fo.tally(features[0], proj_t, savepath=path)
            out[f"check_{upsample}"] = _lite_arrays(str(out_dir / path))
        out["check_table"] = pd.read_csv(out_dir / "tally_project_thresholds_torch.csv", keep_default_na=False)
    with open(result_path, "wb") as fh:
        pickle.dump(out, fh)


# ---------------------------------------------------------------------------------------------------------------
# Parent: data, weights, children, comparison, report
# ---------------------------------------------------------------------------------------------------------------
def run_child(target, args: tuple, result_path: Path) -> dict:
    """Run ``target(*args, result_path)`` in a fresh spawn process and return what it pickled."""
    proc = mp.get_context("spawn").Process(target=target, args=(*args, str(result_path)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        log = Path(str(result_path) + ".log")
        tail = "\n".join(log.read_text().splitlines()[-30:]) if log.is_file() else "(no log)"
        raise RuntimeError(f"{target.__name__} failed with exit code {proc.exitcode}; log {log}:\n{tail}")
    with open(result_path, "rb") as fh:
        return pickle.load(fh)


def _align(lite: dict, lite_cats: list[str], cats: list[str]) -> dict:
    """Lite's tallies as int64, A^lite columns in the project's category order."""
    out = {k: np.rint(v).astype(np.int64) for k, v in lite.items()}
    out["act_lite"] = out["act_lite"][:, [lite_cats.index(c) for c in cats]]
    return out


def _diff(a: dict, b: dict) -> dict:
    """Per tally: (number of entries that differ, max |difference|)."""
    out = {}
    for k in ("intersection", "label_count", "act_lite", "act_total"):
        d = np.abs(a[k] - b[k])
        out[k] = (int((d != 0).sum()), int(d.max()) if d.size else 0)
    return out


def _fmt_diff(d: dict, shapes: dict) -> str:
    names = {"intersection": "I", "label_count": "G", "act_lite": "A^lite", "act_total": "sum|M|"}
    return ", ".join(f"{names[k]} {n}/{shapes[k]}" + (f" (max |d| {m})" if n else "") for k, (n, m) in d.items())


def agreement(proj: dict, lite: dict, n: int) -> list[str]:
    """Report lines comparing the tallies (see the module docstring)."""
    cats, names = proj["categories"], proj["label_names"]
    p = proj["tally_arrays"]
    shapes = {k: v.size for k, v in p.items()}
    lines = [f"agreement at N={n} (Lite's tally run again with the project's exact thresholds):"]
    if proj["primary"][1:] != lite["primary"][1:]:
        bad = [names[c] for c in range(1, len(names)) if proj["primary"][c] != lite["primary"][c]]
        lines.append(f"  primary categories differ for {bad} (coverage ties broken in another category order)")
    fc = lite["feature_check"]
    lines.append("  features: " + ("Lite's stored activations reproduce the project's thresholds exactly" if fc == 0
                                   else f"the project's thresholds from Lite's stored activations: max rel diff "
                                        f"{fc:.1e}"))
    same = _align(lite["check_torch"], lite["categories"], cats)
    plain = _diff(same, p)
    table = lite["check_table"].set_index("unit")
    scored = [k for k in range(len(proj["unit_score"])) if proj["unit_score"][k] > 0]
    relabelled = sum(table.at[k + 1, "label"] != proj["unit_label"][k] for k in scored)
    dscore = max((abs(table.at[k + 1, "score"] - proj["unit_score"][k]) for k in scored), default=0.0)
    lines.append(f"  Lite (torch upsampling, the project's arithmetic) vs the project, entries that differ: "
                 f"{_fmt_diff(plain, shapes)}; tally.csv unit labels: {relabelled} of {len(scored)} units "
                 f"(score > 0) differ, max |d score| {dscore:.2g}")
    ex = proj["excess"]
    excess_labels = sorted(set(np.nonzero(ex["label_count"])[0]) | set(np.nonzero(ex["intersection"].any(0))[0]))
    if excess_labels:
        desc = ", ".join(f"{names[c]} (G +{int(ex['label_count'][c])} px; I +{int(ex['intersection'][:, c].sum())} "
                         f"px over {int((ex['intersection'][:, c] != 0).sum())} units)" for c in excess_labels)
        lines.append(f"  Lite's double counting in this data (spec §2.4: Lite sums a label's occurrences at a pixel, "
                     f"image-level listing and mask layers, the project counts their union): {desc}")
    else:
        lines.append("  no label occurs twice at a pixel in this data (no image-level label with pixel-level "
                     "copies, no label in two mask layers), so Lite's sums are the project's unions")
    with_ex = {k: p[k] + ex[k] for k in p}
    rest = _diff(same, with_ex)
    unexplained = sum(v[0] for v in rest.values())
    if unexplained:
        lines.append(f"  Lite vs project + that double counting: {unexplained} entries UNEXPLAINED: "
                     f"{_fmt_diff(rest, shapes)}")
    elif sum(v[0] for v in plain.values()):
        lines.append("  Lite = project + that double counting, exactly: every difference is the documented one")
    else:
        lines.append("  Lite = project, exactly")
    pil = _diff(_align(lite["check_pil"], lite["categories"], cats), with_ex)
    n_pil = sum(v[0] for v in pil.values())
    lines.append("  with Lite's own upsampling (PIL, as scipy.misc.imresize) instead: " + (
        "the same, exactly" if n_pil == 0 else f"{_fmt_diff(pil, shapes)} differ from project + double counting "
                                               "(PIL's and torch's float32 bilinear values differ in the last bit; "
                                               "pixels within that of T_k flip)"))
    own = _diff(_align(lite["tally_arrays"], lite["categories"], cats), p)
    sa = lite["share_above"]
    lines.append(f"  Lite end to end (its sketch thresholds: {100 * sa['lite']:.3f}% of raw values above them, "
                 f"exact {100 * sa['project']:.3f}%): {_fmt_diff(own, shapes)} differ; detectors "
                 f"(IoU^lite > {TAU}) Lite {lite['detectors']}, project {proj['detectors']}")
    return lines


def _impl_hash() -> str:
    """md5 (first 12 hex digits) of the dissection module's source, to tie the numbers to a version."""
    spec = importlib.util.find_spec("featurelens.analysis.dissection.measure")
    return hashlib.md5(Path(spec.origin).read_bytes()).hexdigest()[:12]


def _lite_version(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit (not a git checkout)"


def _row(name: str, n: int, r: dict, runs: list[dict]) -> dict:
    totals = sorted(x["seconds"] for x in runs)
    return {"implementation": name, "images": n, "total s": round(r["seconds"], 2),
            "runs: min-max s": f"{totals[0]:.2f}-{totals[-1]:.2f}" if len(totals) > 1 else "",
            "images/s": round(n / r["seconds"], 1), "features s": round(r["features"], 2),
            "(forward s)": round(r["forward"], 2), "threshold s": round(r["threshold"], 2),
            "tally s": round(r["tally"], 2), "peak RSS MiB": round(r["hwm_kb"] / 1024, 1),
            "peak growth MiB": round((r["hwm_kb"] - r["rss0_kb"]) / 1024, 1),
            "on disk MiB": round(r["disk_bytes"] / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lite", type=Path, default=None, help=f"a NetDissect-Lite checkout ({LITE_URL})")
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "small_cnn"])
    parser.add_argument("--size", type=int, default=None, help="image side (masks are half); default 112 for "
                                                                "resnet18, 32 for small_cnn")
    parser.add_argument("--n-images", type=int, nargs="+", default=[300, 600], help="dataset sizes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="the project's DataLoader workers (num_workers)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each implementation per size (median shown)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0, help="model weights and synthbroden seed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (Lite's GPU flag follows)")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep synthbroden here (default: temp dir)")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the agreement check")
    parser.add_argument("--out", default=None, help="optional CSV of the table")
    args = parser.parse_args()
    size = args.size or (112 if args.model == "resnet18" else 32)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible to torch")
    if args.lite is not None and not (args.lite / "feature_operation.py").is_file():
        parser.error(f"--lite {args.lite}: not a NetDissect-Lite checkout (no feature_operation.py)")
    if args.lite is None:
        print(f"NetDissect-Lite not given (--lite PATH): measuring the project only. To compare, get it with\n"
              f"    git clone {LITE_URL}\nand pass --lite NetDissect-Lite.\n")
    check = args.check and args.lite is not None
    impl_hash = _impl_hash()

    from featurelens.data.broden import BrodenDataset
    from featurelens.data.synthbroden import write_synthbroden

    tmp = tempfile.TemporaryDirectory(prefix="bench_dissection_")
    work = Path(tmp.name)
    data_dir = (args.data_dir or work).resolve()  # Lite runs in its own working directory
    torch.manual_seed(args.seed)
    model, layer, model_desc = build(args.model)
    weights = work / "weights.pt"
    torch.save(model.state_dict(), weights)
    lite_model_file = weights
    if args.model != "resnet18":  # not a torchvision name: Lite loads it as a whole pickled model
        lite_model_file = work / "model.pt"
        torch.save(model, lite_model_file)
    cfg = {"model": args.model, "layer": layer, "size": size, "batch_size": args.batch_size, "device": args.device,
           "threads": args.threads, "workers": args.workers, "weights": str(weights),
           "lite_model_file": str(lite_model_file), "check": check}

    runs: dict[tuple[str, int], list[dict]] = {}
    report: list[str] = []
    for n in args.n_images:
        root = data_dir / f"synthbroden_{n}_{size}_{args.seed}"
        if not (root / "index.csv").is_file():
            print(f"writing synthbroden: {n} images at {size} px ...", file=sys.stderr, flush=True)
            write_synthbroden(root, n_images=n, size=size, seed=args.seed)
        thresholds = work / f"thresholds_{n}.npy"
        with open(root / "category.csv") as fh:
            lite_cats = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
        for rep in range(args.repeat):  # alternating, so a slow spell of the machine hits both
            run_cfg = {**cfg, "check": check and rep == 0}
            print(f"featurelens dissect on {n} images (run {rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
            runs.setdefault(("project", n), []).append(run_child(
                project_child, (str(root), {**run_cfg, "thresholds_out": str(thresholds)}), work / f"project_{n}.pkl"))
            if args.lite is None:
                continue
            copy = work / f"lite_{n}"
            prepare_lite(args.lite, copy, cfg, root, lite_cats)
            print(f"NetDissect-Lite on {n} images (run {rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
            runs.setdefault(("lite", n), []).append(run_child(
                lite_child, (str(copy), {**run_cfg, "thresholds_in": str(thresholds)}), work / f"lite_{n}.pkl"))
            shutil.rmtree(copy)  # its memmaps
        if check:
            report += agreement(runs[("project", n)][0], runs[("lite", n)][0], n)
    # each row: the run with the median total time (its stages are that run's)
    results = {key: sorted(rs, key=lambda r: r["seconds"])[(len(rs) - 1) // 2] for key, rs in runs.items()}

    def name(impl: str, r: dict) -> str:
        if impl == "lite":
            return "NetDissect-Lite"
        passes = r["forward_passes"]
        masks = ", masks read in pass 1" if r["labels_cached"] else ""
        how = f", {r['threads']} batches at once" + (", oneDNN layout" if r["onednn"] else "")
        return f"featurelens dissect ({passes} forward pass{'es' if passes > 1 else ''}{masks}{how})"

    table = pd.DataFrame([_row(name(impl, r), n, r, runs[(impl, n)]) for (impl, n), r in results.items()])
    ds = BrodenDataset(data_dir / f"synthbroden_{args.n_images[0]}_{size}_{args.seed}")
    print(f"## Network dissection: {model_desc}, synthbroden {size} px (masks {size // 2}), q = {Q}, batch "
          f"{args.batch_size}, {ds.num_labels - 1} labels, {len(ds.categories)} categories, device {args.device}\n")
    print(table.to_markdown(index=False))
    if args.lite is not None:
        rows = []
        for n in args.n_images:
            lite, proj = results[("lite", n)], results[("project", n)]
            rows.append({"images": n, "end to end: Lite s / project s": round(lite["seconds"] / proj["seconds"], 1),
                         "tally stage: Lite s / project s": round(lite["tally"] / proj["tally"], 1)})
        print("\n" + pd.DataFrame(rows).to_markdown(index=False))
    if report:
        print("\n" + "\n".join(report))
    if not all(r["peak_reset"] for r in results.values()):
        print("\nnote: /proc/self/clear_refs unavailable, peaks include set-up")
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"\nmeasured: wall times and peak RSS of each run in a fresh spawn process (see the script's docstring); "
          f"machine: {os.cpu_count()} CPUs ({platform.machine()}, {dev}), {args.threads} torch threads per process, "
          f"torch {torch.__version__}, numpy {np.__version__}, {platform.system()} {platform.release()}")
    now = _impl_hash()
    print(f"implementation: featurelens.analysis.dissection md5 {impl_hash}"
          + ("" if now == impl_hash else f" (CHANGED during the run, now {now}: results may mix versions)")
          + (f"; NetDissect-Lite {_lite_version(args.lite)}" if args.lite is not None else ""))
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
