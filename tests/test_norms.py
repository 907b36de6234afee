"""BatchNorm policies: which layers use batch statistics, and over which batch.

The 8-device checks run in a subprocess because the simulated device count
must be set before JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xfer import norms, partition


def _params_and_stats():
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    params = {"features": {"0": {"kernel": zeros(3, 3, 3, 8)}, "1": {"scale": zeros(8), "bias": zeros(8)},
                           "3": {"kernel": zeros(3, 3, 8, 8)}, "4": {"scale": zeros(8), "bias": zeros(8)}},
              "classifier": {"kernel": zeros(8, 2), "bias": zeros(2)}}
    stats = {"features": {"1": {"mean": zeros(8), "var": zeros(8)}, "4": {"mean": zeros(8), "var": zeros(8)}}}
    return params, stats


def test_defaults_follow_the_freeze_mask():
    params, stats = _params_and_stats()
    labels = partition.labels(params, (("^features/[0-2]/", "frozen"), (".*", "rest")))
    assert norms.policies(stats, (), labels) == {"features/1": "frozen", "features/4": "train"}


def test_rules_override_first_match_wins():
    params, stats = _params_and_stats()
    labels = partition.labels(params, (("^features/", "frozen"), (".*", "head")))
    chosen = norms.policies(stats, (("^features/4$", "stats_frozen"), ("^features/", "train")), labels)
    assert chosen == {"features/1": "train", "features/4": "stats_frozen"}
    assert norms.running_statistics_layers(chosen) == frozenset({"features/4"})


def test_frozen_policy_freezes_the_affine_parameters():
    params, stats = _params_and_stats()
    labels = partition.labels(params, ((".*", "all"),))
    chosen = norms.policies(stats, (("^features/1$", "frozen"),), labels)
    relabelled = norms.freeze_affine(labels, chosen)
    assert relabelled["features"]["1"] == {"scale": "frozen", "bias": "frozen"}
    assert relabelled["features"]["4"] == {"scale": "all", "bias": "all"}
    assert relabelled["features"]["0"]["kernel"] == "all"


def test_a_rule_for_a_path_without_batchnorm_is_an_error():
    params, stats = _params_and_stats()
    labels = partition.labels(params, ((".*", "all"),))
    with pytest.raises(norms.NormPolicyError, match=r"rule 0 \('\^classifier', 'frozen'\) matches no BatchNorm"):
        norms.policies(stats, (("^classifier", "frozen"),), labels)


def test_an_unknown_policy_is_an_error():
    params, stats = _params_and_stats()
    labels = partition.labels(params, ((".*", "all"),))
    with pytest.raises(norms.NormPolicyError, match="unknown policy; choose one of train, frozen, stats_frozen"):
        norms.policies(stats, ((".*", "freeze"),), labels)


_EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh
    from xfer import models, norms, optim, partition, step
    assert jax.device_count() == 8
    model = models.build("vgg11_bn", num_classes=4, dropout_rate=0.0)
    # On host: the train step donates its state, and a 1-device replica may alias these buffers.
    variables = jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    labels = partition.labels(variables["params"], (("^features/", "backbone"), (".*", "head")))
    config = {g: optim.group_config(optimizer="sgd", lr=0.1) for g in ("backbone", "head")}
    tx = optim.build(config, labels, 10)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((16, 32, 32, 3), dtype=np.float32),
             "label": rng.integers(0, 4, 16).astype(np.int32)}
    results = {}
    for name, devices, cross in (("one", 1, True), ("eight", 8, True), ("eight_per_device", 8, False)):
        mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
        state = step.replicate(step.create_state(variables, tx, 0), mesh)
        train_step = step.make_train_step(model, tx, labels, mesh, frozenset(), cross)
        state, _ = train_step(state, step.global_batch(batch, mesh))
        results[name] = {"stats": jax.tree.leaves(jax.device_get(state.batch_stats)),
                         "params": jax.tree.leaves(jax.device_get(state.params))}
    def close(a, b):  # float32 sums over another split of the batch differ in the last bits
        return all(np.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))
    print(json.dumps({f"{kind}_{other}": close(results[other][kind], results["one"][kind])
                      for kind in ("stats", "params") for other in ("eight", "eight_per_device")}))
""")


def test_eight_devices_compute_the_statistics_and_update_of_one_device_with_the_whole_batch():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    close_to_one_device = json.loads(done.stdout.strip().splitlines()[-1])
    assert close_to_one_device["stats_eight"] and close_to_one_device["params_eight"]
    # The option's other side: per-device statistics (2 examples each) really differ.
    assert not close_to_one_device["stats_eight_per_device"]
