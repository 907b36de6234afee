"""A feature cache larger than the process's memory trains at the in-memory step rate.

    python bench/feature_cache_disk.py [--rows 50000] [--steps 400] [--dtype float32] [--dir /tmp]

Writes a synthetic cache of `--rows` VGG16 `features` rows at 224 px (7x7x512
floats: 4.7 GiB for 50,000 rows, CIFAR-10's train split) through
`xfer.training.feature_cache`'s writer, then times a linear-probe SGD step fed
by the run's own grain pipeline (`xfer.data.pipeline.train_batches`) from that
cache, warm (its pages in the kernel's page cache, as after a first epoch when
the machine's RAM holds it, though the process does not) and cold (its pages
dropped first: every read from disk, as for a cache larger than RAM), and from
2,000 rows held in memory. A linear head is the hardest case
for the disk: its step is the cheapest, so reads have the least time to hide
behind. Each source trains in a fresh process, whose peak resident memory
(VmHWM) is reported; the cache should be >= 4x that, and the step rates
within 20%.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xfer

ROW_SHAPE = (7, 7, 512)  # VGG16 features at 224 px
BATCH, CLASSES, MEMORY_ROWS, WRITE_BATCH = 64, 10, 2000, 256


def _write(folder: Path, rows: int, dtype: str) -> None:
    import numpy as np

    from xfer.training import feature_cache

    def batches():
        rng = np.random.default_rng(0)
        for start in range(0, rows, WRITE_BATCH):
            index = np.arange(start, min(start + WRITE_BATCH, rows))
            yield rng.standard_normal((len(index), *ROW_SHAPE), np.float32), index % CLASSES, index

    started = time.perf_counter()
    feature_cache.cached_features(folder, {"split": "train", "dtype": dtype}, rows, batches)
    print(json.dumps({"write_s": time.perf_counter() - started}))


def _drop_from_page_cache(folder: Path) -> None:
    for shard in folder.glob("feature_cache/*/*.features"):
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _train(folder: Path, rows: int, source: str, steps: int, threads: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xfer.data import FeatureRecords, pipeline
    from xfer.data.transforms import Identity, LabelsToInt32
    from xfer.training import feature_cache

    if source != "memory":
        (cache,) = folder.glob("feature_cache/train-*")
        records = FeatureRecords(*feature_cache.read(cache, rows))
    else:
        rng = np.random.default_rng(0)
        records = FeatureRecords(rng.standard_normal((MEMORY_ROWS, *ROW_SHAPE), np.float32),
                                 np.arange(MEMORY_ROWS) % CLASSES)
    batches = pipeline.train_batches(records, Identity(), LabelsToInt32(), batch_size=BATCH, seed=0, process_index=0,
                                     process_count=1, num_threads=threads, num_workers=0)

    @jax.jit
    def step(weights, images, labels):
        def loss(w):
            logits = images.reshape(len(images), -1) @ w
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return weights - 1e-3 * jax.grad(loss)(weights)

    weights = jnp.zeros((int(np.prod(ROW_SHAPE)), CLASSES))
    for _ in range(20):  # compile, fill grain's buffer
        batch = next(batches)
        weights = step(weights, batch["image"], batch["label"])
    weights.block_until_ready()
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        weights = step(weights, batch["image"], batch["label"])
    weights.block_until_ready()
    seconds = (time.perf_counter() - started) / steps
    peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    print(json.dumps({"step_s": seconds, "peak_rss": peak}))


def _child(*args: str) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=4, help="grain's read threads (config.data.num_threads)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the cache goes (it is deleted after)")
    parser.add_argument("--role", choices=("write", "warm", "cold", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "write":
        return _write(Path(args.folder), args.rows, args.dtype)
    if args.role:
        return _train(Path(args.folder), args.rows, args.role, args.steps, args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        common = ("--folder", folder, "--rows", str(args.rows), "--steps", str(args.steps),
                  "--dtype", args.dtype, "--threads", str(args.threads))
        wrote = _child("--role", "write", *common)
        cache_bytes = sum(f.stat().st_size for f in Path(folder).glob("feature_cache/*/*"))
        warm = _child("--role", "warm", *common)
        _drop_from_page_cache(Path(folder))
        cold, memory = _child("--role", "cold", *common), _child("--role", "memory", *common)
    print(f"cache: {args.rows} rows of {ROW_SHAPE} {args.dtype}, {cache_bytes / 2**30:.2f} GiB, "
          f"written in {wrote['write_s']:.0f} s ({cache_bytes / 2**20 / wrote['write_s']:.0f} MiB/s)")
    for name, run in (("warm", warm), ("cold", cold)):
        print(f"from disk, {name}: {run['step_s'] * 1e3:7.2f} ms/step, peak RSS {run['peak_rss'] / 2**30:.2f} GiB "
              f"(the cache is {cache_bytes / run['peak_rss']:.1f}x that), "
              f"{run['step_s'] / memory['step_s']:.2f}x the in-memory step time")
    print(f"from memory:     {memory['step_s'] * 1e3:7.2f} ms/step, peak RSS {memory['peak_rss'] / 2**30:.2f} GiB "
          f"({MEMORY_ROWS} rows)")
    print(f"batch {BATCH}, {args.steps} steps each, {args.threads} read threads")


if __name__ == "__main__":
    main()
