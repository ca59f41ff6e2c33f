"""Reconstruction evaluation of a VAE on held-out shards: metrics, baselines, decoded meshes and a preview.

:func:`evaluate` runs it once over any iterable of batches (``fvdm eval``); :class:`ReconstructionEval` runs it
inside training every N steps and at the end of training, on the data module's validation loader, and logs to
every logger (MLflow gets the meshes and the preview as artifacts). Metrics are torchmetrics objects, so
under DDP every rank evaluates its own share of the stream and the results are summed across ranks.

Per batch (``sample_posterior=False``): V-IoU on ``vol`` samples and S-IoU on ``near`` samples beside their
baselines on the same points (bounding sphere of the input cloud; everything inside). For the first
``num_mesh_shapes`` shapes: ``decode_mesh`` at ``resolution``, its time per shape (latents to mesh) and query
count, then Chamfer distance and F-score between points sampled on the mesh and the ground-truth surface
points (the uniform ones: sharp-edge samples, flag 1, would over-weight edges). Both have a floor set by the
point density, about 0.5 * sqrt(area / points) for an exact reconstruction, so compare them at equal counts.
"""
from __future__ import annotations

import contextlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import trimesh
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from torchmetrics import MeanMetric, SumMetric

from fvdm.decoding.dense import DEFAULT_CHUNK, query_chunked
from fvdm.decoding.grid import DEFAULT_BOUNDS, Bounds, VolumeDecoder
from fvdm.decoding.mesh import Mesh, decode_mesh
from fvdm.metrics.reconstruction import (ChamferDistance, FScore, OccupancyIoU, SignErrorByBand, all_inside_sdf,
                                         bounding_sphere_sdf)


@dataclass
class EvalSettings:
    """What one evaluation computes; defaults suit a few-second check during training."""

    resolution: int = 128  # marching-cubes grid cells per axis
    num_mesh_shapes: int = 4  # shapes (per rank) decoded to meshes for Chamfer / F-score / timing
    max_batches: int | None = 8  # batches read from the stream (None: all)
    fscore_threshold: float = 0.02  # 1% of the side of the [-1, 1] cube
    mesh_samples: int | None = None  # points sampled on each decoded mesh (None: as many as ground-truth points)
    bounds: Bounds = DEFAULT_BOUNDS
    chunk_size: int = DEFAULT_CHUNK  # query points per vae.query call
    num_saved_meshes: int = 4  # PLY files written (rank zero)
    preview_shapes: int = 4  # rows of the preview image (reconstruction | ground truth)
    preview_size: int = 256  # pixels per panel
    seed: int = 0  # mesh surface sampling and preview camera


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_batch(batch: dict[str, Any]) -> None:
    for name, width in (("surface", 7), ("vol", 4), ("near", 4)):
        t = batch.get(name)
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[-1] != width:
            raise ValueError(f"evaluate: batch field '{name}' must be a [B, N, {width}] tensor, "
                             f"got {getattr(t, 'shape', type(t))}")


def mesh_samples(mesh: Mesh, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """``count`` area-uniform points [count, 3] on the mesh; [0, 3] for an empty mesh."""
    if mesh.is_empty:
        return torch.zeros(0, 3, device=device)
    points, _ = trimesh.sample.sample_surface(mesh.to_trimesh(), count, seed=seed)
    return torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device)


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or "shape"


def save_preview(path: Path, items: list[tuple[str, Mesh, np.ndarray]], size: int, seed: int) -> Path:
    """One PNG, a row per shape: the reconstruction rendered with ``render_views`` beside the ground-truth
    surface points as a scatter seen from the same camera direction."""
    from matplotlib.figure import Figure

    from fvdm.data.render import camera_angles, render_views

    az, el = np.degrees(camera_angles(1, seed)[0])
    fig = Figure(figsize=(2 * size / 100, len(items) * size / 100), dpi=100)
    for row, (key, mesh, gt) in enumerate(items):
        left = fig.add_subplot(len(items), 2, 2 * row + 1)
        image = (render_views(mesh.vertices, mesh.faces, 1, size, seed)[0] if not mesh.is_empty
                 else np.full((size, size, 3), 255, np.uint8))
        left.imshow(image)
        left.set_title(f"{key}: reconstruction" + (" (empty)" if mesh.is_empty else ""), fontsize=7)
        left.axis("off")
        right = fig.add_subplot(len(items), 2, 2 * row + 2, projection="3d")
        pts = gt[np.random.default_rng(seed).permutation(len(gt))[:4000]]
        # fvdm is Y-up; matplotlib is Z-up: (x, y, z) -> (x, -z, y) is a rotation, azimuth becomes -az
        right.scatter(pts[:, 0], -pts[:, 2], pts[:, 1], s=0.5, c=pts[:, 1], cmap="viridis", depthshade=True)
        centre, radius = (pts.min(0) + pts.max(0)) / 2, np.ptp(pts, axis=0).max() / 2
        right.set(xlim=(centre[0] - radius, centre[0] + radius), ylim=(-centre[2] - radius, -centre[2] + radius),
                  zlim=(centre[1] - radius, centre[1] + radius))
        right.set_box_aspect((1, 1, 1))
        right.view_init(elev=el, azim=-az)
        right.set_title(f"{key}: ground truth points", fontsize=7)
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_evaluation(vae, batches: Iterable[dict[str, Any]], settings: EvalSettings | None = None,
                   device: torch.device | str | None = None, out_dir: str | Path | None = None,
                   decoder: VolumeDecoder | None = None,
                   autocast: contextlib.AbstractContextManager | None = None) -> tuple[dict[str, float], list[Path]]:
    """Evaluate ``vae`` on ``batches``; returns (metrics synchronized across ranks, files written to ``out_dir``).

    The VAE runs in eval mode under no_grad and gets its previous mode back. ``autocast`` (e.g. the trainer's
    precision context) wraps the model calls. Files are written only when ``out_dir`` is given.
    """
    s = settings or EvalSettings()
    if device is None:
        device = next((p.device for p in vae.parameters()), torch.device("cpu")) if hasattr(vae, "parameters") \
            else torch.device("cpu")
    device = torch.device(device)
    iou = {name: OccupancyIoU() for name in ("v_iou", "s_iou", "v_iou_baseline", "s_iou_baseline")}
    mesh_metrics = {"chamfer": ChamferDistance(), "fscore": FScore(s.fscore_threshold), "decode_ms": MeanMetric(),
                    "queries": MeanMetric(), "empty_meshes": SumMetric()}
    bands = SignErrorByBand()  # near-surface sign errors per |sdf| band: where S-IoU is lost
    metrics = torch.nn.ModuleDict({**iou, **mesh_metrics, "shapes": SumMetric(), "s_error": bands}).to(device)
    kept: list[tuple[str, Mesh, np.ndarray]] = []  # (key, mesh, GT points) for files and preview
    decoded = 0

    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad(), (autocast or contextlib.nullcontext()):
            for batch in itertools.islice(batches, s.max_batches):
                _check_batch(batch)
                batch = _to_device(batch, device)
                surface, vol, near = batch["surface"], batch["vol"], batch["near"]
                latents = vae.encode(surface, sample_posterior=False)
                tokens = vae.decode(latents)
                pred_vol = query_chunked(vae, tokens, vol[..., :3], s.chunk_size)  # [B, Nv]
                pred_near = query_chunked(vae, tokens, near[..., :3], s.chunk_size)  # [B, Nn]
                metrics["v_iou"].update(pred_vol, vol[..., 3])
                metrics["s_iou"].update(pred_near, near[..., 3])
                metrics["s_error"].update(pred_near, near[..., 3])
                metrics["v_iou_baseline"].update(bounding_sphere_sdf(surface[..., :3], vol[..., :3]), vol[..., 3])
                metrics["s_iou_baseline"].update(all_inside_sdf(near[..., :3]), near[..., 3])
                metrics["shapes"].update(len(surface))

                k = min(s.num_mesh_shapes - decoded, len(surface))
                if k <= 0:
                    continue
                meshes = decode_mesh(vae, latents[:k], s.resolution, s.bounds, decoder=decoder)
                keys = batch.get("key") or [f"shape{decoded + i}" for i in range(k)]
                for i, mesh in enumerate(meshes):
                    gt = surface[i, surface[i, :, 6] < 0.5, :3]  # [G, 3] uniform surface samples
                    pred = mesh_samples(mesh, s.mesh_samples or len(gt), s.seed, device)
                    metrics["chamfer"].update([pred], [gt])
                    metrics["fscore"].update([pred], [gt])
                    metrics["decode_ms"].update(mesh.stats.seconds * 1000.0)
                    metrics["queries"].update(float(mesh.stats.queries))
                    metrics["empty_meshes"].update(float(mesh.is_empty))
                    kept.append((str(keys[i]), mesh, gt.float().cpu().numpy()))
                decoded += k
    finally:
        vae.train(was_training)

    # the same names on every rank (compute() synchronizes), whatever each rank's share of the stream held
    names = list(iou) + ["shapes"] + (list(mesh_metrics) if s.num_mesh_shapes > 0 else [])
    results = {name: float(metrics[name].compute()) for name in names}
    results.update({f"s_error_{band}": float(e) for band, e in zip(bands.names(), metrics["s_error"].compute())})
    return results, (write_mesh_files(Path(out_dir), kept, s) if out_dir is not None else [])


def write_mesh_files(out_dir: Path, kept: list[tuple[str, Mesh, np.ndarray]], s: EvalSettings) -> list[Path]:
    """The first ``num_saved_meshes`` non-empty meshes as PLY and one preview PNG, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for key, mesh, _ in [item for item in kept if not item[1].is_empty][:s.num_saved_meshes]:
        path = out_dir / f"{_file_name(key)}.ply"
        mesh.to_trimesh().export(path)
        files.append(path)
    if kept and s.preview_shapes > 0:
        files.append(save_preview(out_dir / "preview.png", kept[:s.preview_shapes], s.preview_size, s.seed))
    return files


def evaluate(vae, dataloader: Iterable[dict[str, Any]], out_dir: str | Path | None = None,
             device: torch.device | str | None = None, decoder: VolumeDecoder | None = None,
             **settings: Any) -> dict[str, float]:
    """Standalone evaluation (``fvdm eval``): metrics over ``dataloader``; meshes and preview into ``out_dir``.

    ``settings`` are :class:`EvalSettings` fields (resolution, num_mesh_shapes, max_batches, ...).
    """
    results, _ = run_evaluation(vae, dataloader, EvalSettings(**settings), device=device, out_dir=out_dir,
                                decoder=decoder)
    return results


class ReconstructionEval(Callback):
    """Evaluates ``pl_module.vae`` on ``trainer.datamodule.val_dataloader()`` every ``every_n_steps`` optimizer
    steps and when training ends (not when a SLURM requeue ends the attempt); logs ``{prefix}/v_iou`` etc. to
    every logger and, for MLflow, the meshes and preview as artifacts under ``reconstructions/step_NNNNNNN``."""

    def __init__(self, every_n_steps: int = 1000, resolution: int = 128, num_mesh_shapes: int = 4,
                 max_batches: int | None = 8, fscore_threshold: float = 0.02, out_dir: str | Path | None = None,
                 prefix: str = "val", decoder: VolumeDecoder | None = None, **settings: Any):
        if every_n_steps < 1:
            raise ValueError(f"ReconstructionEval: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.out_dir, self.prefix, self.decoder = every_n_steps, out_dir, prefix, decoder
        self.settings = EvalSettings(resolution=resolution, num_mesh_shapes=num_mesh_shapes, max_batches=max_batches,
                                     fscore_threshold=fscore_threshold, **settings)
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            results = self._evaluate(trainer, pl_module)
            for name, value in results.items():  # into callback_metrics (checkpoint monitors); loggers get them below
                pl_module.log(name, value, on_step=True, on_epoch=False, logger=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if any(getattr(callback, "requeued", False) for callback in trainer.callbacks):
            return  # a SLURM requeue ends this attempt (``SlurmRequeue``): the job is about to be killed
        if trainer.global_step != self._last_step:  # self.log is closed here: set callback_metrics directly, so that
            results = self._evaluate(trainer, pl_module)  # readers after fit see the final model, not the last period
            trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in results.items()})

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        step = self._last_step = trainer.global_step
        if trainer.datamodule is None:
            raise RuntimeError("ReconstructionEval: the trainer has no datamodule; fit with datamodule=... "
                               "so that its val_dataloader() can be read")
        loaders = trainer.datamodule.val_dataloader()
        stream = itertools.chain.from_iterable(loaders) if isinstance(loaders, (list, tuple)) else loaders
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "reconstructions") / f"step_{step:07d}"
        results, files = run_evaluation(
            pl_module.vae, stream, self.settings, device=pl_module.device,
            out_dir=out_dir if trainer.is_global_zero else None, decoder=self.decoder,
            autocast=trainer.precision_plugin.forward_context())
        results = {f"{self.prefix}/{name}": value for name, value in results.items()}
        for logger in trainer.loggers:
            logger.log_metrics(results, step=step)
            if isinstance(logger, MLFlowLogger) and files:
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path), f"reconstructions/step_{step:07d}")
        return results
