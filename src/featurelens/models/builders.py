"""Model builders: torchvision architectures adapted to the data, and the small nets of the specialization paper.

Every builder takes the data's ``num_classes`` and ``in_channels`` and returns a plain ``nn.Module``.
Kernel sizes are never changed (the chirality baselines depend on them); only the input stem's channel
count, the optional CIFAR-style ResNet stem and the classifier width follow the data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from featurelens.checkpoints import read_file
from featurelens.errors import ConfigError

TORCHVISION_ARCHS = ("alexnet", "vgg11", "vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50")
ARCHS = (*TORCHVISION_ARCHS, "mlp", "small_cnn")
CIFAR_STEM_MAX_WIDTH = 64  # torchvision's stem takes 64 px to 16 before layer1 and 2 at layer4


class MLP(nn.Module):
    """Fully connected ReLU net on flattened images (the [CL]/[LS] MNIST MLP: 4 hidden layers of 256)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """3×3 conv blocks (conv[-BN]-ReLU, max-pool after every ``pool_every`` convs), global average pool, linear head."""

    def __init__(self, in_channels: int, channels: list[int], num_classes: int, pool_every: int = 2,
                 kernel_size: int = 3, dropout: float = 0.0, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            layers.append(nn.Conv2d(width, c, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=True))
            if (i + 1) % pool_every == 0:
                layers.append(nn.MaxPool2d(2))
            width = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _first_conv_name(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _adapt_in_channels(model: nn.Module, in_channels: int) -> None:
    """Swap the first conv for one with ``in_channels`` inputs, same kernel, stride and padding.

    Pretrained weights are averaged over their input channels and spread evenly over the new ones, so a
    uniform input gives the same response (RGB to grey: their sum; grey to RGB: a third each)."""
    name = _first_conv_name(model)
    old: nn.Conv2d = model.get_submodule(name)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None)
    with torch.no_grad():
        mean = old.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (old.in_channels / in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _replace_module(model, name, new)


def _cifar_stem(model: nn.Module) -> None:
    """CIFAR-style ResNet stem: 3×3 stride-1 conv1 and no max-pool (the 7×7 stem leaves 1×1 maps at 32 px)."""
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def uses_cifar_stem(cifar_stem: bool | str, arch: str, image_size: int | None,
                    weights: dict[str, torch.Tensor] | None = None) -> bool:
    """``model.cifar_stem``: true, false, or ``auto``: with ``weights`` (a state dict) the stem they were trained
    with, else the CIFAR stem for a ResNet on inputs of at most ``CIFAR_STEM_MAX_WIDTH`` px (torchvision's 7×7
    stride-2 stem and max-pool leave 9 px of a 33 px input to the first block, and the ResNets stay at chance
    on the shapes: README, Sweeps)."""
    if cifar_stem != "auto":
        return bool(cifar_stem)
    if weights is not None:
        return has_cifar_stem(weights)
    return arch.startswith("resnet") and image_size is not None and image_size <= CIFAR_STEM_MAX_WIDTH


def has_cifar_stem(state: dict[str, torch.Tensor]) -> bool:
    """Whether a ResNet state dict has the CIFAR stem (a 3×3 ``conv1``)."""
    conv1 = state.get("conv1.weight")
    return conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] == 3


def _replace_head(model: nn.Module, head_module: str, num_classes: int) -> None:
    head = model.get_submodule(head_module)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"model.head_module={head_module!r} is a {type(head).__name__}, expected nn.Linear")
    if head.out_features != num_classes:
        _replace_module(model, head_module, nn.Linear(head.in_features, num_classes))


def _read_weights(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision weights by enum name (e.g. ``IMAGENET1K_V1``, needs internet once) or of a
    local file (a state dict or a Lightning checkpoint)."""
    path = Path(weights).expanduser()
    if path.suffix in {".pt", ".pth", ".ckpt", ".bin"} or path.exists():
        state = read_file(path, "model.weights")
        if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
            state = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"model.weights={weights!r} holds a {type(state).__name__}, not a state dict")
        return state
    valid = [w.name for w in torchvision.models.get_model_weights(arch)] if arch in TORCHVISION_ARCHS else []
    if weights not in valid:
        raise ConfigError(f"model.weights={weights!r} is neither a file nor a torchvision weight of {arch}; "
                          f"valid: {valid} or a path to a .pt/.pth file")
    return torchvision.models.get_model_weights(arch)[weights].get_state_dict(progress=True)


def _load_weights(model: nn.Module, arch: str, weights: str, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state]
    if unexpected or len(missing) == len(own):
        raise ConfigError(f"model.weights={weights!r} does not match {arch}: "
                          f"{len(missing)} missing, {len(unexpected)} unexpected keys")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ConfigError(f"model.weights={weights!r} does not match the model: {key} is "
                              f"{list(value.shape)} there and {list(own[key].shape)} here (model.arch={arch})")
    if missing:
        warnings.warn(f"{len(missing)} parameters not in {weights} keep their init: {missing[:4]}…", stacklevel=3)
    model.load_state_dict(state, strict=False)


def build_model(arch: str, num_classes: int, in_channels: int = 3, *, image_size: int | None = None,
                weights: str | None = None, head_module: str | None = None, cifar_stem: bool | str = False,
                hidden: list[int] | None = None, channels: list[int] | None = None, pool_every: int = 2,
                dropout: float | None = None, batch_norm: bool = True) -> nn.Module:
    """Build ``arch`` for ``num_classes`` classes and ``in_channels``-channel inputs.

    ``weights``: torchvision weight name or a local state-dict/checkpoint file; loaded before the head and
    the stem are adapted, so pretrained features survive. ``cifar_stem``: see ``uses_cifar_stem``.
    ``dropout``: the dropout probability of the MLP, the small CNN (default 0) or the classifier of AlexNet and
    the VGGs (default torchvision's 0.5); the ResNets have none.
    """
    if arch not in ARCHS:
        raise ConfigError(f"model.arch={arch!r} is unknown; valid: {list(ARCHS)}")
    if dropout is not None and arch.startswith("resnet"):
        raise ConfigError(f"model.dropout={dropout!r}: {arch} has no dropout layer")
    if arch == "mlp":
        if image_size is None:
            raise ConfigError("model=mlp needs data.image_size to size its input layer")
        model: nn.Module = MLP(in_channels * image_size**2, list(hidden or [256] * 4), num_classes, dropout or 0.0)
    elif arch == "small_cnn":
        model = SmallCNN(in_channels, list(channels or [32, 32, 64, 64, 128, 128]), num_classes, pool_every,
                         dropout=dropout or 0.0, batch_norm=batch_norm)
    else:  # built in the shape of the weights' file (stem, input channels, head) so that every tensor loads,
        # then the stem, the first conv and the head follow the config and the data
        head = head_module or "fc"
        state = _read_weights(arch, weights) if weights else None
        cifar = uses_cifar_stem(cifar_stem, arch, image_size, state)
        if cifar and not arch.startswith("resnet"):
            raise ConfigError(f"model.cifar_stem=true only applies to ResNets, not {arch}")
        file_cifar = state is not None and has_cifar_stem(state)
        if file_cifar and not cifar:
            raise ConfigError(f"model.weights={weights!r} holds a ResNet with the CIFAR stem (3×3 conv1); "
                              "use model.cifar_stem=auto or true")
        extra = {} if dropout is None else {"dropout": dropout}
        n_out = state[f"{head}.weight"].shape[0] if state is not None and f"{head}.weight" in state else num_classes
        model = getattr(torchvision.models, arch)(weights=None, num_classes=n_out, **extra)
        if file_cifar:
            _cifar_stem(model)
        if state is not None:
            first = state.get(f"{_first_conv_name(model)}.weight")
            if first is not None and first.ndim == 4:
                _adapt_in_channels(model, first.shape[1])
            _load_weights(model, arch, weights, state)
        if cifar and not file_cifar:
            _cifar_stem(model)  # pretrained 7×7 stem weights do not fit: conv1 is drawn afresh
        _adapt_in_channels(model, in_channels)
        if state is not None:
            _replace_head(model, head, num_classes)
    if weights and arch in ("mlp", "small_cnn"):
        _load_weights(model, arch, weights, _read_weights(arch, weights))
    return model
