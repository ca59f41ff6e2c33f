"""The flow-matching convention (fvdm.flow) and the Euler / CFG sampler (fvdm.sampler)."""
from __future__ import annotations

import pytest
import torch

from fvdm import flow
from fvdm.models.dit import DiTConfig, FlowDiT
from fvdm.sampler import euler_sample, guided_velocity


def test_convention_endpoints_and_velocity():
    x1, eps = torch.randn(4, 8, 3), torch.randn(4, 8, 3)
    assert torch.equal(flow.interpolate(x1, eps, torch.zeros(4)), eps)  # t = 0 is noise
    assert torch.equal(flow.interpolate(x1, eps, torch.ones(4)), x1)  # t = 1 is data
    t = torch.rand(4)
    x_t = flow.interpolate(x1, eps, t)
    v = flow.velocity_target(x1, eps)
    # along the straight path the true velocity carries x_t to data and back to noise
    torch.testing.assert_close(flow.data_estimate(x_t, v, t), x1)
    torch.testing.assert_close(flow.euler_step(x_t, v, t, torch.zeros(4)), eps)
    # finite difference of the path equals the target
    h = 1e-3
    fd = (flow.interpolate(x1.double(), eps.double(), t.double() + h) - flow.interpolate(x1.double(), eps.double(),
                                                                                     t.double())) / h
    torch.testing.assert_close(fd, v.double())


def test_shift_is_on_the_noise_level():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(flow.shift_time(t, 1.0), t)
    shifted = flow.shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] < t[1:-1]).all()  # s > 1 keeps more of the grid near noise (small t)


def test_timestep_sampling_ranges():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_timesteps(4000, flow.TimestepSampling(), generator=g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    ln = flow.sample_timesteps(4000, flow.TimestepSampling(kind="logit_normal", std=0.5), generator=g)
    assert abs(ln.median() - 0.5) < 0.03 and ln.std() < u.std()


def test_time_grid_has_one_evaluation_per_step():
    grid = flow.time_grid(5)
    assert torch.equal(grid, torch.tensor([0, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))


class CountingDiT(torch.nn.Module):
    """Wraps a FlowDiT and records the batch size and times of every call."""

    def __init__(self, dit: FlowDiT):
        super().__init__()
        self.dit, self.cfg, self.calls = dit, dit.cfg, []

    def forward(self, x, t, cond, guidance=None):
        self.calls.append((x.shape[0], t.tolist()))
        return self.dit(x, t, cond, guidance=guidance)


def _dit(guidance_embed=False) -> FlowDiT:
    torch.manual_seed(0)
    return FlowDiT(DiTConfig(in_channels=4, context_in_dim=6, hidden_size=32, num_heads=2, depth=1,
                             depth_single_blocks=1, guidance_embed=guidance_embed))


def test_euler_sampler_spends_one_evaluation_per_step_and_never_evaluates_t1():
    dit = CountingDiT(_dit())
    noise, cond = torch.randn(2, 5, 4), torch.randn(2, 3, 6)
    euler_sample(dit, noise, cond, torch.zeros_like(cond), steps=4, guidance=5.0)
    assert len(dit.calls) == 4
    assert all(b == 4 for b, _ in dit.calls)  # CFG doubles the batch
    assert [ts[0] for _, ts in dit.calls] == [0.0, 0.25, 0.5, 0.75]


def test_cfg_mix_and_the_guidance_embedded_path():
    dit = _dit()
    x, cond = torch.randn(2, 5, 4), torch.randn(2, 3, 6)
    t = torch.tensor([0.3, 0.7])
    uncond = torch.zeros_like(cond)
    v_c, v_u = dit(x, t, cond), dit(x, t, uncond)
    torch.testing.assert_close(guided_velocity(dit, x, t, cond, uncond, 5.0), v_u + 5.0 * (v_c - v_u))
    torch.testing.assert_close(guided_velocity(dit, x, t, cond, uncond, 1.0), v_c)
    student = CountingDiT(_dit(guidance_embed=True))
    euler_sample(student, torch.randn(2, 5, 4), cond, uncond, steps=3, guidance=5.0)
    assert len(student.calls) == 3 and all(b == 2 for b, _ in student.calls)  # one pass, no doubling


def test_euler_on_a_straight_path_is_exact():
    """A model returning the true (constant) velocity of one path lands on its data point in any step count."""
    x1, eps = torch.randn(1, 5, 4), torch.randn(1, 5, 4)

    class Oracle(torch.nn.Module):
        cfg = DiTConfig(in_channels=4)

        def forward(self, x, t, cond, guidance=None):
            return (x1 - eps).expand_as(x)

    for steps in (1, 3, 50):
        torch.testing.assert_close(euler_sample(Oracle(), eps, torch.zeros(1, 1, 6), None, steps=steps), x1)


def test_sampler_follows_a_given_grid():
    from fvdm.consistency import phased_grid

    dit = CountingDiT(_dit(guidance_embed=True))
    cond = torch.randn(1, 3, 6)
    euler_sample(dit, torch.randn(1, 5, 4), cond, None, guidance=5.0, grid=phased_grid(5, 5))
    assert [ts[0] for _, ts in dit.calls] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
