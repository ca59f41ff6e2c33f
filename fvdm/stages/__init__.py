"""Training stages, one LightningModule each, looked up by the ``stage`` key of a run config."""
from __future__ import annotations

import importlib

from fvdm.config import ConfigError

STAGES = {
    "vae": "fvdm.stages.vae:VAEStage",
    "decoder_ft": "fvdm.stages.decoder_ft:DecoderFinetune",
    "flow": "fvdm.stages.flow:FlowStage",
    "guidance": "fvdm.stages.guidance:GuidanceDistillation",
    "consistency": "fvdm.stages.consistency:ConsistencyDistillation",
    "adversarial": "fvdm.stages.adversarial:AdversarialFinetune",
}


def get_stage(name: str) -> type:
    """The LightningModule class registered for stage ``name``."""
    if name not in STAGES:
        raise ConfigError(f"key 'stage': unknown stage '{name}' (known: {', '.join(STAGES)})")
    module, _, cls = STAGES[name].partition(":")
    return getattr(importlib.import_module(module), cls)
