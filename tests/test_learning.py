"""NPG learns: a return threshold reached within a step budget (deterministic evaluation, fixed seeds)."""

import pytest

import natpg

pytestmark = pytest.mark.learning


def test_npg_learns_cartpole_within_100k_steps():
    agent = natpg.NPG("CartPole-v1", seed=0, tensorboard=False)
    agent.learn(100_000)
    assert agent.env_steps <= 100_000
    mean, _ = natpg.evaluate(agent, "CartPole-v1", episodes=10, seed=1000)
    assert mean >= 475


def test_npg_learns_pendulum_within_300k_steps():
    agent = natpg.NPG("Pendulum-v1", seed=0, tensorboard=False)
    agent.learn(300_000)
    assert agent.env_steps <= 300_000
    mean, _ = natpg.evaluate(agent, "Pendulum-v1", episodes=10, seed=1000)
    assert mean >= -300
