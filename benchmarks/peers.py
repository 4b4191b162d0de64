"""Runners for the peer libraries of benchmarks/returns.py (sb3-contrib TRPO, Tianshou NPG / TRPO).

This module is imported inside the peer's own interpreter (which may have neither natpg nor the other
peer installed), so at the top level it uses only the standard library; each runner imports its library
lazily and raises ``PeerMissing`` with a one-line message when it is not importable.

Every runner is an object with ``batch`` (env steps per update), ``env_steps`` (transitions so far,
across all envs), ``train(n)`` (exactly n more transitions, n a multiple of ``batch``), ``act(obs)``
(deterministic actions for a batch of raw observations, with the normaliser's statistics frozen) and
``close()``. ``evaluate`` plays the same seeded evaluation episodes for every library.
"""

from __future__ import annotations

import math


class PeerMissing(RuntimeError):
    """The peer library is not importable in this interpreter."""


def _require(module: str, algo: str, flag: str):
    import importlib
    import sys

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerMissing(f"{algo} needs the Python package {module!r}, which is not importable in "
                          f"{sys.executable} ({exc}); pass the interpreter that has it "
                          f"({flag})") from None


def eval_points(steps: int, eval_every: int, batch: int) -> list[int]:
    """The env-step counts at which a library with updates of ``batch`` steps is evaluated.

    Training only stops at whole batches, so each target k·eval_every (and the budget itself) is rounded
    down to a multiple of ``batch``: no run ever uses more than ``steps`` transitions, and the CSV records
    the exact count. Targets that round to 0 are dropped.
    """
    if steps < batch:
        raise ValueError(f"--steps {steps} is less than one update of this algorithm ({batch} env steps)")
    targets = list(range(eval_every, steps, eval_every)) + [steps]
    points = sorted({t // batch * batch for t in targets} - {0})
    return points


def evaluate(env_id: str, act, episodes: int, seed: int) -> tuple[float, float]:
    """Mean and std of the undiscounted return of ``episodes`` episodes, copy i reset with seed ``seed + i``
    (the same episodes natpg.evaluate plays), actions from ``act`` (deterministic, frozen normalisation)."""
    import gymnasium as gym
    import numpy as np

    envs = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="sync")
    try:
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        finished = np.zeros(episodes, bool)
        while not finished.all():
            obs, rew, term, trunc, _ = envs.step(act(obs))
            returns += np.where(finished, 0.0, rew)
            finished |= term | trunc
    finally:
        envs.close()
    return float(returns.mean()), float(returns.std())


# --- sb3-contrib TRPO ------------------------------------------------------------------------------------
class SB3TRPO:
    """sb3-contrib TRPO with the RL Zoo's tuned MuJoCo hyperparameters.

    Source: DLR-RM/rl-baselines3-zoo ``hyperparams/trpo.yml``, anchor ``&mujoco-defaults`` (= the
    ``&pybullet-defaults`` block; Ant/HalfCheetah/Hopper/Walker2d-v4 inherit it): normalize: true, n_envs: 2,
    policy: MlpPolicy, batch_size: 128, n_steps: 1024, gamma: 0.99, gae_lambda: 0.95,
    sub_sampling_factor: 1, cg_max_steps: 25, cg_damping: 0.1, n_critic_updates: 20,
    learning_rate: 1e-3; HalfCheetah adds target_kl: 0.04 (otherwise sb3-contrib's default 0.01), Swimmer
    gamma: 0.9999 (the setting of its published 359 ± 2; the Zoo passes gamma on to VecNormalize too).
    No policy_kwargs, so SB3's MlpPolicy defaults apply: separate [64, 64] actor and critic, Tanh,
    orthogonal init, state-independent log-std initialised at 0. ``normalize: true`` in the Zoo is
    VecNormalize(norm_obs=True, norm_reward=True, gamma=γ); the Zoo evaluates with training=False,
    norm_reward=False, and so does this runner (obs normalised with the frozen statistics, raw rewards).
    """

    batch = 2 * 1024

    def __init__(self, env_id: str, seed: int, total_steps: int):
        _require("sb3_contrib", "sb3-trpo", "--sb3-python")
        from sb3_contrib import TRPO
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.logger import Logger
        from stable_baselines3.common.vec_env import VecNormalize

        gamma = 0.9999 if env_id.startswith("Swimmer") else 0.99
        self.venv = VecNormalize(make_vec_env(env_id, n_envs=2, seed=seed), norm_obs=True, norm_reward=True,
                                 gamma=gamma)
        target_kl = 0.04 if env_id.startswith("HalfCheetah") else 0.01
        self.model = TRPO("MlpPolicy", self.venv, n_steps=1024, batch_size=128, gamma=gamma, gae_lambda=0.95,
                          sub_sampling_factor=1, cg_max_steps=25, cg_damping=0.1, n_critic_updates=20,
                          learning_rate=1e-3, target_kl=target_kl, seed=seed, device="cpu", verbose=0)
        # A logger of our own: otherwise every learn() call makes an empty /tmp/SB3-<time> folder.
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self._started = False

    @property
    def env_steps(self) -> int:
        return int(self.model.num_timesteps)

    def train(self, n: int) -> None:
        # learn() with reset_num_timesteps=False continues from the last observation (no env reset) and
        # stops after exactly n more steps, since n is a multiple of n_envs × n_steps.
        self.model.learn(total_timesteps=n, reset_num_timesteps=not self._started)
        self._started = True

    def act(self, obs):
        # normalize_obs only reads the running statistics: they stay frozen during evaluation.
        action, _ = self.model.predict(self.venv.normalize_obs(obs), deterministic=True)
        return action  # predict clips to the Box bounds, as during training

    def close(self) -> None:
        self.venv.close()


# --- Tianshou NPG / TRPO ---------------------------------------------------------------------------------
class TianshouNPG:
    """Tianshou NPG (or TRPO with ``trpo=True``) as in Tianshou's MuJoCo examples.

    Source: thu-ml/tianshou ``examples/mujoco/mujoco_npg.py`` / ``mujoco_trpo.py`` (Tianshou 2.x API) and
    ``examples/mujoco/mujoco_env.py``: 16 training envs, 1024 env steps per update (64 per env), the whole
    batch in one update (batch_size None, 1 repetition), Net [64, 64] Tanh actor
    (ContinuousActorProbabilistic, unbounded, state-independent sigma initialised at -0.5) and critic,
    orthogonal init gain √2 with zero biases, last policy layer scaled by 0.01, actions clipped to the
    bounds; critic Adam lr 1e-3 with 20 iterations per update, linearly decayed to 0 over the run
    (lr_decay=True; here over this run's own budget); γ 0.99, GAE λ 0.95, return scaling (reward
    normalisation) and advantage normalisation on, observation normalisation by VectorEnvNormObs;
    CG 10 iterations, damping 0.1 (both fixed inside Tianshou's NPG); NPG trust_region_size 0.1; TRPO
    max_kl 0.01, backtrack 0.8, 10 backtracks. Deviations: training envs are a DummyVectorEnv (one
    process, like natpg's default 'sync') instead of ShmemVectorEnv, and evaluation is this harness's
    own (deterministic mean action, frozen obs statistics) instead of Tianshou's test collector.
    """

    n_envs, step_per_collect = 16, 1024
    batch = step_per_collect

    def __init__(self, env_id: str, seed: int, total_steps: int, trpo: bool = False):
        ts = _require("tianshou", "tianshou-trpo" if trpo else "tianshou-npg", "--tianshou-python")
        import gymnasium as gym
        import numpy as np
        import torch
        from torch.distributions import Independent, Normal
        from tianshou.algorithm import NPG, TRPO
        from tianshou.algorithm.modelfree.reinforce import ProbabilisticActorPolicy
        from tianshou.algorithm.optim import AdamOptimizerFactory, LRSchedulerFactoryLinear
        from tianshou.data import Batch, Collector, VectorReplayBuffer
        from tianshou.env import DummyVectorEnv, VectorEnvNormObs
        from tianshou.utils.net.common import Net
        from tianshou.utils.net.continuous import ContinuousActorProbabilistic, ContinuousCritic
        from tianshou.utils.torch_utils import policy_within_training_step

        self._ts, self._Batch, self._np, self._torch = ts, Batch, np, torch
        self._within_training = policy_within_training_step
        np.random.seed(seed)
        torch.manual_seed(seed)
        env = gym.make(env_id)
        obs_shape, act_shape = env.observation_space.shape, env.action_space.shape
        self.train_envs = VectorEnvNormObs(DummyVectorEnv([lambda: gym.make(env_id) for _ in range(self.n_envs)]))
        self.train_envs.seed(seed)  # copy i seeded seed + i
        actor = ContinuousActorProbabilistic(
            preprocess_net=Net(state_shape=obs_shape, hidden_sizes=[64, 64], activation=torch.nn.Tanh),
            action_shape=act_shape, unbounded=True)
        critic = ContinuousCritic(
            preprocess_net=Net(state_shape=obs_shape, hidden_sizes=[64, 64], activation=torch.nn.Tanh))
        torch.nn.init.constant_(actor.sigma_param, -0.5)
        for m in list(actor.modules()) + list(critic.modules()):
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.orthogonal_(m.weight, gain=np.sqrt(2))
                torch.nn.init.zeros_(m.bias)
        for m in actor.mu.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.zeros_(m.bias)
                m.weight.data.copy_(0.01 * m.weight.data)
        updates = math.ceil(total_steps / self.step_per_collect)
        optim = AdamOptimizerFactory(lr=1e-3).with_lr_scheduler_factory(
            LRSchedulerFactoryLinear(max_epochs=1, epoch_num_steps=updates * self.step_per_collect,
                                     collection_step_num_env_steps=self.step_per_collect))
        self.policy = ProbabilisticActorPolicy(
            actor=actor, dist_fn=lambda loc_scale: Independent(Normal(*loc_scale), 1), action_scaling=True,
            action_bound_method="clip", action_space=env.action_space, deterministic_eval=True)
        env.close()
        common = dict(policy=self.policy, critic=critic, optim=optim, gamma=0.99, gae_lambda=0.95,
                      return_scaling=True, advantage_normalization=True, optim_critic_iters=20)
        if trpo:
            self.algorithm = TRPO(**common, max_kl=0.01, backtrack_coeff=0.8, max_backtracks=10)
        else:
            self.algorithm = NPG(**common, trust_region_size=0.1)
        self.collector = Collector(self.algorithm, self.train_envs, VectorReplayBuffer(4096, self.n_envs),
                                   exploration_noise=True)
        self.collector.reset()
        self._env_steps = 0

    @property
    def env_steps(self) -> int:
        return self._env_steps

    def train(self, n: int) -> None:
        # What Tianshou's OnPolicyTrainer does per training step, without its epochs and test collector.
        for _ in range(n // self.step_per_collect):
            with self._within_training(self.policy):
                stats = self.collector.collect(n_step=self.step_per_collect)
                self._env_steps += int(stats.n_collected_steps)
                self.algorithm.update(buffer=self.collector.buffer, batch_size=None, repeat=1)
                self.collector.reset_buffer(keep_statistics=True)

    def act(self, obs):
        # obs_rms.norm only reads the statistics (VectorEnvNormObs updates them in step/reset of the
        # training envs, which evaluation does not touch): frozen. Outside a training step with
        # deterministic_eval=True the policy returns the Gaussian's mean; map_action clips to the bounds.
        obs = self.train_envs.get_obs_rms().norm(obs)
        with self._torch.no_grad():
            self.policy.eval()
            act = self.policy(self._Batch(obs=obs, info={})).act
        return self.policy.map_action(act)

    def close(self) -> None:
        self.train_envs.close()


PEERS = {
    "sb3-trpo": ("sb3-contrib", lambda env, seed, steps: SB3TRPO(env, seed, steps)),
    "tianshou-npg": ("tianshou", lambda env, seed, steps: TianshouNPG(env, seed, steps, trpo=False)),
    "tianshou-trpo": ("tianshou", lambda env, seed, steps: TianshouNPG(env, seed, steps, trpo=True)),
}
