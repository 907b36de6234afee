"""`python -m xfer.models`: the table's parameter counts are torch's, and a wrong name is one line."""

import pytest
import torchvision

from xfer import models
from xfer.models import __main__ as models_cli


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "efficientnet_b0"])
def test_parameter_count_equals_torchvisions(name):
    torch_model = getattr(torchvision.models, name)()
    assert models_cli.parameter_count(models.info(name)) == sum(p.numel() for p in torch_model.parameters())


def test_table_lists_the_asked_models(capsys):
    assert models_cli.main(["resnet18", "efficientnet_lite0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "input", "parameters"]
    assert [line.split()[0] for line in lines[1:]] == ["resnet18", "efficientnet_lite0"]
    assert "11.7M" in lines[1] and "224 px" in lines[1]
    assert lines[2].rstrip().endswith("yes")  # Lite0's weights ship in a pip package installed with xfer


def test_unknown_model_is_one_line(capsys):
    assert models_cli.main(["resnet5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown model 'resnet5'")
    assert "(did you mean resnet50?)" in err
