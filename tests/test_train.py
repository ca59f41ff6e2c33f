"""`fvdm train` end to end on real shards: a tiny VAE trains, logs to a real SQLite MLflow store, resumes,
and its checkpoint initializes the decoder-finetuning stage with a bit-identical frozen encoder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from fvdm.cli import main
from fvdm.stages.checkpoints import load_pretrained_vae

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"


def args(synth_data, run_root, stage, *extra):
    return [str(EXP / f"{stage}.yaml"), str(EXP / "presets" / f"tiny-{stage}.yaml"),
            f"data.train={synth_data / 'train'}", f"data.val={synth_data / 'val'}", f"run_root={run_root}",
            "data.batch_size=2", "data.val_batch_size=2", "data.num_workers=0", "data.num_surface=256",
            "data.num_vol=128", "data.num_near=128", "eval.resolution=16",
            "eval.num_mesh_shapes=1", "trainer.log_every_n_steps=1", *extra]


def metrics_of(run_root: Path, name: str) -> dict[str, float]:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_root / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def vae_run(synth_data, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("runs")
    assert main(["train", *args(synth_data, run_root, "vae", "vae.num_latents=32", "trainer.max_steps=6",
                                "trainer.checkpoint_every_n_steps=3", "eval.every_n_steps=3",
                                "trainer.monitor=val/v_iou")]) == 0
    return run_root


def test_train_logs_to_sqlite_mlflow(vae_run):
    run = metrics_of(vae_run, "vae")
    assert run.data.params["stage"] == "vae" and run.data.params["trainer.max_steps"] == "6"
    for key in ("train/loss", "val/v_iou", "val/s_iou", "val/v_iou_baseline", "val/decode_ms"):
        assert key in run.data.metrics, key
    client = mlflow.tracking.MlflowClient(f"sqlite:///{vae_run / 'mlflow.db'}")
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert (vae_run / "vae" / "config.yaml").read_text().startswith("stage: vae")


def test_training_without_tracking_needs_no_mlflow(synth_data, tmp_path):
    """``tracking.enabled=false`` trains and checkpoints in a process where importing mlflow fails."""
    argv = ["train", *args(synth_data, tmp_path, "vae", "vae.num_latents=32", "trainer.max_steps=1",
                           "eval.every_n_steps=100", "tracking.enabled=false")]
    code = f"import sys; sys.modules['mlflow'] = None; from fvdm.cli import main; sys.exit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "vae" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_continues_same_run(vae_run, synth_data):
    first = metrics_of(vae_run, "vae").info.run_id
    assert main(["train", *args(synth_data, vae_run, "vae", "vae.num_latents=32", "trainer.max_steps=8",
                                "trainer.checkpoint_every_n_steps=3", "eval.every_n_steps=100"), "--resume"]) == 0
    run = metrics_of(vae_run, "vae")
    assert run.info.run_id == first
    client = mlflow.tracking.MlflowClient(f"sqlite:///{vae_run / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(first, "train/loss")]
    assert sorted(steps) == list(range(8))  # 6 steps, then steps 6 and 7 after resuming


def test_decoder_finetune_freezes_encoder(vae_run, synth_data, tmp_path):
    """Compiled (``compile=true``, as on a GPU): the checkpoint keeps the eager layout and the encoder its bits."""
    from fvdm.models.vae import flops_per_query

    teacher_ckpt = vae_run / "vae" / "checkpoints" / "best.ckpt"  # kept by trainer.monitor=val/v_iou
    teacher = load_pretrained_vae(teacher_ckpt)
    assert main(["train", *args(synth_data, tmp_path, "decoder_ft", f"init_from={vae_run / 'vae'}:best",
                                "trainer.max_steps=3", "eval.every_n_steps=100", "compile=true")]) == 0
    student = load_pretrained_vae(tmp_path / "decoder_ft" / "checkpoints" / "last.ckpt")
    t, s = teacher.state_dict(), student.state_dict()
    frozen = [k for k in t if k.startswith(("encoder.", "pre_kl."))]
    assert frozen and all(torch.equal(t[k], s[k]) for k in frozen)
    trunk = [k for k in t if k.startswith("trunk.")]
    assert any(not torch.equal(t[k], s[k]) for k in trunk)  # the trunk trained
    assert student.cfg.geo_downsample_ratio == 2 and student.cfg.geo_mlp_ratio == 1 and not student.cfg.geo_ln_post
    assert flops_per_query(student.cfg) < 0.5 * flops_per_query(teacher.cfg)


def test_bad_config_exits_before_work(tmp_path, capsys):
    assert main(["train", str(EXP / "vae.yaml"), "data.train=x", "data.val=y", "trainer.max_step=3"]) == 2
    assert "trainer.max_step" in capsys.readouterr().err
