"""Strategy from config: Lightning names pass through; ``trainer.deepspeed`` builds a DeepSpeedStrategy from the
shipped ZeRO configs with mixed precision through DeepSpeed's torch_autocast mode; typos are config errors.

DeepSpeed itself needs CUDA GPUs (Lightning refuses it on the CPU): ``test_deepspeed_on_two_gpus`` runs the
``fvdm bench deepspeed check`` on a machine with two or more, and skips, saying so, elsewhere."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess

import pytest
import torch

from fvdm.config import ConfigError, TrainerConfig
from fvdm.strategy import DEEPSPEED_CONFIGS, cpu_precision, native_cpu_bf16, training_strategy


def test_lightning_names_pass_through():
    assert training_strategy(TrainerConfig(strategy="ddp", precision="bf16-mixed"), 4) == ("ddp", "bf16-mixed")


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32():
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        assert cpu_precision("bf16-mixed", "cpu", native_bf16=False) == "32-true"
    assert cpu_precision("bf16-mixed", "cpu", native_bf16=True) == "bf16-mixed"
    assert cpu_precision("32-true", "cpu", native_bf16=False) == "32-true"
    assert cpu_precision("bf16-mixed", "gpu", native_bf16=False) == "bf16-mixed"
    # this machine's own answer decides when none is given
    native = native_cpu_bf16()
    with pytest.warns(RuntimeWarning) if native is False else contextlib.nullcontext():
        assert cpu_precision("bf16-mixed", "cpu") == ("32-true" if native is False else "bf16-mixed")


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_build_a_strategy_with_autocast(name, stage):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy, precision = training_strategy(TrainerConfig(deepspeed=name, precision="bf16-mixed"), 8)
    assert isinstance(strategy, DeepSpeedStrategy) and precision == "32-true"  # fp32 params, autocast steps
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy.config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert strategy.config["train_micro_batch_size_per_gpu"] == 8
    assert "bf16" not in strategy.config  # DeepSpeed's bf16 mode would cast the module and switch autocast off
    _, full = training_strategy(TrainerConfig(deepspeed=name, precision="32-true"), 8)
    assert full == "32-true"


def test_deepspeed_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="zero2, zero3"):
        training_strategy(TrainerConfig(deepspeed="zero9"), 1)
    with pytest.raises(ConfigError, match="leave the strategy at auto"):
        training_strategy(TrainerConfig(deepspeed="zero2", strategy="ddp"), 1)
    broken = tmp_path / "broken.json"
    broken.write_text("{stage: 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        training_strategy(TrainerConfig(deepspeed=str(broken)), 1)
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 3}))
    strategy, _ = training_strategy(TrainerConfig(deepspeed=str(own)), 8)
    assert strategy.config["train_micro_batch_size_per_gpu"] == 3  # the file wins
    assert sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json")) == ["zero2", "zero3"]


@pytest.mark.skipif(torch.cuda.device_count() < 2 or shutil.which("torchrun") is None,
                    reason="DeepSpeed under Lightning needs two CUDA GPUs and torchrun (the lent 2 x H200 machine)")
def test_deepspeed_on_two_gpus(tmp_path):
    """The whole chain (vae, decoder_ft, flow, guidance, consistency, adversarial) under DDP, ZeRO-2 and ZeRO-3:
    losses track DDP's, the EMA formula holds bit for bit, the teacher keeps its fp32 bits, the heads agree
    across ranks, checkpoints consolidate to the live weights and start the next stage."""
    from fvdm.data.sampling import SampleCounts
    from fvdm.data.synth import run_synth

    data = tmp_path / "data"  # the point counts the tiny presets read
    run_synth(data, num=24, seed=0, val_fraction=0.2, workers=4, shard_size=4,
              counts=SampleCounts(surface=2048, sharp=256, vol=4096, near=1024, renders=1, render_size=64))
    results = tmp_path / "results.json"
    subprocess.run(["torchrun", "--nproc_per_node", "2", "-m", "fvdm.bench.deepspeed", "check", "--steps", "3",
                    "--data", str(data), "--root", str(tmp_path / "ds"), "--results", str(results)], check=True)
    figures = json.loads(results.read_text())[-1]["figures"]
    assert len(figures) == 18
    for name, r in figures.items():
        assert r["trained_equal"] and r["reloads"] and r["teacher_fp32_bits_kept"] is not False, name
        assert r["directory"] == (not name.endswith("-ddp")), name
        assert r["max_rel_loss_diff_vs_ddp"] < 0.05, name
        if name.startswith(("consistency", "adversarial")):
            assert r["ema_exact"] and all(r["ema_exact"]), name
        if name.startswith("adversarial"):
            assert r["heads_agree"], name
