"""Reconstruction metrics against torchmetrics' Jaccard index, brute force and hand-computed cases; baselines."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryJaccardIndex

from fvdm.metrics.reconstruction import (ChamferDistance, FScore, OccupancyIoU, SignErrorByBand, all_inside_sdf,
                                         bounding_sphere_sdf, nearest_distances)


def random_fields(seed: int, b: int = 6, p: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """gt and a noisy prediction [B, P]; shapes have very different inside fractions, one is empty everywhere."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.linspace(-1.5, 1.5, b)[:, None]
    gt = torch.randn(b, p, generator=g) + offset
    pred = gt + 0.7 * torch.randn(b, p, generator=g)
    gt[-1], pred[-1] = 1.0, 2.0  # nothing inside on either side: IoU counts as 1 (agreement)
    return pred, gt


def jaccard_per_shape(pred: torch.Tensor, gt: torch.Tensor) -> float:
    jac = BinaryJaccardIndex(zero_division=1.0)
    return float(torch.stack([jac((p < 0).int(), (t < 0).int()) for p, t in zip(pred, gt)]).mean())


def test_occupancy_iou_matches_torchmetrics_jaccard():
    pred, gt = random_fields(0)
    metric = OccupancyIoU()
    metric.update(pred[:2], gt[:2])
    metric.update(pred[2:], gt[2:])
    expected = jaccard_per_shape(pred, gt)
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)
    # per shape, not pooled over points: pooling gives a different number on this data
    pooled = float(BinaryJaccardIndex()((pred < 0).int().flatten(), (gt < 0).int().flatten()))
    assert abs(pooled - expected) > 1e-3


def test_occupancy_iou_states_sum_across_ranks():
    pred, gt = random_fields(1, b=5)
    rank0, rank1, single = OccupancyIoU(), OccupancyIoU(), OccupancyIoU()
    rank0.update(pred[:1], gt[:1])
    rank1.update(pred[1:], gt[1:])
    rank0.merge_state(rank1)  # what the "sum" reduction does across processes
    single.update(pred, gt)
    assert float(rank0.compute()) == pytest.approx(float(single.compute()), abs=1e-7)
    assert float(single.compute()) == pytest.approx(jaccard_per_shape(pred, gt), abs=1e-6)


def test_occupancy_iou_exact_values_and_errors():
    metric = OccupancyIoU()
    metric.update(torch.tensor([-1.0, -1.0, 1.0, 1.0]), torch.tensor([-1.0, 1.0, -1.0, 1.0]))  # 1 of 3
    assert float(metric.compute()) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="OccupancyIoU"):
        metric.update(torch.zeros(2, 3), torch.zeros(2, 4))


def lattice(n: int = 6, spacing: float = 0.1) -> torch.Tensor:
    x = torch.arange(n) * spacing
    return torch.stack(torch.meshgrid(x, x, x, indexing="ij"), dim=-1).reshape(-1, 3)  # [n^3, 3]


def test_nearest_distances_match_brute_force_with_both_searches():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(300, 3, generator=g), torch.rand(170, 3, generator=g)
    brute = np.sqrt(((a.numpy()[:, None] - b.numpy()[None]) ** 2).sum(-1)).min(1)
    for max_pairs in (1, 1000, 10 ** 6):
        assert np.allclose(nearest_distances(a, b, "cdist", max_pairs).numpy(), brute, atol=1e-6)
    assert np.allclose(nearest_distances(a, b, "kdtree").numpy(), brute, atol=1e-6)
    assert torch.equal(nearest_distances(a, b), nearest_distances(a, b, "kdtree"))  # the CPU default
    with pytest.raises(ValueError, match="method"):
        nearest_distances(a, b, "ball")


def test_chamfer_of_a_shifted_cloud_is_the_shift():
    gt = lattice()
    shift = torch.tensor([0.01, 0.02, -0.005])  # far below half the lattice spacing
    metric = ChamferDistance(method="cdist")
    metric.update(torch.stack([gt + shift, gt]), torch.stack([gt, gt]))  # shape 1: Chamfer |shift|, shape 2: 0
    assert float(metric.compute()) == pytest.approx(float(shift.norm()) / 2, rel=1e-4)


def test_chamfer_is_the_mean_of_both_one_sided_means():
    gt = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]])
    pred = torch.tensor([[0.0, 0, 0], [1, 0, 0]])  # pred->gt: 0; gt->pred: (0 + 0 + 1 + 2) / 4
    metric = ChamferDistance()
    metric.update([pred], [gt])
    assert float(metric.compute()) == pytest.approx(0.5 * (0 + 0.75))


def test_fscore_precision_recall_cases():
    gt = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]])
    metric = FScore(threshold=0.5)
    metric.update([gt[:2]], [gt])  # precision 1, recall 1/2 -> 2/3
    assert float(metric.compute()) == pytest.approx(2 / 3)
    shifted = FScore(threshold=0.03, method="cdist")
    shifted.update([lattice() + torch.tensor([0.02, 0, 0])], [lattice()])
    assert float(shifted.compute()) == pytest.approx(1.0)
    tight = FScore(threshold=0.01)
    tight.update([lattice() + torch.tensor([0.02, 0, 0])], [lattice()])
    assert float(tight.compute()) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        FScore(threshold=0.0)


def test_empty_prediction_scores_zero_fscore_and_is_left_out_of_chamfer():
    gt = lattice(3)
    chamfer, fscore = ChamferDistance(), FScore(threshold=0.05)
    for m in (chamfer, fscore):
        m.update([torch.zeros(0, 3), gt + 0.01], [gt, gt])
    assert int(chamfer.num_empty) == 1
    assert float(chamfer.compute()) == pytest.approx(math.sqrt(3) * 0.01, rel=1e-4)
    assert float(fscore.compute()) == pytest.approx(0.5)  # (0 + 1) / 2
    with pytest.raises(ValueError, match="2 predicted shapes but 1"):
        chamfer.update([gt, gt], [gt])


def test_bounding_sphere_baseline():
    corners = torch.tensor([[x, y, z] for x in (0.0, 2.0) for y in (0.0, 1.0) for z in (0.0, 1.0)])[None]  # [1, 8, 3]
    radius = math.sqrt(1 + 0.25 + 0.25)
    pts = torch.tensor([[[1.0, 0.5, 0.5], [1.0 + radius, 0.5, 0.5], [1.0, 0.5, 3.5]]])
    sdf = bounding_sphere_sdf(corners, pts)
    assert torch.allclose(sdf, torch.tensor([[-radius, 0.0, 3.0 - radius]]), atol=1e-6)
    assert (bounding_sphere_sdf(corners, corners) <= 1e-6).all()  # the cloud lies inside its sphere


def test_all_inside_baseline_scores_about_half_on_straddling_points():
    g = torch.Generator().manual_seed(0)
    near_sdf = torch.randn(4, 2000, generator=g) * 0.01  # near-surface samples: half inside, half outside
    metric = OccupancyIoU()
    metric.update(all_inside_sdf(torch.zeros(4, 2000, 3)), near_sdf)
    assert float(metric.compute()) == pytest.approx(float((near_sdf < 0).float().mean()), abs=1e-6)
    assert 0.45 < float(metric.compute()) < 0.55


def test_sign_error_by_band_counts_each_band():
    metric = SignErrorByBand(edges=(0.01, 0.1))
    assert metric.names() == ["lt0.01", "0.01_0.1", "gt0.1"]
    gt = torch.tensor([[0.005, -0.005, 0.05, -0.05], [0.5, -0.5, 0.008, 0.2]])
    pred = torch.tensor([[-0.1, -0.1, 0.3, 0.3], [0.1, 0.1, 0.1, 0.1]])  # wrong: 0.005, -0.05, -0.5
    metric.update(pred[:1], gt[:1])
    metric.update(pred[1:], gt[1:])
    torch.testing.assert_close(metric.compute(), torch.tensor([1 / 3, 1 / 2, 1 / 3]))
    empty = SignErrorByBand(edges=(0.01,))
    empty.update(torch.zeros(3), torch.full((3,), 0.5))
    assert math.isnan(empty.compute()[0]) and empty.compute()[1] == 0
    with pytest.raises(ValueError, match="increasing"):
        SignErrorByBand(edges=(0.1, 0.01))
