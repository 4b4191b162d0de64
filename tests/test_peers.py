"""natpg's updates against a published implementation of the same algorithm, on the same weights and the same batch.

sb3-contrib's TRPO (Raffin et al., the peer natpg is benchmarked against) is written independently of natpg: its own
surrogate, KL Hessian-vector products by double backward, conjugate gradient and backtracking line search. Given the
same policy and the same batch, one TRPO update of each must land on the same parameters, to float32 rounding.
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


def sb3_trpo_like(agent, n: int, cg_iters: int, max_kl: float):
    """sb3-contrib's TRPO with natpg's architecture and update settings, holding a copy of ``agent``'s actor."""
    from stable_baselines3.common.logger import Logger

    model = sb3_contrib.TRPO("MlpPolicy", agent.env_id, n_steps=n, batch_size=n, n_critic_updates=1,
                             cg_max_steps=cg_iters, cg_damping=agent.config.curvature.damping,
                             line_search_shrinking_factor=agent.config.step.backtrack_shrink,
                             line_search_max_iter=agent.config.step.backtrack_iters, target_kl=max_kl,
                             normalize_advantage=True, device="cpu", seed=0,
                             policy_kwargs=dict(net_arch=dict(pi=[64, 64], vf=[64, 64]), activation_fn=nn.Tanh))
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
    return model, theirs


def actor_vector(linears, log_std=None) -> torch.Tensor:
    parts = [t.detach().reshape(-1) for m in linears for t in (m.weight, m.bias)]
    return torch.cat(parts + ([log_std.detach().reshape(-1)] if log_std is not None else []))


def one_update_each(env_id: str, max_kl: float, monkeypatch):
    """One TRPO update by natpg and one by sb3-contrib's ``train()`` from the same actor weights on the same batch
    (random states, actions drawn from the policy, random advantages), in float64 on both sides: (natpg's update
    statistics, natpg's step, sb3-contrib's step, sb3-contrib's logged KL, and KL(new‖old) of natpg's new policy).

    sb3-contrib is changed in two places, neither in its update: its conjugate gradient starts from zero, as natpg's,
    instead of 10⁻⁴ of Gaussian noise, and its observations keep their float64 (it casts them to float32)."""
    n, cg_iters = 512, 10
    agent = natpg.TRPO(env_id, seed=3, max_kl=max_kl, cg_iters=cg_iters, n_envs=1, n_steps=n, torch_threads=1,
                       tensorboard=False)
    model, theirs = sb3_trpo_like(agent, n, cg_iters, max_kl)
    policy = agent.policy.double()  # float64 on both sides: the comparison is of the maths, not of rounding
    model.policy.double()
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n, agent.observation_space.shape[0], generator=g, dtype=torch.float64)
    with torch.no_grad():
        eta_old = policy(obs)
        dist = policy.head.dist(eta_old)
        act = dist.sample()
        act = act.float().to(act.dtype)  # sb3-contrib's buffer hands out actions as float32: the same actions
        logp_old = dist.log_prob(act)
    adv_raw = torch.randn(n, generator=g, dtype=torch.float64) * 3.0 + 0.5
    batch = Batch(obs=obs, act=act, adv=normalize_advantages(adv_raw), ret=torch.zeros(n, dtype=torch.float64),
                  logp_old=logp_old, eta_old=eta_old)

    buf = model.rollout_buffer  # its float32 arrays replaced by float64 ones of the same shapes
    buf.reset()
    for name, value in (("observations", obs), ("actions", act), ("advantages", adv_raw), ("log_probs", logp_old),
                        ("returns", torch.zeros(n)), ("values", torch.zeros(n))):
        setattr(buf, name, value.numpy().astype(np.float64).reshape(getattr(buf, name).shape))
    buf.full, buf.pos = True, n

    log_std = getattr(policy, "log_std", None)
    ours = [m for m in policy.modules() if isinstance(m, nn.Linear)]
    before = actor_vector(ours, log_std)
    assert torch.equal(before, actor_vector(theirs, getattr(model.policy, "log_std", None)))

    # sb3-contrib stops its CG once ‖r‖² < 1e-10, natpg once ‖r‖ ≤ cg_tol·‖g‖: natpg's cg_tol set to stop where it does
    gradient = torch.autograd.grad(surrogate(policy, batch), policy.actor_parameters())
    agent.actor_update.curvature.tol = 1e-5 / float(torch.cat([t.reshape(-1) for t in gradient]).norm())
    stats = agent.actor_update.update(policy, batch)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # sb3-contrib's CG start, 1e-4·N(0, 1), at zero
    import stable_baselines3.common.policies as sb3_policies

    monkeypatch.setattr(sb3_policies, "preprocess_obs", lambda obs, *args, **kwargs: obs)  # not cast to float32
    model.train()

    step_ours = actor_vector(ours, log_std) - before
    step_theirs = actor_vector(theirs, getattr(model.policy, "log_std", None)) - before
    with torch.no_grad():
        kl_new_old = float(kl_divergence(policy.dist(obs), policy.head.dist(eta_old)).mean())
    return stats, step_ours, step_theirs, model.logger.name_to_value["train/kl_divergence_loss"], kl_new_old


def largest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| as a fraction of max |a|."""
    return float((a - b).abs().max()) / float(a.abs().max())


@pytest.mark.parametrize("env_id, max_kl, backtracks", [
    ("Pendulum-v1", 0.01, 0), ("CartPole-v1", 0.01, 0), ("CartPole-v1", 0.002, 0),
    ("MountainCarContinuous-v0", 1.0, 3),  # three backtracks (0.8³ of the full step) on both sides
])
def test_one_trpo_update_lands_where_sb3_contribs_does(env_id, max_kl, backtracks, monkeypatch):
    """Gradient, Fisher-vector products, conjugate gradient, the step √(2δ / dᵀ(F + λI)d) and the backtracking line
    search: the parameters after one update of each agree to 10⁻⁹ of the step, in float64."""
    stats, ours, theirs, their_kl, kl_new_old = one_update_each(env_id, max_kl, monkeypatch)
    assert stats["step/accepted"] == 1.0 and stats["step/backtracks"] == backtracks
    assert float(ours.norm()) > 1e-3 and largest_gap(ours, theirs) <= 1e-9
    assert np.isclose(kl_new_old, their_kl, rtol=1e-9)  # the KL sb3-contrib logs, of the same new policy
    assert 0.0 < stats["step/kl"] <= max_kl


def test_trpo_constrains_kl_old_new_as_the_paper_where_sb3_contrib_measures_kl_new_old(monkeypatch):
    """The one difference in the update: TRPO's trust region (Schulman et al. 2015, eq. 12) bounds the mean
    KL(π_old ‖ π_new), which natpg's line search measures; sb3-contrib's measures KL(π_new ‖ π_old), equal to second
    order only. On this Pendulum batch with δ = 0.05 the full step has KL(old‖new) = 0.0511 > δ, so natpg backtracks
    once, while its KL(new‖old) < δ, so sb3-contrib keeps it: natpg's step is exactly 0.8 of sb3-contrib's."""
    stats, ours, theirs, their_kl, kl_new_old = one_update_each("Pendulum-v1", 0.05, monkeypatch)
    assert stats["step/backtracks"] == 1.0 and stats["step/kl_full_step"] > 0.05 > their_kl
    assert largest_gap(0.8 * theirs, ours) <= 1e-9
