"""The ported torchvision ViT-B/16 computes what torch computes, block by block, at any resolution.

Random-init torchvision models prove the port (see test_vgg.py); torchvision
zero-initialises the head and class token and nearly zeroes the biases, so
those are randomised too, or a wrong map of them would pass unnoticed.
ViT-B/16 costs ~17 GFLOPs an image at 224 px: batches stay at one or two.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import interpolate_embeddings

from xfer import models
from xfer.models.vit import VisionTransformer
from xfer.weights import convert, vit, weight_map

import torch_hooks

NAME = "vit_b_16"


def _randomised_torch_vit(**kwargs):
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name in ("class_token", "heads.head.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def torch_vit():
    return _randomised_torch_vit()


@pytest.fixture(scope="module")
def state_dict(torch_vit):
    return {k: v.numpy() for k, v in torch_vit.state_dict().items()}


def _shapes(model, image_size):
    """Variable shapes: all `port` needs when every variable is ported."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))


def _ported(state_dict, image_size=224):
    model = models.build(NAME, image_size=image_size)
    variables, report = convert.port(state_dict, weight_map(NAME), _shapes(model, image_size), NAME)
    assert report.new_head == ()
    return model, variables


def _assert_matches_torch(model, variables, torch_model, images_nchw, where):
    """conv_proj, every encoder layer, encoder.ln and the logits match torch's; returns the logits."""
    torch_layers = len(torch_model.encoder.layers)
    modules = ["conv_proj", *(f"encoder.layers.encoder_layer_{i}" for i in range(torch_layers)), "encoder.ln"]
    expected, expected_logits = torch_hooks.torch_outputs(torch_model, images_nchw, modules)
    logits, state = model.apply(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)),
                                capture_intermediates=True)
    ours = state["intermediates"]
    assert sum(name.startswith("encoder_layer_") for name in ours["encoder"]["layers"]) == torch_layers
    worst = max(torch_hooks.assert_layers_close(ours, expected, where),
                torch_hooks.assert_close(logits, expected_logits, f"{where} logits"))
    print(f"{where}: max|diff| / max|torch| = {worst:.2g}")
    return logits


def test_every_block_and_logits_match_torchvision_at_224(torch_vit, state_dict):
    model, variables = _ported(state_dict)
    images = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    _assert_matches_torch(model, variables, torch_vit, images, "@224")


def test_at_112_matches_torchvision_after_its_own_interpolate_embeddings(state_dict):
    """The strongest check of the resized position embedding: torchvision's own recipe
    for another resolution, against a model ported straight from the 224 checkpoint."""
    torch_112 = torchvision.models.vit_b_16(image_size=112).eval()
    torch_state = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    torch_112.load_state_dict(interpolate_embeddings(112, 16, torch_state))
    model, variables = _ported(state_dict, image_size=112)
    assert variables["params"]["encoder"]["pos_embedding"].shape == (1, 7 * 7 + 1, 768)
    images = np.random.default_rng(1).standard_normal((2, 3, 112, 112), dtype=np.float32)
    assert _assert_matches_torch(model, variables, torch_112, images, "@112").shape == (2, 1000)


@pytest.mark.parametrize("side_out", [1, 6, 7, 24])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_interpolation_equals_torchvision_interpolate_embeddings(side_out, dtype, rtol):
    """torchvision's function (torch bicubic, align_corners=True) on a 14x14 grid, down and up.

    In float64 they agree to rounding, so the interpolant is torch's; in float32
    torch's own arithmetic is off by ~1e-6 (ours computes in float64).
    """
    pos_embedding = np.random.default_rng(2).standard_normal((1, 14 * 14 + 1, 8)).astype(dtype)
    expected = interpolate_embeddings(side_out * 16, 16, {"encoder.pos_embedding": torch.from_numpy(pos_embedding)})
    expected = expected["encoder.pos_embedding"].numpy()
    ours = vit.interpolate_pos_embedding(pos_embedding, (1, side_out * side_out + 1, 8))
    assert ours.dtype == dtype and ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= rtol * np.abs(expected).max()


def test_bicubic_matrix_is_exact_where_the_grids_meet():
    """Aligned corners: end points copy, and a same-size resample is the identity."""
    np.testing.assert_allclose(vit.bicubic_matrix(14, 14), np.eye(14), atol=1e-12)
    matrix = vit.bicubic_matrix(14, 27)  # every other output lands on an input sample
    np.testing.assert_allclose(matrix[::2], np.eye(14), atol=1e-12)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_resize_is_logged_and_shown_in_the_table(state_dict, caplog):
    model = models.build(NAME, image_size=96)
    with caplog.at_level("INFO", logger="xfer"):
        _, report = convert.port(state_dict, weight_map(NAME), _shapes(model, 96), NAME)
    assert "resized encoder.pos_embedding (1,197,768) -> (1,37,768) by bicubic" in caplog.text
    assert "copy + bicubic resample of the patch grid" in report.table()


def test_new_head_is_fresh_and_the_rest_is_ported(state_dict):
    fresh = _shapes(models.build(NAME, num_classes=10), 224)
    # Only the head needs real fresh values: the rest is ported over its shapes.
    fresh_head = {"kernel": np.full((768, 10), 0.5, np.float32), "bias": np.zeros(10, np.float32)}
    fresh["params"]["heads"]["head"] = fresh_head
    variables, report = convert.port(state_dict, weight_map(NAME), fresh, NAME)
    assert set(report.new_head) == {"params/heads/head/bias", "params/heads/head/kernel"}
    np.testing.assert_array_equal(variables["params"]["heads"]["head"]["kernel"], fresh_head["kernel"])
    attention = variables["params"]["encoder"]["layers"]["encoder_layer_5"]["self_attention"]
    np.testing.assert_array_equal(attention["in_proj"]["kernel"],
                                  state_dict["encoder.layers.encoder_layer_5.self_attention.in_proj_weight"].T)


def test_torchvisions_published_legacy_mlp_names_port_alike(state_dict):
    """vit_b_16-c867db91.pth predates torchvision's MLP rename: its keys say `mlp.linear_1`."""
    legacy = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
              for k, v in state_dict.items()}
    assert "encoder.layers.encoder_layer_0.mlp.linear_2.bias" in legacy
    _, current = _ported(state_dict)
    _, from_legacy = _ported(legacy)
    jax.tree.map(np.testing.assert_array_equal, from_legacy, current)
    with pytest.raises(convert.WeightMismatchError, match="under its current and a legacy name"):
        _ported({**state_dict, **legacy})


def test_a_file_missing_a_layer_is_refused(state_dict):
    truncated = {k: v for k, v in state_dict.items() if "encoder_layer_11." not in k}
    with pytest.raises(convert.WeightMismatchError) as e:
        _ported(truncated)
    assert "missing encoder.layers.encoder_layer_11.ln_1.weight" in str(e.value)


def test_a_wrong_hidden_size_is_refused_not_resized(state_dict):
    narrow = {**state_dict, "encoder.pos_embedding": state_dict["encoder.pos_embedding"][..., :512]}
    with pytest.raises(convert.WeightMismatchError, match="hidden size 512 differs from the model's 768"):
        _ported(narrow, image_size=112)


def test_input_of_another_size_names_the_fix():
    with pytest.raises(ValueError, match="takes 224x224 images .* got 112x112.*image_size"):
        _shapes(models.build(NAME), 112)


def test_every_dropout_of_torchvision_is_there_and_takes_its_mode_at_call_time():
    """What lets the trainer switch frozen blocks to eval by intercepting Dropout calls.

    Switched off from outside, train mode needs no dropout rng and equals eval.
    """
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=8,
                              mlp_dim=16, num_classes=3, dropout_rate=0.5, attention_dropout_rate=0.5)
    images = np.random.default_rng(3).standard_normal((2, 32, 32, 3), dtype=np.float32)
    rng = np.random.default_rng(4)
    variables = jax.tree.map(lambda v: rng.standard_normal(v.shape, dtype=np.float32), _shapes(model, 32))
    switched_off = []

    def dropout_off(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            switched_off.append("/".join(context.module.path))
            kwargs = {**kwargs, "deterministic": True}
        return next_fun(*args, **kwargs)

    evaluated = model.apply(variables, images)
    with nn.intercept_methods(dropout_off):
        np.testing.assert_array_equal(model.apply(variables, images, train=True), evaluated)
    per_block = ["self_attention/Dropout_0", "Dropout_0", "mlp/Dropout_0", "mlp/Dropout_1"]
    assert switched_off == ["encoder/Dropout_0"] + [f"encoder/layers/encoder_layer_{i}/{site}"
                                                    for i in range(2) for site in per_block]
