"""Which parameters learn, and in which group: ordered (regex, group) rules.

Fine-tuning is mostly a decision about what stays fixed. Researchers write it as
rules against '/'-joined Flax parameter paths (`features/0/kernel`,
`classifier/6/bias`), the torchvision module names a PyTorch user already knows:

    config.partition = (("^features/", "frozen"), (".*", "head"))

Each path takes the group of the first rule whose regex `re.search`es it. The
rules are checked strictly, because a typo in a freeze regex does not crash; it
silently trains the wrong model:
  - every parameter must be covered (no implicit default group);
  - every rule must win at least one parameter: a rule that matches nothing, or
    only paths that earlier rules already took, is dead and is an error.

Forms accepted for `rules` (a sequence, in priority order):
  - (regex, group) pairs, as tuples or lists. Write a tuple of tuples in a
    config: ml_collections can override a tuple field from the command line,
    `--config.partition="(('^classifier/', 'head'), ('.*', 'frozen'))"`, but not
    a list field.
  - "regex:group" strings, split at the last ':'. This is what repeated flags
    produce: `--config.partition='^classifier/:head' --config.partition='.*:frozen'`.

The group named `FROZEN` is built in: `xfer.learning.optim` gives it `set_to_zero`, no
optimizer state, and keeps it out of clipping and gradient norms.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
import optax

FROZEN = "frozen"


class PartitionError(ValueError):
    """A partition rule set that does not assign every parameter exactly one live group."""


def path_str(key_path) -> str:
    """'/'-joined path of a pytree key path: ('features', '0', 'kernel') -> 'features/0/kernel'."""
    return "/".join(_key_name(key) for key in key_path)


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def parse_rules(rules: Sequence) -> list[tuple[re.Pattern, str]]:
    """Compiles rules given in any accepted form (see the module docstring)."""
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise PartitionError(
            f"partition rules must be a sequence of (regex, group) pairs, got {rules!r}; "
            "write e.g. (('^features/', 'frozen'), ('.*', 'head'))")
    return [_parse_rule(index, rule) for index, rule in enumerate(rules)]


def _parse_rule(index: int, rule) -> tuple[re.Pattern, str]:
    if isinstance(rule, str):
        regex, separator, group = rule.rpartition(":")
        if not separator:
            raise PartitionError(
                f"partition rule {index} {rule!r} has no group: write 'regex:group', e.g. '{rule}:frozen'")
    elif isinstance(rule, Sequence) and len(rule) == 2 and all(isinstance(part, str) for part in rule):
        regex, group = rule
    else:
        raise PartitionError(
            f"partition rule {index} {rule!r} is not a (regex, group) pair of strings "
            "or a 'regex:group' string")
    if not group:
        raise PartitionError(f"partition rule {index} {rule!r} has an empty group name")
    try:
        return re.compile(regex), group
    except re.error as error:
        raise PartitionError(
            f"partition rule {index} has an invalid regex {regex!r}: {error}; fix or escape it") from None


def labels(params, rules: Sequence):
    """Same-structured pytree of group names for `params` (e.g. variables['params'])."""
    compiled = parse_rules(rules)
    paths = [path_str(key_path) for key_path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    winners = [_first_match(compiled, path) for path in paths]
    _check_covered(paths, winners)
    _check_no_dead_rules(compiled, paths, winners)
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(treedef, [compiled[winner][1] for winner in winners])


def _first_match(compiled, path: str) -> int | None:
    return next((index for index, (regex, _) in enumerate(compiled) if regex.search(path)), None)


def _check_covered(paths: list[str], winners: list[int | None]) -> None:
    uncovered = [path for path, winner in zip(paths, winners) if winner is None]
    if uncovered:
        shown = ", ".join(uncovered[:3]) + (", ..." if len(uncovered) > 3 else "")
        raise PartitionError(
            f"{len(uncovered)} parameters match no partition rule ({shown}); "
            "add a rule such as ('.*', 'frozen') at the end")


def _check_no_dead_rules(compiled, paths: list[str], winners: list[int | None]) -> None:
    for index, (regex, group) in enumerate(compiled):
        if index in winners:
            continue
        matched = [(path, winner) for path, winner in zip(paths, winners) if regex.search(path)]
        rule = f"partition rule {index} ({regex.pattern!r}, {group!r})"
        if matched:
            taken_by = sorted({winner for _, winner in matched})
            raise PartitionError(
                f"{rule} wins no parameter: every path it matches (e.g. {matched[0][0]}) is taken by "
                f"earlier rule(s) {taken_by}; move it before them or remove it")
        raise PartitionError(
            f"{rule} matches no parameter; closest paths: {', '.join(closest_paths(regex.pattern, paths))}")


def closest_paths(pattern: str, paths: list[str]) -> list[str]:
    """Module prefixes and paths that look most like a regex, for error messages."""
    candidates = sorted({"/".join(path.split("/")[:depth]) + "/"
                         for path in paths for depth in range(1, path.count("/") + 1)} | set(paths))
    literal = re.sub(r"[\^$\\]", "", pattern)
    return difflib.get_close_matches(literal, candidates, n=3, cutoff=0.0)


def frozen_mask(labels_tree):
    """Pytree of bools, True where the parameter is frozen."""
    return jax.tree.map(lambda group: group == FROZEN, labels_tree)


def frozen_modules(params_labels) -> frozenset[str]:
    """'/'-joined paths of the modules whose every parameter is frozen.

    The trainer runs these in inference mode (BatchNorm on running statistics,
    which are then never updated; dropout off): a frozen part of the network
    should compute the same function in training as in evaluation, or the new
    head learns features it will never see at test time. A module with some
    frozen and some trainable parameters is not frozen. The root ('') is
    included when everything is frozen.
    """
    return frozenset("/".join(prefix) for prefix, groups in _groups_under_prefixes(params_labels).items()
                     if groups == {FROZEN})


def _groups_under_prefixes(params_labels) -> dict[tuple[str, ...], set[str]]:
    groups_under: dict[tuple[str, ...], set[str]] = {}
    for key_path, group in jax.tree_util.tree_flatten_with_path(params_labels)[0]:
        parts = tuple(_key_name(key) for key in key_path)
        for depth in range(len(parts)):
            groups_under.setdefault(parts[:depth], set()).add(group)
    return groups_under


def table(params, labels_tree, opt_state: Any = None) -> str:
    """Per-group table: tensors, parameters, optimizer-state bytes, and a total row.

    Optimizer-state bytes are attributed through the `optax.PartitionState` that
    `xfer.learning.optim.build` creates (found anywhere inside `opt_state`, so wrappers such
    as MultiSteps are fine); state outside it gets its own '(outside partition)' row.
    """
    sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(params)]
    groups = jax.tree.leaves(labels_tree)
    state_bytes, outside_bytes = _state_bytes_by_group(opt_state)
    rows = []
    for group in sorted(set(groups)):
        group_sizes = [size for size, label in zip(sizes, groups) if label == group]
        rows.append((group, len(group_sizes), sum(group_sizes), state_bytes.get(group, 0)))
    if outside_bytes:
        rows.append(("(outside partition)", 0, 0, outside_bytes))
    rows.append(("total", len(sizes), sum(sizes), sum(row[3] for row in rows)))
    return format_rows(("group", "tensors", "parameters", "opt-state bytes"),
                       [(row[0],) + tuple(f"{number:,}" for number in row[1:]) for row in rows], total=True)


def _state_bytes_by_group(opt_state) -> tuple[dict[str, int], int]:
    is_partition = lambda node: isinstance(node, optax.PartitionState)  # noqa: E731
    by_group: dict[str, int] = {}
    outside = 0
    for node in jax.tree.leaves(opt_state, is_leaf=is_partition):
        if not is_partition(node):
            outside += _nbytes(node)
            continue
        for group, inner_state in node.inner_states.items():
            by_group[group] = by_group.get(group, 0) + sum(_nbytes(leaf) for leaf in jax.tree.leaves(inner_state))
    return by_group, outside


def _nbytes(leaf) -> int:
    return int(np.size(leaf)) * np.dtype(leaf.dtype).itemsize if hasattr(leaf, "dtype") else 0


def format_rows(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1, total: bool = False) -> str:
    """Aligned text table of string cells: the first `left` columns flush left, the numbers after them
    right; `total` rules off the last row."""
    cells = [header, *rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if column < left else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths))) for line in cells]
    if total:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def optimizer_state_bytes(opt_state) -> int:
    """Bytes of every optimizer-state leaf: the memory a mask's optimizer costs, frozen groups none."""
    return sum(_nbytes(leaf) for leaf in jax.tree.leaves(opt_state))


def count_trainable(params, labels_tree) -> int:
    """Parameters outside the frozen group: the number ablation tables compare. `params` may be shapes."""
    return sum(math.prod(leaf.shape) for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels_tree))
               if label != FROZEN)
