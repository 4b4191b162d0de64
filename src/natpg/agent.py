"""The facade: ``Agent(env, seed, **overrides)`` with learn / predict / save, plus ``load``.

It composes the parts — policy, critic, sampler, actor update (curvature × step rule), logger — and
owns none of the maths itself; evaluation is ``natpg.evaluation``, the run directories ``natpg.rundir``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from . import checkpoint
from .acktr import KFACRegression
from .algorithms import make_actor_update, make_critic
from .checkpoint import space_from_dict, space_to_dict
from .config import MAX_SEED, Config, check_flag, is_flag, is_integer, whole_number
from .envs import check_env_id, check_spaces, make_normalisers, make_vec_env, probe_spaces
from .errors import warn
from .evaluation import evaluate
from .fisher.dense import check_dense_size
from .fisher.empirical import check_score_size
from .logger import Logger
from .params import num_params
from .policies import env_action, input_layout, make_policy
from .guards import ActorSnapshot, fault_of, stateful_update_parts
from .presets import config_for, warn_unread
from .rollout import (Sampler, describe_unstorable, episode_counters, restore_episode_counters, state_without_envs,
                      storable)
from .rundir import BOOKKEEPING, check_out_dir, claim_run_dir, holds_this_run, without_inert_settings
from .train import CriticFit, TrainingFault, iteration


CALLABLE_MASK = "<callable>"
EVAL_SEED_OFFSET = 10_000  # periodic evaluations run on environments seeded apart from the training ones
ACT_SEED_OFFSET = 20_000  # predict's stochastic actions come from a generator seeded apart from training's


def _vector_batch(space: gym.Space, obs: Any) -> list[Any] | None:
    """The observations of a Gymnasium vector env's batch for a Dict/Tuple/Discrete/... ``space`` (a dict or tuple
    of arrays with a leading batch axis, an array of Discrete values), one by one; None if ``obs`` is not one."""
    leaf = obs
    while isinstance(leaf, (dict, tuple)) and len(leaf):
        leaf = next(iter(leaf.values())) if isinstance(leaf, dict) else leaf[0]
    if not isinstance(leaf, np.ndarray) or leaf.ndim == 0:
        return None
    batch = gym.vector.utils.batch_space(space, leaf.shape[0])
    try:
        return list(gym.vector.utils.iterate(batch, obs)) if batch.contains(obs) else None
    except (TypeError, ValueError, KeyError, IndexError, AssertionError):
        return None


class Agent:
    """An on-policy agent. Subclasses only name their algorithm; the composition comes from the config."""

    algorithm = "npg"

    def __init__(self, env: str, seed: int | None = 0, **overrides: Any):
        check_env_id(env)  # first: SB3's PPO("MlpPolicy", env) would otherwise read as a bad seed
        if seed is None:  # SB3's convention: a fresh seed, recorded with the run (agent.seed, config.json) to repeat it
            seed = random.SystemRandom().randrange(2**31)
        if not is_integer(seed) or not 0 <= seed < MAX_SEED:
            raise ValueError(f"seed must be a non-negative integer below 2**62, got {seed!r}")
        seed = int(seed)
        mask_fn = overrides.get("action_mask")
        if callable(mask_fn):
            overrides["action_mask"] = CALLABLE_MASK
        config = config_for(self.algorithm, env, overrides, warn=False)  # warned of below, with the spaces
        if config.distributed.sampler == "ray":
            from .distributed import check_ray_installed

            check_ray_installed()
        self.action_mask_fn = mask_fn if callable(mask_fn) else None
        self._config = config
        observation_space, action_space = probe_spaces(env, self.action_mask_source, config.env.env_kwargs)
        warn_unread(config, env, overrides, (observation_space, action_space))
        self._build(env, seed, config, observation_space, action_space)
        _check_batch_memory(config, self._input_width)  # here and in learn, not in _build: a loaded agent may only act

    @property
    def config(self) -> Config:
        """The settings this agent was built from (frozen)."""
        return self._config

    @config.setter
    def config(self, value: Any) -> None:
        raise AttributeError("an agent's config is fixed once its parts are built from it (a new one would be "
                             "recorded but not used): to continue a run with other settings, "
                             "natpg.load(path, max_kl=...) or natpg.load(path, **config_changes)")

    @property
    def action_mask_source(self):
        """Where the action mask comes from: None, an info key, or the callable given to the constructor."""
        return self.action_mask_fn if self.config.env.action_mask == CALLABLE_MASK else self.config.env.action_mask

    @torch.inference_mode(False)  # trainable tensors, also where an agent is built for inference
    def _build(self, env_id: str, seed: int, config: Config, observation_space: gym.Space,
               action_space: gym.Space) -> None:
        check_spaces(observation_space, action_space)
        if refusal := config.refusal("action_squash", type(action_space).__name__):  # validate does not see spaces
            raise ValueError(refusal)
        if config.run.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={config.run.device!r} requested but CUDA is not available (device='auto' takes "
                             f"the GPU where there is one)")
        self.env_id, self.seed, self._config = env_id, seed, config
        self.observation_space, self.action_space = observation_space, action_space
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.run.device == "auto"
                                   else config.run.device)
        if config.run.torch_threads:  # 0: the process's own setting
            torch.set_num_threads(config.run.torch_threads)
        p = config.policy
        if isinstance(action_space, gym.spaces.Box) and p.action_squash == "clip":
            _warn_bounds_without_zero(action_space)
        masked = config.env.action_mask is not None
        features, mask_dim, image = input_layout(observation_space, action_space, masked)
        self._input_width = features + mask_dim  # what the policy reads of one observation, mask included
        # The initialisation is drawn from the seed on the CPU, the user's global random stream left as it was.
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                self.policy = make_policy(observation_space, action_space, p.hidden, p.activation, p.log_std_init,
                                          p.action_squash, masked).to(self.device)
                self.critic = make_critic(config, features + mask_dim, image).to(self.device)
        except (MemoryError, RuntimeError) as exc:  # torch's allocator raises a RuntimeError (CUDA's is one too)
            if not isinstance(exc, MemoryError) and "allocate" not in str(exc) and "out of memory" not in str(exc):
                raise
            raise ValueError(f"the networks (hidden={p.hidden}, critic_hidden={config.critic.critic_hidden}) do not "
                             f"fit in memory on {self.device}: {exc}") from None
        self._built = _layout(self.policy), _layout(self.critic)  # what a checkpoint's config rebuilds
        if image is None:
            _warn_wide_kfac_input(config, features + mask_dim)
        # Refuse a matrix that cannot fit now, not after a rollout.
        actor = list(self.policy.actor_parameters())
        if config.curvature.fisher == "dense":
            check_dense_size(num_params(actor), actor[0].dtype)
        elif config.curvature.fisher == "empirical" and config.step.step != "ppo_clip":
            N, P = config.batch_size, num_params(actor)
            nac = config.algorithm == "nac"  # its least squares forms the Gram matrix on the smaller side
            check_score_size(N, P, actor[0].dtype, how_to_lower="lower the batch, n_envs × n_steps, or use another "
                             + ("algorithm" if nac else "fisher"), gram=min(N, P) if nac else None)
        self.obs_normalizer, self.reward_scaler = make_normalisers(config, config.env.n_envs, features, mask_dim, image)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # The sampler acts with a CPU copy of a GPU policy (rollout.Sampler._actor), so it samples on the CPU.
        self.sampling_generator = (self.generator if self.device.type == "cpu"
                                   else torch.Generator().manual_seed(seed))
        # The updates' draws (K-FAC's sampled actions, a Fisher subsample, PPO's minibatches, the critic's shuffles),
        # on the CPU; saved as "cpu_generator".
        self.update_generator = torch.Generator().manual_seed(seed + 1)
        # predict(deterministic=False) draws here, so that acting between learn calls leaves training's draws alone;
        # on the CPU, as the rollouts do, so that the draws are the same whichever device the policy is on.
        self.act_generator = torch.Generator().manual_seed(seed + ACT_SEED_OFFSET)
        self.actor_update = make_actor_update(config, self.update_generator)
        self._critic_fit = CriticFit()  # beside the actor update, bit for bit as after it
        self.env_steps = 0
        self.updates = 0
        self.target_steps: int | None = None  # where the last learn call was to end
        self.schedule_end: int | None = None  # where its kl_schedule / lr_schedule decayed towards
        self.consecutive_faults = 0  # updates in a row skipped for a numerical fault
        self.train_wall_s = 0.0  # wall-clock seconds spent in learn, summed over resumes
        self.best_eval_return: float | None = None  # the best periodic evaluation so far (run.eval_every)
        self._sampler: Sampler | None = None
        self._saved_sampler: dict[str, Any] | None = None  # sampler state read from a checkpoint, for reset=False
        self._envs_stopped: str | None = None  # why the environments were left mid-step: the next learn rebuilds them
        self._run_log: Logger | None = None  # the run directory's log while learn writes it: on disk before a checkpoint
        self._checkpointed: tuple[str, int] | None = None  # (file, updates) of the last checkpoint written

    # --- training -------------------------------------------------------------------------------
    def learn(self, total_steps: int, out_dir: str | None = None, progress_bar: bool = False,
              reset: bool = True, callback=None, schedule_end: int | None = None,
              overwrite: bool = False) -> "Agent":
        """Train for ``total_steps`` more environment steps (rounded down to whole batches).

        ``out_dir`` receives progress.csv, TensorBoard events and checkpoints. A directory that already holds
        this run (an earlier ``learn`` of this agent, or the checkpoint it was loaded from) is continued: its
        progress.csv is appended to after dropping rows newer than the agent. One that holds another run is an
        error unless ``overwrite=True``, which deletes natpg's outputs there (``checkpoint.RUN_OUTPUTS``) first; files
        with those names beside neither a readable natpg checkpoint nor natpg's config.json are refused even so.
        ``reset=True`` (the default) starts from freshly reset environments, copy i seeded ``seed + updates + i``
        (``updates`` done so far), so that each call steps other episodes. ``reset=False`` keeps stepping the
        environments where the previous ``learn`` left them — or, for an
        agent just loaded from a checkpoint, where the saved run left them (bit-exact for classic-control and
        MuJoCo tasks with vectorization='sync'; otherwise, after ``close``, and after an exception stopped the last
        call's environments mid-rollout (an environment's error, an interrupt), from freshly reset environments,
        with a warning). The run's episode statistics (``episodes``, the window of ``ep_return_mean``) go on
        either way. A later call with ``reset=True`` in which no episode ends (episodes longer than the call) warns.

        An exception while collecting a rollout or updating from it (the environment's own error, a non-finite
        observation, Ctrl-C) leaves the agent at its last completed update (policy, critic and normalisers); with
        ``out_dir`` that state is saved there before the exception propagates (a note on it says so), so no
        completed update is lost.

        A numerically faulty update (non-finite gradient, direction, step, loss or parameters) is skipped
        with the parameters untouched and logged (``step/fault``/``critic/fault`` in events.log); after
        ``max_consecutive_faults`` in a row a checkpoint is written to ``out_dir`` and ``TrainingFault`` raised.

        With ``eval_every`` set, the deterministic policy is evaluated whenever the env-step count passes a
        multiple of it (``periodic_eval``; its time is not counted in ``wall_s``), and the best one is kept in
        ``out_dir/best``.

        ``kl_schedule='linear'`` (``lr_schedule='linear'``) decays δ (α) towards the env-step count
        ``schedule_end`` (default: where this call ends); give it when training one run in several calls, e.g.
        ``learn(100_000, schedule_end=1_000_000)``.
        """
        for name, flag in (("progress_bar", progress_bar), ("reset", reset), ("overwrite", overwrite)):
            check_flag(name, flag)
        batch = self.config.batch_size
        total_steps, schedule_end = whole_number(total_steps), whole_number(schedule_end)  # 1e6 as well as 10**6
        if not is_integer(total_steps) or total_steps < batch:
            raise ValueError(f"total_steps must be an integer ≥ one batch ({self.config.env.n_envs} envs × "
                             f"{self.config.rollout.n_steps} steps = {batch}), got {total_steps!r}")
        total_steps = int(total_steps)
        _check_batch_memory(self.config, self._input_width)  # natpg.load(path, n_steps=...) is not checked there
        if callback is not None:
            callback = _one_callback(callback)
        n_updates = total_steps // batch
        end_steps = self.env_steps + n_updates * batch  # where this call ends
        if schedule_end is not None and (not is_integer(schedule_end) or schedule_end < end_steps):
            raise ValueError(f"schedule_end must be an env-step count ≥ {end_steps}, where this learn call ends; "
                             f"got {schedule_end!r}")
        if schedule_end is None:
            self._warn_of_a_restarted_schedule(end_steps)
        if out_dir is None:
            return self._train(n_updates, end_steps, schedule_end, None, False, progress_bar, reset, callback)
        check_out_dir(out_dir)
        with checkpoint.run_dir_lock(os.fspath(out_dir)):  # one writer per run directory
            continuing = claim_run_dir(self, out_dir, overwrite)
            return self._train(n_updates, end_steps, schedule_end, os.fspath(out_dir), continuing, progress_bar,
                               reset, callback)

    @torch.inference_mode(False)  # the updates need gradients, whatever mode the caller is in
    @torch.enable_grad()
    def _train(self, n_updates: int, end_steps: int, schedule_end: int | None, out_dir: str | None,
               continuing: bool, progress_bar: bool, reset: bool, callback) -> "Agent":
        """learn's loop, its arguments checked (and ``out_dir`` locked and claimed)."""
        batch = self.config.batch_size
        self.target_steps = end_steps  # recorded, so that natpg train --resume without --steps knows where to stop
        restarted = reset and self.updates > 0  # a later call that resets the environments the last one left
        if reset or self._sampler is None or self._envs_stopped:
            self._open_sampler(reset)
        self._saved_sampler = None
        if out_dir and not continuing:  # a new run directory holds a checkpoint before any log row (as natpg train's)
            # and its own best policy: a best return recorded elsewhere (before a load) would keep DIR/best empty
            self.best_eval_return = None
            self._write_checkpoint(out_dir, self._sampler_state())
        run = self.config.run
        episodes_before = self._sampler.episodes
        logger = Logger(out_dir, run.tensorboard, progress_bar, total_steps=end_steps,
                        resume=continuing, resume_step=self.env_steps, info_keys=self.config.env.info_keys)
        self._run_log = logger
        start = time.perf_counter()
        eval_s = 0.0  # seconds spent in periodic evaluations, left out of the training wall-clock
        wall_before = self.train_wall_s
        steps_at_start = self.env_steps
        schedule_end = self.schedule_end = end_steps if schedule_end is None else int(schedule_end)
        step_rule = getattr(self.actor_update, "step_rule", None)

        def progress_row(stats: dict[str, Any]) -> dict[str, Any]:
            wall = time.perf_counter() - start - eval_s
            self.train_wall_s = wall_before + wall
            return {"env_steps": self.env_steps, "updates": self.updates,
                    "ep_return_mean": self.recent_return(), "ep_length_mean": _mean(self._sampler.recent_lengths),
                    **self._recent_info_means(), "episodes": self._sampler.episodes, "wall_s": self.train_wall_s,
                    "steps_per_s": (self.env_steps - steps_at_start) / max(wall, 1e-9),
                    "faults/consecutive": self.consecutive_faults, **stats, **_policy_stats(self.policy),
                    **self._sampler.log_stats()}

        try:
            for i in range(n_updates):
                schedule = self._schedule(step_rule, schedule_end)
                stats = self._update(prefetch=i < n_updates - 1, out_dir=out_dir)
                self.updates, self.env_steps = self.updates + 1, self.env_steps + batch
                # The update is complete: whatever stops the run from here on (Ctrl-C in the evaluation, say),
                # its row is logged and it is saved, so that the log and the checkpoint agree.
                saved = None
                try:
                    stats |= schedule
                    fault = fault_of(stats)
                    self.consecutive_faults = self.consecutive_faults + 1 if fault else 0
                    logger.record_episodes(self.env_steps, self._sampler.last_episodes)
                    if run.eval_every:
                        t_eval = time.perf_counter()
                        try:
                            stats |= self.periodic_eval(batch, out_dir)
                        finally:
                            eval_s += time.perf_counter() - t_eval
                    row = progress_row(stats)
                    evaluated = not math.isnan(stats.get("eval/return_mean", math.nan))
                    row, stop, failed = _run_callback(callback, self, row)
                    if self._sampler is None:  # the callback closed the agent: no environments left to train on
                        stop = True
                    if self.updates % run.log_interval == 0 or fault or evaluated or stop or i == n_updates - 1:
                        logger.record(row)
                    faulted_out = self.consecutive_faults >= run.max_consecutive_faults
                    if out_dir and (faulted_out or failed is not None or
                                    run.checkpoint_every and self.updates % run.checkpoint_every == 0):
                        saved = self._save(out_dir)
                except BaseException as exc:
                    if out_dir:
                        exc.add_note(self._keep_stopped_update(out_dir, logger, lambda: progress_row(stats)))
                    raise
                if faulted_out:
                    raise TrainingFault(
                        f"training stopped: {self.consecutive_faults} consecutive updates (up to update "
                        f"{self.updates}, {self.env_steps} env steps) were skipped, in whole or in part, for "
                        f"numerical faults, the last one: {fault}. {self._undone(stats)}"
                        f"{f'; checkpoint written to {saved}' if out_dir else ''}.")
                if failed is not None:
                    if out_dir:
                        failed.add_note(f"natpg: the callback raised after update {self.updates} ({self.env_steps} "
                                        f"env steps); that update is saved in {saved}")
                    raise failed
                if stop:
                    break
        finally:
            logger.close()
            self._run_log = None
            self._schedule(step_rule, None)  # back to the configured δ and α
        if out_dir:
            self._save(out_dir)
        # Advice after the save: a warning turned into an error must not cost the checkpoint.
        if self._sampler is None:  # closed by the callback
            return self
        self._warn_missing_info_keys()
        if restarted and self._sampler.episodes == episodes_before:
            ran = (self.env_steps - steps_at_start) // self.config.env.n_envs
            warn(f"no training episode ended in this learn call ({ran} "
                 f"steps per environment copy), which started from freshly reset environments "
                 f"(reset=True, the default): episodes longer than one call never end that way. Pass "
                 f"reset=False to go on where the last call left the environments", UserWarning)
        return self

    def _keep_stopped_update(self, out_dir: str, logger: Logger, progress_row) -> str:
        """The note for an exception that stops learn after a complete update: that update's row is logged (if it
        is not yet) and the update saved (if it is not yet: an interrupt held while its checkpoint was written),
        or the note says what could not be."""
        logged = logger.last_step == self.env_steps
        if not logged:
            with contextlib.suppress(Exception):  # the log's own error: the update is saved all the same
                logger.record(progress_row())
                logged = True
        file = checkpoint.checkpoint_file(out_dir)
        if self._checkpointed != (file, self.updates):
            try:
                self._save(out_dir)
            except Exception as failure:
                return (f"natpg: stopped after update {self.updates} ({self.env_steps} env steps), which could not "
                        f"be saved ({type(failure).__name__}: {failure}): {file} holds an earlier update")
        return (f"natpg: stopped after update {self.updates} ({self.env_steps} env steps), which is "
                f"{'logged and ' if logged else ''}saved in {file}")

    def _open_sampler(self, reset: bool) -> None:
        """Environments for learn: the saved run's (``reset=False`` after a load), else freshly reset ones."""
        for attempt in ("snapshot", "fresh"):
            self._close_sampler()
            self._sampler = self._make_sampler(self.seed + self.updates)
            restored = (attempt == "snapshot" and not reset and self._saved_sampler is not None
                        and self._sampler.load_state_dict(self._saved_sampler))
            # a snapshot that failed part-way may leave a wrapper's state behind a reset: build afresh
            if not self._sampler.half_restored:
                break
        if not restored:  # fresh episodes: the discounted returns reward normalisation tracks start at 0
            self.reward_scaler.ret[:] = 0.0
        if not restored and self._saved_sampler is not None:  # the run's episode statistics go on all the same
            restore_episode_counters(self._sampler, self._saved_sampler)

    def _update(self, prefetch: bool, out_dir: str | None) -> dict[str, Any]:
        """One iteration (collect, then ``train.iteration``) and its log entries; on any exception (Ctrl-C, the
        environment's error, a bug) the agent is back at its last completed update, saved in ``out_dir``."""
        normalisers, counters = self._normaliser_state(), episode_counters(self._sampler)
        mid_rollout = True
        try:
            rollout, collect_s = self._collect()
            mid_rollout = False
            snapshot = ActorSnapshot(self.policy, self.actor_update, self.update_generator)
            try:
                return iteration(rollout, collect_s, self._sampler, self.policy, self.critic, self.actor_update,
                                 self.config, self.update_generator, prefetch=prefetch, critic_fit=self._critic_fit,
                                 snapshot=snapshot)
            except BaseException:  # the last completed update's policy, step state and draws
                snapshot.restore()  # iteration puts the critic back itself
                raise
        except BaseException as exc:
            self._restore_normalisers(normalisers)
            restore_episode_counters(self._sampler, counters)  # the lost rollout's episodes are not logged
            # This process's environments stopped mid-step (an async copy that raised is shut down): the next learn
            # builds them afresh. Not closed here: closing may wait on a hung copy or raise the workers' own
            # interrupt, before the checkpoint below. (Worker samplers replace their failed workers themselves.)
            if mid_rollout and isinstance(self._sampler, Sampler):
                self._envs_stopped = f"the environments were stopped mid-rollout ({type(exc).__name__})"
            if out_dir:
                file = self._write_checkpoint(out_dir, state_without_envs(counters, "the run was interrupted "
                                                                                    "mid-rollout"))
                exc.add_note(f"natpg: the last completed update ({self.updates} updates, {self.env_steps} env "
                             f"steps) is saved in {file}; continue from it with natpg.load({str(out_dir)!r}) (or "
                             f"natpg train ... --resume {out_dir}); the environments then start afresh")
            raise

    def _warn_missing_info_keys(self, enough: int = 10) -> None:
        """A key of ``info_keys`` that none of the last ``enough`` or more finished episodes' infos had (a
        misspelt name, say) is named: its ep_KEY_mean column would stay NaN without a word."""
        keys, infos = self.config.env.info_keys, list(self._sampler.recent_infos)
        if keys and len(infos) >= enough:
            had = ~np.isnan(np.array(infos, np.float64).reshape(-1, len(keys)))
            if missing := [k for k, any_had in zip(keys, had.any(0)) if not any_had]:
                warn(f"info_keys {missing}: none of the last {len(infos)} finished episodes' info had "
                     f"{'it' if len(missing) == 1 else 'them'} (their ep_KEY_mean columns stay NaN)",
                     UserWarning)

    def _collect(self):
        """The next rollout and the seconds it took."""
        start = time.perf_counter()
        rollout = self._sampler.collect(self.policy, self.config.rollout.n_steps)
        return rollout, time.perf_counter() - start

    def _normaliser_state(self):
        """The observation and reward statistics, which a rollout updates: to put back should the update fail."""
        rms = (self.obs_normalizer.rms, self.reward_scaler.rms)
        return [(r.mean.copy(), r.var.copy(), r.count) for r in rms], self.reward_scaler.ret.copy()

    def _restore_normalisers(self, state) -> None:
        (obs, rew), ret = state
        (self.obs_normalizer.rms.mean, self.obs_normalizer.rms.var, self.obs_normalizer.rms.count) = obs
        (self.reward_scaler.rms.mean, self.reward_scaler.rms.var, self.reward_scaler.rms.count) = rew
        self.reward_scaler.ret = ret

    def _warn_of_a_restarted_schedule(self, end_steps: int) -> None:
        """A linear schedule that an earlier call (or the loaded run) decayed towards another end is decayed by this
        call towards its own: δ or α jumps back up, then falls to 0 again (a sawtooth over chunked calls; a loaded
        finished run goes on at a small fraction of δ). Not an error — Stable-Baselines3 continues its schedules so
        too — but it changes the run's steps unseen, so say so."""
        step = self.config.step
        linear = [(key, symbol, value) for key, symbol, value in (("kl_schedule", "δ", step.max_kl),
                                                                  ("lr_schedule", "α", step.alpha))
                  if getattr(step, key) == "linear"]
        earlier = self.schedule_end if self.schedule_end is not None else self.target_steps  # older checkpoints
        if not linear or not self.env_steps or earlier in (None, end_steps):
            return
        left = 1.0 - self.env_steps / end_steps
        settings = lambda value: " and ".join(f"{key}={value!r}" for key, _, _ in linear)  # noqa: E731
        configured = " and ".join(f"{symbol} = {value:g}" for _, symbol, value in linear)
        warn(f"{settings('linear')}: this learn call decays the step towards env step {end_steps}, where it ends, "
             f"starting at {left:.3g} of {configured}; the run so far was to end at {earlier}. To train one run in "
             f"several calls, give every call the same learn(..., schedule_end=TOTAL) (natpg train --resume: the "
             f"run's own --steps); for steps that do not decay, {settings('constant')}", RuntimeWarning)

    def _schedule(self, step_rule, schedule_end: int | None) -> dict[str, float]:
        """Set the next update's δ (``kl_schedule``) and α (``lr_schedule``), the fraction of the env steps up to
        ``schedule_end`` still to come times the configured value ('linear'); returns the columns that log
        them. ``schedule_end=None`` puts the configured values back."""
        step, columns = self.config.step, {}
        left = 1.0 if schedule_end is None else 1.0 - self.env_steps / schedule_end
        if step.kl_schedule == "linear":
            step_rule.max_kl = columns["step/max_kl"] = step.max_kl * left
        if step.lr_schedule == "linear":  # the rate α of FixedStep, AdamStep or PPO's ClippedSurrogateUpdate
            (step_rule or self.actor_update).alpha = columns["step/lr"] = step.alpha * left
        return {} if schedule_end is None else columns

    def periodic_eval(self, batch: int, out_dir: str | None) -> dict[str, float]:
        """The eval/* columns of the row after an update of ``batch`` steps: an evaluation when the env-step
        count has just passed a multiple of ``eval_every``, NaN otherwise (so the CSV has the columns from
        its first row). Reads only the policy and the normaliser statistics: training continues bit-exactly."""
        every, nan = self.config.run.eval_every, float("nan")
        if self.env_steps // every == (self.env_steps - batch) // every:
            return {"eval/return_mean": nan, "eval/return_std": nan}
        mean, std = evaluate(self, episodes=self.config.run.eval_episodes, seed=self.seed + EVAL_SEED_OFFSET)
        if self.best_eval_return is None or mean > self.best_eval_return:
            self.best_eval_return = mean
            if out_dir:
                self._save(os.path.join(out_dir, checkpoint.BEST_DIR))
        return {"eval/return_mean": mean, "eval/return_std": std}

    def _make_sampler(self, seed: int):
        """The sampler chosen by ``config.distributed.sampler``: 'local' (one vector env here), 'processes'
        (local worker processes), 'ray' (Ray actors) or 'workers' (the worker code in this process); copy i
        is seeded ``seed + i`` in all four."""
        kind = self.config.distributed.sampler
        if kind != "local":
            from .distributed import make_sampler

            return make_sampler(kind, self.env_id, self.config, seed, self.obs_normalizer, self.reward_scaler,
                                self.device, self.action_mask_source)
        e, d = self.config.env, self.config.distributed
        envs = make_vec_env(self.env_id, e.n_envs, e.vectorization, e.n_workers, self.action_mask_source,
                            e.env_kwargs, e.info_keys, worker_timeouts=(d.worker_timeout, d.worker_start_timeout))
        return Sampler(envs, self.obs_normalizer, self.reward_scaler, seed, self.device, self.sampling_generator,
                       e.nonfinite_env, e.info_keys)

    def _undone(self, stats: dict[str, Any]) -> str:
        """What a TrainingFault's last update undid, and a hint where the critic failed on large returns."""
        actor, critic = bool(stats.get("step/skipped")), bool(stats.get("critic/skipped"))
        what = ("The last update undid both the policy's step and the critic's fit" if actor and critic else
                "The last update undid the policy's step and kept the critic's fit" if actor else
                "The last update undid the critic's fit and kept the policy's step, taken on advantages from the "
                "critic as it was")
        if critic and not self.config.env.normalize_reward:
            what += (". Where rewards are large (the squared error of returns past ≈ 1e19 overflows float32), "
                     "normalize_reward=True scales them")
        return what

    def _recent_info_means(self) -> dict[str, float]:
        """``ep_KEY_mean`` of each of ``info_keys``: its mean over the last (up to) 100 finished training episodes
        that had it (NaN before any had)."""
        keys = self.config.env.info_keys
        if not keys:
            return {}
        values = np.array(list(self._sampler.recent_infos), np.float64).reshape(-1, len(keys))
        had = ~np.isnan(values)
        means = np.where(had.any(0), np.where(had, values, 0).sum(0) / np.maximum(had.sum(0), 1), np.nan)
        return {f"ep_{key}_mean": float(m) for key, m in zip(keys, means)}

    def recent_return(self) -> float:
        """Mean undiscounted return of the last (up to) 100 finished training episodes."""
        if self._sampler is None:
            return _mean(self._saved_sampler["recent_returns"]) if self._saved_sampler else float("nan")
        return _mean(self._sampler.recent_returns)

    def _close_sampler(self) -> None:
        """Close the environments; the run's episode statistics stay (for the next sampler, a checkpoint, logs)."""
        if self._sampler is not None:
            reason = self._envs_stopped or "the environments were closed before (Agent.close)"
            self._saved_sampler = state_without_envs(episode_counters(self._sampler), reason)
            sampler, self._sampler, self._envs_stopped = self._sampler, None, None
            sampler.close()

    def close(self) -> None:
        """End the environments (and worker processes); the agent can still act, save, and learn (afresh)."""
        self._close_sampler()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- acting ---------------------------------------------------------------------------------
    def predict(self, obs: Any, deterministic: bool = True, action_mask: Any = None) -> np.ndarray:
        """Action(s) for one observation or a batch (numpy in, numpy out), with frozen normalisation.

        Observations come as the environment gives them (Dict/Tuple/Discrete ones too, flattened here; Atari
        frames after natpg's preprocessing). Box actions are clipped to the bounds (or tanh-squashed), as when
        training. A policy trained with action masking needs ``action_mask`` (1 = allowed; [n] or [B, n]).
        """
        check_flag("deterministic", deterministic)
        space = self.observation_space
        if isinstance(space, gym.spaces.Box):
            flat, single = self._box_observations(obs)
        else:  # Dict, Tuple, Discrete, ...: one observation, a vector env's batch, or a list of observations
            batched = _vector_batch(space, obs)
            single = batched is None and (space.contains(obs) if not isinstance(space, gym.spaces.Dict)
                                          else isinstance(obs, dict))
            if (batched is None and not single and isinstance(space, gym.spaces.Tuple) and isinstance(obs, tuple)
                    and len(obs) == len(space.spaces) and not all(space.contains(o) for o in obs)):
                # one observation off the space, not a list of them: why its parts are not observations is noise
                raise ValueError(f"observation {obs!r:.120} is not in the policy's observation space {space}")
            items = (batched if batched is not None else [obs] if single
                     else list(obs) if isinstance(obs, (list, tuple)) else None)
            try:
                if items is None:
                    raise ValueError("not a list of observations")
                flat = np.stack([np.asarray(gym.spaces.flatten(space, o), np.float64) for o in items])
                if flat.shape[1] != gym.spaces.flatdim(space):  # a part of another shape (a Dict's entry, say)
                    raise ValueError(f"it flattens to {flat.shape[1]} values, the space to {gym.spaces.flatdim(space)}")
            except (TypeError, ValueError, KeyError, IndexError, AssertionError) as exc:
                raise ValueError(f"observation {obs!r:.120} is not in the policy's observation space {space} "
                                 f"(nor a vector env's batch of them, nor a list of them): {exc}") from None
            if not storable(flat).all():
                raise ValueError(f"observation holds {describe_unstorable('value', flat)}: {obs!r:.200}")
        if self.config.env.action_mask is not None:
            flat = np.concatenate([flat, self._mask_rows(action_mask, flat.shape[0])], axis=1)
        elif action_mask is not None:
            raise ValueError("action_mask given, but this policy was trained without action masking")
        act = self._act(flat, deterministic)
        return act[0] if single else act

    def _box_observations(self, obs: Any) -> tuple[np.ndarray, bool]:
        shape = self.observation_space.shape
        try:
            if obs is None:  # np.asarray(None, float) is NaN: "holds a non-finite value" would mislead
                raise TypeError("None is not an observation")
            obs = np.asarray(obs, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"observation must be numeric (an array of shape {shape} or a batch of them), "
                             f"got {type(obs).__name__}: {exc}") from None
        if not storable(obs).all():
            raise ValueError(f"observation holds {describe_unstorable('value', obs)}: {obs.tolist()!r:.200}")
        if obs.shape == shape:
            single = True
        elif obs.shape[1:] == shape and obs.ndim == len(shape) + 1:
            single = False
        else:
            raise ValueError(f"observation of shape {obs.shape} does not match the policy's observation shape "
                             f"{shape} (or a batch of them, [B, {', '.join(map(str, shape))}])")
        return obs.reshape(1 if single else obs.shape[0], math.prod(shape)), single  # an empty batch too

    def _mask_rows(self, action_mask: Any, rows: int) -> np.ndarray:
        n = int(self.action_space.n)
        if action_mask is None:
            raise ValueError(f"this policy was trained with action masking: pass action_mask (1 = allowed), an "
                             f"array of {n} entries or [B, {n}]")
        mask = np.asarray(action_mask, np.float64)
        if mask.shape == (n,):
            mask = np.broadcast_to(mask, (rows, n))
        if mask.shape != (rows, n):
            raise ValueError(f"action_mask must have shape ({n},) or ({rows}, {n}), got shape {mask.shape}")
        if not (none := ~(mask > 0.5).any(axis=1)).any():
            return mask
        raise ValueError(f"action_mask allows no action in row(s) {np.flatnonzero(none).tolist()} (1 = allowed; "
                         f"at least one per row)")

    @torch.no_grad()
    def _act(self, flat: np.ndarray, deterministic: bool,
             generators: list[torch.Generator] | None = None) -> np.ndarray:
        """Actions for policy inputs [B, D] (flattened observations, mask appended), as the environment takes them.
        Stochastic actions draw on the CPU, never from training's generators: row i from ``generators[i]``
        (evaluation's, one per episode), or all rows from ``act_generator``."""
        x = torch.from_numpy(self.obs_normalizer.normalize(flat)).to(self.device)
        eta = self.policy(x)
        if deterministic:
            act = self.policy.mode(eta).cpu()
        elif generators is None:
            act = self.policy.sample(eta.cpu(), self.act_generator)
        else:
            act = torch.cat([self.policy.sample(row, g) for row, g in zip(eta.cpu().split(1), generators)])
        return env_action(act.numpy(), self.action_space, getattr(self.policy, "squash", False))

    # --- persistence ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, action_mask=None, **changes: Any) -> "Agent":
        """``natpg.load``, for those used to ``PPO.load(path)``: ``NPG.load`` refuses another algorithm's run."""
        agent = load(path, action_mask, **changes)
        if cls is not Agent and not isinstance(agent, cls):
            raise ValueError(f"{os.fspath(path)!r} holds a {agent.algorithm} run, not {cls.algorithm}; load it with "
                             f"natpg.load or natpg.{type(agent).__name__}.load")
        return agent

    def save(self, path: str, overwrite: bool = False) -> str:
        """Write a checkpoint to ``path`` (a directory, or a file ending in .pt); returns the file written. A
        directory another process is training in is refused (``checkpoint.run_dir_lock``). A directory or file
        holding another run — another algorithm, environment, seed or settings, or a later state of this one — is
        refused unless ``overwrite=True``, which replaces it (a directory's natpg outputs, its log too:
        ``checkpoint.RUN_OUTPUTS``); an earlier state of this run is replaced, its log kept."""
        checkpoint.checkpoint_file(path)  # a clear error for an empty path or one that is not a path
        check_flag("overwrite", overwrite)
        if os.fspath(path).lower().endswith(".zip") and not os.path.isdir(path):  # SB3's model.zip: not a folder
            raise ValueError(f"save({os.fspath(path)!r}): natpg saves a run directory, or one file whose name ends in "
                             f".pt, so this would be a directory named like a zip file; give "
                             f"{os.fspath(path)[:-4] + '.pt'!r} for one file, or {os.fspath(path)[:-4]!r} for a directory")
        if checkpoint.is_file_path(path):  # one checkpoint file, not a run directory: nothing to lock
            if os.path.lexists(path):
                holds_this_run(self, path, [os.path.basename(path)], overwrite, "save", file=True)
            return self._write_checkpoint(path, self._sampler_state())
        with checkpoint.run_dir_lock(check_out_dir(path)):
            claim_run_dir(self, path, overwrite, by="save")
            return self._save(path)

    def _save(self, out_dir: str) -> str:
        """save() into the run directory this agent is training in (locked and claimed by learn)."""
        with checkpoint.run_dir_lock(out_dir):
            return self._write_checkpoint(out_dir, self._sampler_state())

    def _write_checkpoint(self, path: str, sampler_state: dict[str, Any] | None) -> str:
        for name, built, now in zip(("policy", "critic"), self._built, (_layout(self.policy), _layout(self.critic))):
            if now != built:  # a network assigned by hand: its checkpoint would not load
                raise ValueError(f"agent.{name} is not the network its config builds ({built[0]} with "
                                 f"{len(built[1])} tensors), but a {now[0]} with another layout: natpg saves only the "
                                 f"networks it builds from the settings (hidden, critic_hidden, activation, ...), "
                                 f"so that a checkpoint never holds code; change those settings instead")
        # A Ctrl-C from here on (the second of two: stop at once) waits until the checkpoint is written
        with checkpoint.signals_held(checkpoint.checkpoint_file(path)):
            if self._run_log is not None:
                self._run_log.sync()
            meta = {
                "algorithm": self.algorithm, "env_id": self.env_id, "seed": self.seed, "config": self.config.to_dict(),
                "observation_space": space_to_dict(self.observation_space),
                "action_space": space_to_dict(self.action_space),
                "obs_normalizer": self.obs_normalizer.rms.state_dict(),
                "reward_scaler": self.reward_scaler.rms.state_dict(),
                "reward_scaler_ret": self.reward_scaler.ret.tolist(),
                "env_steps": self.env_steps, "updates": self.updates, "target_steps": self.target_steps,
                "schedule_end": self.schedule_end,
                "consecutive_faults": self.consecutive_faults, "train_wall_s": self.train_wall_s,
                "best_eval_return": self.best_eval_return,
                **({"critic_kfac_fallbacks": self.critic.fitter.curvature.fallbacks}
                   if isinstance(self.critic.fitter, KFACRegression) else {}),
                # Everything needed to continue bit-exactly (learn(..., reset=False) after load; CLI --resume):
                "sampler": sampler_state,
            }
            tensors = {"policy": self.policy.state_dict(), "critic": self.critic.state_dict(),
                       "critic_optimizer": self.critic.fitter.state_dict(),
                       "rng": {"generator": self.generator.get_state(),
                               "cpu_generator": self.update_generator.get_state(),
                               **({"sampling_generator": self.sampling_generator.get_state()}
                                  if self.sampling_generator is not self.generator else {})},
                       "actor_update": {name: part.state_dict()
                                        for name, part in stateful_update_parts(self.actor_update).items()}}
            file = checkpoint.write(path, meta, tensors)
            self._checkpointed = (file, self.updates)
            if not checkpoint.is_file_path(path):
                checkpoint.write_json(os.path.join(path, checkpoint.CONFIG_JSON), _config_json(meta))
            return file

    def _sampler_state(self) -> dict[str, Any] | None:
        """The sampler's resume state (the one loaded with the agent, before a sampler is built)."""
        return self._saved_sampler if self._sampler is None else self._sampler.state_dict()

    @classmethod
    def _from_checkpoint(cls, meta: dict[str, Any], tensors: dict[str, Any], action_mask=None,
                         changes: dict[str, Any] | None = None) -> "Agent":
        agent = cls.__new__(cls)
        recorded = Config.from_dict(without_inert_settings(meta["config"], meta["action_space"]))
        config = _loaded_config(recorded, changes or {})
        if config.env.action_mask == CALLABLE_MASK and not callable(action_mask):
            raise ValueError("this agent was trained with a callable action mask: pass it again, "
                             "natpg.load(path, action_mask=fn)")
        agent.action_mask_fn = action_mask if callable(action_mask) else None
        spaces = space_from_dict(meta["observation_space"]), space_from_dict(meta["action_space"])
        warn_unread(config, meta["env_id"], changes or {}, spaces, reference=recorded)
        agent._build(meta["env_id"], meta["seed"], config, *spaces)
        agent.policy.load_state_dict(tensors["policy"])
        agent.critic.load_state_dict(tensors["critic"])
        agent.critic.fitter.load_state_dict(tensors["critic_optimizer"])
        agent.obs_normalizer.rms.load_state_dict(meta["obs_normalizer"])
        agent.reward_scaler.rms.load_state_dict(meta["reward_scaler"])
        agent.env_steps, agent.updates = int(meta["env_steps"]), int(meta["updates"])
        agent.target_steps, agent.schedule_end = meta.get("target_steps"), meta.get("schedule_end")
        ret = np.asarray(meta.get("reward_scaler_ret", []), np.float64)
        if ret.shape == agent.reward_scaler.ret.shape:  # per copy: a run loaded with other n_envs starts them at 0
            agent.reward_scaler.ret = ret
        agent.consecutive_faults = int(meta.get("consecutive_faults", 0))
        agent.train_wall_s = float(meta.get("train_wall_s", 0.0))
        agent.best_eval_return = meta.get("best_eval_return")
        if isinstance(agent.critic.fitter, KFACRegression):  # its count of fallbacks goes on (critic/kfac_fallbacks)
            agent.critic.fitter.curvature.fallbacks = int(meta.get("critic_kfac_fallbacks", 0))
        agent._saved_sampler = meta.get("sampler")
        if "rng" in tensors:
            rng = tensors["rng"]
            # The rollouts' actions are drawn on the CPU wherever the run learns: by ``generator`` on a CPU run,
            # by ``sampling_generator`` beside a GPU run's CUDA ``generator``. Either goes on across devices.
            sampling = rng.get("sampling_generator", rng["generator"])
            if sampling.numel() == agent.sampling_generator.get_state().numel():
                agent.sampling_generator.set_state(sampling)
            if agent.generator is not agent.sampling_generator \
                    and rng["generator"].numel() == agent.generator.get_state().numel():  # CUDA's, on a GPU
                agent.generator.set_state(rng["generator"])
            agent.update_generator.set_state(rng["cpu_generator"])
        # A part's state (momentum, Adam's moments, K-FAC's factors) is restored into a part of the kind that wrote
        # it; one that the changes replaced (natpg.load(path, step='adam')) starts afresh.
        written_by = {name: type(part) for name, part in
                      stateful_update_parts(make_actor_update(recorded, None)).items()} if changes else None
        for name, part in stateful_update_parts(agent.actor_update).items():
            if name in tensors.get("actor_update", {}) and (written_by is None or written_by.get(name) is type(part)):
                part.load_state_dict(tensors["actor_update"][name])
        return agent


KFAC_WIDE_INPUT = 1024  # flat observation entries above which K-FAC's O(n³) factor inversions dominate an update


def _check_batch_memory(config: Config, width: int) -> None:
    """Refuse a batch whose observations alone (stored twice, as float32: each one and the next) cannot fit in this
    machine's memory: numpy's allocation would otherwise fail at the first rollout, after a checkpoint is written."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare with
        return
    needed = 2 * config.batch_size * width * 4
    if needed > memory:
        raise ValueError(f"a batch of n_envs × n_steps = {config.batch_size} observations of {width} values needs "
                         f"{needed / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB of memory; "
                         f"lower n_envs or n_steps")


def _warn_wide_kfac_input(config: Config, inputs: int) -> None:
    """K-FAC inverts an (n+1)² factor for a first layer of n inputs, at every critic minibatch for ACKTR's critic:
    with a flattened image's thousands of inputs an update takes minutes (the audit measured 4 s at n = 1024 and
    31 s at n = 2304 on 2 cores, against seconds for the other curvatures). A CNN's own layers are K-FAC's design."""
    c = config.curvature
    users = [name for name, uses in [
        ("the policy's", config.step.step != "ppo_clip" and (c.fisher == "kfac" or c.cg_preconditioner == "kfac")),
        ("the critic's", config.critic.critic_optimizer == "kfac")] if uses]
    if users and inputs >= KFAC_WIDE_INPUT:
        warn(f"K-FAC inverts {' and '.join(users)} first-layer factor of ({inputs} + 1)² entries, at "
             f"O({inputs}³), each update (minutes at a few thousand inputs). For flat images prefer "
             f"[C, H, W] uint8 frames (a CNN), critic_optimizer='adam' or fisher='cg'", UserWarning)


def _layout(net: torch.nn.Module) -> tuple[str, dict[str, tuple[int, ...]]]:
    """A network's class and the shape of each tensor of its state: what must match for a checkpoint to load."""
    return type(net).__name__, {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _warn_bounds_without_zero(space: gym.spaces.Box) -> None:
    """The Gaussian policy starts centred on 0 with σ about 1: where a Box's bounds leave 0 out, every early action
    is clipped onto the same bound and nothing is learned about that dimension."""
    low, high = np.broadcast_to(space.low, space.shape).ravel(), np.broadcast_to(space.high, space.shape).ravel()
    if outside := np.flatnonzero((low > 0) | (high < 0)).tolist():
        warn(f"the action bounds of dimension(s) {outside} ({space}) leave out 0, where the Gaussian policy "
             f"starts: with action_squash='clip' its first actions are all clipped onto one bound there. "
             f"Rescale the actions to about [-1, 1] (gymnasium.wrappers.RescaleAction in a registered "
             f"factory) or use action_squash='tanh'", UserWarning)


def _policy_stats(policy: torch.nn.Module) -> dict[str, float]:
    """The exploration noise of a Gaussian policy, mean σ over the action dimensions: where it stays high,
    noisy actions can cost more than they earn (Ant's control cost) and the agent learns to end episodes."""
    log_std = getattr(policy, "log_std", None)
    return {} if log_std is None else {"policy/std": float(log_std.detach().exp().mean())}


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


class NPG(Agent):
    """Natural policy gradient (Kakade 2001): d = F⁻¹g by CG on exact Fisher products, KL-budget or fixed step."""

    algorithm = "npg"


class TRPO(Agent):
    """TRPO (Schulman et al. 2015): the NPG direction with a backtracking line search on KL and surrogate."""

    algorithm = "trpo"


class VPG(Agent):
    """Vanilla policy gradient: the standard gradient (identity curvature) with a fixed step, or Adam where the
    presets choose it (MuJoCo, Pendulum)."""

    algorithm = "vpg"


class ACKTR(Agent):
    """ACKTR (Wu et al. 2017): K-FAC natural gradient with a clipped trust-region step and momentum for the
    actor, and a Gauss-Newton K-FAC step for the critic (an Adam critic where the presets choose it: Atari,
    Walker2d, Ant, HalfCheetah)."""

    algorithm = "acktr"


class NAC(Agent):
    """Natural actor-critic (Peters & Schaal 2008): the compatible critic's least-squares weights w are the
    natural gradient, w = (F_emp + λI)⁻¹g; KL-budget or fixed step (natpg.nac, docs/nac.md)."""

    algorithm = "nac"


class PPO(Agent):
    """PPO (Schulman et al. 2017): the clipped surrogate over minibatch epochs of Adam (first-order baseline)."""

    algorithm = "ppo"


ALGORITHM_CLASSES: dict[str, type[Agent]] = {"npg": NPG, "trpo": TRPO, "vpg": VPG, "acktr": ACKTR, "nac": NAC,
                                             "ppo": PPO}


# Settings the saved state is made by (the networks' shapes, their initial σ, the inputs the normaliser's statistics
# scale): loading cannot change them.
SHAPED_BY_CHECKPOINT = ("hidden", "critic_hidden", "activation", "action_squash", "action_mask", "critic_optimizer",
                        "log_std_init", "normalize_obs", "algorithm")


def _loaded_config(recorded: Config, changes: dict[str, Any]) -> Config:
    """The recorded config with ``changes`` (natpg.load's keywords); a run trained on CUDA loads on the CPU, with a
    warning, where CUDA is not available and no device was asked for."""
    fixed = sorted(set(changes) & set(SHAPED_BY_CHECKPOINT))
    if fixed:
        raise ValueError(f"natpg.load cannot change {fixed}: the saved networks, optimiser state and observation "
                         f"statistics were made with them (train a new agent instead)")
    if "device" not in changes and recorded.run.device.startswith("cuda") and not torch.cuda.is_available():
        warn(f"this run was trained with device={recorded.run.device!r} and CUDA is not available here: "
             f"loaded on the CPU (natpg.load(path, device=...) chooses)", UserWarning)
        changes = {**changes, "device": "cpu"}
    return recorded.override(**changes).validate()


@torch.inference_mode(False)  # trainable tensors, also where a model is loaded for inference
def load(path: str, action_mask=None, **changes: Any) -> Agent:
    """Load a checkpoint written by ``Agent.save``; the algorithm class is recorded inside. ``action_mask``: the
    callable mask a run was trained with (callables are not saved; an info-key mask needs nothing).

    ``changes`` continue the run with other settings, e.g. ``natpg.load(path, max_kl=0.005, device="cpu")``: the
    networks, optimiser and normaliser statistics are the checkpoint's, every part is built from the changed
    settings (a step rule or curvature of another kind starts without the saved momentum, moments or factors;
    other ``n_envs`` go on from freshly reset environments), and the agent records them. Learning on into the
    run's own directory is then refused as another run (give a new out_dir), except where only the ``BOOKKEEPING``
    settings (logging, checkpoints, evaluation) changed. Settings the saved networks are shaped by
    (``SHAPED_BY_CHECKPOINT``) cannot change. A run trained on CUDA loads on the CPU, with a warning, where CUDA is
    not available."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a run directory or a .pt checkpoint file, got {path!r}")
    path = os.fspath(path)
    meta, tensors = checkpoint.read(path)
    _warn_edited_config_json(path, meta)
    meta = _nac_that_ran_ppo(meta)
    algo = meta.get("algorithm")
    if algo not in ALGORITHM_CLASSES:
        raise ValueError(f"checkpoint at {path!r} is for algorithm {algo!r}, unknown to this natpg "
                         f"(known: {sorted(ALGORITHM_CLASSES)})")
    try:
        return ALGORITHM_CLASSES[algo]._from_checkpoint(meta, tensors, action_mask, changes)
    except KeyError as exc:
        raise ValueError(f"checkpoint at {path!r} lacks the entry {exc} (written by another natpg version?)") from None
    except (RuntimeError, TypeError) as exc:  # tensors that do not fit the recorded config
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # torch: a header, then a line
        raise ValueError(f"checkpoint at {path!r} is inconsistent with its recorded config: "  # per tensor
                         f"{' '.join(lines[:4])}{' …' if len(lines) > 4 else ''}") from None


def _nac_that_ran_ppo(meta: dict[str, Any]) -> dict[str, Any]:
    """Before natpg refused it, nac with step='ppo_clip' ran PPO's update under nac's name: such a run loads as the
    PPO run it was, with a warning."""
    step = (meta.get("config") or {}).get("step")
    if meta.get("algorithm") != "nac" or not isinstance(step, dict) or step.get("step") != "ppo_clip":
        return meta
    warn("this run was recorded as nac with step='ppo_clip', which natpg ran as PPO before refusing it: "
         "it loads as the PPO run it was", UserWarning)
    return {**meta, "algorithm": "ppo", "config": {**meta["config"], "algorithm": "ppo"}}


def _config_json(meta: dict[str, Any]) -> dict[str, Any]:
    """What a run directory's config.json holds: the run's identity and settings, from the checkpoint's metadata."""
    return {"algorithm": meta["algorithm"], "env_id": meta["env_id"], "seed": meta["seed"], **meta["config"]}


def _warn_edited_config_json(path: str, meta: dict[str, Any]) -> None:
    """config.json records a run's settings for people; the checkpoint's are the ones read. Say so when they
    differ (someone edited config.json expecting it to change the run)."""
    file = os.path.join(path, checkpoint.CONFIG_JSON)
    if checkpoint.is_file_path(path) or not os.path.isfile(file):
        return
    try:
        recorded = json.loads(json.dumps(_config_json(meta)))
    except KeyError:  # a checkpoint without them: loading it says so
        return
    try:
        with open(file) as f:
            shown = json.load(f)
    except (OSError, ValueError):
        shown = None
    if not isinstance(shown, dict):
        differ = ["(unreadable)"]
    else:
        # by setting name (unique across sections); env_kwargs, a dict inside a section, is compared whole
        flat = lambda d: {k2: v2 for k, v in d.items()  # noqa: E731
                          for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}
        a, b = flat(recorded), flat(shown)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        warn(f"{file} differs from the settings recorded in the checkpoint ({', '.join(differ)}): natpg "
             f"reads the checkpoint's, and writes them back to config.json at its next save. To continue "
             f"with other settings: natpg.load(dir, setting=value), into a new out_dir unless only "
             f"{', '.join(BOOKKEEPING)} change", RuntimeWarning)


def _run_callback(callback, agent: Agent, row: dict[str, Any]) -> tuple[dict[str, Any], bool, BaseException | None]:
    """The callback on an update's row, which it sees first (numbers it adds, row["custom/x"] = ..., are logged
    with it): (the row to log, whether to stop, what it raised). What it raises goes on only after the complete
    update is logged and saved; a change to natpg's own columns is refused and the row logged as natpg wrote it."""
    if callback is None:
        return row, False, None
    before = dict(row)
    try:
        said = callback(agent, row)
    except BaseException as exc:
        return row, True, exc
    if changed := [k for k, v in before.items() if k not in row or row[k] is not v]:
        return before, True, ValueError(f"the callback changed natpg's own columns {changed}: add keys of your own "
                                        f"instead (row['custom/...'] = value)")
    if isinstance(said, str):  # "stop"? "continue"? A logging callback's number (f.write's) goes on, as before
        return row, True, ValueError(f"the callback returned {said!r}: return False to stop training, True or "
                                     f"None to go on")
    return row, is_flag(said) and not said, None


def _one_callback(callback: Any):
    """``callback``, checked; a list or tuple of them as one (SB3's CallbackList): each called in order on the same
    row, every one of them each update; training stops if any returns False, and a string from any is the error it
    would be alone."""
    if not isinstance(callback, (list, tuple)):
        _check_callback(callback)
        return callback
    callbacks = tuple(callback)
    for one in callbacks:
        _check_callback(one)

    def every(agent: Agent, row: dict[str, Any]) -> Any:
        said = [one(agent, row) for one in callbacks]
        text = next((s for s in said if isinstance(s, str)), None)
        return text if text is not None else not any(is_flag(s) and not s for s in said)

    return every


def _check_callback(callback: Any) -> None:
    """``callback(agent, row)`` is called after every update: a wrong signature is an error now, not after the
    first update's rollout."""
    if not callable(callback):
        raise ValueError(f"callback must be callable as callback(agent, row), got {callback!r}")
    try:
        inspect.signature(callback).bind(None, None)
    except TypeError as exc:
        raise ValueError(f"callback {callback!r} cannot be called as callback(agent, row): {exc}") from None
    except ValueError:  # a builtin without a signature: it will tell at its first call
        pass
