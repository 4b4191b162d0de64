"""The multi-process vector env produces exactly the trajectories of the in-process one."""

import numpy as np
import pytest

import natpg
from natpg.envs import make_vec_env


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_multiproc_matches_sync_step_for_step(env_id):
    a = make_vec_env(env_id, 5, "sync")
    b = make_vec_env(env_id, 5, "multiproc", n_workers=2)
    try:
        oa, _ = a.reset(seed=3)
        ob, _ = b.reset(seed=3)
        np.testing.assert_array_equal(oa, ob)
        a.single_action_space.seed(0)
        finished = 0
        for _ in range(250):
            act = np.stack([a.single_action_space.sample() for _ in range(5)])
            ra, rb = a.step(act), b.step(act)
            for x, y in zip(ra[:4], rb[:4]):
                np.testing.assert_array_equal(x, y)
            for i in np.flatnonzero(ra[2] | ra[3]):
                np.testing.assert_array_equal(ra[4]["final_obs"][i], rb[4]["final_obs"][i])
                finished += 1
        assert finished > 0  # episode ends (and their final observations) were exercised
    finally:
        a.close()
        b.close()


def test_training_with_multiproc_equals_sync():
    params = []
    for vec in ("sync", "multiproc"):
        agent = natpg.NPG("CartPole-v1", seed=4, n_envs=4, n_steps=64, vectorization=vec, tensorboard=False)
        agent.learn(512)
        agent.close()
        params.append(np.concatenate([p.detach().numpy().ravel() for p in agent.policy.parameters()]))
    np.testing.assert_array_equal(*params)


def test_bad_worker_count_is_rejected():
    with pytest.raises(ValueError, match="n_workers must be an integer ≥ 1"):
        natpg.NPG("CartPole-v1", n_workers=0)
