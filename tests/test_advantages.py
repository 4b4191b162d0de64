"""GAE against a plain per-episode loop, with terminations, truncations and the rollout's end."""

import math

import numpy as np
import pytest
import torch

from natpg.advantages import gae, normalize_advantages


def reference_gae(rew, val, next_val, term, trunc, gamma, lam):
    """One environment copy at a time, one step at a time, written from the definition:
    A_t = Σ_k (γλ)^k δ_{t+k} summed until the episode (or the rollout) ends."""
    T, N = rew.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for k in range(t, T):
                bootstrap = 0.0 if term[k, n] else next_val[k, n]
                delta = rew[k, n] + gamma * bootstrap - val[k, n]
                total += discount * delta
                if term[k, n] or trunc[k, n]:
                    break
                discount *= gamma * lam
            adv[t, n] = total
    return adv


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (0.97, 0.0), (0.0, 0.5)])
def test_gae_equals_plain_loop_with_truncation(float64, gamma, lam):
    rng = np.random.default_rng(0)
    T, N = 40, 5
    rew, val, next_val = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=(T, N))
    term = rng.random((T, N)) < 0.08
    trunc = (rng.random((T, N)) < 0.08) & ~term
    adv, ret = gae(*(torch.tensor(x) for x in (rew, val, next_val, term, term | trunc)), gamma, lam)
    expected = reference_gae(rew, val, next_val, term, trunc, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), expected + val, atol=1e-12)


def test_truncated_step_bootstraps_from_final_value_terminated_does_not(float64):
    rew = torch.tensor([[1.0, 1.0]])
    val = torch.tensor([[0.5, 0.5]])
    next_val = torch.tensor([[10.0, 10.0]])  # V(final observation)
    term = torch.tensor([[True, False]])
    done = torch.tensor([[True, True]])  # copy 0 terminated, copy 1 truncated
    adv, _ = gae(rew, val, next_val, term, done, gamma=0.9, lam=0.95)
    assert adv[0, 0].item() == pytest.approx(1.0 - 0.5)
    assert adv[0, 1].item() == pytest.approx(1.0 + 0.9 * 10.0 - 0.5)


def test_advantage_normalisation_uses_std_plus_eps_and_survives_degenerate_batches(float64):
    a = torch.tensor([1.0, 2.0, 3.0, 6.0])
    out = normalize_advantages(a, eps=1e-8)
    assert torch.allclose(out, (a - a.mean()) / (a.std() + 1e-8))
    two = normalize_advantages(torch.tensor([1.0, 3.0]), eps=0.0)  # mean 2, sample std √2: scaled like any batch
    torch.testing.assert_close(two, torch.tensor([-1.0, 1.0]) / math.sqrt(2.0), rtol=1e-15, atol=0.0)
    assert normalize_advantages(torch.tensor([3.0])).tolist() == [0.0]  # one value: std undefined, only centred
    assert torch.isfinite(normalize_advantages(torch.zeros(7))).all()
    assert torch.all(normalize_advantages(torch.zeros(7)) == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_advantages_normalise_to_zero_and_any_spread_is_kept(dtype):
    """Equal advantages (a bandit with a constant reward) carry no signal: their centred values are the mean's
    rounding error, which (A − mean)/std would scale up to ±0.4..1 (float32, 0.1 × 64 gave 0.4255 each). A
    spread, however small against the values (1e6 ± 1, a few rounding steps), is a signal: kept, signs and all."""
    for value, n in ((0.1, 64), (1.1, 512), (-3e5, 100_000), (7e-30, 33)):
        out = normalize_advantages(torch.full((n,), value, dtype=dtype))
        assert torch.equal(out, torch.zeros(n, dtype=dtype)), (value, n)
    for offset, delta in ((1e6, 1.0), (0.1, 8 * 0.1 * torch.finfo(dtype).eps), (1000.0, 0.5)):
        a = torch.full((256,), offset, dtype=dtype)
        a[::2] += delta
        assert a[0] != a[1]
        out = normalize_advantages(a)
        torch.testing.assert_close(out, (a - a.mean()) / (a.std() + 1e-8))
        assert torch.all(out[::2] > 0) and torch.all(out[1::2] < 0), (offset, delta)


# --- the wiring around gae: what the sampler stores as the next observation, what make_batch passes -------------

def test_the_sampler_stores_the_final_observation_at_an_episode_end_and_the_next_one_otherwise():
    """next_obs[t] is obs[t + 1] within an episode; where one ends, the observation that ended it (outside
    CartPole's bounds, unless cut by the time limit), while obs[t + 1] is already a reset state (|·| ≤ 0.05)."""
    from natpg.envs import ObsNormalizer, RewardScaler, make_vec_env
    from natpg.policies import CategoricalMLP
    from natpg.rollout import Sampler

    from gymnasium.envs.classic_control.cartpole import CartPoleEnv

    bounds = CartPoleEnv()  # float32 bounds: the state ends past them in float64, and rounding is monotone
    x_max, theta_max = np.float32(bounds.x_threshold), np.float32(bounds.theta_threshold_radians)
    envs = make_vec_env("CartPole-v1", 3)
    sampler = Sampler(envs, ObsNormalizer((4,), 10.0, enabled=False), RewardScaler(3, 0.99, 10.0), 0,
                      torch.device("cpu"), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    rollout = sampler.collect(CategoricalMLP(4, 2, (8,)), 200)
    done = (rollout.terminated | rollout.truncated).numpy()
    obs, after = rollout.obs.numpy(), rollout.next_obs.numpy()
    assert done[:-1].sum() > 5
    for t in range(199):
        for i in range(3):
            if not done[t, i]:
                np.testing.assert_array_equal(after[t, i], obs[t + 1, i])
            else:
                assert abs(after[t, i][0]) >= x_max or abs(after[t, i][2]) >= theta_max or rollout.truncated[t, i]
                assert np.abs(obs[t + 1, i]).max() <= 0.05


def test_make_batch_bootstraps_truncations_and_cuts_the_trace_at_every_episode_end():
    """make_batch's advantages and returns equal the plain loop's, for a critic V(s) = s[0], with one termination
    and one truncation and normalize_advantages=False (so the raw GAE values are compared)."""
    from natpg.config import AdvantageConfig
    from natpg.policies import CategoricalMLP
    from natpg.rollout import Rollout
    from natpg.train import make_batch

    class FirstFeature(torch.nn.Module):
        def forward(self, x):
            return x[:, 0]

    T, N = 6, 2
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(T, N, 3, generator=g, dtype=torch.float64)
    after = torch.randn(T, N, 3, generator=g, dtype=torch.float64)
    term, trunc = torch.zeros(T, N, dtype=torch.bool), torch.zeros(T, N, dtype=torch.bool)
    term[2, 0], trunc[3, 1] = True, True
    rew = torch.randn(T, N, generator=g, dtype=torch.float64)
    rollout = Rollout(obs=obs, act=torch.zeros(T, N, dtype=torch.long), rew=rew, terminated=term, truncated=trunc,
                      next_obs=after)
    batch = make_batch(rollout, CategoricalMLP(3, 2, (4,)).double(), FirstFeature(),
                       AdvantageConfig(gamma=0.9, gae_lambda=0.8, normalize_advantages=False))
    ref = reference_gae(rew.numpy(), obs[..., 0].numpy(), after[..., 0].numpy(), term.numpy(), trunc.numpy(),
                        0.9, 0.8)
    np.testing.assert_allclose(batch.adv.numpy(), ref.reshape(-1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(batch.ret.numpy(), (ref + obs[..., 0].numpy()).reshape(-1), rtol=0, atol=1e-12)


# Found by stop 47's second mutation audit: the critic's targets come from the raw GAE.

def test_make_batch_normalises_the_advantages_but_keeps_the_returns_of_the_raw_gae(float64):
    """With normalize_advantages=True only the actor's advantages are standardised: the critic's targets stay
    A + V of the raw GAE (a loop), not the normalised advantages plus V."""
    from natpg.config import AdvantageConfig
    from natpg.policies import CategoricalMLP
    from natpg.rollout import Rollout
    from natpg.train import make_batch

    class FirstFeature(torch.nn.Module):
        def forward(self, x):
            return x[:, 0]

    T, N, gamma, lam = 7, 3, 0.9, 0.8
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(T, N, 3, generator=g)
    after = torch.randn(T, N, 3, generator=g)
    rew = 5.0 + 3.0 * torch.randn(T, N, generator=g)  # far from mean 0 / std 1: normalising changes everything
    term, trunc = torch.zeros(T, N, dtype=torch.bool), torch.zeros(T, N, dtype=torch.bool)
    term[2, 0], trunc[4, 1] = True, True
    rollout = Rollout(obs=obs, act=torch.zeros(T, N, dtype=torch.long), rew=rew, terminated=term, truncated=trunc,
                      next_obs=after)
    batch = make_batch(rollout, CategoricalMLP(3, 2, (4,)), FirstFeature(),
                       AdvantageConfig(gamma=gamma, gae_lambda=lam, normalize_advantages=True))
    v, nv = obs[..., 0].numpy(), after[..., 0].numpy()
    adv = np.zeros((T, N))
    for n in range(N):  # A_t = δ_t + γλ A_{t+1}, cut at every episode end and at the rollout's end
        running = 0.0
        for t in range(T - 1, -1, -1):
            delta = rew[t, n].item() + (0.0 if term[t, n] else gamma * nv[t, n]) - v[t, n]
            running = delta + (0.0 if (term[t, n] or trunc[t, n]) else gamma * lam * running)
            adv[t, n] = running
    np.testing.assert_allclose(batch.ret.numpy(), (adv + v).reshape(-1), rtol=0, atol=1e-12)
    flat = adv.reshape(-1)
    np.testing.assert_allclose(batch.adv.numpy(), (flat - flat.mean()) / (flat.std(ddof=1) + 1e-8), rtol=0,
                               atol=1e-10)
