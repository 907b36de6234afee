"""What learns and how: partition rules and presets, BatchNorm policies, per-group optimizers,
and the freeze plan that gathers them for one run."""
