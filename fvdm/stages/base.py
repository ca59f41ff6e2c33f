"""What every training stage shares: optimizer from config, frozen modules, config stored in checkpoints."""
from __future__ import annotations

import math
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import OmegaConf

from fvdm.config import to_yaml

CONFIG_KEY = "fvdm_config"  # the resolved stage config, stored as YAML in every checkpoint
HELD_STATE_KEY = "fvdm_held_state"  # {name: state dict} of the modules a stage holds beside itself
RNG_KEY = "fvdm_rng_state"  # the global RNGs at the checkpoint, so a resumed run draws the same noise


def rng_state() -> dict[str, Any]:
    """The states of the global RNGs that training draws from (torch CPU, this process's CUDA device, numpy,
    random), in types that ``torch.load(weights_only=True)`` accepts (Lightning's default when it resumes)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "random": [int(version), list(internal), gauss_next]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_rngs(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def all_ranks(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered_objs: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered_objs, obj)
    return gathered_objs


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a constant or cosine schedule."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr at trainer.max_steps)
    min_lr_ratio: float = 0.1


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients: for teachers, frozen encoders, EMA targets and discriminator backbones."""
    module.eval()
    module.requires_grad_(False)
    return module


def gathered(params: list[torch.nn.Parameter]) -> AbstractContextManager:
    """A context in which ``params`` hold their full values: DeepSpeed's read-only gather when ZeRO-3 has
    partitioned them, else nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


@torch.no_grad()
def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source, in the target's fp32 (buffers copied). Under ZeRO-3 each
    source module's partitioned parameters are gathered (read-only) for its share of the update."""
    for module_t, module_s in zip(target.modules(), source.modules()):
        params_s = list(module_s.parameters(recurse=False))
        with gathered(params_s):
            for p_t, p_s in zip(module_t.parameters(recurse=False), params_s):
                p_t.mul_(decay).add_(p_s.detach().float(), alpha=1 - decay)
    for b_t, b_s in zip(target.buffers(), source.buffers()):
        b_t.copy_(b_s)


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, max_steps: int) -> dict[str, Any]:
    """AdamW over ``params`` plus the per-step LR multiplier, in Lightning's optimizer-config form."""
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule: unknown schedule '{cfg.schedule}' (constant or cosine)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)

    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Stage(L.LightningModule):
    """Base LightningModule: holds the typed config and writes it into every checkpoint.

    Frozen networks (VAE, teacher, EMA target, a frozen image encoder) and the discriminator heads are *held*
    beside the module rather than registered in it: DDP and DeepSpeed's engine never see them, so they stay out
    of the optimizer and of gradient sync, keep their fp32 weights (DeepSpeed casts its whole module to bf16)
    and are never partitioned by ZeRO-3 (where an in-place EMA update on a partitioned copy is silently lost).
    Every rank keeps a full copy; they move with the module at the start of fit/validate/test/predict, and
    their states travel in checkpoints under ``HELD_STATE_KEY``.

    RNGs: each rank draws its own noise (seeded ``trainer.seed + rank`` when training starts); checkpoints carry
    every rank's RNG states, restored when training restarts, and validation leaves the RNGs as it found them;
    with the data stream replayed (``data.resume: replay``) a resumed run repeats an uninterrupted one exactly.
    """

    Config: ClassVar[type]

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.held: dict[str, torch.nn.Module] = {}
        self.restored_rng: Optional[dict[str, Any]] = None
        self.rng_before_validation: Optional[dict[str, Any]] = None

    def hold(self, name: str, module: torch.nn.Module | None) -> None:
        """Keep ``module`` as attribute ``name`` without registering it as a submodule (see the class doc)."""
        self._modules.pop(name, None)
        object.__setattr__(self, name, module)
        if module is None:
            self.held.pop(name, None)
        else:
            self.held[name] = module

    def place_held(self) -> None:
        """Move the held modules to this module's device (their dtype is left alone)."""
        for module in self.held.values():
            module.to(self.device)

    def on_fit_start(self) -> None:
        self.place_held()

    def teardown(self, stage: str) -> None:
        """Back to the CPU with the module, as Lightning leaves it after ``fit``."""
        for module in self.held.values():
            module.cpu()

    def on_validation_start(self) -> None:
        self.place_held()
        self.rng_before_validation = rng_state()

    def on_validation_end(self) -> None:
        """Validation (posterior samples, say) must not shift the RNG streams training draws from."""
        if self.rng_before_validation is not None:
            set_rng_state(self.rng_before_validation)
            self.rng_before_validation = None

    def on_test_start(self) -> None:
        self.place_held()

    def on_predict_start(self) -> None:
        self.place_held()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = to_yaml(self.cfg)
        checkpoint[HELD_STATE_KEY] = {name: m.state_dict() for name, m in self.held.items()}
        checkpoint[RNG_KEY] = all_ranks(rng_state())  # every rank's, gathered: each draws its own noise

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the held modules (the EMA target moves during training) in place, on whatever device; keep
        the RNG states for the start of training (setup in between may still draw)."""
        for name, state in checkpoint.get(HELD_STATE_KEY, {}).items():
            if name in self.held:
                self.held[name].load_state_dict(state)
        self.restored_rng = checkpoint.get(RNG_KEY)

    def on_train_start(self) -> None:
        """Each rank draws its own noise: a fresh run seeds rank r with ``trainer.seed + r`` (the models were built
        before, from the shared seed, so they start equal); a resumed one restores every rank's RNG states,
        or, on another number of ranks, seeds ``trainer.seed + r + global step`` and warns."""
        rank, world = self.global_rank, self.trainer.world_size
        if self.restored_rng is not None and len(self.restored_rng) == world:
            set_rng_state(self.restored_rng[rank])
        else:
            if self.restored_rng is not None:
                rank_zero_warn(f"resume: the checkpoint holds the RNG states of {len(self.restored_rng)} ranks, this "
                               f"run has {world}; reseeding (the noise will not repeat the first run's)")
            seed_rngs(self.cfg.trainer.seed + rank + self.global_step)
        self.restored_rng = None


def stage_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All weights of a stage checkpoint, registered and held, as one flat ``name.key -> tensor`` dict."""
    held = checkpoint.get(HELD_STATE_KEY, {})
    return {**checkpoint["state_dict"], **{f"{n}.{k}": v for n, sd in held.items() for k, v in sd.items()}}


def config_from_checkpoint(checkpoint: dict[str, Any], schema: type) -> Any:
    """Rebuild the typed stage config stored in a checkpoint."""
    if CONFIG_KEY not in checkpoint:
        raise ValueError("checkpoint has no fvdm config: was it written by an fvdm stage?")
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(checkpoint[CONFIG_KEY]))
    return OmegaConf.to_object(merged)
