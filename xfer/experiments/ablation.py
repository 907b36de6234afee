"""A sweep's results: results.csv (one row per run), results.md (over seeds), results.png.

The answer an ablation gives is a trade-off, so the table puts accuracy next to
what it costs: trainable parameters, optimizer-state bytes, seconds per step
and wall time. Runs that differ only in `seed` form one row of results.md
(accuracy as mean ± sample standard deviation over the seeds) and one point of
results.png, eval accuracy against trainable parameters on a log axis.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

METRICS = ("eval_accuracy", "eval_top5", "trainable_parameters", "optimizer_state_bytes", "seconds_per_step",
           "wall_seconds")
SEED = "seed"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # a new marker each time matplotlib's 10 colours repeat


def write(runs: Sequence, sweep_dir: Path) -> None:
    """Writes the three files from each run's summary.json; `runs` are `xfer.experiments.sweep.Run`s."""
    fields = list(runs[0].values)
    rows = [{**run.values, **_summary_metrics(sweep_dir / run.name / "summary.json")} for run in runs]
    groups = _over_seeds(rows, [field for field in fields if field != SEED])
    (sweep_dir / "results.csv").write_text(_csv(rows, fields))
    (sweep_dir / "results.md").write_text(_markdown(groups, fields, sweep_dir))
    _plot(groups, sweep_dir / "results.png")


def _summary_metrics(path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text())
    return {metric: summary.get(metric) for metric in METRICS}


def _csv(rows: list[dict], fields: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, [*fields, *METRICS], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue()


def _over_seeds(rows: list[dict], keys: list[str]) -> list[dict]:
    """One group per combination of the non-seed fields, in grid order: its key values and its runs."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(repr(row[field]) for field in keys)
        groups.setdefault(key, {"values": {field: row[field] for field in keys}, "runs": []})["runs"].append(row)
    return list(groups.values())


def _mean(runs: list[dict], metric: str) -> float | None:
    values = [run[metric] for run in runs if run[metric] is not None]
    return statistics.fmean(values) if values else None


def _std(runs: list[dict], metric: str) -> float | None:
    values = [run[metric] for run in runs if run[metric] is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _label(group: dict) -> str:
    return ", ".join(str(value) for value in group["values"].values()) or "all runs"


def _markdown(groups: list[dict], fields: list[str], sweep_dir: Path) -> str:
    keys = [field for field in fields if field != SEED]
    seeds = sorted({len(group["runs"]) for group in groups})
    header = [*keys, "eval accuracy", "trainable parameters", "optimizer state", "s / step", "wall time"]
    lines = [f"# Ablation: {sweep_dir.name}", "",
             f"{sum(len(group['runs']) for group in groups)} runs; each row is the mean over "
             f"{'/'.join(map(str, seeds))} run(s) that differ only in {SEED} (accuracy: mean ± sample std). "
             "Step time is a training step after the compiling one, evaluation and checkpointing left out; "
             "wall time is the whole run, start-up and compilation included. Per run: results.csv.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(keys) + "---:|" * (len(header) - len(keys))]
    for group in groups:
        runs = group["runs"]
        accuracy, spread = _mean(runs, "eval_accuracy"), _std(runs, "eval_accuracy")
        cells = [*(str(group["values"][key]) for key in keys),
                 "—" if accuracy is None else f"{accuracy:.4f}" + ("" if spread is None else f" ± {spread:.4f}"),
                 or_dash(_mean(runs, "trainable_parameters"), lambda v: f"{v:,.0f}"),
                 or_dash(_mean(runs, "optimizer_state_bytes"), _bytes),
                 or_dash(_mean(runs, "seconds_per_step"), lambda v: f"{v:.3f}"),
                 or_dash(_mean(runs, "wall_seconds"), lambda v: f"{v:.0f} s")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def or_dash(value, formatted) -> str:
    return "—" if value is None else formatted(value)


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def _plot(groups: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster or in CI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for index, group in enumerate(groups):
        x, y = _mean(group["runs"], "trainable_parameters"), _mean(group["runs"], "eval_accuracy")
        if x is None or y is None:
            continue
        # A legend, not labels beside the points: masks of equal size (full, scratch) or close
        # sizes (bias_only, norm_only) would overprint each other's labels.
        axes.errorbar(x, y, yerr=_std(group["runs"], "eval_accuracy") or 0, fmt=MARKERS[index // 10 % len(MARKERS)],
                      capsize=3, label=_label(group))
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("eval accuracy")
    axes.set_title("accuracy vs trainable parameters (mean ± std over seeds)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
