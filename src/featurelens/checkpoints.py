"""Reading and writing checkpoints: clear errors for files that are not what they should be, atomic saves.

Every file a user points at (``ckpt_path``, ``model.weights``, ``generator.ckpt``) is read through
:func:`read_file`, so a zero-byte, truncated or foreign file stops the run with one line naming it.
Checkpoints are written through :class:`AtomicCheckpointIO`: into a temporary file beside the target,
fsynced, then renamed, so a run killed while saving (or a full disk) leaves the previous checkpoint intact;
:class:`RunCheckpoint` carries the best checkpoint into the new directory of a resumed run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from featurelens.errors import ConfigError
from featurelens.results import atomic_write


def read_file(path: str | Path, key: str, *, weights_only: bool = False) -> Any:
    """``torch.load`` of a user-given file on the CPU; a missing, empty, truncated or non-torch file is a
    :class:`ConfigError` naming ``key`` and the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such file")
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}={str(path)!r}: the file is empty (0 bytes), not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}={str(path)!r} is not a readable torch file, truncated or of another kind "
                          f"({type(e).__name__}: {reason})") from None


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A featurelens training checkpoint (the LightningModule's hyperparameters and state dict)."""
    ckpt = read_file(path, key)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "model_cfg" not in hp or "state_dict" not in ckpt:
        raise ConfigError(f"{key}={str(path)!r} is not a featurelens checkpoint (no model_cfg); "
                          "for a plain state dict use model=<arch> model.weights=<file>")
    return ckpt


def _describe(model_cfg: dict[str, Any]) -> str:
    return (f"{model_cfg.get('arch')} with {model_cfg.get('in_channels')} input channels and "
            f"{model_cfg.get('num_classes')} classes")


def check_same_model(ckpt: dict[str, Any], net: torch.nn.Module, model_cfg: dict[str, Any], key: str) -> None:
    """The checkpoint holds weights for ``net`` (built from ``model_cfg``); else a ConfigError naming both."""
    stored = ckpt["hyper_parameters"]["model_cfg"]
    fields = ("arch", "in_channels", "num_classes")
    if any(stored.get(f) != model_cfg.get(f) for f in fields):
        raise ConfigError(f"{key} holds a {_describe(stored)}, but this run builds a {_describe(model_cfg)}; "
                          "use the model and data the checkpoint was trained with")
    own = net.state_dict()
    theirs = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    wrong = [k for k in own.keys() | theirs.keys()
             if k not in own or k not in theirs or tuple(own[k].shape) != tuple(theirs[k].shape)]
    if wrong:
        k = sorted(wrong)[0]
        shapes = (tuple(theirs[k].shape) if k in theirs else "absent", tuple(own[k].shape) if k in own else "absent")
        stem = ""  # a ResNet trained before cifar_stem=auto became the default, or with the other stem
        if k == "conv1.weight" and "absent" not in shapes and shapes[0][-1] != shapes[1][-1]:
            stem = f" (model.cifar_stem={str(shapes[0][-1] == 3).lower()} builds the checkpoint's stem)"
        raise ConfigError(f"{key} does not fit this run's {model_cfg.get('arch')}: {len(wrong)} tensors differ "
                          f"(e.g. {k}: {shapes[0]} in the checkpoint, {shapes[1]} here); use the model settings "
                          f"the checkpoint was trained with{stem}")


def check_same_data(ckpt: dict[str, Any], data_cfg: dict[str, Any], key: str) -> None:
    """The data's channels and classes are those the checkpoint's model was built for."""
    stored = ckpt["hyper_parameters"]["model_cfg"]
    for field, data_key in (("in_channels", "channels"), ("num_classes", "num_classes")):
        if data_cfg.get(data_key) is not None and int(data_cfg[data_key]) != int(stored[field]):
            raise ConfigError(f"{key} holds a {_describe(stored)}, but data={data_cfg.get('name')} has "
                              f"data.{data_key}={data_cfg[data_key]}; use data the model was trained on")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but all or nothing on the target's own filesystem (fsync + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(Path(path), lambda fh: torch.save(checkpoint, fh))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, which also resumes into a new run directory: the best checkpoint so
    far is copied over from the old directory and its score kept, so ``best.ckpt`` (and the test run on it)
    is the same as in the uninterrupted run. Lightning alone would forget the old best on a new dirpath."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir = state_dict.get("dirpath")
        if old_dir and self.dirpath and Path(old_dir).resolve() != Path(self.dirpath).resolve():
            def moved(path: str) -> str:
                if not path or Path(path).parent.resolve() != Path(old_dir).resolve() or not Path(path).is_file():
                    return path
                target = Path(self.dirpath) / Path(path).name
                if not target.exists():
                    atomic_write(target, lambda fh: fh.write(Path(path).read_bytes()))
                return str(target)

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_model_path": moved(state_dict.get("best_model_path", "")),
                          "kth_best_model_path": moved(state_dict.get("kth_best_model_path", "")),
                          "last_model_path": moved(state_dict.get("last_model_path", "")),
                          "best_k_models": {moved(p): v for p, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)
