"""Port a PyTorch state dict into Flax variables through an explicit name map.

Each model family writes its map as a readable list of layer-level calls
(`conv(...)`, `batchnorm(...)`, `dense(...)`), one per torch module, in the
style of jax-resnet's `pretrained.py`. `port` then applies the map strictly:
every source tensor must be used and every Flax variable filled, so a file
for the wrong architecture fails loudly instead of half-loading.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

log = logging.getLogger("xfer")

# Source keys no Flax variable corresponds to: BatchNorm's step counter.
_DROPPED_SUFFIXES = (".num_batches_tracked",)
_MAX_LISTED = 8


class WeightMismatchError(ValueError):
    """The checkpoint does not fit the model: missing, unused or misshapen tensors."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One torch tensor -> one Flax variable, e.g. `features.0.weight` -> `params/features/0/kernel`."""

    source: str
    target: str  # '/'-joined, collection first
    transform: str  # human-readable name of `fn`, shown in the mapping table
    fn: Callable[[np.ndarray], np.ndarray]
    # For a tensor whose shape follows a setting rather than the architecture (a ViT's position
    # embedding follows the input resolution): `resize(value, target_shape)` fits `fn`'s result
    # to the model's variable. Applied only when the shapes differ, and logged.
    resize: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = None
    resize_name: str = ""  # human-readable, appended to `transform` in the table when applied


@dataclasses.dataclass(frozen=True)
class WeightMap:
    """A family's whole map, plus which targets form the classification head.

    Head targets may differ in shape from the source (a new `num_classes`):
    those are kept from the fresh initialisation instead of being an error.
    """

    entries: tuple[Entry, ...]
    # The model's registered head regex (xfer.models.ModelInfo.head), over target paths without
    # their collection: '^classifier/6/' takes 'params/classifier/6/kernel'.
    head: str | None = None
    # (regex, replacement) pairs that bring keys of files saved under a module's older names to
    # today's before matching, as torch's `_load_from_state_dict` hooks do: torchvision's ViT
    # files predate its MLP rename (`mlp.linear_1` is today's `mlp.0`).
    legacy_names: tuple[tuple[str, str], ...] = ()
    # The published checkpoint may be a backbone without a head (timm's DINOv2 files, saved with
    # num_classes=0): head entries whose source is absent are then freshly initialised, as for
    # another class count, instead of missing. A file that has them still ports them.
    head_optional: bool = False
    # A regex over target paths (no collection) of parts a model has only under some settings
    # (Inception v3's '^AuxLogits/', absent with aux_logits=False): where the model lacks such a
    # target, its source tensor is skipped on purpose and listed in the report, not an error.
    optional: str | None = None


@dataclasses.dataclass(frozen=True)
class PortReport:
    """What `port` did, for the mapping table and the log."""

    rows: tuple[tuple[str, tuple, str, tuple, str], ...]  # source, shape, target, shape, transform
    new_head: tuple[str, ...]  # targets left freshly initialised
    skipped: tuple[str, ...] = ()  # sources of `WeightMap.optional` targets the model does not have

    def table(self) -> str:
        header = ("torch key", "shape", "flax variable", "shape", "transform")
        rows = [header] + [(s, format_shape(ss), t, format_shape(ts), tr) for s, ss, t, ts, tr in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [f"{t}  freshly initialised (new head)" for t in self.new_head]
        return "\n".join(lines)


def format_shape(shape) -> str:
    return str(tuple(int(n) for n in shape)).replace(" ", "")


# --- transforms -------------------------------------------------------------

def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    """torch Conv2d (out, in/groups, kh, kw) -> Flax Conv (kh, kw, in/groups, out).

    Depthwise convs need nothing extra: torch (C, 1, kh, kw) becomes Flax's
    grouped kernel (kh, kw, 1, C) with `feature_group_count=C`.
    """
    return np.transpose(w, (2, 3, 1, 0))


def transpose(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> Flax Dense (in, out)."""
    return np.transpose(w)


def copy(w: np.ndarray) -> np.ndarray:
    return w


def nchw_flatten_to_nhwc(channels: int, height: int, width: int):
    """A Dense kernel fed by torch's (C, H, W) flatten, re-ordered for an NHWC (H, W, C) flatten.

    Permuting this kernel's rows once is free; transposing activations on
    every step is not.
    """
    def fn(w: np.ndarray) -> np.ndarray:
        out = w.shape[0]
        return (w.T.reshape(channels, height, width, out)
                .transpose(1, 2, 0, 3).reshape(height * width * channels, out))
    return fn


# --- layer-level map builders ----------------------------------------------

def _path(*parts: str) -> str:
    return "/".join(parts)


def conv(source: str, target: str, bias: bool = True) -> list[Entry]:
    entries = [Entry(f"{source}.weight", _path("params", target, "kernel"), "OIHW->HWIO", oihw_to_hwio)]
    if bias:
        entries.append(Entry(f"{source}.bias", _path("params", target, "bias"), "copy", copy))
    return entries


def batchnorm(source: str, target: str) -> list[Entry]:
    """Affine parameters to `params`, running statistics to `batch_stats`."""
    return [
        Entry(f"{source}.weight", _path("params", target, "scale"), "copy", copy),
        Entry(f"{source}.bias", _path("params", target, "bias"), "copy", copy),
        Entry(f"{source}.running_mean", _path("batch_stats", target, "mean"), "copy", copy),
        Entry(f"{source}.running_var", _path("batch_stats", target, "var"), "copy", copy),
    ]


def layernorm(source: str, target: str) -> list[Entry]:
    return [
        Entry(f"{source}.weight", _path("params", target, "scale"), "copy", copy),
        Entry(f"{source}.bias", _path("params", target, "bias"), "copy", copy),
    ]


def dense(source: str, target: str, kernel_fn=transpose, kernel_transform="transpose") -> list[Entry]:
    return [
        Entry(f"{source}.weight", _path("params", target, "kernel"), kernel_transform, kernel_fn),
        Entry(f"{source}.bias", _path("params", target, "bias"), "copy", copy),
    ]


def flatten(groups: Iterable[list[Entry]]) -> tuple[Entry, ...]:
    return tuple(e for group in groups for e in group)


# --- applying a map ---------------------------------------------------------

def port(state_dict: Mapping[str, np.ndarray], weight_map: WeightMap, variables: Mapping,
         model_name: str = "the model") -> tuple[dict, PortReport]:
    """Returns `variables` with every mapped tensor replaced by its ported source.

    `variables` is a freshly initialised Flax variable dict: it fixes the
    target shapes and supplies the new head when `num_classes` differs.
    """
    targets = traverse_util.flatten_dict(dict(variables), sep="/")
    state_dict = _current_names(state_dict, weight_map.legacy_names)
    head = re.compile(weight_map.head) if weight_map.head else None
    optional = re.compile(weight_map.optional) if weight_map.optional else None
    ported, rows, new_head, resized, skipped, problems = {}, [], [], [], [], []
    used = set()
    for e in weight_map.entries:
        if e.source not in state_dict:
            if weight_map.head_optional and head and head.search(e.target.split("/", 1)[1]):
                new_head.append(e.target)
            else:
                problems.append(f"missing {e.source} (for {e.target})")
            continue
        used.add(e.source)
        if e.target not in targets:
            if optional and optional.search(e.target.split("/", 1)[1]):
                skipped.append(e.source)
                continue
            problems.append(f"{e.source} maps to {e.target}, which {model_name} does not have")
            continue
        source = np.asarray(state_dict[e.source])
        want = tuple(targets[e.target].shape)
        try:
            value = np.asarray(e.fn(source))
        except ValueError:  # e.g. a 1-D BatchNorm weight where a conv kernel was expected
            problems.append(f"{e.source} {format_shape(source.shape)} -> {e.target} needs {format_shape(want)} "
                            f"but {e.transform} does not apply")
            continue
        transform = e.transform
        if value.shape != want and e.resize is not None:
            try:
                value = np.asarray(e.resize(value, want))
            except ValueError as error:
                problems.append(f"{e.source} {format_shape(source.shape)} -> {e.target} needs "
                                f"{format_shape(want)} but {e.resize_name} does not apply: {error}")
                continue
            transform = f"{e.transform} + {e.resize_name}"
            resized.append(f"{e.source} {format_shape(source.shape)} -> {format_shape(want)} by {e.resize_name}")
        if value.shape != want:
            if head and head.search(e.target.split("/", 1)[1]):
                new_head.append(e.target)
                continue
            problems.append(f"{e.source} {format_shape(source.shape)} -> {e.target} "
                            f"needs {format_shape(want)} but gives {format_shape(value.shape)}")
            continue
        ported[e.target] = value.astype(targets[e.target].dtype)
        rows.append((e.source, source.shape, e.target, want, transform))

    unused = sorted(k for k in state_dict if k not in used and not k.endswith(_DROPPED_SUFFIXES))
    problems += [f"unused {k} {format_shape(state_dict[k].shape)}" for k in unused]
    unfilled = sorted(set(targets) - set(ported) - set(new_head))
    problems += [f"{t} {format_shape(targets[t].shape)} not filled" for t in unfilled]
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise WeightMismatchError(
            f"checkpoint does not fit {model_name}: {len(problems)} mismatches: {listed}{more}. "
            "Is the file for another architecture (e.g. with/without BatchNorm)?")
    for line in resized:
        log.info("%s: resized %s", model_name, line)
    if new_head:
        log.info("%s: new head, freshly initialised (checkpoint head has another class count, or none): %s",
                 model_name, ", ".join(new_head))
    if skipped:
        log.info("%s: %d tensors skipped, for parts this model is built without: %s", model_name, len(skipped),
                 ", ".join(skipped))
    merged = {t: ported.get(t, targets[t]) for t in targets}
    return traverse_util.unflatten_dict(merged, sep="/"), PortReport(tuple(rows), tuple(new_head), tuple(skipped))


def _current_names(state_dict: Mapping[str, np.ndarray], legacy_names: tuple[tuple[str, str], ...]
                   ) -> Mapping[str, np.ndarray]:
    """`state_dict` with every key rewritten by `legacy_names`; an error where two keys meet."""
    if not legacy_names:
        return state_dict
    renamed = {}
    for key, value in state_dict.items():
        current = key
        for pattern, replacement in legacy_names:
            current = re.sub(pattern, replacement, current)
        if current in renamed:
            raise WeightMismatchError(f"checkpoint holds {current} twice, under its current and a legacy name")
        renamed[current] = value
    return renamed
