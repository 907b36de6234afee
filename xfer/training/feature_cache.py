"""Train the trainable rest of a network on features its frozen prefix computed once.

When everything up to a module (the *cut*) is frozen, in inference mode, and
the training images are not augmented, that module's output for an example
is the same in every epoch. So it is computed once per example (one batched
pass over the split on all devices), kept in host memory and saved in the
workdir, and the train step runs only what comes after the cut.

It works for any model without per-model code: during a step the cut
module's `__call__` is intercepted and returns the cached batch instead of
computing (`substituted`); what fed the cut is then unused and XLA removes
it. A cut is valid only if every module that runs before it returns is
frozen, its BatchNorm layers use running statistics, and its dropout is off
(`check_cut`); `"auto"` picks the latest valid cut among the model's top
two levels of modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xfer.learning import norms, partition
from xfer.learning.plan import FreezePlan
from xfer.scaling import preemption
from xfer.training import mesh as mesh_lib

log = logging.getLogger("xfer")

AUTO = "auto"
_AUTO_MAX_DEPTH = 2  # '_blocks/12', 'layer3', 'classifier/3': cuts that end a whole block


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


def _call_trace(model, variable_shapes, image_size: int) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """(event, module path) for every module `__call__` of one eval forward, in order, and the
    paths of the Dropout modules among them."""
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

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variable_shapes, images)
    return events, frozenset(dropouts)


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
    entered, valid = [], []
    for event, path in events:
        if event == "enter":
            entered.append(path)
        elif path and _prefix_problem(path, entered, modules) is None:
            valid.append(path)
        elif path == cut:
            raise FeatureCacheError(f"feature_cache={cut!r} is not a frozen prefix: "
                                    f"{_prefix_problem(path, entered, modules)}; cut earlier, use 'auto', "
                                    "or freeze it")
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
    if augment != "none":
        raise FeatureCacheError(f"feature_cache={setting!r} needs un-augmented training images, but "
                                f"config.data.augment={augment!r}; set config.data.augment='none' or feature_cache=''")
    cut = check_cut(setting, model, variable_shapes, image_size, plan)
    log.info("feature cache: training from the cached output of %s", cut)
    return cut


def _owns_only_frozen(labels) -> dict[str, bool]:
    """{module path: True if every parameter it owns directly is frozen}."""
    frozen: dict[str, bool] = {}
    for key_path, group in jax.tree_util.tree_flatten_with_path(labels)[0]:
        module = partition.path_str(key_path).rpartition("/")[0]
        frozen[module] = frozen.get(module, True) and group == partition.FROZEN
    return frozen


def make_feature_step(model, cut: str, mesh):
    """`features(params, batch_stats, batch) -> (cut output, label, index, mask)`, inference mode.

    Replicated, so every process gets every row of the global batch (each
    process keeps the whole cache); the batch's own columns come along for that.
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

    return jax.jit(features, out_shardings=NamedSharding(mesh, P()))


def cached_data(data, feature_step, cut: str, state, mesh, workdir: Path):
    """`data` (`xfer.data.Data`) over the cut's features of each split, computed once or read from the workdir."""
    def split_features(split: str, batches, count: int):
        return cached_features(
            workdir, {"split": split, "cut": cut},
            lambda: compute(feature_step, state.params, state.batch_stats, batches(), count, mesh))

    return data.with_features(split_features("train", data.train_pass, data.num_train),
                              split_features("eval", data.eval_batches, data.num_eval))


def compute(feature_step, params, batch_stats, batches, count: int, mesh) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of `count` examples, placed by each batch's "index", from one pass.

    Each batch ends at a preemption boundary: a SIGTERM or Ctrl-C stops the pass there
    (`preemption.Preempted`, on every process at the same batch), and nothing is written.
    """
    features = labels = None
    filled = 0
    for batch in batches:
        out, label, index, mask = jax.device_get(feature_step(params, batch_stats, mesh_lib.global_batch(batch, mesh)))
        if features is None:
            features = np.zeros((count,) + out.shape[1:], out.dtype)
            labels = np.zeros((count,), np.int32)
        keep = mask > 0
        features[index[keep]] = out[keep]
        labels[index[keep]] = label[keep]
        filled += int(keep.sum())
        preemption.raise_if_reached()
    if filled != count:
        raise FeatureCacheError(f"the feature pass saw {filled} examples, expected {count}")
    return features, labels


def cached_features(workdir: Path, key: dict, build) -> tuple[np.ndarray, np.ndarray]:
    """`build()`'s (features, labels), saved under `workdir/feature_cache`, reused when `key` matches.

    Only process 0 writes; the file is written whole beside its name, then
    renamed, so a killed run never leaves a partial cache that a resumed run
    would trust. The temporary file goes whenever the write fails or is
    interrupted; one a SIGKILL left behind is removed by the next attempt.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = workdir / "feature_cache" / f"{key['split']}-{digest}.npz"
    if path.exists():
        with np.load(path) as saved:
            log.info("feature cache: loaded %s", path)
            return saved["features"], saved["labels"]
    tmp = path.with_name(path.name + ".tmp.npz")
    is_writer = jax.process_index() == 0
    if is_writer:
        tmp.unlink(missing_ok=True)  # a killed run's partial file: free its space before the pass
    features, labels = build()
    if is_writer:
        _write(path, tmp, features, labels)
        log.info("feature cache: wrote %s (%.1f MiB)", path, features.nbytes / 2**20)
    return features, labels


def _write(path: Path, tmp: Path, features: np.ndarray, labels: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with preemption.scratch(tmp):
            np.savez(tmp, features=features, labels=labels)
            with preemption.uninterruptible():
                tmp.rename(path)
    except OSError as error:
        mib = (features.nbytes + labels.nbytes) / 2**20
        message = (f"could not write the feature cache {path} ({mib:.1f} MiB): "
                   f"{error.strerror or error}; free space there (or fix the workdir) and rerun the same command")
        raise FeatureCacheWriteError(*((error.errno, message) if error.errno else (message,))) from None


def inputs(cut: str, image_size: int):
    """`xfer.training.step.ModelInputs` for a batch whose "image" holds the cut's cached output:
    zero images (what fed the cut is unused, so XLA removes it) with the features substituted."""
    def cached(batch):
        images = jnp.zeros((batch["image"].shape[0], image_size, image_size, 3), jnp.float32)
        return images, substituted(cut, batch["image"])

    return cached
