"""bfloat16 against float32 activations (`config.compute_dtype`) on this machine: speed and accuracy.

    python bench/compute_dtype.py                          # both speed cases, then the accuracy runs
    python bench/compute_dtype.py --cases lite0_full --windows 5
    python bench/compute_dtype.py --cases "" --accuracy-steps 60   # the accuracy runs only

Speed: milliseconds of one train step, the float32 and the bfloat16 step built by the library path a
config takes (`xfer.training.step.make_train_step` with `StepOptions(compute_dtype=...)`, jitted,
state donated), random initialisation, one fixed random batch, SGD lr 1e-3 momentum 0.9:
  - lite0_full: EfficientNet-Lite0, every parameter and BatchNorm trained, 96 px, batch 32
    (bench/full_finetune.py's setting);
  - vgg16_classifier: VGG16 with `features` frozen and the classifier trained, 32 px, batch 64
    (bench/classic_recipe.py's `frozen` mode).
Each case runs in its own process with launch.py's XLA flags for its model; after warm-up, timed
windows alternate float32 / bfloat16 / float32 ..., so both see the same machine load, and the
median of the per-window ratios is printed with both programs' FLOPs and temporaries.

Accuracy: configs/ablate_freeze.py's `full` arm (Lite0 from its ImageNet weights, every parameter
trained, digits at 32 px, 60 steps) through `xfer.training.train.run`, once per dtype in temporary
workdirs; prints each run's eval accuracy and last logged training loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xfer and configs

import classic_recipe as cr  # noqa: E402  (timing, FLOP and machine helpers, beside this script)
import full_finetune  # noqa: E402

CASES = {  # name: (model, image size, batch, partition rules)
    "lite0_full": ("efficientnet_lite0", 96, 32, ((".*", "all"),)),
    "vgg16_classifier": ("vgg16", 32, 64, (("^features/", "frozen"), ("^classifier/", "classifier"))),
}
DTYPES = ("float32", "bfloat16")
NUM_CLASSES, LR, MOMENTUM = 10, 1e-3, 0.9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=2, help="train steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per dtype, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per dtype first")
    parser.add_argument("--accuracy-steps", type=int, default=60, help="steps of each accuracy run (0: none)")
    parser.add_argument("--json", default="", help="append one JSON line per case and accuracy run here")
    return parser.parse_args(argv)


def dtype_step(model, variables, freeze, images, labels, dtype: str, info: dict):
    """(step, sync) of the train step computing in `dtype`, compiled; its FLOPs and temporaries in `info`."""
    from xfer.training import mesh as mesh_lib, step as step_lib

    options = step_lib.StepOptions(compute_dtype=dtype)
    tx = freeze.optimizer(total_steps=1000)
    mesh = mesh_lib.data_mesh()
    state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0, options=options), mesh)
    batch = mesh_lib.global_batch({"image": images, "label": labels.astype("int32")}, mesh)
    start = time.perf_counter()
    compiled = step_lib.make_train_step(model, tx, freeze, mesh, options=options).lower(state, batch).compile()
    info[f"{dtype}_compile_s"] = round(time.perf_counter() - start, 1)
    info[f"{dtype}_gflops_per_step"] = round(cr.compiled_flops(compiled) / 1e9, 2)
    info[f"{dtype}_temp_gb"] = round(compiled.memory_analysis().temp_size_in_bytes / 1e9, 3)
    return cr.repeat_step(compiled, state, batch)


def run_case(args, case: str) -> dict:
    name, size, batch, rules = CASES[case]
    from xfer import models
    from xfer.training import xla_flags

    xla_flags.apply(models.info(name).cpu_xla_flags)  # what launch.py runs by default for this model
    import jax
    import numpy as np
    from xfer.learning import optim, plan
    from xfer.weights.initialise import initial_variables

    model = models.build(name, num_classes=NUM_CLASSES)
    variables = jax.device_get(initial_variables(model, name, "scratch", size, seed=0, head_zero_init=False))
    groups = {group for _, group in rules if group != "frozen"}
    freeze = plan.build(rules, (), {g: optim.group_config(optimizer="sgd", lr=LR, momentum=MOMENTUM) for g in groups},
                        name, variables)
    rng = np.random.RandomState(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.randint(0, NUM_CLASSES, batch)
    info = {"case": case, "model": name, "size": size, "batch": batch, **cr.machine(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps_per_window": args.steps, "windows": args.windows,
            "load_before": round(os.getloadavg()[0], 2)}
    sides = {dtype: dtype_step(model, variables, freeze, images, labels, dtype, info) for dtype in DTYPES}
    ms = {dtype: [1e3 * s for s in values] for dtype, values in cr.alternate(sides, args.steps, args.windows,
                                                                               args.warmup).items()}
    for dtype, values in ms.items():
        info[f"{dtype}_ms"] = [round(v, 1) for v in values]
        info[f"{dtype}_ms_median"] = round(statistics.median(values), 1)
    ratios = [f / b for f, b in zip(ms["float32"], ms["bfloat16"])]
    info["bfloat16_speedup"] = [round(r, 3) for r in ratios]
    info["bfloat16_speedup_median"] = round(statistics.median(ratios), 3)
    info["load_after"] = round(os.getloadavg()[0], 2)
    return info


def speed_line(info: dict) -> str:
    return (f"{info['case']:<17} {info['size']} px batch {info['batch']}: float32 {info['float32_ms_median']:.1f} ms  "
            f"bfloat16 {info['bfloat16_ms_median']:.1f} ms  speed-up {info['bfloat16_speedup_median']:.3f} "
            f"(windows {info['bfloat16_speedup']})  GFLOP {info['float32_gflops_per_step']}/"
            f"{info['bfloat16_gflops_per_step']}  temporaries GB {info['float32_temp_gb']}/{info['bfloat16_temp_gb']}  "
            f"load {info['load_before']}->{info['load_after']}")


def accuracy_runs(steps: int) -> list[dict]:
    """configs/ablate_freeze.py's `full` arm, once per dtype: eval accuracy and last training loss."""
    from configs import ablate_freeze
    from xfer import models
    from xfer.training import train, xla_flags

    xla_flags.apply(models.info("efficientnet_lite0").cpu_xla_flags)  # as launch.py does
    results = []
    for dtype in DTYPES:
        config = ablate_freeze.get_config()
        config.partition, config.compute_dtype = "full", dtype
        config.total_steps = config.eval_every = config.checkpoint.every = steps
        config.log_every = steps
        with tempfile.TemporaryDirectory() as workdir:
            started, load = time.perf_counter(), os.getloadavg()[0]
            summary = train.run(config, workdir)
            rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
        loss = [row["loss"] for row in rows if row.get("split") == "train"][-1]
        results.append({"accuracy_run": "ablate_freeze:full", "compute_dtype": dtype, "steps": steps,
                        "eval_accuracy": round(summary["eval_accuracy"], 4), "last_train_loss": round(loss, 4),
                        "wall_s": round(time.perf_counter() - started, 1), "load_before": round(load, 2),
                        "load_after": round(os.getloadavg()[0], 2)})
        print(f"accuracy {dtype:<9} eval_accuracy {results[-1]['eval_accuracy']:.4f}  last train loss "
              f"{results[-1]['last_train_loss']:.4f}  ({steps} steps, {results[-1]['wall_s']} s, load "
              f"{results[-1]['load_before']}->{results[-1]['load_after']})", flush=True)
    return results


def main(argv=None):
    args = parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}: use {', '.join(CASES)}")
    if len(cases) == 1 and not args.accuracy_steps:
        full_finetune.one_process_each(cases, "--cases", lambda case: run_case(args, case), speed_line, args.json,
                                       argv, __file__)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    for case in cases:  # one process per case: XLA_FLAGS are read once per process
        subprocess.run([sys.executable, __file__, *argv, "--cases", case, "--accuracy-steps", "0"], check=True)
    if args.accuracy_steps:
        for result in accuracy_runs(args.accuracy_steps):
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
