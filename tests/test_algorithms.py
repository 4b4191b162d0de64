"""TRPO, ACKTR, VPG and PPO: each step rule against an independent reference, then learning tests.

References never come from the code under test: KL(old‖new) measured exactly with ``mean_kl``; the
dense Fisher (``dense_fisher``); K-FAC matrices assembled by ``torch.kron`` from the fitted factors;
Gauss-Newton matrices from per-sample Jacobians (``torch.func.jacrev``); least squares by
``torch.linalg.lstsq``; PPO's objective by hand.
"""

from __future__ import annotations

import copy
import math
import time
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import natpg
from natpg import fisher
from natpg.acktr import GaussNewtonKFAC, KFACRegression
from natpg.algorithms import Batch, NaturalGradientUpdate, make_actor_update, mean_kl, surrogate
from natpg.config import Config
from natpg.critics import AdamRegression, ValueCritic
from natpg.params import flatten, get_flat
from natpg.policies import CategoricalMLP, GaussianMLP
from natpg.presets import config_for, default_config
from natpg.ppo import ClippedRegression, ClippedSurrogateUpdate, clipped_surrogate
from natpg.steps import AdamStep, FixedStep, KFACClip, KLStep, LineSearch

OBS_DIM = 3


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: maths in float64


def make_policy(kind: str, hidden: tuple[int, ...] = (8,), seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    policy = GaussianMLP(OBS_DIM, 2, hidden) if kind == "gauss" else CategoricalMLP(OBS_DIM, 3, hidden)
    with torch.no_grad():  # away from the near-uniform init, so the Fisher varies with the state
        for p in policy.actor_parameters():
            p.normal_(0.0, 0.5)
    return policy


def make_batch(policy: nn.Module, n: int = 64, seed: int = 1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, OBS_DIM, generator=gen)
    with torch.no_grad():
        eta = policy(obs)
        act = policy.sample(eta, generator=gen)
        logp = policy.head.dist(eta).log_prob(act)
    adv = torch.randn(n, generator=gen)
    return Batch(obs=obs, act=act, adv=(adv - adv.mean()) / adv.std(), ret=torch.zeros(n), logp_old=logp,
                 eta_old=eta)


def kl_now(policy: nn.Module, batch: Batch) -> float:
    with torch.no_grad():
        return float(mean_kl(policy, batch))


def evaluator(policy: nn.Module, batch: Batch, log: list | None = None):
    @torch.no_grad()
    def evaluate():
        out = float(surrogate(policy, batch)), float(mean_kl(policy, batch))
        if log is not None:
            log.append(out)
        return out

    return evaluate


def gradient(policy: nn.Module, batch: Batch) -> torch.Tensor:
    return flatten(torch.autograd.grad(surrogate(policy, batch), policy.actor_parameters())).detach()


class ScaledCurvature:
    """A curvature whose ``mv`` under-reports F by ``scale`` — makes the quadratic KL step too long on purpose."""

    def __init__(self, inner, scale: float):
        self.inner, self.scale, self.damping, self.stats = inner, scale, inner.damping, {}

    def fit(self, policy, obs, act=None):
        self.inner.fit(policy, obs, act)

    def solve(self, g):
        return self.inner.solve(g)

    def mv(self, v):
        return self.scale * self.inner.mv(v)


# --------------------------------------------------------------------------------------------------
# NPG's KL step with Fisher products on a subsample
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subsampled_npg_step_meets_the_kl_budget_on_the_whole_batch_only_with_batch_step_length(seed):
    """CG on a tenth of the batch (26 of 256 states, rank ≤ 54 against 372 parameters): with the step length read
    from the whole batch the exact mean KL over the batch lands on δ (to second order); read from the subsample,
    whose Fisher misses most directions, the same step overshoots δ several times over."""
    torch.manual_seed(seed)
    base = GaussianMLP(OBS_DIM, 2, hidden=(16, 16))
    with torch.no_grad():
        for p in base.actor_parameters():
            p.normal_(0.0, 0.5)
    batch, delta = make_batch(base, n=256), 1e-4
    kl_over_delta = {}
    for step_length in ("batch", "subsample"):
        policy = copy.deepcopy(base)
        curvature = fisher.CG(damping=1e-3, iters=10, subsample=0.1, step_length=step_length,
                              generator=torch.Generator().manual_seed(0))
        NaturalGradientUpdate(curvature, KLStep(delta)).update(policy, batch)
        kl_over_delta[step_length] = kl_now(policy, batch) / delta
    assert 0.9 < kl_over_delta["batch"] < 1.05, kl_over_delta
    assert kl_over_delta["subsample"] > 3.0, kl_over_delta


# --------------------------------------------------------------------------------------------------
# TRPO: line search
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gauss", "cat"])
def test_trpo_accepted_step_satisfies_kl_bound_measured_exactly(kind):
    policy = make_policy(kind)
    batch = make_batch(policy)
    delta = 0.01
    update = NaturalGradientUpdate(fisher.CG(damping=1e-3, iters=50), LineSearch(delta, 0.8, 10))
    stats = update.update(policy, batch)
    kl = kl_now(policy, batch)
    assert stats["step/accepted"] == 1.0
    assert 0.0 < kl <= delta
    assert stats["step/kl"] == pytest.approx(kl, rel=1e-12)
    assert stats["step/surrogate_gain"] > 0.0
    assert stats["step/actual_improve"] == pytest.approx(stats["step/surrogate_gain"], rel=1e-9)
    # The first-order prediction of a short natural step is close to what the surrogate measures.
    assert stats["step/improve_ratio"] == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("kind", ["gauss", "cat"])
def test_trpo_backtracks_until_kl_bound_holds(kind):
    """mv under-reports F 50×, so the full step's KL is ≈ 50δ; the search must shrink until KL ≤ δ."""
    policy = make_policy(kind)
    batch = make_batch(policy)
    delta, shrink = 0.005, 0.5
    curvature = ScaledCurvature(fisher.Dense(damping=1e-3), 0.02)
    log: list = []
    curvature.fit(policy, batch.obs)
    g = gradient(policy, batch)
    d = curvature.solve(g)
    stats = LineSearch(delta, shrink, 15).apply(policy.actor_parameters(), d, g, curvature,
                                                evaluator(policy, batch, log))
    kl = kl_now(policy, batch)
    assert stats["step/accepted"] == 1.0
    assert stats["step/backtracks"] >= 2
    assert kl <= delta and kl == pytest.approx(stats["step/kl"], rel=1e-12)
    assert stats["step/kl_full_step"] > 10 * delta
    # Every try before the accepted one failed (KL too large or no improvement); log[0] is surr_before.
    surr_before = log[0][0]
    for surr, kl_k in log[1:-1]:
        assert kl_k > delta or surr <= surr_before
    assert stats["step/size"] == pytest.approx(math.sqrt(2 * delta / stats["step/dFd"]) * shrink**stats["step/backtracks"])


@pytest.mark.parametrize("kind", ["gauss", "cat"])
def test_trpo_descent_direction_rejected_and_parameters_restored_bit_exactly(kind):
    policy = make_policy(kind)
    batch = make_batch(policy)
    before = [p.detach().clone() for p in policy.actor_parameters()]
    curvature = fisher.CG(damping=1e-3, iters=50)
    curvature.fit(policy, batch.obs)
    g = gradient(policy, batch)
    d = -curvature.solve(g)  # lowers the surrogate at every length
    tries, log = 10, []
    stats = LineSearch(0.01, 0.8, tries).apply(policy.actor_parameters(), d, g, curvature,
                                               evaluator(policy, batch, log))
    assert stats["step/accepted"] == 0.0 and stats["step/backtracks"] == tries
    assert len(log) == 1 + tries
    assert all(surr < log[0][0] for surr, _ in log[1:])  # rejected at every shrink for lack of improvement
    assert all(torch.equal(p, b) for p, b in zip(policy.actor_parameters(), before))
    assert kl_now(policy, batch) == 0.0


@pytest.mark.parametrize("rule", [LineSearch(0.01), KFACClip(0.01, 1.0), FixedStep(0.1), AdamStep(0.1)])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_direction_never_reaches_parameters(rule, bad):
    policy = make_policy("gauss")
    batch = make_batch(policy)
    before = get_flat(policy.actor_parameters())
    curvature = fisher.Dense(damping=0.1)
    curvature.fit(policy, batch.obs)
    g = gradient(policy, batch)
    d = curvature.solve(g)
    d[3] = float(bad)
    stats = rule.apply(policy.actor_parameters(), d, g, curvature, evaluator(policy, batch))
    assert stats["step/skipped"] == 1.0 and "non-finite" in stats["step/fault"]
    assert torch.equal(get_flat(policy.actor_parameters()), before)


@pytest.mark.parametrize("rule", [LineSearch(0.01), KFACClip(0.01, 1.0)])
def test_non_positive_curvature_is_skipped(rule):
    policy = make_policy("gauss")
    batch = make_batch(policy)
    before = get_flat(policy.actor_parameters())
    curvature = ScaledCurvature(fisher.Dense(damping=0.1), -1.0)  # dᵀFd < 0
    curvature.fit(policy, batch.obs)
    g = gradient(policy, batch)
    stats = rule.apply(policy.actor_parameters(), curvature.solve(g), g, curvature, evaluator(policy, batch))
    assert stats["step/skipped"] == 1.0 and "not positive" in stats["step/fault"]
    assert torch.equal(get_flat(policy.actor_parameters()), before)


@pytest.mark.parametrize("rule", [KLStep(0.01), LineSearch(0.01), KFACClip(0.01, 1.0)])
def test_a_zero_direction_is_no_step_and_no_fault(rule):
    """A vanished gradient (a deterministic policy, nothing in the batch to learn) gives d = 0: the rules take no
    step and report no fault, so that training is not stopped for it."""
    policy = make_policy("gauss")
    batch = make_batch(policy)
    before = get_flat(policy.actor_parameters())
    curvature = fisher.Dense(damping=0.1)
    curvature.fit(policy, batch.obs)
    tiny = torch.finfo(before.dtype).tiny ** 0.5 * 1e-10  # a direction whose dᵀFd underflows to 0
    for g in (torch.zeros_like(before), torch.full_like(before, tiny)):
        stats = rule.apply(policy.actor_parameters(), curvature.solve(g), g, curvature, evaluator(policy, batch))
        assert stats["step/skipped"] == 0.0 and "step/fault" not in stats and stats["step/size"] == 0.0
        assert torch.equal(get_flat(policy.actor_parameters()), before)
        assert stats.get("step/backtracks", 0.0) == 0.0  # not logged as a failed line search
        assert stats.get("step/kl_bound_active", 0.0) == 0.0  # nor as a step the KL bound set
        rule.v = None  # ACKTR: no momentum carried into the second case


# --------------------------------------------------------------------------------------------------
# ACKTR: the actor's K-FAC trust-region step
# --------------------------------------------------------------------------------------------------

def wbar_index(params: list[nn.Parameter], layer: nn.Linear) -> torch.Tensor:
    """Flat positions of W̄ = [W | b] (row-major) in the flat vector of ``params``."""
    off, i = {}, 0
    for p in params:
        off[id(p)] = i
        i += p.numel()
    out_dim, in_dim = layer.weight.shape
    return torch.tensor([[off[id(layer.weight)] + o * in_dim + j for j in range(in_dim)] + [off[id(layer.bias)] + o]
                         for o in range(out_dim)]).reshape(-1)


def dense_kfac(policy: nn.Module, kfac: fisher.KFAC) -> torch.Tensor:
    """The documented damped K-FAC matrix blockdiag((A + π√λI) ⊗ (G + √λ/π I), F_rest + λI), by torch.kron."""
    params = list(policy.actor_parameters())
    P = sum(p.numel() for p in params)
    M = torch.zeros(P, P)
    lam = kfac.damping
    layers = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    for layer, (A, G) in zip(layers, kfac.factors):
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        idx = wbar_index(params, layer)
        M[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(G + math.sqrt(lam) / pi * torch.eye(G.shape[0]),
                                                           A + pi * math.sqrt(lam) * torch.eye(A.shape[0]))
    if kfac.rest_fisher is not None:
        r = kfac.structure.rest_idx
        M[r.unsqueeze(1), r.unsqueeze(0)] = kfac.rest_fisher + lam * torch.eye(len(r))
    return M


@pytest.mark.parametrize("kind", ["gauss", "cat"])
def test_acktr_step_meets_documented_quadratic_kl(kind):
    """½ ΔθᵀF̂Δθ = δ exactly (F̂ the damped K-FAC matrix, dense, float64) when η_max does not bind, ≤ δ when it does."""
    policy = make_policy(kind, hidden=(6, 5))
    batch = make_batch(policy, n=80)
    delta = 2e-3
    kfac = fisher.KFAC(damping=0.01, estimator="exact")
    kfac.fit(policy, batch.obs)
    M = dense_kfac(policy, kfac)
    g = gradient(policy, batch)
    d = kfac.solve(g)
    torch.testing.assert_close(M @ d, g, rtol=1e-8, atol=1e-10)  # d = F̂⁻¹g with this very matrix
    params = policy.actor_parameters()

    theta0 = get_flat(params)
    rule = KFACClip(delta, eta_max=1e6, momentum=0.9)
    stats = rule.apply(params, d, g, kfac, evaluator(policy, batch))
    step = get_flat(params) - theta0
    assert 0.5 * float(step @ M @ step) == pytest.approx(delta, rel=1e-9)
    assert stats["step/kl_bound_active"] == 1.0
    assert stats["step/size"] == pytest.approx(math.sqrt(2 * delta / float(d @ M @ d)), rel=1e-9)
    # The baselines convention: η = min(lr, √(kfac_clip / ΔᵀF̂Δ)) is this rule with δ = kfac_clip / 2.
    kfac_clip = 2 * delta
    assert stats["step/size"] == pytest.approx(min(1e6, math.sqrt(kfac_clip / float(d @ M @ d))), rel=1e-12)

    # Second update with momentum: the step is along v = μ·v_prev + (1 − μ)·d₂ and still meets δ.
    policy_before = get_flat(params)
    batch2 = make_batch(policy, n=80, seed=2)
    kfac.fit(policy, batch2.obs)
    M2 = dense_kfac(policy, kfac)
    g2 = gradient(policy, batch2)
    d2 = kfac.solve(g2)
    stats2 = rule.apply(params, d2, g2, kfac, evaluator(policy, batch2))
    step2 = get_flat(params) - policy_before
    v = 0.9 * d + 0.1 * d2 if float(g2 @ (0.9 * d + 0.1 * d2)) > 0 else d2
    assert stats2["step/momentum_reset"] == float(float(g2 @ (0.9 * d + 0.1 * d2)) <= 0)
    cos = float(step2 @ v) / float(step2.norm() * v.norm())
    assert cos == pytest.approx(1.0, abs=1e-12)
    assert 0.5 * float(step2 @ M2 @ step2) == pytest.approx(delta, rel=1e-9)

    # η_max binds: the step is η_max·d and stays inside the budget.
    set_params = get_flat(params)
    capped = KFACClip(delta, eta_max=1e-3, momentum=0.0)
    capped_stats = capped.apply(params, d2, g2, kfac, evaluator(policy, batch2))
    step3 = get_flat(params) - set_params
    torch.testing.assert_close(step3, 1e-3 * d2, rtol=1e-12, atol=1e-15)
    assert capped_stats["step/kl_bound_active"] == 0.0 and 0.5 * float(step3 @ M2 @ step3) < delta


def test_acktr_momentum_direction_over_several_updates_against_a_loop(float64):
    """v₁ = d₁, v_k = μ·v_{k−1} + (1 − μ)·d_k, back to v_k = d_k where gₖᵀv ≤ 0; each step is η·v_k with
    η = min(η_max, √(2δ / v_kᵀF̂v_k)) — a plain loop over five updates (the identity as F̂), one of them a reset."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, generator=gen)
    ds = [base + 0.5 * torch.randn(6, generator=gen) for _ in range(5)]
    gs = [d.clone() for d in ds]
    gs[3] = -(0.9 * 0.9 * ds[0] + ds[3])  # descends along the remembered direction: a reset at update 4
    param = nn.Parameter(torch.zeros(6))
    delta, mu = 1e-3, 0.9
    rule = KFACClip(delta, eta_max=1e6, momentum=mu)
    v = None
    for k, (d, g) in enumerate(zip(ds, gs)):
        before = param.detach().clone()
        stats = rule.apply([param], d, g, fisher.Identity(), None)
        want = d if v is None else mu * v + (1 - mu) * d
        reset = v is not None and float(g @ want) <= 0
        v = d if reset else want
        assert stats["step/momentum_reset"] == float(reset) and reset == (k == 3)
        eta = min(1e6, math.sqrt(2 * delta / float(v @ v)))
        torch.testing.assert_close(param.detach() - before, eta * v, rtol=1e-12, atol=1e-15)


def test_acktr_step_kl_against_dense_fisher_and_exact_kl_where_kfac_is_exact():
    """Linear Gaussian policy, λ = 0: K-FAC = F, so ½ΔᵀFΔ = δ with the exact dense Fisher, and the exact
    mean KL(old‖new) agrees with δ to second order."""
    policy = make_policy("gauss", hidden=())
    batch = make_batch(policy, n=100)
    delta = 1e-4
    kfac = fisher.KFAC(damping=0.0, estimator="exact")
    kfac.fit(policy, batch.obs)
    F = fisher.dense_fisher(policy, batch.obs)
    g = gradient(policy, batch)
    params = policy.actor_parameters()
    theta0 = get_flat(params)
    KFACClip(delta, eta_max=1e6).apply(params, kfac.solve(g), g, kfac, evaluator(policy, batch))
    step = get_flat(params) - theta0
    assert 0.5 * float(step @ F @ step) == pytest.approx(delta, rel=1e-8)
    assert kl_now(policy, batch) == pytest.approx(delta, rel=0.05)


# --------------------------------------------------------------------------------------------------
# ACKTR: the critic's Gauss-Newton K-FAC step
# --------------------------------------------------------------------------------------------------

def critic_jacobian(critic: ValueCritic, obs: torch.Tensor) -> torch.Tensor:
    """Per-sample ∂V(s_b)/∂θ [B, P] in ``net.parameters()`` order, by ``torch.func.jacrev``."""
    names = [n for n, _ in critic.net.named_parameters()]
    theta = tuple(p.detach() for p in critic.net.parameters())

    def v(th, x):
        return torch.func.functional_call(critic.net, dict(zip(names, th)), (x.unsqueeze(0),)).reshape(())

    jac = torch.func.vmap(torch.func.jacrev(v), in_dims=(None, 0))(theta, obs)
    return torch.cat([j.reshape(obs.shape[0], -1) for j in jac], dim=1)


def critic_data(hidden, n=50, seed=0):
    torch.manual_seed(seed)
    critic = ValueCritic(OBS_DIM, hidden, "tanh", fitter=partial(KFACRegression, epochs=1, minibatch=n, max_kl=0.05,
                                                                 eta_max=1.0, damping=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    obs = torch.randn(n, OBS_DIM, generator=gen)
    ret = 3.0 * torch.randn(n, generator=gen) + 5.0
    return critic, obs, ret


def test_kfac_critic_counts_its_skipped_minibatch_steps_apart_from_the_skipped_fit():
    """A minibatch step KFACClip refuses (a non-finite direction) is counted in critic/skipped_steps, which the fault
    guard's critic/skipped (the whole fit undone: 0 or 1) must not overwrite."""
    from types import SimpleNamespace

    from natpg.guards import guarded_critic_fit

    _, obs, ret = critic_data(hidden=(), n=40)
    critic = ValueCritic(OBS_DIM, (8,), "tanh", fitter=partial(KFACRegression, epochs=2, minibatch=10, max_kl=0.05,
                                                               eta_max=1.0, damping=0.01))
    solve, calls = critic.fitter.curvature.solve, []

    def every_third_nan(g):
        calls.append(1)
        return torch.full_like(g, float("nan")) if len(calls) % 3 == 0 else solve(g)

    critic.fitter.curvature.solve = every_third_nan
    stats = guarded_critic_fit(critic, SimpleNamespace(obs=obs, ret=ret), torch.Generator().manual_seed(0))
    assert len(calls) == 8 and stats["critic/skipped_steps"] == 2.0 and stats["critic/skipped"] == 0.0
    assert stats["critic/loss_after"] < stats["critic/loss_before"]


def test_critic_kfac_is_the_gauss_newton_matrix_for_a_linear_critic():
    critic, obs, ret = critic_data(hidden=())
    sigma = float(ret.std())
    gn = GaussNewtonKFAC(damping=0.0)
    g = gn.fit(critic.net, obs, ret, sigma)
    J = critic_jacobian(critic, obs)
    M = J.T @ J / obs.shape[0] / sigma**2  # undamped: K-FAC is exact for a linear critic
    torch.testing.assert_close(torch.stack([gn.mv(e) for e in torch.eye(M.shape[0])], 1), M, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        resid = critic(obs) - ret
    torch.testing.assert_close(g, -(J.T @ resid) / obs.shape[0] / sigma**2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gn.solve(g), torch.linalg.solve(M, g), rtol=1e-9, atol=1e-11)


def test_critic_kfac_of_a_singular_factor_falls_back_and_stays_consistent():
    """Undamped factors of constant inputs are singular (A = āāᵀ has rank 1): the critic's K-FAC counts a
    fallback, and mv inverts solve, since both use the factor actually inverted."""
    critic, obs, ret = critic_data(hidden=())
    gn = GaussNewtonKFAC(damping=0.0)
    g = gn.fit(critic.net, torch.ones_like(obs), ret, float(ret.std()))
    assert gn.stats["critic/kfac_fallbacks"] >= 1 and bool(torch.isfinite(gn.solve(g)).all())
    torch.testing.assert_close(gn.mv(gn.solve(g)), g, rtol=1e-5, atol=1e-8)  # jitter of 1e-10 or more: cond ≤ 1e10


def explicit_critic_kfac(critic: ValueCritic, obs: torch.Tensor, lam: float, sigma: float) -> torch.Tensor:
    """blockdiag((A_l + π√λI) ⊗ (G_l + √λ/π I))/σ² by torch.kron, with the factors re-run by hand: layer inputs ā by a manual
    forward, per-sample ∂V/∂s_l from the Jacobian of V w.r.t. each bias (∂V/∂b_l = ∂V/∂s_l)."""
    params = list(critic.net.parameters())
    P = sum(p.numel() for p in params)
    M = torch.zeros(P, P)
    J = critic_jacobian(critic, obs)
    layers = [m for m in critic.net if isinstance(m, nn.Linear)]
    x, off = obs, 0
    for k, layer in enumerate(layers):
        a = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
        nW, nb = layer.weight.numel(), layer.bias.numel()
        dV_ds = J[:, off + nW : off + nW + nb]
        A, G = a.T @ a / obs.shape[0], dV_ds.T @ dV_ds / obs.shape[0]
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        idx = wbar_index(params, layer)
        M[idx.unsqueeze(1), idx.unsqueeze(0)] = torch.kron(G + math.sqrt(lam) / pi * torch.eye(G.shape[0]),
                                                           A + math.sqrt(lam) * pi * torch.eye(A.shape[0]))
        off += nW + nb
        with torch.no_grad():
            x = torch.tanh(layer(x)) if k < len(layers) - 1 else x
    return M / sigma**2


def test_critic_kfac_matches_explicit_kron_for_a_deep_critic():
    critic, obs, ret = critic_data(hidden=(6, 4))
    lam, sigma = 0.01, 2.0
    gn = GaussNewtonKFAC(damping=lam)
    g = gn.fit(critic.net, obs, ret, sigma)
    M = explicit_critic_kfac(critic, obs, lam, sigma)
    torch.testing.assert_close(torch.stack([gn.mv(e) for e in torch.eye(M.shape[0])], 1), M, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gn.solve(g), torch.linalg.solve(M, g), rtol=1e-8, atol=1e-10)
    J = critic_jacobian(critic, obs)
    with torch.no_grad():
        resid = critic(obs) - ret
    torch.testing.assert_close(g, -(J.T @ resid) / obs.shape[0] / sigma**2, rtol=1e-10, atol=1e-12)


def test_critic_step_meets_its_kl_budget_and_a_full_step_solves_least_squares():
    # One step (one epoch, one minibatch): ½ ΔᵀF̂Δ = δ_c for N(R; V, σ²), σ² = mean (V − R)², F̂ explicit.
    critic, obs, ret = critic_data(hidden=(6,))
    lam, delta = 0.01, 0.01
    critic.fitter.curvature.damping = lam
    critic.fitter.step = KFACClip(delta, 1e6, 0.0)
    with torch.no_grad():
        sigma = float(((critic(obs) - ret) ** 2).mean().sqrt())  # the ML noise of N(R; V, σ²) before the fit
    M = explicit_critic_kfac(critic, obs, lam, sigma)
    theta0 = get_flat(list(critic.net.parameters()))
    stats = critic.fit(obs, ret)
    step = get_flat(list(critic.net.parameters())) - theta0
    assert 0.5 * float(step @ M @ step) == pytest.approx(delta, rel=1e-9)
    assert stats["critic/quadratic_kl"] == pytest.approx(delta, rel=1e-9)
    assert stats["critic/loss_after"] < stats["critic/loss_before"]
    # A linear critic, no damping, a budget that does not bind: η = η_max = 1 is the Gauss-Newton step —
    # here the exact Newton step of the quadratic loss — which lands on the least-squares solution.
    critic, obs, ret = critic_data(hidden=())
    critic.fitter.step = KFACClip(1e6, 1.0, 0.0)
    critic.fit(obs, ret)
    X = torch.cat([obs, torch.ones(obs.shape[0], 1)], 1)
    w = torch.linalg.lstsq(X, ret.unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(flatten(list(critic.net.parameters())), w, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# PPO and VPG
# --------------------------------------------------------------------------------------------------

def test_ppo_clipped_objective_against_hand_computation():
    ratio = torch.tensor([0.5, 1.0, 1.5, 1.5, 0.7, 0.9])
    adv = torch.tensor([1.0, 2.0, 1.0, -1.0, -1.0, 0.5])
    logp_old = torch.tensor([-1.0, -0.3, -2.0, -0.5, -1.2, -0.1])
    logp = (logp_old + ratio.log()).requires_grad_(True)
    eps = 0.2
    L, frac = clipped_surrogate(logp, logp_old, adv, eps)
    # min(r·A, clip(r)·A) per sample:
    #  0.5·1 = 0.5 < 0.8·1;  1·2 = 2;  1.2·1 = 1.2 < 1.5;  −1.5 < −1.2·1;  −0.8 < −0.7;  0.9·0.5 = 0.45 (inside)
    terms = [0.5, 2.0, 1.2, -1.5, -0.8, 0.45]
    assert float(L.detach()) == pytest.approx(sum(terms) / 6, rel=1e-12)
    assert float(frac) == pytest.approx(2 / 6)  # samples 3 and 5 take the clipped (constant) term
    (grad,) = torch.autograd.grad(L, logp)
    # ∂/∂logp of r·A is r·A where the unclipped term is taken, 0 where the clipped one is.
    expected = torch.tensor([0.5 * 1, 1.0 * 2, 0.0, 1.5 * -1, 0.0, 0.9 * 0.5]) / 6
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_ppo_update_improves_surrogate_and_target_kl_stops_early():
    policy = make_policy("gauss")
    batch = make_batch(policy, n=128)
    update = ClippedSurrogateUpdate(alpha=1e-2, clip_range=0.2, epochs=4, minibatch=32,
                                    generator=torch.Generator().manual_seed(0))
    stats = update.update(policy, batch)
    assert stats["step/sgd_steps"] == 16 and stats["step/early_stop"] == 0.0
    assert stats["step/surrogate_gain"] > 0 and stats["step/kl"] == pytest.approx(kl_now(policy, batch))
    # target_kl: the first minibatch (KL = 0) steps, the second sees KL > 1e-12 and stops the passes.
    policy = make_policy("cat")
    batch = make_batch(policy, n=128)
    update = ClippedSurrogateUpdate(alpha=1e-2, clip_range=0.2, epochs=4, minibatch=32, target_kl=1e-12,
                                    generator=torch.Generator().manual_seed(0))
    stats = update.update(policy, batch)
    assert stats["step/sgd_steps"] == 1 and stats["step/early_stop"] == 1.0
    assert stats["step/epochs"] == 32 / 128


def test_ppo_update_is_a_plain_adam_loop_over_its_minibatches_bit_for_bit():
    """The update against the textbook loop: for each minibatch (the same permutations), zero the gradients,
    backpropagate −L^CLIP, torch's Adam step. Equal bit for bit, so the update's own gradient clearing and its
    adam_step (optimizer.step() without its per-call overhead) are exactly the textbook's."""
    from natpg.critics import minibatch_indices

    policy = make_policy("gauss")
    batch = make_batch(policy, n=128)
    reference = copy.deepcopy(policy)
    ClippedSurrogateUpdate(alpha=1e-2, clip_range=0.2, epochs=2, minibatch=32,
                           generator=torch.Generator().manual_seed(0)).update(policy, batch)
    params = list(reference.actor_parameters())
    adam = torch.optim.Adam(params, lr=1e-2, eps=1e-5, foreach=True)
    for idx in minibatch_indices(128, 2, 32, torch.Generator().manual_seed(0), "cpu"):
        adam.zero_grad()
        L, _ = clipped_surrogate(reference.dist(batch.obs[idx]).log_prob(batch.act[idx]), batch.logp_old[idx],
                                 batch.adv[idx], 0.2)
        (-L).backward()
        adam.step()
    for p, q in zip(policy.actor_parameters(), params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("n,minibatch,steps", [(128, 32, 16), (96, 64, 8), (32, 256, 4)])
def test_ppo_logs_the_passes_over_the_batch_it_made(n, minibatch, steps):
    """step/epochs counts the samples stepped on: 4 passes whatever the minibatch (one of 64 over 96 samples is
    64 + 32; one of 256 over 32 is the whole batch), not sgd_steps × minibatch / n (which read 16 for the last)."""
    policy = make_policy("gauss")
    update = ClippedSurrogateUpdate(alpha=1e-3, clip_range=0.2, epochs=4, minibatch=minibatch,
                                    generator=torch.Generator().manual_seed(0))
    stats = update.update(policy, make_batch(policy, n=n))
    assert stats["step/sgd_steps"] == steps and stats["step/epochs"] == 4.0


def test_ppo_target_kl_stops_at_the_first_minibatch_whose_kl_old_new_exceeds_it(float64):
    """The passes stop before the first minibatch whose mean KL(old‖new) — the closed-form Gaussian KL, old first —
    exceeds target_kl. The KLs each minibatch would see are recorded in a run without the stop; target_kl is
    chosen where the reverse KL(new‖old), or a stop at 1.5·target_kl, would stop at another minibatch."""

    def gaussian_kl(p, q):  # KL(p‖q) of diagonal Gaussians, summed over action dimensions, averaged over states
        p, q = p.base_dist, q.base_dist  # Independent(Normal)
        return float((q.scale.log() - p.scale.log() + (p.scale**2 + (p.loc - q.loc) ** 2) / (2 * q.scale**2)
                      - 0.5).sum(-1).mean())

    policy = make_policy("gauss")
    batch = make_batch(policy, n=128)
    start = copy.deepcopy(policy.state_dict())

    def run(target_kl, record=None):
        policy.load_state_dict(start)
        update = ClippedSurrogateUpdate(alpha=3e-2, clip_range=0.2, epochs=4, minibatch=32, target_kl=target_kl,
                                        generator=torch.Generator().manual_seed(0))
        if record is not None:
            dist = policy.dist

            def recording(obs):
                out = dist(obs)
                if obs.shape[0] == 32:  # a minibatch, seen before its step
                    old = policy.head.dist(batch.eta_old[[int(i) for i in idx_of(obs)]])
                    new = policy.head.dist(policy(obs).detach())
                    record.append((gaussian_kl(old, new), gaussian_kl(new, old)))
                return out

            policy.dist = recording
        try:
            return update.update(policy, batch)["step/sgd_steps"]
        finally:
            policy.__dict__.pop("dist", None)

    rows = {tuple(o.tolist()): i for i, o in enumerate(batch.obs)}
    idx_of = lambda obs: [rows[tuple(o.tolist())] for o in obs]  # noqa: E731
    kls = []
    assert run(0.0, kls) == 16 and len(kls) == 16 and kls[0] == (0.0, 0.0)

    def first_above(values, t):  # steps taken before the stop
        return next((k for k, v in enumerate(values) if v > t), len(values))

    forward, reverse = [f for f, _ in kls], [r for _, r in kls]
    candidates = sorted({(a + b) / 2 for a in forward + reverse for b in forward + reverse if a != b})
    target = next(t for t in candidates
                  if len({first_above(forward, t), first_above(reverse, t), first_above(forward, 1.5 * t)}) == 3)
    assert run(target) == first_above(forward, target)


def test_value_clipping_limits_the_loss_to_the_clipped_range():
    torch.manual_seed(0)
    critic = ValueCritic(OBS_DIM, (8,), "tanh", fitter=partial(ClippedRegression, lr=1e-2, epochs=5, minibatch=16,
                                                               value_clip=0.1))
    obs = torch.randn(64, OBS_DIM)
    with torch.no_grad():
        v0 = critic(obs)
    stats = critic.fit(obs, v0 + 10.0)  # targets far outside the clip range
    with torch.no_grad():
        moved = (critic(obs) - v0).abs()
    # Once |V − V_old| > c with the target beyond it, max(·) picks the constant clipped term: no gradient,
    # so the values stop near the clip boundary instead of travelling the full 10.
    assert float(moved.max()) < 1.0 and stats["critic/clip_fraction"] > 0


def test_every_activation_the_settings_admit_builds_a_network():
    assert set(natpg.config.ACTIVATIONS) == set(natpg.policies.ACTIVATIONS)


@pytest.mark.parametrize("activation,dtype,hand_backward", [("tanh", torch.float32, True),
                                                             ("relu", torch.float32, True),
                                                             ("tanh", torch.float64, True),
                                                             ("elu", torch.float32, False)])
def test_value_critic_fit_is_minibatch_adam_on_squared_error_bit_for_bit(activation, dtype, hand_backward):
    """The fit against a hand loop with autograd: the same shuffles from the same generator, mean (V − R)²
    per minibatch, torch's default per-tensor Adam. Equal bit for bit, which holds both the critic's
    hand-written backward (tanh and ReLU MLPs; ELU takes autograd) and its foreach Adam to the numbers
    every documented run was measured with."""
    torch.manual_seed(0)
    critic = ValueCritic(OBS_DIM, (16, 16), activation,
                         fitter=partial(AdamRegression, lr=3e-3, epochs=3, minibatch=20)).to(dtype)
    assert (critic.fitter._mlp is not None) == hand_backward
    reference = copy.deepcopy(critic.net)
    obs, returns = torch.randn(50, OBS_DIM, dtype=dtype), 3 * torch.randn(50, dtype=dtype)
    for seed in (1, 2):
        stats = critic.fit(obs, returns, torch.Generator().manual_seed(seed))
        assert stats["critic/loss_after"] < stats["critic/loss_before"]
    adam = torch.optim.Adam(reference.parameters(), lr=3e-3, foreach=False)
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):
            perm = torch.randperm(50, generator=generator)
            for start in (0, 20, 40):  # the last minibatch holds the remaining 10
                idx = perm[start : start + 20]
                loss = ((reference(obs[idx]).squeeze(-1) - returns[idx]) ** 2).mean()
                adam.zero_grad()
                loss.backward()
                adam.step()
    assert all(torch.equal(p, q) for p, q in zip(critic.net.parameters(), reference.parameters()))
    ours, theirs = critic.fitter.state_dict()["state"], adam.state_dict()["state"]  # moments and step counts
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[i][k], theirs[i][k]) for i in ours for k in ours[i])


def test_config_for_finds_the_family_applies_presets_then_overrides_and_validates():
    cfg = config_for("npg", "Swimmer-v5", {"max_kl": 0.05})
    assert cfg.advantage.gamma == 0.9999 and cfg.step.max_kl == 0.05  # Swimmer's preset, then the user's δ
    assert config_for("npg", "CartPole-v1").to_dict() == default_config("npg", "classic", "CartPole-v1").to_dict()
    with pytest.raises(ValueError, match="max_kl must be a finite number > 0"):
        config_for("trpo", "Hopper-v5", {"max_kl": -1.0})


def test_every_atari_preset_trains_on_the_reward_signs_and_no_other_family_does():
    for algorithm in natpg.agent.ALGORITHM_CLASSES:
        assert default_config(algorithm, "atari").env.sign_rewards
        assert not default_config(algorithm, "classic").env.sign_rewards
        assert not default_config(algorithm, "mujoco").env.sign_rewards
    with pytest.raises(ValueError, match="clip_reward.*sign_rewards"):  # SB3's name for it
        natpg.Config().override(clip_reward=True)


def test_presets_layer_algorithm_family_environment_then_user():
    """Swimmer's (γ 0.9999, GAE λ 0.99), Ant's (σ e^−2; NPG's with K-FAC) and HalfCheetah's and
    Walker2d's (σ e^−0.5) presets sit over the MuJoCo family's, a user's keyword over all."""
    from natpg.presets import ALGORITHM_DEFAULTS, FAMILY_DEFAULTS

    for algo in ("npg", "trpo", "acktr"):
        cfg = default_config(algo, "mujoco", "Swimmer-v5")
        assert cfg.advantage.gamma == 0.9999
        assert cfg.batch_size == 2048  # TRPO's family has 8 × 128
        assert cfg.curvature.fisher == ALGORITHM_DEFAULTS[algo]["fisher"]
        assert default_config(algo, "mujoco", "Hopper-v5").advantage.gamma == 0.99
        assert cfg.advantage.gae_lambda == 0.99  # the families have 0.95 (NPG, TRPO) and 0.97 (ACKTR)
        assert cfg.step.max_kl == {"npg": 0.01, "trpo": 0.01, "acktr": 0.002}[algo]  # NPG's family has 0.02
        assert cfg.curvature.damping == {"npg": 0.1, "trpo": 0.1, "acktr": 0.3}[algo]  # ACKTR's default: 0.01
        if algo != "acktr":  # NPG takes TRPO's critic fit there; ACKTR's critic is K-FAC
            assert (cfg.critic.critic_epochs, cfg.critic.critic_minibatch) == (20, 128)
        else:  # ACKTR steps without momentum there (its default: 0.9), and keeps it elsewhere
            assert cfg.step.momentum == 0.0 and default_config(algo, "mujoco", "Hopper-v5").step.momentum == 0.9
        assert default_config(algo, "mujoco", "Hopper-v5").advantage.gae_lambda == (0.97 if algo == "acktr" else 0.95)
    agent = natpg.TRPO("Swimmer-v5", gamma=0.995, tensorboard=False)
    assert agent.config.advantage.gamma == 0.995
    agent.close()
    # NPG's Ant preset starts the Gaussian's σ at e^−2 (the built policy's log-std, not only the config) and
    # takes K-FAC's F⁻¹ with ACKTR's damping, from each batch's own factors.
    agent = natpg.NPG("Ant-v5", n_envs=1, tensorboard=False)
    torch.testing.assert_close(agent.policy.log_std.detach(), torch.full((8,), -2.0))
    c = agent.config.curvature
    assert (c.fisher, c.damping, c.kfac_ema_decay, agent.config.step.max_kl) == ("kfac", 0.01, 0.0, 0.04)
    agent.close()
    agent = natpg.ACKTR("Ant-v5", n_envs=1, log_std_init=-0.5, tensorboard=False)
    torch.testing.assert_close(agent.policy.log_std.detach(), torch.full((8,), -0.5))
    agent.close()
    for algo in ("npg", "trpo", "acktr"):  # HalfCheetah's and Walker2d's σ e^−0.5, over the MuJoCo family's 0
        assert default_config(algo, "mujoco", "HalfCheetah-v5").policy.log_std_init == -0.5
        assert default_config(algo, "mujoco", "Hopper-v5").policy.log_std_init == (-0.25 if algo == "npg" else 0.0)
        assert default_config(algo, "mujoco", "Walker2d-v5").policy.log_std_init == -0.5
        # ACKTR's and NPG's Hopper presets halve the family's KL budget; TRPO keeps its own.
        assert default_config(algo, "mujoco", "Hopper-v5").step.max_kl == (
            {"acktr": 0.001, "npg": 0.01}.get(algo, FAMILY_DEFAULTS[(algo, "mujoco")]["max_kl"]))
        assert default_config(algo, "mujoco", "Walker2d-v5").step.max_kl == FAMILY_DEFAULTS[(algo, "mujoco")]["max_kl"]
        # ACKTR's Ant preset doubles its family's budget (with σ e^−2); NPG's and TRPO's (with K-FAC) take δ 0.04.
        assert default_config(algo, "mujoco", "Ant-v5").step.max_kl == (
            {"acktr": 0.004, "npg": 0.04, "trpo": 0.04}[algo])
        assert default_config(algo, "mujoco", "Ant-v5").curvature.fisher == "kfac"  # all three solve with K-FAC there
        # NPG and TRPO from each batch's own factors, ACKTR from factors averaged over batches.
        assert default_config(algo, "mujoco", "Ant-v5").curvature.kfac_ema_decay == (0.5 if algo == "acktr" else 0.0)
        # ACKTR fits its critic by K-FAC on Hopper and Swimmer, by Adam (like the others) on the other three.
        for env_id in ("Walker2d-v5", "Ant-v5", "HalfCheetah-v5"):
            assert default_config(algo, "mujoco", env_id).critic.critic_optimizer == "adam"
        for env_id in ("Hopper-v5", "Swimmer-v5"):
            assert default_config(algo, "mujoco", env_id).critic.critic_optimizer == (
                "kfac" if algo == "acktr" else "adam")
        assert default_config(algo, "mujoco", "Ant-v5").policy.log_std_init == -2.0
        # TRPO's HalfCheetah preset takes NPG's budget, δ 0.02; the others keep their family's.
        assert default_config(algo, "mujoco", "HalfCheetah-v5").step.max_kl == (
            0.02 if algo == "trpo" else FAMILY_DEFAULTS[(algo, "mujoco")]["max_kl"])
    agent = natpg.ACKTR("Hopper-v5", max_kl=0.003, n_envs=1, tensorboard=False)  # a user's value wins
    assert agent.config.step.max_kl == 0.003
    agent.close()
    agent = natpg.TRPO("HalfCheetah-v5", n_envs=1, tensorboard=False)
    torch.testing.assert_close(agent.policy.log_std.detach(), torch.full((6,), -0.5))
    agent.close()
    for env_id, fitter in (("Walker2d-v5", AdamRegression), ("Ant-v5", AdamRegression), ("Hopper-v5", KFACRegression)):
        agent = natpg.ACKTR(env_id, n_envs=1, tensorboard=False)
        assert type(agent.critic.fitter) is fitter
        agent.close()


def test_vpg_fixed_step_is_theta_plus_alpha_g():
    policy = make_policy("cat")
    batch = make_batch(policy)
    cfg = default_config("vpg", "classic")
    update = make_actor_update(cfg, None)
    theta0 = get_flat(policy.actor_parameters())
    g = gradient(policy, batch)
    update.update(policy, batch)
    torch.testing.assert_close(get_flat(policy.actor_parameters()), theta0 + cfg.step.alpha * g, rtol=0, atol=1e-14)


def test_adam_step_matches_torch_adam():
    policy = make_policy("gauss")
    params = policy.actor_parameters()
    clone = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(clone, lr=0.05, eps=1e-8)
    rule = AdamStep(0.05)
    for seed in range(3):
        batch = make_batch(policy, seed=seed)
        g = gradient(policy, batch)
        rule.apply(params, g, g, fisher.Identity(), None)
        for c, gi in zip(clone, torch.split(g, [p.numel() for p in params])):
            c.grad = -gi.view_as(c)  # torch minimises; the rule ascends
        opt.step()
        torch.testing.assert_close(get_flat(params), flatten([c.detach() for c in clone]), rtol=1e-12, atol=1e-14)


def test_adam_step_clips_only_directions_longer_than_max_norm(float64):
    """max_norm bounds ‖d‖ before Adam's moments see it: a longer direction is scaled to that norm, a shorter one
    is left as it is — checked against torch's Adam fed d·min(1, max_norm/‖d‖)."""
    gen = torch.Generator().manual_seed(2)
    directions = [torch.randn(5, generator=gen) * scale for scale in (0.1, 10.0, 0.2, 5.0)]
    max_norm = 1.0
    assert {bool(d.norm() > max_norm) for d in directions} == {True, False}
    param, twin = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(5))
    rule, opt = AdamStep(0.05, max_norm=max_norm), torch.optim.Adam([twin], lr=0.05, eps=1e-8)
    for d in directions:
        stats = rule.apply([param], d, d, fisher.Identity(), None)
        assert stats["step/direction_norm"] == pytest.approx(float(d.norm()), rel=1e-12)
        twin.grad = -d * min(1.0, max_norm / float(d.norm()))
        opt.step()
        torch.testing.assert_close(param.detach(), twin.detach(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Composition: every algorithm reachable, with its parts
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,fisher_name,step,critic", [
    (natpg.TRPO, "cg", "linesearch", AdamRegression), (natpg.ACKTR, "kfac", "kfac_clip", KFACRegression),
    (natpg.VPG, "identity", "fixed", AdamRegression), (natpg.PPO, None, "ppo_clip", AdamRegression)])
@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_algorithms_are_compositions(cls, fisher_name, step, critic, env):
    torch.set_default_dtype(torch.float32)
    agent = cls(env, seed=0, n_envs=2, n_steps=16)
    if (cls, env) == (natpg.VPG, "Pendulum-v1"):
        step = "adam"  # its Pendulum preset (see docs/algorithms.md)
    assert agent.config.algorithm == cls.algorithm and agent.config.step.step == step
    assert type(agent.critic.fitter) is critic
    if fisher_name is not None:
        assert isinstance(agent.actor_update, NaturalGradientUpdate)
        assert agent.config.curvature.fisher == fisher_name
    agent.learn(64)
    assert agent.env_steps == 64
    assert natpg.agent.ALGORITHM_CLASSES[cls.algorithm] is cls


@pytest.mark.parametrize("cls", [natpg.ACKTR, natpg.PPO])
def test_new_algorithms_save_and_load(cls, tmp_path):
    torch.set_default_dtype(torch.float32)
    momentum = {"momentum": 0.9} if cls is natpg.ACKTR else {}  # Pendulum's ACKTR preset has none
    agent = cls("Pendulum-v1", seed=0, n_envs=2, n_steps=32, **momentum).learn(64)
    agent.save(str(tmp_path / "m"))
    loaded = natpg.load(str(tmp_path / "m"))
    assert type(loaded) is cls
    obs = np.zeros((3, 3))
    np.testing.assert_array_equal(agent.predict(obs), loaded.predict(obs))
    for a, b in zip(agent.critic.parameters(), loaded.critic.parameters()):
        assert torch.equal(a, b)
    if cls is natpg.ACKTR:  # the momentum of the actor's step rule travels with the checkpoint
        assert torch.equal(agent.actor_update.step_rule.v, loaded.actor_update.step_rule.v)
    else:  # PPO's Adam moments
        saved = agent.actor_update.optimizer.state_dict()["state"]
        loaded_state = loaded.actor_update.state_dict()["adam"]["state"]
        assert all(torch.equal(saved[k]["exp_avg"], loaded_state[k]["exp_avg"]) for k in saved)


def test_entropy_bonus_gradient_against_hand_written_entropies():
    """∇[L + c·H̄] − ∇L = c·∇H̄, with H̄ written out by hand: Σ log σ_i + const for the Gaussian (so ∂/∂ log σ_i
    = 1 and nothing else moves), −Σ_k p_k log p_k of a softmax for the categorical."""
    c = 0.3
    gauss = make_policy("gauss")
    batch = make_batch(gauss)
    bonus = flatten(torch.autograd.grad(surrogate(gauss, batch, c), gauss.actor_parameters())) - gradient(gauss, batch)
    expected = torch.zeros_like(bonus)
    expected[-2:] = c  # log_std is the last actor parameter (2 action dims)
    torch.testing.assert_close(bonus, expected, atol=1e-12, rtol=0)

    cat = make_policy("cat")
    batch = make_batch(cat)
    params = cat.actor_parameters()
    logits = cat(batch.obs)
    p = torch.exp(logits - logits.logsumexp(-1, keepdim=True))
    by_hand = -(p * torch.log(p)).sum(-1).mean()
    expected = c * flatten(torch.autograd.grad(by_hand, params))
    bonus = flatten(torch.autograd.grad(surrogate(cat, batch, c), params)) - gradient(cat, batch)
    torch.testing.assert_close(bonus, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_entropy_bonus_alone_widens_the_gaussian_by_the_kl_budget(damping):
    """Zero advantages: the objective is c·H̄ alone. The exact Fisher's log σ block is 2·I and its cross terms
    with the mean are 0, so the natural step moves every log σ_i by the same Δ and no mean parameter; the 'kl'
    rule sizes it so that ½·dᵀ(F + λI)d·α² = δ, i.e. ½·(2 + λ)·Σ_i Δ² = δ: Δ = √(δ / act_dim)·√(2 / (2 + λ))."""
    policy = make_policy("gauss")
    batch = make_batch(policy)
    batch.adv = torch.zeros_like(batch.adv)
    before = [p.detach().clone() for p in policy.actor_parameters()]
    update = NaturalGradientUpdate(fisher.Dense(damping=damping), natpg.steps.KLStep(0.01), ent_coef=0.5)
    update.update(policy, batch)
    after = policy.actor_parameters()
    for b, a in zip(before[:-1], after[:-1]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    shift = math.sqrt(0.01 / 2) * math.sqrt(2 / (2 + damping))  # each log σ_i's Δ
    torch.testing.assert_close(after[-1] - before[-1], torch.full((2,), shift), atol=1e-9, rtol=0)
    # KL(old ‖ new) of σ → σe^Δ, per dimension: Δ + (e^{−2Δ} − 1)/2 (≈ Δ²: the quadratic δ/2 when λ = 0, less with λ)
    assert kl_now(policy, batch) == pytest.approx(2 * (shift + (math.exp(-2 * shift) - 1) / 2), rel=1e-9)


def test_ppo_entropy_bonus_alone_raises_the_entropy():
    policy = make_policy("gauss")
    batch = make_batch(policy)
    batch.adv = torch.zeros_like(batch.adv)
    log_std = policy.log_std.detach().clone()
    ClippedSurrogateUpdate(1e-2, 0.2, 2, 16, ent_coef=0.1).update(policy, batch)
    assert bool((policy.log_std > log_std + 0.05).all())  # 8 Adam steps of ≈ lr each on ∂H/∂log σ = 1


def test_new_settings_are_validated():
    for bad in ({"momentum": 1.0}, {"clip_range": 0.0}, {"ppo_epochs": 0}, {"target_kl": -1.0},
                {"critic_optimizer": "sgd"}, {"critic_max_kl": 0.0}, {"value_clip": 0.2, "critic_optimizer": "kfac"}):
        with pytest.raises(ValueError):
            Config().override(**bad).validate()
    with pytest.raises(ValueError, match="ent_coef must be a finite number ≥ 0"):
        Config().override(ent_coef=-0.1).validate()
    with pytest.raises(ValueError, match="ent_coef=.* would not be read: nac's direction"):
        Config(algorithm="nac").override(ent_coef=0.01).validate()


# --------------------------------------------------------------------------------------------------
# Learning: a return threshold within a step budget (deterministic evaluation, 10 episodes)
# --------------------------------------------------------------------------------------------------

# (algorithm, env) → (step budget, threshold). Presets come from presets.FAMILY_DEFAULTS / ENV_DEFAULTS.
LEARNING = {
    ("TRPO", "CartPole-v1"): (100_000, 475.0),
    ("TRPO", "Pendulum-v1"): (300_000, -300.0),  # seeds 0–15 all pass (docs/algorithms.md)
    ("ACKTR", "CartPole-v1"): (100_000, 475.0),
    ("ACKTR", "Pendulum-v1"): (300_000, -300.0),  # seeds 0–15: 15 pass (docs/algorithms.md)
    ("VPG", "CartPole-v1"): (100_000, 475.0),
    ("VPG", "Pendulum-v1"): (1_000_000, -300.0),  # seeds 0–11 all pass (docs/algorithms.md)
    ("PPO", "CartPole-v1"): (200_000, 475.0),  # seeds 0–47: 47 pass at 200k, 37 at 100k (docs/algorithms.md)
    ("PPO", "Pendulum-v1"): (200_000, -300.0),  # seeds 0–47 all pass (docs/algorithms.md)
}


@pytest.mark.learning
@pytest.mark.parametrize("algo,env", list(LEARNING))
def test_learns(algo, env):
    torch.set_default_dtype(torch.float32)
    budget, threshold = LEARNING[(algo, env)]
    start = time.perf_counter()
    agent = getattr(natpg, algo)(env, seed=0, torch_threads=1).learn(budget)
    mean, std = natpg.evaluate(agent, episodes=10, seed=1000)
    print(f"{algo} {env}: {mean:.1f} ± {std:.1f} after {agent.env_steps} steps, {time.perf_counter() - start:.1f} s")
    assert mean >= threshold


@pytest.mark.parametrize("kind", ["cat", "gauss"])
def test_batch_diagnostics_entropy_and_explained_variance_against_closed_forms(kind):
    """policy/entropy: the mean over states of −Σ p log p (categorical) or Σ_i (½ log 2πe + log σ_i) (Gaussian);
    critic/explained_variance: 1 − mean (V − R)² / Var R, from the critic's loss before its fit."""
    from natpg.train import batch_diagnostics

    policy = make_policy(kind)
    batch = make_batch(policy)
    batch.ret = torch.linspace(-1.0, 3.0, batch.obs.shape[0])
    values = batch.ret + 0.5 * torch.cos(torch.arange(batch.obs.shape[0], dtype=torch.float64))
    loss_before = float(((values - batch.ret) ** 2).mean())
    out = batch_diagnostics(policy, batch, loss_before)
    if kind == "cat":
        p = torch.softmax(batch.eta_old, dim=-1)
        expected = float(-(p * p.log()).sum(-1).mean())
    else:
        log_std = policy.log_std.detach()
        expected = float((0.5 * math.log(2 * math.pi * math.e) + log_std).sum())
    assert out["policy/entropy"] == pytest.approx(expected, rel=1e-12)
    ret = batch.ret.numpy()
    assert out["critic/explained_variance"] == pytest.approx(1 - np.mean((values.numpy() - ret) ** 2) / np.var(ret),
                                                             rel=1e-12)
    batch.ret = torch.full_like(batch.ret, 2.0)  # no variance to explain
    assert math.isnan(batch_diagnostics(policy, batch, 0.0)["critic/explained_variance"])
    batch.ret = 2.0 + 1e-16 * torch.arange(batch.obs.shape[0], dtype=torch.float64)  # equal up to rounding
    assert math.isnan(batch_diagnostics(policy, batch, 1e-3)["critic/explained_variance"])


@pytest.mark.parametrize("hidden", [(64, 64), (8,), (16, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kfac_critic_values_and_output_gradients_are_autograds_bit_for_bit(hidden, dtype):
    """The K-FAC critic's hand-written forward/backward (a plain MLP) gives the hooks-and-autograd construction's
    values, layer inputs and ∂ΣV/∂s bit for bit, so its fit is unchanged."""
    import natpg.acktr as acktr

    torch.manual_seed(0)
    critic = ValueCritic(5, hidden).to(dtype)
    obs = torch.randn(37, 5, dtype=dtype)
    layers = acktr.linear_layers(critic.net)
    fast = acktr._values_and_output_gradients(critic.net, layers, obs)
    handle = critic.net[0].register_forward_hook(lambda *args: None)  # a hook: the autograd construction
    try:
        slow = acktr._values_and_output_gradients(critic.net, layers, obs)
    finally:
        handle.remove()
    assert torch.equal(fast[0], slow[0])
    for a, b in [*zip(fast[1], slow[1]), *zip(fast[2], slow[2])]:
        assert a.shape == b.shape and torch.equal(a, b)


def test_categorical_draw_is_multinomial_bit_for_bit():
    """Same actions and the same generator state after as torch.multinomial(p, 1).squeeze(-1); a NaN still raises."""
    from natpg.policies import categorical_draw

    for seed, (B, K) in enumerate([(8, 2), (1, 3), (16, 6), (5, 1)]):
        logits = torch.randn(B, K) * 3
        logits[0, 0] = -1e9  # a masked action
        p = torch.softmax(logits, -1)
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(50):
            assert torch.equal(torch.multinomial(p, 1, generator=g1).squeeze(-1), categorical_draw(p, g2))
        assert torch.equal(torch.multinomial(p[0], 1, generator=g1).squeeze(-1), categorical_draw(p[0], g2))
        assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(RuntimeError, match="nan"):
        categorical_draw(torch.tensor([[float("nan"), 1.0]]))


# --------------------------------------------------------------------------------------------------
# Found by stop 47's mutation audit: behaviours no test above pinned down
# --------------------------------------------------------------------------------------------------

def test_line_search_rejects_a_step_that_does_not_improve_the_surrogate():
    """A flat surrogate (equal, not greater) is no improvement: every try rejected and θ restored bit for bit
    (sb3-contrib's ``new_objective > objective`` too)."""
    policy = make_policy("gauss")
    params = policy.actor_parameters()
    before = get_flat(params)
    d = torch.randn(before.numel(), generator=torch.Generator().manual_seed(0))
    stats = LineSearch(0.01, 0.8, 5).apply(params, d, d, fisher.Identity(), lambda: (0.0, 0.0))
    assert stats["step/accepted"] == 0.0 and stats["step/size"] == 0.0 and torch.equal(get_flat(params), before)


def test_line_search_logs_the_expected_improvement_of_the_length_it_kept():
    """After k backtracks, step/expected_improve is the kept length times gᵀd, and the ratio is measured on it."""
    policy = make_policy("gauss")
    batch = make_batch(policy)
    curvature = ScaledCurvature(fisher.Dense(damping=1e-3), 0.02)  # the full step overshoots δ: it backtracks
    curvature.fit(policy, batch.obs)
    g = gradient(policy, batch)
    d = curvature.solve(g)
    stats = LineSearch(0.005, 0.5, 15).apply(policy.actor_parameters(), d, g, curvature, evaluator(policy, batch))
    assert stats["step/accepted"] == 1.0 and stats["step/backtracks"] >= 2
    assert stats["step/expected_improve"] == pytest.approx(stats["step/size"] * float(g @ d), rel=1e-12)
    assert stats["step/improve_ratio"] == pytest.approx(stats["step/actual_improve"] / stats["step/expected_improve"])


def test_acktr_momentum_resets_on_the_combined_direction_not_the_remembered_one():
    """The reset is decided on gᵀv for v = μ·v_prev + (1 − μ)·d: here gᵀv_prev < 0 but gᵀv > 0, so no reset and the
    step is along v = (1.1, 0.9), not d; and gᵀv_prev > 0 with gᵀv ≤ 0 resets."""
    param = nn.Parameter(torch.zeros(2))
    rule = KFACClip(1e-3, eta_max=1e6, momentum=0.9)
    rule.apply([param], torch.tensor([-1.0, 1.0]), torch.tensor([-1.0, 1.0]), fisher.Identity(), None)
    before = param.detach().clone()
    stats = rule.apply([param], torch.tensor([20.0, 0.0]), torch.tensor([1.0, 0.0]), fisher.Identity(), None)
    v = torch.tensor([1.1, 0.9])
    assert stats["step/momentum_reset"] == 0.0
    torch.testing.assert_close(param.detach() - before, math.sqrt(2e-3 / float(v @ v)) * v, rtol=1e-12, atol=1e-15)
    rule = KFACClip(1e-3, eta_max=1e6, momentum=0.9)
    rule.apply([param], torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), fisher.Identity(), None)
    stats = rule.apply([param], torch.tensor([-20.0, 1.0]), torch.tensor([1.0, 0.0]), fisher.Identity(), None)
    assert stats["step/momentum_reset"] == 1.0


@pytest.mark.parametrize("make", [lambda: fisher.Empirical(damping=0.1),
                                  lambda: fisher.KFAC(0.1, estimator="empirical"),
                                  lambda: fisher.Diagonal(0.1, estimator="empirical")],
                         ids=["empirical", "kfac", "diagonal"])
def test_an_update_fits_the_empirical_fisher_on_the_taken_actions(make):
    policy = make_policy("gauss")
    batch = make_batch(policy)
    curvature = make()
    assert NaturalGradientUpdate(curvature, KLStep(0.01)).update(policy, batch)["step/skipped"] == 0.0
    reference = make()
    reference.fit(make_policy("gauss"), batch.obs, batch.act)  # the policy the update started from
    v = torch.randn(sum(p.numel() for p in policy.actor_parameters()), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(curvature.mv(v), reference.mv(v), rtol=1e-12, atol=1e-14)


def test_the_line_search_of_an_update_with_an_entropy_bonus_measures_the_bonus():
    """With zero advantages the objective is the entropy bonus alone: the line search must see it improve
    (judged without ent_coef it sees a flat 0 and rejects every try)."""
    policy = make_policy("gauss")
    batch = make_batch(policy)
    batch = Batch(obs=batch.obs, act=batch.act, adv=torch.zeros_like(batch.adv), ret=batch.ret,
                  logp_old=batch.logp_old, eta_old=batch.eta_old)
    stats = NaturalGradientUpdate(fisher.Dense(damping=0.01), LineSearch(0.01), ent_coef=0.1).update(policy, batch)
    assert stats["step/accepted"] == 1.0 and stats["step/surrogate_gain"] > 0.0 and 0.0 < kl_now(policy, batch) <= 0.01


@pytest.mark.parametrize("name,settings,attributes", [
    ("diagonal", {"damping": 0.37}, {"damping": 0.37}),
    ("kfac", {"damping": 0.37, "kfac_refresh_every": 3, "kfac_ema_decay": 0.5},
     {"damping": 0.37, "refresh_every": 3, "ema_decay": 0.5}),
    ("empirical", {"damping": 0.37, "cg_iters": 7, "cg_tol": 1e-5}, {"damping": 0.37, "cg_iters": 7, "cg_tol": 1e-5}),
    ("cg", {"damping": 0.37, "cg_iters": 7, "cg_tol": 1e-5, "cg_warm_start": True},
     {"damping": 0.37, "iters": 7, "tol": 1e-5, "warm_start": True}),
    ("dense", {"damping": 0.37}, {"damping": 0.37}),
])
def test_make_curvature_hands_every_setting_to_its_solver(name, settings, attributes):
    from natpg.algorithms import make_curvature

    curvature = make_curvature(Config(algorithm="npg").override(fisher=name, **settings), None)
    assert {key: getattr(curvature, key) for key in attributes} == attributes
