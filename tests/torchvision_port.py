"""Random-init torchvision models and their xfer ports, shared by the per-layer equivalence tests.

Random weights are enough to prove a port: every weight travels through the same
map as the ImageNet files. Running statistics are randomised too, so BatchNorm's
eval-mode affine is not the identity and every element of every tensor counts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

from xfer import models
from xfer.weights import convert, weight_map


def state_dict(torch_model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def variable_shapes(flax_model):
    """What `init` would return, as shapes only: all `convert.port` needs, and free to compute."""
    return jax.eval_shape(flax_model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def assert_paths_mirror_torch_keys(report: convert.PortReport, direct: tuple[str, ...] = ()) -> None:
    """Each ported tensor's Flax path is its torch key with '/' for '.' (torch's leaf names aside:
    `weight` is `kernel` or `scale`); a parameter held directly by a module (ConvNeXt's `layer_scale`,
    named in `direct`) keeps its name too."""
    for source, _, target, _, _ in report.rows:
        if source.rsplit(".", 1)[1] in direct:
            assert source.replace(".", "/") == target.split("/", 1)[1]
        else:
            assert source.rsplit(".", 1)[0] == target.split("/", 1)[1].rsplit("/", 1)[0].replace("/", ".")


@functools.lru_cache(maxsize=None)
def torch_and_flax(name: str):
    """(torch model in eval mode, xfer model, ported variables); shared, so copy the torch model
    before anything that changes it (a training forward updates its running statistics)."""
    torch.manual_seed(0)
    torch_model = getattr(torchvision.models, name)().eval()
    for module in torch_model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    flax_model = models.build(name)
    variables, report = convert.port(state_dict(torch_model), weight_map(name), variable_shapes(flax_model), name)
    assert report.new_head == ()
    return torch_model, flax_model, variables
