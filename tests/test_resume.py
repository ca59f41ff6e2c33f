"""Resume: a training process killed mid-run and resumed with ``--resume`` (data.resume=replay) repeats the
loss trajectory of an uninterrupted run step for step, validation in between included."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from fvdm.config import EXPERIMENTS as EXP
from fvdm.models.vae import VAEConfig, VecSetVAE
from fvdm.stages.checkpoints import save_vae_checkpoint

MAX_STEPS = 10


def run(cmd: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def command(synth_data: Path, run_root: Path, vae: Path, *extra: str) -> list[str]:
    """The tiny teacher (flow) stage: VAE posterior samples, condition dropout, timesteps and noise all draw
    from the global RNGs; two DataLoader workers; a validation every 3 steps."""
    return [sys.executable, "-m", "fvdm.cli", "train", str(EXP / "flow.yaml"), str(EXP / "presets" / "tiny-flow.yaml"),
            f"vae_from={vae}", f"data.train={synth_data / 'train'}", f"data.val={synth_data / 'val'}",
            f"run_root={run_root}", "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=2",
            "data.num_surface=256", "data.num_vol=256", "data.resume=replay", "eval.steps=2", "eval.max_batches=1",
            f"trainer.max_steps={MAX_STEPS}", "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=2",
            "trainer.log_every_n_steps=1", *extra]


def losses(run_root: Path) -> dict[int, float]:
    """train/loss by step of the run's one MLflow run; a step logged twice (before the kill and after the
    resume) keeps its last value."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # the resumed process went on in the same MLflow run
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


@pytest.mark.slow
def test_killed_run_resumes_on_the_uninterrupted_trajectory(synth_data, tmp_path):
    torch.manual_seed(0)
    vae = save_vae_checkpoint(VecSetVAE(VAEConfig(num_latents=32)), tmp_path / "vae.ckpt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    run(command(synth_data, whole, vae), env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(synth_data, killed, vae), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "flow" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything more
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed_from = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 2 <= resumed_from < MAX_STEPS

    run(command(synth_data, killed, vae) + ["--resume"], env)
    reference, trajectory = losses(whole), losses(killed)
    assert sorted(reference) == list(range(MAX_STEPS))
    # every step from the checkpoint on is logged (the killed process may have died between saving the checkpoint
    # and logging that step's metrics, and the resumed one starts after it)
    assert set(range(resumed_from, MAX_STEPS)) <= set(trajectory)
    assert trajectory == pytest.approx({step: reference[step] for step in trajectory}, rel=1e-6, abs=0)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == MAX_STEPS
