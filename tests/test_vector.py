"""natpg's vector envs produce exactly the trajectories of Gymnasium's same-step-autoreset SyncVectorEnv."""

import signal
import threading
import time
import warnings

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
    episodes = natpg.evaluation.evaluation_episodes(loaded, episodes=2)
    assert episodes["length"].tolist() == [10, 10]
    assert natpg.evaluation.evaluation_episodes(loaded, env="Pendulum-v1", episodes=1)["length"].tolist() == [10]
    with pytest.warns(RuntimeWarning, match="had not ended after max_episode_steps=30"):  # another id: without them
        other = natpg.evaluation.evaluation_episodes(loaded, env="natpg_test/PendulumNoLimit-v0", episodes=1,
                                                max_episode_steps=30)
    assert other["length"].tolist() == [30]
    given = natpg.evaluation.evaluation_episodes(loaded, episodes=2, env_kwargs={"max_episode_steps": 4})
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
    assert "For an environment of your own" not in done.stderr  # the advice for an id never registered



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
    assert natpg.evaluation.evaluation_episodes(agent, episodes=1)["length"][0] >= 1


def test_an_environment_refusing_env_kwargs_in_any_way_is_named_with_them():
    with pytest.raises(ValueError, match=r"'FrozenLake-v1' cannot be made with env_kwargs=\{'map_name': '9x9'\}: "
                                         r"KeyError"):
        natpg.NPG("FrozenLake-v1", env_kwargs={"map_name": "9x9"})


class SuccessCartPole(CartPoleEnv):
    """CartPole whose last step's info says is_success (the episode lasted ≥ 20 steps) and its length."""

    def reset(self, **kwargs):
        self.t = 0
        return super().reset(**kwargs)

    def step(self, action):
        obs, rew, term, trunc, info = super().step(action)
        self.t += 1
        if term or trunc:
            info = {**info, "is_success": np.bool_(self.t >= 20), "steps": self.t}
        return obs, rew, term, trunc, info


if "natpg_test/SuccessCartPole-v0" not in gym.registry:
    gym.register("natpg_test/SuccessCartPole-v0", entry_point=SuccessCartPole, max_episode_steps=100)
SUCCESS_ID = f"{__name__}:natpg_test/SuccessCartPole-v0"  # importable by worker processes


@pytest.mark.filterwarnings("ignore:info_keys \\['absent'\\]")  # named in a warning: the next test
@pytest.mark.parametrize("engine", [{}, {"vectorization": "async"}, {"vectorization": "multiproc"},
                                    {"sampler": "processes", "workers": 2}, {"sampler": "workers", "workers": 2}])
def test_info_keys_of_each_episodes_last_step_are_recorded_in_every_engine(engine, tmp_path):
    """episodes.csv gets a column per info key, from each episode's last info (NaN where an episode has none);
    progress.csv's ep_KEY_mean is their mean over the last 100 episodes, as computed from episodes.csv."""
    import csv

    rows = []
    agent = natpg.NPG(SUCCESS_ID, info_keys=("is_success", "steps", "absent"), n_envs=2, n_steps=64,
                      tensorboard=False, **engine)
    agent.learn(256, out_dir=str(tmp_path), callback=lambda a, row: rows.append(row))
    agent.close()
    episodes = list(csv.DictReader(open(tmp_path / "episodes.csv")))
    assert list(episodes[0]) == ["env_steps", "return", "length", "is_success", "steps", "absent"]
    lengths = np.array([int(e["length"]) for e in episodes])
    assert len(episodes) == rows[-1]["episodes"] > 5 and 0 < (lengths >= 20).mean() < 1
    assert [float(e["is_success"]) for e in episodes] == (lengths >= 20).astype(float).tolist()
    assert [float(e["steps"]) for e in episodes] == lengths.tolist() and {e["absent"] for e in episodes} == {"nan"}
    assert rows[-1]["ep_is_success_mean"] == pytest.approx((lengths[-100:] >= 20).mean(), abs=1e-12)
    assert rows[-1]["ep_steps_mean"] == pytest.approx(rows[-1]["ep_length_mean"], abs=1e-9)
    assert np.isnan(rows[-1]["ep_absent_mean"])


def test_an_info_key_no_finished_episode_had_is_named_in_a_warning(tmp_path):
    agent = natpg.NPG(SUCCESS_ID, info_keys=("is_success", "is_sucess", "stepz"), n_envs=2, n_steps=64,
                      tensorboard=False)
    with pytest.warns(UserWarning, match=r"info_keys \['is_sucess', 'stepz'\]: none of the last \d+ finished "
                                         r"episodes' info had them \(their ep_KEY_mean columns stay NaN\)"):
        agent.learn(512)
    assert len(agent._sampler.recent_infos) >= 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned after the final checkpoint is written: an error costs nothing
        with pytest.raises(UserWarning, match="info_keys"):
            agent.learn(512, out_dir=str(tmp_path))
    assert natpg.load(str(tmp_path)).env_steps == 1024
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        natpg.NPG(SUCCESS_ID, info_keys=("is_success",), n_envs=2, n_steps=64, tensorboard=False).learn(512)


class ScoredEnv(gym.Env):
    """Episodes of five steps scoring 3, −2, 0, 0.5 and 7 points (a game's score: 8.5), whatever the actions."""

    observation_space, action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32), gym.spaces.Discrete(2)
    SCORES = (3.0, -2.0, 0.0, 0.5, 7.0)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, self.np_random.uniform(-1, 1)], np.float32), {}

    def step(self, action):
        rew, self.t = self.SCORES[self.t], self.t + 1
        return np.array([self.t / 5, float(action)], np.float32), rew, self.t == 5, False, {}


if "natpg_test/Scored-v0" not in gym.registry:
    gym.register("natpg_test/Scored-v0", entry_point=ScoredEnv)
SCORED_ID = f"{__name__}:natpg_test/Scored-v0"  # importable by worker processes


@pytest.mark.parametrize("engine", [{}, {"sampler": "processes", "workers": 2}, {"sampler": "workers", "workers": 2}])
def test_sign_rewards_trains_on_the_sign_and_logs_the_score_in_every_engine(engine, tmp_path):
    """sign_rewards=True: the rollouts the update reads hold sign(r) (before reward scaling, whose statistics are
    then those of the signs); episodes.csv, ep_return_mean and evaluation keep the environment's own score."""
    import csv

    rows = []
    agent = natpg.NPG(SCORED_ID, sign_rewards=True, n_envs=2, n_steps=10, tensorboard=False, **engine)
    agent.learn(40, out_dir=str(tmp_path), callback=lambda a, row: rows.append(row))
    signs = torch.tensor([1.0, -1.0, 0.0, 1.0, 1.0])
    rollout = agent._sampler.collect(agent.policy, 10)  # the sampler's next batch: steps 0–4, twice, per copy
    torch.testing.assert_close(rollout.rew, signs.repeat(2).unsqueeze(1).expand(10, 2), rtol=0, atol=0)
    agent.close()
    assert {float(e["return"]) for e in csv.DictReader(open(tmp_path / "episodes.csv"))} == {8.5}
    assert rows[-1]["ep_return_mean"] == 8.5 and natpg.evaluate(agent, episodes=2) == (8.5, 0.0)
    scaled = natpg.NPG(SCORED_ID, sign_rewards=True, normalize_reward=True, n_envs=2, n_steps=10,
                       tensorboard=False, **engine)
    scaled.learn(40)
    reference, ret = natpg.envs.RunningMeanStd(()), np.zeros(2)
    for t in range(20):  # the discounted returns the statistics took, of the signs, both copies alike
        ret = 0.99 * ret + float(signs[t % 5])
        reference.update(ret)
        ret = ret if t % 5 < 4 else np.zeros(2)  # the episode ended
    assert scaled.reward_scaler.rms.var == pytest.approx(reference.var, rel=1e-12)
    scaled.close()


@pytest.mark.filterwarnings("ignore:resuming with freshly reset environments")  # the test's own env class
def test_info_keys_window_survives_a_resume_and_keys_can_be_added_when_a_run_is_loaded(tmp_path):
    """Continued with reset=False, ep_is_success_mean still averages the episodes before the checkpoint (all in episodes.csv
    here: fewer than 100); keys given to load add a column, NaN in the rows written before."""
    import csv

    run, rows = tmp_path / "run", []
    kw = dict(info_keys=("is_success",), n_envs=2, n_steps=64, seed=3, tensorboard=False)
    natpg.NPG("natpg_test/SuccessCartPole-v0", **kw).learn(256, out_dir=str(run))
    natpg.load(str(run)).learn(128, out_dir=str(run), reset=False, callback=lambda a, row: rows.append(row))
    episodes = list(csv.DictReader(open(run / "episodes.csv")))
    before = [e for e in episodes if int(e["env_steps"]) <= 256]
    assert 0 < len(before) < len(episodes) < 100
    assert rows[-1]["ep_is_success_mean"] == pytest.approx(np.mean([int(e["length"]) >= 20 for e in episodes]))
    natpg.load(str(run), info_keys=("is_success", "steps")).learn(128, out_dir=str(run))
    after = list(csv.DictReader(open(run / "episodes.csv")))
    assert list(after[0]) == ["env_steps", "return", "length", "is_success", "steps"]
    assert after[:len(episodes)] == [{**e, "steps": "nan"} for e in episodes]
    assert len(after) > len(episodes) and all(e["steps"] == e["length"] for e in after[len(episodes):])


def test_episode_info_reads_both_vector_formats_and_refuses_a_value_that_is_not_a_number():
    from natpg.rollout import episode_info

    gymnasium_format = {"final_info": {"is_success": np.array([True, False, True]),
                                       "_is_success": np.array([True, False, True])}}
    assert episode_info(gymnasium_format, 2, ("is_success",)) == (1.0,)
    assert np.isnan(episode_info(gymnasium_format, 1, ("is_success",))[0])
    natpg_format = {"final_info": np.array([None, {"is_success": False, "d": np.float32(0.5)}], dtype=object)}
    assert episode_info(natpg_format, 1, ("d", "is_success")) == (0.5, 0.0)
    with pytest.raises(ValueError, match=r"info_keys: info\['d'\] at the end of an episode must be a number or "
                                         r"boolean, got 'far'"):
        episode_info({"final_info": np.array([{"d": "far"}], dtype=object)}, 0, ("d",))
    with pytest.raises(ValueError, match="info_keys must be a tuple of distinct info keys"):
        natpg.NPG("CartPole-v1", info_keys=("return",))


class SleepyCartPole(CartPoleEnv):
    """CartPole whose step hangs for ten minutes: a worker stepping it owes its answer."""

    def step(self, action):
        time.sleep(600)
        return super().step(action)


if "natpg_test/SleepyCartPole-v0" not in gym.registry:
    gym.register("natpg_test/SleepyCartPole-v0", entry_point=SleepyCartPole, max_episode_steps=100)
SLEEPY_ID = f"{__name__}:natpg_test/SleepyCartPole-v0"  # importable by worker processes


def test_closing_multiproc_ends_a_worker_stuck_in_its_environment_at_once():
    """After an interrupt between a step's send and its answer (here: the answers never read), close does not wait
    5 s for each worker that owes one before ending it."""
    from natpg.vector import MultiprocVectorEnv

    envs = MultiprocVectorEnv(SLEEPY_ID, 4, 2)
    envs.reset(seed=0)
    for conn, off, size in zip(envs.conns, envs.offsets, envs.sizes):
        envs._send(conn, ("step", np.zeros(size, np.int64)))  # as step does, then interrupted before receiving
    start = time.monotonic()
    envs.close()
    assert time.monotonic() - start < 3 and not any(p.is_alive() for p in envs.procs)


class SlowStartCartPole(CartPoleEnv):
    """CartPole that takes ten minutes to build: a worker building it never reports its spaces."""

    def __init__(self, **kwargs):
        time.sleep(600)
        super().__init__(**kwargs)


if "natpg_test/SlowStartCartPole-v0" not in gym.registry:
    gym.register("natpg_test/SlowStartCartPole-v0", entry_point=SlowStartCartPole)


@pytest.mark.parametrize("when", ["step", "start"])
def test_a_multiproc_worker_that_hangs_is_an_error_naming_its_copies_after_the_timeout(when):
    """An environment that hangs in a step (or while it is built) stops the run with a message naming the worker's
    copies and the setting, after worker_timeout (worker_start_timeout), instead of holding it forever; the hung
    worker is ended, by close or by the failed constructor itself."""
    from natpg.vector import EnvWorkerDied, MultiprocVectorEnv

    if when == "step":
        envs = MultiprocVectorEnv(SLEEPY_ID, 4, 2, timeout=0.5, start_timeout=60)
        envs.reset(seed=0)
        start = time.monotonic()
        with pytest.raises(EnvWorkerDied, match=r"gave no answer within worker_timeout=0\.5 s while stepping its "
                                                r"environments \(its copies \[0, 1\]\): an environment hangs"):
            envs.step(np.zeros(4, np.int64))
        assert 0.5 <= time.monotonic() - start < 5
        with pytest.raises(EnvWorkerDied, match=r"these environments cannot step on: an environment worker process gave "
                                                r"no answer"):  # not the stuck step's late answer as the next one's
            envs.step(np.zeros(4, np.int64))
        envs.close()
        procs = envs.procs
    else:
        import multiprocessing

        before = set(multiprocessing.active_children())
        with pytest.raises(EnvWorkerDied, match=r"within worker_start_timeout=1 s while starting \(its copies "
                                                r"\[0, 1\]") as caught:  # held: the half-built object is not collected
            MultiprocVectorEnv(f"{__name__}:natpg_test/SlowStartCartPole-v0", 4, 2, timeout=60, start_timeout=1)
        procs = [p for p in multiprocessing.active_children() if p not in before]
        assert caught.value.__traceback__ is not None
    deadline = time.monotonic() + 5
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in procs)


def test_an_async_copy_that_hangs_is_an_error_after_worker_timeout_and_its_processes_end(tmp_path):
    """vectorization='async' (Gymnasium's processes, which wait for ever): a hanging step stops the run after
    worker_timeout with an error naming the setting, every copy's process ended, the run saved at its last update;
    the next learn builds the environments afresh."""
    from natpg.vector import EnvWorkerDied

    agent = natpg.NPG(SLEEPY_ID, n_envs=2, n_steps=16, vectorization="async", worker_timeout=0.5, tensorboard=False)
    start = time.monotonic()
    with pytest.raises(EnvWorkerDied, match=r"an environment copy's process \(vectorization='async'\) gave no answer "
                                            r"within worker_timeout=0\.5 s while stepping its environment") as caught:
        agent.learn(32, out_dir=str(tmp_path / "run"))
    assert 0.5 <= time.monotonic() - start < 10
    assert not any(p.is_alive() for p in agent._sampler.envs.processes)
    assert "is saved in" in "\n".join(getattr(caught.value, "__notes__", []))
    agent.close()


class DeafSleepyCartPole(CartPoleEnv):
    """CartPole whose step hangs deaf to SIGTERM, as a copy stuck in C code is."""

    def step(self, action):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
        return super().step(action)


if "natpg_test/DeafSleepyCartPole-v0" not in gym.registry:
    gym.register("natpg_test/DeafSleepyCartPole-v0", entry_point=DeafSleepyCartPole, max_episode_steps=100)


def test_an_async_copy_deaf_to_sigterm_is_killed_after_worker_timeout():
    from natpg.vector import EnvWorkerDied, TimedAsyncVectorEnv

    envs = TimedAsyncVectorEnv([lambda: gym.make("natpg_test/DeafSleepyCartPole-v0") for _ in range(2)], 0.5)
    envs.reset(seed=0)
    raised = []

    def step():  # in a thread: were the copies left alive, closing would wait on them for ever
        try:
            envs.step(np.zeros(2, np.int64))
        except EnvWorkerDied as exc:
            raised.append(exc)

    stepping = threading.Thread(target=step, daemon=True)
    stepping.start()
    stepping.join(20)
    hung = stepping.is_alive()
    for process in envs.processes:  # the test's own clean-up, whatever happened
        process.kill()
    stepping.join(5)
    assert not hung and "worker_timeout=0.5 s while stepping" in str(raised[0])


def test_a_multiproc_worker_exits_when_its_learner_is_gone(exits_once_its_learner_is_gone):
    """A worker stuck in a hanging environment never reads the pipe's EOF: it watches the learner's pid instead
    (the pipe left open here, as a hung step leaves it unread)."""
    from natpg.vector import _worker, process_context

    ctx = process_context()
    parent, child = ctx.Pipe()

    def start(pid):
        worker = ctx.Process(target=_worker, args=(child, "CartPole-v1", 1, None, {}, (), 0, pid), daemon=True)
        worker.start()
        assert parent.recv()[0] == "ok"  # it has made its copy
        return worker

    exits_once_its_learner_is_gone(start)


@pytest.mark.parametrize("when", ["step", "reset"])
def test_a_multiproc_worker_that_dies_is_named_with_its_copies(when):
    """A worker killed from outside (the OOM killer): the next step or reset says which copies it held and how
    it ended, whether the send to it or the receive from it notices first."""
    import os
    import signal

    from natpg.vector import EnvWorkerDied, MultiprocVectorEnv

    envs = MultiprocVectorEnv("CartPole-v1", 4, 2)
    try:
        envs.reset(seed=0)
        os.kill(envs.procs[1].pid, signal.SIGKILL)
        envs.procs[1].join(timeout=10)
        with pytest.raises(EnvWorkerDied, match=r"an environment worker process died \(exit code -9; its copies "
                                                r"\[2, 3\]\)"):
            envs.step(np.zeros(4, np.int64)) if when == "step" else envs.reset(seed=1)
    finally:
        envs.close()


# Found by stop 47's second mutation audit: the normalisers' statistics against plain moments.

PRIOR = 1e-4  # RunningMeanStd's pseudo-count: a prior of mean 0, variance 1


def pooled_mean_var(batches, prior=PRIOR):
    """Mean and (biased) variance of the pseudo-sample (weight ``prior``, mean 0, variance 1) pooled with every
    row of ``batches``, from first and second moments: Σw·x / Σw and Σw·x² / Σw − mean²."""
    x = np.concatenate(batches, 0)
    w = prior + x.shape[0]
    mean = x.sum(0) / w
    second = (prior * 1.0 + (x**2).sum(0)) / w  # the prior's E[x²] = var + mean² = 1
    return mean, second - mean**2


def test_running_mean_std_equals_the_pooled_moments_of_all_its_batches(float64):
    """Batches of unequal sizes and far-apart means: a merge weighting the means by the wrong count, or missing
    (or mis-scaling) the between-batch term δ²·n_a·n_b/n, is off by O(1) here."""
    from natpg.envs import RunningMeanStd

    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, scale, size=(n, 3)) for loc, scale, n in ((5.0, 1.0, 7), (-3.0, 2.0, 50),
                                                                          (10.0, 0.5, 1), (0.0, 3.0, 13))]
    rms = RunningMeanStd((3,))
    for b in batches:
        rms.update(b)
    mean, var = pooled_mean_var(batches)
    np.testing.assert_allclose(rms.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rms.var, var, rtol=1e-12)
    assert rms.count == pytest.approx(PRIOR + 71, rel=1e-15)
    # and the textbook numbers once the prior no longer matters
    x = np.concatenate(batches, 0)
    np.testing.assert_allclose(rms.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(rms.var, x.var(0), rtol=1e-5)


def test_the_sampler_normalises_each_observation_with_statistics_that_already_include_it():
    """ObsNormalizer's documented order (update first, then normalise): the first stored observations are the
    reset observations standardised by the pooled moments of exactly those observations (and the prior),
    not passed through the initial mean 0 / variance 1; every later step's by the moments of all steps so far."""
    from natpg.envs import ObsNormalizer, RewardScaler, make_vec_env
    from natpg.policies import CategoricalMLP
    from natpg.rollout import Sampler

    N = 6
    envs = make_vec_env("CartPole-v1", N)
    sampler = Sampler(envs, ObsNormalizer((4,), 10.0), RewardScaler(N, 0.99, 10.0), 0, torch.device("cpu"),
                      torch.Generator().manual_seed(0))
    seen = []
    torch.manual_seed(0)
    policy = CategoricalMLP(4, 2, (8,))
    for t in range(5):
        raw = sampler.obs.copy()  # the raw observations the next step acts on
        seen.append(raw)
        rollout = sampler.collect(policy, 1)
        mean, var = pooled_mean_var(seen)
        expected = np.clip((raw - mean) / np.sqrt(var + 1e-8), -10.0, 10.0)
        np.testing.assert_allclose(rollout.obs[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    sampler.close()
