"""Weight initialisations applied to a freshly built model (conv and linear weights; biases 0; BN γ=1, β=0)."""

from __future__ import annotations

import math

from torch import nn

from featurelens.errors import ConfigError

# ``mode`` is the kaiming fan of conv layers; linear layers use ``linear_mode`` (default fan_in): a fan_out
# draw of a 4096 -> 10 head has std sqrt(2/10), which makes the initial logits ~30x the features (loss 30-100).
_INITS = {
    "kaiming_normal": lambda w, p: nn.init.kaiming_normal_(w, mode=_fan(w, p, "fan_out"),
                                                           nonlinearity=p.get("nonlinearity", "relu")),
    "kaiming_uniform": lambda w, p: nn.init.kaiming_uniform_(w, mode=_fan(w, p, "fan_in"),
                                                             nonlinearity=p.get("nonlinearity", "relu")),
    "xavier_normal": lambda w, p: nn.init.xavier_normal_(w, gain=p.get("gain", 1.0)),
    "xavier_uniform": lambda w, p: nn.init.xavier_uniform_(w, gain=p.get("gain", 1.0)),
    "orthogonal": lambda w, p: nn.init.orthogonal_(w, gain=p.get("gain", 1.0)),
    "normal": lambda w, p: nn.init.normal_(w, 0.0, p.get("std", 0.01)),
    "uniform": lambda w, p: nn.init.uniform_(w, -p.get("a", 0.05), p.get("a", 0.05)),
}
INIT_METHODS = ("default", *_INITS)


def _fan(w, params: dict, conv_default: str) -> str:
    return params.get("linear_mode", "fan_in") if w.dim() == 2 else params.get("mode", conv_default)


def init_weights(model: nn.Module, method: str = "default", **params: float | str) -> nn.Module:
    """Re-initialise ``model`` in place with ``method``; ``default`` keeps torchvision's own init.

    Only ``Conv*`` and ``Linear`` weights are drawn from ``method``; their biases become 0, and
    normalisation layers get γ=1, β=0, so that runs differ only in the drawn weights.
    """
    if method not in INIT_METHODS:
        raise ConfigError(f"init.method={method!r} is unknown; valid: {list(INIT_METHODS)}")
    if any(isinstance(v, float | int) and not math.isfinite(v) for v in params.values()):
        raise ConfigError(f"init parameters must be finite, got {params}")
    for key in ("mode", "linear_mode"):
        if key in params and params[key] not in ("fan_in", "fan_out"):
            raise ConfigError(f"init.{key}={params[key]!r} is unknown; valid: ['fan_in', 'fan_out']")
    if method == "default":
        return model
    draw = _INITS[method]
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d | nn.Linear):
            draw(m.weight, params)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm | nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model
