"""The reference a trained linear probe is held to: logistic regression on the frozen backbone's features.

    python bench/logreg_probe.py --data ../shared/data/cifar10_subset            # Lite0, 96 px

The ImageNet backbone runs once in inference mode over the folder's train/ and
val/ splits through xfer's own data pipeline (un-augmented: the central square
resized to --image_size, ImageNet normalisation), and the head's input (Lite0:
the pooled 1280 features) is kept. scikit-learn's LogisticRegression (L-BFGS,
multinomial, features standardised on train) is then fitted at several inverse
regularisation strengths C; each one's val accuracy is printed, so the best of
them is an upper reference (C chosen on val), the C=1 figure a plain one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xfer and configs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a folder with train/ and val/ of class folders")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--cs", default="0.01,0.1,1,10", help="inverse regularisation strengths to fit")
    return parser.parse_args(argv)


def head_inputs(model, head_path: str, mesh):
    """`step(params, batch_stats, batch) -> (input of the head module, label, index, mask)`, jitted."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    def step(params, batch_stats, batch):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and "/".join(context.module.path) == head_path:
                captured["x"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
        return captured["x"], batch["label"], batch["index"], batch["mask"]

    return jax.jit(step, out_shardings=NamedSharding(mesh, P()))


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from xfer import data as data_lib, models
    from xfer.training import feature_cache, mesh as mesh_lib
    from xfer.weights.initialise import initial_variables

    info = models.info(args.model)
    data = data_lib.build(data_lib.config_dict(source="folder", path=args.data, image_size=args.image_size,
                                               augment="none"), info, 100, 0)
    model = models.build(args.model, num_classes=data.num_classes)
    variables = initial_variables(model, args.model, "imagenet", args.image_size, 0, head_zero_init=True)
    mesh = mesh_lib.data_mesh()
    step = head_inputs(model, info.head.strip("^/"), mesh)
    start = time.perf_counter()
    (x_train, y_train), (x_val, y_val) = (
        feature_cache.compute(step, variables["params"], variables.get("batch_stats", {}), batches(), count, mesh)
        for batches, count in ((data.train_pass, data.num_train), (data.eval_batches, data.num_eval)))
    print(f"{args.model} at {args.image_size} px: {x_train.shape[1]} features of {len(x_train)} train and "
          f"{len(x_val)} val images in {time.perf_counter() - start:.0f} s", flush=True)
    scaler = StandardScaler().fit(x_train)
    x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
    for c in [float(c) for c in args.cs.split(",")]:
        start = time.perf_counter()
        probe = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
        print(f"C={c:<6g} train accuracy {probe.score(x_train, y_train):.3f}  "
              f"val accuracy {np.mean(probe.predict(x_val) == y_val):.3f}  ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
