"""LoRA (Hu et al. 2021): rank-R adapters beside the kernels of a model's Dense and Conv layers.

    config.partition = "lora:8"                        # the model's default targets, alpha 8
    config.partition = "lora:16:alpha=32"              # scale alpha / R = 2
    config.partition = "lora:4:mlp/(0|3)$"             # targets: a regex over module paths
    python -m xfer.weights merge RUN_DIR --out DIR     # the adapters folded in: a plain model again

Each target layer computes y = layer(x) + (alpha / R) * B(A(x)), a side branch: the frozen
kernel is only read, never differentiated, so its gradient is never computed ("frozen means
free") and nothing of kernel size is formed per step. A is the layer itself with R outputs and
no bias (a Dense: x @ A, A of (in, R); a Conv: the same kernel size, strides, padding, dilation
and lowering, R output channels, as PEFT's Conv2d LoRA); B maps R to the layer's outputs (a
Dense's (R, out); a Conv's 1x1 kernel (1, 1, R, out)). A starts as torch's default Linear/Conv
init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) as PEFT draws it, B at zero: at step 0
the branch adds exact zeros and the model is the pretrained one, op by op bit for bit (a jitted
program may fuse the zero add with its neighbours and round them differently: measured 0 for
ViT and Lite0, 1.6e-7 relative for a small CNN, tests/test_lora.py).

`alpha` defaults to 8, PEFT's `LoraConfig` default: `lora:8` is PEFT's default model (scale 1),
and, as in the paper, a fixed alpha makes alpha / R shrink as R grows, so changing R needs no
new learning rate (the paper's reason for the scale; alpha = R would undo it).

The adapters are parameters `lora_a` and `lora_b` of the layer they adapt, beside its kernel
(`encoder/layers/encoder_layer_3/self_attention/in_proj/lora_a`), so everything that works by
path works on them unchanged: partition regexes, `ModelInfo.blocks` (last_k, layer decay),
checkpoints, the group table. `LoRA` builds the registry's model unchanged and shares its scope
(`nn.share_scope`: no `base/` prefix), and an interceptor on the `__call__` of each target creates
the adapters in that layer's own scope, after its kernel, so every other parameter is
initialised from the same random numbers as without LoRA.

Default targets, from the layers one forward pass calls, the head never among them:
  - a transformer's attention projections: the Dense layers of a module named `self_attention`
    (torchvision's ViT: the fused q,k,v `in_proj` and `out_proj`), `attn` (timm: `qkv`, `proj`)
    or `attention`. The fused projection is adapted whole, as PEFT does for timm's fused `qkv`
    (peft #691): rank R over q, k and v costs R * (width + 3 * width) parameters, what rank-R
    adapters on q and v alone cost (PEFT's ViT guide), with out_proj adapted too;
  - otherwise, every ungrouped 1x1 convolution and every Dense outside the head (ResNet's
    bottleneck and downsampling 1x1 convs, Lite0's expand / project / head convs, ConvNeXt's
    pointwise Linears, VGG's hidden `classifier/3`; VGG's `classifier/0` is a `PooledDense`, no
    Dense, and ResNet-18/34 have 1x1 convs only in their three downsampling shortcuts).
A model with none of these, and a target regex that names nothing, a grouped (depthwise) conv,
the head or a layer that is no Dense or Conv, is a one-line error.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xfer.models import registry

log = logging.getLogger("xfer")

A, B = "lora_a", "lora_b"  # the adapter parameters' names, beside the target's kernel
ADAPTER_PARAM = rf"(?:^|/)(?:{A}|{B})$"  # a regex over '/'-joined parameter paths
DEFAULT_ALPHA = 8.0  # PEFT's LoraConfig default
ATTENTION_MODULES = ("self_attention", "attn", "attention")  # whose Dense layers are a transformer's targets
DENSE, CONV = "Dense", "Conv"

# torch's default Linear / Conv init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)), PEFT's lora_A init.
a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class LoraError(ValueError):
    """LoRA targets that no adapter can be built for."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `lora:R[:alpha=A][:REGEX]` says (xfer.learning.presets parses it)."""

    rank: int
    alpha: float = DEFAULT_ALPHA
    targets: str | None = None  # a regex over module paths; None: the model's defaults

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def spelled(self) -> str:
        alpha = "" if self.alpha == DEFAULT_ALPHA else f":alpha={self.alpha:g}"
        return f"lora:{self.rank}{alpha}{'' if self.targets is None else ':' + self.targets}"


@dataclasses.dataclass(frozen=True)
class Layer:
    """A module with a kernel that one forward pass calls."""

    path: str  # module path, '/'-joined
    kind: str  # DENSE, CONV, or the class name of another module with a kernel
    kernel_shape: tuple[int, ...]
    groups: int = 1  # a Conv's feature_group_count


def is_adapter(path: str) -> bool:
    """True for a '/'-joined parameter path of an adapter (`.../in_proj/lora_a`)."""
    return re.search(ADAPTER_PARAM, path) is not None


def adapter_count(params) -> int:
    """Adapter parameters in a params tree (arrays or shapes)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return sum(int(np.prod(value.shape)) for path, value in flat.items() if is_adapter(path))


class LoRA(nn.Module):
    """`base` with adapters on the layers at `targets`; its parameters keep `base`'s paths."""

    base: nn.Module
    rank: int
    scale: float
    targets: tuple[str, ...]  # module paths

    def setup(self):
        nn.share_scope(self, self.base)

    def __call__(self, x, *args, **kwargs):
        with nn.intercept_methods(_adapter_interceptor(self.rank, self.scale, frozenset(self.targets))):
            return self.base(x, *args, **kwargs)


def _adapter_interceptor(rank: int, scale: float, targets: frozenset[str]):
    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or "/".join(module.path) not in targets:
            return y
        x = args[0] if args else kwargs["inputs"]
        return y + _branch(module, x, rank) * scale

    return interceptor


def _branch(module: nn.Module, x, rank: int):
    """B(A(x)) of a target Dense or Conv, its adapters created beside its kernel (after it, so the
    kernel's init draws what it draws without LoRA)."""
    kernel_shape = module.get_variable("params", "kernel").shape
    a = module.param(A, a_init, (*kernel_shape[:-1], rank))
    b = module.param(B, nn.initializers.zeros, (*(1,) * (len(kernel_shape) - 2), rank, kernel_shape[-1]))
    down = module.clone(parent=None, features=rank, use_bias=False)  # the layer itself at rank R
    hidden = down.apply({"params": {"kernel": a}}, x)
    hidden, b = nn.dtypes.promote_dtype(hidden, b.reshape(rank, -1), dtype=module.dtype)
    return jnp.dot(hidden, b)


def layers(model: nn.Module, images: jax.ShapeDtypeStruct) -> list[Layer]:
    """Every module with a kernel that a forward pass of `model` on `images` calls, in call order."""
    called: dict[str, Layer] = {}
    kinds: dict[str, str] = {}  # module path -> class name, of every module called

    def interceptor(next_fun, args, kwargs, context):
        module, y = context.module, next_fun(*args, **kwargs)
        path = "/".join(module.path)
        kinds.setdefault(path, type(module).__name__)
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
            called.setdefault(path, Layer(path, DENSE if isinstance(module, nn.Dense) else CONV,
                                          tuple(module.get_variable("params", "kernel").shape),
                                          getattr(module, "feature_group_count", 1)))
        return y

    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    others = [Layer(module, kinds.get(module, "?"), tuple(shape.shape))
              for module, shape in ((path.rpartition("/")[0], shape)
                                    for path, shape in traverse_util.flatten_dict(shapes["params"], sep="/").items()
                                    if path.endswith("/kernel"))
              if module not in called]
    return [*called.values(), *others]


def target_paths(settings: Settings, model: nn.Module, model_name: str, images: jax.ShapeDtypeStruct
                 ) -> tuple[str, ...]:
    """The module paths `settings` adapts in `model_name`'s `model`; raises LoraError naming the problem."""
    info = registry.info(model_name)
    found = layers(model, images)
    head = re.compile(info.head) if info.head else None

    def in_head(layer: Layer) -> bool:
        return head is not None and head.search(f"{layer.path}/kernel") is not None

    if settings.targets is None:
        chosen = _defaults(found, in_head)
        if not chosen:
            raise LoraError(f"{model_name} has no default LoRA target (no attention projection, ungrouped 1x1 "
                            f"conv or Dense outside its head); name them: lora:{settings.rank}:REGEX over module "
                            "paths")
        return tuple(layer.path for layer in chosen)
    try:
        regex = re.compile(settings.targets)
    except re.error as error:
        raise LoraError(f"LoRA target regex {settings.targets!r} is invalid: {error}; fix or escape it") from None
    chosen = [layer for layer in found if regex.search(layer.path)]
    if not chosen:
        from xfer.learning.partition import closest_paths  # xfer.learning imports the models: not at import

        candidates = [layer.path for layer in found if layer.kind in (DENSE, CONV)]
        raise LoraError(f"LoRA target regex {settings.targets!r} matches no Dense or Conv layer of {model_name} "
                        f"(module paths, e.g. {', '.join(closest_paths(settings.targets, candidates))})")
    for layer in chosen:
        if layer.kind not in (DENSE, CONV):
            raise LoraError(f"LoRA target regex {settings.targets!r} selects {layer.path}, a {layer.kind}, which "
                            "is no flax Dense or Conv (LoRA adapts only those); narrow the regex")
        if in_head(layer):
            raise LoraError(f"LoRA target regex {settings.targets!r} selects {layer.path}, part of the head, "
                            "which trains in full under lora; narrow the regex")
        if layer.groups != 1:
            raise LoraError(f"LoRA target regex {settings.targets!r} selects {layer.path}, a grouped convolution "
                            f"(feature_group_count={layer.groups}, e.g. depthwise), which LoRA does not adapt; "
                            "narrow the regex")
    return tuple(layer.path for layer in chosen)


def _defaults(found: list[Layer], in_head) -> list[Layer]:
    """A transformer's attention projections, else every ungrouped 1x1 conv and Dense outside the head."""
    eligible = [layer for layer in found if layer.kind in (DENSE, CONV) and layer.groups == 1 and not in_head(layer)]
    attention = [layer for layer in eligible
                 if layer.kind == DENSE and layer.path.rpartition("/")[0].rpartition("/")[2] in ATTENTION_MODULES]
    if attention:
        return attention
    return [layer for layer in eligible if layer.kind == DENSE or set(layer.kernel_shape[:-2]) == {1}]


def wrap(model: nn.Module, settings: Settings, model_name: str, images: jax.ShapeDtypeStruct) -> LoRA:
    """`model` (as `xfer.models.build` made it) with `settings`' adapters; `images` the input's shape."""
    targets = target_paths(settings, model, model_name, images)
    log.info("LoRA %s on %s: rank %d, alpha %g (scale %g), %d layers: %s", settings.spelled(), model_name,
             settings.rank, settings.alpha, settings.scale, len(targets), _listed(targets))
    return LoRA(model, settings.rank, settings.scale, targets)


def _listed(paths: tuple[str, ...], shown: int = 4) -> str:
    return ", ".join(paths[:shown]) + (f", ... ({len(paths) - shown} more)" if len(paths) > shown else "")


def merged(params: Mapping, scale: float) -> dict:
    """`params` with each adapted kernel W replaced by W + scale * A B and the adapters dropped: the
    plain model that computes what the adapted one does (up to float rounding).

    A Dense's A B is (in, R) @ (R, out); a Conv's sums over r: W[h, w, i, o] + scale * sum_r
    A[h, w, i, r] B[0, 0, r, o], since B is a 1x1 conv with stride 1 after A. Folded in float64.
    """
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    folded = {}
    for path, value in flat.items():
        if is_adapter(path):
            continue
        module, _, name = path.rpartition("/")
        if name == "kernel" and f"{module}/{A}" in flat:
            a, b = np.asarray(flat[f"{module}/{A}"], np.float64), np.asarray(flat[f"{module}/{B}"], np.float64)
            delta = np.tensordot(a, b.reshape(a.shape[-1], -1), axes=1)
            value = (np.asarray(value, np.float64) + scale * delta).astype(np.asarray(value).dtype)
        folded[path] = value
    return traverse_util.unflatten_dict(folded, sep="/")
