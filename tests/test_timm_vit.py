"""The ported timm ViTs (DINOv2, CLIP's image tower) compute what timm computes, block by block.

timm's own models at random init (`pretrained=False`: the same state-dict layout as the hub's
files) prove the port. What timm initialises to a constant or to nearly nothing is drawn at
random first, or a wrong map of it would pass: layer scale (1e-5), every bias and LayerNorm
affine, the class token (std 1e-6). The embeddings are also scaled down (std ~1e-2 into the
first LayerNorm) so that LayerNorm's eps counts: with DINOv2's 1e-6 swapped for CLIP's 1e-5, or
exact GELU for CLIP's quick_gelu, these comparisons fail. Images are small (56 px is a 4 x 4
grid of 14 px patches): ViT-B costs ~35 GFLOPs an image at 224 px.

The hub source is tested through `python -m xfer.weights convert` in a subprocess, with
huggingface_hub's cache in a temporary directory and HF_HUB_OFFLINE=1: an empty cache is a
one-line error, a file laid out as `hf download` leaves it ports.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import timm
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from configs import dinov2_linear_probe
from xfer import models
from xfer.learning import partition, presets
from xfer.models import timm_vit
from xfer.training import train
from xfer.weights import convert, sources, weight_map
from xfer.weights import timm_vit as timm_vit_weights

import torch_hooks

REPO = Path(__file__).resolve().parents[1]
TIMM_NAMES = {"dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vitb14": "vit_base_patch14_dinov2",
              "clip_vitb16": "vit_base_patch16_clip_quickgelu_224"}


def _randomised_timm(name: str, img_size: int, num_classes: int, seed: int = 0):
    """timm's model for `name` at `img_size`, eval mode, with what timm starts near-constant drawn at random."""
    torch.manual_seed(seed)
    model = timm.create_model(TIMM_NAMES[name], pretrained=False, img_size=img_size, num_classes=num_classes).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 1:  # biases, LayerNorm affines, layer scale
                p.add_(0.1 * torch.randn_like(p))
        model.cls_token.normal_(0.0, 0.02)
        for p in (model.patch_embed.proj.weight, model.pos_embed, model.cls_token):
            p.mul_(0.5)  # small embeddings: the first LayerNorm's eps then shows
    return model


def _state_dict(torch_model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def _shapes(model, image_size: int):
    return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, image_size, image_size, 3),
                                                                             jnp.float32))


def _ported(name: str, state_dict, image_size: int, num_classes: int):
    model = models.build(name, num_classes=num_classes, image_size=image_size)
    variables, report = convert.port(state_dict, weight_map(name), _shapes(model, image_size), name)
    return model, variables, report


def _assert_matches_timm(model, variables, timm_model, images_nchw, where: str) -> float:
    """patch_embed, norm_pre (CLIP), every block, the final norm and the logits match timm's."""
    modules = ["patch_embed", *(["norm_pre"] if isinstance(timm_model.norm_pre, torch.nn.LayerNorm) else []),
               *(f"blocks.{i}" for i in range(len(timm_model.blocks))), "norm"]
    expected, expected_logits = torch_hooks.torch_outputs(timm_model, images_nchw, modules)
    logits, state = model.apply(variables, jnp.asarray(images_nchw.transpose(0, 2, 3, 1)), capture_intermediates=True)
    worst = max(torch_hooks.assert_layers_close(state["intermediates"], expected, where),
                torch_hooks.assert_close(logits, expected_logits, f"{where} logits"))
    print(f"{where}: max|diff| / max|timm| = {worst:.2g}")
    return worst


def _images(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size), dtype=np.float32)


# --- equivalence with timm ----------------------------------------------------

@pytest.fixture(scope="module")
def dinov2_s_518():
    """ViT-S/14 at the hub files' grid (37 x 37, for 518 px), 10 classes."""
    return _randomised_timm("dinov2_vits14", 518, 10)


@pytest.fixture(scope="module")
def dinov2_s_56():
    return _randomised_timm("dinov2_vits14", 56, 10, seed=1)


@pytest.fixture(scope="module")
def clip_b_32():
    """CLIP's ViT-B/16 at 32 px (2 x 2 patches) with its 512-wide projection head."""
    return _randomised_timm("clip_vitb16", 32, 512, seed=2)


def test_dinov2_every_block_and_logits_match_timm(dinov2_s_56):
    model, variables, report = _ported("dinov2_vits14", _state_dict(dinov2_s_56), 56, 10)
    assert report.new_head == ()
    _assert_matches_timm(model, variables, dinov2_s_56, _images(0, 56), "dinov2_vits14 @56")


@pytest.mark.parametrize("from_size, to_size", [(518, 56), (56, 98)])
def test_dinov2_on_another_grid_matches_timms_own_resampling(dinov2_s_518, dinov2_s_56, from_size, to_size):
    """The strongest check of the resampled position embedding: timm's `checkpoint_filter_fn` (what
    `pretrained=True` runs) fits the file to timm's model at `to_size`; ours ports the file as is.
    37 x 37 -> 4 x 4 shrinks (antialiased), 4 x 4 -> 7 x 7 enlarges."""
    source = dinov2_s_518 if from_size == 518 else dinov2_s_56
    timm_model = timm.create_model(TIMM_NAMES["dinov2_vits14"], pretrained=False, img_size=to_size,
                                   num_classes=10).eval()
    timm_model.load_state_dict(checkpoint_filter_fn(source.state_dict(), timm_model))
    model, variables, _ = _ported("dinov2_vits14", _state_dict(source), to_size, 10)
    grid = to_size // 14
    assert variables["params"]["pos_embed"].shape == (1, 1 + grid * grid, 384)
    _assert_matches_timm(model, variables, timm_model, _images(1, to_size), f"dinov2_vits14 {from_size}->{to_size}")


def test_clip_every_block_and_logits_match_timm(clip_b_32):
    """quick_gelu, norm_pre, no patch-embedding bias, LayerNorm eps 1e-5, the 512-wide projection `head`."""
    assert "patch_embed.proj.bias" not in clip_b_32.state_dict()
    model, variables, report = _ported("clip_vitb16", _state_dict(clip_b_32), 32, 512)
    assert report.new_head == () and "bias" not in variables["params"]["patch_embed"]["proj"]
    _assert_matches_timm(model, variables, clip_b_32, _images(2, 32), "clip_vitb16 @32")


@pytest.mark.parametrize("name", ["dinov2_vitb14", "clip_vitb16"])
def test_base_models_port_their_hub_layout_strictly(name):
    """By shape: a file laid out as the hub's (timm at its default, pretrained config: DINOv2 at 518 px
    without a head, CLIP at 224 px with its 512-wide projection) fills every variable of the registered
    224 px model, and the parameters are timm's."""
    with torch.device("meta"):  # shapes without values: no 86M random draws
        timm_model = timm.create_model(TIMM_NAMES[name], pretrained=False)
    state_dict = {key: np.zeros(tensor.shape, np.float32) for key, tensor in timm_model.state_dict().items()}
    num_classes = 512 if name == "clip_vitb16" else 1000
    _, variables, report = _ported(name, state_dict, 224, num_classes)
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    if name == "clip_vitb16":
        assert report.new_head == () and ours == sum(v.size for v in state_dict.values())
    else:  # the 37 x 37 grid becomes 16 x 16; a 1000-way head is added
        assert set(report.new_head) == {"params/head/kernel", "params/head/bias"}
        assert ours == sum(v.size for v in state_dict.values()) - (37**2 - 16**2) * 768 + 768 * 1000 + 1000


# --- the DINOv2 files' missing head -----------------------------------------

def test_a_headless_dinov2_file_ports_with_a_fresh_head(dinov2_s_518):
    headless = {k: v for k, v in _state_dict(dinov2_s_518).items() if not k.startswith("head.")}
    _, variables, report = _ported("dinov2_vits14", headless, 56, 10)
    assert set(report.new_head) == {"params/head/kernel", "params/head/bias"}
    np.testing.assert_array_equal(variables["params"]["blocks"]["7"]["ls2"]["gamma"], headless["blocks.7.ls2.gamma"])


def test_clips_head_is_not_optional(clip_b_32):
    state_dict = {k: v for k, v in _state_dict(clip_b_32).items() if not k.startswith("head.")}
    with pytest.raises(convert.WeightMismatchError, match="missing head.weight"):
        _ported("clip_vitb16", state_dict, 32, 512)


def test_a_file_missing_a_layer_scale_is_refused(dinov2_s_518):
    state_dict = {k: v for k, v in _state_dict(dinov2_s_518).items() if k != "blocks.11.ls1.gamma"}
    with pytest.raises(convert.WeightMismatchError, match=r"missing blocks\.11\.ls1\.gamma"):
        _ported("dinov2_vits14", state_dict, 56, 10)


# --- position embedding resampling -------------------------------------------

@pytest.mark.parametrize("side_in, side_out", [(37, 16), (37, 4), (37, 26), (16, 37), (4, 9), (7, 4), (5, 1), (3, 3)])
def test_resampling_is_torchs_antialiased_bicubic(side_in, side_out):
    """In float64 against `F.interpolate(bicubic, align_corners=False, antialias=True)`: equal to rounding
    (measured 1.7e-15), so the interpolant is torch's."""
    grid = np.random.default_rng(3).standard_normal((side_in, side_in, 8))
    expected = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(side_out, side_out),
                             mode="bicubic", align_corners=False, antialias=True)[0].permute(1, 2, 0).numpy()
    matrix = timm_vit_weights.antialiased_bicubic_matrix(side_in, side_out)
    ours = np.einsum("yh,xw,hwc->yxc", matrix, matrix, grid)
    assert np.abs(ours - expected).max() <= 1e-12 * np.abs(expected).max()
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


@pytest.mark.parametrize("side_in, side_out", [(37, 16), (37, 26), (16, 37), (14, 2)])
def test_resampling_equals_timms_resample_abs_pos_embed(side_in, side_out):
    """timm computes in float32 (its `posemb.float()`), ours in float64: measured at most 3.2e-6 of
    the largest value apart (37 -> 26); the class-token entry is kept exactly."""
    pos_embed = np.random.default_rng(4).standard_normal((1, 1 + side_in * side_in, 8)).astype(np.float32)
    expected = resample_abs_pos_embed(torch.from_numpy(pos_embed), new_size=(side_out, side_out),
                                      num_prefix_tokens=1).numpy()
    ours = timm_vit_weights.resample_pos_embed(pos_embed, (1, 1 + side_out * side_out, 8))
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours[:, 0], pos_embed[:, 0])
    relative = np.abs(ours - expected).max() / np.abs(expected).max()
    print(f"resample {side_in}->{side_out}: max|ours - timm| / max|timm| = {relative:.2g}")
    assert relative <= 2e-5


def test_a_wrong_embedding_size_is_refused_not_resized(dinov2_s_518):
    state_dict = _state_dict(dinov2_s_518)
    state_dict["pos_embed"] = state_dict["pos_embed"][..., :256]
    with pytest.raises(convert.WeightMismatchError, match="hidden size 256 differs from the model's 384"):
        _ported("dinov2_vits14", state_dict, 56, 10)


# --- the model ---------------------------------------------------------------

def test_input_of_another_size_names_the_fix():
    with pytest.raises(ValueError, match="takes 224x224 images .* got 112x112.*image_size"):
        _shapes(models.build("dinov2_vits14"), 112)
    with pytest.raises(ValueError, match="image_size=100 is not a multiple of patch_size=14"):
        _shapes(models.build("dinov2_vits14", image_size=100), 100)


def test_every_dropout_takes_its_mode_at_call_time():
    """Each of timm's dropout sites (proj_drop, attn_drop, the MLP's two, stochastic depth per branch,
    the head's) is a Dropout layer, so the trainer can switch frozen blocks to eval by intercepting
    them; switched off from outside, train mode needs no rng and equals eval."""
    model = timm_vit.VisionTransformer(image_size=28, patch_size=14, embed_dim=8, depth=2, num_heads=2,
                                       init_values=0.5, num_classes=3, dropout_rate=0.5, attention_dropout_rate=0.5,
                                       drop_path_rate=0.5, head_dropout_rate=0.5)
    images = np.random.default_rng(5).standard_normal((2, 28, 28, 3), dtype=np.float32)
    rng = np.random.default_rng(6)
    variables = jax.tree.map(lambda v: rng.standard_normal(v.shape, dtype=np.float32), _shapes(model, 28))
    switched_off = {}

    def dropout_off(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            switched_off["/".join(context.module.path)] = (context.module.rate, context.module.broadcast_dims)
            kwargs = {**kwargs, "deterministic": True}
        return next_fun(*args, **kwargs)

    evaluated = model.apply(variables, images)
    with nn.intercept_methods(dropout_off):
        np.testing.assert_array_equal(model.apply(variables, images, train=True), evaluated)
    expected = {"Dropout_0": (0.5, ())}
    for block, drop_path in ((0, 0.0), (1, 0.5)):  # timm's linear rule: 0 for the first block, the rate for the last
        prefix = f"blocks/{block}"
        expected.update({f"{prefix}/attn/Dropout_0": (0.5, ()), f"{prefix}/attn/Dropout_1": (0.5, ()),
                         f"{prefix}/mlp/Dropout_0": (0.5, ()), f"{prefix}/mlp/Dropout_1": (0.5, ()),
                         f"{prefix}/Dropout_0": (drop_path, (1, 2)), f"{prefix}/Dropout_1": (drop_path, (1, 2))})
    assert switched_off == expected


def _trainable(name: str, setting: str) -> set[str]:
    shapes = _shapes(models.build(name, num_classes=10), 224)["params"]
    labels = partition.labels(shapes, presets.expand(presets.parse(setting), name, shapes))
    return {partition.path_str(path) for path, group in jax.tree_util.tree_flatten_with_path(labels)[0]
            if group != partition.FROZEN}


def test_presets_select_timms_groups():
    """Blocks as timm's `group_matcher` has them: the embedding (with CLIP's norm_pre), 12 blocks, the norm."""
    assert _trainable("clip_vitb16", "linear_probe") == {"head/kernel", "head/bias"}
    assert _trainable("clip_vitb16", "last_k:1") == {"head/kernel", "head/bias", "norm/scale", "norm/bias"}
    last_two = _trainable("dinov2_vits14", "last_k:2")
    assert {p.split("/")[0] for p in last_two} == {"head", "norm", "blocks"}
    assert {p.split("/")[1] for p in last_two if p.startswith("blocks/")} == {"11"}
    assert "blocks/11/ls1/gamma" in last_two
    norms = _trainable("dinov2_vits14", "norm_only") - {"head/kernel", "head/bias"}
    assert len(norms) == 2 * (2 * 12 + 1) and not any("gamma" in p for p in norms)  # LayerNorms, not layer scale
    embedding = _trainable("clip_vitb16", "last_k:14") - _trainable("clip_vitb16", "last_k:13")
    assert embedding == {"patch_embed/proj/kernel", "cls_token", "pos_embed", "norm_pre/scale", "norm_pre/bias"}


def test_registration():
    for name in TIMM_NAMES:
        info = models.info(name)
        assert info.input_size == 224 and info.imagenet.filename == "model.safetensors"
        assert info.imagenet.repo_id.startswith("timm/") and info.pretrained_on != models.IMAGENET_1K
    assert models.info("clip_vitb16").mean == timm.data.OPENAI_CLIP_MEAN
    assert models.info("clip_vitb16").std == timm.data.OPENAI_CLIP_STD
    assert models.info("dinov2_vitb14").mean == timm.data.IMAGENET_DEFAULT_MEAN
    # `python -m xfer.weights check` scores ImageNet classes: these models are no choice there.
    assert not set(TIMM_NAMES) & set(sources.imagenet_models())
    assert set(TIMM_NAMES) <= set(sources.pretrained_models())


# --- the Hugging Face hub source -----------------------------------------------

DINOV2_REPO = "timm/vit_small_patch14_dinov2.lvd142m"


def run_cli(env: dict, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "xfer.weights", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def _hub_env(tmp_path) -> dict:
    """huggingface_hub's cache in `tmp_path`, and no network at all."""
    return {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}


def test_offline_with_an_empty_cache_is_one_line_naming_repo_file_cache_and_command(tmp_path):
    result = run_cli(_hub_env(tmp_path), "convert", "imagenet", "--model", "dinov2_vits14", "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: dinov2_vits14's pretrained weights, model.safetensors of the Hugging Face hub "
                           f"repo {DINOV2_REPO}, are not in the hub cache {tmp_path / 'hub'}")
    assert "(HF_HUB_OFFLINE is set)" in line
    assert f"`hf download {DINOV2_REPO} model.safetensors`" in line
    assert f"models--timm--vit_small_patch14_dinov2.lvd142m into {tmp_path / 'hub'}/" in line
    assert not (tmp_path / "out").exists()


def test_a_file_in_the_hub_cache_ports_under_either_name(tmp_path, dinov2_s_518):
    """The layout `hf download` leaves (refs/main -> snapshots/<commit>/model.safetensors); the file is
    a headless timm DINOv2 state dict with the 37 x 37 grid, as on the hub."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    state_dict = {k: v for k, v in _state_dict(dinov2_s_518).items() if not k.startswith("head.")}
    save_file(state_dict, str(repo_dir / "snapshots" / commit / "model.safetensors"))

    result = run_cli(_hub_env(tmp_path), "convert", "pretrained", "--model", "dinov2_vits14", "--num-classes", 10,
                     "--out", tmp_path / "out", "--format", "safetensors")
    assert result.returncode == 0, result.stderr
    assert f"reading {repo_dir / 'snapshots' / commit / 'model.safetensors'}" in result.stdout
    assert "copy + antialiased bicubic resample of the patch grid" in result.stdout
    ported = load_file(str(tmp_path / "out" / "variables.safetensors"))
    expected_pos_embed = resample_abs_pos_embed(torch.from_numpy(state_dict["pos_embed"]), new_size=(16, 16)).numpy()
    np.testing.assert_allclose(ported["params/pos_embed"], expected_pos_embed, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ported["params/blocks/3/ls1/gamma"], state_dict["blocks.3.ls1.gamma"])
    np.testing.assert_array_equal(ported["params/blocks/3/attn/qkv/kernel"], state_dict["blocks.3.attn.qkv.weight"].T)
    assert ported["params/head/kernel"].shape == (384, 10)  # fresh: the file has no head

    # "imagenet" names the same registered file (in process: huggingface_hub read HF_HUB_CACHE on import).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
        assert sources.resolve("imagenet", "dinov2_vits14") == sources.resolve("pretrained", "dinov2_vits14") == \
            repo_dir / "snapshots" / commit / "model.safetensors"


def test_a_hub_error_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    def refused(repo_id, filename, **kwargs):
        raise errors.EntryNotFoundError("404 Client Error. Entry Not Found for url: https://huggingface.co/x\nmore")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refused)
    with pytest.raises(sources.DownloadError) as error:
        sources.resolve("pretrained", "clip_vitb16")
    message = str(error.value)
    assert message.startswith("cannot download clip_vitb16's pretrained weights, model.safetensors of the Hugging "
                              "Face hub repo timm/vit_base_patch16_clip_224.openai (404 Client Error. Entry Not Found")
    assert "\n" not in message and "hf download timm/vit_base_patch16_clip_224.openai model.safetensors" in message



# --- configs/dinov2_linear_probe.py ----------------------------------------------

@pytest.mark.parametrize("arg, cut_width", [("", 384), ("model=b14,data=digits,res=112", 768)])
def test_the_linear_probe_config_caches_the_class_token_and_trains_the_head_only(arg, cut_width):
    """Shapes only: the setup a run would start from resolves (no weights, no data download: CIFAR-10
    is tfds's mock), the feature cache cuts at `pool`, the head's input, and only the head trains."""
    config = dinov2_linear_probe.get_config(arg)
    assert config.init == "pretrained" and config.partition == "linear_probe"
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        run = train.setup(config)
    assert run.cuts == ("pool",)
    assert run.trainable_parameters == cut_width * 10 + 10
    assert run.data.image_size == config.model.image_size == (112 if "res=112" in arg else 224)
    assert run.data.augment == "none" and config.data.mean is None  # the model's: ImageNet's, as DINOv2 was trained


@pytest.mark.parametrize("arg, message", [
    ("model=l14", "model='l14'; choose one of s14, b14"),
    ("res=100", "res='100'; it must be a multiple of the 14 px patch"),
    ("data=imagenet", "data='imagenet'; choose cifar10, digits or folder:PATH"),
    ("resolution=224", "bad argument 'resolution=224'; write key=value with key one of model, data, res"),
])
def test_a_bad_config_argument_is_an_error(arg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dinov2_linear_probe.get_config(arg)
