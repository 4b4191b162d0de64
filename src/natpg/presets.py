"""Presets and the settings of a run: the algorithm's composition, its family's preset (classic control, MuJoCo,
Atari), the environment's own, then the user's overrides — each value's source can be shown
(``setting_sources``, ``natpg config``). Why each preset value is what it is: docs/algorithms.md and, for the
MuJoCo ones, the docs/BENCHMARKS.md sections the comments name."""

from __future__ import annotations

import warnings
from typing import Any

from .config import REFUSED_WHEN_UNREAD, Config, unread_because
from .envs import env_family

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
    # measured here (docs/algorithms.md). ACKTR's K-FAC critic covers MLPs only, so the CNN critic uses Adam.
    ("npg", "atari"): {"n_envs": 16, "n_steps": 128, "max_kl": 0.01, "damping": 0.1},
    ("trpo", "atari"): {"n_envs": 16, "n_steps": 128, "max_kl": 0.01, "damping": 0.1},
    ("acktr", "atari"): {"n_envs": 16, "n_steps": 20, "gae_lambda": 1.0, "max_kl": 0.0005, "critic_optimizer": "adam"},
    ("ppo", "atari"): {"n_envs": 8, "n_steps": 128, "alpha": 2.5e-4, "clip_range": 0.1, "ppo_epochs": 4,
                       "ppo_minibatch": 256, "critic_lr": 2.5e-4, "critic_epochs": 4, "critic_minibatch": 256},
}
# Tuned for one environment (RL Zoo style), applied over the family preset.
ENV_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("trpo", "Pendulum-v1"): {"gamma": 0.9, "n_envs": 4, "n_steps": 256, "max_kl": 0.02, "critic_epochs": 20,
                              "normalize_reward": True},
    ("acktr", "Pendulum-v1"): {"gamma": 0.9, "n_envs": 4, "n_steps": 256, "normalize_reward": True},
    # VPG's Adam rate decays to 0 over the run: with it every seed of 0–11 ends above −300 at 1M steps; with a
    # constant rate one seed in six ends on a swing of the deterministic policy (docs/algorithms.md).
    ("vpg", "Pendulum-v1"): {"gamma": 0.9, "gae_lambda": 0.9, "n_envs": 8, "n_steps": 64, "step": "adam",
                             "alpha": 3e-3, "lr_schedule": "linear", "hidden": (32, 32), "activation": "elu",
                             "log_std_init": -0.5, "critic_epochs": 20, "normalize_reward": True},
    # PPO's rate decays to 0 and its critic takes 20 passes: at 100k steps, seeds 0–23, 5 of 24 end below −300
    # (mean −273) against 9 of 24 (−353) with a constant rate and 10 passes (docs/algorithms.md).
    ("ppo", "Pendulum-v1"): {"gamma": 0.9, "gae_lambda": 0.95, "n_envs": 8, "n_steps": 128, "alpha": 2e-3,
                             "lr_schedule": "linear", "target_kl": 0.02, "ppo_minibatch": 128, "critic_epochs": 20,
                             "critic_minibatch": 128, "normalize_reward": True},
    # Swimmer's reward for moving forward pays off over hundreds of steps: γ 0.99 learns only to wriggle
    # (NPG: 40 at 1M steps, docs/BENCHMARKS.md); RL Zoo's TRPO Swimmer preset uses γ 0.9999.
    # ACKTR there also takes GAE λ 0.99 (the family's 0.97): with γ 0.9999 the advantage leans less on a critic
    # that must see hundreds of steps ahead. 1M steps, 5 seeds: 351 ± 7 → 355.9 ± 1.5, every seed at 330 by
    # 200k–500k steps (0.97: 200k–1M), evaluations after 500k 354 on average against 342 (docs/BENCHMARKS.md).
    # K-FAC damping 0.3 (ACKTR's 0.01) then lifts every seed's evaluations from 800k (357.1 on average against
    # 354.6) and gets each to 330 by 200k–300k: 357.3 ± 1.4. Without momentum (ACKTR's 0.9) each step follows
    # its own batch's K-FAC direction: 359.1 ± 1.6 (ten seeds 358.8 ± 1.2 against 358.0 ± 2.0; docs/BENCHMARKS.md).
    ("acktr", "Swimmer-v5"): {"gamma": 0.9999, "gae_lambda": 0.99, "damping": 0.3, "momentum": 0.0},
    # NPG and TRPO likewise, both at δ 0.01 on 8 × 256 steps with a 20 × 128 critic fit (TRPO's family). With
    # λ 0.95 some seeds settle by 200k into a slow 80–160 gait they never leave (1M, 5 seeds: NPG 290 ± 82, TRPO
    # 216 ± 134). NPG with λ 0.99 alone left one seed of five there, with δ 0.01 none: 359.8 ± 1.9 (ten seeds
    # 343 ± 40), with TRPO's critic fit too 359.6 ± 1.7 (ten 356 ± 10); TRPO with λ 0.99 on its family's 8 × 128
    # none, but slowly (322 ± 25), on 8 × 256 360.5 ± 2.4 (ten 360.4 ± 2.1; docs/BENCHMARKS.md).
    ("npg", "Swimmer-v5"): {"gamma": 0.9999, "gae_lambda": 0.99, "max_kl": 0.01, "critic_epochs": 20,
                            "critic_minibatch": 128},
    ("trpo", "Swimmer-v5"): {"gamma": 0.9999, "gae_lambda": 0.99, "n_steps": 256},
    # Ant pays 1 per step for staying alive and 0.5·Σa² for control: σ = 1 noise on 8 actions costs more than
    # that, so with log_std_init 0 the return falls with every step and NPG learns to fall over (train return
    # −29 at 300k steps); σ = e^−1 keeps living worth it (676 at 300k, docs/BENCHMARKS.md).
    # NPG there then takes K-FAC's F⁻¹ (ACKTR's curvature settings: damping 0.01, factor average 0.5) with σ e^−2 and
    # δ 0.04: 1M, seeds 0–4, 3926 ± 509, against the exact Fisher by CG's 2648 ± 764 (σ e^−1, δ 0.02)
    # and 2629, 2773 on seeds 0, 1 with the same σ and δ (docs/BENCHMARKS.md "NPG on Ant-v5 with K-FAC's F⁻¹").
    # Each batch's own factors (no average over batches) then: seeds 0–4 4351 ± 887, seven seeds (held-out 5, 6: 3095,
    # 4294) 4164 ± 864 against the average's 3928 ± 639; TRPO likewise 3979 ± 579 against 3599 ± 709. Neither
    # resolved alone, both ahead on the mean (docs/BENCHMARKS.md "What K-FAC changes on Ant-v5"). NPG and TRPO
    # share the preset below.
    # TRPO there starts σ at e^−2: 1M, seeds 0–4, e^−1 2203 ± 365 → e^−1.5 2581 ± 386 (ahead at every evaluation) →
    # e^−2 2706 ± 209 (ahead to 800k, then level; held-out seeds 5, 6 level, seven seeds 2665 against 2606). NPG
    # with e^−1.5 ended level with e^−1 and below it on the mean: 2523 ± 281 against 2648 ± 764; docs/BENCHMARKS.md
    # "TRPO on Ant-v5: σ e^−1.5 (stop 29) and e^−2".
    # Then, as NPG, K-FAC's F⁻¹ (damping 0.01, factor average 0.5) with δ 0.04: 1M, seeds 0–4, 3612 ± 341 against
    # 2706 ± 209 (held-out seeds 5, 6: 4697, 2438 against 2284, 2843; seven seeds 3599 ± 709 against 2665 ± 245);
    # with δ 0.01 K-FAC gained less (seeds 0, 1: 3295, 2800 against 2883, 2683; docs/BENCHMARKS.md
    # "NPG on Ant-v5 with K-FAC's F⁻¹"). Without the factor average (as NPG): seeds 0–4 3914 ± 675, seven seeds
    # 3979 ± 579 (held-out 5, 6: 4376, 3909).
    **{(algo, "Ant-v5"): {"fisher": "kfac", "log_std_init": -2.0, "max_kl": 0.04, "damping": 0.01,
                          "kfac_ema_decay": 0.0} for algo in ("npg", "trpo")},
    # ACKTR there also fits its critic by Adam (see Walker2d below): 1M, seeds 0–4, 2168 ± 537 → 2721 ± 329, ahead
    # at every evaluation from 200k on (docs/BENCHMARKS.md "ACKTR with an Adam critic on Ant-v5"). With that
    # critic a smaller starting σ is ahead at every evaluation: e^−1.5 3173 ± 634, e^−2 3419 ± 563,
    # every seed above e^−1's (NPG with CG's F⁻¹ and e^−1.5 ended level with e^−1; docs/BENCHMARKS.md
    # "ACKTR on Ant-v5: a smaller starting σ"). A smaller σ also shrinks how far a KL budget moves the mean
    # (Δμ ∝ σ√δ), and twice the family's δ gives part of it back: 3419 ± 563 → 3807 ± 223, four seeds of five higher;
    # on held-out seeds 5–9 lower, so over ten seeds the two are level (3437 ± 545 against 3425 ± 527); kept as level
    # there and ahead on seeds 0–4 (docs/BENCHMARKS.md "ACKTR on Ant-v5: twice the KL budget").
    ("acktr", "Ant-v5"): {"log_std_init": -2.0, "critic_optimizer": "adam", "max_kl": 0.004},
    # HalfCheetah with σ = 1 settles, on 3 seeds in 5, into a 1.6–1.9k gait it never leaves; starting σ at
    # e^−0.5 (Tianshou's MuJoCo init) took NPG from 2929 ± 1499 to 6031 ± 145 at 1M, 5 seeds of 5 above 5.8k.
    ("npg", "HalfCheetah-v5"): {"log_std_init": -0.5},
    # ACKTR there also fits its critic by Adam (as on Walker2d and Ant): 5202 ± 1191 → 5710 ± 1469, IQM 5617 →
    # 6080, evaluations after 500k 5021 → 5317, 30 % less wall time (docs/BENCHMARKS.md). Not on Hopper or Swimmer,
    # where the K-FAC critic's presets meet their targets and Adam's screens ended lower.
    ("acktr", "HalfCheetah-v5"): {"log_std_init": -0.5, "critic_optimizer": "adam"},
    # TRPO there also takes NPG's KL budget: δ 0.01 → 0.02 took it from 4606 ± 1152 to 5116 ± 877 (1M, 5 seeds;
    # Tianshou's TRPO 5002 ± 798). On Walker2d, Swimmer and Ant δ 0.02 ended level with δ 0.01 with a wider
    # spread, on Hopper lower (3323 against 3482; 5 seeds each, docs/BENCHMARKS.md "TRPO with δ 0.02"), so only
    # HalfCheetah's preset has it.
    ("trpo", "HalfCheetah-v5"): {"log_std_init": -0.5, "max_kl": 0.02},
    # Walker2d, same σ (1M, 5 seeds): NPG 4106 ± 1478 → 4967 ± 1862; TRPO (3 seeds) 3990 → 4408. ACKTR with its
    # K-FAC critic fell from 3502 to 2642 with it (3 seeds); with the Adam critic it gains (below).
    **{(algo, "Walker2d-v5"): {"log_std_init": -0.5} for algo in ("npg", "trpo")},
    # ACKTR on Hopper with the family's δ 0.002 reaches 3.5k by 300k–600k steps, then its evaluated policy swings
    # between 1.5k and 3.7k (1M, 5 seeds: 2495 ± 921); half the KL budget keeps it near 3.6k (same seeds,
    # docs/BENCHMARKS.md "ACKTR on Hopper-v5 with half the KL budget").
    ("acktr", "Hopper-v5"): {"max_kl": 0.001},
    # ACKTR on Walker2d is still learning at 1M and its mean action swings; every change to the actor's step
    # that steadied it slowed it. Fitting the critic by Adam (10 × 256, NPG's) instead of its K-FAC trust-region
    # step does neither: 1M, seeds 0–4, 3893 ± 1064 → 4488 ± 769, evaluations after 500k 3853 → 4011 on
    # average, a fifth less wall time. The K-FAC critic's 80 steps fit each batch's noise (its error on the next
    # batch is 1.5–2.7× Adam's; docs/BENCHMARKS.md "ACKTR on Walker2d-v5 with an Adam critic"). With that critic,
    # σ starting at e^−0.5 (as NPG and TRPO there) then steadies the late swings without slowing it: 4488 ± 769 →
    # 4687 ± 367, evaluations after 500k 4011 → 4423 on average, the lowest of them 829 → 3017; on seeds 5–9 it is
    # level with σ 1 (ten seeds 4307 ± 815 against 4168 ± 896; docs/BENCHMARKS.md "ACKTR on Walker2d-v5: σ starting
    # at e^−0.5 with the Adam critic").
    ("acktr", "Walker2d-v5"): {"critic_optimizer": "adam", "log_std_init": -0.5},
    # NPG on Hopper, the same way (1M, 5 seeds): δ 0.02 → 0.01 took every seed above 3.2k by 200k steps
    # (δ 0.02: 1 of 5) and the evaluations after 500k from 3008 to 3351 on average (final: 3231 → 3320). Its
    # late drops are of the mean action, which the σ-noisy objective does not score; σ starting at e^−0.25
    # keeps the two closer: 3320 ± 543 → 3454 ± 40, every evaluation after 500k above 3.1k (e^−0.5 goes too
    # far: one seed in five never leaves 1.3k; docs/BENCHMARKS.md "NPG on Hopper-v5 with a smaller σ").
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
        warn_unread(config, env_id, overrides or {}, stacklevel=4)
    return config


def warn_unread(config: Config, env_id: str, overrides: dict[str, Any], spaces: tuple | None = None,
                stacklevel: int = 3) -> None:
    """Warn of the ``overrides`` that change a preset's value of a setting the run would not read (given the
    (observation, action) ``spaces``, also of those they leave unread: ``unread_because``)."""
    action_space_type = image = None
    if spaces is not None:
        from .policies import input_layout

        action_space_type = type(spaces[1]).__name__
        image = input_layout(*spaces, config.env.action_mask is not None)[2] is not None
    preset = default_config(config.algorithm, env_family(env_id), env_id)
    unused = [f"{key} ({why})" for key in changed_by(preset, overrides) if key not in REFUSED_WHEN_UNREAD
              and (why := unread_because(config, key, action_space_type, image))]  # those are refused, not warned of
    if unused:
        warnings.warn(f"{config.algorithm} on {env_id} does not read these settings: {'; '.join(unused)}",
                      UserWarning, stacklevel=stacklevel)


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
