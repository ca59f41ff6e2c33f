"""The Trainer's strategy and precision from config: a Lightning strategy name, or DeepSpeed ZeRO from a JSON
config (a name under ``experiments/deepspeed/`` or a path)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from fvdm.config import EXPERIMENTS, ConfigError, TrainerConfig

DEEPSPEED_CONFIGS = EXPERIMENTS / "deepspeed"


AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def deepspeed_config(name: str, micro_batch_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON ``name`` (``zero2``, ``zero3`` under experiments/deepspeed/, or a path) as a dict, with
    the per-GPU batch filled in (DeepSpeed uses it for its throughput log)."""
    path = Path(name) if name.endswith(".json") else DEEPSPEED_CONFIGS / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json")))
        raise ConfigError(f"trainer.deepspeed: {path} not found (a JSON path or one of: {known})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"trainer.deepspeed: {path}: not valid JSON: {e}") from e
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    return config


def training_strategy(t: TrainerConfig, micro_batch_size: int) -> tuple[Any, str]:
    """(strategy, precision) for ``L.Trainer``: ``t.strategy`` as given, or with ``t.deepspeed`` set a
    ``DeepSpeedStrategy``.

    Mixed precision under DeepSpeed runs through its ``torch_autocast`` mode rather than its ``bf16`` mode:
    parameters and optimizer stay fp32 and each step runs under autocast, as under DDP. The ``bf16`` mode casts
    the whole engine module to bf16, feeds it bf16 inputs (point coordinates included) and switches off any
    autocast around it, so the held fp32 modules (teacher, EMA target, VAE) could not run inside a step.
    """
    if t.deepspeed is None:
        return t.strategy, t.precision
    if t.strategy not in ("auto", "deepspeed"):
        raise ConfigError(f"trainer.deepspeed is set ({t.deepspeed}) but trainer.strategy is '{t.strategy}': "
                          "leave the strategy at auto")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    config = deepspeed_config(t.deepspeed, micro_batch_size)
    if t.precision in AUTOCAST_DTYPES:
        config["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[t.precision]}
        return DeepSpeedStrategy(config=config), "32-true"
    return DeepSpeedStrategy(config=config), t.precision


def native_cpu_bf16() -> bool | None:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 or AMX); None when the build cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def cpu_precision(precision: str, accelerator: str, native_bf16: bool | None = None) -> str:
    """``precision`` for a run, except bf16 on a CPU without native bf16, which becomes ``32-true`` with a warning.

    On such a CPU (AVX2 only) torch emulates bf16 matmuls: a 2048^2 product took 56 s against 0.15 s in fp32 on
    a 2-core AMD EPYC, and a tiny-VAE step 10 s against 0.9 s, so a bf16 preset would never finish there.
    ``native_bf16`` None asks :func:`native_cpu_bf16`.
    """
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not (on_cpu and precision.startswith("bf16")):
        return precision
    if (native_cpu_bf16() if native_bf16 is None else native_bf16) is not False:
        return precision
    warnings.warn(f"trainer.precision={precision}: this CPU has no native bf16 (oneDNN says so; AVX2 only?), where "
                  "bf16 runs 10-300x slower than fp32; training in 32-true instead (set trainer.precision=32-true "
                  "to silence this)", RuntimeWarning, stacklevel=2)
    return "32-true"
