"""Natural actor-critic: the compatible critic's least squares against independent references, then learning;
and the empirical-vs-true Fisher experiment (examples/empirical_vs_true_fisher.py).

References never come from natpg.nac: the tabular natural gradient F⁺∇V from a numpy pseudo-inverse of the
exact tabular Fisher (natpg.tabular); score matrices built one sample at a time with torch.autograd.grad;
torch.linalg.solve on the dense normal equations; the surrogate's gradient by autograd; the exact Fisher
from ``fisher.dense_fisher`` (Jacobian × analytic output Fisher, no sampled actions).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import natpg
from natpg import fisher, tabular
from natpg.algorithms import Batch, surrogate
from natpg.nac import NaturalActorCritic, compatible_features, compatible_least_squares
from natpg.params import flatten, get_flat
from natpg.policies import CategoricalHead, CategoricalMLP, GaussianMLP
from natpg.steps import FixedStep, KLStep

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# (a) Exact: on a tabular MDP, the compatible least-squares weights are the natural gradient
# --------------------------------------------------------------------------------------------------

class TabularSoftmax(nn.Module):
    """π(a|s) ∝ exp θ[s, a] as a natpg policy: a one-hot state through a bias-free Linear(S → A)."""

    def __init__(self, theta: np.ndarray):
        super().__init__()
        S, A = theta.shape
        self.logits = nn.Linear(S, A, bias=False)
        with torch.no_grad():
            self.logits.weight.copy_(torch.from_numpy(theta.T.copy()))  # weight[a, s] = θ[s, a]
        self.head = CategoricalHead()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.logits(obs)

    def dist(self, obs: torch.Tensor):
        return self.head.dist(self(obs))

    def actor_parameters(self) -> list[nn.Parameter]:
        return [self.logits.weight]


@pytest.mark.parametrize("dual", [False, True])
def test_compatible_least_squares_is_the_tabular_natural_gradient(float64, dual):
    """Kakade (2001): w* = argmin Σ_s d(s) Σ_a π(a|s) (ψᵀw − A^π(s, a))² solves F w* = E[ψA] = (1 − γ)∇V(ρ).

    Every (s, a) pair is one row, weighted exactly by d^π_ρ(s)π(a|s) (no sampling); the minimum-norm w*
    equals (1 − γ)·F⁺∇V from natpg.tabular's dense numpy pseudo-inverse. Targets Q^π or Q^π − b(s) for any
    baseline b give the same w* (the scores have mean zero under π), the "+ V(s)" of Q_w.
    """
    mdp = tabular.random_mdp(5, 3, gamma=0.9, seed=3)
    S, A = mdp.n_states, mdp.n_actions
    theta = np.random.default_rng(3).normal(size=(S, A))
    pi = tabular.softmax_policy(theta)
    d = tabular.state_distribution(mdp, pi)
    policy = TabularSoftmax(theta)
    obs = torch.eye(S).repeat_interleave(A, dim=0)  # row s·A + a: state s …
    act = torch.arange(A).repeat(S)  # … and action a
    psi = compatible_features(policy, obs, act)  # [S·A, S·A], columns in weight order a·S + s
    omega = torch.from_numpy((d[:, None] * pi).ravel())

    def fit(target: np.ndarray) -> np.ndarray:
        w = compatible_least_squares(psi, torch.from_numpy(target.ravel()), 0.0, omega, dual=dual)
        return w.reshape(A, S).T.numpy()  # back to θ's [S, A] layout

    Q = tabular.q_values(mdp, pi)
    w_adv = fit(tabular.advantages(mdp, pi))
    expected = (1.0 - mdp.gamma) * tabular.natural_gradient(mdp, theta)
    np.testing.assert_allclose(w_adv, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fit(Q), expected, rtol=0, atol=1e-10)
    baseline = np.random.default_rng(4).normal(size=(S, 1)) * 10.0
    np.testing.assert_allclose(fit(Q - baseline), expected, rtol=0, atol=1e-10)
    eta = 0.7  # and a step along w*/(1 − γ) is the NPG step, policy for policy
    np.testing.assert_allclose(tabular.softmax_policy(theta + eta * w_adv / (1.0 - mdp.gamma)),
                               tabular.softmax_policy(tabular.npg_step(mdp, theta, eta)), rtol=0, atol=1e-10)


class LinearFeatureSoftmax(nn.Module):
    """π(a|s) ∝ exp φ(s, a)ᵀθ with k < S·A features (a one-hot state in): function approximation, where the
    compatible fit, unlike the tabular one, depends on how the states are weighted."""

    def __init__(self, features: np.ndarray, theta: np.ndarray):
        super().__init__()
        self.register_buffer("features", torch.from_numpy(features))  # [S, A, k]
        self.theta = nn.Parameter(torch.from_numpy(theta.copy()))
        self.head = CategoricalHead()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ns,sak,k->na", obs, self.features, self.theta)

    def dist(self, obs: torch.Tensor):
        return self.head.dist(self(obs))

    def actor_parameters(self) -> list[nn.Parameter]:
        return [self.theta]


def test_compatible_least_squares_under_function_approximation_needs_the_discounted_state_distribution():
    """Kakade's F w* = (1 − γ)∇V(ρ) for a policy with k = 6 < S·A = 15 features: natpg's compatible least squares,
    weighted by d^π_ρ(s)π(a|s) from tabular.state_distribution, against F from a loop over the analytic scores
    ψ = φ(s, a) − Σ_b π(b|s)φ(s, b) under the discounted distribution summed as a series, and ∇V(ρ) by central
    differences of an explicit-inverse evaluation. The start distribution ρ in d's place (as a tabular policy's
    fit would allow: there the weighting drops out) misses the identity by orders of magnitude."""
    mdp = tabular.random_mdp(5, 3, gamma=0.9, seed=5, rho="dirichlet")
    S, A, k, gamma = mdp.n_states, mdp.n_actions, 6, mdp.gamma
    rng = np.random.default_rng(5)
    features, theta = rng.normal(size=(S, A, k)), 0.5 * rng.normal(size=k)

    def policy_of(th: np.ndarray) -> np.ndarray:
        logits = features @ th
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def start_value(th: np.ndarray) -> float:
        pi = policy_of(th)
        P_pi = np.einsum("sa,sat->st", pi, mdp.P)
        return float(mdp.rho @ np.linalg.inv(np.eye(S) - gamma * P_pi) @ (pi * mdp.R).sum(axis=1))

    pi = policy_of(theta)
    h = 1e-5
    grad = np.array([(start_value(theta + h * e) - start_value(theta - h * e)) / (2 * h) for e in np.eye(k)])
    P_pi, term, d_ref = np.einsum("sa,sat->st", pi, mdp.P), mdp.rho.copy(), np.zeros(S)
    while term.sum() > 1e-17:
        d_ref, term = d_ref + (1 - gamma) * term, gamma * term @ P_pi
    F_ref = np.zeros((k, k))
    for s in range(S):
        for a in range(A):
            psi = features[s, a] - pi[s] @ features[s]
            F_ref += d_ref[s] * pi[s, a] * np.outer(psi, psi)

    policy = LinearFeatureSoftmax(features, theta)
    obs = torch.eye(S, dtype=torch.float64).repeat_interleave(A, dim=0)  # row s·A + a: state s …
    act = torch.arange(A).repeat(S)  # … and action a
    psi = compatible_features(policy, obs, act)
    target = torch.from_numpy(tabular.advantages(mdp, pi).ravel())

    def fit(state_weights: np.ndarray) -> np.ndarray:
        omega = torch.from_numpy((state_weights[:, None] * pi).ravel())
        return compatible_least_squares(psi, target, 0.0, omega).numpy()

    w = fit(tabular.state_distribution(mdp, pi))
    np.testing.assert_allclose(F_ref @ w, (1 - gamma) * grad, rtol=0, atol=1e-9)
    assert np.abs(F_ref @ fit(mdp.rho) - (1 - gamma) * grad).max() > 1e-4


# --------------------------------------------------------------------------------------------------
# (b) Sampled data from a neural policy: nac.py against a dense solve of a loop-built score matrix
# --------------------------------------------------------------------------------------------------

def make_policy(kind: str, hidden=(5,), obs_dim: int = 3) -> nn.Module:
    torch.manual_seed(0)
    policy = GaussianMLP(obs_dim, 2, hidden) if kind == "gauss" else CategoricalMLP(obs_dim, 3, hidden)
    with torch.no_grad():  # away from the near-uniform initialisation, so scores vary across samples
        for p in policy.actor_parameters():
            p.add_(0.5 * torch.randn_like(p))
    return policy


def sampled_batch(policy: nn.Module, n: int, obs_dim: int = 3) -> Batch:
    gen = torch.Generator().manual_seed(n)
    obs = torch.randn(n, obs_dim, generator=gen)
    with torch.no_grad():
        eta = policy(obs)
        act = policy.sample(eta, gen)
        logp = policy.head.dist(eta).log_prob(act)
    adv = torch.randn(n, generator=gen)
    return Batch(obs=obs, act=act, adv=adv, ret=adv, logp_old=logp, eta_old=eta)


def loop_scores(policy: nn.Module, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Ψ [N, P]: ∇_θ log π(a_b|s_b) by torch.autograd.grad, one sample at a time."""
    params = list(policy.actor_parameters())
    rows = []
    for b in range(obs.shape[0]):
        logp = policy.dist(obs[b : b + 1]).log_prob(act[b : b + 1]).sum()
        rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(logp, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["gauss", "cat"])
@pytest.mark.parametrize("n", [12, 60])  # P = 34 (gauss) / 38 (cat): the dual N×N solve for 12, primal for 60
def test_compatible_least_squares_equals_dense_solve(float64, kind, n):
    policy = make_policy(kind)
    batch = sampled_batch(policy, n)
    lam = 0.05
    Psi = loop_scores(policy, batch.obs, batch.act)
    P = Psi.shape[1]
    reference = torch.linalg.solve(Psi.T @ Psi / n + lam * torch.eye(P), Psi.T @ batch.adv / n)
    w = compatible_least_squares(compatible_features(policy, batch.obs, batch.act), batch.adv, lam)
    torch.testing.assert_close(w, reference, rtol=0, atol=1e-10)
    for dual in (False, True):  # either form of the same system
        torch.testing.assert_close(compatible_least_squares(Psi, batch.adv, lam, dual=dual), reference,
                                   rtol=0, atol=1e-10)


def test_zero_ridge_gives_the_minimum_norm_least_squares_solution(float64):
    policy = make_policy("cat")
    batch = sampled_batch(policy, 12)  # N < P: Ψw = Â has many solutions; the dual form picks the shortest
    Psi = loop_scores(policy, batch.obs, batch.act)
    w = compatible_least_squares(Psi, batch.adv, 0.0)
    torch.testing.assert_close(w, torch.linalg.pinv(Psi) @ batch.adv, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dual", [True, False])
def test_zero_ridge_on_float32_scores_drops_what_float32_cannot_resolve(dual):
    """A float32 Ψ of rank r < N: its Gram, formed in float32, has N − r eigenvalues of rounding noise (≈ 1e-7 of
    the largest, either sign). The minimum-norm solution leaves them out, as the float64 pseudo-inverse of Ψ does
    with a cutoff above float32's rounding; inverting them (a cutoff at float64's) gave weights 9× (dual) and 56×
    (primal) too long here, and NAC with damping 0 non-finite steps."""
    gen = torch.Generator().manual_seed(0)
    N, P, r = 64, 200, 20
    psi = torch.randn(N, r, generator=gen) @ torch.randn(r, P, generator=gen)  # float32, rank r
    adv = torch.randn(N, generator=gen)
    w = compatible_least_squares(psi, adv, 0.0, dual=dual)
    reference = torch.linalg.pinv(psi.double(), rtol=1e-4) @ adv.double()
    torch.testing.assert_close(w.double(), reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))


def test_nac_with_zero_damping_trains_without_faults():
    rows = []
    natpg.NAC("CartPole-v1", seed=0, damping=0.0, n_envs=4, n_steps=256, tensorboard=False).learn(
        5 * 1024, callback=lambda agent, row: rows.append(row))
    assert [row["step/skipped"] for row in rows] == [0.0] * 5 and all(row["nac/critic_r2"] > -1 for row in rows)


@pytest.mark.parametrize("kind", ["gauss", "cat"])
def test_nac_direction_is_the_empirical_fisher_natural_gradient(float64, kind):
    """w = (ΨᵀΨ + λN I)⁻¹ΨᵀÂ = (F_emp + λI)⁻¹g, with g = ΨᵀÂ/N the surrogate's gradient at θ_old; the update
    moves θ by exactly α·w (fixed step)."""
    policy = make_policy(kind)
    batch = sampled_batch(policy, 20)
    lam = 0.1
    params = policy.actor_parameters()
    g = flatten(torch.autograd.grad(surrogate(policy, batch), params))
    Psi = loop_scores(policy, batch.obs, batch.act)
    torch.testing.assert_close(Psi.T @ batch.adv / 20, g, rtol=0, atol=1e-12)
    emp = fisher.Empirical(damping=lam)
    emp.fit(policy, batch.obs, batch.act)
    w = compatible_least_squares(compatible_features(policy, batch.obs, batch.act), batch.adv, lam)
    torch.testing.assert_close(w, emp.solve(g), rtol=0, atol=1e-9)
    theta0 = get_flat(params)
    F = fisher.dense_fisher(policy, batch.obs)  # at θ_old: the logged ratio compares the two Fishers along w
    stats = NaturalActorCritic(lam, FixedStep(0.3)).update(policy, batch)
    torch.testing.assert_close(get_flat(params) - theta0, 0.3 * w, rtol=0, atol=1e-12)
    residual = batch.adv - Psi @ w
    r2 = 1 - float(residual.square().sum() / (batch.adv - batch.adv.mean()).square().sum())
    assert stats["nac/critic_r2"] == pytest.approx(r2, abs=1e-10)
    assert stats["grad/norm"] == pytest.approx(float(g.norm()), rel=1e-10)  # g = ΨᵀÂ/N, the surrogate's gradient
    assert stats["nac/emp_to_true_curvature"] == pytest.approx(float(w @ (Psi.T @ Psi / 20) @ w) / float(w @ F @ w),
                                                                 rel=1e-8)


def test_kl_step_is_measured_with_the_exact_fisher(float64):
    """α = √(2δ / wᵀFw) with F the exact Fisher (dense_fisher), not F_emp: the measured KL is ≈ δ."""
    policy = make_policy("cat")
    batch = sampled_batch(policy, 20)
    F = fisher.dense_fisher(policy, batch.obs)
    w = compatible_least_squares(compatible_features(policy, batch.obs, batch.act), batch.adv, 0.1)
    delta = 1e-4
    stats = NaturalActorCritic(0.1, KLStep(delta)).update(policy, batch)
    wFw = float(w @ F @ w)
    assert stats["step/dFd"] == pytest.approx(wFw, rel=1e-10)
    assert stats["step/size"] == pytest.approx(math.sqrt(2 * delta / wFw), rel=1e-10)
    assert stats["step/kl"] == pytest.approx(delta, rel=0.05)  # quadratic model, small step


def test_nac_facade_cli_and_checkpoint(tmp_path):
    from natpg import checkpoint
    from natpg.cli import main as cli

    with pytest.raises(ValueError, match="fisher must be 'empirical'"):
        natpg.NAC("CartPole-v1", fisher="cg")
    with pytest.raises(ValueError, match="which step='ppo_clip' would replace by PPO's clipped objective: for that, use ppo"):
        natpg.NAC("CartPole-v1", step="ppo_clip")  # was PPO under NAC's name
    ppo = natpg.PPO("CartPole-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False).learn(64)
    ppo.save(str(tmp_path / "ppo"))
    meta, tensors = checkpoint.read(str(tmp_path / "ppo"))  # what such a run wrote: nac, NAC's fisher, PPO's step
    meta["algorithm"] = meta["config"]["algorithm"] = "nac"
    meta["config"]["curvature"]["fisher"] = "empirical"
    checkpoint.write(str(tmp_path / "old"), meta, tensors)
    with pytest.warns(UserWarning, match="recorded as nac with step='ppo_clip'.*loads as the PPO run it was"):
        old = natpg.load(str(tmp_path / "old"))
    assert type(old) is natpg.PPO and old.env_steps == 64
    np.testing.assert_array_equal(old.predict(np.zeros((3, 4))), ppo.predict(np.zeros((3, 4))))
    old.learn(64, reset=False)
    agent = natpg.NAC("CartPole-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False).learn(128)
    loaded = natpg.load(agent.save(str(tmp_path / "m")))
    assert type(loaded) is natpg.NAC and loaded.config.curvature.fisher == "empirical"
    obs = np.zeros((3, 4))
    np.testing.assert_array_equal(agent.predict(obs), loaded.predict(obs))
    out = tmp_path / "run"
    assert cli(["train", "nac", "CartPole-v1", "--steps", "128", "--out", str(out), "--no-progress",
                "--n-envs", "2", "--set", "n_steps=32", "--set", "tensorboard=False"]) == 0
    header = (out / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"env_steps", "ep_return_mean", "nac/critic_r2", "nac/emp_to_true_curvature", "step/kl"} <= set(header)


# --------------------------------------------------------------------------------------------------
# (c) Learning
# --------------------------------------------------------------------------------------------------

@pytest.mark.learning
def test_nac_learns_cartpole():
    """NAC (CartPole preset: 8 envs × 128 steps, KL step δ = 0.02, ridge λ = 0.01) reaches a deterministic mean
    return ≥ 475 within 100k steps (500 for seeds 0, 1 and 2; about 40 s of CPU)."""
    torch.set_default_dtype(torch.float32)
    start = time.perf_counter()
    agent = natpg.NAC("CartPole-v1", seed=0, tensorboard=False).learn(100_000)
    mean, std = natpg.evaluate(agent, episodes=10, seed=1000)
    print(f"NAC CartPole-v1: {mean:.1f} ± {std:.1f} after {agent.env_steps} steps, {time.perf_counter() - start:.1f} s")
    assert agent.env_steps <= 100_000 and mean >= 475


# --------------------------------------------------------------------------------------------------
# Empirical vs true Fisher (the case in examples/empirical_vs_true_fisher.py)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("empirical_vs_true_fisher",
                                                  ROOT / "examples" / "empirical_vs_true_fisher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def test_empirical_fisher_is_the_fisher_in_expectation_on_policy_only(float64, experiment):
    """E_{a~π}[F_emp] = F exactly (every action enumerated, against dense_fisher); with the behaviour's
    actions, E_β[F_emp] ≠ F — a bias, not noise."""
    sc = experiment.scenario(0)
    obs = experiment.sample_states(256, torch.Generator().manual_seed(0))
    F = fisher.dense_fisher(sc.policy, obs)
    on = experiment.expected_empirical_fisher(sc.policy, obs, experiment.probs(sc.policy, obs))
    torch.testing.assert_close(on, F, rtol=0, atol=1e-12)
    off = experiment.expected_empirical_fisher(sc.policy, obs, experiment.probs(sc.behaviour, obs))
    assert float((off - F).norm() / F.norm()) > 2.0


def test_empirical_fisher_disagrees_off_policy_and_agrees_on_policy(float64, experiment):
    """Sampled: on-policy the relative error shrinks like 1/√N and the natural directions align; off-policy the
    error stays above 2 and the directions stay > 20° apart (Fisher metric). With N < P samples even
    on-policy F_emp is rank-deficient, and the step it sizes to δ by its own quadratic model overshoots."""
    sc = experiment.scenario(0)
    gen = torch.Generator().manual_seed(1)
    results = {}
    for n in (64, 256, 4096):
        obs = experiment.sample_states(n, gen)
        for source, pol in (("on", sc.policy), ("off", sc.behaviour)):
            results[source, n] = experiment.measure(sc, obs, experiment.sample_actions(pol, obs, gen))
    on, off = results["on", 4096], results["off", 4096]
    assert on["rel_error"] < 0.15 and on["rel_error"] < 0.4 * results["on", 64]["rel_error"]  # 1/√64 = 0.125
    assert on["angle_deg"] < 12.0
    assert off["rel_error"] > 2.0 and results["off", 256]["rel_error"] > 2.0
    assert off["angle_deg"] > 20.0
    assert results["on", 64]["kl_emp"] > 3 * experiment.MAX_KL  # N = 64 < P = 68
    for r in results.values():  # sizing with the true F keeps the exact KL at the budget
        assert r["kl_true"] == pytest.approx(experiment.MAX_KL, rel=0.15)
