"""An exponential moving average of the model's variables (`config.ema_decay`), for evaluation.

timm's `ModelEmaV2`: it starts at the initial variables and after each step moves to
d * ema + (1 - d) * variables, parameters and BatchNorm statistics alike, and evaluation
(and so the `best` checkpoint, ranked by eval accuracy) uses it instead of the raw weights.
It is written ema + (1 - d) * (v - ema): a variable that does not change keeps an average
bitwise equal to it, since v - ema is then exactly 0. A frozen parameter's average is not
even computed: it is selected from the old state at trace time, so it stays bitwise the
parameter (WiSE-FT checks exactly that) and costs no work; only its memory, the price of
one tree shape for every freeze mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(variables: dict) -> dict:
    """The average at step 0: a copy of `variables` ({"params": ..., "batch_stats": ...}).

    Copied, not shared: the train step donates the state, and one buffer cannot be donated twice.
    """
    return jax.tree.map(jnp.copy, variables)


def update(ema: dict, variables: dict, decay: float, params_frozen) -> dict:
    """`ema` moved towards `variables` by (1 - decay); frozen parameters (`params_frozen`, a bool
    tree over `variables["params"]`) keep their old average."""
    rate = 1.0 - decay

    def move(average, value):
        return average + rate * (value - average)

    params = jax.tree.map(lambda average, value, frozen: average if frozen else move(average, value),
                          ema["params"], variables["params"], params_frozen)
    statistics = {name: jax.tree.map(move, ema[name], variables[name]) for name in ema if name != "params"}
    return {**statistics, "params": params}
