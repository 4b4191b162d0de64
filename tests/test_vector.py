"""natpg's vector envs produce exactly the trajectories of Gymnasium's same-step-autoreset SyncVectorEnv."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from gymnasium.envs.classic_control.cartpole import CartPoleEnv
import natpg
import natpg.agent
from natpg.envs import env_wrappers, make_kwargs, make_vec_env
from natpg.vector import SerialVectorEnv


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1", "HalfCheetah-v5"])
def test_serial_vector_env_matches_gymnasium_sync_vector_env(env_id):
    ours = make_vec_env(env_id, 4, "sync")
    ref = gym.make_vec(env_id, num_envs=4, vectorization_mode="sync", wrappers=env_wrappers(env_id),
                       vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **make_kwargs(env_id))
    assert isinstance(ours, SerialVectorEnv)
    try:
        np.testing.assert_array_equal(ours.reset(seed=3)[0], ref.reset(seed=3)[0])
        ref.single_action_space.seed(0)
        finished = 0
        for _ in range(1100):  # past HalfCheetah's 1000-step time limit
            act = np.stack([ref.single_action_space.sample() for _ in range(4)])
            (*a, info_a), (*b, info_b) = ours.step(act), ref.step(act)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
            for i in range(4):
                if b[2][i] or b[3][i]:
                    np.testing.assert_array_equal(info_a["final_obs"][i], info_b["final_obs"][i])
                    finished += 1
                else:
                    assert info_a["final_obs"][i] is None
        assert finished > 0
        # Resetting only some copies leaves the others where they are.
        before = ours.step(act)[0]
        mask = np.array([True, False, True, False])
        after, _ = ours.reset(options={"reset_mask": mask})
        np.testing.assert_array_equal(after[~mask], before[~mask])
        assert not np.array_equal(after[mask], before[mask])
    finally:
        ours.close()
        ref.close()


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
    with pytest.raises(ValueError, match=r"n_workers \(3\) must be at most n_envs \(2\) with vectorization='multiproc'"):
        natpg.NPG("CartPole-v1", vectorization="multiproc", n_envs=2, n_workers=3)
    with pytest.warns(UserWarning, match=r"n_workers \(read by vectorization='multiproc'; this run's vectorization "
                                         r"is 'sync'\)"):
        natpg.NPG("CartPole-v1", n_workers=4)


if "natpg_test/PendulumNoLimit-v0" not in gym.registry:  # Pendulum under another id, without a time limit
    gym.register("natpg_test/PendulumNoLimit-v0", entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv")


@pytest.mark.parametrize("engine", [{}, {"vectorization": "async"}, {"vectorization": "multiproc"},
                                    {"sampler": "processes", "workers": 2}, {"sampler": "workers", "workers": 2}])
def test_env_kwargs_reach_every_copy_in_every_engine_and_the_evaluation(engine, tmp_path):
    """gymnasium.make's max_episode_steps=10 makes every episode 10 steps long wherever a copy is made."""
    rows = []
    agent = natpg.NPG("Pendulum-v1", env_kwargs={"max_episode_steps": 10, "g": 3.0}, n_envs=2, n_steps=32, **engine)
    agent.learn(128, out_dir=str(tmp_path), callback=lambda a, row: rows.append(row))
    agent.close()
    assert [r["ep_length_mean"] for r in rows] == [10, 10] and rows[-1]["episodes"] == 12
    loaded = natpg.load(str(tmp_path))
    assert loaded.config.env.env_kwargs == {"max_episode_steps": 10, "g": 3.0}
    episodes = natpg.agent.evaluation_episodes(loaded, episodes=2)
    assert episodes["length"].tolist() == [10, 10]
    assert natpg.agent.evaluation_episodes(loaded, env="Pendulum-v1", episodes=1)["length"].tolist() == [10]
    with pytest.warns(RuntimeWarning, match="had not ended after max_episode_steps=30"):  # another id: without them
        other = natpg.agent.evaluation_episodes(loaded, env="natpg_test/PendulumNoLimit-v0", episodes=1,
                                                max_episode_steps=30)
    assert other["length"].tolist() == [30]
    given = natpg.agent.evaluation_episodes(loaded, episodes=2, env_kwargs={"max_episode_steps": 4})
    assert given["length"].tolist() == [4, 4]  # env_kwargs given replace the run's own


@pytest.mark.parametrize("env_id, env_kwargs", [("Pendulum-v1", {"max_episode_steps": 50}), ("CartPole-v1", {})])
def test_async_vectorization_trains_exactly_as_sync(env_id, env_kwargs):
    """Gymnasium's AsyncVectorEnv (copies in subprocesses) and natpg's in-process vector env step the same seeded
    copies: the networks after three updates, through truncations (Pendulum cut at 50 steps) and terminations, agree."""
    params = []
    for vectorization in ("sync", "async"):
        agent = natpg.NPG(env_id, seed=5, vectorization=vectorization, n_envs=3, n_steps=64, env_kwargs=env_kwargs,
                          tensorboard=False)
        agent.learn(3 * 192)
        agent.close()
        params.append(torch.cat([p.detach().reshape(-1) for p in [*agent.policy.parameters(),
                                                                  *agent.critic.parameters()]]))
    assert torch.equal(*params)


def test_env_kwargs_are_checked():
    with pytest.raises(ValueError, match=r"cannot be made with env_kwargs=\{'gravity': 3.0\}: .*unexpected keyword"):
        natpg.NPG("Pendulum-v1", env_kwargs={"gravity": 3.0})
    with pytest.raises(ValueError, match="env_kwargs cannot set render_mode"):
        natpg.NPG("Pendulum-v1", env_kwargs={"render_mode": "human"})
    with pytest.raises(ValueError, match="env_kwargs must hold JSON values"):
        natpg.NPG("Pendulum-v1", env_kwargs={"g": {1.0}})
    with pytest.raises(ValueError, match="env_kwargs must be a dict of keyword arguments"):
        natpg.NPG("Pendulum-v1", env_kwargs="g=3")


SCRIPT_REGISTERING_UNDER_MAIN = """
import sys, natpg, gymnasium as gym
if __name__ == "__main__":
    gym.register("natpg_test/UnderMain-v0", entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv")
    kw = {"sampler": "processes", "workers": 2} if sys.argv[1] == "processes" else {"vectorization": "multiproc"}
    natpg.NPG("natpg_test/UnderMain-v0", n_envs=2, n_steps=32, **kw).learn(64)
"""


@pytest.mark.parametrize("engine", ["processes", "multiproc"])
def test_an_env_registered_under_main_is_named_as_unknown_to_the_workers(engine, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(SCRIPT_REGISTERING_UNDER_MAIN)
    done = subprocess.run([sys.executable, str(script), engine], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert ("'natpg_test/UnderMain-v0' is registered in this process but not in the worker processes, which import "
            "your script again without running its `if __name__ == '__main__':` block") in done.stderr



class KwargsCartPole(CartPoleEnv):
    """CartPole whose constructor takes keywords named like natpg's own parameters."""

    def __init__(self, wrap=None, env_id=None, action_mask=None, n_envs=None, n_workers=None, extra=None,
                 render_mode=None):
        super().__init__(render_mode=render_mode)
        self.given = dict(wrap=wrap, env_id=env_id, action_mask=action_mask, n_envs=n_envs, n_workers=n_workers,
                          extra=extra)


if "natpg_test/KwargsCartPole-v0" not in gym.registry:
    gym.register("natpg_test/KwargsCartPole-v0", entry_point=KwargsCartPole, max_episode_steps=100)


def test_env_kwargs_named_like_natpgs_parameters_reach_the_environment_and_tuples_are_recorded_as_lists():
    given = {"wrap": 1, "env_id": "x", "action_mask": 0, "n_envs": 3, "n_workers": 5, "extra": (1, 2)}
    agent = natpg.NPG("natpg_test/KwargsCartPole-v0", env_kwargs=given, n_envs=2, n_steps=32)
    agent.learn(64)
    assert agent.config.env.env_kwargs["extra"] == [1, 2]  # as JSON, and so the checkpoint, holds it
    assert agent._sampler.envs.envs[0].unwrapped.given == {**given, "extra": [1, 2]}
    assert natpg.agent.evaluation_episodes(agent, episodes=1)["length"][0] >= 1


def test_an_environment_refusing_env_kwargs_in_any_way_is_named_with_them():
    with pytest.raises(ValueError, match=r"'FrozenLake-v1' cannot be made with env_kwargs=\{'map_name': '9x9'\}: "
                                         r"KeyError"):
        natpg.NPG("FrozenLake-v1", env_kwargs={"map_name": "9x9"})
