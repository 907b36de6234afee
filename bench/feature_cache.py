"""Cached vs uncached linear probe: how much an epoch costs once the frozen backbone ran once.

    python bench/feature_cache.py [--steps 30] [--image_size 96]

Both runs are the quickstart (ImageNet EfficientNet-Lite0, head only, digits)
in this one process, back to back; the figures are steady-state seconds per
train step (compilation excluded) and the one-off cost of the feature pass.
An epoch is the same number of steps either way, so the step-time ratio is
the epoch-time ratio.
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xfer and configs

from configs import quickstart  # noqa: E402
from xfer.training import train  # noqa: E402


def _run(workdir: Path, steps: int, image_size: int, cache: str) -> tuple[dict, float]:
    config = quickstart.get_config()
    config.update_from_flattened_dict({"data.image_size": image_size, "total_steps": steps,
                                       "feature_cache": cache, "eval_every": steps,
                                       "checkpoint.every": steps, "log_every": steps})
    start = time.perf_counter()
    summary = train.run(config, workdir)
    return summary, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=96)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        results = {cache or "none": _run(Path(tmp) / (cache or "none"), args.steps, args.image_size, cache)
                   for cache in ("", "auto")}
    (uncached, uncached_wall), (cached, cached_wall) = results["none"], results["auto"]
    steps_per_epoch = -(-1437 // 64)  # digits' train split at the quickstart's batch size
    print(f"image size {args.image_size}, batch 64, {args.steps} steps each")
    print(f"uncached: {uncached['seconds_per_step'] * 1e3:9.1f} ms/step  "
          f"epoch {uncached['seconds_per_step'] * steps_per_epoch:7.1f} s  run wall {uncached_wall:6.1f} s")
    print(f"cached:   {cached['seconds_per_step'] * 1e3:9.1f} ms/step  "
          f"epoch {cached['seconds_per_step'] * steps_per_epoch:7.1f} s  run wall {cached_wall:6.1f} s "
          "(includes the one feature pass over train and eval)")
    print(f"epochs after the first: {uncached['seconds_per_step'] / cached['seconds_per_step']:.0f}x faster cached; "
          f"eval accuracy uncached {uncached['eval_accuracy']:.4f} vs cached {cached['eval_accuracy']:.4f}")


if __name__ == "__main__":
    main()
