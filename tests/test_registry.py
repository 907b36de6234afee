"""One registration per model: a model registered once is known to every part of xfer.

A toy conv net defined here, with its torch weight map and one `register` call
(what a new model's module adds at its bottom), trains through `train.run` with
a freeze preset and the feature cache from its registered ImageNet file, and
converts from the command line, with no edit anywhere else. Expected values are
written out per tensor here, independently of the map.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import quickstart
from xfer import models
from xfer import weights
from xfer.models.layers import batch_norm
from xfer.training import checkpoint, train
from xfer.weights import __main__ as weights_cli
from xfer.weights import convert, sources

NAME = "toy_convnet"
HEAD = "^fc/"
CHECKPOINT_CLASSES = 5  # digits has 10: the run and a 10-class convert get a new head


class ToyConvNet(nn.Module):
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="stem")(x)
        x = nn.relu(batch_norm(x, train, name="bn", momentum=0.9, epsilon=1e-5))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv")(x))
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def toy_weight_map() -> convert.WeightMap:
    return convert.WeightMap(convert.flatten([convert.conv("stem", "stem"), convert.batchnorm("bn", "bn"),
                                              convert.conv("conv", "conv"), convert.dense("fc", "fc")]),
                             head=HEAD)


TOY = models.ModelInfo(NAME, ToyConvNet, 16, models.IMAGENET_MEAN, models.IMAGENET_STD, head=HEAD,
                       blocks=("^(?:stem|bn)/", "^conv/"), weight_map=toy_weight_map,
                       imagenet=models.TorchvisionFile("toy_convnet-0123abcd.pth"))

# torch key -> (torch shape, Flax variable, torch -> Flax)
TENSORS = {
    "stem.weight": ((4, 3, 3, 3), "params/stem/kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "stem.bias": ((4,), "params/stem/bias", lambda b: b),
    "bn.weight": ((4,), "params/bn/scale", lambda w: w),
    "bn.bias": ((4,), "params/bn/bias", lambda b: b),
    "bn.running_mean": ((4,), "batch_stats/bn/mean", lambda m: m),
    "bn.running_var": ((4,), "batch_stats/bn/var", lambda v: v),
    "conv.weight": ((8, 4, 3, 3), "params/conv/kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "conv.bias": ((8,), "params/conv/bias", lambda b: b),
    "fc.weight": ((CHECKPOINT_CLASSES, 8), "params/fc/kernel", lambda w: w.T),
    "fc.bias": ((CHECKPOINT_CLASSES,), "params/fc/bias", lambda b: b),
}


def torch_state_dict() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {key: (rng.uniform(0.5, 2.0, shape) if key.endswith("running_var") else rng.normal(size=shape))
            .astype(np.float32) for key, (shape, _, _) in TENSORS.items()}


@pytest.fixture
def toy():
    models.register(TOY)  # the one line the toy's module would end with
    try:
        yield TOY
    finally:
        del models.MODELS[NAME]  # other tests see the registry as shipped


def test_a_name_registers_once():
    vgg16 = models.info("vgg16")
    with pytest.raises(ValueError, match="model 'vgg16' is registered twice; give the new one another name"):
        models.register(dataclasses.replace(vgg16, blocks=()))
    assert models.info("vgg16") is vgg16


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"^unknown model 'alexnet'; choose one of: .*resnet18.*vit_b_16$"):
        models.info("alexnet")


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_weight_maps_keep_the_registered_head(name):
    """A port keeps a head of another class count fresh by the very regex the presets train."""
    assert weights.weight_map(name).head == models.info(name).head


def test_a_new_model_trains_with_a_preset_and_the_feature_cache(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # its "imagenet" file, in the hub cache
    torch = pytest.importorskip("torch")
    state_dict = torch_state_dict()
    sources.hub_checkpoint_dir().mkdir(parents=True)
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()},
               sources.hub_checkpoint_dir() / toy.imagenet.file_name)
    config = quickstart.get_config()
    config.model.name = NAME
    config.init = "imagenet"
    config.data.image_size = 16
    with config.ignore_type():  # quickstart's partition is (regex, group) rules
        config.partition = "linear_probe"
    config.feature_cache = "auto"
    config.batch_size = 32
    config.total_steps = config.eval_every = config.checkpoint.every = 4
    config.log_every = 2

    summary = train.run(config, tmp_path / "run")

    assert summary["model"] == NAME and summary["steps"] == 4
    assert summary["trainable_parameters"] == 8 * 10 + 10  # the new 10-way head alone
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "feature_cache").iterdir()) == ["eval", "train"]
    trained = checkpoint.read_variables(tmp_path / "run" / "checkpoints")
    for key, (_, target, to_flax) in TENSORS.items():
        if not key.startswith("fc."):  # frozen: still the registered ImageNet file's values
            collection, *path = target.split("/")
            value = trained[collection]
            for part in path:
                value = value[part]
            np.testing.assert_array_equal(value, to_flax(state_dict[key]), err_msg=key)
    assert trained["params"]["fc"]["kernel"].shape == (8, 10)


@pytest.mark.parametrize("num_classes", [CHECKPOINT_CLASSES, 10])
def test_a_new_model_converts_from_the_command_line(toy, tmp_path, num_classes):
    state_dict = torch_state_dict()
    save_file(state_dict, str(tmp_path / "toy.safetensors"))
    out = tmp_path / "ported"

    assert weights_cli.main(["convert", str(tmp_path / "toy.safetensors"), "--model", NAME, "--out", str(out),
                             "--num-classes", str(num_classes), "--format", "safetensors"]) == 0

    written = load_file(str(out / weights_cli.SAFETENSORS_FILE))
    assert set(written) == {target for _, target, _ in TENSORS.values()}
    for key, (_, target, to_flax) in TENSORS.items():
        if key.startswith("fc.") and num_classes != CHECKPOINT_CLASSES:
            assert written[target].shape[-1] == num_classes  # a new head, freshly initialised
        else:
            np.testing.assert_array_equal(written[target], to_flax(state_dict[key]), err_msg=key)
