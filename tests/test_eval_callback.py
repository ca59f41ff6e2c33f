"""ReconstructionEval inside a real Lightning run with a real MLflow store, and the standalone evaluate()."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import trimesh
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader

from fvdm.callbacks.reconstruction import ReconstructionEval, evaluate
from fvdm.metrics.reconstruction import ChamferDistance

TRUNCATION = 0.1


def box_sdf(points: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Exact SDF of the boxes [.., 3] lo/hi at points [.., P, 3], negative inside."""
    q = (points - (lo + hi)[..., None, :] / 2).abs() - (hi - lo)[..., None, :] / 2
    return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)


class BoxVAE(torch.nn.Module):
    """Test double with the VAE's API for box-shaped data: encode takes the bounding box of the uniform surface
    samples (exact, since every face holds samples), latents [B, 1, 6] = (lo, hi); query is the exact truncated SDF.
    Records the module mode at every query."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def encode(self, surface: torch.Tensor, sample_posterior: bool = True) -> torch.Tensor:
        assert sample_posterior is False
        xyz = surface[..., :3]
        return torch.cat([xyz.amin(dim=1), xyz.amax(dim=1)], dim=-1)[:, None]  # [B, 1, 6]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def query(self, tokens: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        sdf = box_sdf(points, tokens[:, 0, :3], tokens[:, 0, 3:])
        return sdf.clamp(-TRUNCATION, TRUNCATION) / TRUNCATION


def box_sample(i: int, ns: int = 1500, ne: int = 60, nv: int = 1500, nn: int = 1500) -> dict:
    """One shape in the data module's batch layout: a random off-centre box."""
    rng = np.random.default_rng(i)
    centre, half = rng.uniform(-0.3, 0.3, 3), rng.uniform(0.2, 0.5, 3)
    lo, hi = (centre - half).astype(np.float32), (centre + half).astype(np.float32)
    size = hi - lo
    area = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]])
    axis = rng.choice(3, ns, p=area / area.sum())
    side = rng.integers(0, 2, ns)
    pts = rng.uniform(lo, hi, (ns, 3)).astype(np.float32)
    pts[np.arange(ns), axis] = np.where(side == 1, hi[axis], lo[axis])  # exactly on a face
    normals = np.zeros((ns, 3), np.float32)
    normals[np.arange(ns), axis] = np.where(side == 1, 1.0, -1.0)
    edge = np.repeat(lo[None], ne, 0)  # sharp-edge samples along the x edges at (y, z) = (lo, lo)
    edge[:, 0] = rng.uniform(lo[0], hi[0], ne)
    surface = np.concatenate([np.c_[pts, normals, np.zeros(ns)], np.c_[edge, np.zeros((ne, 3)), np.ones(ne)]])
    vol = rng.uniform(-1, 1, (nv, 3)).astype(np.float32)
    k = rng.choice(ns, nn)
    near = pts[k] + normals[k] * (rng.uniform(0.003, 0.05, (nn, 1)) * rng.choice([-1, 1], (nn, 1)))
    lo64, hi64 = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)

    def with_sdf(p):
        p = torch.tensor(p, dtype=torch.float32)
        return torch.cat([p, box_sdf(p.double(), lo64, hi64).float()[:, None]], dim=1)

    return {"surface": torch.tensor(surface, dtype=torch.float32), "vol": with_sdf(vol), "near": with_sdf(near),
            "key": f"box_{i:03d}"}


class Boxes(L.LightningDataModule):
    def __init__(self, n: int = 6, batch_size: int = 2):
        super().__init__()
        self.samples, self.batch_size = [box_sample(i) for i in range(n)], batch_size

    def train_dataloader(self):
        return DataLoader(self.samples, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.samples, batch_size=self.batch_size)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.vae = BoxVAE()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.modes_in_training: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.modes_in_training.append(self.vae.training)
        return (self.weight - batch["vol"][..., 3].mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_evaluate_standalone_on_exact_field(tmp_path):
    vae = BoxVAE().train()
    res, samples = 64, [box_sample(i, ns=30000) for i in range(3)]  # dense ground truth: a low Chamfer floor
    results = evaluate(vae, DataLoader(samples, batch_size=2), out_dir=tmp_path, resolution=res, num_mesh_shapes=3,
                       max_batches=None, preview_size=64, num_saved_meshes=2)
    assert results["shapes"] == 3
    assert results["v_iou"] == 1.0 and results["s_iou"] == 1.0
    assert results["v_iou_baseline"] < 0.8  # the bounding sphere of a box is much larger than the box
    assert 0.4 < results["s_iou_baseline"] < 0.6  # near samples straddle the surface
    # Chamfer against the same points from the exact box surface: the sampling floor, which the mesh nearly reaches
    floor = ChamferDistance()
    for sample in samples:
        gt = sample["surface"][sample["surface"][:, 6] < 0.5, :3]
        exact = trimesh.creation.box(bounds=np.stack([gt.amin(0).numpy(), gt.amax(0).numpy()]))
        floor.update([torch.tensor(exact.sample(len(gt), seed=1), dtype=torch.float32)], [gt])
    assert results["chamfer"] < 1.3 * float(floor.compute()) and results["chamfer"] < 0.2 * 2.02 / res
    assert results["fscore"] > 0.99
    assert results["queries"] == (res + 1) ** 3 and results["decode_ms"] > 0 and results["empty_meshes"] == 0
    assert vae.training and vae.modes and not any(vae.modes)  # evaluated in eval mode, train mode restored
    plys = sorted(tmp_path.glob("*.ply"))
    assert [p.name for p in plys] == ["box_000.ply", "box_001.ply"]
    assert trimesh.load(plys[0]).volume > 0 and (tmp_path / "preview.png").stat().st_size > 0


def test_evaluate_rejects_bad_batches():
    bad = [{"surface": torch.zeros(1, 10, 6), "vol": torch.zeros(1, 10, 4), "near": torch.zeros(1, 10, 4)}]
    with pytest.raises(ValueError, match="'surface' must be a \\[B, N, 7\\]"):
        evaluate(BoxVAE(), bad)


def test_callback_in_a_lightning_run_logs_to_mlflow(tmp_path):
    logger = MLFlowLogger(experiment_name="eval-test", tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"),
                          artifact_location=(tmp_path / "artifacts").as_uri())
    module = Tiny()
    callback = ReconstructionEval(every_n_steps=2, resolution=40, num_mesh_shapes=2, max_batches=2,
                                  fscore_threshold=0.05, out_dir=tmp_path / "rec", preview_size=64)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=logger, callbacks=[callback], log_every_n_steps=50,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Boxes())

    assert all(module.modes_in_training) and not any(module.vae.modes)
    assert trainer.callback_metrics["val/v_iou"] == 1.0  # also visible to checkpoint monitors
    client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    history = {key: client.get_metric_history(logger.run_id, f"val/{key}")
               for key in ("v_iou", "s_iou", "v_iou_baseline", "s_iou_baseline", "chamfer", "fscore", "decode_ms",
                           "queries")}
    assert [m.step for m in history["v_iou"]] == [2, 4, 5]  # every 2 steps and at the end of training
    # after fit, callback_metrics hold the end-of-training evaluation (step 5), not the last periodic one (step 4)
    final, periodic = history["decode_ms"][-1].value, history["decode_ms"][-2].value
    assert float(trainer.callback_metrics["val/decode_ms"]) == pytest.approx(final, rel=1e-6) and final != periodic
    assert all(m.value == 1.0 for m in history["v_iou"] + history["s_iou"])
    assert all(m.value < 1.0 for m in history["v_iou_baseline"] + history["s_iou_baseline"])
    assert all(m.value == 41 ** 3 for m in history["queries"]) and all(m.value > 0 for m in history["decode_ms"])
    band = client.get_metric_history(logger.run_id, "val/s_error_0.02_0.05")  # an exact field errs nowhere
    assert len(band) == 3 and all(m.value == 0 for m in band)
    # the logged values are what evaluate() computes on the same validation stream
    direct = evaluate(BoxVAE(), Boxes().val_dataloader(), resolution=40, num_mesh_shapes=2, max_batches=2,
                      fscore_threshold=0.05)
    for key in ("v_iou_baseline", "s_iou_baseline", "chamfer", "fscore"):
        assert [m.value for m in history[key]] == pytest.approx([direct[key]] * 3, rel=1e-6)

    listed = {a.path for a in client.list_artifacts(logger.run_id, "reconstructions/step_0000004")}
    assert listed == {f"reconstructions/step_0000004/{name}" for name in ("box_000.ply", "box_001.ply", "preview.png")}
    local = client.download_artifacts(logger.run_id, "reconstructions/step_0000004/box_001.ply", str(tmp_path / "dl"))
    mesh = trimesh.load(local)
    assert mesh.volume > 0
    assert np.allclose(mesh.bounds[0], Boxes().samples[1]["surface"][:, :3].amin(0).numpy(), atol=1e-5)


def test_no_end_of_training_evaluation_when_a_requeue_ends_the_attempt(tmp_path, monkeypatch):
    """SIGUSR1 at step 3: SlurmRequeue saves and ends the attempt, and the callback skips its end-of-training
    evaluation (the job is about to be killed). ``scontrol`` is recorded here, not run: test_slurm runs it for real."""
    import os
    import signal

    import fvdm.train

    class Signal(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    calls = []
    monkeypatch.setattr(fvdm.train.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    logger = MLFlowLogger(experiment_name="eval-test", tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"),
                          artifact_location=(tmp_path / "artifacts").as_uri())
    callbacks = [Signal(), fvdm.train.SlurmRequeue(signal.SIGUSR1),
                 ReconstructionEval(every_n_steps=2, resolution=24, num_mesh_shapes=0, max_batches=1)]
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=logger, callbacks=callbacks, log_every_n_steps=50,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(Tiny(), datamodule=Boxes())
    assert trainer.global_step == 3 and (tmp_path / "hpc_ckpt_1.ckpt").is_file()
    assert calls == [["scontrol", "requeue", "42"]]
    history = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db")).get_metric_history(
        logger.run_id, "val/v_iou")
    assert [m.step for m in history] == [2]  # the periodic evaluation only, none at step 3
