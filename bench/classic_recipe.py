"""The classic recipe, xfer against PyTorch on this machine: images/s of one train step.

    python bench/classic_recipe.py                                   # 32 and 224 px, frozen and full
    python bench/classic_recipe.py --sizes 32 --modes frozen --windows 5
    python bench/classic_recipe.py --xla-flags=--xla_cpu_multi_thread_eigen=false   # other XLA flags than launch.py's
    python bench/classic_recipe.py --model-fields cpu_lowerings=False                     # other model fields
    python bench/classic_recipe.py --sizes 224 --modes full --compile-only                 # FLOPs, memory only

ImageNet VGG16 -> CIFAR-10 (10 classes), batch 64, cross-entropy, SGD lr 1e-3 momentum 0.9;
`frozen`: `features` frozen, the classifier trained; `full`: every parameter trained. Random
initialisation and one fixed random batch (speed does not depend on the values; data loading is
excluded on both sides). Both models train with dropout on, as `model.train()` does.

PyTorch runs torch's recipe: `requires_grad = False` on `model.features`, `torch.optim.SGD` over
the parameters that require grad. xfer runs the library path a config takes: `xfer.models.build`,
`xfer.weights.initialise.initial_variables` (init "scratch"), `xfer.learning.plan.build` with the
rules `(("^features/", "frozen"), ("^classifier/", "classifier"))` (one group `(".*", "all")` for
full), the plan's optimizer, `xfer.training.step.make_train_step` (jitted, state donated), one global
batch through `xfer.training.mesh.global_batch`. Each (size, mode) also reports the compiled step's
FLOPs and temporary memory (XLA's cost and memory analyses).

Warm-up steps (compilation, oneDNN primitive creation) are excluded on both sides, and torch gets as
many threads as XLA:CPU's intra-op pool (one per core this process may use). Then timed windows
alternate torch / xfer / torch / xfer ... in this one process, so both sides see the same machine
load; each pair gives a ratio, and the medians over the windows are printed. XLA flags are fixed
when jax is imported, so comparing flag sets takes one run of this command per set, each with its
own ratio. A line of JSON per (size, mode) goes to --json when given.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xfer and configs

BATCH = 64
NUM_CLASSES = 10
LR, MOMENTUM = 1e-3, 0.9
FROZEN_RULES = (("^features/", "frozen"), ("^classifier/", "classifier"))
FULL_RULES = ((".*", "all"),)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,224", help="comma-separated image sizes (px)")
    parser.add_argument("--modes", default="frozen,full", help="comma-separated: frozen, full")
    parser.add_argument("--steps", type=int, default=0,
                        help="train steps per timed window (default: 4 at <=64 px, 1 above)")
    parser.add_argument("--windows", type=int, default=0,
                        help="timed windows per side, alternating (default: 5 at <=64 px, 3 above)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps per side first (default: 2 at <=64 px, 1 above)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="default: one per core this process may use, as XLA:CPU's intra-op pool")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported "
                        "(default: launch.py's choice for VGG16, xfer.training.xla_flags)")
    parser.add_argument("--model-fields", default="",
                        help="comma-separated field=value for xfer's VGG16 (xfer.models.build overrides)")
    parser.add_argument("--compile-only", action="store_true",
                        help="xfer's compiled FLOPs and memory only: no torch, no timing")
    parser.add_argument("--json", default="", help="append one JSON line per (size, mode) here")
    parser.add_argument("--skip-torch", action="store_true", help="time xfer only (no ratio)")
    parser.add_argument("--only", choices=("", "torch", "xfer"), default="", help=argparse.SUPPRESS)
    parser.add_argument("--split", default="224:full",
                        help="size:mode pairs run as alternating processes, one side each (memory)")
    args = parser.parse_args(argv)
    args.torch_threads = args.torch_threads or len(os.sched_getaffinity(0))
    return args


def model_fields(text: str) -> dict:
    """`"a=1,b=False"` -> `{"a": 1, "b": False}`: Python literals, as `--config.model.a=1` takes them."""
    fields = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        fields[name.strip()] = ast.literal_eval(value.strip())
    return fields


def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "nproc": len(os.sched_getaffinity(0)), "python": platform.python_version()}


# ----------------------------------------------------------------------------- torch

def torch_step(size: int, mode: str, images, labels):
    """torch's recipe; returns a no-argument function that runs one train step."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None, num_classes=NUM_CLASSES)
    model.train()
    if mode == "frozen":
        for p in model.features.parameters():
            p.requires_grad = False
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # NCHW, contiguous
    y = torch.from_numpy(labels.astype("int64"))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step, lambda: None


# ----------------------------------------------------------------------------- xfer

def xfer_step(size: int, mode: str, images, labels, fields: dict, info: dict):
    """`xfer.training.step.make_train_step` as `xfer.training.train.run` builds it, compiled; returns
    (step, sync) and records its compile time, FLOPs and temporary memory in `info`."""
    from xfer import models
    from xfer.learning import optim, plan
    from xfer.weights.initialise import initial_variables

    model = models.build("vgg16", num_classes=NUM_CLASSES, **fields)
    variables = initial_variables(model, "vgg16", "scratch", size, seed=0, head_zero_init=False)
    rules = FROZEN_RULES if mode == "frozen" else FULL_RULES
    optim_config = {rules[-1][1]: optim.group_config(optimizer="sgd", lr=LR, momentum=MOMENTUM)}
    freeze = plan.build(rules, (), optim_config, "vgg16", variables)
    return library_step(model, variables, freeze, images, labels, info)


def library_step(model, variables, freeze, images, labels, info: dict):
    """(step, sync) of `make_train_step` for `freeze` (an `xfer.learning.plan.FreezePlan`), compiled
    and fed one fixed batch; records compile time, FLOPs and temporary memory in `info`."""
    from xfer.training import mesh as mesh_lib, step as step_lib

    tx = freeze.optimizer(total_steps=1000)
    mesh = mesh_lib.data_mesh()
    state = mesh_lib.replicate(step_lib.create_state(variables, tx, seed=0), mesh)
    batch = mesh_lib.global_batch({"image": images, "label": labels.astype("int32")}, mesh)
    start = time.perf_counter()
    compiled = step_lib.make_train_step(model, tx, freeze, mesh).lower(state, batch).compile()
    info["compile_s"] = round(time.perf_counter() - start, 2)
    info["xfer_gflops_per_step"] = round(compiled_flops(compiled) / 1e9, 2)
    info["xfer_temp_gb"] = round(compiled.memory_analysis().temp_size_in_bytes / 1e9, 2)
    return repeat_step(compiled, state, batch)


def repeat_step(fn, state, batch, feeds_state: bool = True):
    """(call, sync): `call()` runs `fn(state, batch)` once, `sync()` waits for the last call.

    With `feeds_state` the output's first item is the next call's state: a train step donates
    (deletes) the state it is given.
    """
    import jax

    holder = {"state": state, "out": None}

    def call():
        holder["out"] = fn(holder["state"], batch)
        if feeds_state:
            holder["state"] = holder["out"][0]

    return call, lambda: jax.block_until_ready(holder["out"])


def compiled_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


# ----------------------------------------------------------------------------- timing

def timed_window(step, sync, steps: int) -> float:
    """Seconds for `steps` steps, the last one finished."""
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


def alternate(sides: dict, steps: int, windows: int, warmup: int) -> dict:
    """Alternates timed windows over `sides` ({name: (step, sync)}); seconds per step, per window."""
    for step, sync in sides.values():
        for _ in range(warmup):
            step()
        sync()
    seconds = {name: [] for name in sides}
    for _ in range(windows):
        for name, (step, sync) in sides.items():
            seconds[name].append(timed_window(step, sync, steps) / steps)
    return seconds


def compare(sides: dict, steps: int, windows: int, warmup: int) -> dict:
    """`alternate`'s windows as images/s."""
    return {name: [BATCH / s for s in values] for name, values in alternate(sides, steps, windows, warmup).items()}


def summarise(rates: dict, reference: str) -> dict:
    out = {f"{name}_img_s": [round(r, 2) for r in values] for name, values in rates.items()}
    for name, values in rates.items():
        out[f"{name}_img_s_median"] = round(statistics.median(values), 2)
        if name != reference and reference in rates:
            ratios = [v / r for v, r in zip(values, rates[reference])]
            out[f"{name}_over_{reference}"] = [round(x, 3) for x in ratios]
            out[f"{name}_over_{reference}_median"] = round(statistics.median(ratios), 3)
    return out


def _split_rates(args, size: int, mode: str, steps: int, windows: int, warmup: int, info: dict) -> dict:
    """Alternating child processes (torch, xfer, torch, ...), each: build, warm up, one timed window."""
    import subprocess
    import tempfile

    rates = {"torch": [], "xfer": []}
    for _ in range(windows):
        for side in rates:
            with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
                cmd = [sys.executable, __file__, "--sizes", str(size), "--modes", mode, "--only", side,
                       "--steps", str(steps), "--windows", "1", "--warmup", str(warmup), "--json", out.name,
                       "--torch-threads", str(args.torch_threads), f"--model-fields={args.model_fields}"]
                if args.xla_flags:
                    cmd.append(f"--xla-flags={args.xla_flags}")
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                child = json.loads(Path(out.name).read_text().splitlines()[-1])
            rates[side].append(child[f"{side}_img_s"][0])
            info[f"{side}_peak_rss_gb"] = child["peak_rss_gb"]
            for key in ("compile_s", "xfer_gflops_per_step", "xfer_temp_gb"):
                if key in child:
                    info[key] = child[key]
    return rates


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    else:  # what launch.py runs by default for VGG16
        from xfer import models
        from xfer.training import xla_flags
        xla_flags.apply(models.info("vgg16").cpu_xla_flags)
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.torch_threads)
    fields = model_fields(args.model_fields)
    env = {**machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "jax": jax.__version__, "xla_devices": len(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "xla_threads": "XLA default (one intra-op pool of nproc threads)", "model_fields": fields}
    print(json.dumps(env), flush=True)
    results = []
    split = {tuple(item.split(":")) for item in args.split.split(",") if item}
    for size in [int(s) for s in args.sizes.split(",") if s]:
        small = size <= 64
        steps = args.steps or (4 if small else 1)
        windows = args.windows or (5 if small else 3)
        warmup = args.warmup or (2 if small else 1)
        rng = np.random.RandomState(size)
        images = rng.standard_normal((BATCH, size, size, 3)).astype(np.float32)
        labels = rng.randint(0, NUM_CLASSES, BATCH)
        for mode in [m for m in args.modes.split(",") if m]:
            if mode not in ("frozen", "full"):
                raise SystemExit(f"unknown mode {mode!r}: use frozen or full")
            info = {"size": size, "mode": mode, "batch": BATCH, "steps_per_window": steps, "windows": windows,
                    "loadavg_1min_before": round(os.getloadavg()[0], 2)}
            started = time.perf_counter()
            if args.compile_only:
                xfer_step(size, mode, images, labels, fields, info)
                rates = {}
            elif (str(size), mode) in split and not args.only:
                info["processes"] = "one per side and window, alternating (both at once do not fit in memory)"
                rates = _split_rates(args, size, mode, steps, windows, warmup, info)
            else:
                sides = {}
                if args.only in ("", "torch") and not args.skip_torch:
                    sides["torch"] = torch_step(size, mode, images, labels)
                if args.only in ("", "xfer"):
                    sides["xfer"] = xfer_step(size, mode, images, labels, fields, info)
                rates = compare(sides, steps, windows, warmup)
                del sides
            info.update(summarise(rates, "torch"))
            info["wall_s"] = round(time.perf_counter() - started, 1)
            info["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
            info["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
            results.append(info)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**env, **info}) + "\n")
            if args.only:
                continue
            nan = float("nan")
            timing = "" if args.compile_only else (
                f"torch {info.get('torch_img_s_median', nan):7.2f} img/s   "
                f"xfer {info['xfer_img_s_median']:7.2f} img/s   "
                f"xfer/torch {info.get('xfer_over_torch_median', nan):.3f} "
                f"(windows {info.get('xfer_over_torch', [])})   ")
            line = (f"{size:>4} px {mode:<6} {timing}{info.get('xfer_gflops_per_step')} GFLOP/step  "
                    f"{info.get('xfer_temp_gb')} GB temporaries  compile {info.get('compile_s')} s  "
                    f"wall {info['wall_s']} s  load {info['loadavg_1min_before']}->{info['loadavg_1min_after']}")
            print(line, flush=True)
    return results


if __name__ == "__main__":
    main()
