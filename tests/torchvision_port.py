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
