"""One LightningDataModule for every dataset: embedded (shapes, digits), torchvision, or an image folder.

Images reach the model at ``input_size`` (resized bilinearly and symmetrically from the native size, so a
mirror of the input stays a mirror), normalised per channel. Training augmentation is a random crop with
symmetric zero padding followed by a horizontal flip (``flip_aug``), applied at the native size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder

from featurelens.errors import ConfigError

DATASETS = ("shapes", "digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")
_TORCHVISION = {  # name -> (class name, mean, std)
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "imagefolder": ("ImageFolder", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _augment(x: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Random crop with symmetric zero padding, then a random horizontal flip, on one (C,H,W) image."""
    if padding:
        h, w = x.shape[-2:]
        i, j = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        x = F.pad(x, (padding,) * 4)[..., i : i + h, j : j + w]
    if flip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


class TensorImageDataset(Dataset):
    """In-memory normalised images (N,C,H,W) with optional per-item augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


class EpochSampler(Sampler):
    """Shuffled indices as a pure function of (``seed``, epoch), each paired with a seed for that item's
    augmentation, so the data a training epoch sees does not depend on how much of the global RNG anything
    else consumed: a run resumed from a checkpoint sees exactly the batches the uninterrupted run saw.
    Lightning calls :meth:`set_epoch` before every epoch (as for ``DistributedSampler``)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint64)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(int(words[0] >> 1)))
        item_seeds = torch.randint(0, 2**62, (self.n,), generator=torch.Generator().manual_seed(int(words[1] >> 1)))
        return iter(zip(order.tolist(), item_seeds.tolist(), strict=True))


class SeededItems(Dataset):
    """``dataset[i]`` for the ``(i, item_seed)`` pairs of :class:`EpochSampler`, with the global torch RNG
    seeded by ``item_seed`` (and restored after), so random augmentations are reproducible in any process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, int):
            return self.dataset[key]
        i, item_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed)  # CPU only: 1000x cheaper than torch.manual_seed
            return self.dataset[i]


class TolerantImageFolder(ImageFolder):
    """An ``ImageFolder`` that skips files PIL cannot decode: each is named in a warning (once per process)
    and the next readable image stands in for it. Checking every file before training would cost minutes on
    an ImageNet-size folder, and one bad file should not end a run hours in."""

    warned: set[str] = set()

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return super().__getitem__(i)
            except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated, broken files
                path = self.samples[i][0]
                if path not in self.warned:
                    self.warned.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e}); the next "
                                  "readable image of the folder takes its place", stacklevel=2)
        raise ConfigError(f"data.root: no readable image in {self.root}")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def targets(ds: Dataset) -> np.ndarray:
    """Labels of a dataset without loading its images (tensor datasets, torchvision datasets, subsets)."""
    if isinstance(ds, Subset):
        return targets(ds.dataset)[np.asarray(ds.indices)]
    if isinstance(ds, TensorImageDataset):
        return ds.labels.numpy()
    return np.asarray(ds.targets)


def _split_indices(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class ImageDataModule(pl.LightningDataModule):
    """Data for featurelens runs; see ``conf/data/*.yaml`` for each dataset's parameters.

    ``input_size`` is the width the model sees (filled in by ``train`` from the model config); ``None``
    keeps the native ``image_size``. ``order_seed`` (the run's ``seed``, filled in by ``train``) fixes the
    training order and augmentation of every epoch, independently of ``seed``, which fixes the data itself.
    """

    def __init__(self, name: str, root: str = "data", image_size: int = 32, channels: int = 3,
                 num_classes: int = 10, batch_size: int = 128, num_workers: int = 0, flip_aug: bool = True,
                 crop_padding: int = 4, seed: int = 0, n_train: int = 5000, n_val: int = 1000,
                 n_test: int = 1000, val_size: int = 5000, download: bool = True,
                 input_size: int | None = None, order_seed: int = 0):
        super().__init__()
        if name not in DATASETS:
            raise ConfigError(f"data.name={name!r} is unknown; valid: {list(DATASETS)}")
        self.name, self.root = name, Path(root).expanduser()
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.input_size = input_size or image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.flip_aug, self.crop_padding, self.seed = flip_aug, crop_padding, seed
        self.n_train, self.n_val, self.n_test, self.val_size = n_train, n_val, n_test, val_size
        self.download = download
        self.order_seed = order_seed  # the run's seed: training order and augmentation per epoch (EpochSampler)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None  # the training images without augmentation
        self.mean: list[float] | None = None  # the training normalisation, per channel
        self.std: list[float] | None = None

    # ----------------------------------------------------------------- loading
    def prepare_data(self) -> None:
        if self.name == "shapes":
            from featurelens.data.shapes import load_or_make_shapes

            for split, n in (("train", self.n_train), ("val", self.n_val), ("test", self.n_test)):
                load_or_make_shapes(self.root, split, n, self.image_size, self.seed)
        elif self.name in _TORCHVISION and self.name != "imagefolder":
            for train in (True, False):
                self._torchvision(train, transform=None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.name in ("shapes", "digits"):
            self._setup_tensors()
        else:
            self._setup_torchvision()

    @property
    def class_names(self) -> list[str]:
        """The name of each class where the data has them (the shapes, the digits, a torchvision dataset's or an
        image folder's classes once set up), else the class index as text; ``num_classes`` entries."""
        names: list[str] = []
        if self.name == "shapes":
            from featurelens.data.shapes import SHAPE_CLASSES

            names = list(SHAPE_CLASSES)
        elif self.name in ("digits", "mnist"):
            names = [str(i) for i in range(10)]
        elif self.train_set is not None:
            dataset = self.train_set.dataset if isinstance(self.train_set, Subset) else self.train_set
            names = [str(c) for c in getattr(dataset, "classes", [])]
        return [names[c] if c < len(names) else str(c) for c in range(self.num_classes)]

    def normalisation(self) -> tuple[list[float], list[float]]:
        """The training normalisation ``(mean, std)`` per channel. Torchvision datasets and image folders use
        fixed statistics, so no image is read (a linking run on StyleGAN-XL needs no image folder); the
        embedded datasets compute theirs from the training split at its native size, without building the
        resized splits (a dissection on a 112-px model reads no shapes image at 112 px)."""
        if self.name in _TORCHVISION:
            _, mean, std = _TORCHVISION[self.name]
            return list(mean), list(std)
        if self.mean is None:
            self._set_statistics(self._tensors()["train"][0])
        return self.mean, self.std

    def _set_statistics(self, x_train: torch.Tensor) -> None:
        self.mean = x_train.mean(dim=(0, 2, 3)).tolist()
        self.std = x_train.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()

    def _tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The embedded dataset's splits at ``image_size``: split -> (images (N, C, H, W) in [0, 1], labels)."""
        if self.name == "shapes":
            from featurelens.data.shapes import load_or_make_shapes

            arrays = {s: load_or_make_shapes(self.root, s, n, self.image_size, self.seed)
                      for s, n in (("train", self.n_train), ("val", self.n_val), ("test", self.n_test))}
            tensors = {s: (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y))
                       for s, (x, y) in arrays.items()}
        else:
            from sklearn.datasets import load_digits

            digits = load_digits()
            x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16
            y = torch.from_numpy(digits.target).long()
            perm = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(y)))
            n_eval = len(y) // 6
            parts = {"val": perm[:n_eval], "test": perm[n_eval : 2 * n_eval], "train": perm[2 * n_eval :]}
            tensors = {s: (_resize(x[idx], self.image_size), y[idx]) for s, idx in parts.items()}
        if tensors["train"][0].shape[1] != self.channels:
            raise ConfigError(f"data.channels={self.channels} but {self.name} images have "
                              f"{tensors['train'][0].shape[1]} channels")
        n_labels = int(max(y.max() for _, y in tensors.values())) + 1
        if n_labels > self.num_classes:
            raise ConfigError(f"data.num_classes={self.num_classes} but {self.name} has {n_labels} classes")
        return tensors

    def _setup_tensors(self) -> None:
        tensors = self._tensors()
        x_train = tensors["train"][0]
        self._set_statistics(x_train)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]

        def prep(x: torch.Tensor) -> torch.Tensor:
            return (_resize(x, self.input_size) - mean) / std

        def aug(x: torch.Tensor) -> torch.Tensor:
            return _augment(x, self.crop_padding, self.flip_aug)

        self.train_set = TensorImageDataset(prep(x_train), tensors["train"][1], aug)
        self.train_eval_set = TensorImageDataset(self.train_set.images, self.train_set.labels)
        self.val_set = TensorImageDataset(prep(tensors["val"][0]), tensors["val"][1])
        self.test_set = TensorImageDataset(prep(tensors["test"][0]), tensors["test"][1])

    def _transform(self, train: bool) -> Callable:
        from torchvision.transforms import v2

        _, self.mean, self.std = _TORCHVISION[self.name]
        steps: list = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if self.name == "imagefolder":
            steps += [v2.Resize(self.image_size, antialias=True), v2.CenterCrop(self.image_size)]
        if train:
            steps.append(lambda x: _augment(x, self.crop_padding, self.flip_aug))
        if self.input_size != self.image_size:
            steps.append(v2.Resize((self.input_size, self.input_size), antialias=True))
        steps.append(v2.Normalize(self.mean, self.std))
        return v2.Compose(steps)

    def _torchvision(self, train: bool, transform: Callable | None) -> Dataset:
        import torchvision

        cls = getattr(torchvision.datasets, _TORCHVISION[self.name][0])
        try:
            return cls(str(self.root / self.name), train=train, transform=transform, download=self.download)
        except RuntimeError as e:  # "Dataset not found or corrupted. You can use download=True ..."
            raise ConfigError(f"data={self.name}: no dataset under {self.root / self.name} ({e}); "
                              "set data.download=true (needs internet) or data.root to where it lies") from None
        except OSError as e:  # no network
            raise ConfigError(f"data={self.name}: download to {self.root / self.name} failed ({e}); "
                              "without internet use data=shapes or data=digits") from None

    def _setup_torchvision(self) -> None:
        if self.name == "imagefolder":
            def folder(split: str, train: bool) -> Dataset:
                return TolerantImageFolder(str(self.root / split), transform=self._transform(train))

            # checked here, when images are first read, not up front: linking on a generator reads none
            if not self.root.is_dir():
                raise ConfigError(f"data.root={str(self.root)!r}: no such folder (an imagefolder root holds "
                                  "train/ and val/, one folder per class)")
            missing = [s for s in ("train", "val") if not (self.root / s).is_dir()]
            if missing:
                raise ConfigError(f"data.root={str(self.root)!r} has no {missing} folder(s); an imagefolder "
                                  "root needs train/ and val/ (test/ optional) with one folder per class")
            self.train_set, self.val_set = folder("train", True), folder("val", False)
            self.train_eval_set = folder("train", False)
            self.test_set = folder("test", False) if (self.root / "test").is_dir() else self.val_set
            return
        full_train = self._torchvision(True, self._transform(True))
        full_eval = self._torchvision(True, self._transform(False))
        if not 0 < self.val_size < len(full_train):
            raise ConfigError(f"data.val_size={self.val_size} must be in (0, {len(full_train)})")
        train_idx, val_idx = _split_indices(len(full_train), self.val_size, self.seed)
        self.train_set, self.val_set = Subset(full_train, train_idx), Subset(full_eval, val_idx)
        self.train_eval_set = Subset(full_eval, train_idx)
        self.test_set = self._torchvision(False, self._transform(False))

    # ----------------------------------------------------------------- loaders
    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None and self.trainer.world_size > 1:  # Lightning's DistributedSampler shuffles
            return self._loader(self.train_set, shuffle=True)
        return DataLoader(SeededItems(self.train_set), batch_size=self.batch_size,
                          sampler=EpochSampler(len(self.train_set), self.order_seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def loader(self, dataset: Dataset, batch_size: int | None = None, shard: tuple[int, int] = (0, 1)) -> DataLoader:
        """An unshuffled loader over ``dataset``; ``shard=(rank, world_size)`` keeps every world_size-th item."""
        rank, world = shard
        if world > 1:
            dataset = Subset(dataset, range(rank, len(dataset), world))
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def batches(self, split: str, batch_size: int | None = None, shard: tuple[int, int] = (0, 1),
                n_per_class: int | None = None, seed: int = 0) -> DataLoader:
        """An analysis' data (``featurelens.analysis.base``): the training images without augmentation (up to
        ``n_per_class`` seeded ones of each class) or the validation split, unshuffled, this rank's shard."""
        if split == "train":
            return self.loader(self.class_subset(n_per_class, seed), batch_size, shard)
        if split == "val":
            self.setup("fit")
            return self.loader(self.val_set, batch_size, shard)
        raise ValueError(f"split={split!r}; valid: ['train', 'val']")

    def class_subset(self, n_per_class: int | None, seed: int = 0) -> Dataset:
        """Up to ``n_per_class`` seeded training images of every class, without augmentation (all if None)."""
        self.setup("fit")
        labels = targets(self.train_eval_set)
        if n_per_class is None:
            return self.train_eval_set
        gen = np.random.default_rng(seed)
        keep = [gen.permutation(np.flatnonzero(labels == c))[:n_per_class] for c in np.unique(labels)]
        return Subset(self.train_eval_set, np.sort(np.concatenate(keep)).tolist())

    def probe_set(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, seeded subset of ``n`` validation images (no augmentation) and their labels."""
        self.setup("fit")
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.val_set), generator=gen)[: min(n, len(self.val_set))].sort().values
        items = [self.val_set[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
