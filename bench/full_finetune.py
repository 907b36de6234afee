"""Full fine-tuning beyond VGG, xfer against PyTorch on this machine: milliseconds of one train step.

    python bench/full_finetune.py                                    # resnet50 and efficientnet_lite0
    python bench/full_finetune.py --models resnet50 --windows 5
    python bench/full_finetune.py --model-fields cpu_lowerings=False   # lax's standard ops
    python bench/full_finetune.py --also-fields cpu_lowerings=False    # both, in the same windows
    python bench/full_finetune.py --xla-flags=--xla_cpu_multi_thread_eigen=false
    python bench/full_finetune.py --compile-only                        # FLOPs and memory only

One SGD step (lr 1e-3, momentum 0.9, cross-entropy), every parameter trainable, 96 px, batch 32,
10 classes, random initialisation and one fixed random batch (values do not change speed; data
loading is excluded on both sides). Torch: `torchvision.models.resnet50(num_classes=10)` and the
EfficientNet-Lite0 reference module of tests/test_efficientnet_lite.py (imported, with a 10-class
`_fc`), `model.train()`, `torch.optim.SGD`. xfer: the library path a config takes —
`xfer.models.build`, `xfer.learning.plan.build` with the `full` preset, the plan's optimizer,
`xfer.training.step.make_train_step` (jitted, state donated) — with the model's default fields (so
Lite0 trains with its dropout and drop-connect on; the torch reference has neither).

Each model runs in its own child process, because XLA reads XLA_FLAGS once per process and the
models register different ones: each child sets its model's `ModelInfo.cpu_xla_flags` as
`launch.py` does by default (`xfer.training.xla_flags`), unless --xla-flags is given. In a child,
torch gets one thread per core (as XLA:CPU's intra-op pool), both sides are warmed up, then timed
windows alternate torch / xfer / torch / ...; each pair of windows gives a ratio, and the medians
over the windows are printed with the compiled step's FLOPs (XLA's cost analysis).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xfer
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the torch Lite0 reference

import classic_recipe as cr  # noqa: E402  (timing, FLOP and model-field helpers, beside this script)

MODELS = ("resnet50", "efficientnet_lite0")
SIZE, BATCH, NUM_CLASSES = 96, 32, 10
LR, MOMENTUM = 1e-3, 0.9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=2, help="train steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per side, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="default: one per core this process may use, as XLA:CPU's intra-op pool")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS instead of launch.py's choice for the model")
    parser.add_argument("--model-fields", default="", help="comma-separated field=value for xfer's model")
    parser.add_argument("--also-fields", default="",
                        help="time a second xfer side, `xfer_also`, built with these fields, in the same windows")
    parser.add_argument("--compile-only", action="store_true", help="xfer's compiled FLOPs and memory only")
    parser.add_argument("--json", default="", help="append one JSON line per model here")
    args = parser.parse_args(argv)
    args.torch_threads = args.torch_threads or len(os.sched_getaffinity(0))
    return args


# ----------------------------------------------------------------------------- torch

def torch_model(name: str):
    import torch
    import torchvision

    if name == "resnet50":
        return torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
    from test_efficientnet_lite import TorchLite0

    model = TorchLite0()
    model._fc = torch.nn.Linear(model._fc.in_features, NUM_CLASSES)
    return model


def torch_step(name: str, images, labels):
    """(step, sync): one SGD step of the whole torch model in train mode."""
    import torch

    torch.manual_seed(0)
    model = torch_model(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # NCHW, contiguous
    y = torch.from_numpy(labels.astype("int64"))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step, lambda: None


# ----------------------------------------------------------------------------- xfer

def xfer_step(name: str, images, labels, fields: dict, info: dict):
    """(step, sync) of the compiled train step a `full`-preset config runs; records its compile time,
    FLOPs and temporary memory in `info`."""
    from xfer import models
    from xfer.learning import optim, plan
    from xfer.weights.initialise import initial_variables

    model = models.build(name, num_classes=NUM_CLASSES, **fields)
    variables = initial_variables(model, name, "scratch", SIZE, seed=0, head_zero_init=False)
    group = optim.group_config(optimizer="sgd", lr=LR, momentum=MOMENTUM)
    freeze = plan.build("full", (), {"head": group, "backbone": group}, name, variables)
    info["trainable"] = freeze.trainable_parameters
    return cr.library_step(model, variables, freeze, images, labels, info)


# ----------------------------------------------------------------------------- one model, one process

def run_model(args, name: str) -> dict:
    """Sets the model's XLA flags, builds both sides, times them; one result dict."""
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = args.xla_flags
    else:  # what launch.py runs by default for this model
        from xfer import models
        from xfer.training import xla_flags
        xla_flags.apply(models.info(name).cpu_xla_flags)
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.torch_threads)
    rng = np.random.RandomState(0)
    images = rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.randint(0, NUM_CLASSES, BATCH)
    info = {"model": name, "size": SIZE, "batch": BATCH, **cr.machine(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "model_fields": cr.model_fields(args.model_fields),
            "steps_per_window": args.steps, "windows": args.windows, "load_before": round(os.getloadavg()[0], 2)}
    sides = {} if args.compile_only else {"torch": torch_step(name, images, labels)}
    sides["xfer"] = xfer_step(name, images, labels, info["model_fields"], info)
    if args.also_fields:
        info["also_fields"], also = cr.model_fields(args.also_fields), {}
        sides["xfer_also"] = xfer_step(name, images, labels, {**info["model_fields"], **info["also_fields"]}, also)
        info.update({f"also_{key}": value for key, value in also.items()})
    if not args.compile_only:
        ms = {side: [1e3 * s for s in values]
              for side, values in cr.alternate(sides, args.steps, args.windows, args.warmup).items()}
        info.update({f"{side}_ms": [round(v, 1) for v in values] for side, values in ms.items()})
        info.update({f"{side}_ms_median": round(statistics.median(values), 1) for side, values in ms.items()})
        for side in set(sides) - {"torch"}:  # speed over torch's, window by window
            ratios = [t / x for t, x in zip(ms["torch"], ms[side])]
            info[f"{side}_over_torch"] = [round(r, 3) for r in ratios]
            info[f"{side}_over_torch_median"] = round(statistics.median(ratios), 3)
    info["load_after"] = round(os.getloadavg()[0], 2)
    return info


def line(info: dict) -> str:
    timing = "" if "xfer_ms_median" not in info else (
        f"torch {info['torch_ms_median']:8.1f} ms   xfer {info['xfer_ms_median']:8.1f} ms   "
        f"xfer/torch {info['xfer_over_torch_median']:.3f} (windows {info['xfer_over_torch']})   ")
    also = "" if "xfer_also_ms_median" not in info else (
        f"[{args_text(info['also_fields'])}: {info['xfer_also_ms_median']:.1f} ms, /torch "
        f"{info['xfer_also_over_torch_median']:.3f} (windows {info['xfer_also_over_torch']}), "
        f"{info['also_xfer_gflops_per_step']} GFLOP]   ")
    return (f"{info['model']:<19}{timing}{also}{info['xfer_gflops_per_step']} GFLOP/step  {info['xfer_temp_gb']} GB "
            f"temporaries  compile {info['compile_s']} s  load {info['load_before']}->{info['load_after']}  "
            f"XLA_FLAGS={info['xla_flags']!r}")


def args_text(fields: dict) -> str:
    return ",".join(f"{name}={value}" for name, value in fields.items())


def main(argv=None):
    args = parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}: use {', '.join(MODELS)}")
    one_process_each(names, "--models", lambda name: run_model(args, name), line, args.json, argv, __file__)


def one_process_each(names: list[str], flag: str, measure, describe, json_path: str | None, argv,
                     script: str) -> None:
    """`measure(name)` here for a single name (`describe`d, and appended to `json_path` as a JSON line),
    else `script` run again once per name with `flag name`: XLA_FLAGS are read once per process."""
    if len(names) == 1:
        info = measure(names[0])
        print(describe(info), flush=True)
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(info) + "\n")
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in names:
        subprocess.run([sys.executable, script, *argv, flag, name], check=True)


if __name__ == "__main__":
    main()
