"""Where the time goes: VGG16's convolutions and its big Dense layer, XLA against torch, per op.

    python bench/primitives.py [--size 32] [--xla-flags=...] [--layouts NHWC,NCHW]

Each op is timed on both sides in alternation in this one process (median of --repeats), forward
only and forward + both gradients (what a full fine-tuning step does per conv). Prints GFLOP/s and
the xla/torch ratio per op, then the totals over the 13 convolutions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--xla-flags", default="")
    p.add_argument("--layouts", default="NHWC", help="XLA layouts to time: NHWC, NCHW")
    p.add_argument("--bf16", action="store_true", help="also time XLA in bfloat16")
    p.add_argument("--kinds", default="fwd,fwd+bwd", help="fwd, fwd+bwd")
    p.add_argument("--no-dense", action="store_true", help="skip classifier/0")
    return p.parse_args(argv)


CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def conv_shapes(size):
    shapes, c_in, hw = [], 3, size
    for v in CFG16:
        if v == "M":
            hw //= 2
            continue
        shapes.append((hw, c_in, v))
        c_in = v
    return shapes


def med_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(2)
    print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""), flush=True)
    rng = np.random.RandomState(0)
    n = args.batch
    layouts = [l for l in args.layouts.split(",") if l]
    dtypes = [jnp.float32] + ([jnp.bfloat16] if args.bf16 else [])
    totals = {}

    def add(key, t):
        totals[key] = totals.get(key, 0.0) + t

    print(f"{'op':<34}{'torch GF/s':>11}" + "".join(f"{l + ('/bf16' if d == jnp.bfloat16 else ''):>14}"
                                                    for l in layouts for d in dtypes), flush=True)
    for kind in [k for k in args.kinds.split(",") if k]:
        for hw, c_in, c_out in conv_shapes(args.size):
            x = rng.standard_normal((n, hw, hw, c_in)).astype(np.float32)
            w = (rng.standard_normal((3, 3, c_in, c_out)) * 0.01).astype(np.float32)
            flops = 2 * n * hw * hw * c_in * c_out * 9 * (1 if kind == "fwd" else 3)
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(kind != "fwd")
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(kind != "fwd")

            def t_torch():
                if kind == "fwd":
                    with torch.no_grad():
                        torch.nn.functional.conv2d(xt, wt, padding=1)
                else:
                    out = torch.nn.functional.conv2d(xt, wt, padding=1)
                    torch.autograd.grad(out, (xt, wt), torch.ones_like(out))

            sides = {"torch": t_torch}
            for layout in layouts:
                for dtype in dtypes:
                    if layout == "NHWC":
                        xj, wj, dn = jnp.asarray(x, dtype), jnp.asarray(w, dtype), ("NHWC", "HWIO", "NHWC")
                    else:
                        xj = jnp.asarray(x.transpose(0, 3, 1, 2), dtype)
                        wj = jnp.asarray(w.transpose(3, 2, 0, 1), dtype)
                        dn = ("NCHW", "OIHW", "NCHW")
                    conv = lambda a, b, dn=dn: jax.lax.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)),
                                                                               dimension_numbers=dn)
                    if kind == "fwd":
                        f = jax.jit(conv)
                    else:
                        f = jax.jit(jax.grad(lambda a, b, conv=conv: conv(a, b).astype(jnp.float32).sum(), (0, 1)))
                    jax.block_until_ready(f(xj, wj))
                    sides[(layout, dtype)] = lambda f=f, xj=xj, wj=wj: jax.block_until_ready(f(xj, wj))
            for fn in sides.values():
                fn()
            times = {k: [] for k in sides}
            for _ in range(args.repeats):
                for k, fn in sides.items():
                    times[k].append(med_time(fn, 1))
            med = {k: statistics.median(v) for k, v in times.items()}
            for k, t in med.items():
                add((kind, k), t)
            cells = "".join(f"{flops / med[(l, d)] / 1e9:8.1f} x{med['torch'] / med[(l, d)]:.2f}"
                            for l in layouts for d in dtypes)
            print(f"{kind} conv {hw:>3}px {c_in:>3}->{c_out:<3}{'':>12}{flops / med['torch'] / 1e9:11.1f}{cells}",
                  flush=True)
        base = totals[(kind, "torch")]
        print(f"{kind} 13 convs total: torch {base * 1e3:.0f} ms; " + "; ".join(
            f"{l}{'/bf16' if d == jnp.bfloat16 else ''} {totals[(kind, (l, d))] * 1e3:.0f} ms "
            f"(xla/torch speed {base / totals[(kind, (l, d))]:.2f})" for l in layouts for d in dtypes), flush=True)

    if args.no_dense:
        return
    # classifier/0: (n, 25088) @ (25088, 4096), forward and kernel gradient.
    a = rng.standard_normal((n, 25088)).astype(np.float32)
    k = (rng.standard_normal((25088, 4096)) * 0.01).astype(np.float32)
    at, kt = torch.from_numpy(a), torch.from_numpy(k.T.copy())
    aj, kj = jnp.asarray(a), jnp.asarray(k)
    mm = jax.jit(lambda a, k: a @ k)
    mm_t = jax.jit(lambda a, g: a.T @ g)
    g = jnp.ones((n, 4096))
    gt = torch.ones(n, 4096)
    jax.block_until_ready((mm(aj, kj), mm_t(aj, g)))
    sides = {"torch fwd": lambda: torch.nn.functional.linear(at, kt), "xla fwd": lambda: jax.block_until_ready(mm(aj, kj)),
             "torch dW": lambda: gt.T @ at, "xla dW": lambda: jax.block_until_ready(mm_t(aj, g))}
    times = {k_: [] for k_ in sides}
    for _ in range(args.repeats):
        for k_, fn in sides.items():
            times[k_].append(med_time(fn, 1))
    flops = 2 * n * 25088 * 4096
    for k_, v in times.items():
        print(f"classifier/0 {k_:<10} {statistics.median(v) * 1e3:7.1f} ms  {flops / statistics.median(v) / 1e9:6.1f} GF/s")


if __name__ == "__main__":
    main()
