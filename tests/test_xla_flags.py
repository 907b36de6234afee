"""launch.py's XLA flags per model family: only on jaxlib releases that know them, never over the user's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xfer import models
from xfer.training import xla_flags

REPO = Path(__file__).resolve().parents[1]
EIGEN = "--xla_cpu_experimental_ynn_fusion_type="


def test_vgg_and_resnet_ask_for_eigen_convolutions_lite0_for_nothing():
    assert models.info("vgg16").cpu_xla_flags == models.info("resnet50").cpu_xla_flags == (EIGEN,)
    assert models.info("efficientnet_lite0").cpu_xla_flags == ()


def test_flags_are_chosen_only_on_verified_jaxlib_releases_and_never_over_the_users():
    assert xla_flags.choose((EIGEN,), {}, "0.10.2") == EIGEN
    assert xla_flags.choose((EIGEN,), {}, "0.11.0") is None  # XLA would abort on a flag it lacks
    assert xla_flags.choose((EIGEN,), {"XLA_FLAGS": ""}, "0.10.2") is None  # the user's, even empty
    assert xla_flags.choose((), {}, "0.10.2") is None
    environ = {}
    xla_flags.apply((EIGEN,), environ)
    assert environ == ({"XLA_FLAGS": EIGEN} if xla_flags.choose((EIGEN,), {}) else {})


def test_launch_logs_its_choice_and_the_backend_starts_with_it(tmp_path):
    """A quickstart run on the VGG11 family: its log names the flag, and XLA (which aborts on an
    unknown flag) accepted it."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "launch.py", "--config=configs/quickstart.py", "--config.init=scratch",
                             "--config.model.name=vgg11", "--config.data.image_size=32", "--config.batch_size=16",
                             "--config.total_steps=1", "--config.feature_cache=",
                             "--config.partition=((\".*\", \"head\"),)", f"--workdir={tmp_path / 'run'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = (f"XLA flags for this model: {EIGEN}" if xla_flags.choose((EIGEN,), {})
                else "XLA flags: none;")
    assert expected in result.stderr
