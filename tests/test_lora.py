"""LoRA as a freeze preset (`lora:R`, xfer/models/lora.py) and `python -m xfer.weights merge`.

- Step 0 is the pretrained model exactly: a small ViT ported from a directory with and without
  adapters (attention projections), and a small CNN's conv adapters (1x1, 3x3 at stride 2,
  dilated), logits with adapters at init equal to those without, bit for bit.
- One real run on digits through `train.run` (a 2-layer ViT at 32 px, `linear_probe@0,lora:4@0.5`,
  ported from a directory as `config.init=DIR`): phase 1 leaves the adapters as they started,
  phase 2 moves the adapters and the head and nothing else (every other parameter bitwise
  unchanged), the optimizer holds state for those alone, the group table counts them, and the
  train step differentiates no frozen kernel (no kernel-shaped gradient in its jaxpr).
- Merge: that run's checkpoint, merged through the CLI and loaded as `config.init=DIR` into the
  plain ViT, gives the adapted model's logits; the CNN's conv adapters fold the same way.
- Errors: bad presets, target regexes that name nothing, a grouped conv, the head or a layer that
  is no Dense/Conv; a model without default targets; merge of what holds no adapters.
"""

from __future__ import annotations

import functools
import json
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import lora as lora_config
from xfer import models
from xfer.experiments import sweep
from xfer.learning import phases, presets
from xfer.learning.partition import FROZEN, PartitionError
from xfer.models import lora
from xfer.training import checkpoint, train, wise_ft
from xfer.weights import __main__ as weights_cli
from xfer.weights.initialise import SAFETENSORS_FILE, initial_variables

RANK = 4
ADAPTERS = 2 * (RANK * (32 + 96) + RANK * (32 + 32))  # R * (in + out): in_proj, out_proj of 2 layers; 1,536
HEAD = 32 * 10 + 10
TINY_VIT = {"name": "vit_b_16", "image_size": 32, "patch_size": 16, "num_layers": 2, "num_heads": 2,
            "hidden_dim": 32, "mlp_dim": 64}
SIZE = 32
STEPS, BOUNDARY = 4, 2
# B = 0 adds exact zeros: op by op (eager) the logits are bitwise those without adapters. Jitted,
# XLA fuses the add of the zero branch with what follows (TinyCNN's 1x1 conv at stride 2 and the
# mean after it) and rounds differently: measured 1.6e-7 of the largest logit (the ViT: 0; Lite0's
# real weights at 32 px: 0). Measured on an AVX-512 EPYC; kept at 1e-5.
ZERO_INIT_JIT_RTOL = 1e-5
# Adapted vs merged logits, float32: the branch's (x A) B against x (W + s A B), as |difference| over
# the largest logit. Measured: the ViT after 4 Adam steps 4.1e-7, TinyCNN with random B 2.5e-7 (and,
# outside the suite, Lite0's real 60-step lora:8 run on digits 9.4e-7, every prediction the same).
# Kept at 1e-5: 10x the worst of them.
MERGE_RTOL = 1e-5


def key(seed: int) -> jax.Array:
    """A key of JAX's `rbg` generator: XLA:CPU compiles its draws in a fraction of threefry's time
    (a small model's init: 3.5 s against 8.7 s), and these tests need random numbers, not threefry's."""
    return jax.random.key(seed, impl="rbg")


def tiny_vit(num_classes: int = 10):
    return models.build(TINY_VIT["name"], num_classes, **{k: v for k, v in TINY_VIT.items() if k != "name"})


def images(n: int = 2, size: int = SIZE, seed: int = 0) -> jnp.ndarray:
    return jax.random.normal(key(seed), (n, size, size, 3))


def shape_of(size: int = SIZE) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def relative(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# --- the adapters -------------------------------------------------------------

def test_adapters_sit_beside_their_kernels_and_leave_every_other_parameter_as_it_was():
    base = tiny_vit()
    wrapped = lora.wrap(base, lora.Settings(RANK), "vit_b_16", shape_of())
    assert wrapped.targets == tuple(f"encoder/layers/encoder_layer_{i}/self_attention/{name}"
                                    for i in range(2) for name in ("in_proj", "out_proj"))
    plain = flat(jax.jit(base.init)(key(0), images(1))["params"])
    adapted = flat(jax.jit(wrapped.init)(key(0), images(1))["params"])
    added = sorted(set(adapted) - set(plain))
    assert added == sorted(f"{target}/{name}" for target in wrapped.targets for name in (lora.A, lora.B))
    # Same random numbers for the rest: the adapters are created after their layer's kernel.
    assert all(np.array_equal(plain[path], adapted[path]) for path in plain)
    for target in wrapped.targets:
        fan_in, fan_out = adapted[f"{target}/kernel"].shape
        assert adapted[f"{target}/{lora.A}"].shape == (fan_in, RANK)
        assert adapted[f"{target}/{lora.B}"].shape == (RANK, fan_out)
        assert not np.any(adapted[f"{target}/{lora.B}"])
        bound = np.max(np.abs(adapted[f"{target}/{lora.A}"]))
        assert 0.8 / np.sqrt(fan_in) < bound <= 1 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), as PEFT's A
    assert lora.adapter_count(adapted) == ADAPTERS


class TinyCNN(nn.Module):
    """Every kind of conv LoRA meets: 3x3 at stride 2 with SAME padding, 1x1, depthwise (never a
    target), dilated, 1x1 at stride 2; BatchNorm between; a Dense head. (Uniform inits: flax's
    default truncated normal takes XLA:CPU ~2 s to compile per shape.)"""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = functools.partial(nn.Conv, kernel_init=lora.a_init, bias_init=nn.initializers.uniform(0.1))
        x = nn.relu(conv(8, (3, 3), strides=2, padding="SAME", name="stem")(x))
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(conv(16, (1, 1), name="expand")(x))
        x = conv(16, (3, 3), padding=1, feature_group_count=16, name="dw")(x)
        x = conv(8, (3, 3), padding=2, kernel_dilation=2, use_bias=False, name="dilated")(x)
        x = conv(8, (1, 1), strides=2, name="project")(x)
        return nn.Dense(self.num_classes, kernel_init=lora.a_init, name="fc")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def tiny_cnn():
    """TinyCNN registered as `tiny_cnn` while this module's tests run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.MODELS, "tiny_cnn", models.ModelInfo(
            "tiny_cnn", TinyCNN, SIZE, (0.5,) * 3, (0.5,) * 3, head="^fc/",
            blocks=("^stem/", "^bn/", "^expand/", "^dw/", "^dilated/", "^project/")))
        yield TinyCNN()


def without_adapters(variables) -> dict:
    return traverse_util.unflatten_dict({path: value for path, value in flat(variables).items()
                                         if not lora.is_adapter(path)}, sep="/")


def test_conv_adapters_add_exact_zeros_at_init_and_fold_into_their_kernels(tiny_cnn):
    """Default targets: the ungrouped 1x1 convs. Targets by regex: a 3x3 conv at stride 2, a dilated
    one too (PEFT's Conv2d LoRA: A has the target's kernel size, strides, padding and dilation)."""
    assert lora.wrap(tiny_cnn, lora.Settings(RANK), "tiny_cnn", shape_of()).targets == ("expand", "project")
    wrapped = lora.wrap(tiny_cnn, lora.Settings(RANK, targets="stem|expand|dilated|project"), "tiny_cnn", shape_of())
    variables = jax.jit(wrapped.init)(key(0), images(1))
    shapes = {path: value.shape for path, value in flat(variables["params"]).items() if lora.is_adapter(path)}
    assert shapes["stem/lora_a"] == (3, 3, 3, RANK) and shapes["stem/lora_b"] == (1, 1, RANK, 8)
    assert shapes["dilated/lora_a"] == (3, 3, 16, RANK) and shapes["dilated/lora_b"] == (1, 1, RANK, 8)
    x = images(4)
    assert np.array_equal(wrapped.apply(variables, x), tiny_cnn.apply(without_adapters(variables), x))
    adapted_apply, plain_apply = jax.jit(wrapped.apply), jax.jit(tiny_cnn.apply)
    at_init = adapted_apply(variables, x)
    jitted = relative(at_init, plain_apply(without_adapters(variables), x))
    print(f"conv adapters at init vs none: op by op 0 (bitwise); jitted {jitted:.3g} relative")
    assert jitted < ZERO_INIT_JIT_RTOL
    # B drawn at the size trained adapters reach: the merged plain model computes the adapted one's logits.
    rng = np.random.default_rng(1)
    moved = traverse_util.unflatten_dict(
        {path: rng.uniform(-0.2, 0.2, value.shape).astype(np.float32) if path.endswith(lora.B) else value
         for path, value in flat(variables).items()}, sep="/")
    adapted = adapted_apply(moved, x)
    merged = plain_apply({**moved, "params": lora.merged(moved["params"], lora.Settings(RANK).scale)}, x)
    moved_by, error = relative(adapted, at_init), relative(merged, adapted)
    print(f"conv adapters: B moved the logits by {moved_by:.3g} (relative); merged vs adapted {error:.3g}")
    assert moved_by > 0.1 and error < MERGE_RTOL


def test_lite0_adapts_its_1x1_convolutions():
    wrapped = lora.wrap(models.build("efficientnet_lite0", 10), lora.Settings(RANK), "efficientnet_lite0", shape_of())
    assert all(re.fullmatch(r"_blocks/\d+/_(expand|project)_conv|_conv_head", path) for path in wrapped.targets)
    assert len(wrapped.targets) == 32  # 15 expand (block 0 has none), 16 project, the head conv


# --- one run on digits ----------------------------------------------------------

def run_config(partition: str, init: str) -> ml_collections.ConfigDict:
    config = lora_config.get_config(f"data=digits,res={SIZE}")
    config.model = ml_collections.ConfigDict(TINY_VIT)
    config.init = init
    config.partition = partition
    config.data.test_fraction = 0.05  # 90 test digits: a short eval
    config.batch_size = 8
    config.total_steps = STEPS
    config.eval_every = 100
    config.log_every = 1
    config.optim.head.update(lr=0.05, warmup_steps=0)
    config.optim.backbone.update(lr=0.05, warmup_steps=0)
    config.checkpoint = ml_collections.ConfigDict({"every": BOUNDARY, "keep_latest": 5, "keep_best": 1})
    return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A directory with the plain tiny ViT's variables (random: the 'pretrained' model), as
    `python -m xfer.weights convert --format safetensors` writes one."""
    from safetensors.numpy import save_file

    directory = tmp_path_factory.mktemp("pretrained")
    variables = flat(jax.jit(tiny_vit().init)(key(7), images(1)))
    # torchvision's ViT head starts at zero; a trained one does not (and logits of zero compare nothing).
    variables["params/heads/head/kernel"] = np.random.default_rng(7).normal(0, 0.5, (32, 10)).astype(np.float32)
    save_file({path: np.asarray(value) for path, value in variables.items()}, str(directory / SAFETENSORS_FILE))
    return directory


def test_step_zero_is_the_pretrained_model_exactly(pretrained):
    """Ported from a directory (as `config.init=DIR`) with and without adapters: the same variables
    and, with B = 0, the same logits bit for bit."""
    wrapped = lora.wrap(tiny_vit(), lora.Settings(RANK), "vit_b_16", shape_of())
    plain_variables = initial_variables(tiny_vit(), "vit_b_16", str(pretrained), SIZE, 0, False)
    adapted_variables = initial_variables(wrapped, "vit_b_16", str(pretrained), SIZE, 0, False)
    plain, adapted = flat(plain_variables), flat(adapted_variables)
    assert set(adapted) - set(plain) == {f"params/{target}/{name}" for target in wrapped.targets
                                         for name in (lora.A, lora.B)}
    assert all(np.array_equal(plain[path], adapted[path]) for path in plain)
    x = images(4)
    expected = tiny_vit().apply(plain_variables, x)
    assert np.array_equal(wrapped.apply(adapted_variables, x), expected) and float(jnp.std(expected)) > 0.1
    jitted = relative(jax.jit(wrapped.apply)(adapted_variables, x), jax.jit(tiny_vit().apply)(plain_variables, x))
    print(f"ViT with adapters at step 0 vs the ported model: op by op 0 (bitwise); jitted {jitted:.3g} relative")
    assert jitted < ZERO_INIT_JIT_RTOL


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, pretrained):
    """(workdir, config, summary, log) of linear_probe@0,lora:4@0.5 on digits from `pretrained`."""
    workdir = tmp_path_factory.mktemp("lora_run")
    config = run_config(f"linear_probe@0,lora:{RANK}@0.5", str(pretrained))
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("xfer")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary = train.run(config, workdir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return workdir, config, summary, "\n".join(records)


def saved_params(workdir, step: int) -> dict:
    return flat(checkpoint.read_variables(workdir / "checkpoints", step)["params"])


def test_phases_train_only_the_head_then_only_the_adapters_and_the_head(lora_run):
    workdir, config, summary, _ = lora_run
    setup = train.setup(config)
    initial = flat(initial_variables(setup.model, "vit_b_16", setup.init, SIZE, config.seed, config.head_zero_init)
                   ["params"])
    probed, final = saved_params(workdir, BOUNDARY), saved_params(workdir, STEPS)
    is_head = re.compile(models.info("vit_b_16").head).search
    adapters = [path for path in initial if lora.is_adapter(path)]
    rest = [path for path in initial if not lora.is_adapter(path) and not is_head(path)]
    assert len(adapters) == 8 and rest
    assert all(np.array_equal(probed[path], initial[path]) for path in adapters + rest)  # the probe: the head alone
    assert all(np.array_equal(final[path], initial[path]) for path in rest)  # frozen stays bitwise frozen
    assert all(not np.array_equal(final[path], probed[path]) for path in adapters)  # A and B both move
    assert all(np.any(final[path]) for path in adapters if path.endswith(lora.B))
    assert all(not np.array_equal(final[path], probed[path]) for path in initial if is_head(path))
    assert [phase["trainable_parameters"] for phase in summary["phases"]] == [HEAD, HEAD + ADAPTERS]


def test_the_group_table_counts_the_adapters_and_the_optimizer_holds_state_for_them_alone(lora_run):
    workdir, config, summary, log = lora_run
    adapter_sizes, head_size = ADAPTERS, HEAD
    table = log[log.rindex(f"phase 2 (lora:{RANK})"):]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:7]}
    assert rows["backbone"][:2] == ["8", f"{adapter_sizes:,}"]  # 4 adapted layers, A and B each
    assert rows["head"][:2] == ["2", f"{head_size:,}"]
    assert summary["trainable_parameters"] == adapter_sizes + head_size
    # Adam's two moments (float32) for adapters and head, plus a few counters; nothing for the frozen rest.
    assert 8 * (adapter_sizes + head_size) <= summary["optimizer_state_bytes"] < 8 * (adapter_sizes + head_size) + 64


def _dot_output_shapes(jaxpr) -> set[tuple[int, ...]]:
    """The output shapes of every dot_general and convolution in `jaxpr`, sub-jaxprs included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            shapes.update(tuple(var.aval.shape) for var in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes |= _dot_output_shapes(inner)
    return shapes


@pytest.mark.parametrize("partition, frozen_kernels_differentiated", [(f"lora:{RANK}", False), ("full", True)])
def test_the_lora_step_computes_no_gradient_of_a_frozen_kernel(pretrained, partition, frozen_kernels_differentiated):
    """A kernel's gradient is a contraction whose output has the kernel's shape: under lora no
    dot_general or convolution of the train step makes one (under `full` each does: the check bites)."""
    from xfer.training import mesh as mesh_lib, step

    config = run_config(partition, str(pretrained))
    setup = train.setup(config)
    (phase,) = setup.phases
    mesh = mesh_lib.data_mesh()
    train_step = step.make_train_step(setup.model, phase.optimizer(), phase.plan, mesh)
    state = jax.eval_shape(lambda v: step.create_state(v, phase.optimizer(), 0), setup.variable_shapes)
    batch = {"image": jax.ShapeDtypeStruct((8, SIZE, SIZE, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    shapes = _dot_output_shapes(jax.make_jaxpr(train_step)(state, batch).jaxpr)
    kernels = {path: tuple(leaf.shape) for path, leaf in flat(setup.variable_shapes["params"]).items()
               if path.endswith("/kernel") and not path.startswith("heads/")}
    assert len(kernels) == 9  # conv_proj; in_proj, out_proj, mlp/0, mlp/3 of 2 layers
    # A gradient may come out transposed (then a transpose op follows): its shape, either way round.
    differentiated = {path for path, shape in kernels.items() if shape in shapes or shape[::-1] in shapes}
    assert differentiated == (set(kernels) if frozen_kernels_differentiated else set())


def test_merge_gives_a_plain_model_with_the_adapted_logits(lora_run, tmp_path, capsys):
    workdir, config, _, _ = lora_run
    setup = train.setup(config)
    adapted_variables = checkpoint.read_variables(workdir / "checkpoints", STEPS)
    x = images(4)
    adapted = jax.jit(setup.model.apply)(adapted_variables, x)
    plain_model = models.build("vit_b_16", 10, **{k: v for k, v in TINY_VIT.items() if k != "name"})
    for file_format in ("safetensors", "orbax"):
        out = tmp_path / f"merged_{file_format}"
        assert weights_cli.main(["merge", str(workdir), "--out", str(out), "--format", file_format]) == 0
        # What a run with config.init=DIR starts from: the plain model, every variable ported.
        merged = initial_variables(plain_model, "vit_b_16", str(out), SIZE, 0, False)
        assert not any(lora.is_adapter(path) for path in flat(merged))
        error = relative(jax.jit(plain_model.apply)(merged, x), adapted)
        with capsys.disabled():  # the measured error shows with -s
            print(f"tiny ViT after {STEPS} steps, merged ({file_format}) vs adapted logits: {error:.3g} relative")
        assert error < MERGE_RTOL
        assert f"lora:{RANK}: {ADAPTERS:,} adapter parameters folded" in capsys.readouterr().out


def test_merge_refuses_what_holds_no_adapters_in_one_line(lora_run, tmp_path, capsys):
    workdir, _, _, _ = lora_run
    plain_run = tmp_path / "plain_run"
    plain_run.mkdir()
    (plain_run / "config.json").write_text(json.dumps({"partition": "linear_probe"}))
    cases = [([str(tmp_path / "nowhere")], "is not an xfer run directory"),
             ([str(plain_run)], "trained no LoRA adapters"),
             ([str(workdir), "--step", "3"], "step=3 is not one of"),
             ([str(workdir), "--out", str(workdir)], "already exists")]
    for args, message in cases:
        out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
        assert weights_cli.main(["merge", *args, *out]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    with pytest.raises(ValueError, match="holds LoRA adapters .*python -m xfer.weights merge"):
        initial_variables(tiny_vit(), "vit_b_16", f"run:{workdir}", SIZE, 0, False)


# --- presets, phases, sweeps: from shapes ---------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("lora:0", "needs a whole rank >= 1"),
    ("lora:x", "needs a whole rank >= 1"),
    ("lora", "needs a whole rank >= 1"),
    ("lora:4:alpha=0", "alpha='0' must be a number > 0"),
    ("lora:4:alpha=x", "alpha='x' must be a number > 0"),
    ("lora:4:", "ends in an empty target regex"),
])
def test_a_bad_lora_preset_is_one_line(setting, message):
    with pytest.raises(PartitionError, match=re.escape(message)) as error:
        presets.parse(setting)
    assert "\n" not in str(error.value)


def test_the_preset_spells_rank_alpha_and_targets():
    assert presets.parse("lora:8").lora == lora.Settings(8, 8.0, None)
    assert presets.parse("lora:16:alpha=32:self_attention/(?:in|out)_proj$").lora == lora.Settings(
        16, 32.0, "self_attention/(?:in|out)_proj$")
    assert presets.parse(("lora:4",)).lora.scale == 2.0  # --config.partition=lora:4 over a rules config
    assert phases.lora_settings("linear_probe@0,lora:4@0.5") == lora.Settings(4)
    assert phases.lora_settings("linear_probe@0,full@0.5") is None


@pytest.mark.parametrize("model_name, targets, message", [
    ("vit_b_16", "nothing_here", "matches no Dense or Conv layer of vit_b_16"),
    ("vit_b_16", "heads/head", "part of the head"),
    ("tiny_cnn", "dw", "a grouped convolution (feature_group_count=16"),
    ("vgg11", "classifier/0", "a PooledDense, which is no flax Dense or Conv"),
    ("vit_b_16", "(", "is invalid"),
])
def test_a_target_regex_no_adapter_fits_is_one_line(tiny_cnn, model_name, targets, message):
    model = tiny_vit() if model_name == "vit_b_16" else models.build(model_name, 10)
    with pytest.raises(lora.LoraError, match=re.escape(message)) as error:
        lora.wrap(model, lora.Settings(RANK, targets=targets), model_name, shape_of())
    assert "\n" not in str(error.value)


def test_a_model_without_default_targets_asks_for_a_regex(monkeypatch):
    class DepthwiseOnly(nn.Module):
        num_classes: int = 10

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(3, (3, 3), feature_group_count=3, name="dw")(x)
            return nn.Dense(self.num_classes, name="fc")(x.mean((1, 2)))

    monkeypatch.setitem(models.MODELS, "depthwise_only",
                        models.ModelInfo("depthwise_only", DepthwiseOnly, 32, (0.5,) * 3, (0.5,) * 3, head="^fc/",
                                         blocks=("^dw/",)))
    with pytest.raises(lora.LoraError, match=r"has no default LoRA target .* lora:4:REGEX"):
        lora.wrap(DepthwiseOnly(), lora.Settings(RANK), "depthwise_only", shape_of())


def test_non_lora_phases_keep_the_adapters_frozen():
    wrapped = lora.wrap(tiny_vit(), lora.Settings(RANK), "vit_b_16", shape_of())
    shapes = jax.eval_shape(wrapped.init, jax.random.PRNGKey(0), shape_of())
    config = run_config(f"lora:{RANK}@0,full@0.5", "imagenet")
    first, second = phases.build(config, "vit_b_16", shapes, 10)
    labels = [flat(phase.plan.labels) for phase in (first, second)]
    adapters = [path for path in labels[0] if lora.is_adapter(path)]
    assert {labels[0][path] for path in adapters} == {"backbone"}
    assert {labels[1][path] for path in adapters} == {FROZEN}  # full trains the rest, never the adapters
    # what full unfreezes gets fresh optimizer state: `backbone.phase2` (xfer.learning.phases)
    assert {label for path, label in labels[1].items() if path not in adapters} == {"head", "backbone.phase2"}
    with pytest.raises(PartitionError, match="gives LoRA different settings"):
        phases.lora_settings("lora:4@0,lora:8@0.5")


def test_a_sweep_arm_can_be_lora(pretrained, tmp_path):
    config = run_config("linear_probe", str(pretrained))
    config.sweep = ml_collections.ConfigDict({"partition": ("linear_probe", f"lora:{RANK}")})
    runs = sweep.grid(config)
    assert [run.name for run in runs] == ["partition=linear_probe", f"partition=lora-{RANK}"]
    sweep.check(runs, tmp_path)  # every run's whole setup: data, model with adapters, plan, optimizer
    assert train.setup(runs[1].config).trainable_parameters == HEAD + ADAPTERS


def test_wise_ft_scales_the_low_rank_update_exactly():
    """θ_α of a LoRA run is W0 + α·scale·A·B: A keeps its trained value, B goes from its initial 0."""
    rng = np.random.default_rng(0)
    kernel, a_0, a_1, b_1 = (rng.standard_normal(shape).astype(np.float32)
                             for shape in [(6, 5), (6, RANK), (6, RANK), (RANK, 5)])
    initial = {"params/fc/kernel": kernel, "params/fc/lora_a": a_0, "params/fc/lora_b": np.zeros((RANK, 5), np.float32)}
    final = {**initial, "params/fc/lora_a": a_1, "params/fc/lora_b": b_1}
    alpha, scale = 0.3, 2.0
    mixed = wise_ft.interpolate(initial, final, alpha, wise_ft._lora_a(final))
    folded = lora.merged(traverse_util.unflatten_dict({k.split("/", 1)[1]: np.asarray(v) for k, v in mixed.items()},
                                                      sep="/"), scale)["fc"]["kernel"]
    np.testing.assert_allclose(folded, kernel + alpha * scale * a_1.astype(np.float64) @ b_1, rtol=1e-6, atol=1e-6)
