"""Frozen work is free: a train step through a frozen prefix against the prefix's forward pass alone
plus a train step of the rest.

    python bench/frozen_prefix.py                                              # Lite0, 96 px, batch 32
    python bench/frozen_prefix.py --model vgg16 --image_size 32 --batch 64 --presets linear_probe

For each preset mask (xfer/learning/presets.py), in this one process:
  step    the train step xfer.training.train.run builds without a feature cache: images in, the frozen
          prefix in inference mode, gradients only where the mask trains;
  prefix  the forward pass of the frozen prefix up to its cut (`xfer.training.feature_cache`'s feature
          pass, inference mode): the least any step must do with the frozen part;
  rest    the train step from the cut on, on that output (what runs on cached features);
  full    for scale, the step that trains every parameter.
Printed: compiled FLOPs (XLA's cost analysis) and the median milliseconds per call over timed windows
that alternate between the programs; `step / (prefix + rest)` is what freezing costs beyond the
least possible (goal <= 1.15). Random initialisation and one random batch: values do not change speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xfer and configs

import classic_recipe as cr  # noqa: E402  (timing and FLOP helpers, beside this script)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--presets", default="linear_probe,last_k:1,last_k:3")
    parser.add_argument("--steps", type=int, default=3, help="calls per timed window")
    parser.add_argument("--windows", type=int, default=5)
    return parser.parse_args(argv)


class Programs:
    """The four programs of one preset, compiled, each a no-argument call plus its FLOPs."""

    def __init__(self, model_name: str, preset: str, images, labels):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from xfer import models
        from xfer.learning import optim, plan
        from xfer.training import feature_cache, mesh as mesh_lib, step as step_lib
        from xfer.weights.initialise import initial_variables

        size = images.shape[1]
        model = models.build(model_name, num_classes=10)
        variables = initial_variables(model, model_name, "scratch", size, seed=0, head_zero_init=False)
        mesh = mesh_lib.data_mesh()
        batch = mesh_lib.global_batch({"image": images, "label": labels, "index": np.arange(len(labels)),
                                       "mask": np.ones(len(labels), np.float32)}, mesh)
        group_spec = optim.group_config(optimizer="sgd", lr=1e-3, momentum=0.9)
        optim_config = {group: group_spec for group in ("head", "backbone")}
        self.calls, self.gflops = {}, {}
        for name, setting in (("step", preset), ("full", "full")):
            freeze = plan.build(setting, (), optim_config, model_name, variables)
            tx = freeze.optimizer(total_steps=1000)

            def fresh_state():  # copies, one per program: a train step donates (deletes) the state it is given
                return mesh_lib.replicate(step_lib.create_state(jax.tree.map(jnp.array, variables), tx, 0), mesh)

            self._add(name, step_lib.make_train_step(model, tx, freeze, mesh), fresh_state(), batch)
            if name == "step":
                self.cut = feature_cache.check_cut(feature_cache.AUTO, model, variables, size, freeze)
                prefix = feature_cache.make_feature_step(model, self.cut, mesh)
                state = fresh_state()
                features = prefix(state.params, state.batch_stats, batch)[0]
                self._add("prefix", jax.jit(lambda s, b: prefix(s.params, s.batch_stats, b)), state, batch,
                          feeds_state=False)
                rest = step_lib.make_train_step(model, tx, freeze, mesh, inputs=feature_cache.inputs(self.cut, size))
                self._add("rest", rest, fresh_state(), {**batch, "image": features})
                self.trainable = freeze.trainable_parameters

    def _add(self, name: str, jitted, state, batch, feeds_state: bool = True):
        """Compiles `jitted(state, batch)` and keeps its FLOPs and its (call, sync)."""
        compiled = jitted.lower(state, batch).compile()
        self.gflops[name] = cr.compiled_flops(compiled) / 1e9
        self.calls[name] = cr.repeat_step(compiled, state, batch, feeds_state)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np

    rng = np.random.RandomState(0)
    images = rng.standard_normal((args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    labels = rng.randint(0, 10, args.batch).astype(np.int32)
    print(f"{args.model} at {args.image_size} px, batch {args.batch}, {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s), load {os.getloadavg()[0]:.2f}; ms per call: median of {args.windows} windows of {args.steps}",
          flush=True)
    print(f"{'preset':<14}{'cut':<14}{'trainable':>11}{'GFLOP step':>12}{'prefix+rest':>13}{'full':>8}"
          f"{'ms step':>10}{'prefix+rest':>13}{'full':>9}{'step/(prefix+rest)':>21}{'FLOPs':>7}", flush=True)
    for preset in [p for p in args.presets.split(",") if p]:
        programs = Programs(args.model, preset, images, labels)
        for call, sync in programs.calls.values():
            call()  # warm-up
            sync()
        ms = {name: [] for name in programs.calls}
        for _ in range(args.windows):
            for name, (call, sync) in programs.calls.items():
                ms[name].append(1e3 * cr.timed_window(call, sync, args.steps) / args.steps)
        ratios = [s / (p + r) for s, p, r in zip(ms["step"], ms["prefix"], ms["rest"])]
        median = {name: statistics.median(values) for name, values in ms.items()}
        g = programs.gflops
        print(f"{preset:<14}{programs.cut:<14}{programs.trainable:>11,}{g['step']:>12.2f}"
              f"{g['prefix'] + g['rest']:>13.2f}{g['full']:>8.2f}{median['step']:>10.1f}"
              f"{median['prefix'] + median['rest']:>13.1f}{median['full']:>9.1f}"
              f"{statistics.median(ratios):>21.3f}{g['step'] / (g['prefix'] + g['rest']):>7.3f}", flush=True)


if __name__ == "__main__":
    main()
