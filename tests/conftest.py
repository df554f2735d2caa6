"""Test setup: never touch the network, never ask W&B for a login, compose the real Hydra config."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"
os.environ["HYDRA_FULL_ERROR"] = "1"
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="torch_home_"))
os.environ.setdefault("FEATURELENS_DATA", tempfile.mkdtemp(prefix="featurelens_data_"))
os.environ.setdefault("FEATURELENS_CACHE", tempfile.mkdtemp(prefix="featurelens_cache_"))

import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

import featurelens.runtime  # noqa: E402,F401  (registers the analyses' configs in Hydra's ConfigStore)

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# A configuration small enough for a CPU test: 2 tiny epochs of a tiny CNN on 16-px shapes.
TINY = [
    "model=small_cnn", "model.channels=[4,8]", "data=shapes", "data.image_size=16", "data.n_train=128",
    "data.n_val=64", "data.n_test=64", "data.batch_size=32", "trainer=cpu", "trainer.max_epochs=2",
    "logger=none", "analysis.chirality.fmap.n_probe=16", "callbacks.progress_bar.refresh_rate=0",
]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any connection outside loopback fails at once (an accidental download or W&B call)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or "/" in host):
            raise RuntimeError(f"tests must not touch the network (tried {address})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def make_cfg(tmp_path: Path, overrides: list[str], config_name: str = "config") -> DictConfig:
    """Compose the real config with ``overrides`` and point every output at ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
        cfg.hydra.job.override_dirname = ""
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*extra: str, name: str = "run", config_name: str = "config", base=TINY) -> DictConfig:
        out = tmp_path / name
        out.mkdir(parents=True, exist_ok=True)
        return make_cfg(out, [*(base if config_name == "config" else []), *extra], config_name)

    yield factory
    GlobalHydra.instance().clear()


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """``run(cfg) -> run dir``: train ``cfg`` with W&B in offline mode (no login, no socket) under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))

    def run(cfg: DictConfig) -> Path:
        import wandb

        from featurelens.train import train

        try:
            train(cfg)
        finally:
            wandb.finish()
        return Path(cfg.paths.output_dir)

    return run


def wandb_media(run_dir: Path) -> set[str]:
    """The key stems of the images and tables an offline W&B run under ``run_dir`` logged."""
    return {p.name.split("_")[0] for p in run_dir.glob("wandb/offline-run-*/files/media/**/*") if p.is_file()}


def wandb_records(run_dir: Path, wait_s: float = 30.0) -> dict[str, list]:
    """The records of the one offline W&B run under ``run_dir`` (its ``run-*.wandb`` file: W&B's LevelDB-style
    log of protobuf ``Record``s in 32 KiB blocks, each chunk behind a 7-byte header: CRC, length, type), by
    record type (``run``, ``config``, ``metric``, ``history``, ...). The W&B service process may still be
    appending after ``wandb.finish()`` returns: the file is re-read until it parses to its end and holds the
    run's ``exit`` record (at most ``wait_s`` seconds)."""
    import struct
    import time

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        data, block = path.read_bytes(), 32768
        assert data[:4] == b":W&B", "not a W&B run file"
        out: dict[str, list] = {}
        pos, buf, torn = 7, b"", False
        try:
            while pos + 7 <= len(data):
                room = block - pos % block
                _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
                if room < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
                    pos += room
                    continue
                torn = pos + 7 + length > len(data)
                buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]  # FULL/FIRST start one
                pos += 7 + length
                if kind in (1, 4) and not torn:  # FULL or LAST: a whole record
                    record = pb.Record()
                    record.ParseFromString(buf)
                    out.setdefault(record.WhichOneof("record_type"), []).append(record)
        except DecodeError:
            torn = True
        if (not torn and "exit" in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


class CrashAt(pl.Callback):
    """Kills a run at ``batch`` of ``epoch`` (0-based), as a dying machine would."""

    def __init__(self, epoch: int, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise SystemExit("simulated crash")


class PoisonAt(pl.Callback):
    """Sets one weight to NaN at the start of ``epoch`` (0-based), as a diverging run would."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


class KillAt(pl.Callback):
    """Sends its own process ``signal`` at ``batch`` of ``epoch`` (0-based); the default, ``kill -9``, lets no
    handler and no cleanup run."""

    def __init__(self, epoch: int, batch: int = 1, signal: str = "SIGKILL"):
        self.epoch, self.batch, self.signal = epoch, batch, signal

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            import signal

            os.kill(os.getpid(), signal.Signals[self.signal])


class ScaleWeightsAt(pl.Callback):
    """Multiplies the head's weights by 1e4 at the start of ``epoch`` (0-based): the loss explodes, finitely."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                pl_module.net.classifier.weight.mul_(1e4)
