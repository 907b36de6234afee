"""torchvision Inception v3 -> xfer.models.inception (the same names, '.' for '/').

Every BasicConv2d is a bias-free `conv` and a BatchNorm `bn`; the list below names each one per
block kind, as torchvision's InceptionA..E and InceptionAux define them.
"""

from __future__ import annotations

from xfer.models import inception as model
from xfer.weights.convert import Entry, WeightMap, batchnorm, conv, dense, flatten

STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
# Each block kind's BasicConv2d children.
CONVS = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}
# torchvision's Mixed_<...> blocks, in order, by kind.
KINDS = dict(zip(model.MIXED, "AAABCCCCDEE"))


def _basic_conv(name: str) -> list[list[Entry]]:
    target = name.replace(".", "/")
    return [conv(f"{name}.conv", f"{target}/conv", bias=False), batchnorm(f"{name}.bn", f"{target}/bn")]


def weight_map() -> WeightMap:
    """The map of torchvision's `inception_v3` with its auxiliary classifier, as its ImageNet file holds it."""
    layers = [layer for name in STEM for layer in _basic_conv(name)]
    for block, kind in KINDS.items():
        layers += [layer for child in CONVS[kind] for layer in _basic_conv(f"{block}.{child}")]
        if block == "Mixed_6e":  # torchvision registers AuxLogits here
            layers += _basic_conv("AuxLogits.conv0") + _basic_conv("AuxLogits.conv1")
            layers.append(dense("AuxLogits.fc", "AuxLogits/fc"))
    layers.append(dense("fc", "fc"))
    return WeightMap(flatten(layers), head=model.HEAD, optional="^AuxLogits/")
