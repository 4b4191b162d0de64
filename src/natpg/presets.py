"""Presets and the settings of a run: the algorithm's composition, its family's preset (classic control, MuJoCo,
Atari), the environment's own, then the user's overrides — each value's source can be shown
(``setting_sources``, ``natpg config``). Why each preset value is what it is: docs/algorithms.md and, for the
MuJoCo ones, the docs/BENCHMARKS.md sections the comments name."""

from __future__ import annotations

from typing import Any

from .config import REFUSED_WHEN_UNREAD, Config, unread_because
from .envs import env_family
from .errors import warn

# Presets: algorithm defaults, then per environment family. Sources are cited in docs/algorithms.md.
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "npg": {"fisher": "cg", "step": "kl", "max_kl": 0.01},
    "trpo": {"fisher": "cg", "step": "linesearch", "max_kl": 0.01},
    "acktr": {"fisher": "kfac", "step": "kfac_clip", "max_kl": 0.005, "eta_max": 3.0, "momentum": 0.9,
              "damping": 0.01, "kfac_ema_decay": 0.5, "critic_optimizer": "kfac"},
    "vpg": {"fisher": "identity", "step": "fixed", "alpha": 0.1},
    "nac": {"fisher": "empirical", "step": "kl", "max_kl": 0.01, "damping": 0.01},
    "ppo": {"step": "ppo_clip", "alpha": 3e-4, "clip_range": 0.2, "ppo_epochs": 10, "ppo_minibatch": 64},
}
FAMILY_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("npg", "classic"): {"n_envs": 8, "n_steps": 256, "max_kl": 0.02, "damping": 0.1},
    ("nac", "classic"): {"n_envs": 8, "n_steps": 128, "max_kl": 0.02},  # the N×N Gram costs N²P: N = 1024
    ("npg", "mujoco"): {"n_envs": 8, "n_steps": 256, "max_kl": 0.02, "damping": 0.1, "normalize_reward": True},
    # TRPO, ACKTR, VPG, PPO: see docs/algorithms.md for where each value comes from.
    ("trpo", "classic"): {"n_envs": 8, "n_steps": 256, "max_kl": 0.01, "damping": 0.1},
    ("trpo", "mujoco"): {"n_envs": 8, "n_steps": 128, "max_kl": 0.01, "damping": 0.1, "cg_iters": 10,
                         "critic_epochs": 20, "critic_minibatch": 128, "normalize_reward": True},
    ("acktr", "classic"): {"n_envs": 8, "n_steps": 256},
    ("acktr", "mujoco"): {"n_envs": 8, "n_steps": 256, "gae_lambda": 0.97, "max_kl": 0.002, "normalize_reward": True},
    ("vpg", "classic"): {"n_envs": 8, "n_steps": 256},
    ("vpg", "mujoco"): {"n_envs": 8, "n_steps": 512, "step": "adam", "alpha": 3e-4, "gae_lambda": 0.97,
                        "critic_epochs": 80, "critic_minibatch": 4096, "normalize_reward": True},
    ("ppo", "classic"): {"n_envs": 8, "n_steps": 128, "alpha": 1e-3, "ppo_minibatch": 256, "gamma": 0.98,
                         "gae_lambda": 0.8, "critic_minibatch": 256},
    ("ppo", "mujoco"): {"n_envs": 8, "n_steps": 256, "alpha": 3e-4, "ppo_minibatch": 64, "critic_minibatch": 64,
                        "normalize_reward": True},
    # Atari (family 'atari', ALE ids; CNN policy and critic): from the papers' and RL Zoo's settings, not yet
    # measured here (docs/algorithms.md), with the rewards' sign as those papers trained on. ACKTR's K-FAC critic
    # covers MLPs only, so the CNN critic uses Adam.
    ("npg", "atari"): {"n_envs": 16, "n_steps": 128, "max_kl": 0.01, "damping": 0.1, "sign_rewards": True},
    ("trpo", "atari"): {"n_envs": 16, "n_steps": 128, "max_kl": 0.01, "damping": 0.1, "sign_rewards": True},
    ("acktr", "atari"): {"n_envs": 16, "n_steps": 20, "gae_lambda": 1.0, "max_kl": 0.0005, "critic_optimizer": "adam",
                         "sign_rewards": True},
    ("ppo", "atari"): {"n_envs": 8, "n_steps": 128, "alpha": 2.5e-4, "clip_range": 0.1, "ppo_epochs": 4,
                       "ppo_minibatch": 256, "critic_lr": 2.5e-4, "critic_epochs": 4, "critic_minibatch": 256,
                       "sign_rewards": True},
    ("vpg", "atari"): {"sign_rewards": True}, ("nac", "atari"): {"sign_rewards": True},
}
# Tuned for one environment (RL Zoo style), applied over the family preset.
ENV_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    # NPG there with TRPO's settings of stops 1–42 (γ 0.9; the classic family's γ 0.99 learns in 3× the steps): at
    # 300k, 15 of 16 seeds above −300, against 12 of 16 with the classic preset (docs/algorithms.md).
    ("npg", "Pendulum-v1"): {"gamma": 0.9, "n_envs": 4, "n_steps": 256, "max_kl": 0.02, "critic_epochs": 20,
                             "normalize_reward": True},
    # δ decaying to 0 by the end of the run: at 300k, 16 of 16 seeds above −300, against 13 of 16 with a constant δ,
    # whose evaluated policy swings between a good and a failed swing-up late in the run (docs/algorithms.md).
    ("trpo", "Pendulum-v1"): {"gamma": 0.9, "n_envs": 4, "n_steps": 256, "max_kl": 0.02, "kl_schedule": "linear",
                              "critic_epochs": 20, "normalize_reward": True},
    # ACKTR there with σ e^−0.5 and no momentum: at 300k, 15 of 16 seeds above −300 (the last at −308); with σ 1 and
    # momentum 0.9, 5 of 8 at 100k and 3 of 8 at 200k, its evaluated policy swinging (docs/algorithms.md).
    ("acktr", "Pendulum-v1"): {"gamma": 0.9, "n_envs": 4, "n_steps": 256, "normalize_reward": True,
                               "log_std_init": -0.5, "momentum": 0.0},
    # A rate decaying to 0: every seed of 0–11 above −300 at 1M, one in six left on a swing with a constant rate.
    ("vpg", "Pendulum-v1"): {"gamma": 0.9, "gae_lambda": 0.9, "n_envs": 8, "n_steps": 64, "step": "adam",
                             "alpha": 3e-3, "lr_schedule": "linear", "hidden": (32, 32), "activation": "elu",
                             "log_std_init": -0.5, "critic_epochs": 20, "normalize_reward": True},
    # A decaying rate and 20 critic passes (stop 27: at 100k, 5 of 24 seeds below −300 against 9); the classic
    # family's γ 0.98, not RL Zoo's 0.9, which RL Zoo pairs with state-dependent exploration (stop 44: at 100k, 2 of
    # 48 seeds below −300 against 8 of 24; at 200k none of 48). docs/algorithms.md, "Stop 44: PPO's Pendulum …".
    ("ppo", "Pendulum-v1"): {"gae_lambda": 0.95, "n_envs": 8, "n_steps": 128, "alpha": 2e-3,
                             "lr_schedule": "linear", "target_kl": 0.02, "ppo_minibatch": 128, "critic_epochs": 20,
                             "critic_minibatch": 128, "normalize_reward": True},
    # Swimmer's forward reward pays off over hundreds of steps: γ 0.99 learns only to wriggle (RL Zoo: γ 0.9999). GAE
    # λ 0.99 gets every seed off the 80–160 plateau; for ACKTR also K-FAC damping 0.3 and no momentum (1M, 5 seeds:
    # 351 → 359.1 ± 1.6); for NPG δ 0.01 and a 20 × 128 critic fit (359.6 ± 1.7), for TRPO 8 × 256 steps (360.5 ±
    # 2.4). BENCHMARKS.md, "GAE λ 0.99 for NPG and TRPO on Swimmer-v5", "ACKTR on Swimmer-v5: …".
    ("acktr", "Swimmer-v5"): {"gamma": 0.9999, "gae_lambda": 0.99, "damping": 0.3, "momentum": 0.0},
    ("npg", "Swimmer-v5"): {"gamma": 0.9999, "gae_lambda": 0.99, "max_kl": 0.01, "critic_epochs": 20,
                            "critic_minibatch": 128},
    ("trpo", "Swimmer-v5"): {"gamma": 0.9999, "gae_lambda": 0.99, "n_steps": 256},
    # Ant: σ = 1 noise on 8 actions costs more than staying alive pays, so a small starting σ; NPG and TRPO then take
    # K-FAC's F⁻¹ from each batch's own factors with δ 0.04 (1M, seeds 0–4: NPG 2648 with CG's F⁻¹ → 4351 ± 887, TRPO
    # 2706 → 3914 ± 675). BENCHMARKS.md, "NPG on Ant-v5 with K-FAC's F⁻¹", "What K-FAC changes on Ant-v5".
    **{(algo, "Ant-v5"): {"fisher": "kfac", "log_std_init": -2.0, "max_kl": 0.04, "damping": 0.01,
                          "kfac_ema_decay": 0.0} for algo in ("npg", "trpo")},
    # ACKTR: an Adam critic (2168 → 2721), σ e^−2 (3419), twice the family's δ (3807 ± 223 on seeds 0–4, level over
    # ten). BENCHMARKS.md, "ACKTR with an Adam critic on Ant-v5" and the two sections after it.
    ("acktr", "Ant-v5"): {"log_std_init": -2.0, "critic_optimizer": "adam", "max_kl": 0.004},
    # HalfCheetah with σ = 1 settles, on 3 seeds in 5, into a 1.6–1.9k gait; σ e^−0.5 (Tianshou's init): NPG 2929 →
    # 6031 ± 145; ACKTR also fits its critic by Adam (5202 → 5710), TRPO also takes δ 0.02 (4606 → 5116; only here:
    # elsewhere level or lower). BENCHMARKS.md, "HalfCheetah-v5 at 1M env steps with the σ preset", "TRPO with δ
    # 0.02".
    ("npg", "HalfCheetah-v5"): {"log_std_init": -0.5},
    ("acktr", "HalfCheetah-v5"): {"log_std_init": -0.5, "critic_optimizer": "adam"},
    ("trpo", "HalfCheetah-v5"): {"log_std_init": -0.5, "max_kl": 0.02},
    # Walker2d, the same σ: NPG 4106 → 4967 ± 1862, TRPO 3990 → 4408; ACKTR only with an Adam critic (its K-FAC critic
    # fits each batch's noise): 3893 → 4488 → 4687 ± 367. BENCHMARKS.md, "Walker2d-v5 at 1M env steps: σ starting at
    # e^−0.5 against 1", "ACKTR on Walker2d-v5 with an Adam critic" and the section after it.
    **{(algo, "Walker2d-v5"): {"log_std_init": -0.5} for algo in ("npg", "trpo")},
    ("acktr", "Walker2d-v5"): {"critic_optimizer": "adam", "log_std_init": -0.5},
    # Hopper: ACKTR's evaluated policy swings between 1.5k and 3.7k with the family's δ, half of it keeps it near 3.6k
    # (2495 → 3449 ± 324); NPG with δ 0.01 and σ e^−0.25, 3454 ± 40. BENCHMARKS.md, "ACKTR on Hopper-v5 with half the
    # KL budget", "NPG on Hopper-v5 with a smaller starting σ".
    ("acktr", "Hopper-v5"): {"max_kl": 0.001},
    ("npg", "Hopper-v5"): {"max_kl": 0.01, "log_std_init": -0.25},
}


def preset_layers(algorithm: str, family: str, env_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The preset layers in the order they apply, each named: algorithm, family, environment."""
    if algorithm not in ALGORITHM_DEFAULTS:
        raise ValueError(f"unknown algorithm {algorithm!r}; valid: {sorted(ALGORITHM_DEFAULTS)}")
    return [(f"{algorithm} preset", ALGORITHM_DEFAULTS[algorithm]),
            (f"{algorithm} {family} preset", FAMILY_DEFAULTS.get((algorithm, family), {})),
            (f"{algorithm} {env_id} preset", ENV_DEFAULTS.get((algorithm, env_id), {}))]


def default_config(algorithm: str, family: str, env_id: str | None = None) -> Config:
    """The algorithm's composition, then the family preset, then the environment's own preset (if any)."""
    merged: dict[str, Any] = {}
    for _, values in preset_layers(algorithm, family, env_id):
        merged |= values
    return Config(algorithm=algorithm).override(**merged)


def config_for(algorithm: str, env_id: str, overrides: dict[str, Any] | None = None, warn: bool = True) -> Config:
    """The validated settings of one run: the presets for ``env_id`` (its family's, then its own), then
    ``overrides``. Raises ValueError naming every invalid setting; warns (``warn``; an agent does, once it knows
    the spaces) of every override that changes a setting the run would not read (a warning, not an error: one
    dict of settings shared by several algorithms is a fair way to run a sweep; an override equal to the preset's
    value, as a whole config.json holds, changes nothing)."""
    preset = default_config(algorithm, env_family(env_id), env_id)
    config = preset.override(**(overrides or {}))
    config = config.override(**inert_preset_values(preset, config, overrides or {})).validate()
    if warn:
        warn_unread(config, env_id, overrides or {})
    return config


def warn_unread(config: Config, env_id: str, overrides: dict[str, Any], spaces: tuple | None = None,
                reference: Config | None = None) -> None:
    """Warn of the ``overrides`` that change a preset's value (or ``reference``'s: a loaded run's settings) of a
    setting the run would not read (given the (observation, action) ``spaces``, also of those they leave unread:
    ``unread_because``)."""
    action_space_type = image = None
    if spaces is not None:
        from .policies import input_layout

        action_space_type = type(spaces[1]).__name__
        image = input_layout(*spaces, config.env.action_mask is not None)[2] is not None
    preset = reference or default_config(config.algorithm, env_family(env_id), env_id)
    unused = [f"{key} ({why})" for key in changed_by(preset, overrides) if key not in REFUSED_WHEN_UNREAD
              and (why := unread_because(config, key, action_space_type, image))]  # those are refused, not warned of
    if unused:
        warn(f"{config.algorithm} on {env_id} does not read these settings: {'; '.join(unused)}",
             UserWarning)


def changed_by(preset: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change the preset's value (a whole config.json repeats most of them, tuples as lists)."""
    as_list = lambda v: [as_list(x) for x in v] if isinstance(v, (tuple, list)) else v  # noqa: E731
    return {k: v for k, v in overrides.items() if as_list(preset.get(k)) != as_list(v)}


def inert_preset_values(preset: Config, config: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """The refused settings (config.REFUSED_WHEN_UNREAD) whose preset value ``config`` — the preset with the
    ``overrides`` — would not read, each with its default to go back to: PPO's target_kl after step='kl' is not the
    user's mistake, even where the user repeats it, so it is reset instead of refused."""
    return config.unread_refused_defaults(keep=changed_by(preset, overrides))


def setting_sources(algorithm: str, family: str, env_id: str | None = None,
                    overrides: dict[str, Any] | None = None, files: dict[str, dict[str, Any]] | None = None
                    ) -> dict[str, str]:
    """For each flat setting, the last layer that set it: 'default' (natpg.Config), a preset layer, a settings
    file (by its name, before the user's overrides), or 'user'."""
    sources = dict.fromkeys(Config.field_index(), "default")
    for name, values in [*preset_layers(algorithm, family, env_id), *(files or {}).items(), ("user", overrides or {})]:
        sources |= dict.fromkeys(values, name)
    return sources
