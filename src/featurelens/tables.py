"""What every analysis' sweep tables share: the seed statistic of a cell and the ``setting`` column.

A table's ``frame`` has one row per finished job (its final record), with ``model``, ``setting`` (the text of
the swept settings the table does not show itself, from ``scripts/make_tables.py``'s ``Settings``) and
``seed``; ``grouped_by(columns)`` is the markdown line that says what the rows are grouped by.
"""

from __future__ import annotations

import pandas as pd


def without_empty_setting(table: pd.DataFrame) -> pd.DataFrame:
    """Drop the ``setting`` column when nothing but the tables' own columns was swept."""
    return table.drop(columns="setting") if "setting" in table and (table["setting"] == "").all() else table


def mean_sd(s: pd.Series, fmt: str = ".4f") -> str:
    """``mean ± sd`` over seeds (sd with ddof=1), the mean alone for one seed, ``–`` for none."""
    s = s.dropna()
    if s.empty:
        return "–"
    return f"{s.mean():{fmt}} ± {s.std(ddof=1):{fmt}}" if len(s) > 1 else f"{s.mean():{fmt}}"
