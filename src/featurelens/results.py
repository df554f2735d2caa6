"""The per-run results file: one JSON object per line, flushed and fsynced so a dying run loses nothing."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


def jsonable(value: Any) -> Any:
    """Plain-JSON version of ``value``: tensors and numpy values become Python numbers/lists, NaN → None."""
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file all or nothing: ``write(fh)`` into a temporary file beside ``path``, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(json.dumps(jsonable(obj), indent=2).encode()))


class ResultsFile:
    """JSON-lines file of analysis records; ``rewrite`` replaces it atomically, ``append`` adds one line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def rewrite(self, records: Iterable[dict]) -> None:
        atomic_write(self.path, lambda fh: fh.writelines((json.dumps(jsonable(r)) + "\n").encode()
                                                          for r in records))

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_results(path: Path) -> list[dict]:
    """Records of a results file; a torn last line (a run killed while writing) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
