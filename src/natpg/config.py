"""Typed configuration: one dataclass per concern, every field documented, unknown keys rejected.

Users override fields by their flat names (``natpg.NPG(env, max_kl=0.02, n_envs=4)``); every field
name is unique across the sections so a flat name says exactly what it sets. ``Config.validate()``
runs before any work and names the valid choices when a value is wrong. A Config is frozen: the parts of an
agent are built from it once, so changing a field afterwards would do nothing while being recorded as if it
had; ``override`` gives a changed copy, and ``natpg.load(path, key=value)`` continues a run with it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, NamedTuple

import numpy as np

ALGORITHMS = ("npg", "trpo", "acktr", "nac", "ppo", "vpg")
FISHERS = ("cg", "dense", "kfac", "diagonal", "empirical", "identity")
CG_PRECONDITIONERS = (None, "kfac", "diagonal")
FISHER_ESTIMATORS = (None, "sampled", "exact", "empirical")  # fisher_estimator (None: the approximation's own)
N_WORKERS = 2  # EnvConfig.n_workers' default: lowered to n_envs where there are fewer copies
STEP_LENGTHS = ("subsample", "batch")  # fvp_subsample_step_length: where the KL step measures dᵀFd
STEP_RULES = ("fixed", "adam", "kl", "linesearch", "kfac_clip", "ppo_clip")
KL_RULES = ("kl", "linesearch", "kfac_clip")  # the step rules with a KL budget δ
LR_RULES = ("fixed", "adam", "ppo_clip")  # the step rules with a learning rate α
SCHEDULES = ("constant", "linear")
CRITIC_OPTIMIZERS = ("adam", "kfac")
SAMPLERS = ("local", "processes", "ray", "workers")
NONFINITE_MODES = ("raise", "drop")  # nonfinite_env
ACTIVATIONS = ("tanh", "relu", "elu")  # the names of policies.ACTIVATIONS, which config does not import (torch)
# An evaluation episode is cut here if the environment has not ended it: above every registered time limit
# (Atari's 108k frames are 27k steps), and a bound for environments registered without one.
EVAL_MAX_EPISODE_STEPS = 100_000
# torch.manual_seed takes a 64-bit integer: room for the agent's seed offsets and its copies' seed + i
MAX_SEED = 2**62


@dataclass(frozen=True)
class EnvConfig:
    n_envs: int = 8
    """Number of environment copies stepped together by one vector environment."""
    vectorization: str = "sync"
    """'sync' steps the copies in this process; 'async' runs each copy in its own subprocess (Gymnasium);
    'multiproc' splits the copies over n_workers processes, several copies each (natpg.vector)."""
    n_workers: int = N_WORKERS
    """Worker processes of the 'multiproc' vectorization (at most n_envs; the default 2 becomes n_envs where
    there are fewer copies)."""
    normalize_obs: bool = True
    """Running mean/std normalisation of observations (saved with the model, frozen at evaluation)."""
    obs_clip: float = 10.0
    """Normalised observations are clipped to [-obs_clip, obs_clip]."""
    normalize_reward: bool = False
    """Divide rewards by the running std of the discounted return (VecNormalize-style reward scaling)."""
    reward_clip: float = 10.0
    """Scaled rewards are clipped to [-reward_clip, reward_clip]."""
    sign_rewards: bool = False
    """Train on the sign of each reward (−1, 0 or 1, before any scaling), as the Atari results of DQN, A2C, ACKTR
    and PPO did (SB3's ``AtariWrapper(clip_reward=True)``); the logged and evaluated returns stay the environment's
    own. The Atari presets set it."""
    action_mask: str | None = None
    """Discrete actions only: the info key holding the mask of allowed actions (e.g. 'action_mask' for Taxi);
    it is appended to the observation the policy reads and masked logits get probability 0. A callable
    ``f(unwrapped_env) -> array`` can be given to the Python constructor instead (recorded as '<callable>':
    pass it again to natpg.load)."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``gymnasium.make`` of every copy, e.g. ``{'continuous': True}`` for LunarLander-v3
    (JSON values: they are recorded in the checkpoint, and evaluation on the same id uses them too)."""
    info_keys: tuple[str, ...] = ()
    """Keys of the info dict the environment returns with an episode's last step (e.g. ``('is_success',)`` for
    goal environments), each a number or boolean: recorded per episode as columns of episodes.csv, and their
    mean over the last 100 episodes as ``ep_KEY_mean`` in progress.csv (SB3's Monitor ``info_keywords``)."""
    nonfinite_env: str = "raise"
    """A NaN/inf observation or reward (or one beyond float32's range): 'raise' (NonFiniteEnvError naming the step and copy) or 'drop' (end that
    copy's episode as truncated at its last finite observation, leave the transition out, reset the copy)."""


@dataclass(frozen=True)
class RolloutConfig:
    n_steps: int = 256
    """Steps per environment per update; the batch is n_envs × n_steps transitions."""


@dataclass(frozen=True)
class AdvantageConfig:
    gamma: float = 0.99
    """Discount factor γ."""
    gae_lambda: float = 0.95
    """GAE λ: 0 is one-step TD, 1 is Monte-Carlo minus the baseline."""
    normalize_advantages: bool = True
    """Standardise advantages per batch: (A − mean) / (std + 1e-8)."""


@dataclass(frozen=True)
class PolicyConfig:
    hidden: tuple = (64, 64)
    """Hidden layer sizes of the actor MLP."""
    activation: str = "tanh"
    """Hidden activation of actor and critic: 'tanh', 'relu' or 'elu'."""
    log_std_init: float = 0.0
    """Initial log standard deviation of the Gaussian policy (Box actions), in [-40, 40]."""
    action_squash: str = "clip"
    """Box actions: 'clip' (Gaussian samples clipped to the bounds when sent to the environment) or 'tanh'
    (low + (tanh(u) + 1)(high − low)/2; needs finite bounds; same Fisher and KL as the Gaussian over u)."""


@dataclass(frozen=True)
class CriticConfig:
    critic_hidden: tuple = (64, 64)
    """Hidden layer sizes of the value network."""
    critic_lr: float = 1e-3
    """Adam learning rate of the value regression."""
    critic_epochs: int = 10
    """Passes over the batch per update for the value regression."""
    critic_minibatch: int = 256
    """Minibatch size of the value regression."""
    critic_optimizer: str = "adam"
    """Value step: 'adam', or 'kfac' (ACKTR: Gauss-Newton K-FAC natural step inside a trust region)."""
    critic_max_kl: float = 0.01
    """K-FAC critic: KL budget δ_c per step of the output model N(R; V(s), σ²), σ² = mean (V − R)² at the fit's start."""
    critic_eta_max: float = 1.0
    """K-FAC critic: cap on the step length, η = min(critic_eta_max, √(2δ_c / ΔᵀF̂Δ))."""
    critic_damping: float = 0.01
    """K-FAC critic: Tikhonov damping λ of the (normalised) Gauss-Newton K-FAC matrix."""
    critic_momentum: float = 0.0
    """K-FAC critic: momentum μ of the preconditioned direction, v ← μ·v + (1 − μ)·Δ (0: none)."""
    value_clip: float = 0.0
    """PPO-style value clipping: V − V_old is clipped to ±value_clip in the loss (return units; 0: off)."""


@dataclass(frozen=True)
class CurvatureConfig:
    fisher: str = "cg"
    """How F⁻¹g is applied: 'cg', 'dense', 'kfac', 'diagonal', 'empirical', or 'identity' (vanilla gradient)."""
    damping: float = 0.1
    """Tikhonov damping λ: the solver applies (F + λI)⁻¹."""
    cg_iters: int = 10
    """Conjugate-gradient iteration cap."""
    cg_tol: float = 1e-10
    """Conjugate-gradient relative residual tolerance ‖r‖ ≤ tol·‖g‖."""
    fvp_subsample: float = 1.0
    """Fraction of the batch used for Fisher products, drawn once per update and kept for it (fisher 'cg' and
    'dense'; the other approximations use the whole batch, and reject a value below 1)."""
    fvp_subsample_step_length: str = "batch"
    """With fvp_subsample < 1: the states on which step rules measure dᵀFd for the KL step length —
    'batch' (one more product on the whole batch, so δ bounds the quadratic KL on the same states as without
    subsampling) or 'subsample' (the solver's own products, as OpenAI Baselines' TRPO; noisier steps and lower
    returns, docs/BENCHMARKS.md)."""
    cg_warm_start: bool = False
    """Start CG from the previous update's direction instead of zero."""
    cg_preconditioner: str | None = None
    """Preconditioned CG (fisher='cg' only): 'kfac' or 'diagonal', that approximation of the damped Fisher (K-FAC
    with kfac_ema_decay) sets which directions CG's few iterations reach first; the exact Fisher is still solved."""
    kfac_ema_decay: float = 0.95
    """K-FAC: decay of the factors' moving average across updates (0: each update's batch alone)."""
    kfac_refresh_every: int = 1
    """K-FAC: invert the damped factors every this many updates (the factors still average every update);
    k > 1 saves the O(in³ + out³) inversions, which dominate for wide layers (a CNN's 3137-input layer)."""
    fisher_estimator: str | None = None
    """fisher='kfac' and 'diagonal': the actions whose log-likelihood gradients build the approximation —
    'sampled' (one a ~ π(·|s) per state: the true Fisher, unbiased), 'exact' (actions integrated out through the
    output distribution's Fisher: the true Fisher's diagonal exactly; for K-FAC, R backward passes, R the
    output's dimension), or 'empirical' (the taken actions: the empirical Fisher, unbiased only while the batch
    is fresh from the current policy, and built from the gradient's own terms, docs/curvature.md). None: each
    approximation's own, K-FAC 'sampled', diagonal 'exact'."""


@dataclass(frozen=True)
class StepConfig:
    step: str = "kl"
    """Step rule: 'fixed' (θ += α·d), 'adam' (Adam on d), 'kl' (α = √(2δ / dᵀFd)), 'linesearch' (TRPO),
    'kfac_clip' (ACKTR), 'ppo_clip' (PPO)."""
    alpha: float = 0.1
    """Fixed step size α of the 'fixed' rule (and the learning rate of the first-order rules 'adam', 'ppo_clip')."""
    max_kl: float = 0.01
    """KL budget δ of the 'kl', 'linesearch' and 'kfac_clip' rules."""
    kl_schedule: str = "constant"
    """'constant' (δ = max_kl), or 'linear': each update's δ is max_kl times the fraction of the learn call's
    env steps still to come, δ_k = max_kl·(1 − s_k / S) with s_k the steps before the update and S the step
    count at which learn ends (a resumed run keeps the S it started with)."""
    lr_schedule: str = "constant"
    """'constant' (α = alpha), or 'linear': the learning rate of the 'fixed', 'adam' and 'ppo_clip' rules
    decays as kl_schedule decays δ, α_k = alpha·(1 − s_k / S) (the annealed learning rate of baselines' A2C
    and ACKTR, lrschedule='linear', and of RL Zoo's lin_ settings)."""
    backtrack_shrink: float = 0.8
    """Line search: factor by which the step shrinks after a rejected try."""
    backtrack_iters: int = 10
    """Line search: number of tries before giving up and restoring the parameters."""
    eta_max: float = 0.25
    """ACKTR ('kfac_clip'): cap η_max on the step length, η = min(η_max, √(2δ / vᵀF̂v))."""
    momentum: float = 0.9
    """ACKTR ('kfac_clip'): momentum μ of the preconditioned direction, v ← μ·v + (1 − μ)·Δ (0: none)."""
    clip_range: float = 0.2
    """PPO ('ppo_clip'): ratio clip ε of the surrogate min(r·A, clip(r, 1 − ε, 1 + ε)·A)."""
    ppo_epochs: int = 10
    """PPO: passes over the batch per update (the learning rate is ``alpha``)."""
    ppo_minibatch: int = 64
    """PPO: minibatch size of the actor's Adam steps."""
    target_kl: float = 0.0
    """PPO: stop the epochs once a minibatch's exact KL(old‖new) exceeds this, before its step (0: never)."""
    max_grad_norm: float = 0.5
    """First-order rules: 'ppo_clip' clips each minibatch gradient's norm to this, 'adam' the norm of the direction it
    is given (the gradient for VPG, F⁻¹g with a Fisher); 0: no clipping."""
    ent_coef: float = 0.0
    """Entropy bonus c: the actor's objective is the surrogate plus c·mean_b H(π_θ(·|s_b)), for the gradient, the
    line search and PPO's loss alike (every algorithm but nac, whose direction is a regression on advantages).
    H is that of the distribution the Fisher and KL are of: the Gaussian before clipping or squashing."""


@dataclass(frozen=True)
class RunConfig:
    device: str = "cpu"
    """Device of the update computations ('cpu', 'cuda[:N]', or 'auto': the GPU where there is one, decided where the
    agent is built or loaded); environments always step on the CPU."""
    torch_threads: int = 1
    """torch.set_num_threads for the process (1 is usually fastest for small networks on few cores); 0 leaves the
    process's setting as it is (natpg inside a larger program that sets its own)."""
    update_threads: int = 0
    """torch threads while the batch is prepared and the actor updated (0: torch_threads). The environments,
    in this process or in worker processes, wait for the new policy then, so on a machine with idle cores 2
    threads shorten that phase (HalfCheetah-v5, 2048 samples, 2 cores: NPG 35 → 26 ms, TRPO 25 → 19, ACKTR
    19 → 14; PPO's 64-sample minibatches gain nothing); the critic is then fitted after the actor update, not
    beside it (``critic_thread``). Rounding differs from a one-thread run's (matrix products split
    differently), so runs repeat for a given value, not across values."""
    critic_thread: bool = True
    """Fit the critic in a second thread beside the actor update (``train.CriticFit``), on the core the
    waiting environments leave idle; the numbers are bit-identical to fitting after it. It stays on where the
    actor update draws nothing from the generator the critic's shuffles share (NPG, TRPO and VPG with their
    default curvature), and turns itself off after the first update otherwise (ACKTR, PPO, Fisher
    subsampling). HalfCheetah-v5, NPG, 2048 samples, 2 cores: +10 % env-steps/s in one process and with worker
    processes. False: always after the actor update, in this thread."""
    log_interval: int = 1
    """Write a progress row every this many updates, and for the last update of each learn call (the saved
    model's; also one its callback stopped) and every update that evaluated or faulted."""
    checkpoint_every: int = 50
    """With an output directory, write a checkpoint every this many updates (0: only at the end)."""
    tensorboard: bool = True
    """Write TensorBoard events to the output directory."""
    max_consecutive_faults: int = 5
    """Stop with TrainingFault (after writing a checkpoint) once this many updates in a row were skipped for a
    non-finite gradient, direction, step, loss or parameter (each skip leaves the parameters untouched)."""
    eval_every: int = 0
    """During learn, evaluate the deterministic policy (frozen normalisation, its own environments seeded
    seed + 10000 + i) once every this many env steps (0: never): progress rows get eval/return_mean and
    eval/return_std, and with an output directory the best evaluated policy is kept in DIR/best/."""
    eval_episodes: int = 10
    """Episodes per evaluation of ``eval_every``."""


@dataclass(frozen=True)
class DistributedConfig:
    sampler: str = "local"
    """Who steps the environments: 'local' (one vector env in this process), 'processes' (the n_envs copies
    split over `workers` local worker processes, which step the next rollout while the learner fits the
    critic), 'ray' (over `workers` Ray actors) or 'workers' (the same worker code run in this process, one
    worker after the other: the reference the other two equal bit for bit). With all but 'local' the
    normaliser statistics are frozen during an iteration and updated afterwards (docs/distributed.md)."""
    workers: int = 1
    """Rollout workers of the 'processes', 'ray' and 'workers' samplers (at most n_envs); worker 0 holds the
    first copies."""
    ray_address: str | None = None
    """Ray cluster to join: None (use the Ray instance already started in this process, or start a local
    one), 'auto' (the cluster this machine belongs to, after `ray start`) or 'HOST:PORT'."""
    worker_timeout: float = 300.0
    """Seconds a Ray or process worker may take to return one rollout before it counts as failed and is
    replaced (its share of the iteration then runs again on the replacement); with vectorization='multiproc' or
    'async', seconds an environment worker may take to answer one step or reset before the run stops with an
    error."""
    worker_start_timeout: float = 600.0
    """Seconds a Ray or process worker may take to start (import natpg, build its environments; on a cluster
    also wait for a free CPU and set up its runtime environment) before it counts as failed; with
    vectorization='multiproc', seconds an environment worker may take to build its environments."""


SECTIONS = {
    "env": EnvConfig, "rollout": RolloutConfig, "advantage": AdvantageConfig, "policy": PolicyConfig,
    "critic": CriticConfig, "curvature": CurvatureConfig, "step": StepConfig, "run": RunConfig,
    "distributed": DistributedConfig,
}


# Stable-Baselines3 / sb3-contrib names a newcomer types first, and natpg's for the same thing.
FOREIGN_NAMES: dict[str, str] = {
    "learning_rate": "alpha (the step rule's rate; PPO's and VPG-Adam's learning rate) or critic_lr",
    "batch_size": "n_envs × n_steps (the batch per update), or critic_minibatch / ppo_minibatch",
    "total_timesteps": "learn(total_steps=...) / natpg train --steps",
    "n_epochs": "ppo_epochs", "n_critic_updates": "critic_epochs", "cg_max_steps": "cg_iters",
    "cg_damping": "damping", "line_search_shrinking_factor": "backtrack_shrink",
    "line_search_max_iter": "backtrack_iters", "sub_sampling_factor": "fvp_subsample (its inverse: 0.2 for 5)",
    "normalize_advantage": "normalize_advantages",
    "vf_coef": "critic_lr (the critic is fitted separately)", "verbose": "log_interval, or natpg train --no-progress",
    "policy_kwargs": "hidden (actor), critic_hidden (critic), activation ('tanh', 'relu', 'elu'), log_std_init",
    "clip_range_vf": "value_clip (in return units)", "tensorboard_log": "learn(out_dir=DIR): events in DIR/tb",
    "net_arch": "hidden (actor) and critic_hidden (critic)", "activation_fn": "activation ('tanh', 'relu' or 'elu')",
    "create_eval_env": "eval_every, eval_episodes", "clip_reward": "sign_rewards (the Atari presets set it)",
    "policy": "hidden, activation, log_std_init (the policy is built from the spaces)",
}


# Stable-Baselines3 names with nothing to set in natpg, and why.
FOREIGN_WITHOUT_EQUIVALENT: dict[str, str] = {
    "ortho_init": "natpg's layers are always initialised orthogonally (SB3's ortho_init=True)",
    "env": "an agent is built for an environment id, its first argument (natpg.NPG('Hopper-v5')), and a loaded "
           "run keeps its own; natpg.evaluate(agent, env_id) evaluates on another id with the same spaces",
    "custom_objects": "settings changed at loading are keywords of natpg.load(dir, setting=value)",
    "use_sde": "natpg has no state-dependent exploration (gSDE)", "sde_sample_freq": "natpg has no gSDE",
    "stats_window_size": "ep_return_mean is over the last 100 episodes",
}


def env_kwargs_problem(kwargs: Any) -> str | None:
    """What is wrong with ``env_kwargs`` for gymnasium.make and the checkpoint, or None."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        return f"must be a dict of keyword arguments for gymnasium.make, such as {{'continuous': True}}, got {kwargs!r}"
    if "render_mode" in kwargs:
        return "cannot set render_mode: natpg trains without rendering, and renders for videos itself (natpg eval --video)"
    try:
        json.dumps(plain_json(kwargs), allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"must hold JSON values (numbers, strings, booleans, None, lists, dicts), as the checkpoint records them: {exc}"
    return None


class FrozenDict(dict):
    """A dict setting (env_kwargs) of a frozen Config: read like a dict, refused to change like the Config."""

    def _frozen(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a Config is frozen, env_kwargs too: natpg.load(path, env_kwargs={...}) continues a run "
                        "with others")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _frozen  # type: ignore

    def __deepcopy__(self, memo: dict) -> "FrozenDict":
        return FrozenDict(copy.deepcopy(dict(self), memo))

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


def plain_json(v: Any) -> Any:
    """``v`` as JSON holds it: NumPy scalars (a sweep over np.arange gives those) as the Python values they stand
    for, tuples as lists."""
    if isinstance(v, dict):
        return {k: plain_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain_json(x) for x in v]  # a list, as JSON (and so the checkpoint) has it
    return v.item() if isinstance(v, np.generic) else v


def is_integer(v: Any) -> bool:
    """An int or a NumPy integer (np.arange gives those); a bool is not a count."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_path(v: Any) -> bool:
    """A non-empty path, as a string or an ``os.PathLike``: '' (an unset variable) names no file."""
    return isinstance(v, (str, os.PathLike)) and bool(os.fspath(v))


def is_flag(v: Any) -> bool:
    """True or False, Python's or NumPy's: not a string or a number, which would be read by its truth."""
    return isinstance(v, (bool, np.bool_))


def check_flag(name: str, value: Any) -> None:
    """A ValueError unless ``value`` is True or False: ``overwrite="no"`` would be true, and delete a run."""
    if not is_flag(value):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def whole_number(v: Any) -> Any:
    """A float that is a whole number (1e6, as step counts are often written) as an int; anything else as given."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def is_real(v: Any) -> bool:
    """An int, a float or a NumPy scalar of either; not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_ray_address(v: Any) -> bool:
    """'auto', 'HOST:PORT' or a URL ('ray://HOST:PORT'): the shapes ray.init takes, checked here so that a typo is
    refused when the agent is built rather than when Ray starts."""
    if not isinstance(v, str) or v != v.strip() or not v:
        return False
    if v == "auto":
        return True
    scheme, sep, rest = v.partition("://")
    host, colon, port = (rest if sep else v).rpartition(":")
    if sep and not (scheme.isidentifier() and rest):
        return False
    return (bool(sep) and not colon) or (bool(host) and port.isdigit() and 1 <= int(port) <= 65535)


class Rule(NamedTuple):
    """The check of one setting taken alone: ``ok(value)``, and what a valid value is (for the message)."""

    ok: Callable[[Any], bool]
    valid: str


def integer_from(low: int, valid: str | None = None, high: int | None = None) -> Rule:
    return Rule(lambda v: is_integer(v) and v >= low and (high is None or v <= high), valid or f"an integer ≥ {low}")


def finite_from(low: float, *, strict: bool) -> Rule:
    """A finite number above ``low`` (``strict``) or at least ``low``."""
    return Rule(lambda v: is_real(v) and math.isfinite(v) and (v > low if strict else v >= low),
                f"a finite number {'>' if strict else '≥'} {low:g}")


def interval(text: str) -> Rule:
    """A number in the interval written as ``text``, e.g. '[0, 1)'."""
    closed_low, closed_high = text[0] == "[", text[-1] == "]"
    low, high = (float(x) for x in text[1:-1].split(","))

    def ok(v: Any) -> bool:
        return is_real(v) and (low <= v if closed_low else low < v) and (v <= high if closed_high else v < high)

    return Rule(ok, f"in {text}")


def one_of(choices: tuple) -> Rule:
    """One of ``choices`` (strings, or None): anything else, a NumPy array too, is simply not one of them."""
    assert all(c is None or isinstance(c, str) for c in choices), choices
    return Rule(lambda v: (v is None or isinstance(v, str)) and v in choices, f"one of {list(choices)}")


MAX_THREADS = 1024
FLAG = Rule(is_flag, "True or False")
POSITIVE_INT, POSITIVE, NON_NEGATIVE = integer_from(1), finite_from(0, strict=True), finite_from(0, strict=False)
LAYER_SIZES = Rule(lambda v: isinstance(v, tuple) and all(is_integer(h) and h >= 1 for h in v),
                   "a tuple of positive integers such as (64, 64)")

# The rule of every setting taken alone, in the order of the fields; Config.validate adds the rules that relate
# settings. env_kwargs is checked by env_kwargs_problem, at its place (a test asserts nothing else is left out).
SETTING_RULES: dict[str, Rule] = {
    "n_envs": POSITIVE_INT,
    "vectorization": one_of(("sync", "async", "multiproc")),
    "n_workers": POSITIVE_INT,
    "normalize_obs": FLAG,
    "obs_clip": POSITIVE,
    "normalize_reward": FLAG,
    "reward_clip": POSITIVE,
    "sign_rewards": FLAG,
    "action_mask": Rule(lambda v: v is None or (isinstance(v, str) and v != ""),
                        "None, an info key such as 'action_mask', or (in Python) a callable"),
    "info_keys": Rule(lambda v: isinstance(v, tuple) and all(isinstance(k, str) and k for k in v)
                      and len(set(v)) == len(v) and not {"return", "length", "env_steps"} & set(v),
                      "a tuple of distinct info keys such as ('is_success',) (not 'return', 'length' or "
                      "'env_steps', episodes.csv's own columns)"),
    "nonfinite_env": one_of(NONFINITE_MODES),
    "n_steps": POSITIVE_INT,
    "gamma": interval("[0, 1)"),
    "gae_lambda": interval("[0, 1]"),
    "normalize_advantages": FLAG,
    "hidden": LAYER_SIZES,
    "activation": one_of(ACTIVATIONS),
    # σ = e^x: e^89 overflows float32 (±100 ended every update in a fault naming nothing); ±40 is far past any
    # useful σ (4e-18 to 2e17) and still admits whatever real runs (and their checkpoints) used
    "log_std_init": Rule(interval("[-40, 40]").ok, "in [-40, 40] (the initial σ = e^log_std_init, 4e-18 to 2e17)"),
    "action_squash": one_of(("clip", "tanh")),
    "critic_hidden": LAYER_SIZES,
    "critic_lr": POSITIVE,
    "critic_epochs": POSITIVE_INT,
    "critic_minibatch": POSITIVE_INT,
    "critic_optimizer": one_of(CRITIC_OPTIMIZERS),
    "critic_max_kl": POSITIVE,
    "critic_eta_max": POSITIVE,
    "critic_damping": NON_NEGATIVE,
    "critic_momentum": interval("[0, 1)"),
    "value_clip": NON_NEGATIVE,
    "fisher": one_of(FISHERS),
    "damping": NON_NEGATIVE,
    "cg_iters": POSITIVE_INT,
    "cg_tol": NON_NEGATIVE,
    "fvp_subsample": interval("(0, 1]"),
    "fvp_subsample_step_length": one_of(STEP_LENGTHS),
    "cg_warm_start": FLAG,
    "cg_preconditioner": one_of(CG_PRECONDITIONERS),
    "kfac_ema_decay": interval("[0, 1)"),
    "kfac_refresh_every": POSITIVE_INT,
    "fisher_estimator": one_of(FISHER_ESTIMATORS),
    "step": one_of(STEP_RULES),
    "alpha": POSITIVE,
    "max_kl": POSITIVE,
    "kl_schedule": one_of(SCHEDULES),
    "lr_schedule": one_of(SCHEDULES),
    "backtrack_shrink": interval("(0, 1)"),
    "backtrack_iters": POSITIVE_INT,
    "eta_max": POSITIVE,
    "momentum": interval("[0, 1)"),
    "clip_range": POSITIVE,
    "ppo_epochs": POSITIVE_INT,
    "ppo_minibatch": POSITIVE_INT,
    "target_kl": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "ent_coef": NON_NEGATIVE,
    "device": Rule(lambda v: isinstance(v, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", v) is not None,
                   "'cpu', 'cuda[:N]' or 'auto'"),
    # at most MAX_THREADS: torch.set_num_threads(10**5) kills the interpreter (a segmentation fault, no message)
    "torch_threads": integer_from(0, f"an integer from 1 to {MAX_THREADS}, or 0 to leave the process's setting as it "
                                     f"is", MAX_THREADS),
    "update_threads": integer_from(0, f"an integer from 1 to {MAX_THREADS}, or 0 for torch_threads", MAX_THREADS),
    "critic_thread": FLAG,
    "log_interval": POSITIVE_INT,
    "checkpoint_every": integer_from(0),
    "tensorboard": FLAG,
    "max_consecutive_faults": POSITIVE_INT,
    "eval_every": integer_from(0, "an integer ≥ 0 (env steps; 0: no evaluation)"),
    "eval_episodes": POSITIVE_INT,
    "sampler": one_of(SAMPLERS),
    "workers": POSITIVE_INT,
    "ray_address": Rule(lambda v: v is None or is_ray_address(v),
                        "None, 'auto', 'HOST:PORT' (a port in 1–65535) or a Ray client address 'ray://HOST:PORT'"),
    "worker_timeout": POSITIVE,
    "worker_start_timeout": POSITIVE,
}


@dataclass(frozen=True)
class Config:
    algorithm: str = "npg"
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    step: StepConfig = field(default_factory=StepConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @staticmethod
    def field_index() -> dict[str, str]:
        """Flat field name → section name."""
        return {f.name: sec for sec, cls in SECTIONS.items() for f in fields(cls)}

    def override(self, **overrides: Any) -> "Config":
        """A copy with flat-named fields replaced; an unknown name is a ValueError listing the valid ones."""
        index = self.field_index()
        unknown = sorted(k for k in overrides if k not in index)
        if unknown:
            foreign = {**FOREIGN_NAMES, **FOREIGN_WITHOUT_EQUIVALENT}
            # a typo is close (max_kll, gama, n_step); 'env' is not n_envs, nor 'ortho_init' log_std_init
            near = {k: m[0] for k in unknown
                    if k not in foreign and (m := difflib.get_close_matches(k, index, n=1, cutoff=0.7))}
            hints = [f"{k!r} is Stable-Baselines3's name: natpg's is {FOREIGN_NAMES[k]}" if k in FOREIGN_NAMES
                     else f"{k!r} is Stable-Baselines3's, with no natpg setting: {FOREIGN_WITHOUT_EQUIVALENT[k]}"
                     for k in unknown if k in foreign]
            if near:
                hints.insert(0, "did you mean " + ", ".join(f"{m!r} for {k!r}" for k, m in near.items()) + "?")
            hint = f" ({'; '.join(hints)})" if hints else ""
            listing = "" if all(k in foreign or k in near for k in unknown) else f"; valid settings: {sorted(index)}"
            raise ValueError(f"unknown setting(s) {unknown}{hint}{listing}")
        cfg = self.to_dict()
        for k, v in overrides.items():
            current = cfg[index[k]][k]
            counted = isinstance(current, int) and not isinstance(current, bool)
            cfg[index[k]][k] = whole_number(v) if counted else v  # eval_every=1e5 as a count
        return Config.from_dict(cfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Config":
        d = dict(d)
        unknown = sorted(set(d) - {"algorithm", *SECTIONS})
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; valid: {['algorithm', *SECTIONS]}")
        kwargs: dict[str, Any] = {"algorithm": d.get("algorithm", "npg")}
        for sec, cls in SECTIONS.items():
            values = dict(d.get(sec, {}))
            valid = {f.name for f in fields(cls)}
            bad = sorted(set(values) - valid)
            if bad:
                raise ValueError(f"unknown setting(s) {bad} in section {sec!r}; valid: {sorted(valid)}")
            for k in ("hidden", "critic_hidden", "info_keys"):
                if isinstance(values.get(k), list):
                    values[k] = tuple(values[k])
            kwargs[sec] = cls(**values)
        return Config(**kwargs)

    def validate(self) -> "Config":
        """Check every value; raise one ValueError naming what is wrong and what is valid."""
        e, d = self.env, self.distributed
        problems: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        algorithm_ok = isinstance(self.algorithm, str) and self.algorithm in ALGORITHMS
        need(algorithm_ok, f"algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        invalid = set()  # the settings whose own rule fails: the rules that relate settings leave them out
        for name, section in self.field_index().items():
            value = getattr(getattr(self, section), name)
            if name == "env_kwargs":
                problem = env_kwargs_problem(value)
                problem = problem and f"env_kwargs {problem}"
            else:
                rule = SETTING_RULES[name]
                problem = None if rule.ok(value) else f"{name} must be {rule.valid}, got {value!r}"
            if problem:
                invalid.add(name)
                problems.append(problem)

        def relate(*names: str) -> bool:  # all of these are valid alone
            return not invalid.intersection(names)

        if relate("vectorization", "n_workers", "n_envs") and e.vectorization == "multiproc" and e.n_workers != N_WORKERS:
            need(e.n_workers <= e.n_envs, f"n_workers ({e.n_workers}) must be at most n_envs ({e.n_envs}) with "
                                          f"vectorization='multiproc': each process steps at least one copy")
        if relate("nonfinite_env", "vectorization"):
            need(not (e.nonfinite_env == "drop" and e.vectorization == "multiproc"),
                 "nonfinite_env='drop' needs vectorization 'sync' or 'async' (it resets single copies)")
        if relate("workers", "n_envs"):
            need(d.workers <= e.n_envs, f"workers ({d.workers}) must be at most n_envs ({e.n_envs}): each worker "
                                        f"steps at least one environment copy")
        if relate("workers", "sampler"):
            need(d.workers == 1 or d.sampler != "local",
                 f"workers={d.workers} needs sampler='processes' or 'ray' (or 'workers', their in-process "
                 f"reference)")
        if relate("ray_address", "sampler"):
            need(d.ray_address is None or d.sampler == "ray", "ray_address needs sampler='ray'")
        if relate("sampler", "vectorization"):
            need(d.sampler == "local" or e.vectorization == "sync",
                 f"vectorization={e.vectorization!r} applies to sampler='local' only: each rollout worker steps its "
                 f"copies in its own process")
        if self.algorithm == "nac" and relate("fisher"):
            need(self.curvature.fisher == "empirical",
                 f"nac's direction is the compatible critic's least-squares weights, i.e. the empirical Fisher solve: "
                 f"fisher must be 'empirical', got {self.curvature.fisher!r}")
        if self.algorithm == "nac" and relate("step"):
            need(self.step.step != "ppo_clip", "nac's direction is the compatible critic's least-squares weights, "
                 "which step='ppo_clip' would replace by PPO's clipped objective: for that, use ppo")
        if algorithm_ok and relate("step", "fisher"):  # what unread_because reads
            problems += [msg for key in REFUSED_WHEN_UNREAD if key not in invalid if (msg := self.refusal(key))]
        if problems:
            raise ValueError("invalid settings:\n  " + "\n  ".join(problems))
        self._plain_numbers()
        return self

    def get(self, key: str) -> Any:
        """The value of the flat-named setting ``key``."""
        return getattr(getattr(self, self.field_index()[key]), key)

    def refusal(self, key: str, action_space_type: str | None = None) -> str | None:
        """The error for a changed value of setting ``key`` that this run would not read, or None."""
        value, default = self.get(key), Config().get(key)
        why = unread_because(self, key, action_space_type) if value != default else None
        return why and f"{key}={value!r} would not be read: {why} (leave it at its default, {default!r}){UNREAD_HINTS.get(key, '')}"

    def unread_refused_defaults(self, action_space_type: str | None = None, keep=()) -> dict[str, Any]:
        """The refused settings (REFUSED_WHEN_UNREAD) outside ``keep`` that this run would not read, each with
        the default to put back: where the value is not the user's doing (a preset's, an old checkpoint's)."""
        return {key: Config().get(key) for key in REFUSED_WHEN_UNREAD
                if key not in keep and self.refusal(key, action_space_type)}

    def _plain_numbers(self) -> None:
        """NumPy scalars (accepted above) become the int or float they stand for, so config.json and every
        computation see exactly what the same value typed as a Python number gives."""

        def plain(v: Any) -> Any:
            if isinstance(v, bool) or type(v) in (int, float):
                return v
            if isinstance(v, np.bool_):
                return bool(v)
            if isinstance(v, numbers.Integral):
                return int(v)
            if isinstance(v, numbers.Real):
                return float(v)
            if isinstance(v, tuple):
                return tuple(plain(x) for x in v)
            if isinstance(v, dict):
                return FrozenDict(plain_json(v))
            return v

        for sec in SECTIONS:
            section = getattr(self, sec)
            for f in fields(section):
                object.__setattr__(section, f.name, plain(getattr(section, f.name)))  # frozen: once, here

    @property
    def batch_size(self) -> int:
        return self.env.n_envs * self.rollout.n_steps


# Changed values of these settings are refused, not warned of, where the run would not read them: each looks
# like it does something it does not (target_kl is sb3-contrib TRPO's name for the KL budget).
REFUSED_WHEN_UNREAD = ("fvp_subsample", "cg_preconditioner", "fisher_estimator", "kl_schedule", "lr_schedule",
                       "target_kl", "ent_coef", "value_clip", "action_squash")
UNREAD_HINTS = {"target_kl": ". The KL budget of NPG, TRPO and ACKTR (sb3-contrib TRPO's target_kl) is max_kl",
                "ent_coef": ". For an entropy bonus with a natural gradient use npg, e.g. with fisher='empirical'"}
CURVATURE_SETTINGS = ("fisher", "damping", "cg_iters", "cg_tol", "cg_warm_start", "cg_preconditioner", "fvp_subsample",
                      "fvp_subsample_step_length", "kfac_ema_decay", "kfac_refresh_every", "fisher_estimator")
READ_BY_STEP = {"max_kl": KL_RULES, "kl_schedule": KL_RULES, "backtrack_shrink": ("linesearch",),
                "backtrack_iters": ("linesearch",), "eta_max": ("kfac_clip",), "momentum": ("kfac_clip",),
                "alpha": LR_RULES, "lr_schedule": LR_RULES, "max_grad_norm": ("adam", "ppo_clip"),
                "clip_range": ("ppo_clip",), "ppo_epochs": ("ppo_clip",), "ppo_minibatch": ("ppo_clip",),
                "target_kl": ("ppo_clip",)}


def unread_because(cfg: Config, key: str, action_space_type: str | None = None,
                   image: bool | None = None) -> str | None:
    """Why a run with ``cfg`` never reads setting ``key`` (the parts that read it are not in the run), or None when
    it does or when that depends on spaces not given: the action space's type name ('Box', 'Discrete', ...), and
    ``image``, whether the observations are images (read by the Nature-CNN).

    The one record of which part reads which setting, mirroring what algorithms.make_step_rule,
    make_actor_update and make_curvature hand each part: Config.validate refuses a changed value of the
    REFUSED_WHEN_UNREAD settings, presets.config_for warns of the others, and checkpoints written before a
    refusal load with the setting put back to its default (agent.load)."""
    step, fisher = cfg.step.step, cfg.curvature.fisher
    if key in READ_BY_STEP and step not in READ_BY_STEP[key]:
        return f"read by step {' / '.join(READ_BY_STEP[key])}; this run's step is {step!r}"
    if key in CURVATURE_SETTINGS and step == "ppo_clip":
        return "PPO's clipped objective uses no Fisher"
    if key in ("cg_iters", "cg_tol") and fisher not in ("cg", "empirical"):
        return f"read by fisher='cg' and 'empirical'; this run's fisher is {fisher!r}"
    if key in ("cg_iters", "cg_tol") and cfg.algorithm == "nac":
        return "nac solves its compatible least squares directly, without conjugate gradient"
    if key in ("cg_warm_start", "cg_preconditioner") and fisher != "cg":
        return f"read by fisher='cg'; this run's fisher is {fisher!r}"
    if key in ("fvp_subsample", "fvp_subsample_step_length") and fisher not in ("cg", "dense"):
        return f"subsamples the Fisher-vector products of fisher='cg' or 'dense'; this run's fisher is {fisher!r}"
    if key == "kfac_refresh_every" and fisher != "kfac":
        return f"read by fisher='kfac'; this run's fisher is {fisher!r}"
    if key == "fisher_estimator" and fisher not in ("kfac", "diagonal"):
        return f"read by fisher='kfac' and 'diagonal'; this run's fisher is {fisher!r}"
    if key == "kfac_ema_decay" and fisher != "kfac" and cfg.curvature.cg_preconditioner != "kfac":
        return f"read by fisher='kfac' and cg_preconditioner='kfac'; this run's fisher is {fisher!r}"
    if key == "n_workers" and cfg.env.vectorization != "multiproc":
        return f"read by vectorization='multiproc'; this run's vectorization is {cfg.env.vectorization!r}"
    if key == "damping" and fisher == "identity":
        return "the identity (the plain gradient) is not damped"
    if key == "ent_coef" and cfg.algorithm == "nac":
        return "nac's direction is the compatible critic's least-squares fit of the advantages, which has no entropy term"
    if key in ("value_clip", "critic_lr") and cfg.critic.critic_optimizer != "adam":
        return f"read by critic_optimizer='adam'; this run's critic_optimizer is {cfg.critic.critic_optimizer!r}"
    if key in ("critic_max_kl", "critic_eta_max", "critic_damping", "critic_momentum") and \
            cfg.critic.critic_optimizer != "kfac":
        return f"read by critic_optimizer='kfac'; this run's critic_optimizer is {cfg.critic.critic_optimizer!r}"
    if key == "action_squash" and action_space_type not in (None, "Box"):
        return f"squashes Box actions into their bounds; this run's action space is a {action_space_type}"
    if key == "log_std_init" and action_space_type not in (None, "Box"):
        return (f"the Gaussian policy's starting log σ, for Box actions; this run's action space is a "
                f"{action_space_type}")
    if key in ("hidden", "critic_hidden", "activation") and image:
        return "image observations get the Nature-CNN torso, whatever the MLP settings say"
    if key in ("normalize_obs", "obs_clip") and image:
        return "images are scaled by 1/255 inside the CNN, not normalised by running statistics"
    if key == "obs_clip" and not cfg.env.normalize_obs:
        return "clips normalised observations; this run's normalize_obs is False"
    if key == "reward_clip" and not cfg.env.normalize_reward:
        return "clips scaled rewards; this run's normalize_reward is False"
    if key in ("worker_timeout", "worker_start_timeout") and cfg.distributed.sampler not in ("processes", "ray"):
        engines = ("multiproc", "async") if key == "worker_timeout" else ("multiproc",)  # 'async' starts untimed
        if cfg.env.vectorization not in engines:
            return (f"read by sampler='processes' and 'ray', and by vectorization="
                    f"{' and '.join(repr(e) for e in engines)}; this run's sampler is {cfg.distributed.sampler!r}, "
                    f"its vectorization {cfg.env.vectorization!r}")
    if key == "eval_episodes" and not cfg.run.eval_every:
        return "read by the periodic evaluation; this run's eval_every is 0"
    for minibatch, section in (("ppo_minibatch", cfg.step), ("critic_minibatch", cfg.critic)):
        if key == minibatch and getattr(section, key) > cfg.batch_size:  # any value ≥ the batch does the same
            return (f"larger than the batch, n_envs × n_steps = {cfg.batch_size}: each minibatch is the whole "
                    f"batch, whatever its value")
    if key == "fvp_subsample_step_length" and cfg.curvature.fvp_subsample >= 1.0:
        return "where the KL step of a Fisher subsample is measured; this run's fvp_subsample is 1, the whole batch"
    return None
