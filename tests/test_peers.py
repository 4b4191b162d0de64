"""natpg's updates against published implementations of the same algorithms, on the same weights and the same batch.

sb3-contrib's TRPO and Stable-Baselines3's PPO (the peers natpg is benchmarked against) are written independently of
natpg: their own surrogates, KL Hessian-vector products by double backward, conjugate gradient, line search, clipped
objective and Adam loop. Given the same policy and the same batch, one update of each must land on the same
parameters; in float64, so that what is compared is the maths, not the rounding.

The peers are changed in three places, none in their updates: their observations keep their float64 (they cast them
to float32), and sb3-contrib's conjugate gradient starts from zero, as natpg's, instead of 10⁻⁴ of Gaussian noise.
Their buffers hand out actions as float32, so the batch's actions are float32 values on both sides.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence

import natpg
from natpg.advantages import normalize_advantages
from natpg.algorithms import Batch, surrogate

sb3_contrib = pytest.importorskip("sb3_contrib")
N = 512  # samples in the batch


def with_agents_actor(model, agent):
    """``model`` (an SB3 on-policy algorithm with natpg's [64, 64] tanh actor) holding a float64 copy of
    ``agent``'s actor, and the policy's Linear layers of each, in the same order."""
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))
    ours = [m for m in agent.policy.modules() if isinstance(m, nn.Linear)]
    theirs = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, nn.Linear)] + [model.policy.action_net]
    assert [tuple(m.weight.shape) for m in ours] == [tuple(m.weight.shape) for m in theirs]
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        if hasattr(agent.policy, "log_std"):
            model.policy.log_std.copy_(agent.policy.log_std)
    agent.policy.double()
    model.policy.double()
    return ours, theirs


ARCH = dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=nn.Tanh)


def actor_vector(linears, log_std=None) -> torch.Tensor:
    parts = [t.detach().reshape(-1) for m in linears for t in (m.weight, m.bias)]
    return torch.cat(parts + ([log_std.detach().reshape(-1)] if log_std is not None else []))


def shared_batch(agent, model) -> Batch:
    """A batch for ``agent`` (random states, actions drawn from its policy, random advantages), and the same in
    ``model``'s rollout buffer (float64 arrays in place of its float32 ones; advantages raw, as SB3 normalises them
    itself)."""
    policy = agent.policy
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(N, agent.observation_space.shape[0], generator=g, dtype=torch.float64)
    with torch.no_grad():
        eta_old = policy(obs)
        dist = policy.head.dist(eta_old)
        act = dist.sample()
        act = act.float().to(act.dtype)  # SB3's buffers hand out actions as float32: the same actions
        logp_old = dist.log_prob(act)
    adv_raw = torch.randn(N, generator=g, dtype=torch.float64) * 3.0 + 0.5
    buf = model.rollout_buffer
    buf.reset()
    for name, value in (("observations", obs), ("actions", act), ("advantages", adv_raw), ("log_probs", logp_old),
                        ("returns", torch.zeros(N)), ("values", torch.zeros(N))):
        setattr(buf, name, value.numpy().astype(np.float64).reshape(getattr(buf, name).shape))
    buf.full, buf.pos = True, N
    return Batch(obs=obs, act=act, adv=normalize_advantages(adv_raw), ret=torch.zeros(N, dtype=torch.float64),
                 logp_old=logp_old, eta_old=eta_old)


def keep_float64(monkeypatch) -> None:
    import stable_baselines3.common.policies as sb3_policies

    monkeypatch.setattr(sb3_policies, "preprocess_obs", lambda obs, *args, **kwargs: obs)  # not cast to float32


def largest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| as a fraction of max |a|."""
    return float((a - b).abs().max()) / float(a.abs().max())


def trpo_update_each(env_id: str, max_kl: float, monkeypatch):
    """One TRPO update by natpg and one by sb3-contrib's ``train()``: (natpg's update statistics, natpg's step,
    sb3-contrib's step, sb3-contrib's logged KL, and KL(new‖old) of natpg's new policy)."""
    cg_iters = 10
    agent = natpg.TRPO(env_id, seed=3, max_kl=max_kl, cg_iters=cg_iters, n_envs=1, n_steps=N, torch_threads=1,
                       tensorboard=False)
    c, s = agent.config.curvature, agent.config.step
    model = sb3_contrib.TRPO("MlpPolicy", env_id, n_steps=N, batch_size=N, n_critic_updates=1, cg_max_steps=cg_iters,
                             cg_damping=c.damping, line_search_shrinking_factor=s.backtrack_shrink,
                             line_search_max_iter=s.backtrack_iters, target_kl=max_kl, normalize_advantage=True,
                             device="cpu", seed=0, policy_kwargs=ARCH)
    ours, theirs = with_agents_actor(model, agent)
    batch = shared_batch(agent, model)
    policy, log_std = agent.policy, getattr(agent.policy, "log_std", None)
    before = actor_vector(ours, log_std)
    assert torch.equal(before, actor_vector(theirs, getattr(model.policy, "log_std", None)))

    # sb3-contrib stops its CG once ‖r‖² < 1e-10, natpg once ‖r‖ ≤ cg_tol·‖g‖: natpg's cg_tol set to stop where it does
    gradient = torch.autograd.grad(surrogate(policy, batch), policy.actor_parameters())
    agent.actor_update.curvature.tol = 1e-5 / float(torch.cat([t.reshape(-1) for t in gradient]).norm())
    stats = agent.actor_update.update(policy, batch)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # sb3-contrib's CG start, 1e-4·N(0, 1), at zero
    keep_float64(monkeypatch)
    model.train()

    step_ours = actor_vector(ours, log_std) - before
    step_theirs = actor_vector(theirs, getattr(model.policy, "log_std", None)) - before
    with torch.no_grad():
        kl_new_old = float(kl_divergence(policy.dist(batch.obs), policy.head.dist(batch.eta_old)).mean())
    return stats, step_ours, step_theirs, model.logger.name_to_value["train/kl_divergence_loss"], kl_new_old


@pytest.mark.parametrize("env_id, max_kl, backtracks", [
    ("Pendulum-v1", 0.01, 0), ("CartPole-v1", 0.01, 0), ("CartPole-v1", 0.002, 0),
    ("MountainCarContinuous-v0", 1.0, 3),  # three backtracks (0.8³ of the full step) on both sides
])
def test_one_trpo_update_lands_where_sb3_contribs_does(env_id, max_kl, backtracks, monkeypatch):
    """Gradient, Fisher-vector products, conjugate gradient, the step √(2δ / dᵀ(F + λI)d) and the backtracking line
    search: the parameters after one update of each agree to 10⁻⁹ of the step."""
    stats, ours, theirs, their_kl, kl_new_old = trpo_update_each(env_id, max_kl, monkeypatch)
    assert stats["step/accepted"] == 1.0 and stats["step/backtracks"] == backtracks
    assert float(ours.norm()) > 1e-3 and largest_gap(ours, theirs) <= 1e-9
    assert np.isclose(kl_new_old, their_kl, rtol=1e-9)  # the KL sb3-contrib logs, of the same new policy
    assert 0.0 < stats["step/kl"] <= max_kl


def test_trpo_constrains_kl_old_new_as_the_paper_where_sb3_contrib_measures_kl_new_old(monkeypatch):
    """The one difference in the update: TRPO's trust region (Schulman et al. 2015, eq. 12) bounds the mean
    KL(π_old ‖ π_new), which natpg's line search measures; sb3-contrib's measures KL(π_new ‖ π_old), equal to second
    order only. On this Pendulum batch with δ = 0.05 the full step has KL(old‖new) = 0.0511 > δ, so natpg backtracks
    once, while its KL(new‖old) < δ, so sb3-contrib keeps it: natpg's step is exactly 0.8 of sb3-contrib's."""
    stats, ours, theirs, their_kl, kl_new_old = trpo_update_each("Pendulum-v1", 0.05, monkeypatch)
    assert stats["step/backtracks"] == 1.0 and stats["step/kl_full_step"] > 0.05 > their_kl
    assert largest_gap(0.8 * theirs, ours) <= 1e-9


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_ppo_epochs_land_where_stable_baselines3s_do(env_id, monkeypatch):
    """Ten epochs of PPO's clipped objective by Adam (whole-batch minibatches, so that both take the same steps
    whatever order they shuffle the samples in; gradient norm clipped to 0.5; Adam's ε 10⁻⁵ on both sides): the actor
    after natpg's update and after Stable-Baselines3's ``PPO.train()`` (its value loss weighted 0, so that its joint
    loss is the actor's) agree to 10⁻⁹ of the change, in float64."""
    from stable_baselines3 import PPO

    epochs, alpha = 10, 3e-3
    agent = natpg.PPO(env_id, seed=3, n_envs=1, n_steps=N, alpha=alpha, ppo_epochs=epochs, ppo_minibatch=N,
                      clip_range=0.2, target_kl=0.0, max_grad_norm=0.5, torch_threads=1, tensorboard=False)
    model = PPO("MlpPolicy", env_id, n_steps=N, batch_size=N, n_epochs=epochs, learning_rate=alpha, clip_range=0.2,
                ent_coef=0.0, vf_coef=0.0, max_grad_norm=0.5, target_kl=None, normalize_advantage=True, device="cpu",
                seed=0, policy_kwargs=ARCH)
    ours, theirs = with_agents_actor(model, agent)
    batch = shared_batch(agent, model)
    log_std = getattr(agent.policy, "log_std", None)
    before = actor_vector(ours, log_std)
    stats = agent.actor_update.update(agent.policy, batch)
    keep_float64(monkeypatch)
    model.train()

    step_ours = actor_vector(ours, log_std) - before
    step_theirs = actor_vector(theirs, getattr(model.policy, "log_std", None)) - before
    assert stats["step/sgd_steps"] == epochs and 0.0 < stats["step/clip_fraction"]  # the clip was reached
    assert float(step_ours.norm()) > 1e-2 and largest_gap(step_ours, step_theirs) <= 1e-9
    # SB3's train/clip_fraction counts |r − 1| > ε, natpg's step/clip_fraction only where the clip binds (docs/logs.md)
    assert stats["step/clip_fraction"] < model.logger.name_to_value["train/clip_fraction"]


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (0.9, 1.0), (0.999, 0.0)])
def test_gae_equals_stable_baselines3s_with_terminations_and_time_limits(gamma, lam):
    """natpg's GAE against SB3's RolloutBuffer.compute_returns_and_advantage on the same rollout (4 copies × 64 steps,
    episodes that terminate and episodes cut by a time limit, in float64). SB3 bootstraps a time limit by adding
    γ·V(final observation) to that step's reward (OnPolicyAlgorithm.collect_rollouts) and cuts the trace at every
    episode end; natpg reads V(final observation) as the step's next value: the same advantages and returns."""
    from gymnasium import spaces
    from stable_baselines3.common.buffers import RolloutBuffer

    from natpg.advantages import gae

    T, n = 64, 4
    rng = np.random.default_rng(0)
    rew, values = rng.normal(size=(T, n)), rng.normal(size=(T, n))
    ends = rng.random((T, n))
    terminated, truncated = ends < 0.05, (ends >= 0.05) & (ends < 0.1)
    done = terminated | truncated
    final_values = rng.normal(size=(T, n))  # V of the episode's last observation, where one ended
    last_values = rng.normal(size=n)  # V(s_T), after the rollout
    next_values = np.where(done, final_values, np.concatenate([values[1:], last_values[None]]))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    adv, ret = gae(t(rew), t(values), t(next_values), t(terminated), t(done), gamma, lam)

    buf = RolloutBuffer(T, spaces.Box(-1, 1, (1,)), spaces.Discrete(2), device="cpu", gamma=gamma, gae_lambda=lam,
                        n_envs=n)
    buf.rewards = rew + gamma * final_values * truncated  # collect_rollouts' time-limit bootstrap
    buf.values = values.copy()
    buf.episode_starts = np.concatenate([np.zeros((1, n)), done[:-1]]).astype(np.float64)
    buf.advantages = np.zeros((T, n))
    buf.compute_returns_and_advantage(t(last_values), done[-1])
    assert np.abs(adv.numpy() - buf.advantages).max() <= 1e-12 * np.abs(buf.advantages).max()
    assert np.abs(ret.numpy() - buf.returns).max() <= 1e-12 * np.abs(buf.returns).max()
