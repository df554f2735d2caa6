"""StyleGAN-XL behind the generator protocol (linking spec §6), loaded from a local checkout and pickle.

No StyleGAN code lives in this repository: the adapter prepends the user's StyleGAN-XL checkout to
``sys.path`` when it is built, imports that checkout's ``legacy`` module and unpickles ``G_ema`` with its
``load_network_pkl``. **Unpickling runs code**: load only pickles you trust. Paths containing ``://`` are
refused, because the checkout's URL opener would download them.

The fused CUDA ops of StyleGAN-XL compile only for CUDA tensors; on the CPU they take a slow pure-PyTorch
path, so expect to need a GPU for real networks.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurelens.errors import ConfigError
from featurelens.models.generators.base import check_class, freeze, truncate

__all__ = ["StyleGANXLAdapter"]

W_AVG_SAMPLES = 4096
_CHECKOUT_MODULES = ("legacy", "dnnlib", "torch_utils")


def _local_path(key: str, value: str | Path | None, want_dir: bool) -> Path:
    """``value`` as a local path that exists; ConfigError naming ``generator.<key>`` otherwise."""
    if value is None or str(value) == "":
        what = "/path/to/stylegan-xl (a git checkout)" if want_dir else "/path/to/network.pkl"
        raise ConfigError(f"generator.{key}=null: stylegan_xl needs generator.{key}={what}")
    if "://" in str(value):
        raise ConfigError(f"generator.{key}={str(value)!r}: only local paths are allowed (no URLs; the checkout's "
                          "URL opener would download); download the file yourself and pass its path")
    path = Path(str(value)).expanduser()
    if want_dir and not path.is_dir():
        raise ConfigError(f"generator.{key}={str(path)!r}: no such directory (a StyleGAN-XL checkout with legacy.py)")
    if not want_dir and not path.is_file():
        raise ConfigError(f"generator.{key}={str(path)!r}: no such file (a StyleGAN-XL network pickle)")
    return path


def _import_legacy(checkout: Path):
    """The checkout's ``legacy`` module; modules of the same names cached from another folder are dropped first."""
    root = str(checkout.resolve())
    if not (checkout / "legacy.py").is_file():
        raise ConfigError(f"generator.checkout={str(checkout)!r} has no legacy.py; is it a StyleGAN-XL checkout?")
    for name in list(sys.modules):
        if name.split(".")[0] in _CHECKOUT_MODULES:
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file and not str(Path(file).resolve()).startswith(root):
                del sys.modules[name]
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    return importlib.import_module("legacy")


class StyleGANXLAdapter(nn.Module):
    """A StyleGAN-XL ``G_ema`` with the generator protocol: ``sample_w``, ``synthesize``, ``w_avg``.

    Args:
        checkout: local StyleGAN-XL checkout (holds ``legacy.py``, ``dnnlib/``, ``torch_utils/``).
        pkl: local network pickle (e.g. ``imagenet256.pkl``).
        quantize_uint8: repeat the reference's uint8 round trip of the images (its ``w_to_img``:
            ``(x + 1) * 255/2``, clamped to [0, 255], truncated to uint8).
        device: where the network runs.
        num_classes, resolution: what the caller expects (checked against ``c_dim`` / ``img_resolution`` when
            not None).
    """

    # the central part of an image the classifier sees (analysis.linking.crop: null): the reference's
    # Resize(256) + CenterCrop(224) ImageNet view
    classifier_crop = 224 / 256

    def __init__(self, checkout: str | Path | None, pkl: str | Path | None, quantize_uint8: bool = True,
                 device: str | torch.device = "cpu", num_classes: int | None = None, resolution: int | None = None):
        super().__init__()
        for key, value in (("checkout", checkout), ("pkl", pkl)):  # refuse URLs before touching any path
            if value is not None and "://" in str(value):
                _local_path(key, value, want_dir=key == "checkout")
        checkout_path = _local_path("checkout", checkout, want_dir=True)
        pkl_path = _local_path("pkl", pkl, want_dir=False)
        legacy = _import_legacy(checkout_path)
        with open(pkl_path, "rb") as f:  # a plain file: the checkout's URL opener is never used
            network = legacy.load_network_pkl(f)
        if not isinstance(network, dict) or "G_ema" not in network:
            raise ConfigError(f"generator.pkl={str(pkl_path)!r} holds no G_ema network")
        self.G = freeze(network["G_ema"].to(device).float())
        self.z_dim, self.w_dim = int(self.G.z_dim), int(self.G.w_dim)
        self.num_classes, self.num_ws = int(self.G.c_dim), int(self.G.num_ws)
        self.resolution = int(self.G.img_resolution)
        self.quantize_uint8 = bool(quantize_uint8)
        self.checkout, self.pkl = checkout_path, pkl_path
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise ConfigError(f"generator.pkl={str(pkl_path)!r} has c_dim={self.num_classes} classes but "
                              f"data.num_classes={num_classes}")
        if resolution is not None and int(resolution) != self.resolution:
            raise ConfigError(f"generator.pkl={str(pkl_path)!r} makes {self.resolution}px images but "
                              f"{resolution}px were asked for")
        self._w_avg_cache: dict[int, torch.Tensor] = {}
        freeze(self)

    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device

    def _onehot(self, n: int, c: int) -> torch.Tensor:
        onehot = torch.zeros(n, self.num_classes, device=self.device)
        onehot[:, int(c)] = 1
        return onehot

    def _map(self, z: torch.Tensor, c: int) -> torch.Tensor:
        ws = self.G.mapping(z, self._onehot(len(z), c), truncation_psi=1)
        return ws[:, 0] if ws.dim() == 3 else ws  # all num_ws copies are equal before truncation cut-offs

    @torch.no_grad()
    def w_avg(self, c: int) -> torch.Tensor:
        """The class mean: ``mapping.w_avg[c]`` if the network tracks per-class means, else the mean of the
        mapping over 4096 z from ``RandomState(0)`` (computed once per class)."""
        check_class(c, self.num_classes)
        c = int(c)
        if c not in self._w_avg_cache:
            tracked = getattr(self.G.mapping, "w_avg", None)
            if isinstance(tracked, torch.Tensor) and tracked.dim() == 2 and tracked.shape[0] == self.num_classes:
                self._w_avg_cache[c] = tracked[c].float().to(self.device)
            else:
                z = torch.from_numpy(np.random.RandomState(0).randn(W_AVG_SAMPLES, self.z_dim)).float()
                self._w_avg_cache[c] = torch.cat([self._map(part.to(self.device), c)
                                                  for part in z.split(256)]).mean(0)
        return self._w_avg_cache[c].clone()

    @torch.no_grad()
    def sample_w(self, n: int, class_idx: int, psi: float = 0.7, seed: int = 0) -> torch.Tensor:
        """``(n, w_dim)``: ``RandomState(seed).randn(n, z_dim)`` (one seed per batch, as the reference), the
        mapping with the one-hot class, then truncation toward ``w_avg(class_idx)``."""
        check_class(class_idx, self.num_classes)
        z = torch.from_numpy(np.random.RandomState(int(seed)).randn(int(n), self.z_dim)).float().to(self.device)
        return truncate(self._map(z, class_idx), self.w_avg(class_idx), psi)

    def synthesize(self, w: torch.Tensor) -> torch.Tensor:
        """``(n, w_dim)`` (or ``(n, num_ws, w_dim)``) -> float32 NCHW in [0, 1] on the device."""
        w = w.to(self.device, torch.float32)
        ws = w.unsqueeze(1).repeat(1, self.num_ws, 1) if w.dim() == 2 else w
        x = self.G.synthesis(ws, noise_mode="none", force_fp32=True).float()
        if self.quantize_uint8:  # the reference's w_to_img: ((x + 1) * 255/2).clamp(0, 255).to(uint8), truncating
            return ((x + 1) * (255 / 2)).clamp(0, 255).to(torch.uint8).float() / 255
        return ((x + 1) / 2).clamp(0, 1)

    def extra_repr(self) -> str:
        return (f"pkl={str(self.pkl)!r}, classes={self.num_classes}, resolution={self.resolution}, "
                f"w_dim={self.w_dim}, num_ws={self.num_ws}")
