"""Distributed sampling: the in-process reference sampler, the process and Ray samplers that must equal it
bit for bit, prefetching the next rollout, worker faults, and Ray as an optional dependency.

The Ray tests start a local Ray instance (2 CPUs) once for the module and skip when Ray is not installed.
"""

import atexit
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control.pendulum import PendulumEnv

import natpg
from natpg.agent import ALGORITHM_CLASSES
from natpg.cli import main as cli
from natpg.distributed import (DistributedSampler, RolloutWorker, WorkerFailure, WorkerPlan, WorkerResult, WorkerSpec,
                               make_sampler, require_ray)
from natpg.envs import ObsNormalizer, RewardScaler, RunningMeanStd, make_vec_env
from natpg.rollout import NonFiniteEnvError, Rollout

FAULT_DIR_VAR = "NATPG_TEST_FAULT_DIR"
FAULTY_ID = "NatpgFaultyPendulum-v0"
# Worker processes import this module by the id below and inherit the variable: it is set at collection,
# before any test starts multiprocessing's fork server (whose children get its environment).
FAULTY_PROCESS_ID = f"{__name__}:{FAULTY_ID}"
if FAULT_DIR_VAR not in os.environ:
    os.environ[FAULT_DIR_VAR] = tempfile.mkdtemp(prefix="natpg-test-faults-")
    # Removed by the process that made it (a forked child runs the parent's atexit hooks too).
    atexit.register(lambda directory=os.environ[FAULT_DIR_VAR], owner=os.getpid():
                    os.getpid() == owner and shutil.rmtree(directory, ignore_errors=True))


class FaultyPendulum(PendulumEnv):
    """Pendulum that misbehaves once per token file found in $NATPG_TEST_FAULT_DIR (a token is consumed by the
    first copy, in any process, that removes it): 'die.*' kills the process (os._exit), 'hang.*' sleeps for
    ten minutes, 'slow.*' for two seconds, 'nan.*' returns a NaN observation."""

    def step(self, action):
        directory = os.environ.get(FAULT_DIR_VAR)
        if directory:
            for token in sorted(glob.glob(os.path.join(directory, "*"))):
                try:
                    os.remove(token)
                except FileNotFoundError:  # another copy took it
                    continue
                kind = os.path.basename(token).split(".")[0]
                if kind == "die":
                    os._exit(1)
                if kind == "hang":
                    time.sleep(600)
                if kind == "slow":
                    time.sleep(2)
                if kind == "nan":
                    obs, rew, term, trunc, info = super().step(action)
                    return np.full_like(obs, np.nan), rew, term, trunc, info
        return super().step(action)


class NaNOnCopies23(PendulumEnv):
    """Pendulum whose copies first reset with seeds 2 and 3 (of 0, 1, 2, 3) return a NaN observation at step 5."""

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.bad, self.t = seed % 4 in (2, 3), 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, rew, term, trunc, info = super().step(action)
        self.t += 1
        return (np.full_like(obs, np.nan) if self.bad and self.t == 5 else obs), rew, term, trunc, info


NAN_COPIES_ID = "NatpgNaNOnCopies23-v0"


def register_faulty_env():
    if FAULTY_ID not in gym.registry:
        gym.register(FAULTY_ID, entry_point=FaultyPendulum, max_episode_steps=200)
    if NAN_COPIES_ID not in gym.registry:
        gym.register(NAN_COPIES_ID, entry_point=NaNOnCopies23, max_episode_steps=200)


register_faulty_env()


def flat_params(agent):
    return torch.cat([p.detach().reshape(-1) for p in agent.policy.parameters()])


# --- without Ray ----------------------------------------------------------------------------------------

def test_importing_natpg_does_not_import_ray():
    code = "import sys, natpg, natpg.distributed; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ray_sampler_without_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError, find_spec → None
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[ray\]\" in natpg's source directory"):
        natpg.NPG("Pendulum-v1", sampler="ray", workers=2, n_envs=4)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[ray\]\""):
        require_ray()


@pytest.mark.parametrize("overrides, message", [
    ({"sampler": "spark"}, "sampler must be one of"),
    ({"workers": 0}, "workers must be an integer ≥ 1"),
    ({"sampler": "ray", "workers": 5, "n_envs": 4}, r"workers \(5\) must be at most n_envs \(4\)"),
    ({"workers": 2}, "needs sampler='processes' or 'ray'"),
    ({"ray_address": "auto"}, "ray_address needs sampler='ray'"),
    ({"sampler": "ray", "ray_address": ""}, "ray_address must be None"),
    ({"sampler": "ray", "ray_address": "nonsense"}, r"ray_address must be None, 'auto', 'HOST:PORT'"),
    ({"sampler": "ray", "ray_address": "head:70000"}, "a port in 1–65535"),
    ({"sampler": "ray", "ray_address": " auto"}, "ray_address must be None"),
    ({"sampler": "ray", "worker_timeout": 0}, "worker_timeout must be a finite number > 0"),
    ({"sampler": "ray", "worker_start_timeout": -1}, "worker_start_timeout must be a finite number > 0"),
    ({"sampler": "workers", "vectorization": "multiproc"}, "applies to sampler='local' only"),
])
def test_distributed_settings_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        natpg.NPG("Pendulum-v1", **overrides)


@pytest.mark.parametrize("overrides, own", [({"workers": 0}, "workers must be an integer ≥ 1"),
                                             ({"n_envs": 0}, "n_envs must be an integer ≥ 1")])
def test_an_invalid_count_is_named_alone_not_related_to_the_other(overrides, own):
    # workers=0 used to add "workers=0 needs sampler='processes'", n_envs=0 "workers (1) must be at most n_envs (0)"
    with pytest.raises(ValueError) as err:
        natpg.Config().override(**overrides).validate()
    assert own in str(err.value)
    assert "needs sampler" not in str(err.value) and "at most n_envs" not in str(err.value)


def small_config(**overrides):
    return natpg.Config().override(n_envs=5, n_steps=16, workers=2, sampler="workers", hidden=(8,),
                                  **overrides).validate()


def test_worker_sampler_seeds_copies_like_the_local_sampler():
    """Global copy i is seeded seed + i, whatever worker holds it (3 + 2 copies here)."""
    cfg = small_config(normalize_obs=False)
    obs_norm = ObsNormalizer((3,), 10.0, enabled=False)
    sampler = make_sampler("workers", "Pendulum-v1", cfg, 7, obs_norm, RewardScaler(5, 0.99, 10.0), "cpu")
    try:
        assert sampler.plan.sizes == [3, 2] and sampler.plan.offsets == [0, 3]
        policy = natpg.policies.GaussianMLP(3, 1, (8,))
        rollout = sampler.collect(policy, 16)
        envs = make_vec_env("Pendulum-v1", 5)
        first, _ = envs.reset(seed=7)
        envs.close()
        np.testing.assert_array_equal(rollout.obs[0].numpy(), first.astype(np.float32))
        assert rollout.obs.shape == (16, 5, 3) and rollout.act.shape == (16, 5, 1)
        assert sampler.total_steps == 80 and sampler.steps == 16
    finally:
        sampler.close()


def test_worker_normalises_with_frozen_statistics_and_returns_raw_observations():
    config = natpg.Config().override(hidden=(8,), activation="tanh", log_std_init=0.0, obs_clip=10.0,
                                     normalize_obs=True, gamma=0.99, reward_clip=10.0, normalize_reward=True)
    spec = WorkerSpec(env_id="Pendulum-v1", offset=0, n_envs=3, reset_seed=0, generator_seed=1, config=config)
    worker = RolloutWorker(spec, 0)
    try:
        stats = {"mean": [0.5, -0.2, 1.0], "var": [0.3, 0.4, 2.0], "count": 50.0}
        weights = natpg.policies.GaussianMLP(3, 1, (8,)).state_dict()
        result = worker.collect(weights, stats, {"mean": 0.0, "var": 4.0, "count": 10.0}, 12)
        reference = ObsNormalizer((3,), 10.0)
        reference.rms.load_state_dict(stats)
        assert result.raw_obs.shape == (12, 3, 3) and result.returns.shape == (12, 3)
        for t in range(12):  # every step normalised with the statistics sent, none updated in between
            np.testing.assert_array_equal(result.rollout.obs[t].numpy(), reference.normalize(result.raw_obs[t]))
        assert worker.obs_norm.rms.state_dict() == stats  # frozen
    finally:
        worker.close()


def test_merge_orders_copies_and_episodes_and_updates_statistics_per_step():
    cfg = small_config(normalize_reward=True)
    obs_norm = ObsNormalizer((2,), 10.0)
    rew_scale = RewardScaler(5, 0.99, 10.0, enabled=True)
    sampler = DistributedSampler(WorkerPlan("Pendulum-v1", cfg, 0), None, obs_norm, rew_scale, "cpu")  # merge only
    rng = np.random.default_rng(0)
    T = 4

    def result(w, n, episodes):
        r = Rollout(obs=torch.full((T, n, 2), float(w)), act=torch.zeros(T, n, 1), rew=torch.zeros(T, n),
                    terminated=torch.zeros(T, n, dtype=torch.bool), truncated=torch.zeros(T, n, dtype=torch.bool),
                    next_obs=torch.zeros(T, n, 2))
        valid = np.ones((T, n), bool)
        valid[w + 1, 0] = False  # a copy dropped for a non-finite value: its return stays out of the statistics
        return WorkerResult(w, r, rng.normal(size=(T, n, 2)), rng.normal(size=(T, n)), valid, episodes, w + 1)

    results = [result(1, 2, [(1, 10.0, 5, (0.5,)), (2, 11.0, 6, (0.6,))]),
               result(0, 3, [(3, 20.0, 7, (0.7,)), (1, 21.0, 8, (0.8,))])]
    rollout = sampler._merge(results, T)
    assert sampler.dropped == 3
    assert rollout.obs[0, :, 0].tolist() == [0, 0, 0, 1, 1]  # worker 0's copies first
    # finished episodes in the order one sampler would record them: by step, then by copy
    assert list(sampler.recent_returns) == [21.0, 10.0, 11.0, 20.0]
    assert list(sampler.recent_lengths) == [8, 5, 6, 7] and sampler.episodes == 4
    assert list(sampler.recent_infos) == [(0.8,), (0.5,), (0.6,), (0.7,)]
    assert sampler.last_episodes == [(21.0, 8, (0.8,)), (10.0, 5, (0.5,)), (11.0, 6, (0.6,)), (20.0, 7, (0.7,))]
    ref_obs, ref_ret = RunningMeanStd((2,)), RewardScaler(5, 0.99, 10.0, enabled=True)  # the local sampler's
    for t in range(T):
        ref_obs.update(np.concatenate([results[1].raw_obs[t], results[0].raw_obs[t]]))
        ref_ret.observe(np.concatenate([results[1].returns[t], results[0].returns[t]]),
                        np.concatenate([results[1].returns_valid[t], results[0].returns_valid[t]]))
    assert obs_norm.rms.state_dict() == ref_obs.state_dict()
    assert rew_scale.rms.state_dict() == ref_ret.rms.state_dict() and ref_ret.rms.count == 1e-4 + 5 * T - 2


def test_a_replaced_worker_seeds_copies_no_other_copy_has_used():
    """Worker w's r-th replacement seeds its copies seed + offset + r·n_envs + j: never a seed of another copy, nor
    one its earlier incarnations used (the same seeds would replay the same episodes)."""
    plan = WorkerPlan("Pendulum-v1", small_config(), 7)
    used, before = set(), [None, None]
    for replaced in ([], [0], [1, 1], [0]):
        for w in replaced:
            assert plan.replace(w) == plan.spec(w)
        restarts = list(plan.replacements)
        seeds = {w: {plan.spec(w).reset_seed + j for j in range(plan.sizes[w])} for w in range(2)}
        assert len(seeds[0] | seeds[1]) == 5
        for w in range(2):
            if restarts[w] != before[w]:  # a new incarnation
                assert not used & seeds[w]
        used |= seeds[0] | seeds[1]
        before = list(restarts)


def test_workers_build_their_policy_for_the_spaces_env_kwargs_give():
    """FrozenLake's map (an env_kwarg) sets its observation space: 8×8 is 64 one-hot features, not the default 16."""
    agent = natpg.NPG("FrozenLake-v1", env_kwargs={"map_name": "8x8"}, sampler="workers", workers=2, n_envs=2,
                      n_steps=16, hidden=(8,), tensorboard=False)
    try:
        agent.learn(32)
    finally:
        agent.close()
    assert agent.policy.logits_net[0].in_features == 64 and agent.env_steps == 32


@pytest.mark.parametrize("algo", sorted(ALGORITHM_CLASSES))
def test_every_algorithm_trains_with_the_worker_sampler(algo):
    agent = ALGORITHM_CLASSES[algo]("CartPole-v1", seed=0, n_envs=3, n_steps=32, sampler="workers", workers=2,
                                    tensorboard=False)
    rows = []
    agent.learn(96, callback=lambda a, row: rows.append(row))
    agent.close()
    assert agent.env_steps == 96 and rows[0]["sampler/workers"] == 2 and rows[0]["sampler/worker_restarts"] == 0
    assert torch.isfinite(flat_params(agent)).all()
    assert rows[0]["episodes"] > 0  # CartPole episodes end within 32 steps under a random policy


def check_worker_faults(agent, fault_dir):
    """For any worker sampler running FaultyPendulum (4 copies over 2 workers, 32 steps): a worker killed
    mid-iteration is replaced and its share re-run; a hung one is replaced after worker_timeout; a second
    failure raises instead of hanging; errors inside a worker propagate. Closes the agent."""

    def token(kind):
        open(os.path.join(fault_dir, f"{kind}.{time.monotonic_ns()}"), "w").close()

    rows = []
    keep = lambda a, row: rows.append(row)  # noqa: E731
    try:
        agent.learn(128, callback=keep)
        assert rows[-1]["sampler/worker_restarts"] == 0
        rollouts = record_rollouts(agent)

        # A death must be noticed, not waited out (worker_timeout = 300 s): each is timed on its own; all four
        # faults together are timed against the 600 s hang at the end.
        token("die")  # one copy's worker exits at its next step: the share runs again on a fresh worker
        start = faults_start = time.monotonic()
        with pytest.warns(RuntimeWarning, match=r"rollout worker \d failed \(.*\): replaced by a fresh one"):
            agent.learn(256, reset=False, callback=keep)  # two updates: the second one prefetched
        assert time.monotonic() - start < 150  # the death was noticed, not timed out
        assert rows[-1]["sampler/worker_restarts"] == 1 and agent.env_steps == 384
        assert rollouts[-1].obs.shape == (32, 4, 3) and torch.isfinite(rollouts[-1].obs).all()
        assert not os.listdir(fault_dir)

        agent._sampler.pool.timeout = 6.0
        token("hang")  # no answer within worker_timeout: killed, replaced, re-run
        agent.learn(128, reset=False, callback=keep)
        assert rows[-1]["sampler/worker_restarts"] == 2 and agent.env_steps == 512
        agent._sampler.pool.timeout = 300.0

        retries, agent._sampler.pool.retries = agent._sampler.pool.retries, 0
        token("die")  # no retry left: a clear error, not a hang
        token("slow")  # ... raised only once the other worker's share is done: none of it steps on afterwards
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match="giving up"):
            agent.learn(128, reset=False)
        assert time.monotonic() - start < 150
        assert agent._sampler.worker_restarts == 3
        assert not os.listdir(fault_dir)
        agent._sampler.pool.retries = retries

        token("nan")  # the environment's own error reaches the learner as it is: its own one-line message,
        with pytest.raises(NonFiniteEnvError, match="^environment returned a non-finite observation") as info:
            agent.learn(128, reset=False)
        assert "\n" not in str(info.value)  # (Ray's wrapper's message was the whole remote traceback)
        assert any(note.startswith("raised in rollout worker ") for note in info.value.__notes__)
        assert time.monotonic() - faults_start < 240  # a missed timeout would wait out the 600 s hang
        agent.learn(128, reset=False)  # and the worker whose copies stopped mid-step was replaced, not stepped on
        assert agent._sampler.worker_restarts == 4
    finally:
        agent.close()
        for leftover in os.listdir(fault_dir):
            os.remove(os.path.join(fault_dir, leftover))


# --- on Ray ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    fault_dir = str(tmp_path_factory.mktemp("faults"))
    if ray.is_initialized():
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test env, for the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {FAULT_DIR_VAR: fault_dir, "MUJOCO_GL": "disabled"},
                          "worker_process_setup_hook": register_faulty_env})
    yield ray, fault_dir
    ray.shutdown()


def record_rollouts(agent):
    """Wrap the agent's sampler so that every rollout it returns is kept."""
    seen, collect = [], agent._sampler.collect

    def wrapped(policy, n_steps):
        rollout = collect(policy, n_steps)
        seen.append(rollout)
        return rollout

    agent._sampler.collect = wrapped
    return seen


def assert_equals_the_in_process_reference(kind):
    """Same seed, same number of workers: the same batches (torch.equal) and the same parameters."""
    runs = {}
    for k in ("workers", kind):
        agent = natpg.NPG("Pendulum-v1", seed=3, sampler=k, workers=2, n_envs=5, n_steps=64,
                          normalize_reward=True, tensorboard=False)
        try:
            agent.learn(320)  # starts the sampler
            rollouts = record_rollouts(agent)
            agent.learn(3 * 320, reset=False)  # crosses Pendulum's 200-step time limit
            runs[k] = (rollouts, flat_params(agent), agent.obs_normalizer.rms.state_dict(),
                       agent.reward_scaler.rms.state_dict(), list(agent._sampler.recent_returns))
        finally:
            agent.close()
    (ref, p_ref, obs_ref, rew_ref, ret_ref), (got, p_got, obs_got, rew_got, ret_got) = runs["workers"], runs[kind]
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        for name in ("obs", "act", "rew", "terminated", "truncated", "next_obs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.valid is None and b.valid is None
    assert ref[-1].truncated.any()  # episode ends were part of the comparison
    assert torch.equal(p_ref, p_got)
    assert (obs_ref, rew_ref, ret_ref) == (obs_got, rew_got, ret_got) and len(ret_ref) == 5


def test_ray_sampler_equals_the_in_process_reference(ray_cluster):
    assert_equals_the_in_process_reference("ray")


def test_ray_workers_make_their_copies_with_env_kwargs(ray_cluster):
    rows = []
    agent = natpg.NPG("Pendulum-v1", sampler="ray", workers=2, n_envs=2, n_steps=32, tensorboard=False,
                      env_kwargs={"max_episode_steps": 10})
    try:
        agent.learn(128, callback=lambda a, row: rows.append(row))
    finally:
        agent.close()
    assert [r["ep_length_mean"] for r in rows] == [10, 10]


def test_ray_worker_faults(ray_cluster):
    _, fault_dir = ray_cluster
    agent = natpg.NPG(FAULTY_ID, seed=0, sampler="ray", workers=2, n_envs=4, n_steps=32, tensorboard=False)
    check_worker_faults(agent, fault_dir)


def test_ray_error_names_the_runs_copy(ray_cluster):
    agent = natpg.NPG(NAN_COPIES_ID, seed=0, sampler="ray", workers=2, n_envs=4, n_steps=8, tensorboard=False)
    try:
        with pytest.raises(NonFiniteEnvError, match=r"\(env copy 2, step 5 of its episode; affected copies \[2, 3\]\)"):
            agent.learn(32)
    finally:
        agent.close()


# --- local worker processes -----------------------------------------------------------------------------

def test_process_sampler_equals_the_in_process_reference():
    assert_equals_the_in_process_reference("processes")


def test_prefetching_the_next_rollout_changes_nothing():
    """One learn call prefetches each next rollout during the critic fit; one call per update never does
    (no next update to prefetch for): the runs are identical."""
    params = []
    for calls in ([4 * 160], [160] * 4):
        agent = natpg.NPG("Pendulum-v1", seed=2, sampler="workers", workers=2, n_envs=5, n_steps=32,
                          tensorboard=False)
        try:
            for steps in calls:
                agent.learn(steps, reset=False)
            params.append(flat_params(agent))
        finally:
            agent.close()
    assert torch.equal(*params)


def test_a_prefetched_rollout_of_a_changed_policy_is_discarded():
    agent = natpg.NPG("Pendulum-v1", seed=2, sampler="workers", workers=2, n_envs=4, n_steps=32, tensorboard=False)
    try:
        agent.learn(3 * 128, callback=lambda a, row: False)  # stops after one update, a rollout in flight
        assert agent._sampler._pending is not None
        with torch.no_grad():
            agent.policy.log_std.add_(0.5)
        rollouts = record_rollouts(agent)
        with pytest.warns(RuntimeWarning, match="discarded"):
            agent.learn(128, reset=False)
        # the rollout used was sampled with the changed policy: its workers got the new weights
        assert agent._sampler._pending is None and len(rollouts) == 1
    finally:
        agent.close()
    # Unchanged policy: the prefetched rollout is used, exactly as in an uninterrupted run.
    runs = []
    for stop_early in (True, False):
        agent = natpg.NPG("Pendulum-v1", seed=2, sampler="workers", workers=2, n_envs=4, n_steps=32,
                          tensorboard=False)
        try:
            if stop_early:
                agent.learn(3 * 128, callback=lambda a, row: False)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    agent.learn(128, reset=False)
            else:
                agent.learn(2 * 128)
            runs.append(flat_params(agent))
        finally:
            agent.close()
    assert torch.equal(*runs)


def test_an_unread_answer_of_a_worker_process_is_never_taken_for_a_later_one():
    """A prefetched rollout whose handle is lost (as to a KeyboardInterrupt inside learn) is drained: the next
    collect gets a fresh rollout, exactly as the in-process reference, which ran and dropped the first."""
    params = []
    for kind in ("workers", "processes"):
        agent = natpg.NPG("Pendulum-v1", seed=5, sampler=kind, workers=2, n_envs=4, n_steps=32, tensorboard=False)
        try:
            agent.learn(3 * 128, callback=lambda a, row: False)
            assert agent._sampler._pending is not None
            agent._sampler._pending = None  # the handle is gone; a worker process still owes its answer
            agent.learn(2 * 128, reset=False)
            params.append(flat_params(agent))
        finally:
            agent.close()
    assert torch.equal(*params)


def test_process_worker_faults():
    agent = natpg.NPG(FAULTY_PROCESS_ID, seed=0, sampler="processes", workers=2, n_envs=4, n_steps=32,
                      tensorboard=False)
    check_worker_faults(agent, os.environ[FAULT_DIR_VAR])


@pytest.mark.parametrize("sampler", ["local", "workers", "processes"])
def test_an_environment_error_names_the_runs_copy_whichever_worker_steps_it(sampler):
    """Copies 2 and 3 are worker 1's first two: its error names them as the run's copies 2 and 3, not 0 and 1."""
    agent = natpg.NPG(f"{__name__}:{NAN_COPIES_ID}", seed=0, sampler=sampler, n_envs=4, n_steps=8,
                      tensorboard=False, **({} if sampler == "local" else {"workers": 2}))
    try:
        with pytest.raises(NonFiniteEnvError, match=r"\(env copy 2, step 5 of its episode; affected copies \[2, 3\]\)"):
            agent.learn(32)
    finally:
        agent.close()


def test_closing_the_process_pool_kills_a_worker_that_owes_an_answer_at_once():
    """A rollout whose answer will never be read (its collect interrupted) is not waited for on close: a worker
    stuck in its environment is killed at once, not after the 5 s a closing worker is given to exit."""
    fault_dir = os.environ[FAULT_DIR_VAR]
    agent = natpg.NPG(FAULTY_PROCESS_ID, seed=0, sampler="processes", workers=2, n_envs=4, n_steps=32,
                      tensorboard=False)
    try:
        agent.learn(128)
        sampler = agent._sampler
        open(os.path.join(fault_dir, f"hang.{time.monotonic_ns()}"), "w").close()
        sampler.pool.submit(*sampler._request(agent.policy), 32)  # its handle dropped, as by an interrupt
        deadline = time.monotonic() + 30
        while os.listdir(fault_dir) and time.monotonic() < deadline:  # a worker is now in its 600 s step
            time.sleep(0.05)
        assert not os.listdir(fault_dir)
        procs = list(sampler.pool.procs)
    finally:
        start = time.monotonic()
        agent.close()
        closed_in = time.monotonic() - start
        for token in os.listdir(fault_dir):
            os.remove(os.path.join(fault_dir, token))
    assert closed_in < 3 and not any(p.is_alive() for p in procs)


def test_process_sampler_from_the_cli(tmp_path):
    out = tmp_path / "run"
    rc = cli(["train", "npg", "Pendulum-v1", "--steps", "512", "--n-envs", "4", "--set", "n_steps=64",
              "--sampler", "processes", "--workers", "2", "--out", str(out), "--no-progress", "--set",
              "tensorboard=False"])
    assert rc == 0 and (out / "progress.csv").exists()
    assert "processes" in (out / "config.json").read_text()


def test_throughput_bench_scales_the_batch_with_the_workers(capsys):
    """--envs-per-worker K: N workers step N·K copies (weak scaling), the local baseline K."""
    from natpg.distributed.bench import main as bench

    bench(["Pendulum-v1", "--samplers", "processes", "--workers", "1", "2", "--envs-per-worker", "2",
           "--n-steps", "8", "--iterations", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["sampler"], r["workers"], r["n_envs"]) for r in rows] == [("local", 1, 2), ("processes", 1, 2),
                                                                          ("processes", 2, 4)]
    assert all(r["env_steps_per_s"] > 0 for r in rows)
    with pytest.raises(SystemExit):  # a fixed batch and a per-worker one at once
        bench(["Pendulum-v1", "--n-envs", "8", "--envs-per-worker", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench(["Pendulum-v1", "--workers", "0"])
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_init_ray_keeps_this_processes_signal_handlers_and_names_an_address_it_cannot_reach():
    import signal
    import socket

    from natpg.distributed.ray_pool import init_ray

    class FakeRay:  # what ray.init does to the handlers, and its error for 'auto' without a cluster
        def init(self, **kwargs):
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))
            if kwargs.get("address") == "auto":
                raise ConnectionError("Could not find any running Ray instance.")

    def mine(*args):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        init_ray(FakeRay(), None, 2)
        assert signal.getsignal(signal.SIGTERM) is mine  # natpg train's graceful stop survives ray.init
        with pytest.raises(ValueError, match=r"ray_address='auto': cannot connect to a Ray cluster \(Could not find"):
            init_ray(FakeRay(), "auto", 2)
        assert signal.getsignal(signal.SIGTERM) is mine
        with socket.socket() as s:  # a port nobody listens on once closed
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(ValueError, match=rf"ray_address='127.0.0.1:{port}': no Ray cluster answers there"):
            init_ray(FakeRay(), f"127.0.0.1:{port}", 2)
        with pytest.raises(ValueError, match=r"ray_address='nonsense': no Ray cluster answers there"):
            init_ray(FakeRay(), "nonsense", 2)
    finally:
        signal.signal(signal.SIGTERM, old)


def _hang_watching(pid):  # a worker stuck in its environment, with the watchdog every worker process runs
    import threading as _threading

    from natpg.vector import exit_when_gone

    _threading.Thread(target=exit_when_gone, args=(pid, 0.1), daemon=True).start()
    time.sleep(600)


def test_a_worker_stuck_in_its_environment_exits_when_the_learner_is_gone(exits_once_its_learner_is_gone):
    import multiprocessing

    def start(pid):
        worker = multiprocessing.get_context("spawn").Process(target=_hang_watching, args=(pid,), daemon=True)
        worker.start()
        return worker

    exits_once_its_learner_is_gone(start)
