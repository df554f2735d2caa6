"""What every analysis' sweep tables share: the jobs they read, the seed statistic of a cell and the ``setting``
column.

``scripts/make_tables.py`` finds the finished jobs of one or more sweeps and hands each registered analysis the
jobs that have its records, as :class:`SweepJob`\\ s, with ``grouped_by(columns, shown=())``: the markdown line
that says what a table's rows are grouped by. A table groups by its own columns plus ``setting``, the text of
the swept settings it does not show itself, and averages over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass
class SweepJob:
    """One finished job of a sweep: its directory, composed config (an OmegaConf node), the records of one
    analysis (its ``results.jsonl``), its overrides and the override keys that vary across the sweep."""

    dir: Path
    config: Any
    records: list[dict[str, Any]]
    overrides: dict[str, str]
    swept: list[str]

    def setting(self, shown: tuple[str, ...] = ()) -> str:
        """The swept settings of this job that a table does not show as columns of its own (``–``: not given)."""
        return ", ".join(f"{k}={self.overrides.get(k, '–')}" for k in self.swept if k not in shown)

    def row(self, shown: tuple[str, ...] = ()) -> dict[str, Any]:
        """The columns every table row of this job starts with: job (its directory), model, data, setting and seed."""
        return {"job": str(self.dir), "model": self.config.model.arch, "data": self.config.data.get("name"),
                "setting": self.setting(shown), "seed": self.config.seed}

    def file(self, analysis: str, name: str) -> Path:
        """A side file the analysis wrote in this job (``analysis/<analysis>/<name>``)."""
        return self.dir / "analysis" / analysis / name


def final_frame(jobs: list[SweepJob], name: str) -> pd.DataFrame:
    """One row per job: the numeric values of analysis ``name``'s final record (without the ``<name>/``
    prefix), with the job's columns; a model with a ``channels`` list is labelled by its conv count."""
    rows = []
    p = f"{name}/"
    for job in jobs:
        last = job.records[-1]
        channels = job.config.model.get("channels")
        row = job.row()
        row["model"] += f"[{len(channels)} conv]" if channels is not None else ""
        rows.append({**row, "epoch": last["epoch"], **{k.removeprefix(p): v for k, v in last.items()
                                                       if k.startswith(p) and isinstance(v, int | float)}})
    return pd.DataFrame(rows)


def without_empty_setting(table: pd.DataFrame) -> pd.DataFrame:
    """Drop the ``setting`` column when nothing but the tables' own columns was swept."""
    return table.drop(columns="setting") if "setting" in table and (table["setting"] == "").all() else table


def mean_sd(s: pd.Series, fmt: str = ".4f") -> str:
    """``mean ± sd`` over seeds (sd with ddof=1), the mean alone for one seed, ``–`` for none."""
    s = s.dropna()
    if s.empty:
        return "–"
    return f"{s.mean():{fmt}} ± {s.std(ddof=1):{fmt}}" if len(s) > 1 else f"{s.mean():{fmt}}"
