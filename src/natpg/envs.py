"""Vector environments, space checks with clear errors, running normalisers, and environment snapshots.

``env_state(env)`` / ``set_env_state(env, state)`` capture and restore the simulator state of one
environment copy as plain JSON-able data (no pickle), for the families natpg targets: Gymnasium's
classic control tasks and its MuJoCo tasks. Anything else raises ``EnvStateError``; natpg then resumes
a run by resetting the environments (documented as not bit-exact).
"""

from __future__ import annotations

import importlib
import json
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from .errors import first_line, install_hint

if TYPE_CHECKING:
    from .config import Config

SUPPORTED = ("observations: Box (flat or any shape, flattened; uint8 images [C,H,W] or [H,W,C] of at least 36×36 "
             "go to a CNN), Discrete, MultiDiscrete, MultiBinary (one-hot/flattened), Dict and Tuple of these "
             "(flattened); "
             "actions: Box (Gaussian, optionally tanh-squashed), Discrete (categorical, optionally masked), "
             "MultiDiscrete (independent categoricals), MultiBinary (independent Bernoullis)")
OBS_LEAVES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
ACTION_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


class MaskError(ValueError):
    """An action mask natpg cannot use (missing, wrongly sized, allowing nothing); the vector env names the copy."""


class ActionMaskObservation(gym.ObservationWrapper):
    """Appends the action mask (1 = allowed) to the flat observation, so the policy sees it as input.

    ``source`` is an info key (Taxi and many board games put ``info['action_mask']`` there) or a callable
    ``source(env) -> array[n]`` called on the unwrapped environment after every reset and step. The
    appended entries are not normalised (``ObsNormalizer`` leaves the last ``n`` entries as they are).
    """

    natpg_stateless = True  # for a snapshot: the mask is read afresh at every reset and step

    def __init__(self, env: gym.Env, source, n_actions: int):
        super().__init__(env)
        if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
            raise ValueError(f"action masking needs a flat observation, got {env.observation_space}")
        self.source, self.n = source, n_actions
        low = np.concatenate([env.observation_space.low, np.zeros(n_actions)]).astype(np.float64)
        high = np.concatenate([env.observation_space.high, np.ones(n_actions)]).astype(np.float64)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float64)
        self._mask = np.ones(n_actions)
        self._t = 0  # steps since the last reset, to say where a mask went wrong

    def _read(self, info: dict, episode_over: bool = False) -> None:
        where = "after reset" if self._t == 0 else f"at step {self._t} of the episode"
        if callable(self.source):
            mask = self.source(self.env.unwrapped)
        elif self.source in info:
            mask = info[self.source]
        else:
            raise MaskError(f"action_mask={self.source!r}: the environment's info has no such key {where} "
                            f"(keys: {sorted(info)})")
        try:
            mask = np.asarray(mask, np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise MaskError(f"action mask {where} is not an array of numbers ({type(mask).__name__}: "
                            f"{first_line(exc)})") from None
        if mask.shape != (self.n,):
            raise MaskError(f"action mask must have {self.n} entries (one per action), got shape {mask.shape} "
                            f"{where}")
        if not (mask > 0.5).any() and not episode_over:  # a finished game may allow nothing: no action is drawn
            raise MaskError(f"action mask allows no action {where} (1 = allowed): {mask.tolist()}; end the "
                            f"episode instead where no action is legal")
        self._mask = mask

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._t = 0
        self._read(info)
        return self.observation(obs), info

    def step(self, action):
        obs, rew, term, trunc, info = self.env.step(action)
        self._t += 1
        self._read(info, episode_over=bool(term) or bool(trunc))
        return self.observation(obs), rew, term, trunc, info

    def observation(self, obs):
        return np.concatenate([np.asarray(obs, np.float64).reshape(-1), self._mask])


def is_image(space: gym.Space) -> bool:
    """A uint8 Box with three axes (Atari frames after preprocessing, pixels of any env) large enough for the
    Nature-CNN (``policies.image_layout``: H, W ≥ 36): read by a CNN. A smaller one (MiniGrid's 7×7×3 symbols)
    is read flattened and normalised, like any Box."""
    from .policies import image_layout

    return (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8
            and image_layout(space.shape) is not None)


def is_atari(env_id: str) -> bool:
    return "ale_py" in str(check_env_id(env_id).entry_point)


def atari_wrappers() -> list:
    """The usual Atari preprocessing (Machado et al. 2018 / DQN): 30 no-op starts, frame skip 4 with max-pooling,
    84×84 grayscale, then the last 4 frames stacked: observations uint8 [4, 84, 84]."""
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    return [lambda e: AtariPreprocessing(e, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True,
                                         terminal_on_life_loss=False, scale_obs=False),
            lambda e: FrameStackObservation(e, 4)]


class OffSpace(ValueError):
    """An observation that is not in the environment's observation space ``space``, found before natpg reads it."""

    def __init__(self, why: str, space: gym.Space | None = None):
        super().__init__(why)
        self.space = space


def integer_overflow(value: np.ndarray, dtype: np.dtype) -> str | None:
    """Why ``value``'s entries do not fit an integer ``dtype`` (an image's 300 in uint8, which numpy would wrap to
    44; 7.5; NaN), or None. Checked only where the dtypes differ: equal ones fit by construction."""
    if dtype.kind not in "ui" or value.dtype == dtype or not value.size or value.dtype.kind not in "uif":
        return None
    info = np.iinfo(dtype)
    if value.dtype.kind == "f":
        v = value.astype(np.float64)
        # float(info.max) + 1 is a power of two, exact in float64 (info.max itself may not be)
        fits = not np.isnan(v).any() and v.min() >= float(info.min) and v.max() < float(info.max) + 1.0 \
            and np.array_equal(v, np.floor(v))
    else:
        fits = int(value.min()) >= info.min and int(value.max()) <= info.max
    if fits:
        return None
    if value.dtype.kind == "f" and np.isnan(value).any():
        return f"an observation holding NaN, which the space's {dtype} cannot hold"
    return f"an observation of {value.dtype} values from {value.min()} to {value.max()}, which the space's {dtype} " \
           f"cannot hold"


def off_space(obs: Any, space: gym.Space) -> str | None:
    """Why ``obs`` cannot be flattened as a point of ``space`` (a missing key, a wrong shape, a discrete value out of
    range), or None. Box bounds are not checked: an environment's observations often leave them."""
    S = gym.spaces
    if isinstance(space, S.Dict):
        if not isinstance(obs, dict):
            return f"an observation of type {type(obs).__name__}, not a dict with keys {sorted(space.spaces)}"
        if set(obs) != set(space.spaces):
            return f"an observation with keys {sorted(obs)}, not the Dict space's {sorted(space.spaces)}"
        return next((f"[{k!r}]: {why}" for k, sub in space.spaces.items() if (why := off_space(obs[k], sub))), None)
    if isinstance(space, S.Tuple):  # a tuple, a list or a numpy array of the parts, as Gymnasium takes
        parts = len(obs) if isinstance(obs, (tuple, list)) or (isinstance(obs, np.ndarray) and obs.ndim) else None
        if parts != len(space.spaces):
            return (f"an observation {type(obs).__name__} of {'no' if parts is None else parts} parts, not the "
                    f"Tuple space's {len(space.spaces)}")
        return next((f"[{i}]: {why}" for i, (o, sub) in enumerate(zip(obs, space.spaces))
                     if (why := off_space(o, sub))), None)
    value = np.asarray(obs)
    if value.shape != space.shape:
        return f"an observation of shape {value.shape}, not the space's {space.shape}"
    if isinstance(space, S.Box):
        return integer_overflow(value, space.dtype)
    if isinstance(space, (S.Discrete, S.MultiDiscrete)):
        high = space.start + (space.n if isinstance(space, S.Discrete) else space.nvec)
        if value.dtype.kind not in "uib" or (value < space.start).any() or (value >= high).any():
            return f"an observation {obs!r} outside {space}"
    if isinstance(space, S.MultiBinary) and not np.isin(value, (0, 1)).all():
        return f"an observation {obs!r} that is not 0/1 everywhere"
    return None


class CheckedFlatten(gym.wrappers.FlattenObservation):
    """Gymnasium's flattening, after ``off_space``: it fails deep inside on a Dict without a key or a Discrete
    above its range, and reads one below its start as another value."""

    natpg_stateless = True  # for a snapshot

    def observation(self, observation):
        if why := off_space(observation, self.env.observation_space):
            raise OffSpace(why, self.env.observation_space)  # the environment's space, not the flattened Box
        return super().observation(observation)


def input_wrappers(action_mask=None) -> list:
    """Flattening of non-Box observations (Dict, Tuple, Discrete, ...), then the action mask appended."""

    def flatten(e: gym.Env) -> gym.Env:
        return e if isinstance(e.observation_space, gym.spaces.Box) else CheckedFlatten(e)

    def mask(e: gym.Env) -> gym.Env:
        check_maskable(e.action_space)
        if len(e.observation_space.shape) > 1:
            e = CheckedFlatten(e)
        return ActionMaskObservation(e, action_mask, int(e.action_space.n))

    return [flatten] if action_mask is None else [flatten, mask]


def env_wrappers(env_id: str, action_mask=None) -> list:
    """Wrappers natpg puts around every copy, in order: Atari preprocessing (ALE ids), then ``input_wrappers``."""
    return (atari_wrappers() if is_atari(env_id) else []) + input_wrappers(action_mask)


def make_kwargs(env_id: str) -> dict[str, Any]:
    """Keyword arguments for ``gym.make``: ALE environments skip frames in the preprocessing wrapper instead."""
    return {"frameskip": 1} if is_atari(env_id) else {}


# gymnasium.make arguments natpg's Atari preprocessing sets or relies on (it skips frames and reads the screen)
ATARI_FIXED_KWARGS = ("frameskip", "obs_type")


def make_env(env_id: str, action_mask=None, wrap: bool = True, env_kwargs: dict[str, Any] | None = None,
             render_mode: str | None = None) -> gym.Env:
    """One copy of the environment with natpg's wrappers; ``wrap=False`` stops before flattening and masking
    (the space a user's observations come in, after Atari preprocessing); ``env_kwargs`` go to ``gym.make``.
    An environment that cannot be made with the user's ``env_kwargs`` is a ValueError naming them."""
    env_kwargs, atari = env_kwargs or {}, is_atari(env_id)
    if atari and (fixed := sorted(set(env_kwargs) & set(ATARI_FIXED_KWARGS))):
        raise ValueError(f"environment {env_id!r}: natpg's Atari preprocessing skips frames (4) and reads the "
                         f"screen itself; leave {fixed} out of env_kwargs")
    kwargs = {**make_kwargs(env_id), **env_kwargs, **({"render_mode": render_mode} if render_mode else {})}
    try:
        env = gym.make(env_id, **kwargs)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, OSError, AssertionError) as exc:
        if not env_kwargs or (render_mode and isinstance(exc, TypeError) and "render_mode" in str(exc)):
            raise
        raise ValueError(f"environment {env_id!r} cannot be made with env_kwargs={env_kwargs!r}: "
                         f"{type(exc).__name__}: {first_line(exc)}") from None
    for w in env_wrappers(env_id, action_mask) if wrap else atari_wrappers() if atari else []:
        env = w(env)
    return env


OWN_ENV_HINT = (" For an environment of your own, give the module that registers it: 'my_module:MyEnv-v0' (natpg "
                "imports my_module first, in every process)")


def check_env_id(env_id: str) -> gym.envs.registration.EnvSpec:
    """The registered spec of ``env_id``, or a ValueError that says what went wrong.

    ``'module:EnvName-v0'`` (Gymnasium's syntax) imports ``module`` first, so that an environment it
    registers on import exists in every process that builds one, rollout worker processes included."""
    if not isinstance(env_id, str) or not env_id:
        hint = ""
        spec = env_id if isinstance(env_id, gym.envs.registration.EnvSpec) else getattr(env_id, "spec", None)
        if isinstance(env_id, (gym.Env, gym.vector.VectorEnv, gym.envs.registration.EnvSpec)) and spec is not None:
            hint = (f"; natpg makes every copy itself (in worker processes too) from a registered id: pass "
                    f"{spec.id!r} (constructor arguments: env_kwargs={{...}}; wrappers: register a factory that "
                    f"applies them, README)")
        elif isinstance(env_id, (gym.Env, gym.vector.VectorEnv)) or callable(env_id):  # SB3 takes these too
            hint = ("; natpg makes every copy itself (in worker processes too) from a registered id: at module "
                    "level, gymnasium.register('MyEnv-v0', entry_point=MyEnv), then natpg.NPG('MyEnv-v0') "
                    "(constructor arguments: env_kwargs={...})")
        got = f"the spec of {spec.id!r}" if isinstance(env_id, gym.envs.registration.EnvSpec) else repr(env_id)
        raise ValueError(f"environment id must be a non-empty string such as 'CartPole-v1', got {got}{hint}")
    if env_id in ("MlpPolicy", "CnnPolicy", "MultiInputPolicy"):
        raise ValueError(f"{env_id!r} is Stable-Baselines3's policy name: natpg builds the policy from the spaces, "
                         f"so the environment id comes first, e.g. natpg.PPO('CartPole-v1')")
    module = None
    if ":" in env_id:
        module, _, name = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ValueError(f"environment {env_id!r}: cannot import module {module!r} ({exc})") from None
        env_id = name
    if env_id.startswith("ALE/") and env_id not in gym.registry:  # ale-py registers its games on import
        try:
            import ale_py

            gym.register_envs(ale_py)
        except ImportError:
            raise ValueError(f"environment {env_id!r} is an Atari game: {install_hint('atari')} (ale-py and "
                             f"OpenCV for the preprocessing)") from None
    try:
        return gym.spec(env_id)
    except gym.error.Error as exc:  # NameNotFound, VersionNotFound, DeprecatedEnv, ...
        said = str(exc) if str(exc).endswith((".", "?")) else f"{exc}."
        never_registered = isinstance(exc, (gym.error.NameNotFound, gym.error.NamespaceNotFound))
        own = OWN_ENV_HINT if never_registered and not module else ""  # not for a deprecated version, say
        raise ValueError(f"unknown environment id {env_id!r}: {said}{own}") from None


def unknown_in_worker(env_id: str, error: str) -> str:
    """For an 'unknown environment id' raised in a worker process while this process knows the id: the worker's
    error, why, and the fix ('' otherwise)."""
    if "unknown environment id" not in error or env_id.split(":")[-1] not in gym.registry:
        return ""
    return (f"{first_line(error).removesuffix(OWN_ENV_HINT)} {env_id!r} is registered in this process but not in "
            f"the worker processes, which import your script again without running its `if __name__ == '__main__':` "
            f"block: register it at module level (or use a 'module:{env_id}' id whose module registers it)")


def env_family(env_id: str) -> str:
    """'mujoco' for MuJoCo locomotion tasks, 'atari' for ALE games, else 'classic' (used to pick presets)."""
    return "mujoco" if "mujoco" in str(check_env_id(env_id).entry_point) else "atari" if is_atari(env_id) else "classic"


def _check_observation_space(space: gym.Space, top: gym.Space) -> None:
    if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
        for sub in space.spaces.values() if isinstance(space, gym.spaces.Dict) else space.spaces:
            _check_observation_space(sub, top)
    elif not isinstance(space, OBS_LEAVES):
        raise ValueError(f"unsupported observation space {top} (it holds {space}); supported {SUPPORTED}")


def check_maskable(action_space: gym.Space, env_id: str | None = None) -> None:
    if not isinstance(action_space, gym.spaces.Discrete):
        has = f"{env_id!r} has" if env_id is not None else "got"
        raise ValueError(f"action masking (action_mask) is for Discrete action spaces, {has} {action_space}")


def check_spaces(observation_space: gym.Space, action_space: gym.Space) -> None:
    _check_observation_space(observation_space, observation_space)
    if not isinstance(action_space, ACTION_SPACES):
        raise ValueError(f"unsupported action space {action_space}; supported {SUPPORTED}")
    if isinstance(action_space, gym.spaces.Discrete) and int(action_space.start) != 0:
        raise ValueError(f"unsupported action space {action_space}: Discrete actions must start at 0; "
                         f"supported {SUPPORTED}")
    if isinstance(action_space, gym.spaces.MultiDiscrete) and np.any(action_space.start != 0):
        raise ValueError(f"unsupported action space {action_space}: MultiDiscrete actions must start at 0; "
                         f"supported {SUPPORTED}")


def extra_for(env_id: str) -> str:
    """natpg's extra for an environment whose dependency is missing, as a sentence ('' where natpg has none)."""
    entry = str(gym.spec(env_id).entry_point) if env_id in gym.registry else ""
    if "mujoco" in entry:
        return f". natpg's extra for MuJoCo: {install_hint('mujoco')}"
    if "ale_py" in entry:
        return f". natpg's extra for Atari: {install_hint('atari')}"
    return ""


def probe_spaces(env_id: str, action_mask=None, env_kwargs: dict[str, Any] | None = None) -> tuple[gym.Space, gym.Space]:
    """Observation space (after Atari preprocessing, before flattening: the space of the observations a user
    passes to ``predict``) and action space of one copy of the environment (checked)."""
    check_env_id(env_id)
    env_kwargs = env_kwargs or {}
    try:
        env = make_env(env_id, wrap=False, env_kwargs=env_kwargs)
    except gym.error.DependencyNotInstalled as exc:
        raise ValueError(f"environment {env_id!r} needs an optional dependency: {exc}{extra_for(env_id)}") from None
    except gym.error.NamespaceNotFound as exc:
        raise ValueError(f"environment {env_id!r}: {exc}. For Atari games: {install_hint('atari')}") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    check_spaces(obs_space, act_space)
    if action_mask is not None:
        check_maskable(act_space, env_id)
        if not callable(action_mask):  # the info key must be there at reset: check before any work
            env = make_env(env_id, action_mask, env_kwargs=env_kwargs)
            try:
                env.reset(seed=0)
            finally:
                env.close()
    return obs_space, act_space


def make_vec_env(env_id: str, n_envs: int, vectorization: str = "sync", n_workers: int = 2, action_mask=None,
                 env_kwargs: dict[str, Any] | None = None, info_keys: tuple[str, ...] = (), first_copy: int = 0,
                 worker_timeouts: tuple[float | None, float | None] = (None, None)):
    """``n_envs`` copies (each with ``env_wrappers``, made with ``gym.make(env_id, **env_kwargs)``) in one vector
    env that resets a finished copy in the same step.

    With same-step autoreset the observation returned for a finished copy is already the first one of
    its next episode, and the true last observation is in ``info['final_obs']``: the sampler reads it
    to bootstrap truncated episodes from V(final observation). The last step's info is in ``info['final_info']``
    (the multiproc engine ships only its ``info_keys`` from the worker processes). ``first_copy``: the index of
    copy 0 among all of a run's copies (a rollout worker's slice, 'sync'), for the messages that name a copy.
    ``worker_timeouts``: the seconds a 'multiproc' worker may take to answer a step or reset (an 'async' copy's
    process too), and to start.
    """
    check_env_id(env_id)
    env_kwargs = env_kwargs or {}
    if vectorization == "multiproc":  # several copies per worker process (natpg.vector)
        from .vector import MultiprocVectorEnv

        return MultiprocVectorEnv(env_id, n_envs, min(n_workers, n_envs), action_mask, env_kwargs, info_keys,
                                  *worker_timeouts)
    if vectorization == "sync":  # natpg's lean in-process vector env (natpg.vector)
        from .vector import SerialVectorEnv

        return SerialVectorEnv([lambda: make_env(env_id, action_mask, env_kwargs=env_kwargs) for _ in range(n_envs)],
                               first_copy)
    from .vector import ApiChecked, TimedAsyncVectorEnv

    return TimedAsyncVectorEnv([lambda i=i: ApiChecked(make_env(env_id, action_mask, env_kwargs=env_kwargs), i)
                                for i in range(n_envs)], worker_timeouts[0], autoreset_mode=AutoresetMode.SAME_STEP)


class RunningMeanStd:
    """Running mean and variance over the leading axis (Chan et al. parallel merge), float64."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        # x.mean(0) and x.var(0) by the same ufuncs (bit-identical), without their Python-level overhead:
        # this runs every sampler step.
        b_count = x.shape[0]
        b_mean = np.add.reduce(x, axis=0) / b_count
        centred = x - b_mean
        b_var = np.add.reduce(centred * centred, axis=0) / b_count
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total) / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": float(self.count)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.mean = np.asarray(d["mean"], np.float64)
        self.var = np.asarray(d["var"], np.float64)
        self.count = float(d["count"])


class ObsNormalizer:
    """(obs − mean) / √(var + eps), clipped. Calling it updates the statistics first (training); ``normalize``
    alone leaves them frozen (evaluation, prediction). The last ``passthrough`` entries (an appended action mask)
    are left as they are."""

    def __init__(self, shape: tuple[int, ...], clip: float, enabled: bool = True, passthrough: int = 0):
        self.rms = RunningMeanStd(shape)
        self.clip, self.enabled, self.passthrough = clip, enabled, passthrough

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, np.float32)
        self.observe(obs)
        return self.normalize(obs)

    def observe(self, obs: np.ndarray) -> None:
        """Update the statistics with observations [n, D]."""
        self.rms.update(obs)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return np.asarray(obs, np.float32)
        z = ((obs - self.rms.mean) / np.sqrt(self.rms.var + 1e-8)).clip(-self.clip, self.clip)
        if self.passthrough:
            z[..., -self.passthrough :] = obs[..., -self.passthrough :]
        return z.astype(np.float32)


class RewardScaler:
    """Divides rewards by the running std of the discounted return (per env copy), then clips; with ``sign``
    the rewards are first replaced by their sign (−1, 0, 1), and the statistics are those of the signs."""

    def __init__(self, n_envs: int, gamma: float, clip: float, enabled: bool = False, sign: bool = False):
        self.rms = RunningMeanStd(())
        self.ret = np.zeros(n_envs, np.float64)
        self.gamma, self.clip, self.enabled, self.sign = gamma, clip, enabled, sign

    def __call__(self, rew: np.ndarray, done: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Scaled rewards; ``valid`` (bool [n_envs], None: all) leaves dropped copies out of the statistics."""
        if self.sign:
            rew = np.sign(rew)
        if not self.enabled:
            return rew
        self.ret = self.ret * self.gamma + rew
        self.observe(self.ret, valid)
        self.ret[done] = 0.0
        return (rew / np.sqrt(self.rms.var + 1e-8)).clip(-self.clip, self.clip)

    def observe(self, ret: np.ndarray, valid: np.ndarray | None) -> None:
        """Update the statistics with the discounted returns of the valid copies."""
        if valid is None:
            self.rms.update(ret)
        elif valid.any():
            self.rms.update(ret[valid])


def make_normalisers(config: Config, n_envs: int, features: int, mask_dim: int, image: Any,
                     obs_cls: type = ObsNormalizer, rew_cls: type = RewardScaler) -> tuple[Any, Any]:
    """A run's observation normaliser (over the flat input of ``features`` entries and an appended mask of
    ``mask_dim``; images are scaled by 1/255 inside the CNN instead) and reward scaler for ``n_envs`` copies:
    the learner's, or (``obs_cls``, ``rew_cls``) a rollout worker's frozen ones."""
    e = config.env
    return (obs_cls((features + mask_dim,), e.obs_clip, e.normalize_obs and image is None, passthrough=mask_dim),
            rew_cls(n_envs, config.advantage.gamma, e.reward_clip, e.normalize_reward, e.sign_rewards))


# ------------------------------------------------------------------------------------------------------
# Environment snapshots (for bit-exact resume)
# ------------------------------------------------------------------------------------------------------

class EnvStateError(ValueError):
    """The environment's state cannot be captured or restored by natpg."""


# Wrappers that gym.make puts around a registered environment and how their state is kept. TimeLimit
# counts the episode's steps; OrderEnforcing and PassiveEnvChecker hold flags that a reset sets.
_STATEFUL_WRAPPERS = {"TimeLimit": ("_elapsed_steps",), "OrderEnforcing": ("_has_reset",)}
_STATELESS_WRAPPERS = ("PassiveEnvChecker",)
# Attributes of a classic-control environment that change while it runs (all else is configuration).
_CLASSIC_DYNAMIC = ("state", "steps_beyond_terminated", "last_u")
# Derived MuJoCo quantities that environments read *before* stepping (e.g. Ant's torso xpos, Humanoid's
# mass centre from xipos, Reacher's body positions): after mj_step they describe the pre-step
# kinematics, so they are saved as they are rather than recomputed from the restored positions.
_MUJOCO_DERIVED = ("xpos", "xquat", "xmat", "xipos", "ximat", "xanchor", "xaxis", "geom_xpos", "geom_xmat",
                   "site_xpos", "site_xmat", "subtree_com", "cinert", "cdof", "cvel", "cacc", "cfrc_int",
                   "cfrc_ext", "qfrc_actuator", "actuator_force", "sensordata")


def _wrapper_chain(env: gym.Env) -> list[gym.Env]:
    chain = []
    while isinstance(env, gym.Wrapper):
        chain.append(env)
        env = env.env
    return chain


def _has_own_state(obj: Any) -> bool:
    """An environment or wrapper that says how to save and restore its state: ``natpg_state()`` returning
    JSON-able data and ``natpg_set_state(data)`` putting it back."""
    return callable(getattr(obj, "natpg_state", None)) and callable(getattr(obj, "natpg_set_state", None))


def _family(env: gym.Env) -> str:
    u = env.unwrapped
    if _has_own_state(u):
        return "own"
    module = type(u).__module__
    if module.startswith("gymnasium.envs.classic_control"):
        return "classic"
    try:
        from gymnasium.envs.mujoco.mujoco_env import MujocoEnv
    except Exception:  # MuJoCo not installed
        MujocoEnv = ()
    if MujocoEnv and isinstance(u, MujocoEnv):
        return "mujoco"
    raise EnvStateError(f"cannot snapshot environment {type(u).__module__}.{type(u).__name__}: natpg saves the "
                        f"simulator state of Gymnasium classic-control and MuJoCo tasks, and of an environment "
                        f"with natpg_state() and natpg_set_state(state) methods (docs/RELIABILITY.md)")


def _own_state(obj: Any) -> Any:
    """``obj.natpg_state()``, checked to come back from the checkpoint's JSON as it is (a tuple would come back a
    list, an int key a string)."""
    data = obj.natpg_state()
    try:
        back = json.loads(json.dumps(data, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise EnvStateError(f"{type(obj).__name__}.natpg_state() returned what JSON cannot hold ({exc})") from None
    if not _same_json(back, data):
        raise EnvStateError(f"{type(obj).__name__}.natpg_state() returned what JSON does not give back as it is "
                            f"(tuples come back as lists, non-string keys as strings): use lists and string keys")
    return data


def _same_json(a: Any, b: Any) -> bool:
    """``a == b`` with the types JSON keeps: a tuple or an int key in ``b`` differs from the list and string key
    JSON gives back; NaN equals NaN."""
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _set_own_state(obj: Any, data: Any) -> None:
    """``obj.natpg_set_state(data)``; its failure is a snapshot that cannot be restored (the run goes on from
    freshly reset environments, with a warning), not the end of the run."""
    try:
        obj.natpg_set_state(data)
    except Exception as exc:
        raise EnvStateError(f"{type(obj).__name__}.natpg_set_state failed: {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc


def _array_to_json(a: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return {"array": a.tolist(), "dtype": str(a.dtype), "shape": list(a.shape)}
    if isinstance(a, (tuple, list)):
        return {"tuple": [_array_to_json(x) for x in a]}
    if isinstance(a, (bool, np.bool_)):
        return bool(a)
    if isinstance(a, (int, np.integer)):
        return int(a)
    if isinstance(a, (float, np.floating)):
        return {"float": float(a), "dtype": type(a).__name__ if isinstance(a, np.floating) else "float"}
    raise EnvStateError(f"cannot record a value of type {type(a).__name__} in an environment snapshot")


def _array_from_json(d: Any) -> Any:
    if d is None or isinstance(d, (bool, int)):
        return d
    if "array" in d:
        return np.asarray(d["array"], dtype=d["dtype"]).reshape(d["shape"])
    if "tuple" in d:
        return tuple(_array_from_json(x) for x in d["tuple"])
    if "float" in d:
        return float(d["float"]) if d["dtype"] == "float" else getattr(np, d["dtype"])(d["float"])
    raise EnvStateError(f"unreadable value {d!r} in an environment snapshot")


def env_state(env: gym.Env) -> dict[str, Any]:
    """The state of one environment (with its gym.make wrappers) as JSON-able data.

    Classic control: the ``state`` vector (and ``steps_beyond_terminated``, Pendulum's ``last_u``);
    MuJoCo: the full integration state (``mj_getState(mjSTATE_INTEGRATION)``: time, qpos, qvel, act,
    warm start, controls, applied forces, mocap) plus the derived kinematics environments read before
    stepping; for both the random generator's bit-generator state and the TimeLimit step count.
    Raises ``EnvStateError`` for other environments or wrappers.
    """
    family = _family(env)
    wrappers = {}
    for w in _wrapper_chain(env):
        name = type(w).__name__
        if name in wrappers:  # snapshots are kept by class name
            raise EnvStateError(f"cannot snapshot {env.spec.id if env.spec else env}: it has two wrappers named "
                                f"{name}")
        if _has_own_state(type(w)):  # the wrapper's class: a wrapper forwards unknown attributes to its env
            wrappers[name] = {"own": _own_state(w)}
        elif name in _STATEFUL_WRAPPERS:
            wrappers[name] = {a: _array_to_json(getattr(w, a)) for a in _STATEFUL_WRAPPERS[name]}
        elif not (name in _STATELESS_WRAPPERS or getattr(type(w), "natpg_stateless", False)):
            raise EnvStateError(f"cannot snapshot wrapper {name} of {env.spec.id if env.spec else env}: "
                                f"natpg knows the state of {sorted(_STATEFUL_WRAPPERS) + list(_STATELESS_WRAPPERS)}, "
                                f"of a wrapper class with natpg_state() and natpg_set_state(state) methods, and "
                                f"that a class with natpg_stateless = True has none")
    u = env.unwrapped
    out: dict[str, Any] = {"family": family, "class": f"{type(u).__module__}.{type(u).__name__}",
                           "wrappers": wrappers, "np_random": u.np_random.bit_generator.state,
                           "np_random_seed": getattr(u, "_np_random_seed", None)}
    if family == "own":
        out["own"] = _own_state(u)
    elif family == "classic":
        out["attrs"] = {a: _array_to_json(getattr(u, a)) for a in _CLASSIC_DYNAMIC if hasattr(u, a)}
    else:
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        state = np.empty(mujoco.mj_stateSize(u.model, spec), np.float64)
        mujoco.mj_getState(u.model, u.data, state, spec)
        out["integration"] = state.tolist()
        out["derived"] = {k: np.asarray(getattr(u.data, k)).tolist() for k in _MUJOCO_DERIVED}
    return out


def set_env_state(env: gym.Env, state: dict[str, Any]) -> None:
    """Restore what ``env_state`` captured into an environment of the same id (reset at least once)."""
    family = _family(env)
    u = env.unwrapped
    cls = f"{type(u).__module__}.{type(u).__name__}"
    if state.get("family") != family or state.get("class") != cls:
        raise EnvStateError(f"snapshot of {state.get('class')!r} cannot be restored into {cls!r}")
    chain = {type(w).__name__: w for w in _wrapper_chain(env)}
    if set(state["wrappers"]) != {n for n, w in chain.items() if n in _STATEFUL_WRAPPERS or _has_own_state(type(w))}:
        raise EnvStateError(f"snapshot has wrappers {sorted(state['wrappers'])}, the environment "
                            f"{sorted(chain)}")
    for name, attrs in state["wrappers"].items():
        if _has_own_state(type(chain[name])):
            _set_own_state(chain[name], attrs["own"])
            continue
        for a, v in attrs.items():
            setattr(chain[name], a, _array_from_json(v))
    u.np_random.bit_generator.state = state["np_random"]
    if state.get("np_random_seed") is not None:
        u._np_random_seed = state["np_random_seed"]
    if family == "own":
        _set_own_state(u, state["own"])
    elif family == "classic":
        for a, v in state["attrs"].items():
            setattr(u, a, _array_from_json(v))
    else:
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        integration = np.asarray(state["integration"], np.float64)
        if integration.shape != (mujoco.mj_stateSize(u.model, spec),):
            raise EnvStateError(f"MuJoCo snapshot has {integration.size} state entries, the model needs "
                                f"{mujoco.mj_stateSize(u.model, spec)}")
        mujoco.mj_setState(u.model, u.data, integration, spec)
        mujoco.mj_forward(u.model, u.data)
        mujoco.mj_rnePostConstraint(u.model, u.data)
        mujoco.mj_setState(u.model, u.data, integration, spec)  # forward must not have moved the warm start
        for k, v in state["derived"].items():
            getattr(u.data, k)[...] = np.asarray(v, np.float64).reshape(getattr(u.data, k).shape)


def _in_process(envs) -> bool:
    from .vector import SerialVectorEnv

    return isinstance(envs, (SerialVectorEnv, gym.vector.SyncVectorEnv))


def vector_env_state(envs: gym.vector.VectorEnv) -> list[dict[str, Any]]:
    """``env_state`` of every copy of a synchronous vector env (EnvStateError for other vector envs)."""
    if not _in_process(envs):
        raise EnvStateError(f"cannot snapshot the copies of a {type(envs).__name__}: natpg reads environment "
                            f"state only from vectorization='sync'")
    return [env_state(e) for e in envs.envs]


def set_vector_env_state(envs: gym.vector.VectorEnv, states: list[dict[str, Any]]) -> None:
    if not _in_process(envs):
        raise EnvStateError(f"cannot restore the copies of a {type(envs).__name__} (vectorization='sync' only)")
    if len(states) != envs.num_envs:
        raise EnvStateError(f"snapshot of {len(states)} environment copies, the vector env has {envs.num_envs}")
    for e, st in zip(envs.envs, states):
        set_env_state(e, st)
