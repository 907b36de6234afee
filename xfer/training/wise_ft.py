"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the weight-space curve
from the run's start to its end, θ_α = (1 − α)·θ_init + α·θ_final, evaluated at each of
`config.wise_ft_alphas` on the eval split after training.

θ_init is what step 0 trained from (`xfer.weights.initialise`: the pretrained backbone and a
freshly initialised head), recomputed from the config and seed rather than kept from the start:
a copy would double the variables held through training. Recomputing is deterministic; as a check,
every frozen parameter must come out bitwise equal to the trained run's, else the curve is skipped
with a warning (an `init="run:<dir>"` source that trained on since would start elsewhere; with
nothing frozen there is nothing to compare, and such a source goes unnoticed).

The head. The paper interpolates a zero-shot head, which has a meaningful value at α = 0. A head
that is new for this class count has none: its initial value is random, and mixing it in pulls
the trained head towards noise (with `head_zero_init` it only scales the logits by α, and both
choices below predict alike). `config.wise_ft_head`:
  - "final" (default): the new head keeps its trained value at every α; only the parameters that
    were ported (or came from a `run:` source) are interpolated: the trained classifier on an
    interpolated backbone. The paper always has a head worth returning to (the zero-shot one)
    and does not cover a random one; this is the choice made here for it.
  - "interpolate": the head is interpolated too, from its own initial value; α = 0 is then
    exactly the model step 0 evaluated.
The "new head" is what the port left freshly initialised; with `init="scratch"` (nothing ported)
it is the model's registered head. A head ported unchanged (a `run:` source with the same classes)
has a pretrained value and is interpolated like the rest.

LoRA runs (`xfer.models.lora`): the adapters' A matrices keep their trained value at every α and
only B is interpolated (from its initial 0), so θ_α is exactly the pretrained weights plus α times
the trained low-rank update, as WiSE-FT means it.

BatchNorm running statistics are interpolated the same way as the parameters: they are part of the
variables the model evaluates with (the paper's CLIP models have none). That is an approximation:
the mixed network's own activation statistics are not the mix of the two ends'. Parameters and
statistics that did not change (frozen ones) are equal at both ends and come out bitwise unchanged
for every α; this is also why a feature cache stays valid: its prefix is frozen, so every θ_α
computes the same cached features. If only the new head trained, "final" makes every α the final
model (logged as a warning).

Outputs: `wise_ft.csv` (alpha, eval_accuracy, eval_macro_f1, eval_top5, eval_examples),
`wise_ft.png` (accuracy against α) and a `wise_ft` entry of summary.json (the curve, the head
choice, the best α and its accuracy). The best α is chosen on the eval split itself, so its
accuracy is an optimistic estimate unless the eval split is a separate validation split
(config.data); ties go to the larger α, the one closer to the model the run trained.
Every process evaluates (the eval step is a global program); only process 0 writes (`Reporter`).
"""

from __future__ import annotations

import logging
import os
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from xfer import models
from xfer.models import lora
from xfer.learning import partition, phases
from xfer.training import evaluate
from xfer.training import step as step_lib
from xfer.training import mesh as mesh_lib
from xfer.weights.initialise import initial_variables, ported

log = logging.getLogger("xfer")

HEADS = ("final", "interpolate")  # config.wise_ft_head
ROW = ("eval_accuracy", "eval_macro_f1", "eval_top5", "eval_examples")  # wise_ft.csv's columns after alpha
_CHOSEN_ON = "the eval split: an optimistic estimate unless that split is a separate validation split"


def curve(run_setup, eval_step, state, data, reporter) -> dict:
    """Evaluates θ_α for each of config.wise_ft_alphas, writes wise_ft.csv and wise_ft.png; returns
    summary.json's `wise_ft` entry. `data` is what the run evaluated on (cached features or images)."""
    config = run_setup.config
    alphas = sorted({float(alpha) for alpha in config.wise_ft_alphas})
    mesh = mesh_lib.data_mesh()
    log.info("WiSE-FT: recomputing the initial variables (init %s, seed %d)", run_setup.init, config.seed)
    initial, new_head = initial_state(run_setup)
    final = flat_variables(step_lib.eval_variables(state))  # the EMA's when config.ema_decay is on
    keep = (new_head if config.wise_ft_head == "final" else frozenset()) | _lora_a(final)
    initial = mesh_lib.replicate({path: initial[path] for path in final}, mesh)
    changed = _changed(initial, final)
    frozen_mask = flat_variables({"params": partition.frozen_mask(phases.frozen_throughout(run_setup.phases))})
    frozen = [path for path, is_frozen in frozen_mask.items() if is_frozen and changed[path]]
    if frozen:
        reason = (f"the recomputed initial variables differ from the run's in {len(frozen)} frozen parameter(s) "
                  f"({', '.join(frozen[:3])}): config.init no longer gives what step 0 started from")
        log.warning("WiSE-FT skipped: %s", reason)
        return {"skipped": reason}
    moving = sorted(path for path, differs in changed.items() if differs and path not in keep)
    log.info("WiSE-FT over alpha %s: head %r (%s); %d tensors interpolated (batch statistics like parameters), "
             "the rest equal at both ends", alphas, config.wise_ft_head,
             f"the new head {', '.join(sorted(new_head))} keeps its trained value" if keep else
             "interpolated from its initial value", len(moving))
    if not moving:
        log.warning("WiSE-FT: nothing but the kept head changed in training, so every alpha is the final model")
    rows = []
    for alpha in alphas:
        mixed = traverse_util.unflatten_dict(interpolate(initial, final, alpha, keep), sep="/")
        mixed_state = step_lib.with_eval_variables(state, mixed)  # {"params"[, "batch_stats"]}
        metrics = evaluate.one_pass(eval_step, mixed_state, data).metrics(list(data.class_names))
        rows.append({"alpha": alpha, **{k: metrics[k] for k in ROW if k in metrics}})
        log.info("WiSE-FT alpha=%g: %s", alpha, " ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()
                                                          if isinstance(v, float) and k != "alpha"))
    best = max(rows, key=lambda row: (row["eval_accuracy"], row["alpha"]))
    log.info("WiSE-FT best alpha=%g: eval_accuracy=%.4g (chosen on %s)", best["alpha"], best["eval_accuracy"],
             _CHOSEN_ON)
    reporter.write_file("wise_ft.csv", _csv(rows))
    if reporter.is_writer:
        _plot(rows, config.wise_ft_head, reporter.workdir / "wise_ft.png")
    return {"head": config.wise_ft_head, "kept_final": sorted(keep), "interpolated_tensors": len(moving),
            "curve": rows, "best_alpha": best["alpha"], "best_eval_accuracy": best["eval_accuracy"],
            "best_chosen_on": _CHOSEN_ON}


def initial_state(run_setup) -> tuple[dict[str, jax.Array], frozenset[str]]:
    """θ_init as step 0 had it, flat ("params/_fc/kernel": array), and the paths of its new head.

    The same call `xfer.training.train.run` makes (`initial_variables` is `ported`'s variables for
    any source but "scratch"), with the port's report kept for the head's paths.
    """
    config, init = run_setup.config, run_setup.init
    args = (run_setup.model, config.model.name, init, run_setup.data.image_size, config.seed, config.head_zero_init)
    if init == "scratch":
        variables = traverse_util.flatten_dict(initial_variables(*args), sep="/")
        head = models.info(config.model.name).head
        new_head = [path for path in variables
                    if head and path.startswith("params/") and re.search(head, path.split("/", 1)[1])]
        return variables, frozenset(new_head)
    variables, report = ported(*args)
    return traverse_util.flatten_dict(variables, sep="/"), frozenset(report.new_head)


def _lora_a(flat: dict) -> frozenset[str]:
    """LoRA's A matrices (`xfer.models.lora`). The update an adapter makes is (alpha/R)·A·B with B
    starting at 0, so A at its trained value and B interpolated from 0 give exactly α times the
    trained update; interpolating A too would give α·(A_0 + α·(A − A_0))·B, not on the curve."""
    return frozenset(path for path in flat if path.rpartition("/")[2] == lora.A)


def flat_variables(state) -> dict[str, jax.Array]:
    """A TrainState's (or a {collection: tree} dict's) params and batch_stats, flat by '/'-joined path."""
    trees = state if isinstance(state, dict) else {"params": state.params, "batch_stats": state.batch_stats}
    return traverse_util.flatten_dict({k: dict(v) for k, v in trees.items() if v}, sep="/")


def interpolate(initial: dict, final: dict, alpha: float, keep_final=frozenset()) -> dict:
    """(1 − α)·initial + α·final, leaf by leaf over two flat dicts of the same paths; `keep_final`
    paths take `final`'s value. Bitwise `initial` at α = 0 and `final` at α = 1 (a product by 0 or 1
    is exact), and a leaf equal at both ends stays bitwise itself at every α (a frozen one)."""
    mixed = _mix(initial, final, jnp.float32(alpha))
    return {path: final[path] if path in keep_final else value for path, value in mixed.items()}


@jax.jit
def _mix(initial, final, alpha):
    def mix(a, b):
        return jnp.where(a == b, b, ((1 - alpha) * a + alpha * b).astype(b.dtype))

    return {path: mix(a, final[path]) for path, a in initial.items()}


@jax.jit
def _changed(initial, final):
    return {path: jnp.any(initial[path] != final[path]) for path in final}


def _csv(rows: list[dict]) -> str:
    columns = list(rows[0])
    return "\n".join([",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]) + "\n"


def _plot(rows: list[dict], head: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster or in CI
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([row["alpha"] for row in rows], [row["eval_accuracy"] for row in rows], "o-")
    axes.set_xlabel("alpha (0: initial weights, 1: fine-tuned)")
    axes.set_ylabel("eval accuracy")
    axes.set_title(f"WiSE-FT: accuracy along (1 - alpha) init + alpha final (head: {head})")
    axes.grid(True, alpha=0.3)
    tmp = path.with_name(path.name + ".tmp")  # written then renamed, as Reporter.write_file does
    figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    os.replace(tmp, path)
