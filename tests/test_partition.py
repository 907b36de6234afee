"""Partition rules: first match wins, full coverage, no dead rules, and the group table."""

import ml_collections
import numpy as np
import pytest

from xfer.learning import optim, partition
from xfer.learning.partition import FROZEN, PartitionError


def small_params():
    """torchvision-style names: a conv, its BatchNorm, a second conv, a Linear head."""
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    return {
        "features": {
            "0": {"kernel": zeros(3, 3, 3, 8), "bias": zeros(8)},
            "1": {"scale": zeros(8), "bias": zeros(8)},
            "3": {"kernel": zeros(3, 3, 8, 8), "bias": zeros(8)},
        },
        "classifier": {"0": {"kernel": zeros(8, 4), "bias": zeros(4)}},
    }


def test_first_matching_rule_wins():
    labels = partition.labels(small_params(), (("^features/3/", "head"), ("^features/", FROZEN), (".*", "head")))
    assert labels["features"]["0"] == {"kernel": FROZEN, "bias": FROZEN}
    assert labels["features"]["1"] == {"scale": FROZEN, "bias": FROZEN}
    assert labels["features"]["3"] == {"kernel": "head", "bias": "head"}
    assert labels["classifier"]["0"] == {"kernel": "head", "bias": "head"}


@pytest.mark.parametrize("rules", [
    [["^features/", FROZEN], [".*", "head"]],          # lists, as a list-valued config holds them
    ("^features/:frozen", ".*:head"),                   # repeated --config.partition flags
    ("^(?:features)/:frozen", ".*:head"),               # split at the last ':' only
    ml_collections.ConfigDict({"p": (("^features/", FROZEN), (".*", "head"))}).p,
])
def test_accepted_rule_forms(rules):
    labels = partition.labels(small_params(), rules)
    assert labels["features"]["3"]["kernel"] == FROZEN
    assert labels["classifier"]["0"]["bias"] == "head"


def test_uncovered_parameters_are_an_error_naming_them_and_the_fix():
    with pytest.raises(PartitionError, match=r"2 parameters match no partition rule \(classifier/0/bias.*'\.\*', 'frozen'"):
        partition.labels(small_params(), (("^features/", FROZEN),))


def test_rule_matching_nothing_is_dead_and_named_with_closest_paths():
    with pytest.raises(PartitionError, match=r"rule 0 \('\^feature/', 'frozen'\) matches no parameter; "
                                             r"closest paths: features/"):
        partition.labels(small_params(), (("^feature/", FROZEN), (".*", "head")))


def test_rule_shadowed_by_earlier_rules_is_dead():
    with pytest.raises(PartitionError, match=r"rule 1 \('\^features/', 'frozen'\) wins no parameter.*rule\(s\) \[0\]"):
        partition.labels(small_params(), ((".*", "head"), ("^features/", FROZEN)))


def test_invalid_regex_is_named():
    with pytest.raises(PartitionError, match=r"rule 0 has an invalid regex '\^features/\('"):
        partition.labels(small_params(), (("^features/(", FROZEN), (".*", "head")))


@pytest.mark.parametrize("rules, message", [
    ((("^features/",), (".*", "head")), "not a \\(regex, group\\) pair"),
    (("^features/", ".*:head"), "has no group"),
    ("^features/:frozen", "must be a sequence"),
])
def test_malformed_rules(rules, message):
    with pytest.raises(PartitionError, match=message):
        partition.labels(small_params(), rules)


def test_table_counts_tensors_parameters_and_optimizer_state_bytes():
    params = small_params()
    labels = partition.labels(params, (("^features/", FROZEN), (".*", "head")))
    tx = optim.build({"head": optim.group_config(optimizer="sgd", lr=0.1, momentum=0.9)}, labels, total_steps=10)
    rows = {line.split()[0]: [int(cell.replace(",", "")) for cell in line.split()[1:]]
            for line in partition.table(params, labels, tx.init(params)).splitlines()[1:] if line[0] != "-"}
    frozen_params = 3 * 3 * 3 * 8 + 8 + 8 + 8 + 3 * 3 * 8 * 8 + 8
    head_params = 8 * 4 + 4
    assert rows[FROZEN] == [6, frozen_params, 0]
    assert rows["head"] == [2, head_params, head_params * 4]  # one float32 momentum per parameter
    assert rows["total"] == [8, frozen_params + head_params, head_params * 4]


def test_table_without_optimizer_state():
    params = small_params()
    text = partition.table(params, partition.labels(params, ((".*", "head"),)))
    assert text.splitlines()[-1].split() == ["total", "8", "860", "0"]


def test_frozen_mask():
    labels = partition.labels(small_params(), (("^features/", FROZEN), (".*", "head")))
    mask = partition.frozen_mask(labels)
    assert mask["features"]["0"]["kernel"] and not mask["classifier"]["0"]["kernel"]


def test_frozen_modules_are_those_with_only_frozen_params():
    params = small_params()
    frozen = partition.frozen_modules(partition.labels(params, (("^features/", FROZEN), (".*", "head"))))
    assert {"features", "features/0", "features/1"} <= frozen
    assert "" not in frozen and "classifier" not in frozen

    partly = partition.frozen_modules(partition.labels(params, (("^features/0/", FROZEN), (".*", "head"))))
    assert "features/0" in partly
    assert "features" not in partly and "features/1" not in partly  # features/ is partly trainable
