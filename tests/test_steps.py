"""Step rules: the KL-budget step meets its quadratic KL exactly; faults never reach the parameters."""

import math

import pytest
import torch

from natpg.fisher import Dense, dense_fisher
from natpg.params import get_flat
from natpg.policies import GaussianMLP
from natpg.steps import FixedStep, KLStep, quadratic_kl_step


def setup(seed=0):
    torch.manual_seed(seed)
    policy = GaussianMLP(4, 2, hidden=(6,))
    with torch.no_grad():  # away from the near-singular Fisher of the initial, almost-zero output layer
        for p in policy.parameters():
            p.add_(0.5 * torch.randn_like(p))
    obs = torch.randn(20, 4)
    curv = Dense(damping=0.0)
    curv.fit(policy, obs)
    return policy, obs, curv


def test_kl_step_gives_quadratic_kl_delta(float64):
    policy, obs, curv = setup()
    F = dense_fisher(policy, obs)
    g = torch.randn(F.shape[0])
    d = curv.solve(g)
    before = get_flat(policy.actor_parameters())
    stats = KLStep(max_kl=0.01).apply(policy.actor_parameters(), d, g, curv, lambda: (0.0, 0.0))
    delta = get_flat(policy.actor_parameters()) - before
    assert 0.5 * float(delta @ F @ delta) == pytest.approx(0.01, rel=1e-9)
    assert stats["step/size"] == pytest.approx(math.sqrt(2 * 0.01 / float(d @ F @ d)), rel=1e-9)
    assert stats["step/skipped"] == 0.0


def test_kl_step_true_kl_matches_its_quadratic_model_for_small_budgets(float64):
    # A linear Gaussian policy keeps F well conditioned; on an ill-conditioned F the quadratic model is
    # only local along the flat directions, which is what damping is for.
    torch.manual_seed(5)
    policy = GaussianMLP(4, 2, hidden=())
    obs = torch.randn(50, 4)
    curv = Dense(damping=0.0)
    curv.fit(policy, obs)
    with torch.no_grad():
        old = policy.head.dist(policy(obs))
    g = torch.randn(sum(p.numel() for p in policy.actor_parameters()))
    KLStep(max_kl=1e-5).apply(policy.actor_parameters(), curv.solve(g), g, curv, lambda: (0.0, 0.0))
    with torch.no_grad():
        kl = torch.distributions.kl_divergence(old, policy.dist(obs)).mean().item()
    assert kl == pytest.approx(1e-5, rel=0.02)


class BrokenCurvature:
    damping = 0.0
    stats: dict = {}

    def __init__(self, value):
        self.value = value

    def mv(self, v):
        return torch.full_like(v, self.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_non_positive_or_non_finite_curvature_leaves_parameters_untouched(float64, value):
    policy, _, _ = setup(1)
    params = policy.actor_parameters()
    before = [p.detach().clone() for p in params]
    d = torch.ones(sum(p.numel() for p in params))
    stats = KLStep(0.01).apply(params, d, d, BrokenCurvature(value), lambda: (0.0, 0.0))
    assert stats["step/skipped"] == 1.0 and "dᵀFd" in stats["step/fault"]
    assert all(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("rule", [KLStep(0.01), FixedStep(0.1)])
def test_non_finite_direction_is_rejected(float64, rule):
    policy, _, curv = setup(2)
    params = policy.actor_parameters()
    before = [p.detach().clone() for p in params]
    d = torch.ones(sum(p.numel() for p in params))
    d[3] = float("nan")
    stats = rule.apply(params, d, d, curv, lambda: (0.0, 0.0))
    assert stats["step/skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_fixed_step_is_the_seeds_update(float64):
    policy, _, curv = setup(3)
    params = policy.actor_parameters()
    before = get_flat(params)
    d = torch.randn(before.numel())
    FixedStep(0.25).apply(params, d, d, curv, lambda: (0.0, 0.0))
    assert torch.allclose(get_flat(params), before + 0.25 * d)


def test_quadratic_kl_step_reports_fault_for_nan_direction(float64):
    _, _, curv = setup(4)
    alpha, _, fault = quadratic_kl_step(torch.full((curv.matrix.shape[0],), float("nan")), curv, 0.01)
    assert alpha == 0.0 and fault == "non-finite direction"
