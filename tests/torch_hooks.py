"""Layer-by-layer comparison of an xfer model with a torch model, shared by the equivalence tests.

xfer's module paths mirror torch's module names ('.' for '/'), so one torch name picks the
module's output on both sides: torch's through a forward hook, Flax's from
`capture_intermediates=True`.
"""

import functools

import numpy as np
import torch
from flax import traverse_util

# max |flax - torch| <= RTOL * max |torch|, per compared tensor.
RTOL = 1e-4


def torch_outputs(model: torch.nn.Module, images_nchw: np.ndarray, names) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The outputs of `model`'s submodules `names` (4-D ones as NHWC) on one no-grad forward, and its output."""
    captured = {}

    def keep(name):
        def hook(_module, _inputs, output):
            # Copied at once: torchvision's in-place ReLU overwrites conv and BatchNorm outputs.
            output = output.numpy().copy()
            captured[name] = output.transpose(0, 2, 3, 1) if output.ndim == 4 else output
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(images_nchw))).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return captured, logits


def flax_output(intermediates: dict, name: str):
    """What Flax captured as the output of the module torch calls `name`."""
    return functools.reduce(dict.__getitem__, name.split("."), intermediates)["__call__"][0]


def assert_close(ours, theirs: np.ndarray, where: str) -> float:
    """Checks shapes and max |ours - theirs| <= RTOL * max |theirs|; returns that ratio."""
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{where}: shape {ours.shape} vs torch {theirs.shape}"
    relative = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert relative <= RTOL, f"{where}: max abs diff is {relative:.3g} of the torch scale"
    return relative


def assert_layers_close(intermediates: dict, expected: dict[str, np.ndarray], where: str) -> float:
    """Every module in `expected` (torch's outputs by name) against Flax's; returns the worst ratio."""
    return max(assert_close(flax_output(intermediates, name), theirs, f"{where} {name}")
               for name, theirs in expected.items())


def assert_running_stats_close(batch_stats: dict, torch_state: dict, where: str) -> tuple[float, int]:
    """Every Flax BatchNorm statistic (`mean`, `var`) against torch's `running_mean`/`running_var`
    after the same training forward, and every torch statistic compared; (worst relative error, count)."""
    worst, compared = 0.0, 0
    for path, ours in traverse_util.flatten_dict(batch_stats, sep=".").items():
        module, stat = path.rsplit(".", 1)
        torch_key = f"{module}.running_{stat}"
        worst = max(worst, assert_close(ours, torch_state[torch_key], f"{where} {torch_key}"))
        compared += 1
    assert compared == sum(k.endswith((".running_mean", ".running_var")) for k in torch_state)
    return worst, compared
