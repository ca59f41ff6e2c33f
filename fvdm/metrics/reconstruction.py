"""Reconstruction metrics (torchmetrics, so states sum across ranks) and the trivial baselines they stand beside.

- :class:`OccupancyIoU`: per-shape IoU of occupancy (SDF < 0, negative inside) at the same points, averaged
  over shapes. On uniform volume samples it is V-IoU, on near-surface samples S-IoU.
- :class:`ChamferDistance`: per shape, the mean of the two one-sided mean nearest-neighbour distances
  (plain L2, not squared) between predicted surface samples and ground-truth surface points; averaged over shapes.
- :class:`FScore`: per shape, the harmonic mean of precision (predicted points within ``threshold`` of the
  ground truth) and recall (ground-truth points within ``threshold`` of the prediction); averaged over shapes.
- :class:`SignErrorByBand`: the share of points on the wrong side of the surface, per band of ground-truth
  |SDF|: where S-IoU is lost (a field blurred by a few voxels errs at every distance; one that is only
  imprecise errs in the thinnest band alone).
- Baselines: :func:`bounding_sphere_sdf` (V-IoU) and :func:`all_inside_sdf` (S-IoU).
"""
from __future__ import annotations

from typing import Sequence

import torch
from scipy.spatial import cKDTree
from torchmetrics import Metric

MAX_PAIRS = 1 << 24  # distance-matrix entries per torch.cdist call (64 MiB in float32)

Points = torch.Tensor | Sequence[torch.Tensor]  # [B, P, 3] or B tensors [P_i, 3] of varying length


def nearest_distances(a: torch.Tensor, b: torch.Tensor, method: str = "auto",
                      max_pairs: int = MAX_PAIRS) -> torch.Tensor:
    """For points a [N, 3] the L2 distance to the nearest of b [M, 3] (M >= 1) -> [N] float32, exact.

    ``method``: "cdist" (torch.cdist in row chunks of ``max_pairs`` entries, on any device), "kdtree" (scipy,
    CPU) or "auto": the KD-tree for CPU tensors, where brute force takes seconds at 2e4 points, else cdist.
    """
    if method == "auto":
        method = "kdtree" if a.device.type == "cpu" else "cdist"
    if method == "kdtree":
        dist, _ = cKDTree(b.detach().double().cpu().numpy()).query(a.detach().double().cpu().numpy())
        return torch.as_tensor(dist, dtype=torch.float32, device=a.device).reshape(len(a))
    if method != "cdist":
        raise ValueError(f"nearest_distances: method must be 'auto', 'cdist' or 'kdtree', got {method!r}")
    rows = max(1, max_pairs // max(len(b), 1))
    a, b = a.float(), b.float()
    # direct differences, not the matmul expansion, which loses the small distances Chamfer is about
    out = [torch.cdist(a[s:s + rows], b, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
           for s in range(0, len(a), rows)]
    return torch.cat(out) if out else a.new_zeros(0)


def _shapes(x: Points, name: str) -> list[torch.Tensor]:
    """Split a [B, P, 3] tensor or a sequence of [P_i, 3] tensors into per-shape [P_i, 3] tensors."""
    items = list(x.unbind(0)) if isinstance(x, torch.Tensor) and x.ndim == 3 else list(x)
    for t in items:
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != 3:
            raise ValueError(f"{name}: expected [B, P, 3] or a sequence of [P, 3] tensors, "
                             f"got an item of shape {getattr(t, 'shape', type(t))}")
    return items


def _pairs(preds: Points, targets: Points, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    p, t = _shapes(preds, name), _shapes(targets, name)
    if len(p) != len(t):
        raise ValueError(f"{name}: {len(p)} predicted shapes but {len(t)} target shapes")
    if any(len(g) == 0 for g in t):
        raise ValueError(f"{name}: a target shape has no points")
    return list(zip(p, t))


class OccupancyIoU(Metric):
    """Occupancy IoU per shape (pred_sdf < 0 vs gt_sdf < 0 at the same points), averaged over shapes.

    A shape where neither side has an inside point scores ``zero_division`` (default 1: they agree).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, zero_division: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.zero_division = zero_division
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_sdf: torch.Tensor, gt_sdf: torch.Tensor) -> None:
        """pred_sdf, gt_sdf: [B, P] (or [P] for one shape) SDF values at the same points, negative inside."""
        if pred_sdf.shape != gt_sdf.shape or pred_sdf.ndim not in (1, 2):
            raise ValueError(f"OccupancyIoU: pred_sdf and gt_sdf must both be [B, P]; "
                             f"got {tuple(pred_sdf.shape)} and {tuple(gt_sdf.shape)}")
        pred, gt = (pred_sdf < 0).view(-1, pred_sdf.shape[-1]), (gt_sdf < 0).view(-1, gt_sdf.shape[-1])  # [B, P]
        inter = (pred & gt).sum(dim=1).double()
        union = (pred | gt).sum(dim=1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, self.zero_division))
        self.iou_sum += iou.sum()
        self.count += len(iou)

    def compute(self) -> torch.Tensor:
        return (self.iou_sum / self.count).float()


class SignErrorByBand(Metric):
    """Sign error rate (pred_sdf < 0 differs from gt_sdf < 0) over all points, per band of |gt_sdf| between
    consecutive ``edges`` (plus one band below the first edge and one above the last). ``names()`` labels them."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, edges: Sequence[float] = (0.002, 0.005, 0.01, 0.02, 0.05), **kwargs):
        super().__init__(**kwargs)
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] <= 0:
            raise ValueError(f"SignErrorByBand: edges must be positive and increasing, got {list(edges)}")
        self.edges = tuple(float(e) for e in edges)
        self.add_state("wrong", torch.zeros(len(edges) + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(len(edges) + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def names(self) -> list[str]:
        """One label per band: ``lt0.002``, ``0.002_0.005``, ..., ``gt0.05``."""
        e = [f"{x:g}" for x in self.edges]
        return [f"lt{e[0]}", *(f"{a}_{b}" for a, b in zip(e, e[1:])), f"gt{e[-1]}"]

    def update(self, pred_sdf: torch.Tensor, gt_sdf: torch.Tensor) -> None:
        """pred_sdf, gt_sdf: SDF values at the same points (any equal shapes), negative inside."""
        if pred_sdf.shape != gt_sdf.shape:
            raise ValueError(f"SignErrorByBand: shapes differ, {tuple(pred_sdf.shape)} and {tuple(gt_sdf.shape)}")
        band = torch.bucketize(gt_sdf.abs().flatten().float(), torch.tensor(self.edges, device=gt_sdf.device))
        wrong = ((pred_sdf < 0) != (gt_sdf < 0)).flatten().double()
        self.wrong += torch.zeros_like(self.wrong).scatter_add_(0, band, wrong)
        self.total += torch.bincount(band, minlength=len(self.edges) + 1).double()

    def compute(self) -> torch.Tensor:
        """[bands] error rates (NaN for a band with no points)."""
        return (self.wrong / self.total).float()


class ChamferDistance(Metric):
    """Mean over shapes of 0.5 * (mean_p min_g |p - g| + mean_g min_p |g - p|), L2 distance (not squared).

    A shape whose prediction is empty has no Chamfer distance: it is left out of the mean and counted in
    ``num_empty``; if every prediction is empty the result is NaN.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.method = method  # nearest-neighbour search, see nearest_distances
        self.add_state("dist_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("num_empty", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Points, targets: Points) -> None:
        """preds: predicted surface samples, targets: ground-truth surface points, per shape ([B, P, 3] or lists)."""
        for p, g in _pairs(preds, targets, "ChamferDistance"):
            if len(p) == 0:
                self.num_empty += 1
                continue
            d_pg = nearest_distances(p, g, self.method).double().mean()
            d_gp = nearest_distances(g, p, self.method).double().mean()
            self.dist_sum += 0.5 * (d_pg + d_gp)
            self.count += 1

    def compute(self) -> torch.Tensor:
        return (self.dist_sum / self.count).float()


class FScore(Metric):
    """Mean over shapes of the F-score at distance ``threshold``; an empty prediction scores 0."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        if not threshold > 0:
            raise ValueError(f"FScore: threshold must be > 0, got {threshold}")
        self.threshold, self.method = threshold, method
        self.add_state("fscore_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Points, targets: Points) -> None:
        """preds: predicted surface samples, targets: ground-truth surface points, per shape ([B, P, 3] or lists)."""
        for p, g in _pairs(preds, targets, "FScore"):
            self.count += 1
            if len(p) == 0:
                continue
            precision = (nearest_distances(p, g, self.method) < self.threshold).double().mean()
            recall = (nearest_distances(g, p, self.method) < self.threshold).double().mean()
            if precision + recall > 0:
                self.fscore_sum += 2 * precision * recall / (precision + recall)

    def compute(self) -> torch.Tensor:
        return (self.fscore_sum / self.count).float()


def bounding_sphere_sdf(surface_xyz: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """SDF [B, P] of each input cloud's bounding sphere (centre: bbox centre of the cloud [B, N, 3], radius: the
    farthest cloud point from it), at points [B, P, 3]; negative inside. The V-IoU baseline."""
    centre = (surface_xyz.amin(dim=1) + surface_xyz.amax(dim=1)) / 2  # [B, 3]
    radius = (surface_xyz - centre[:, None]).norm(dim=-1).amax(dim=1)  # [B]
    return (points - centre[:, None]).norm(dim=-1) - radius[:, None]


def all_inside_sdf(points: torch.Tensor) -> torch.Tensor:
    """-1 at every point [B, P, 3] -> [B, P]: "everything inside", the S-IoU baseline."""
    return -torch.ones(points.shape[:-1], dtype=points.dtype, device=points.device)
