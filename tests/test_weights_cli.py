"""`python -m xfer.weights` as a user runs it: in a subprocess, judged by output and exit code.

The files are torchvision's own models at random init, so converting them
exercises the real VGG map end to end; the values that come out are checked
against torch's by index, independently of the conversion code.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "xfer.weights", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vgg11(tmp_path_factory):
    """(file, a few of its tensors) for a randomly initialised torchvision vgg11."""
    state = torchvision.models.vgg11().state_dict()
    path = tmp_path_factory.mktemp("vgg11") / "vgg11_random.pth"
    torch.save(state, path)
    keep = ("features.0.weight", "features.18.bias", "classifier.0.weight", "classifier.3.bias",
            "classifier.6.weight")
    return path, {k: state[k].numpy().copy() for k in keep}


# --- inspect ----------------------------------------------------------------

def test_inspect(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(model.state_dict(), tmp_path / "small.pth")
    result = run_cli("inspect", tmp_path / "small.pth")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["key", "shape", "dtype"]
    assert ["0.weight", "(4,3,3,3)", "float32"] in rows
    assert ["1.num_batches_tracked", "()", "int64"] in rows
    state = model.state_dict()
    values = sum(t.numel() for t in state.values())
    size = sum(t.numel() * t.element_size() for t in state.values())
    assert result.stdout.splitlines()[-1].startswith(f"{len(state)} tensors, {values} parameters, {size} bytes")


# --- convert ----------------------------------------------------------------

def reload(out: Path, file_format: str) -> dict:
    if file_format == "safetensors":
        from safetensors.numpy import load_file
        return load_file(out / "variables.safetensors")
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as checkpointer:
        return traverse_util.flatten_dict(checkpointer.restore(out), sep="/")


@pytest.mark.parametrize("file_format, num_classes", [("safetensors", 10), ("orbax", 1000)])
def test_convert(tmp_path, vgg11, file_format, num_classes):
    path, torch_tensors = vgg11
    out = tmp_path / "ported"
    result = run_cli("convert", path, "--model", "vgg11", "--num-classes", num_classes,
                     "--out", out, "--format", file_format)
    assert result.returncode == 0, result.stderr
    assert "classifier.0.weight" in result.stdout and f"wrote {out}" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["ported"]  # no staging directory left

    ported = reload(out, file_format)
    conv, fc0 = torch_tensors["features.0.weight"], torch_tensors["classifier.0.weight"]
    kernel = ported["params/features/0/kernel"]
    assert kernel.shape == (3, 3, 3, 64)
    np.testing.assert_array_equal(kernel[1, 2, 0, 5], conv[5, 0, 1, 2])  # OIHW -> HWIO
    np.testing.assert_array_equal(ported["params/features/18/bias"], torch_tensors["features.18.bias"])
    np.testing.assert_array_equal(ported["params/classifier/3/bias"], torch_tensors["classifier.3.bias"])
    for h, w, c in [(0, 0, 0), (3, 5, 17), (6, 6, 511)]:  # torch flattens (C, H, W), we (H, W, C)
        np.testing.assert_array_equal(ported["params/classifier/0/kernel"][(h * 7 + w) * 512 + c],
                                      fc0[:, c * 49 + h * 7 + w])
    head = ported["params/classifier/6/kernel"]
    assert head.shape == (4096, num_classes)
    if num_classes == 1000:
        np.testing.assert_array_equal(head, torch_tensors["classifier.6.weight"].T)
    else:
        assert "params/classifier/6/kernel  freshly initialised (new head)" in result.stdout
        assert 0 < head.std() < 0.1  # torchvision's normal(0, 0.01) init, not zeros


def test_convert_wrong_architecture_names_the_keys(tmp_path):
    torch.save(torchvision.models.vgg11_bn().state_dict(), tmp_path / "vgg11_bn.pth")
    out = tmp_path / "ported"
    error = assert_one_line_error(run_cli("convert", tmp_path / "vgg11_bn.pth", "--model", "vgg11", "--out", out))
    assert error.startswith("error: checkpoint does not fit vgg11")
    assert "missing features.3.weight" in error and "BatchNorm" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vgg11_bn.pth"]  # nothing written


def test_convert_missing_file(tmp_path):
    error = assert_one_line_error(
        run_cli("convert", tmp_path / "nope.pth", "--model", "vgg11", "--out", tmp_path / "ported"))
    assert str(tmp_path / "nope.pth") in error
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_to_overwrite(tmp_path, vgg11):
    out = tmp_path / "ported"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    error = assert_one_line_error(run_cli("convert", vgg11[0], "--model", "vgg11", "--out", out))
    assert f"--out {out} already exists" in error
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["ported"]


# --- check ------------------------------------------------------------------

def test_check_classifies_the_photos():
    result = run_cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chelsea: OK" in result.stdout and "coffee: OK" in result.stdout
    assert "espresso" in result.stdout


# --- interrupted converts ----------------------------------------------------

# `python -c SIGNALLING_CONVERT SIGNUM ARGS...`: `python -m xfer.weights ARGS...`, which signals itself as soon
# as Orbax has started writing into the staging folder (its writer thread still running).
SIGNALLING_CONVERT = """
import os, runpy, sys
import orbax.checkpoint as ocp

signum = int(sys.argv.pop(1))
save = ocp.StandardCheckpointer.save

def save_then_signal(self, *args, **kwargs):
    saved = save(self, *args, **kwargs)
    os.kill(os.getpid(), signum)
    return saved

ocp.StandardCheckpointer.save = save_then_signal
sys.argv[0] = "xfer.weights"
runpy.run_module("xfer.weights", run_name="__main__", alter_sys=True)
"""


def convert_signalled(signum: int, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", SIGNALLING_CONVERT, str(int(signum)), "convert", "imagenet",
                           "--model", "efficientnet_lite0", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("signum, name, exit_code", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)])
def test_an_interrupted_convert_removes_its_staging_folder(tmp_path, signum, name, exit_code):
    result = convert_signalled(signum, tmp_path / "ported")
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"{name}: stopped; nothing was written"
    assert list(tmp_path.iterdir()) == []  # neither --out nor its staging folder


def test_a_later_convert_removes_staging_folders_that_sigkill_left(tmp_path):
    killed = convert_signalled(signal.SIGKILL, tmp_path / "ported")
    assert killed.returncode == -signal.SIGKILL
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".ported.pid") and left.name.endswith(".partial")
    # Staging folders a convert must not touch: a running one's (this process), another machine's.
    running = tmp_path / f".other.pid{os.getpid()}-{left.name.split('-', 1)[1]}"
    elsewhere = tmp_path / ".other.pid1-another_host.abc123.partial"
    for folder in (running, elsewhere):
        folder.mkdir()

    result = run_cli("convert", "imagenet", "--model", "efficientnet_lite0", "--out", tmp_path / "ported")
    assert result.returncode == 0, result.stderr
    assert f"removed {left}, the staging folder of an interrupted convert" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ported", running.name, elsewhere.name])
