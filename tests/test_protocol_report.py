"""The search-then-final protocol's three result files, from hand-built rows (no training).

Three arms: linear_probe (the baseline) and full finished all three final seeds; lp_ft lost seed 2
(failed), so its statistics use two seeds and it is flagged incomplete. The search has a pruned
trial. The numbers in results.md are checked against xfer.experiments.stats, formatted as the
table formats them (4 decimals), so a wrong pairing of seeds or a wrong CI shows up as a text mismatch.
"""

from __future__ import annotations

import csv

import pytest

from xfer.experiments import protocol_report, stats

SEEDS = [0, 1, 2]
TEST = {  # arm -> seed -> test accuracy; lp_ft has no seed 2
    "linear_probe": {0: 0.801, 1: 0.812, 2: 0.795},
    "full": {0: 0.902, 1: 0.921, 2: 0.899},
    "lp_ft": {0: 0.915, 1: 0.905},
}
PARAMETERS = {"linear_probe": 12_810, "full": 3_383_498, "lp_ft": 3_383_498}


def _row(arm, stage, trial, seed, state, params, val=None, test=None, steps=100, wall=10.0):
    return {"arm": arm, "stage": stage, "trial": trial, "seed": seed, "state": state, "params": params,
            "val_accuracy": val, "test_accuracy": test,
            "trainable_parameters": PARAMETERS[arm] if state != "failed" else None,
            "steps": steps, "wall_seconds": wall,
            "seconds_per_step": None if wall is None or steps is None else wall / steps,
            "workdir": f"{arm}/{stage}-{trial if stage == 'search' else seed}"}


def _inputs():
    rows = [
        _row("linear_probe", "search", 0, 0, "complete", {"optim.head.lr": 0.1}, val=0.79),
        _row("linear_probe", "search", 1, 0, "complete", {"optim.head.lr": 0.01}, val=0.81),
        _row("full", "search", 0, 0, "complete", {"optim.head.lr": 0.01, "optim.backbone.lr": 0.001}, val=0.90),
        _row("full", "search", 1, 0, "pruned", {"optim.head.lr": 0.1, "optim.backbone.lr": 0.01}, val=0.40,
             steps=20, wall=2.0),
        _row("lp_ft", "search", 0, 0, "complete", {"optim.head.lr": 0.01, "optim.backbone.lr": 0.0003}, val=0.91),
        _row("lp_ft", "search", 1, 0, "failed", {"optim.head.lr": 0.3, "optim.backbone.lr": 0.003}, steps=None,
             wall=None),
    ]
    best = {"linear_probe": {"optim.head.lr": 0.01}, "full": {"optim.head.lr": 0.01, "optim.backbone.lr": 0.001},
            "lp_ft": {"optim.head.lr": 0.01, "optim.backbone.lr": 0.0003}}
    for arm, by_seed in TEST.items():
        for seed in SEEDS:
            if seed in by_seed:
                rows.append(_row(arm, "final", None, seed, "complete", best[arm], test=by_seed[seed], wall=30.0))
            else:
                rows.append(_row(arm, "final", None, seed, "failed", best[arm], steps=None, wall=5.0))
    protocol = {"val_fraction": 0.1, "split_seed": 7, "sampler": "tpe", "pruner": "median",
                "trials": 2, "search_seed": 0, "final_seeds": SEEDS, "train_on": "train+val",
                "baseline": "linear_probe", "confidence": 0.95, "storage": "sqlite:///study.db",
                "data": "digits, 32 px",
                "spaces": {"linear_probe": {"optim.head.lr": [0.001, 0.01, 0.1]},
                           "full": {"optim.head.lr": [0.01, 0.1], "optim.backbone.lr": [0.0001, 0.001, 0.01]},
                           "lp_ft": {"optim.head.lr": [0.01, 0.3], "optim.backbone.lr": [1e-4, 3e-3]}}}
    chosen = {
        "linear_probe": {"params": best["linear_probe"], "val_accuracy": 0.81, "trial": 1,
                         "complete": 2, "pruned": 0, "failed": 0},
        "full": {"params": best["full"], "val_accuracy": 0.90, "trial": 0, "complete": 1, "pruned": 1, "failed": 0},
        "lp_ft": {"params": best["lp_ft"], "val_accuracy": 0.91, "trial": 0, "complete": 1, "pruned": 0,
                  "failed": 1},
    }
    return rows, protocol, chosen


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("protocol_sweep")
    rows, protocol, chosen = _inputs()
    protocol_report.write(rows, protocol, chosen, sweep_dir)
    return sweep_dir, rows


def _table_row(markdown: str, arm: str, header_start: str) -> list[str]:
    """The cells of `arm`'s row in the table whose header starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == arm:
            return cells
    raise AssertionError(f"no row for {arm} under {header_start!r}")


def test_csv_has_one_row_per_run_and_a_column_per_hyperparameter(written):
    sweep_dir, rows = written
    with open(sweep_dir / "results.csv", newline="") as file:
        reader = csv.DictReader(file)
        header, records = reader.fieldnames, list(reader)
    assert header == ["arm", "stage", "trial", "seed", "state", "optim.backbone.lr", "optim.head.lr",
                      "val_accuracy", "test_accuracy", "trainable_parameters", "steps", "wall_seconds",
                      "seconds_per_step", "workdir"]
    assert len(records) == len(rows) == 6 + 9
    first = records[0]  # linear_probe's first search trial: no backbone lr
    assert (first["arm"], first["stage"], first["trial"], first["state"]) == ("linear_probe", "search", "0", "complete")
    assert first["optim.head.lr"] == "0.1" and first["optim.backbone.lr"] == ""
    assert first["test_accuracy"] == ""  # a search run never sees the test split
    pruned = records[3]
    assert (pruned["arm"], pruned["state"], pruned["steps"]) == ("full", "pruned", "20")
    assert pruned["optim.backbone.lr"] == "0.01"
    final = [record for record in records if record["stage"] == "final"]
    assert all(record["trial"] == "" for record in final)
    assert [(r["arm"], r["seed"], r["state"]) for r in final if r["state"] != "complete"] == [("lp_ft", "2", "failed")]
    assert float(final[0]["test_accuracy"]) == TEST["linear_probe"][0]


def test_markdown_states_the_protocol(written):
    markdown = (written[0] / "results.md").read_text()
    protocol = markdown.split("## Protocol", 1)[1].split("##", 1)[0]
    for sentence in ["Data: digits, 32 px.",
                     "A validation split of 10% of the train split, stratified by class and drawn with seed 7, "
                     "is carved from train",
                     "no search run ever sees the test split",
                     "chosen by validation accuracy alone",
                     "tpe sampler (seed 0), the median pruner on each evaluation's validation accuracy, "
                     "2 trials per arm",
                     "retrained on train and validation together",
                     "(0, 1, 2: 3 seeds)",
                     "evaluated once on the test split",
                     "two-sided Student-t 95% confidence intervals of the mean over the n seeds",
                     "Δ vs linear_probe is the paired difference against the baseline arm over the same seeds"]:
        assert sentence in protocol, sentence


def test_markdown_lists_the_chosen_hyperparameters(written):
    markdown = (written[0] / "results.md").read_text()
    header = "| arm | hyperparameters"
    assert _table_row(markdown, "linear_probe", header) == [
        "linear_probe", "`optim.head.lr=0.01`", "0.8100", "1", "2", "0", "0"]
    assert _table_row(markdown, "full", header) == [
        "full", "`optim.backbone.lr=0.001`, `optim.head.lr=0.01`", "0.9000", "0", "1", "1", "0"]
    assert _table_row(markdown, "lp_ft", header)[4:] == ["1", "0", "1"]


def test_final_table_matches_the_statistics(written):
    markdown = (written[0] / "results.md").read_text()
    header = "| arm | trainable parameters"
    assert "Δ vs linear_probe (95% CI)" in markdown
    base = [TEST["linear_probe"][seed] for seed in SEEDS]

    cells = _table_row(markdown, "linear_probe", header)
    interval = stats.mean_ci(base)
    assert cells[:6] == ["linear_probe", "12,810", f"{interval.mean:.4f} ± {interval.std:.4f}",
                         f"[{interval.low:.4f}, {interval.high:.4f}]", "baseline", "3 of 3"]
    assert cells[6:] == ["90 s", "20 s"]  # 3 final runs x 30 s; 2 search runs x 10 s

    cells = _table_row(markdown, "full", header)
    values = [TEST["full"][seed] for seed in SEEDS]
    interval, difference = stats.mean_ci(values), stats.paired_difference(values, base)
    assert cells[2] == f"{interval.mean:.4f} ± {interval.std:.4f}"
    assert cells[3] == f"[{interval.low:.4f}, {interval.high:.4f}]"
    assert cells[4] == f"{difference.mean:+.4f} [{difference.low:+.4f}, {difference.high:+.4f}]"
    assert cells[7] == "12 s"  # the pruned trial's cost counts

    # lp_ft: two seeds, paired with the baseline's seeds 0 and 1 only, and said so.
    cells = _table_row(markdown, "lp_ft", header)
    values = [TEST["lp_ft"][0], TEST["lp_ft"][1]]
    interval, difference = stats.mean_ci(values), stats.paired_difference(values, base[:2])
    assert cells[3] == f"[{interval.low:.4f}, {interval.high:.4f}]"
    assert cells[4] == f"{difference.mean:+.4f} [{difference.low:+.4f}, {difference.high:+.4f}] (n = 2)"
    assert cells[5] == "2 of 3 (incomplete)"
    assert cells[6] == "65 s"  # the failed final run's 5 s count too


def test_reading_names_the_differences_and_the_incomplete_arm(written):
    markdown = (written[0] / "results.md").read_text()
    reading = markdown.split("## Reading", 1)[1]
    assert "- full: test accuracy higher than linear_probe by" in reading
    assert "the interval excludes 0" in reading
    assert "t critical value t(0.975, 2) is 4.30" in reading
    assert "Incomplete: lp_ft is missing final seed 2 (failed); its statistics use the 2 of 3" in reading
    assert "no correction for multiple comparisons" in reading
    # Rows in the order the arms first appear.
    table = markdown.split("## Final results", 1)[1]
    assert table.index("| linear_probe") < table.index("| full") < table.index("| lp_ft")


def test_an_interval_that_includes_zero_is_read_as_no_difference_shown(tmp_path):
    rows, protocol, chosen = _inputs()
    for row in rows:  # lp_ft's seeds now straddle the baseline
        if row["arm"] == "lp_ft" and row["stage"] == "final" and row["seed"] in (0, 1):
            row["test_accuracy"] = {0: 0.811, 1: 0.790}[row["seed"]]
    protocol_report.write(rows, protocol, chosen, tmp_path)
    reading = (tmp_path / "results.md").read_text().split("## Reading", 1)[1]
    assert "- lp_ft: no difference from linear_probe shown" in reading and "includes 0" in reading


def test_png_is_written(written):
    data = (written[0] / "results.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_a_seed_finished_twice_is_refused(tmp_path):
    rows, protocol, chosen = _inputs()
    rows.append(dict(rows[-2]))  # lp_ft seed 1, complete
    with pytest.raises(ValueError, match="two finished final runs"):
        protocol_report.write(rows, protocol, chosen, tmp_path)


def test_a_choice_at_an_end_of_its_search_is_flagged(written):
    """A best value at an end of what was tried may be beaten beyond it: the arm may be under-tuned."""
    sweep_dir, _ = written
    edges = [line for line in (sweep_dir / "results.md").read_text().splitlines() if line.startswith("- Edge: ")]
    assert edges == [
        "- Edge: full's optim.head.lr=0.01 is at an end of its search (0.01..0.1); its best may lie beyond: "
        "widen the space before concluding against it.",
        "- Edge: lp_ft's optim.head.lr=0.01 is at an end of its search (0.01..0.3); its best may lie beyond: "
        "widen the space before concluding against it.",
    ]  # linear_probe's 0.01 and full's and lp_ft's backbone rates lie inside their ranges
