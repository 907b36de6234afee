"""Schedules of freeze masks (`xfer.learning.phases`): LP-FT and gradual unfreezing.

The plans of each phase are checked from shapes alone; one LP-FT run (Lite0 from its ImageNet
weights on digits at 32 px, the probe phase on cached features, the full phase on images) is
checked end to end in subprocesses: phase 1 leaves the backbone untouched, phase 2 moves it,
the group table changes at the boundary, and a run SIGKILLed inside phase 2 or right at the
boundary resumes to the bits of the uninterrupted run (state, data position, eval metrics).
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import ablate_freeze
from test_train_equivalence import (ATOL, MOMENTUM_RTOL, RTOL, assert_bitwise_equal, launch, leaves, read_data_state,
                                    read_state, saved_steps, tolerance_used)
from xfer import models
from xfer.learning import phases
from xfer.learning.optim import OptimConfigError
from xfer.learning.partition import FROZEN, PartitionError
from xfer.weights.initialise import initial_variables

TOTAL, BOUNDARY = 8, 4
LP_FT = "linear_probe@0,full@0.5*0.1"
CONFIG = [
    "--config=configs/ablate_freeze.py",  # Lite0, ImageNet weights, digits at 32 px, head + backbone groups
    f"--config.partition={LP_FT}",
    f"--config.total_steps={TOTAL}",
    "--config.batch_size=16",
    "--config.optim.backbone.warmup_steps=0",
    "--config.feature_cache=auto",  # the probe phase trains on cached features, the full phase on images
    "--config.data.test_fraction=0.05",
    "--config.checkpoint.every=3",  # saves 3, 4 (the phase's end), 6, 8
    "--config.checkpoint.keep_latest=5",
    "--config.eval_every=100",
]


def _config(partition, total_steps=9):
    fields = ablate_freeze.get_config().to_dict()  # a config file may hold a schedule as a string or a tuple
    config = ml_collections.ConfigDict({**fields, "partition": partition, "total_steps": total_steps})
    config.optim.backbone.warmup_steps = 0
    return config


@pytest.fixture(scope="module")
def lite0_shapes():
    model = models.build("efficientnet_lite0", num_classes=10)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def _build(partition, shapes, total_steps=9):
    return phases.build(_config(partition, total_steps), "efficientnet_lite0", shapes, total_steps)


def test_a_plain_preset_is_one_phase_with_the_plan_it_always_had(lite0_shapes):
    (only,) = _build("last_k:2", lite0_shapes)
    assert (only.start, only.end, only.carried, dict(only.schedule_offsets)) == (0, 9, frozenset(), {})
    assert set(jax.tree.leaves(only.plan.labels)) == {"head", "backbone", FROZEN}


def test_lp_ft_probes_then_trains_everything_at_a_scaled_learning_rate(lite0_shapes):
    probe, full = _build(LP_FT, lite0_shapes, total_steps=10)
    assert (probe.start, probe.end, full.start, full.end) == (0, 5, 5, 10)
    assert set(jax.tree.leaves(probe.plan.labels)) == {"head", FROZEN}
    assert set(jax.tree.leaves(full.plan.labels)) == {"head", "backbone"}
    config = _config(LP_FT)
    assert full.plan.optim_specs["backbone"]["lr"] == pytest.approx(config.optim.backbone.lr * 0.1)
    assert full.plan.optim_specs["head"]["lr"] == pytest.approx(config.optim.head.lr * 0.1)
    # The head trains on with the same Adam: its state, and its update count, carry over.
    assert full.carried == {"head"} and dict(full.schedule_offsets) == {"head": 5}


def test_gradual_unfreezing_gives_each_newly_unfrozen_block_its_own_optimizer_state(lite0_shapes):
    first, second, third = _build("gradual_unfreeze:3", lite0_shapes)
    blocks = models.info("efficientnet_lite0").blocks
    groups = [set(jax.tree.leaves(phase.plan.labels)) for phase in (first, second, third)]
    assert groups == [{"head", FROZEN}, {"head", "backbone", FROZEN}, {"head", "backbone", "backbone.phase3", FROZEN}]
    paths = {"/".join(str(k.key) for k in path): label
             for path, label in jax.tree_util.tree_leaves_with_path(third.plan.labels)}
    assert {label for path, label in paths.items() if re.search(blocks[-1], path)} == {"backbone"}
    assert {label for path, label in paths.items() if re.search(blocks[-2], path)} == {"backbone.phase3"}
    assert third.carried == {"head", "backbone"} and dict(third.schedule_offsets) == {"head": 6, "backbone": 3}
    assert third.plan.optim_specs["backbone.phase3"] == third.plan.optim_specs["backbone"]


def test_rules_and_spec_overrides_per_phase(lite0_shapes):
    schedule = ((0.0, "linear_probe"),
                (0.5, (("^_fc/", "head"), (".*", "backbone")), {"head": {"optimizer": "sgd", "momentum": 0.9},
                                                               "backbone": {"lr": 1e-5}}))
    _, second = _build(schedule, lite0_shapes)
    assert second.plan.optim_specs["backbone"]["lr"] == 1e-5
    assert second.carried == frozenset()  # Adam's state cannot become SGD's momentum: the head starts afresh


@pytest.mark.parametrize("partition, message", [
    ("linear_probe@0.1,full@0.5", "must start at 0"),
    ("linear_probe@0,full@0.5,last_k:1@0.4", "must increase from 0"),
    ("linear_probe@0,full@1", "stay below 1"),
    ("linear_probe@0,full", "is not PRESET@FRACTION"),
    ("linear_probe@0,fulll@0.5", "unknown partition preset 'fulll'"),
    ("linear_probe@0,full@0.5*0", "learning-rate scale is 0.0"),
    ("linear_probe@0,full@0.05", "phase 1 of 2 gets no steps"),
    ("gradual_unfreeze:1", "N >= 2"),
    ("gradual_unfreeze:40", "unfreezes 39 blocks"),
    (((0.0, "linear_probe"), (0.5, ((".*", FROZEN),))), "phase 2 (rules) freezes every parameter"),
    (((0.0, "linear_probe"), (0.5, "full", {"neck": {"lr": 1.0}})), "config.optim.neck, which does not exist"),
])
def test_a_schedule_no_run_could_use_is_refused_in_one_line(lite0_shapes, partition, message):
    with pytest.raises(PartitionError, match=re.escape(message)) as error:
        _build(partition, lite0_shapes)
    assert "\n" not in str(error.value)


def test_a_warmup_longer_than_its_phase_names_the_phase(lite0_shapes):
    config = _config(LP_FT)
    config.optim.backbone.warmup_steps = 10
    with pytest.raises(OptimConfigError, match=re.escape(
            "config.partition: phase 2 (full, 5 steps): config.optim.backbone.warmup_steps=10 leaves no steps")):
        phases.build(config, "efficientnet_lite0", lite0_shapes, 9)


# End to end: one uninterrupted LP-FT run, and runs killed at the boundary and inside phase 2.

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("phases") / "reference"
    run = launch(workdir, config=CONFIG)
    return workdir, run.output


def _table_after(output: str, heading: str) -> str:
    return output.split(heading, 1)[1].split("total", 1)[0]


def test_lp_ft_freezes_the_backbone_then_trains_it(reference):
    workdir, output = reference
    assert saved_steps(workdir) == [3, BOUNDARY, 6, TOTAL]
    probe_table = _table_after(output, "phase 1 (linear_probe): steps 1..4")
    full_table = _table_after(output, "phase 2 (full): steps 5..8; optimizer state kept for head")
    assert "backbone" not in probe_table and re.search(r"frozen\s+\d+", probe_table)
    assert "backbone" in full_table and FROZEN not in full_table
    assert "feature cache: phase 2 trains on images" in output
    assert json.loads((workdir / "summary.json").read_text())["phases"] == [
        {"setting": "linear_probe", "first_step": 1, "last_step": 4, "trainable_parameters": 12_810},
        {"setting": "full", "first_step": 5, "last_step": 8, "trainable_parameters": 3_383_818}]

    model = models.build("efficientnet_lite0", num_classes=10)
    initial = initial_variables(model, "efficientnet_lite0", "imagenet", 32, 0, True)["params"]
    at_boundary, final = read_state(workdir, BOUNDARY)["params"], read_state(workdir, TOTAL)["params"]
    backbone = [key for key in leaves(initial) if not key.startswith("['_fc']")]
    start, middle, end = leaves(initial), leaves(at_boundary), leaves(final)
    assert all(np.array_equal(middle[key], start[key]) for key in backbone)  # phase 1: bitwise untouched
    assert not np.array_equal(middle["['_fc']['kernel']"], start["['_fc']['kernel']"])
    moved = [key for key in backbone if not np.array_equal(end[key], middle[key])]
    assert len(moved) > len(backbone) // 2  # phase 2 trains it (a few tensors have zero gradient)


@pytest.mark.parametrize("killed_after", [BOUNDARY, 6])
def test_sigkill_at_or_after_the_boundary_then_resume_is_bitwise_the_uninterrupted_run(
        reference, killed_after):
    reference_dir, _ = reference
    workdir = reference_dir.parent / f"killed_after_{killed_after}"
    launch(workdir, config=CONFIG, kill_after_save=killed_after)
    resumed = launch(workdir, config=CONFIG)
    assert f"resumed from step {killed_after}" in resumed.output
    assert_bitwise_equal(read_state(workdir, TOTAL), read_state(reference_dir, TOTAL))
    assert read_data_state(workdir, TOTAL) == read_data_state(reference_dir, TOTAL)
    evaluations = [{k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k.startswith("eval")}
                   for run in (workdir, reference_dir)]
    assert evaluations[0] == evaluations[1] and "eval_accuracy" in evaluations[0]


def test_unfreezing_on_eight_devices_computes_what_one_device_does(reference):
    """The full phase's gradients are all-reduced like any other: nothing is left out when parameters
    start training mid-run (Lightning #20340). SGD with momentum, not Adam, for the reason
    tests/test_train_equivalence.py gives; the same tolerances, measured there."""
    sgd = ("--config.optim.head.optimizer=sgd", "--config.optim.head.momentum=0.9", "--config.optim.head.lr=0.01",
           "--config.optim.backbone.optimizer=sgd", "--config.optim.backbone.momentum=0.9",
           "--config.optim.backbone.lr=0.001", "--config.checkpoint.every=100")
    runs = reference[0].parent
    launch(runs / "sgd_one", *sgd, config=CONFIG)
    eight = launch(runs / "sgd_eight", *sgd, config=CONFIG, devices=8)
    assert "on 8 cpu device(s)" in eight.output
    one, many = read_state(runs / "sgd_one", TOTAL), read_state(runs / "sgd_eight", TOTAL)
    for collection, tolerance in [("params", dict(rtol=RTOL, atol=ATOL)),
                                  ("opt_state", dict(rtol=MOMENTUM_RTOL, atol=0, relative_to_max=True))]:
        used, where = tolerance_used(many[collection], one[collection], **tolerance)
        print(f"LP-FT, 8 vs 1 device(s), {collection}: {used:.3g} of the tolerance at {where}")
        assert used <= 1, f"{collection}{where} differs by {used:.3g} times the tolerance"
