"""Train the trainable rest of a network on features its frozen prefix computed once.

When everything up to a module (the *cut*) is frozen, in inference mode, and
the training images are not augmented, that module's output for an example
is the same in every epoch. So it is computed once per example (one batched
pass over the split on all devices) and streamed to files in the workdir,
each process its own rows, as float32 or bfloat16; training reads back only
the rows of each batch, so the cache may be larger than memory (VGG16's 224 px
features of ImageNet are 128 GB), and the train step runs only what comes
after the cut. Several processes need a workdir they all see, as for checkpoints.

It works for any model without per-model code: during a step the cut
module's `__call__` is intercepted and returns the cached batch instead of
computing (`substituted`); what fed the cut is then unused and XLA removes
it. A cut is valid only if every module that runs before it returns is
frozen, its BatchNorm layers use running statistics, and its dropout is off
(`check_cut`); `"auto"` picks the latest valid cut among the model's top
two levels of modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from xfer.learning import norms, partition
from xfer.learning.plan import FreezePlan
from xfer.scaling import preemption
from xfer.training import mesh as mesh_lib

log = logging.getLogger("xfer")

AUTO = "auto"
_AUTO_MAX_DEPTH = 2  # '_blocks/12', 'layer3', 'classifier/3': cuts that end a whole block
# How a cache stores its rows (config.feature_cache_dtype): bfloat16 halves the disk and the reads
# and rounds each feature to 8 significant bits (bench/README.md has what that costs in accuracy).
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class FeatureCacheError(ValueError):
    """The requested cut point is not a frozen prefix of the network, or caching cannot apply."""


class FeatureCacheWriteError(OSError):
    """The cache file could not be written (a full disk, a read-only workdir); it names the file."""


def substituted(cut: str, features):
    """A context in which the module at path `cut` returns `features` instead of computing."""
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and "/".join(context.module.path) == cut:
            return features
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def _call_trace(model, variable_shapes, image_size: int, train: bool = False
                ) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """(event, module path) for every module `__call__` of one forward (eval, or train), in order,
    and the paths of the Dropout modules among them."""
    events, dropouts = [], set()

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if isinstance(context.module, nn.Dropout):
            dropouts.add(path)
        events.append(("enter", path))
        out = next_fun(*args, **kwargs)
        events.append(("exit", path))
        return out

    def forward(variables, images):
        if train:
            return model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(0)},
                               mutable=["batch_stats"])
        return model.apply(variables, images, train=False)

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(forward, variable_shapes, images)
    return events, frozenset(dropouts)


def _cuts_read_by_train_only_modules(model, variable_shapes, image_size: int,
                                     eval_events) -> dict[str, str]:
    """{cut: the train-only module that makes it invalid}. A module that runs only in training
    (Inception's auxiliary classifier) reads an activation from the middle of the network; a cut
    after that point would feed it what the uncomputed prefix left behind, so training would be
    silently wrong while evaluation, which never runs it, looked right."""
    in_eval = {path for _, path in eval_events}
    train_only, blocked = None, {}
    for event, path in _call_trace(model, variable_shapes, image_size, train=True)[0]:
        if event == "enter" and train_only is None and path not in in_eval:
            train_only = path
        elif event == "exit" and train_only is not None and not _is_ancestor(path, train_only):
            blocked[path] = train_only
    return blocked


def _is_ancestor(path: str, of: str) -> bool:
    return path == "" or of.startswith(path + "/")


@dataclasses.dataclass(frozen=True)
class _Modules:
    """What decides whether a module may run before a cut."""

    owns_only_frozen: dict[str, bool]  # module path -> every parameter it owns directly is frozen
    frozen_subtrees: frozenset[str]  # modules whose whole subtree is frozen (dropout there is off)
    batch_norm_layers: frozenset[str]
    running_stats_layers: frozenset[str]
    dropouts: frozenset[str]


def _prefix_problem(cut: str, entered: list[str], modules: _Modules) -> str | None:
    """Why the modules run before `cut` returns do not form a frozen, deterministic prefix (or None)."""
    for path in entered:
        if _is_ancestor(path, cut):
            continue  # still running around the cut: its later children are not in the prefix
        if not modules.owns_only_frozen.get(path, True):
            return f"{path} runs before {cut} and has trainable parameters"
        if path in modules.batch_norm_layers and path not in modules.running_stats_layers:
            return f"BatchNorm {path} runs before {cut} on batch statistics (bn_policy 'train')"
        if path in modules.dropouts and path.rpartition("/")[0] not in modules.frozen_subtrees:
            return f"dropout {path} runs before {cut} in a trained module"
    return None


def check_cut(cut: str, model, variable_shapes, image_size: int, plan: FreezePlan) -> str:
    """The cut module path to use for `cut` (a module path or "auto"); raises if it is not a frozen prefix."""
    events, dropouts = _call_trace(model, variable_shapes, image_size)
    modules = _Modules(_owns_only_frozen(plan.labels), partition.frozen_modules(plan.labels),
                       frozenset(norms.batch_norm_paths(variable_shapes.get("batch_stats", {}))),
                       plan.running_stats_layers, dropouts)
    blocked = _cuts_read_by_train_only_modules(model, variable_shapes, image_size, events)
    entered, valid = [], []
    for event, path in events:
        if event == "enter":
            entered.append(path)
            continue
        problem = _prefix_problem(path, entered, modules) if path else None
        if path in blocked and problem is None:
            problem = f"{blocked[path]} runs only in training and reads an activation from before {path}"
        if path and problem is None:
            valid.append(path)
        elif path == cut:
            raise FeatureCacheError(f"feature_cache={cut!r} is not a frozen prefix: {problem}; cut earlier, "
                                    "use 'auto', or freeze it")
        if event == "exit" and path == cut:
            return cut
    if cut == AUTO:
        candidates = [p for p in valid if p.count("/") < _AUTO_MAX_DEPTH]
        if not candidates:
            raise FeatureCacheError("feature_cache='auto' found no frozen prefix to cache (the first module "
                                    "already trains); set config.feature_cache='' to train without a cache")
        return candidates[-1]
    shallow = [p for event, p in events if event == "exit" and p and p.count("/") < _AUTO_MAX_DEPTH]
    raise FeatureCacheError(f"feature_cache={cut!r} is not a module of the model; use 'auto' or a module "
                            f"path such as {', '.join(shallow[-6:])}")


def choose_cut(setting: str, augment: str, model, variable_shapes, image_size: int, plan: FreezePlan) -> str | None:
    """The module whose output a run caches (`config.feature_cache`: "", "auto" or a module path),
    checked before any work; None for no cache."""
    if not setting:
        return None
    if augment != "none":  # `xfer.data.Data.augment`: crop/flip, or the train step's mixup/cutmix
        raise FeatureCacheError(f"feature_cache={setting!r} needs un-augmented training images, but they are "
                                f"augmented ({augment}); set feature_cache='' or config.data.augment='none' "
                                "and config.data.mixup_alpha = cutmix_alpha = 0")
    cut = check_cut(setting, model, variable_shapes, image_size, plan)
    log.info("feature cache: training from the cached output of %s", cut)
    return cut


def choose_cuts(setting: str, augment: str, model, variable_shapes, image_size: int,
                plans: list[FreezePlan]) -> tuple[str | None, ...]:
    """`choose_cut` for each phase of a schedule (`xfer.learning.phases`): the phases that freeze a
    prefix cache it; the others train on images."""
    if len(plans) == 1:
        return (choose_cut(setting, augment, model, variable_shapes, image_size, plans[0]),)
    cuts = []
    for number, plan in enumerate(plans, 1):
        try:
            cuts.append(choose_cut(setting, augment, model, variable_shapes, image_size, plan))
        except FeatureCacheError as error:
            if augment != "none":
                raise
            log.info("feature cache: phase %d trains on images (%s)", number, error)
            cuts.append(None)
    return tuple(cuts)


def _owns_only_frozen(labels) -> dict[str, bool]:
    """{module path: True if every parameter it owns directly is frozen}."""
    frozen: dict[str, bool] = {}
    for key_path, group in jax.tree_util.tree_flatten_with_path(labels)[0]:
        module = partition.path_str(key_path).rpartition("/")[0]
        frozen[module] = frozen.get(module, True) and group == partition.FROZEN
    return frozen


def make_feature_step(model, cut: str, mesh):
    """`features(params, batch_stats, batch) -> (cut output, label, index, mask)`, inference mode.

    Split over 'data' like the batch, so each process receives only the rows it
    fed: its shard of the cache, which it writes alone (`cached_features`).
    """
    def features(params, batch_stats, batch):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        _, state = model.apply(variables, batch["image"], train=False,
                               capture_intermediates=lambda m, method: method == "__call__"
                               and "/".join(m.path) == cut)
        node = state["intermediates"]
        for part in cut.split("/"):
            node = node[part]
        return node["__call__"][0], batch["label"], batch["index"], batch["mask"]

    return jax.jit(features, out_shardings=NamedSharding(mesh, P("data")))


def cached_data(data, feature_step, cut: str, state, mesh, workdir: Path, dtype: str = "float32",
                phase: int = 1):
    """`data` (`xfer.data.Data`) over the cut's features of each split, computed once or read from the
    workdir, stored as `dtype` (a key of `DTYPES`). A later `phase` of a schedule
    (`xfer.learning.phases`) gets caches of its own: its frozen prefix may have trained before it."""
    def split_features(split: str, batches, count: int):
        return cached_features(
            workdir, {"split": split, "cut": cut, "dtype": dtype, **({"phase": phase} if phase > 1 else {})}, count,
            lambda: local_rows(feature_step, state.params, state.batch_stats, batches(), mesh))

    return data.with_features(split_features("train", data.train_pass, data.num_train),
                              split_features("eval", data.eval_batches, data.num_eval))


def local_rows(feature_step, params, batch_stats, batches, mesh) -> Iterator[tuple[np.ndarray, ...]]:
    """(features, labels, indices) of this process's real examples, batch by batch, from one pass.

    Each batch ends at a preemption boundary: a SIGTERM or Ctrl-C stops the pass there
    (`preemption.Preempted`, on every process at the same batch).
    """
    for batch in batches:
        out = feature_step(params, batch_stats, mesh_lib.global_batch(batch, mesh))
        features, label, index, mask = multihost_utils.global_array_to_host_local_array(out, mesh, P("data"))
        keep = np.asarray(mask) > 0
        yield np.asarray(features)[keep], np.asarray(label)[keep], np.asarray(index)[keep]
        preemption.raise_if_reached()


def compute(feature_step, params, batch_stats, batches, count: int, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of all `count` examples in memory, placed by each batch's "index": for a
    single process, whose rows are all of them."""
    features = labels = None
    filled = 0
    for out, label, index in local_rows(feature_step, params, batch_stats, batches, mesh):
        if features is None:
            features = np.zeros((count,) + out.shape[1:], out.dtype)
            labels = np.zeros((count,), np.int32)
        features[index], labels[index] = out, label
        filled += len(index)
    if filled != count:
        raise FeatureCacheError(f"the feature pass saw {filled} examples, expected {count}")
    return features, labels


def cached_features(workdir: Path, key: dict, count: int, rows) -> tuple[CachedRows, np.ndarray]:
    """The `count` feature rows and labels of a split, read from `workdir/feature_cache` when a cache
    for `key` (its "split", and its "dtype", a key of `DTYPES`) is complete there, else first written
    there from `rows()`: this process's batches of `local_rows`.

    Each process streams its own rows to its own shard file, so none holds more
    than a batch of them. The shards are written in a folder beside the cache's
    name, which process 0 renames to that name once every process has finished
    its shard: a killed or failed run never leaves a folder that a resumed run
    would trust. Partial files go whenever a write fails or is interrupted; a
    folder a SIGKILL left behind is removed by the next attempt.

    With several processes each removes only its own files: the forward pass has
    no collective, so process 0 can reach the stopping batch while another has
    not yet opened its shard, and removing the folder then made that process fail
    (seen on a loaded 2-core CI run). After a stop, which every process makes at
    the same batch, process 0 removes the emptied folder once all have left it.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = workdir / "feature_cache" / f"{key['split']}-{digest}"
    if directory.exists():
        log.info("feature cache: loaded %s", directory)
        return read(directory, count)
    tmp = directory.with_name(directory.name + ".tmp")
    process, processes = jax.process_index(), jax.process_count()
    shard = tmp / f"shard-{process:05d}-of-{processes:05d}"
    try:
        if process == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed run's partial folder: free its space first
            tmp.mkdir(parents=True)
        _all_processes_reach("feature cache: folder made")
        # Each process owns its files, kept until the folder has its name; a lone process the folder.
        own = [tmp] if processes == 1 else [shard.with_suffix(".features"), shard.with_suffix(".npz")]
        with contextlib.ExitStack() as scratch:
            for path in own:
                scratch.enter_context(preemption.scratch(path))
            written = _write_shard(shard, rows(), -(-count // processes), key["dtype"])
            _all_processes_reach("feature cache: shards written")
            if process == 0:
                with preemption.uninterruptible():
                    tmp.rename(directory)
            _all_processes_reach("feature cache: complete")
    except preemption.Preempted:
        if processes > 1:
            _all_processes_reach("feature cache: stopped")
            if process == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as error:
        message = (f"could not write the feature cache {directory}: {error.strerror or error}; "
                   "free space there (or fix the workdir) and rerun the same command")
        raise FeatureCacheWriteError(*((error.errno, message) if error.errno else (message,))) from None
    log.info("feature cache: wrote %s (%.1f MiB from this process)", directory, written / 2**20)
    return read(directory, count)


def _all_processes_reach(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _write_shard(shard: Path, batches, max_rows: int, dtype: str) -> int:
    """Streams the rows of `batches` to `shard`.features as `dtype`, raw and in pass order, then
    their positions and labels, the dtype and row shape to `shard`.npz; returns the rows' bytes.
    Checks at the first batch that the disk has room for `max_rows`, to fail before filling it."""
    positions, labels, row_shape, written = [], [], None, 0
    fd = os.open(shard.with_suffix(".features"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for features, label, index in batches:
            rows = np.ascontiguousarray(features, DTYPES[dtype])
            if row_shape is None:
                row_shape = rows.shape[1:]
                _check_space(shard.parent, max_rows * math.prod(row_shape) * rows.itemsize)
            view = memoryview(rows.reshape(-1).view(np.uint8))
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
            written += rows.nbytes
            positions.append(index)
            labels.append(label)
        os.fsync(fd)  # on disk before the folder is renamed into the name that says complete
    finally:
        os.close(fd)
    np.savez(shard.with_suffix(".npz"), index=np.concatenate(positions).astype(np.int64),
             labels=np.concatenate(labels).astype(np.int32), dtype=np.str_(dtype), row_shape=np.asarray(row_shape))
    return written


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: this process's shard needs {needed / 2**30:.2f} GiB, "
                                    f"{free / 2**30:.2f} GiB is free")


def read(directory: Path, count: int) -> tuple[CachedRows, np.ndarray]:
    """A complete cache folder's `count` rows (read from disk as they are asked for) and labels."""
    metas = sorted(directory.glob("shard-*.npz"))
    positions, labels = [], []
    for path in metas:
        with np.load(path) as meta:
            positions.append(meta["index"])
            labels.append(meta["labels"])
            dtype, row_shape = str(meta["dtype"]), tuple(int(n) for n in meta["row_shape"])
    order = np.concatenate(positions) if metas else np.zeros(0, np.int64)
    if not np.array_equal(np.sort(order), np.arange(count)):
        raise FeatureCacheError(f"the feature cache {directory} does not hold each of the split's {count} examples "
                                "once; delete it and rerun to compute it again")
    shard_of, row_of, all_labels = np.empty(count, np.int32), np.empty(count, np.int64), np.empty(count, np.int32)
    shard_of[order] = np.repeat(np.arange(len(metas), dtype=np.int32), [len(p) for p in positions])
    row_of[order] = np.concatenate([np.arange(len(p)) for p in positions])
    all_labels[order] = np.concatenate(labels)
    files = [str(path.with_suffix(".features")) for path in metas]
    return CachedRows(files, dtype, row_shape, shard_of, row_of), all_labels


class CachedRows:
    """Random access, by example position, to the rows of a cache folder, each read from its shard
    file when asked for and returned as float32.

    Reads go through the kernel's page cache, which it fills from free memory and
    reclaims under pressure, not through this process's memory (a memory map would
    count every page it touched as resident): a cache larger than memory trains.
    """

    def __init__(self, files: list[str], dtype: str, row_shape: tuple[int, ...], shard_of: np.ndarray,
                 row_of: np.ndarray):
        self._files, self._dtype, self._row_shape = files, DTYPES[dtype], row_shape
        self._shard_of, self._row_of = shard_of, row_of
        self._row_bytes = math.prod(row_shape) * np.dtype(self._dtype).itemsize
        self._pid, self._fds = os.getpid(), {}

    def __len__(self) -> int:
        return len(self._shard_of)

    def __getitem__(self, position: int) -> np.ndarray:
        shard = self._shard_of[position]
        data = os.pread(self._fd(shard), self._row_bytes, int(self._row_of[position]) * self._row_bytes)
        if len(data) != self._row_bytes:
            raise FeatureCacheError(f"{self._files[shard]} ends early; delete its folder and rerun to compute "
                                    "the cache again")
        return np.frombuffer(data, self._dtype).reshape(self._row_shape).astype(np.float32, copy=False)

    def _fd(self, shard: int) -> int:
        """This process's descriptor of a shard file, opened once (a forked grain worker opens its own)."""
        if self._pid != os.getpid():
            self._pid, self._fds = os.getpid(), {}
        if shard not in self._fds:
            self._fds[shard] = os.open(self._files[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getstate__(self) -> dict:  # descriptors do not cross processes
        return {**self.__dict__, "_pid": None, "_fds": {}}

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


def inputs(cut: str, image_size: int):
    """`xfer.training.step.ModelInputs` for a batch whose "image" holds the cut's cached output:
    zero images (what fed the cut is unused, so XLA removes it) with the features substituted."""
    def cached(batch):
        images = jnp.zeros((batch["image"].shape[0], image_size, image_size, 3), jnp.float32)
        return images, substituted(cut, batch["image"])

    return cached
