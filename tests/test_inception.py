"""The ported torchvision Inception v3 computes what torch computes, block by block, in eval and train
mode, with and without its auxiliary classifier; its auxiliary loss is the tutorial's; its config builds.

A random-init `torchvision.models.Inception3` (torchvision's own init, then random BatchNorm
running statistics and affines, so no BatchNorm is near the identity) proves the port: every weight
travels through the same map as the ImageNet file. eps 1e-5 instead of 1e-3, average pools that
leave the padding out of the count, or a missing `transform_input` would load the same file without
complaint; only these activation comparisons catch them (each was tried, at 75 px: padding left
out of the count is off by 0.10 of Mixed_5b's scale, eps 1e-5 by 7.5e-4 at the first conv, no
input transform by 0.87 there).

Measured (torch 2.14, jaxlib CPU; the tests print them): the worst relative difference (max |flax -
torch| / max |torch|, per tensor) over the stem convs, every Mixed block and the logits in eval
mode (float32) is 3.8e-6 over runs (2.5-3.6e-6 at 75 px, 3.6-3.7e-6 at 107 px, 2.7-3.8e-6 at
89 px without transform_input; XLA's summation order follows the threads it gets):
torch_hooks.RTOL = 1e-4 leaves a ~26x margin. Train mode (batch statistics) runs
in float64, as ResNet-50's and EfficientNet-B0's do: at 299 px with the auxiliary classifier every
block, the aux logits and the logits agree to 4.9e-13, and the 192 running statistics (float32
variables) to 5.9e-8; at 91 px without it the outputs to 6.5e-9 (Mixed_7's maps are 1x1 there, so
BatchNorm normalises 2 values a channel) and its 188 statistics to 5.9e-8.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
import torch
import torchvision
from flax import traverse_util

from configs import inception_cifar
from xfer import models
from xfer.learning import loss as loss_lib, optim, partition, plan as freeze_plan, presets
from xfer.learning.loss import Loss
from xfer.models import inception
from xfer.training import feature_cache, mesh as mesh_lib, step as step_lib, train
from xfer.weights import convert, weight_map

import torch_hooks
import torchvision_port

NAME = "inception_v3"
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
COMPARED = STEM + list(inception.MIXED)  # as torch names them; AuxLogits too where it runs


def _shapes(flax_model, size: int = inception.AUX_MIN_SIZE):
    return jax.eval_shape(flax_model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


@functools.lru_cache(maxsize=None)
def _torch_and_variables():
    """(torch Inception3 in eval mode, with its auxiliary classifier and transform_input, as
    torchvision's builder makes it for the ImageNet weights; the ported Flax variables)."""
    torch.manual_seed(0)
    torch_model = torchvision.models.Inception3(aux_logits=True, transform_input=True, init_weights=True).eval()
    with torch.no_grad():
        for module in torch_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    variables, report = convert.port(torchvision_port.state_dict(torch_model), weight_map(NAME),
                                     _shapes(models.build(NAME, aux_logits=True)), NAME)
    assert report.new_head == ()
    return torch_model, variables


def _without_aux(torch_model, variables):
    """torchvision's builder with aux_logits=False after loading the ImageNet file: `AuxLogits` deleted.
    Here the same file ports straight into the model built without it, its AuxLogits tensors skipped."""
    torch_model = copy.deepcopy(torch_model)
    state_dict = torchvision_port.state_dict(torch_model)
    torch_model.aux_logits, torch_model.AuxLogits = False, None
    variables, report = convert.port(state_dict, weight_map(NAME), _shapes(models.build(NAME, aux_logits=False), 75),
                                     NAME)
    assert set(report.skipped) == {key for key in state_dict
                                   if key.startswith("AuxLogits.") and not key.endswith("num_batches_tracked")}
    assert len(report.skipped) == 12 and report.new_head == ()
    return torch_model, variables


def _torch_forward(torch_model, images_nchw: np.ndarray, names) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """(outputs of the named submodules, NHWC; logits; aux logits or None) of one no-grad forward.
    torch_hooks.torch_outputs reads a single tensor, and a training Inception returns InceptionOutputs."""
    captured = {}

    def keep(name):
        def hook(_module, _inputs, output):
            output = output.numpy().copy()  # torchvision's in-place ReLU overwrites what it returned
            captured[name] = output.transpose(0, 2, 3, 1) if output.ndim == 4 else output
        return hook

    hooks = [torch_model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        with torch.no_grad():
            out = torch_model(torch.from_numpy(np.ascontiguousarray(images_nchw)))
    finally:
        for hook in hooks:
            hook.remove()
    if isinstance(out, torchvision.models.InceptionOutputs):
        return captured, out.logits.numpy(), out.aux_logits.numpy()
    return captured, out.numpy(), None


def _check_forward(images_nchw: np.ndarray, train_mode: bool, aux_logits: bool = True,
                   transform_input: bool = True):
    """Every compared module, the logits and (in training with aux) the aux logits match torch;
    returns Flax's batch statistics after the forward (train), torch's state dict after it, and the
    worst relative difference. Float64 images run both sides in float64. In train mode torch's
    dropout stays in eval mode and Flax's rate is 0: only BatchNorm's batch statistics are compared."""
    torch_model, variables = _torch_and_variables()
    if not aux_logits:
        torch_model, variables = _without_aux(torch_model, variables)
    float64 = images_nchw.dtype == np.float64
    torch_model = copy.deepcopy(torch_model).train(train_mode).to(torch.float64 if float64 else torch.float32)
    torch_model.dropout.eval()
    torch_model.transform_input = transform_input
    flax_model = models.build(NAME, aux_logits=aux_logits, transform_input=transform_input,
                              dropout_rate=0.0 if train_mode else 0.5)
    names = COMPARED + (["AuxLogits"] if train_mode and aux_logits else [])
    expected, expected_logits, expected_aux = _torch_forward(torch_model, images_nchw, names)
    with jax.enable_x64(float64):  # Flax promotes the float32 weights to the images' dtype
        outputs, state = jax.jit(lambda v, x: flax_model.apply(
            v, x, train=train_mode, capture_intermediates=True,
            mutable=["intermediates", "batch_stats"] if train_mode else ["intermediates"]))(
            variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))
    where = (f"{NAME}@{images_nchw.shape[-1]}px {'train' if train_mode else 'eval'} {images_nchw.dtype} "
             f"aux={aux_logits} transform_input={transform_input}")
    assert isinstance(outputs, tuple) == (expected_aux is not None), where  # InceptionOutputs only then
    logits = outputs[0] if isinstance(outputs, tuple) else outputs
    worst = max(torch_hooks.assert_layers_close(state["intermediates"], expected, where),
                torch_hooks.assert_close(logits, expected_logits, f"{where} logits"))
    if expected_aux is not None:
        worst = max(worst, torch_hooks.assert_close(outputs[1], expected_aux, f"{where} aux logits"))
    return state.get("batch_stats"), torchvision_port.state_dict(torch_model), worst


@pytest.mark.parametrize("size, aux_logits, transform_input", [
    (75, True, True),  # torchvision's minimum; aux-on variables evaluate below 299, the branch unused
    (107, False, True),  # odd sizes at every stride-2 layer and pool
    (89, True, False),  # torchvision's Inception3 default (no input transform)
])
def test_every_block_and_logits_match_torchvision_in_eval_mode(size, aux_logits, transform_input):
    images = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    _, _, worst = _check_forward(images, False, aux_logits, transform_input)
    print(f"{NAME}@{size} eval aux={aux_logits} transform_input={transform_input}: max relative diff {worst:.2e}")


@pytest.mark.parametrize("size, aux_logits", [(inception.AUX_MIN_SIZE, True), (91, False)])
def test_train_mode_outputs_aux_logits_and_every_running_statistic_match_torchvision(size, aux_logits):
    """One training forward in float64: every block, InceptionOutputs(logits, aux_logits) (logits alone
    without aux), and torch's running-stat update (momentum 0.1, unbiased variance) in every BatchNorm."""
    images = np.random.default_rng(1).standard_normal((2, 3, size, size))
    stats, torch_state, worst = _check_forward(images, True, aux_logits)
    stats_worst, compared = torch_hooks.assert_running_stats_close(stats, torch_state, NAME)
    worst = max(worst, stats_worst)
    assert compared == 2 * (94 + 2 * aux_logits)  # 94 BasicConv2d in the trunk, 2 in AuxLogits
    print(f"{NAME}@{size} train aux={aux_logits}: max relative diff {worst:.2e} over outputs and "
          f"{compared} running statistics")


def test_too_small_inputs_are_one_line_errors_at_torchvisions_limits():
    """torchvision fails below 75 px (Mixed_7a) and, training with aux, below 299 px (AuxLogits' conv1);
    the model says so by name instead."""
    torch_model, variables = _torch_and_variables()
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        copy.deepcopy(torch_model).train()(torch.zeros(2, 3, 298, 298))
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        torch_model(torch.zeros(1, 3, 74, 74))
    model = models.build(NAME, aux_logits=True)
    with pytest.raises(ValueError, match=r"^inception_v3 with its auxiliary classifier needs images of at least "
                                         r"299x299 px, got 299x298; .*\(config.model.aux_logits=False; then 75 "
                                         r"px suffice\)"):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 299, 298, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"^inception_v3 needs images of at least 75x75 px, got 74x74; use images"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 74, 74, 3))), variables)
    no_aux = models.build(NAME, aux_logits=False)
    assert "AuxLogits" not in _shapes(no_aux, 75)["params"]  # 75 px suffice without it


def test_map_covers_every_torch_tensor_and_every_flax_variable():
    torch_model, _ = _torch_and_variables()
    state_dict = torchvision_port.state_dict(torch_model)
    shapes = _shapes(models.build(NAME, aux_logits=True))
    _, report = convert.port(state_dict, weight_map(NAME), shapes, NAME)
    assert len(report.rows) == sum(not k.endswith(".num_batches_tracked") for k in state_dict)
    assert len(report.rows) == len(traverse_util.flatten_dict(shapes))
    torchvision_port.assert_paths_mirror_torch_keys(report)
    params = traverse_util.flatten_dict(shapes["params"])
    assert sum(int(np.prod(v.shape)) for v in params.values()) == 27_161_264  # torchvision's meta num_params


def test_both_heads_are_new_for_another_class_count():
    torch_model, _ = _torch_and_variables()
    fresh = _shapes(models.build(NAME, num_classes=10, aux_logits=True))
    variables, report = convert.port(torchvision_port.state_dict(torch_model), weight_map(NAME), fresh, NAME)
    assert set(report.new_head) == {f"params/{head}/{leaf}" for head in ("fc", "AuxLogits/fc")
                                    for leaf in ("kernel", "bias")}
    assert variables["params"]["AuxLogits"]["fc"]["kernel"] is fresh["params"]["AuxLogits"]["fc"]["kernel"]


def test_initialisation_is_torchvisions():
    """trunc_normal_(std 0.1) for every conv and linear weight but AuxLogits.fc's (0.001), nn.Linear's
    default bias, BatchNorm at identity, dropout 0.5; torchvision's `stddev` 0.01 on AuxLogits.conv1
    sits on the BasicConv2d, which its init loop does not read (its conv gets 0.1). Checked on the
    auxiliary classifier, which holds every kind of layer (a jitted init of the whole network
    compiles for ~25 s on 2 cores)."""
    torch_model, _ = _torch_and_variables()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.manual_seed(1)
        fresh_torch = torchvision.models.Inception3(init_weights=True)
    assert models.build(NAME).dropout_rate == torch_model.dropout.p
    params = jax.jit(lambda: inception.InceptionAux(1000).init(jax.random.key(0), jnp.zeros((1, 17, 17, 768))))()
    params = traverse_util.flatten_dict(params["params"], sep=".")
    for ours, theirs, std in [("conv0.conv.kernel", "AuxLogits.conv0.conv.weight", 0.1),
                              ("conv1.conv.kernel", "AuxLogits.conv1.conv.weight", 0.1),
                              ("fc.kernel", "AuxLogits.fc.weight", 0.001), (None, "fc.weight", 0.1)]:
        if ours:  # 98k to 2.4M draws: the sample std is within 0.5% of the true one
            assert np.std(params[ours]) == pytest.approx(std, rel=0.01), ours
        assert np.std(fresh_torch.get_parameter(theirs).detach().numpy()) == pytest.approx(std, rel=0.01), theirs
    assert 0.95 / np.sqrt(768) < np.abs(params["fc.bias"]).max() <= 1 / np.sqrt(768)
    assert np.all(params["conv1.bn.scale"] == 1) and np.all(params["conv1.bn.bias"] == 0)


def test_presets_build():
    """As registered (no AuxLogits) and built with it: the auxiliary classifier's block sits between
    Mixed_6e and Mixed_7a and is empty without it, so `last_k:K` names the same blocks either way."""
    def trainable(params, setting):
        labels = partition.labels(params, presets.expand(presets.parse(setting), NAME, params))
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        return {partition.path_str(path) for (path, _), group in zip(leaves, jax.tree.leaves(labels))
                if group != partition.FROZEN}

    assert len(models.info(NAME).blocks) == 14
    registered = _shapes(models.build(NAME, num_classes=10), 75)["params"]
    paths = trainable(registered, "full")
    assert not any(p.startswith("AuxLogits/") for p in paths)
    assert trainable(registered, "linear_probe") == {"fc/kernel", "fc/bias"}
    assert trainable(registered, "last_k:3") == {p for p in paths if re.match(r"fc/|Mixed_7", p)}
    assert trainable(registered, "last_k:4") == trainable(registered, "last_k:3")

    with_aux = _shapes(models.build(NAME, num_classes=10, aux_logits=True))["params"]
    paths = trainable(with_aux, "full")
    heads = {f"{head}/{leaf}" for head in ("fc", "AuxLogits/fc") for leaf in ("kernel", "bias")}
    assert trainable(with_aux, "linear_probe") == heads
    assert trainable(with_aux, "last_k:4") == {p for p in paths if re.match(r"fc/|Mixed_7|AuxLogits/", p)}
    assert trainable(with_aux, "last_k:3") == heads | {p for p in paths if p.startswith("Mixed_7")}


# --- the auxiliary loss: total = CE(logits) + w CE(aux_logits) ----------------------------------------

MESH = mesh_lib.data_mesh()
CLASSES = 3


class _TwoHeads(nn.Module):
    """flatten -> Dense `body` -> ReLU -> Dense `fc`; in training also Dense `aux` on the body, returned
    as (logits, aux_logits) as Inception3 returns them."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = nn.relu(nn.Dense(6, name="body")(x.reshape(x.shape[0], -1)))
        logits = nn.Dense(CLASSES, name="fc")(hidden)
        return (logits, nn.Dense(CLASSES, name="aux")(hidden)) if train else logits


def _step_parts(loss: Loss, options=step_lib.StepOptions()):
    model = _TwoHeads()
    variables = jax.device_get(jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)),
                                                          train=True))())
    plan = freeze_plan.build(((".*", "all"),), (), {"all": optim.group_config(optimizer="sgd", lr=0.5)},
                             "two_heads", variables)
    tx = plan.optimizer(10)
    state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0, options=options), MESH)
    return model, variables, state, step_lib.make_train_step(model, tx, plan, MESH, loss=loss, options=options)


def _batch(size: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {"image": rng.normal(size=(size, 4, 4, 3)).astype(np.float32),
            "label": rng.integers(0, CLASSES, size).astype(np.int32), "mask": np.ones(size, np.float32)}


def _by_hand(model, params, images, labels, weight: float, targets=None):
    logits, aux = model.apply({"params": params}, images, train=True)
    if targets is None:
        ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()  # noqa: E731
    else:
        ce = lambda z: optax.softmax_cross_entropy(z, targets).mean()  # noqa: E731
    return ce(logits) + weight * ce(aux)


def test_the_step_minimises_ce_plus_weighted_aux_ce_and_reports_the_main_logits_accuracy():
    weight = 0.4
    model, variables, state, train_step = _step_parts(Loss(CLASSES, aux_weight=weight))
    batch = _batch()
    new_state, metrics = train_step(state, mesh_lib.global_batch(batch, MESH))
    expected, grads = jax.value_and_grad(_by_hand, argnums=1)(model, variables["params"], batch["image"],
                                                               batch["label"], weight)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)
    # One SGD step of lr 0.5 on the hand gradient: the auxiliary head's share reaches the shared body.
    for path, g in traverse_util.flatten_dict(grads, sep="/").items():
        moved = traverse_util.flatten_dict(jax.device_get(new_state.params), sep="/")[path]
        np.testing.assert_allclose(moved, traverse_util.flatten_dict(variables["params"], sep="/")[path] - 0.5 * g,
                                   rtol=1e-5, atol=1e-6, err_msg=path)
    main = model.apply(variables, batch["image"])
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(np.argmax(main, -1) == batch["label"]))
    predictions = step_lib.make_eval_step(model, MESH)(new_state, mesh_lib.global_batch(batch, MESH))["prediction"]
    np.testing.assert_array_equal(predictions, np.argmax(model.apply({"params": new_state.params}, batch["image"]), -1))


def test_mixed_targets_reach_both_heads_and_micro_batches_combine():
    weight = 0.3
    loss = Loss(CLASSES, mixup_alpha=0.4, aux_weight=weight)
    model, variables, state, train_step = _step_parts(loss)
    batch = _batch()
    _, metrics = train_step(state, mesh_lib.global_batch(batch, MESH))
    # The step's draws: its key is fold_in(state key, step 0), the mixing stream folded into that.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), step_lib._MIX_STREAM)
    mixed, targets = loss.mix(key, jnp.asarray(batch["image"]), jnp.asarray(batch["label"]))
    expected = _by_hand(model, variables["params"], mixed, batch["label"], weight, targets)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)

    options = step_lib.StepOptions(grad_accum_steps=2)
    model, variables, state, train_step = _step_parts(Loss(CLASSES, aux_weight=weight), options)
    _, metrics = train_step(state, mesh_lib.global_batch(batch, MESH))
    halves = [_by_hand(model, variables["params"], batch["image"][i::2], batch["label"][i::2], weight) for i in (0, 1)]
    assert float(metrics["loss"]) == pytest.approx(float(np.mean(halves)), rel=1e-6)


def test_auxiliary_logits_without_a_weight_are_a_config_error():
    _, _, state, train_step = _step_parts(Loss(CLASSES))
    with pytest.raises(ValueError, match=r"the model returns auxiliary logits .* config.aux_loss_weight is 0 or "
                                         r"unset, .* set config.aux_loss_weight > 0 \(torchvision's recipe: 0.4\)"):
        train_step(state, mesh_lib.global_batch(_batch(), MESH))
    for value in (-0.1, float("nan"), "0.4", True):
        with pytest.raises(ValueError, match=re.escape(f"config.aux_loss_weight={value!r}; it must be a finite "
                                                       "number >= 0")):
            loss_lib.parse_aux_weight(value)


# --- configs/inception_cifar.py ----------------------------------------------------------------------

# The tutorial (PyTorch, model_name = "inception"), one value per line of it.
TUTORIAL = {
    "model.name": "inception_v3",  # models.inception_v3(pretrained=True): aux_logits on
    "model.aux_logits": True,
    "init": "imagenet",
    "data.image_size": 299,  # input_size = 299
    "data.interpolation": "bilinear",  # torchvision's transforms on PIL images
    "data.mean": None,  # Normalize(ImageNet's mean and std): the model's
    "data.std": None,
    "batch_size": 8,
    "num_epochs": 15,
    "partition": (("^(?:fc|AuxLogits/fc)/", "params_to_update"), (".*", "frozen")),  # feature_extract = True
    "bn_policy": ((".*", "train"),),  # model.train()
    "optim.params_to_update.optimizer": "sgd",  # optim.SGD(params_to_update, lr=0.001, momentum=0.9)
    "optim.params_to_update.lr": 1e-3,
    "optim.params_to_update.momentum": 0.9,
    "optim.params_to_update.weight_decay": 0.0,
    "optim.params_to_update.schedule": "constant",
    "aux_loss_weight": 0.4,  # loss = loss1 + 0.4*loss2
    "eval_every": 6250,  # every epoch, the best kept
    "checkpoint.keep_best": 1,
}


def _get(config, dotted: str):
    return functools.reduce(lambda node, key: node[key], dotted.split("."), config)


def test_the_config_is_the_tutorial():
    config = inception_cifar.get_config()
    assert {key: _get(config, key) for key in TUTORIAL} == TUTORIAL
    assert inception_cifar.get_config("mode=finetune").partition == ((".*", "params_to_update"),)
    with pytest.raises(ValueError, match=re.escape("mode='probe'; choose one of feature_extract, finetune")):
        inception_cifar.get_config("mode=probe")


@pytest.fixture(scope="module")
def mock_cifar():
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize("arg, trainable", [("", 2048 * 10 + 10 + 768 * 10 + 10),
                                            ("mode=finetune", 27_161_264 - 2049 * 1000 - 769 * 1000 + 28_180)])
def test_the_config_sets_up_without_weights_or_data(mock_cifar, arg, trainable):
    """Everything but the weights and CIFAR-10 itself (mock images): model, plan, loss, no cache."""
    run = train.setup(inception_cifar.get_config(arg))
    assert run.trainable_parameters == trainable
    assert run.cuts == (None,) and run.loss.aux_weight == 0.4
    assert (run.data.image_size, run.data.augment, run.data.num_classes) == (299, "crop_flip", 10)
    config = inception_cifar.get_config(arg)
    config.data.image_size = 224
    with pytest.raises(ValueError, match="needs images of at least 299x299 px, got 224x224"):
        train.setup(config)


def test_the_feature_cache_cuts_before_what_the_auxiliary_classifier_reads():
    """AuxLogits runs only in training, on Mixed_6e's output: a cache cut later would feed it what the
    skipped prefix left behind, so 'auto' stops at Mixed_6e and a later cut is refused, naming it."""
    model = models.build(NAME, num_classes=10, aux_logits=True)
    shapes = _shapes(model)
    rules = (("^(?:fc|AuxLogits/fc)/", "head"), (".*", "frozen"))
    plan = freeze_plan.build(rules, (), {"head": optim.group_config(optimizer="sgd", lr=0.1)}, NAME, shapes)
    size = inception.AUX_MIN_SIZE
    assert feature_cache.check_cut("auto", model, shapes, size, plan) == "Mixed_6e"
    with pytest.raises(feature_cache.FeatureCacheError,
                       match="Mixed_7c' is not a frozen prefix: AuxLogits runs only in training and reads"):
        feature_cache.check_cut("Mixed_7c", model, shapes, size, plan)
    without_aux = models.build(NAME, num_classes=10)  # as registered
    shapes = _shapes(without_aux, 75)
    plan = freeze_plan.build((("^fc/", "head"), (".*", "frozen")), (),
                             {"head": optim.group_config(optimizer="sgd", lr=0.1)}, NAME, shapes)
    assert feature_cache.check_cut("auto", without_aux, shapes, 75, plan) == "Mixed_7c"
