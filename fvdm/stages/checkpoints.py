"""Load what a stage starts from: an fvdm stage checkpoint or an imported Hunyuan3D-2 folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fvdm.config import ConfigError
from fvdm.stages.base import CONFIG_KEY, HELD_STATE_KEY, stage_state


def resolve_checkpoint(spec: str | Path) -> Path:
    """An ``init_from`` / ``vae_from`` / ``teacher_from`` value as a path: a run directory (``{run_root}/{name}``)
    means its ``checkpoints/last.ckpt``; ``RUN_DIR:last`` and ``RUN_DIR:best`` pick that run's last checkpoint or
    the best one by ``trainer.monitor``; anything else (a checkpoint file, a DeepSpeed checkpoint directory, a
    released Hunyuan3D-2 folder) is taken as it is."""
    text = str(spec)
    run, colon, which = text.rpartition(":")
    path = Path(run) if colon and which in ("last", "best") else Path(text)
    which = which if colon and which in ("last", "best") else "last"
    if not (path / "checkpoints").is_dir():
        if text.endswith((":last", ":best")):
            raise ConfigError(f"{text}: {path} is not a run directory (no checkpoints/ inside)")
        return path
    ckpt = path / "checkpoints" / f"{which}.ckpt"
    if not ckpt.exists():
        hint = " (the run kept no best checkpoint: set trainer.monitor)" if which == "best" else ""
        raise ConfigError(f"{text}: no {ckpt}{hint}")
    return ckpt


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory written under a DeepSpeed strategy (``latest`` tag file)."""
    return (Path(path) / "latest").is_file()


def consolidate_deepspeed(path: str | Path) -> dict[str, Any]:
    """The fp32 checkpoint dict of a DeepSpeed (ZeRO-2/3) checkpoint directory: trained weights gathered from
    every rank's partitions, plus the fvdm config and held modules that rank 0 stored with it."""
    import tempfile

    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:  # the converter insists on writing a file; it returns the dict
        return convert_zero_checkpoint_to_fp32_state_dict(str(path), str(Path(tmp) / "consolidated.ckpt"))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by an fvdm stage (with its config): a Lightning file or a DeepSpeed directory."""
    ckpt = consolidate_deepspeed(path) if is_deepspeed_checkpoint(path) else torch.load(
        str(path), map_location="cpu", weights_only=False)
    if CONFIG_KEY not in ckpt:
        raise ConfigError(f"{path}: not an fvdm stage checkpoint (no stored config)")
    return ckpt


def read_stored_config(path: str | Path) -> dict[str, Any]:
    """A stage checkpoint's stored entries without gathering its weights (memory-mapped; a DeepSpeed directory
    gives rank 0's model-states file): for the configs it holds."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        path = sorted((path / "checkpoint").glob("*mp_rank_00_model_states.pt"))[0]
    ckpt = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
    if CONFIG_KEY not in ckpt:
        raise ConfigError(f"{path}: not an fvdm stage checkpoint (no stored config)")
    return ckpt


def is_stage_checkpoint(path: Path) -> bool:
    """A stage checkpoint (file or DeepSpeed directory) rather than a released Hunyuan3D-2 folder."""
    return path.is_file() or is_deepspeed_checkpoint(path)


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries of ``state_dict`` under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def load_pretrained_vae(path: str | Path):
    """A ``VecSetVAE`` from a vae/decoder_ft checkpoint (``.ckpt``) or a Hunyuan3D-2 VAE folder."""
    from fvdm.models.vae import VAEConfig, VecSetVAE
    from fvdm.stages.vae import VAE_CONFIG_KEY

    path = resolve_checkpoint(path)
    if path.is_dir() and not is_deepspeed_checkpoint(path):
        from fvdm.interop.hunyuan3d import load_vae

        return load_vae(path)
    if not is_stage_checkpoint(path):
        raise ConfigError(f"init_from: {path} is neither a checkpoint nor a Hunyuan3D-2 folder")
    ckpt = read_checkpoint(path)
    if VAE_CONFIG_KEY not in ckpt:
        raise ConfigError(f"{path}: checkpoint holds no VAE (stage {ckpt.get('stage', '?')})")
    vae = VecSetVAE(VAEConfig(**ckpt[VAE_CONFIG_KEY]))
    vae.load_state_dict(submodule_state(stage_state(ckpt), "vae"))
    return vae


def save_vae_checkpoint(vae, path: str | Path) -> Path:
    """Write ``vae`` as an fvdm checkpoint that ``init_from`` and ``fvdm eval`` accept."""
    import dataclasses

    from fvdm.config import to_yaml
    from fvdm.stages.vae import VAE_CONFIG_KEY, VAEStageConfig

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = VAEStageConfig(vae=vae.cfg, vae_preset=None, name=path.stem)
    torch.save({CONFIG_KEY: to_yaml(cfg), VAE_CONFIG_KEY: dataclasses.asdict(vae.cfg),
                "state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, str(path))
    return path


def holds_dit(path: str | Path) -> bool:
    """Whether ``path`` is a diffusion-stage checkpoint or a released DiT folder (else a VAE is expected)."""
    from fvdm.stages.diffusion import DIT_CONFIG_KEY

    path = resolve_checkpoint(path)
    if is_stage_checkpoint(path):
        return DIT_CONFIG_KEY in read_stored_config(path)
    if path.is_dir():
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else None
        return isinstance(config, dict) and "model" in config
    return False


def load_diffusion(path: str | Path):
    """(dit, vae, conditioner) from a diffusion-stage checkpoint (``.ckpt``) or a released Hunyuan3D-2 DiT
    folder carrying its VAE and image-encoder parts."""
    from omegaconf import OmegaConf

    from fvdm.models.conditioner import ConditionerConfig, build_conditioner
    from fvdm.models.dit import DiTConfig, FlowDiT
    from fvdm.models.vae import VAEConfig, VecSetVAE
    from fvdm.stages.diffusion import CONDITIONER_CONFIG_KEY, DIT_CONFIG_KEY
    from fvdm.stages.vae import VAE_CONFIG_KEY

    path = resolve_checkpoint(path)
    if path.is_dir() and not is_deepspeed_checkpoint(path):
        from fvdm.interop.hunyuan3d import load_dit_bundle

        bundle = load_dit_bundle(path)
        absent = [name for name in ("vae", "conditioner") if getattr(bundle, name) is None]
        if absent:
            raise ConfigError(f"init_from: {path} has no {' or '.join(absent)} part; the stages need the bundle "
                              "with its VAE and image encoder")
        return bundle.dit, bundle.vae, bundle.conditioner
    if not is_stage_checkpoint(path):
        raise ConfigError(f"init_from: {path} is neither a checkpoint nor a Hunyuan3D-2 DiT folder")
    ckpt = read_checkpoint(path)
    if DIT_CONFIG_KEY not in ckpt:
        raise ConfigError(f"{path}: checkpoint holds no DiT (written by a stage before the diffusion stages?)")
    state = stage_state(ckpt)
    dit = FlowDiT(DiTConfig(**ckpt[DIT_CONFIG_KEY]))
    # a stage that keeps an EMA of its student (guidance with ema_decay) hands on the EMA
    dit.load_state_dict(submodule_state(state, "ema" if any(k.startswith("ema.") for k in state) else "dit"))
    vae = VecSetVAE(VAEConfig(**ckpt[VAE_CONFIG_KEY]))
    vae.load_state_dict(submodule_state(state, "vae"))
    cond_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ConditionerConfig),
                                                   ckpt[CONDITIONER_CONFIG_KEY]))
    cond_cfg.dinov2.weights = None  # the weights come from this checkpoint
    conditioner = build_conditioner(cond_cfg)
    conditioner.load_state_dict(submodule_state(state, "conditioner"))
    return dit, vae, conditioner


CONSISTENCY_STAGES = ("consistency", "adversarial")  # whose stored teacher is the distillation teacher


def load_teacher(path: str | Path):
    """The distillation teacher a stage starting from ``path`` uses: the stored teacher of a consistency or
    adversarial checkpoint (so the phase-1 finetune keeps the original one), else the DiT at ``path``."""
    import yaml

    from fvdm.models.dit import DiTConfig, FlowDiT
    from fvdm.stages.diffusion import TEACHER_CONFIG_KEY

    path = resolve_checkpoint(path)
    if is_stage_checkpoint(path):
        stored = read_stored_config(path)  # the teacher is a held module: no DeepSpeed consolidation needed
        if yaml.safe_load(stored[CONFIG_KEY]).get("stage") in CONSISTENCY_STAGES:
            teacher = FlowDiT(DiTConfig(**stored[TEACHER_CONFIG_KEY]))
            teacher.load_state_dict(stored[HELD_STATE_KEY]["teacher"])
            return teacher
    return load_diffusion(path)[0]
