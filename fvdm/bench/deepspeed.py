"""``fvdm bench deepspeed``: the distillation stages under DDP, DeepSpeed ZeRO-2 and ZeRO-3 on the GPUs of one
node, one process per GPU started by torchrun (so every strategy runs in the same processes, in turn)::

    torchrun --nproc_per_node 2 -m fvdm.bench.deepspeed check --data DIR
    torchrun --nproc_per_node 2 -m fvdm.bench.deepspeed speed --preset large --batch-size 8

``check`` trains every stage of the chain (vae, decoder_ft, flow, guidance, consistency, adversarial; tiny
presets, each from the previous stage's DDP checkpoint) for a few steps under each strategy at one seed, bf16,
and records: the per-step losses beside DDP's; whether
the EMA target equals decay * target + (1 - decay) * student bit for bit after every step (the student gathered
under ZeRO-3); whether the held teacher keeps its fp32 bits; whether the discriminator heads agree across
ranks; and whether the checkpoint (a directory under DeepSpeed) consolidates to the live weights and loads as
the next stage's init. ``speed`` runs consistency-distillation steps of a DiT preset on fixed synthetic
latents and images and records samples/s, MFU (DiT FLOPs only) and peak memory per GPU, for 1 GPU (rank 0
alone) and all GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch import Callback

from fvdm.bench.results import record
from fvdm.bench.training import fit_capped
from fvdm.config import EXPERIMENTS, load_config, to_yaml
from fvdm.stages import get_stage
from fvdm.stages.base import CONFIG_KEY, HELD_STATE_KEY, gathered
from fvdm.train import build_trainer

STRATEGIES = {"ddp": ["trainer.strategy=ddp", "trainer.deepspeed=null"], "zero2": ["trainer.deepspeed=zero2"],
              "zero3": ["trainer.deepspeed=zero3"]}
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16


def rank() -> int:
    """This process's global rank, as torchrun sets it (the process group starts inside the first fit)."""
    return int(os.environ.get("RANK", 0))


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def peak_gb() -> float:
    """Peak GPU memory allocated by this process since the last reset (0 without CUDA), then reset."""
    if not torch.cuda.is_available():
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


class Probe(Callback):
    """Per-step loss, the exact EMA formula, the teacher's bits and the heads' agreement across ranks."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ema_exact: list[bool] = []
        self.target_before: Optional[list[torch.Tensor]] = None
        self.teacher_before: Optional[dict[str, torch.Tensor]] = None
        self.teacher_kept: Optional[bool] = None
        self.heads_agree: Optional[bool] = None

    def on_train_start(self, trainer: L.Trainer, m: L.LightningModule) -> None:
        if getattr(m, "teacher", None) is not None:
            self.teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}

    def on_train_batch_start(self, trainer: L.Trainer, m: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if getattr(m, "target", None) is not None:
            self.target_before = [p.detach().clone() for p in m.target.parameters()]

    def on_train_batch_end(self, trainer: L.Trainer, m: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """After the step: the target must be decay * its value before + (1 - decay) * the stepped student."""
        self.losses.append(float(outputs["loss"]))
        if self.target_before is not None:
            d = m.cfg.ema_decay
            with gathered(list(m.dit.parameters())):
                expected = [p_t.mul(d).add(p_s.detach().float(), alpha=1 - d)
                            for p_t, p_s in zip(self.target_before, m.dit.parameters())]
            self.ema_exact.append(all(torch.equal(e, p) for e, p in zip(expected, m.target.parameters())))

    def on_train_end(self, trainer: L.Trainer, m: L.LightningModule) -> None:
        if self.teacher_before is not None:
            now = m.teacher.state_dict()
            self.teacher_kept = all(v.dtype == torch.float32 and torch.equal(v, now[k])
                                    for k, v in self.teacher_before.items())
        if getattr(m, "discriminator", None) is not None:
            flat = torch.cat([p.detach().flatten() for p in m.discriminator.parameters()])
            copies = [torch.empty_like(flat) for _ in range(world())]
            if dist.is_initialized():
                dist.all_gather(copies, flat)
            else:
                copies = [flat]
            self.heads_agree = all(torch.equal(copies[0], c) for c in copies)


def stage_overrides(data: Path, run_root: Path, name: str, steps: int, accelerator: str) -> list[str]:
    return [f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run_root={run_root}", f"name={name}",
            f"trainer.max_steps={steps}", f"trainer.accelerator={accelerator}", f"trainer.devices={world()}",
            "trainer.precision=bf16-mixed", "trainer.val_every_n_steps=100000",
            f"trainer.checkpoint_every_n_steps={steps}", "trainer.log_every_n_steps=1", "data.num_workers=1"]


# (run, stage, key naming the previous run's DDP checkpoint, extra overrides): the whole chain from scratch
CHAIN = [("vae", "vae", None, ["eval.every_n_steps=100000", "eval.num_mesh_shapes=1", "eval.max_batches=1"]),
         ("decoder_ft", "decoder_ft", "init_from", ["eval.every_n_steps=100000", "eval.num_mesh_shapes=1",
                                                    "eval.max_batches=1"]),
         ("flow", "flow", "vae_from", []),
         ("guidance", "guidance", "init_from", []),
         ("consistency", "consistency", "init_from", []),
         ("adversarial", "adversarial", "init_from", ["grid.phases=1", "discriminator.groups=8"])]


def checkpoint_matches(module: Any, ckpt: Path) -> dict[str, Any]:
    """Consolidate ``ckpt`` (rank 0) and compare its trained network (the DiT, or the VAE of the VAE stages)
    with the live one, gathered on every rank: equal in fp32 under every strategy (DeepSpeed runs in its
    autocast mode with fp32 parameters); then load it as the next stage's init."""
    from fvdm.stages.base import stage_state
    from fvdm.stages.checkpoints import (holds_dit, load_diffusion, load_pretrained_vae, load_teacher,
                                         read_checkpoint, submodule_state)

    prefix = "dit" if hasattr(module, "dit") else "vae"
    params = dict(getattr(module, prefix).named_parameters())
    with gathered(list(params.values())):
        live = {k: v.detach().cpu().clone() for k, v in params.items()}
    if rank() != 0:
        return {}
    t0 = time.perf_counter()
    saved = submodule_state(stage_state(read_checkpoint(ckpt)), prefix)
    seconds = time.perf_counter() - t0
    result = {"directory": ckpt.is_dir(), "consolidate_s": round(seconds, 2),
              "trained_equal": all(torch.equal(saved[k].to(v.dtype), v) for k, v in live.items())}
    if holds_dit(ckpt):
        reloaded = load_diffusion(ckpt)[0]
        result["teacher_dtype"] = str(next(load_teacher(ckpt).parameters()).dtype)
    else:
        reloaded = load_pretrained_vae(ckpt)
    result["reloads"] = sum(p.numel() for p in reloaded.parameters()) == sum(v.numel() for v in live.values())
    return result


def check(a: argparse.Namespace) -> dict[str, Any]:
    """Every stage of the chain under every strategy, each starting from the previous stage's DDP checkpoint."""
    root = Path(a.root)
    figures: dict[str, Any] = {}
    previous: Optional[Path] = None
    for run, stage, init_key, extra in CHAIN:
        for strategy in a.strategies:
            probe = Probe()
            name = f"{run}-{strategy}"
            overrides = stage_overrides(Path(a.data), root, name, a.steps, a.accelerator) + extra
            overrides += [f"{init_key}={previous}"] if init_key else []
            module, trainer = fit_capped(stage, get_stage(stage), overrides + STRATEGIES[strategy], [probe],
                                         files=[str(EXPERIMENTS / "presets" / f"tiny-{stage}.yaml")])
            ckpt = root / name / "checkpoints" / "last.ckpt"
            result = {"losses": probe.losses, "ema_exact": probe.ema_exact or None,
                      "teacher_fp32_bits_kept": probe.teacher_kept, "heads_agree": probe.heads_agree,
                      "peak_mem_gb": peak_gb(), **checkpoint_matches(module, ckpt)}
            figures[name] = result
            if rank() == 0:
                print(name, result, flush=True)
            del module, trainer
        previous = root / f"{run}-ddp" / "checkpoints" / "last.ckpt"
    for name, result in figures.items():
        reference = figures.get(f"{name.rsplit('-', 1)[0]}-ddp", {}).get("losses")
        if reference and result["losses"]:
            result["max_rel_loss_diff_vs_ddp"] = max(abs(x - r) / max(abs(r), 1e-12)
                                                      for x, r in zip(result["losses"], reference))
    return figures


class FixedBatches(torch.utils.data.IterableDataset):
    """The same synthetic batch forever: latents [B, N, C] and images [B, 3, S, S] (no loading cost)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.batch


class StepTimer(Callback):
    """Seconds per training step after ``warmup`` steps (CUDA-synchronised)."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.t0 = warmup, [], None

    def on_train_batch_start(self, trainer: L.Trainer, m: L.LightningModule, batch: Any, batch_idx: int) -> None:
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, m: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.t0)


def write_init(path: Path, preset: str, num_latents: int, image_tokens_side: int, width: int) -> tuple[int, int]:
    """A guidance-stage checkpoint with a ``preset`` DiT (random, guidance-embedded), a small VAE of the DiT's
    latent width and a one-block image encoder giving 1 + side^2 tokens of ``width``: what the consistency
    stage starts from. Returns (DiT forward FLOPs per sample, image side)."""
    from fvdm.models.conditioner import ConditionerConfig, SmallEncoderConfig, build_conditioner
    from fvdm.models.dit import FlowDiT, dit_preset
    from fvdm.models.vae import VecSetVAE, vae_preset
    from fvdm.stages.diffusion import CONDITIONER_CONFIG_KEY, DIT_CONFIG_KEY
    from fvdm.stages.guidance import GuidanceStageConfig
    from fvdm.stages.vae import VAE_CONFIG_KEY

    torch.manual_seed(0)
    side = image_tokens_side * 14
    cond_cfg = ConditionerConfig(kind="small", small=SmallEncoderConfig(image_size=side, patch_size=14, width=width,
                                                                        depth=1, heads=16))
    conditioner = build_conditioner(cond_cfg)
    dit_cfg = dataclasses.replace(dit_preset(preset), context_in_dim=width, guidance_embed=True)
    dit = FlowDiT(dit_cfg)
    vae = VecSetVAE(dataclasses.replace(vae_preset("tiny"), embed_dim=dit_cfg.in_channels, num_latents=num_latents))
    cfg = GuidanceStageConfig(name="speed-init")
    torch.save({CONFIG_KEY: to_yaml(cfg), VAE_CONFIG_KEY: dataclasses.asdict(vae.cfg),
                DIT_CONFIG_KEY: dataclasses.asdict(dit.cfg), CONDITIONER_CONFIG_KEY: dataclasses.asdict(cond_cfg),
                "state_dict": {f"dit.{k}": v for k, v in dit.state_dict().items()},
                HELD_STATE_KEY: {"vae": vae.state_dict(), "conditioner": conditioner.state_dict()}}, str(path))
    from torch.utils.flop_counter import FlopCounterMode

    dit = dit.cuda()
    x = torch.randn(1, num_latents, dit_cfg.in_channels, device="cuda")
    cond = torch.randn(1, conditioner.num_tokens, width, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), FlopCounterMode(display=False) as counter:
        dit(x, torch.rand(1, device="cuda"), cond, guidance=torch.full((1,), 5.0, device="cuda"))
    return counter.get_total_flops(), side


def speed(a: argparse.Namespace) -> dict[str, Any]:
    """Consistency steps of the ``--preset`` DiT under each strategy; MFU counts 6 DiT forwards a sample
    (student forward + backward = 3, teacher CFG = 2, EMA target = 1)."""
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    init = root / f"init-rank{rank()}.ckpt"  # each rank writes its own copy (same seed): no file sharing needed
    flops_fwd, side = write_init(init, a.preset, a.num_latents, a.image_tokens_side, a.cond_width)
    torch.manual_seed(0)
    batch = {"latents": torch.randn(a.batch_size, a.num_latents, 64),
             "image": torch.rand(a.batch_size, 3, side, side)}
    figures: dict[str, Any] = {"preset": a.preset, "batch_per_gpu": a.batch_size, "latent_tokens": a.num_latents,
                               "activation_checkpointing": a.checkpointing, "compile": a.compile,
                               "image_tokens": 1 + a.image_tokens_side ** 2,
                               "dit_fwd_tflop_per_sample": round(flops_fwd / 1e12, 3)}
    for strategy in a.strategies:
        overrides = [f"init_from={init}", f"run_root={root}", f"name=speed-{strategy}", "data.train=unused",
                     "data.val=unused", f"data.batch_size={a.batch_size}", f"trainer.max_steps={a.steps}",
                     "trainer.accelerator=gpu", f"trainer.devices={world()}", "trainer.precision=bf16-mixed",
                     "trainer.val_every_n_steps=100000", "trainer.checkpoint_every_n_steps=100000",
                     f"trainer.activation_checkpointing={str(a.checkpointing).lower()}",
                     f"trainer.compile={str(a.compile).lower()}", *STRATEGIES[strategy]]
        cfg = load_config(get_stage("consistency").Config, [str(EXPERIMENTS / "consistency.yaml")], overrides)
        L.seed_everything(0)
        module = get_stage("consistency")(cfg)
        trainer = build_trainer(cfg, logger=False)
        trainer.checkpoint_callback.save_last = False
        timer = StepTimer(warmup=3)
        trainer.callbacks.append(timer)
        peak_gb()
        try:
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(FixedBatches(batch), batch_size=None))
            step_s = sum(timer.times) / max(1, len(timer.times))
            per_gpu = a.batch_size / step_s
            result = {"step_s": round(step_s, 4), "samples_per_s_per_gpu": round(per_gpu, 2),
                      "samples_per_s": round(per_gpu * world(), 2),
                      "mfu": round(6 * flops_fwd * per_gpu / PEAK_BF16_FLOPS, 4),
                      "peak_mem_gb": peak_gb()}
        except torch.OutOfMemoryError:
            result = {"oom": True}
        figures[f"{strategy}-{world()}gpu"] = result
        if rank() == 0:
            print(strategy, result, flush=True)
        del module, trainer
        peak_gb()
    return figures


def main(argv: list[str]) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="fvdm bench deepspeed")
    p.add_argument("mode", choices=["check", "speed"])
    p.add_argument("--root", default="bench-runs/deepspeed")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--accelerator", default="gpu", help="check: gpu, or cpu to try the DDP path without GPUs")
    p.add_argument("--data", help="check: synth shards (train/, val/) with at least the tiny presets' counts")
    p.add_argument("--preset", default="large", help="speed: DiT preset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-latents", type=int, default=3072)
    p.add_argument("--image-tokens-side", type=int, default=37, help="speed: 1 + side^2 condition tokens")
    p.add_argument("--cond-width", type=int, default=1536)
    p.add_argument("--checkpointing", action="store_true", help="speed: activation checkpointing of DiT blocks")
    p.add_argument("--compile", action="store_true", help="speed: torch.compile the DiT blocks")
    p.add_argument("--results", default="benchmarks/results.json")
    p.add_argument("--note", default=None)
    a = p.parse_args(argv)
    figures = check(a) if a.mode == "check" else speed(a)
    entry: dict[str, Any] = {}
    if rank() == 0:
        context = {"gpus": world(), **({"note": a.note} if a.note else {})}
        entry = record(f"deepspeed_{a.mode}", figures, path=a.results, **context)
    return entry


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
