"""The default generator of the linking analysis: a small class-conditional VAE with a StyleGAN-like split.

Linking spec §6. A mapping MLP ``f(z, onehot(c)) -> w`` feeds a synthesis net ``g(w)`` that gets **no class
input**, so ``w`` carries the class (as in StyleGAN-XL). An encoder ``q(z | x, c)`` is used only for training
(reconstruction + beta * KL, Adam). On the shapes data an extra 1x1-conv head on the synthesis trunk predicts
the three parts of :data:`~featurelens.models.generators.base.PART_NAMES` (background, body, rim), so
``synthesize_with_masks`` returns a part mask with every image.

Samples are blurry: this is a minutes-on-a-CPU generator, not a GAN. Measured on shapes at 32 px (5,000
images, 20 epochs, about 2-3 min on one core): a small CNN with 45 % real accuracy keeps only ~0.10-0.13 of
the samples (chance), and ~0.14 of the *reconstructions*; the decoder largely ignores ``c`` (the encoder puts
the shape into ``z``). The spec's keep-rate target of 0.5 is not met by this recipe. ``w_avg(c)`` is the mean of
``f(z, c)`` over 4096 seeded ``z``, computed once after training and stored as a buffer (so it travels with
the checkpoint).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurelens.errors import ConfigError, NonFiniteLossError
from featurelens.models.generators.base import PART_NAMES, check_class, freeze, truncate

log = logging.getLogger(__name__)

__all__ = ["CondVAEGenerator", "load_training_data", "part_masks", "train_cvae", "valid_resolutions"]

W_AVG_SAMPLES = 4096
SUPPORTED_DATA = ("shapes", "digits")


def valid_resolutions(max_k: int = 6) -> list[int]:
    """Resolutions the synthesis net can produce: ``4 * 2**k`` for k = 1..max_k (8, 16, ..., 256)."""
    return [4 * 2**k for k in range(1, max_k + 1)]


def _num_blocks(resolution: int) -> int:
    """k with ``resolution == 4 * 2**k`` (k >= 1); ValueError naming the value and the valid choices otherwise."""
    k = round(math.log2(resolution / 4)) if isinstance(resolution, int) and resolution >= 8 else -1
    if k < 1 or 4 * 2**k != resolution:
        raise ValueError(f"resolution={resolution!r} is not 4*2^k; valid: {valid_resolutions()}")
    return k


def _widths(k: int, base: int) -> list[int]:
    """Channel widths of the k + 1 feature maps from 4x4 up to the output resolution (halving, >= 16)."""
    return [max(16, base // 2**i) for i in range(k + 1)]


class CondVAEGenerator(nn.Module):
    """Class-conditional VAE generator: mapping ``f(z, c) -> w``, synthesis ``g(w)``, encoder ``q(z | x, c)``.

    Args:
        num_classes: number of classes ``c``.
        resolution: output side, ``4 * 2**k`` (8, 16, 32, 64, ...).
        channels: image channels (3 for shapes, 1 for digits).
        z_dim, w_dim: latent sizes (spec defaults 16 and 32).
        base_channels: width of the 4x4 feature map; every upsample block halves it (not below 16).
        mask_parts: number of part classes of the mask head (``len(PART_NAMES)``), or 0 for no head.
    """

    def __init__(self, num_classes: int = 10, resolution: int = 32, channels: int = 3, z_dim: int = 16,
                 w_dim: int = 32, base_channels: int = 128, mask_parts: int = 0):
        super().__init__()
        k = _num_blocks(resolution)
        self.num_classes, self.resolution, self.channels = int(num_classes), int(resolution), int(channels)
        self.z_dim, self.w_dim, self.base_channels = int(z_dim), int(w_dim), int(base_channels)
        self.mask_parts = int(mask_parts)
        self.num_ws = 1
        widths = _widths(k, base_channels)

        # mapping f(z, onehot c) -> w: 2 layers, LeakyReLU(0.2) between them
        self.mapping = nn.Sequential(
            nn.Linear(z_dim + num_classes, w_dim), nn.LeakyReLU(0.2), nn.Linear(w_dim, w_dim))
        # synthesis g(w): Linear -> 4x4 -> k upsample-conv blocks -> 1x1 conv + sigmoid (no class input)
        self.syn_fc = nn.Linear(w_dim, widths[0] * 16)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.syn_trunk = nn.Sequential(*blocks)
        self.to_rgb = nn.Conv2d(widths[-1], channels, 3, padding=1)
        self.mask_head = nn.Conv2d(widths[-1], mask_parts, 1) if mask_parts else None
        # encoder q(z | x, c): k stride-2 convs down to 4x4, then a linear layer with the one-hot class
        enc, c_in = [], channels
        for c_out in reversed(widths[:-1]):
            enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.enc_fc = nn.Linear(widths[0] * 16 + num_classes, 2 * z_dim)
        self.register_buffer("w_avg_table", torch.zeros(num_classes, w_dim))

    # ------------------------------------------------------------------ config / device
    def config(self) -> dict:
        """The constructor arguments (what a checkpoint needs to rebuild the module)."""
        return {"num_classes": self.num_classes, "resolution": self.resolution, "channels": self.channels,
                "z_dim": self.z_dim, "w_dim": self.w_dim, "base_channels": self.base_channels,
                "mask_parts": self.mask_parts}

    @property
    def device(self) -> torch.device:
        return self.w_avg_table.device

    @property
    def has_masks(self) -> bool:
        return self.mask_head is not None

    # ------------------------------------------------------------------ networks
    def _onehot(self, c: torch.Tensor) -> torch.Tensor:
        return F.one_hot(c.long(), self.num_classes).float()

    def map(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``f(z, onehot(c))``: ``(n, z_dim)`` and ``(n,)`` class indices -> ``(n, w_dim)``."""
        return self.mapping(torch.cat([z, self._onehot(c)], dim=1))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x, c)``: mean and log-variance, each ``(n, z_dim)``."""
        h = torch.cat([self.encoder(x), self._onehot(c)], dim=1)
        mu, logvar = self.enc_fc(h).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    def _trunk(self, w: torch.Tensor) -> torch.Tensor:
        if w.dim() == 3:  # (n, num_ws, w_dim) as StyleGAN passes it; num_ws == 1
            w = w[:, 0]
        if w.dim() != 2 or w.shape[1] != self.w_dim:
            raise ValueError(f"w must be (n, {self.w_dim}), got {tuple(w.shape)}")
        h = self.syn_fc(w.to(self.device, torch.float32)).view(len(w), -1, 4, 4)
        return self.syn_trunk(F.leaky_relu(h, 0.2))

    def decode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image logits ``(n, C, H, W)`` and mask logits ``(n, parts, H, W)`` (None without a mask head)."""
        h = self._trunk(w)
        return self.to_rgb(h), (self.mask_head(h) if self.mask_head is not None else None)

    # ------------------------------------------------------------------ the Generator protocol
    def w_avg(self, c: int) -> torch.Tensor:
        """The class mean ``w_avg(c)``, ``(w_dim,)``, on the generator's device."""
        check_class(c, self.num_classes)
        return self.w_avg_table[int(c)].clone()

    @torch.no_grad()
    def compute_w_avg(self, n: int = W_AVG_SAMPLES, seed: int = 0) -> torch.Tensor:
        """Fill the ``w_avg`` buffer with the mean of ``f(z, c)`` over ``n`` seeded ``z`` (same ``z`` per class)."""
        z = torch.randn(n, self.z_dim, generator=torch.Generator().manual_seed(seed)).to(self.device)
        for c in range(self.num_classes):
            self.w_avg_table[c] = self.map(z, torch.full((n,), c, device=self.device)).mean(0)
        return self.w_avg_table

    @torch.no_grad()
    def sample_w(self, n: int, class_idx: int, psi: float = 0.7, seed: int = 0) -> torch.Tensor:
        """``(n, w_dim)``: ``z ~ N(0, I)`` from ``torch.Generator().manual_seed(seed)``, mapped with class
        ``class_idx`` and truncated toward ``w_avg(class_idx)``. Deterministic in ``seed``."""
        check_class(class_idx, self.num_classes)
        z = torch.randn(int(n), self.z_dim, generator=torch.Generator().manual_seed(int(seed))).to(self.device)
        w = self.map(z, torch.full((int(n),), int(class_idx), device=self.device))
        return truncate(w, self.w_avg(class_idx), psi)

    def synthesize(self, w: torch.Tensor) -> torch.Tensor:
        """``(n, w_dim)`` -> float32 NCHW images in [0, 1] on the generator's device."""
        logits, _ = self.decode(w)
        return torch.sigmoid(logits).float()

    def synthesize_with_masks(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as :meth:`synthesize` and part masks ``(n, H, W)`` int64 (indices into ``PART_NAMES``)."""
        if self.mask_head is None:
            raise RuntimeError("this generator has no mask head (it was trained without part masks; only "
                               "data=shapes has them), so synthesize_with_masks is unavailable")
        logits, mask_logits = self.decode(w)
        return torch.sigmoid(logits).float(), mask_logits.argmax(dim=1)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, resolution={self.resolution}, channels={self.channels}, "
                f"z_dim={self.z_dim}, w_dim={self.w_dim}, parts={list(PART_NAMES[: self.mask_parts])}")


# ---------------------------------------------------------------------------- training data
def part_masks(shape_mask: np.ndarray, rim: np.ndarray) -> np.ndarray:
    """Part indices (``PART_NAMES``) of one scene: 0 background (distractors too), 1 main-shape body, 2 its rim."""
    main = shape_mask == 1
    return np.where(main & rim, 2, np.where(main, 1, 0)).astype(np.int64)


def load_training_data(data_cfg: dict, n_train: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images ``(n, C, S, S)`` float in [0, 1], labels ``(n,)`` and part masks ``(n, S, S)`` (shapes only).

    shapes: the training split exactly as :func:`~featurelens.data.shapes.load_or_make_shapes` draws it (same
    seed stream, balanced classes), re-rendered here to keep the part masks. digits: all 1,797 scikit-learn
    digits, resized bilinearly like the data module does.
    """
    name, size = data_cfg.get("name"), int(data_cfg.get("image_size", 32))
    if name == "shapes":
        from featurelens.data.shapes import SHAPE_CLASSES, _split_seed, render_scene

        n = int(n_train or data_cfg.get("n_train", 5000))
        rng = np.random.default_rng(_split_seed(int(data_cfg.get("seed", 0)), "train"))
        labels = rng.permutation(np.arange(n, dtype=np.int64) % len(SHAPE_CLASSES))  # as make_shapes
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        masks = np.empty((n, size, size), dtype=np.int64)
        for i, label in enumerate(labels):
            scene = render_scene(rng, size, label=int(label))
            images[i], masks[i] = scene.image, part_masks(scene.shape_mask, scene.rim)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return x, torch.from_numpy(labels), torch.from_numpy(masks)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        y = torch.from_numpy(digits.target).long()
        if n_train:
            x, y = x[: int(n_train)], y[: int(n_train)]
        return x, y, None
    raise ConfigError(f"data.name={name!r} has no generator training data; valid: {list(SUPPORTED_DATA)}")


# ---------------------------------------------------------------------------- training
@torch.enable_grad()  # also when called inside an analysis' no_grad
def train_cvae(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None, *,
               num_classes: int = 10, z_dim: int = 16, w_dim: int = 32, base_channels: int = 64,
               epochs: int = 20, batch_size: int = 64, lr: float = 1e-3, beta: float = 1.0,
               mask_weight: float = 1.0, seed: int = 0, progress: bool = True) -> CondVAEGenerator:
    """Train a :class:`CondVAEGenerator` on ``images`` (``(n, C, S, S)`` in [0, 1]) and return it frozen.

    Loss per image: BCE reconstruction (summed over pixels) + ``beta`` * KL(q(z|x,c) || N(0, I)) +
    ``mask_weight`` * cross-entropy of the mask logits (summed over pixels) if ``masks`` are given. Adam with
    ``lr``; everything is seeded by ``seed``. Logs one line per epoch (and a tqdm bar if ``progress``).
    """
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be (n, C, S, S), got {tuple(images.shape)}")
    n, channels, size = images.shape[0], images.shape[1], images.shape[2]
    torch.manual_seed(seed)
    gen = CondVAEGenerator(num_classes, size, channels, z_dim, w_dim, base_channels,
                           mask_parts=len(PART_NAMES) if masks is not None else 0)
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    pixels = channels * size * size
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc="cVAE", unit="epoch", leave=False)
    start = time.perf_counter()
    gen.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order_gen)
        totals = torch.zeros(3)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            x, c = images[idx], labels[idx]
            mu, logvar = gen.encode(x, c)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            logits, mask_logits = gen.decode(gen.map(z, c))
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(idx)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
            loss = rec + beta * kl
            seg = torch.zeros(())
            if mask_logits is not None:
                seg = F.cross_entropy(mask_logits, masks[idx], reduction="sum") / len(idx)
                loss = loss + mask_weight * seg
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"cVAE loss became {loss.item()} in epoch {epoch + 1}; try a lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            totals += torch.stack([rec.detach(), kl.detach(), seg.detach()]) * len(idx)
        rec_m, kl_m, seg_m = (totals / n).tolist()
        msg = f"rec/px={rec_m / pixels:.4f} kl={kl_m:.2f}"
        msg += f" mask_ce/px={seg_m / size**2:.3f}" if masks is not None else ""
        log.info("cVAE epoch %d/%d: %s (%.0f s)", epoch + 1, epochs, msg, time.perf_counter() - start)
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update()
    if bar is not None:
        bar.close()
    freeze(gen)
    gen.compute_w_avg(seed=seed)
    return gen
