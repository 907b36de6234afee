"""A LoRA run's variables with its adapters folded into the weights: `python -m xfer.weights merge`.

    python -m xfer.weights merge runs/lora_vit --out merged/lora_vit [--step latest|best|N]

The run's `config.json` says the adapters' scale (its `lora` preset: alpha / R); its
checkpoint holds A and B beside each adapted kernel. What comes out is the plain model's
variables (`xfer.models.lora.merged`: W + scale * A B, the adapters dropped, BatchNorm
statistics as they were), which `config.init=DIR` loads into the model without adapters, and
whose logits equal the adapted model's up to float32 rounding (`tests/test_lora.py`).
"""

from __future__ import annotations

from pathlib import Path

from xfer.learning import phases
from xfer.models import lora
from xfer.training import checkpoint, workdir as workdir_lib


def merged_run(run_dir: Path, step: int | str = "latest") -> tuple[dict, lora.Settings, int]:
    """(the plain model's variables, the run's LoRA settings, the adapter parameters folded) of
    `run_dir`'s checkpoint `step` ("latest", "best" or a step number)."""
    config = workdir_lib.saved_config(run_dir) if run_dir.is_dir() else None
    if config is None:
        raise FileNotFoundError(f"{run_dir} is not an xfer run directory (no {workdir_lib.CONFIG_FILE}); give the "
                                "--workdir of a training run")
    settings = phases.lora_settings(config["partition"])
    if settings is None:
        raise ValueError(f"run {run_dir} trained no LoRA adapters (config.partition={config['partition']!r}): nothing "
                         f"to merge; its weights load as they are with init run:{run_dir}")
    variables = checkpoint.read_variables(run_dir / "checkpoints", step)
    adapters = lora.adapter_count(variables["params"])
    if not adapters:
        raise ValueError(f"run {run_dir}'s checkpoint {step} holds no LoRA adapters, though its config.partition "
                         f"is {config['partition']!r}; the checkpoint is not this run's")
    return {**variables, "params": lora.merged(variables["params"], settings.scale)}, settings, adapters
