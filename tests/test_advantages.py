"""GAE against a plain per-episode loop, with terminations, truncations and the rollout's end."""

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
    assert torch.isfinite(normalize_advantages(torch.tensor([3.0]))).all()
    assert torch.isfinite(normalize_advantages(torch.zeros(7))).all()
    assert torch.all(normalize_advantages(torch.zeros(7)) == 0)
