"""Turn the results files of one or more sweeps into the papers' tables and figures (no W&B needed).

    python scripts/make_tables.py outputs/multiruns/<date>/<time> [more sweep dirs] [--out outputs/tables]

Each job directory of a sweep holds ``.hydra/config.yaml`` and ``analysis/<name>/results.jsonl``; jobs that failed
(a ``FAILED`` file, or no results) are listed and left out, and so are jobs whose model did not learn: best
validation accuracy not above chance (one-sided binomial test against 1/C on the job's ``data.n_val`` images, p >
0.001), whose "trained" analyses would describe a random net (``--keep-untrained`` keeps them). Every table groups
its rows by model, data and every override that differs across the jobs (``.hydra/overrides.yaml``: e.g. ``init``,
``optimizer.lr``), so only seeds are averaged; each markdown table says what it grouped by. Each registered
analysis writes its own tables (``tables`` in ``featurelens/analysis/<name>/report.py``): ``chirality_init.*``
(with the ANOVA of "the init does not matter", spec §7), ``class_filters_k.*``, ``class_filters_depth.*``,
``specialization.*``, ``dissection_layers.*``, ``dissection_epochs.*``, ``linking.*`` and their figures; the
README's sections say what each holds. ``report.html`` in ``--out`` shows them all on one static page."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from scipy.stats import binomtest

from featurelens.api import REGISTRY
from featurelens.report_page import write_sweep_report
from featurelens.results import read_results
from featurelens.tables import SweepJob


def find_jobs(sweep_dirs: list[Path]) -> tuple[list[Path], list[Path]]:
    """Job dirs (those with a composed config) below the sweep dirs, split into finished and failed."""
    jobs = sorted({p.parent.parent for d in sweep_dirs for p in Path(d).rglob(".hydra/config.yaml")})
    failed = [j for j in jobs if (j / "FAILED").exists() or not (j / "metrics.json").exists()]
    return [j for j in jobs if j not in failed], failed


def failure(job: Path) -> str:
    """Why a job is left out of the tables: its FAILED file's last line (a diverged run says so), or unfinished."""
    if not (job / "FAILED").exists():
        return "unfinished (no metrics.json)"
    lines = [line for line in (job / "FAILED").read_text().splitlines() if line.strip()]
    reason = lines[-1] if lines else "no reason recorded"
    return f"{'diverged' if reason.startswith(('DivergedError', 'NonFiniteLossError')) else 'failed'} ({reason})"


def at_chance(job: Path, alpha: float = 1e-3) -> str | None:
    """Why a finished job's model counts as not trained (its best val accuracy is not above 1/C), else None.

    Judged only where the job logged a validation accuracy and its data config names ``num_classes`` and
    ``n_val`` (the embedded datasets); a run with no training epoch is not judged."""
    metrics = json.loads((job / "metrics.json").read_text())
    acc = metrics.get("val/acc_best", metrics.get("val/acc"))
    data = OmegaConf.load(job / ".hydra" / "config.yaml").get("data", {})
    n, classes = data.get("n_val"), data.get("num_classes")
    if acc is None or not isinstance(n, int) or not isinstance(classes, int) or classes < 2 or n < 1:
        return None
    p = binomtest(round(acc * n), n, 1 / classes, alternative="greater").pvalue
    if p <= alpha:
        return None
    return f"not trained: best val acc {acc:.3f} with {classes} classes on {n} images is not above chance (p = {p:.2g})"


# never a setting: the seed is what the tables average over; the rest names where and how a job logged
NOT_SETTINGS = ("seed", "paths.", "logger", "callbacks.", "ckpt_path", "tags", "test", "hydra.")
CHOICE_COLUMNS = ("model", "data")  # model= and data= are the tables' own model and data columns


def _overrides(job: Path) -> dict[str, str]:
    """The job's command-line and sweep overrides (``.hydra/overrides.yaml``) as key -> value."""
    path = job / ".hydra" / "overrides.yaml"
    items = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else []
    pairs = (item.lstrip("+~").split("=", 1) for item in items if "=" in item)
    return {key: value for key, value in pairs}


class Settings:
    """The overrides that differ across the jobs (the swept settings). The seed is never a setting (the tables
    average over it), nor are the model and data choices (their own columns; ``model.channels`` and the like are
    settings)."""

    def __init__(self, jobs: list[Path]):
        self.given = {job: _overrides(job) for job in jobs}
        self.configs = {job: OmegaConf.load(job / ".hydra" / "config.yaml") for job in jobs}  # read once per job
        keys = sorted({k for o in self.given.values() for k in o})
        self.swept = [k for k in keys if k not in CHOICE_COLUMNS and not k.startswith(NOT_SETTINGS)
                      and len({o.get(k) for o in self.given.values()}) > 1]

    def job(self, job: Path, analysis: str) -> SweepJob:
        """The job as ``analysis``' tables read it, with its records (none: the job did not run it)."""
        results = job / "analysis" / analysis / "results.jsonl"
        records = read_results(results) if results.exists() else []
        return SweepJob(job, self.configs[job], records, self.given[job], self.swept)

    def line(self, columns: list[str], shown: tuple[str, ...] = ()) -> str:
        """The markdown line that says what a table's rows are grouped by."""
        rest = [k for k in self.swept if k not in shown]
        setting = f" and the swept setting ({', '.join(rest)})" if rest else ""
        return f"Rows grouped by {', '.join(columns)}{setting}; seeds averaged."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep (multirun) directories")
    parser.add_argument("--out", type=Path, default=Path("outputs/tables"))
    parser.add_argument("--keep-untrained", action="store_true",
                        help="keep jobs whose best val accuracy is not above chance")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.sweeps if not d.is_dir()]
    if missing:
        print(f"make_tables: error: no such directory: {missing}", file=sys.stderr)
        return 2
    jobs, failed = find_jobs(args.sweeps)
    notes = [f"skipping {failure(job)} job {job}" for job in failed]
    if not args.keep_untrained:
        untrained = {job: why for job in jobs if (why := at_chance(job))}
        notes += [f"skipping {why}: job {job} (--keep-untrained keeps it)" for job, why in untrained.items()]
        jobs = [job for job in jobs if job not in untrained]
    for note in notes:
        print(note, file=sys.stderr)
    settings = Settings(jobs)
    notes.insert(0, f"{len(jobs)} jobs of {', '.join(map(str, args.sweeps))}; rows grouped by model, data and the "
                    f"swept settings {settings.swept or '(none)'}; seeds averaged")
    print(notes[0])
    written = []
    for name, analysis in REGISTRY.items():
        analysed = [job for job in (settings.job(j, name) for j in jobs) if job.records]
        if analysed:
            written += analysis.tables(analysed, settings.line, args.out)
    if not written:
        print(f"make_tables: error: no analysis results in {len(jobs)} finished jobs", file=sys.stderr)
        return 1
    written.append(write_sweep_report(args.out, written, notes))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
