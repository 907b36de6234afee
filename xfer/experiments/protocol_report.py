"""A search-then-final protocol's results: results.csv (one row per run), results.md, results.png.

The protocol (xfer.experiments.protocol) runs, per arm (a fine-tuning method: linear_probe, full,
lp_ft, ...), a hyperparameter search scored on a validation split carved from train (stage
"search"), then retrains the chosen setting with several seeds and scores it once on the test split
(stage "final"). This module writes what a reviewer reads: every run, the protocol in plain words,
the chosen hyperparameters, and the final table with Student-t confidence intervals over seeds and
paired differences against a baseline arm (xfer.experiments.stats).

`write(rows, protocol, chosen, sweep_dir)` takes:

rows: a list of dicts, one per run (search and final), with the keys
    arm                   str, the method
    stage                 "search" or "final"
    trial                 int, the optuna trial number; None for a final run
    seed                  int
    state                 "complete", "pruned", "failed" or "running"
    params                dict {dotted config field: value}: the searched hyperparameters of the run,
                          e.g. {"optim.head.lr": 0.01}
    val_accuracy          float or None
    test_accuracy         float or None (a search run never sees the test split)
    trainable_parameters  int or None
    steps                 int or None: the steps it trained (a pruned run trains fewer)
    wall_seconds          float or None
    seconds_per_step      float or None
    workdir               str, relative to sweep_dir
  Arms appear in the tables in the order they first appear in `rows`.

protocol: a dict with the keys
    data          a short description, e.g. "digits, 32 px"
    val_fraction  the fraction of train held out as the validation split (stratified by class)
    split_seed    the seed of that split
    sampler, pruner  optuna's sampler and pruner, by name
    trials        search trials per arm (an int, or a dict {arm: int})
    search_seed   the seed of the search (its sampler, and its runs)
    final_seeds   list of int: the seeds each arm's chosen setting is retrained with
    train_on      "train+val" (final runs train on the whole train split) or "train" (on train
                  without the validation split, as the search runs did)
    baseline      the arm the others are compared with
    confidence    of the intervals, e.g. 0.95
    storage       where optuna keeps the study, e.g. "sqlite:///study.db"

chosen: a dict {arm: {"params": {...}, "val_accuracy": float, "trial": int,
                      "complete": int, "pruned": int, "failed": int}}: each arm's best search trial
    by validation accuracy and its search's trial counts.

A final run counts in the table when its state is "complete" and it has a test accuracy; an arm
missing any of `final_seeds` is listed as incomplete (with which seeds and why), never dropped. A
difference against the baseline pairs the seeds both arms finished, and says so when that is fewer
than all of `final_seeds`.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from xfer.experiments import stats
from xfer.experiments.ablation import MARKERS, or_dash

LEADING = ("arm", "stage", "trial", "seed", "state")
METRICS = ("val_accuracy", "test_accuracy", "trainable_parameters", "steps", "wall_seconds", "seconds_per_step",
           "workdir")
STAGES = ("search", "final")
STATES = ("complete", "pruned", "failed", "running")


def write(rows: Sequence[dict], protocol: dict, chosen: dict, sweep_dir: Path) -> None:
    """Writes results.csv, results.md and results.png into sweep_dir (see the module docstring)."""
    sweep_dir = Path(sweep_dir)
    rows = list(rows)
    _check(rows)
    arms = _arms(rows, chosen, protocol["baseline"])
    finals = {arm: _final(rows, arm, protocol) for arm in arms}
    (sweep_dir / "results.csv").write_text(_csv(rows))
    (sweep_dir / "results.md").write_text(_markdown(rows, protocol, chosen, arms, finals, sweep_dir))
    _plot(arms, finals, protocol, sweep_dir / "results.png")


# ---------------------------------------------------------------- inputs


def _check(rows: list[dict]) -> None:
    """Fails on rows the tables would misreport: an unknown stage or state, a seed finished twice."""
    if not rows:
        raise ValueError("no runs to report")
    seen: set[tuple] = set()
    for row in rows:
        if row["stage"] not in STAGES:
            raise ValueError(f"run {row.get('workdir')}: stage {row['stage']!r} is not one of {STAGES}")
        if row["state"] not in STATES:
            raise ValueError(f"run {row.get('workdir')}: state {row['state']!r} is not one of {STATES}")
        clash = set(row["params"]) & {*LEADING, *METRICS}
        if clash:
            raise ValueError(f"run {row.get('workdir')}: hyperparameter(s) {sorted(clash)} share a results.csv "
                             "column name")
        if row["stage"] == "final" and _counts(row):
            key = (row["arm"], row["seed"])
            if key in seen:
                raise ValueError(f"arm {row['arm']!r} has two finished final runs with seed {row['seed']}: "
                                 "which one the table should report is ambiguous")
            seen.add(key)


def _counts(row: dict) -> bool:
    """Whether a final run enters the statistics: complete, with a test accuracy."""
    return row["state"] == "complete" and row["test_accuracy"] is not None


def _arms(rows: list[dict], chosen: dict, baseline: str) -> list[str]:
    """The arms in order of first appearance in rows, then any only `chosen` or the baseline names."""
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    arms += [arm for arm in chosen if arm not in arms]
    return arms + ([baseline] if baseline not in arms else [])


def _final(rows: list[dict], arm: str, protocol: dict) -> dict:
    """An arm's final runs: by seed (those that count), the missing seeds and why, and the statistics."""
    runs = [row for row in rows if row["arm"] == arm and row["stage"] == "final"]
    by_seed = {row["seed"]: row for row in runs if _counts(row)}
    missing = {}
    for seed in protocol["final_seeds"]:
        if seed not in by_seed:
            states = [row["state"] for row in runs if row["seed"] == seed]
            missing[seed] = ", ".join(states) if states else "no run"
    accuracies = [row["test_accuracy"] for row in by_seed.values()]
    return {"runs": runs, "by_seed": by_seed, "missing": missing,
            "interval": stats.mean_ci(accuracies, protocol["confidence"]) if accuracies else None,
            "parameters": _mean([row["trainable_parameters"] for row in by_seed.values()]),
            "wall": _sum([row["wall_seconds"] for row in runs]),
            "search_wall": _sum([row["wall_seconds"] for row in rows
                                 if row["arm"] == arm and row["stage"] == "search"])}


def _difference(final: dict, baseline: dict, confidence: float) -> stats.Interval | None:
    """The paired difference over the seeds both arms finished, aligned by seed."""
    seeds = sorted(set(final["by_seed"]) & set(baseline["by_seed"]))
    if not seeds:
        return None
    return stats.paired_difference([final["by_seed"][seed]["test_accuracy"] for seed in seeds],
                                   [baseline["by_seed"][seed]["test_accuracy"] for seed in seeds], confidence)


def _mean(values: list) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.fmean(values) if values else None


def _sum(values: list) -> float | None:
    values = [value for value in values if value is not None]
    return math.fsum(values) if values else None


# ---------------------------------------------------------------- results.csv


def _csv(rows: list[dict]) -> str:
    params = sorted({key for row in rows for key in row["params"]})
    out = io.StringIO()
    writer = csv.DictWriter(out, [*LEADING, *params, *METRICS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = {**{key: row.get(key) for key in (*LEADING, *METRICS)}, **row["params"]}
        writer.writerow({key: "" if value is None else value for key, value in record.items()})
    return out.getvalue()


# ---------------------------------------------------------------- results.md


def _markdown(rows: list[dict], protocol: dict, chosen: dict, arms: list[str], finals: dict,
              sweep_dir: Path) -> str:
    lines = [f"# Ablation: {sweep_dir.name}", "", "## Protocol", "", _protocol_text(protocol), "",
             "## Chosen hyperparameters", "", *_chosen_table(arms, chosen, protocol), "",
             "## Final results (test split)", "", *_final_table(arms, finals, protocol), "",
             "## Reading", "", *_reading(arms, finals, protocol), *_edges(arms, chosen, protocol), "",
             f"{len(rows)} runs in all ({sum(row['stage'] == 'search' for row in rows)} search, "
             f"{sum(row['stage'] == 'final' for row in rows)} final); per run, with its hyperparameters and "
             "work directory: results.csv."]
    return "\n".join(lines) + "\n"


def _protocol_text(protocol: dict) -> str:
    confidence, seeds, baseline = protocol["confidence"], protocol["final_seeds"], protocol["baseline"]
    if protocol["train_on"] == "train+val":
        train_on = "train and validation together (the whole original train split)"
    elif protocol["train_on"] == "train":
        train_on = "train without the validation split, as the search runs did"
    else:
        raise ValueError(f"protocol train_on must be 'train+val' or 'train', got {protocol['train_on']!r}")
    trials = protocol["trials"]
    trials = (f"{trials} trials per arm" if not isinstance(trials, dict) else
              "trials per arm: " + ", ".join(f"{arm} {count}" for arm, count in trials.items()))
    return (
        f"Data: {protocol['data']}. "
        f"A validation split of {_percent(protocol['val_fraction'])} of the train split, stratified by class "
        f"and drawn with seed {protocol['split_seed']}, is carved from train; the search runs train on the rest "
        "and are scored on it, and no search run ever sees the test split. "
        "Each arm's hyperparameters are chosen by validation accuracy alone: "
        f"an optuna search with the {protocol['sampler']} sampler (seed {protocol['search_seed']}), "
        + ("no pruning" if protocol["pruner"] == "none" else f"the {protocol['pruner']} pruner on each evaluation's "
           "validation accuracy")
        + f", {trials}, study stored at `{protocol['storage']}`. "
        f"Each arm's chosen setting is then retrained on {train_on}, once per seed "
        f"({', '.join(map(str, seeds))}: {len(seeds)} seeds), and evaluated once on the test split, "
        "which gives every number in the final table. "
        f"Intervals are two-sided Student-t {_percent(confidence)} confidence intervals of the mean over the n "
        "seeds that finished: mean ± t·s/√n with s the sample standard deviation (n − 1 in its denominator) "
        f"and t the {(1 + confidence) / 2:g} quantile of Student's t with n − 1 degrees of freedom. "
        f"Δ vs {baseline} is the paired difference against the baseline arm over the same seeds: the same "
        "interval computed from the per-seed differences of test accuracy."
    )


def _chosen_table(arms: list[str], chosen: dict, protocol: dict) -> list[str]:
    lines = ["| arm | hyperparameters | best val accuracy | trial | complete | pruned | failed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for arm in arms:
        pick = chosen.get(arm)
        if pick is None:
            lines.append(f"| {_cell(arm)} | — (no trial chosen) | — | — | — | — | — |")
            continue
        params = ", ".join(f"`{key}={_value(value)}`" for key, value in sorted(pick["params"].items()))
        lines.append("| " + " | ".join([
            _cell(arm), _cell(params or "none searched"), or_dash(pick.get("val_accuracy"), lambda v: f"{v:.4f}"),
            or_dash(pick.get("trial"), str), *(str(pick.get(key, "—")) for key in ("complete", "pruned", "failed"))
        ]) + " |")
    return lines


def _final_table(arms: list[str], finals: dict, protocol: dict) -> list[str]:
    confidence, baseline = protocol["confidence"], protocol["baseline"]
    level = _percent(confidence)
    expected = len(protocol["final_seeds"])
    lines = [f"| arm | trainable parameters | test accuracy (mean ± std) | {level} CI | "
             f"Δ vs {_cell(baseline)} ({level} CI) | seeds | wall time | search cost |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in arms:
        final = finals[arm]
        interval = final["interval"]
        if arm == baseline:
            delta = "baseline"
        else:
            delta = _delta(_difference(final, finals[baseline], confidence), expected)
        seeds = f"{len(final['by_seed'])} of {expected}" + (" (incomplete)" if final["missing"] else "")
        lines.append("| " + " | ".join([
            _cell(arm), or_dash(final["parameters"], lambda v: f"{v:,.0f}"), _accuracy(interval),
            _interval(interval), delta, seeds, or_dash(final["wall"], _duration),
            or_dash(final["search_wall"], _duration)]) + " |")
    lines += ["", f"Test accuracy over the seeds that finished (mean ± sample std); {level} CI: Student t over "
              f"those n seeds. Δ: the paired difference over the seeds both the arm and {_cell(baseline)} "
              "finished (n given when fewer than all). Wall time: the sum over the arm's final runs; "
              "search cost: the sum over its search runs, pruned and failed ones included."]
    return lines


def _reading(arms: list[str], finals: dict, protocol: dict) -> list[str]:
    confidence, baseline = protocol["confidence"], protocol["baseline"]
    level, seeds = _percent(confidence), len(protocol["final_seeds"])
    lines = []
    compared = [arm for arm in arms if arm != baseline]
    for arm in compared:
        difference = _difference(finals[arm], finals[baseline], confidence)
        if difference is None:
            lines.append(f"- {arm}: no seed finished by both it and {baseline}; no comparison.")
        elif difference.n == 1:
            lines.append(f"- {arm}: only one seed finished by both it and {baseline} "
                         f"(Δ {difference.mean:+.4f}); no interval from one value, no claim.")
        elif difference.excludes(0.0):
            direction = "higher" if difference.mean > 0 else "lower"
            lines.append(f"- {arm}: test accuracy {direction} than {baseline} by {abs(difference.mean):.4f} "
                         f"({level} CI {_interval(difference, signed=True)}, n = {difference.n} paired seeds); "
                         "the interval excludes 0.")
        else:
            lines.append(f"- {arm}: no difference from {baseline} shown: Δ {difference.mean:+.4f}, "
                         f"{level} CI {_interval(difference, signed=True)} includes 0 "
                         f"(n = {difference.n} paired seeds).")
    if seeds >= 2:
        lines.append(f"- With n = {seeds} seeds the t critical value t({(1 + confidence) / 2:g}, {seeds - 1}) is "
                     f"{stats.t_critical(seeds, confidence):.2f}, so the intervals are wide: an interval that "
                     "includes 0 is not evidence of no difference, only of too few seeds to tell.")
    else:
        lines.append(f"- With n = {seeds} seed there is no interval at all: the table reports single runs.")
    if len(compared) > 1:
        lines.append(f"- {len(compared)} arms are compared with {baseline}, each at {level} with no correction "
                     "for multiple comparisons.")
    incomplete = [arm for arm in arms if finals[arm]["missing"]]
    for arm in incomplete:
        missing = finals[arm]["missing"]
        why = ", ".join(f"{seed} ({state})" for seed, state in missing.items())
        lines.append(f"- Incomplete: {arm} is missing final seed{'s' * (len(missing) > 1)} {why}; its statistics "
                     f"use the {len(finals[arm]['by_seed'])} of {seeds} seeds that finished.")
    if not incomplete:
        lines.append(f"- Every arm finished all {seeds} final seeds.")
    return lines


def _edges(arms: list[str], chosen: dict, protocol: dict) -> list[str]:
    """A chosen number at an end of what its search tried: the best may lie beyond, so the arm may be
    under-tuned against the others (`protocol["spaces"]`: {arm: {field: values tried, or [low, high]}})."""
    lines = []
    for arm in arms:
        tried = protocol.get("spaces", {}).get(arm, {})
        for field, value in sorted((chosen.get(arm) or {}).get("params", {}).items()):
            numbers = [v for v in tried.get(field, ()) if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numbers) >= 2 and value in (min(numbers), max(numbers)):
                lines.append(f"- Edge: {arm}'s {field}={_value(value)} is at an end of its search "
                             f"({_value(min(numbers))}..{_value(max(numbers))}); its best may lie beyond: widen "
                             "the space before concluding against it.")
    return lines


def _accuracy(interval: stats.Interval | None) -> str:
    if interval is None:
        return "—"
    if interval.std is None:
        return f"{interval.mean:.4f} (n = 1)"
    return f"{interval.mean:.4f} ± {interval.std:.4f}"


def _interval(interval: stats.Interval | None, signed: bool = False) -> str:
    if interval is None:
        return "—"
    if interval.low is None:
        return "— (n = 1)"
    sign = "+" if signed else ""
    return f"[{interval.low:{sign}.4f}, {interval.high:{sign}.4f}]"


def _delta(difference: stats.Interval | None, expected: int) -> str:
    if difference is None:
        return "—"
    text = f"{difference.mean:+.4f} {_interval(difference, signed=True)}"
    return text + (f" (n = {difference.n})" if difference.n < expected else "")


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- results.png


def _plot(arms: list[str], finals: dict, protocol: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster or in CI
    from matplotlib import pyplot as plt

    level = _percent(protocol["confidence"])
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for index, arm in enumerate(arms):
        final = finals[arm]
        x, interval = final["parameters"], final["interval"]
        if x is None or interval is None:
            continue
        # A legend, not labels beside the points: arms of equal size (full, lp_ft) or close sizes
        # would overprint each other's labels (as in xfer.experiments.ablation).
        axes.errorbar(x, interval.mean, yerr=interval.half_width, fmt=MARKERS[index // 10 % len(MARKERS)],
                      capsize=3, label=f"{arm} (n = {interval.n})")
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel("test accuracy")
    axes.set_title(f"test accuracy vs trainable parameters (mean, {level} CI over seeds)")
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
