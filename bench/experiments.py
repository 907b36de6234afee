"""What moves xfer's figure in the classic recipe: each effect measured as a ratio in one run.

    python bench/experiments.py flops   [--sizes 32,224]            # compiled FLOPs, no timing
    python bench/experiments.py variants [--size 32] [--mode frozen] [--variants lib,small_im2col,...]
    python bench/experiments.py flags   [--size 32] [--mode frozen]  # one subprocess per XLA flag set

`variants` times, in one process and in alternating windows, torch's step, the library's step
(`xfer.training.step.make_train_step` on `xfer.models.build('vgg16')`) and the same library step on
`bench/variants.py` models (same parameters, other lowerings), plus a step without donation.
`flags` reruns bench/classic_recipe.py in a subprocess per XLA flag set (flags must be set before
jax is imported), alternating the sets; each run's own xfer/torch ratio is the figure compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import classic_recipe as cr  # noqa: E402

LIB = dict(conv="small_im2col", fold="1x1", pool="custom")  # what xfer.models.vgg does now
VARIANTS = {
    # name: bench/variants.py VGGVariant keyword arguments; None: the library model itself
    "lib": None,                                                    # xfer.models.build('vgg16')
    "before": dict(conv="lax", fold="none", pool="lax"),            # the library before this work
    "no_im2col": {**LIB, "conv": "lax"},                            # lib without the small-map im2col
    "no_fold": {**LIB, "fold": "none"},                             # lib without PooledDense's 1x1 fold
    "no_pool_vjp": {**LIB, "pool": "lax"},                          # lib with nn.max_pool's gradient
    "im2col_all": {**LIB, "conv": "im2col"},                        # every conv as im2col + matmul
    "bf16": {**LIB, "dtype": "bfloat16"},                           # features computed in bfloat16
    "relu_out": {**LIB, "relu": "output"},                          # ReLU derivative from its output
}

FLAG_SETS = {
    "default": "",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=",
    "no_ynn+onednn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true "
                         "--xla_cpu_experimental_onednn_fusion_type=individual_dot",
    "ynn_conv+onednn_dot": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution "
                           "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_dot",
    "ynn+dot+eltwise+reduce": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot,eltwise,reduce",
    "multi_thread_eigen=false": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "use_thunk_runtime=false": "--xla_cpu_use_thunk_runtime=false",
}


def build_step(name: str, size: int, mode: str, images, labels, donate: bool = True):
    """(step, sync, compiled) for variant `name` through xfer.training.step.make_train_step."""
    import jax
    import jax.numpy as jnp

    from xfer.training import step as step_lib
    import variants

    model, tx, params_labels, state, batch, mesh, running = cr.xfer_setup(size, mode, images, labels)
    spec = VARIANTS[name.removesuffix("_nodonate")]
    if spec is not None:
        spec = dict(spec)
        if "dtype" in spec:
            spec["dtype"] = getattr(jnp, spec["dtype"])
        model = variants.VGGVariant(num_classes=cr.NUM_CLASSES, **spec)
    train_step = step_lib.make_train_step(model, tx, params_labels, mesh, running)
    if not donate or name.endswith("_nodonate"):
        train_step = jax.jit(train_step.__wrapped__)
    compiled = train_step.lower(state, batch).compile()
    return *cr.repeat_step(compiled, state, batch), compiled, model, state


def torch_bf16_step(size: int, mode: str, images, labels):
    """torch's recipe with `features` under torch.autocast('cpu', bfloat16) (oneDNN, AMX here)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None, num_classes=cr.NUM_CLASSES).train()
    if mode == "frozen":
        for p in model.features.parameters():
            p.requires_grad = False
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cr.LR, momentum=cr.MOMENTUM)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels.astype("int64"))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = model.features(x)
        logits = model.classifier(torch.flatten(model.avgpool(feats.float()), 1))
        torch.nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()

    return step, lambda: None


def logits_error(model, ref_model, state, images) -> float:
    import jax.numpy as jnp
    import numpy as np

    variables = {"params": state.params}
    ours = np.asarray(model.apply(variables, jnp.asarray(images[:8]), train=False))
    ref = np.asarray(ref_model.apply(variables, jnp.asarray(images[:8]), train=False))
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def cmd_variants(args):
    import jax  # noqa: F401
    import numpy as np
    import torch

    from xfer import models

    torch.set_num_threads(2)
    size, mode = args.size, args.mode
    steps = args.steps or (4 if size <= 64 else 1)
    rng = np.random.RandomState(size)
    images = rng.standard_normal((cr.BATCH, size, size, 3)).astype(np.float32)
    labels = rng.randint(0, cr.NUM_CLASSES, cr.BATCH)
    ref_model = models.build("vgg16", num_classes=cr.NUM_CLASSES)
    sides, info = {}, {}
    if not args.skip_torch:
        sides["torch"] = cr.torch_step(size, mode, images, labels)
    if args.torch_bf16:
        sides["torch_bf16"] = torch_bf16_step(size, mode, images, labels)
    for name in args.variants.split(","):
        start = time.perf_counter()
        step, sync, compiled, model, state = build_step(name, size, mode, images, labels)
        info[name] = {"compile_s": round(time.perf_counter() - start, 1),
                      "gflops": round(cr.compiled_flops(compiled) / 1e9, 2),
                      "logits_rel_err_vs_lib": logits_error(model, ref_model, state, images)}
        print(name, json.dumps(info[name]), flush=True)
        sides[name] = (step, sync)
    rates = cr.compare(sides, steps, args.windows, args.warmup)
    reference = "torch" if "torch" in sides else args.variants.split(",")[0]
    summary = cr.summarise(rates, reference)
    print(json.dumps({"size": size, "mode": mode, "steps_per_window": steps, **summary}), flush=True)
    for name in sides:
        if name == reference:
            print(f"{size}px {mode} {name:<14} {summary[f'{name}_img_s_median']:8.2f} img/s")
        else:
            lib = ""
            if "lib" in rates and name != "lib":
                r = statistics.median([a / b for a, b in zip(rates[name], rates["lib"])])
                lib = f"  vs lib x{r:.2f}"
            print(f"{size}px {mode} {name:<14} {summary[f'{name}_img_s_median']:8.2f} img/s  "
                  f"/{reference} {summary[f'{name}_over_{reference}_median']:.3f}{lib}")


def cmd_flops(args):
    """Compiled FLOPs and temporary memory: frozen step, full step, features forward only (+ variants)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xfer import models
    from xfer.models import vgg

    for size in [int(s) for s in args.sizes.split(",")]:
        images = np.zeros((cr.BATCH, size, size, 3), np.float32)
        labels = np.zeros(cr.BATCH, np.int64)
        row = {"size": size}
        for mode in ("frozen", "full"):
            for name in args.variants.split(","):
                _, _, compiled, _, _ = build_step(name, size, mode, images, labels)
                row[f"{mode}/{name}"] = round(cr.compiled_flops(compiled) / 1e9, 2)
                row[f"{mode}/{name}_temp_gb"] = round(compiled.memory_analysis().temp_size_in_bytes / 1e9, 2)
        model = models.build("vgg16", num_classes=cr.NUM_CLASSES)
        params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
        features = vgg.Features(vgg.CONFIGS["vgg16"], False)
        feats = lambda p, x: features.apply({"params": p}, x)  # noqa: E731
        row["features_forward"] = _gflops(jax.jit(feats), params["features"], images)
        row["features_forward+param_grads"] = _gflops(
            jax.jit(jax.grad(lambda p, x: feats(p, x).sum())), params["features"], images)
        row["model_forward"] = _gflops(jax.jit(lambda p, x: model.apply({"params": p}, x)), params, images)
        row["frozen_minus_features_forward"] = round(row["frozen/lib"] - row["features_forward"], 2)
        row["full_minus_frozen"] = round(row["full/lib"] - row["frozen/lib"], 2)
        print(json.dumps(row), flush=True)


def _gflops(fn, *args) -> float:
    return round(cr.compiled_flops(fn.lower(*args).compile()) / 1e9, 2)


def cmd_flags(args):
    rounds = args.rounds
    sets = {k: FLAG_SETS[k] for k in args.sets.split(",") if k} if args.sets else FLAG_SETS
    results = {}
    for r in range(rounds):
        for name, flags in sets.items():
            out = HERE / f".flags_{os.getpid()}.jsonl"
            out.unlink(missing_ok=True)
            cmd = [sys.executable, str(HERE / "classic_recipe.py"), "--sizes", str(args.size), "--modes", args.mode,
                   "--windows", str(args.windows), "--json", str(out)]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            if flags:
                cmd.append(f"--xla-flags={flags}")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-3:]
                print(f"round {r} {name}: FAILED rc={proc.returncode}: {tail}", flush=True)
                continue
            for line in map(json.loads, out.read_text().splitlines()):
                key = (line["size"], line["mode"], name)
                results.setdefault(key, []).append(line)
                print(f"round {r} {line['size']}px {line['mode']:<6} {name:<24} torch {line['torch_img_s_median']:7.2f}  "
                      f"xfer {line['xfer_img_s_median']:7.2f}  xfer/torch {line['xfer_over_torch_median']:.3f}  "
                      f"load {line['loadavg_1min_before']}", flush=True)
            out.unlink(missing_ok=True)
    print("median over rounds (xfer/torch ratio, xfer img/s, torch img/s):")
    for (size, mode, name), lines in results.items():
        print(f"  {size}px {mode:<6} {name:<24} {statistics.median(l['xfer_over_torch_median'] for l in lines):.3f}  "
              f"{statistics.median(l['xfer_img_s_median'] for l in lines):7.2f}  "
              f"{statistics.median(l['torch_img_s_median'] for l in lines):7.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("variants")
    v.add_argument("--size", type=int, default=32)
    v.add_argument("--mode", default="frozen")
    v.add_argument("--variants", default="lib,before,no_im2col,no_fold,no_pool_vjp,lib_nodonate")
    v.add_argument("--steps", type=int, default=0)
    v.add_argument("--windows", type=int, default=3)
    v.add_argument("--warmup", type=int, default=1)
    v.add_argument("--skip-torch", action="store_true")
    v.add_argument("--torch-bf16", action="store_true", help="also torch with features under bf16 autocast")
    f = sub.add_parser("flops")
    f.add_argument("--sizes", default="32,224")
    f.add_argument("--variants", default="lib,before")
    g = sub.add_parser("flags")
    g.add_argument("--size", type=int, default=32)
    g.add_argument("--mode", default="frozen")
    g.add_argument("--windows", type=int, default=2)
    g.add_argument("--steps", type=int, default=0)
    g.add_argument("--rounds", type=int, default=2)
    g.add_argument("--sets", default="", help=f"comma-separated subset of: {', '.join(FLAG_SETS)}")
    args = parser.parse_args()
    {"variants": cmd_variants, "flops": cmd_flops, "flags": cmd_flags}[args.cmd](args)


if __name__ == "__main__":
    main()
