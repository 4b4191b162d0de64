"""Run directories: which run a directory (or a checkpoint file) holds, and whether an agent may write there.

A run goes on in its own directory; another run's outputs are never overwritten without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import TYPE_CHECKING, Any

from . import checkpoint
from .config import Config, is_path
from .errors import warn

if TYPE_CHECKING:
    from .agent import Agent

# How a run is logged, checkpointed and evaluated, not what it learns: a run continued with other values of these
# (natpg train --resume DIR --eval-every N, natpg.load(DIR, log_interval=2).learn(..., out_dir=DIR)) is the same
# run, and goes on in its own directory.
BOOKKEEPING = ("log_interval", "checkpoint_every", "tensorboard", "eval_every", "eval_episodes")


def without_inert_settings(config: dict[str, Any], action_space: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with the settings that did nothing put back to their defaults: checkpoints written before
    natpg refused them (config.REFUSED_WHEN_UNREAD: fvp_subsample beside K-FAC, a tanh squash of Discrete actions,
    target_kl outside PPO; more multiproc workers than copies, which were clamped) still load, and train exactly as
    they did. A config that is not natpg's is returned
    as it is (loading it reports what is wrong)."""
    try:
        cfg = Config.from_dict(config)
        reset = cfg.unread_refused_defaults(action_space.get("type"))
        if cfg.env.vectorization == "multiproc" and cfg.env.n_workers > cfg.env.n_envs:  # was clamped, now refused
            reset["n_workers"] = cfg.env.n_envs
    except (ValueError, TypeError, AttributeError, KeyError):
        return config
    return json.loads(json.dumps(cfg.override(**reset).to_dict()))


def check_out_dir(out_dir: Any) -> str:
    """``out_dir`` as a path, or a ValueError when it cannot be a run directory."""
    if not is_path(out_dir):
        raise ValueError(f"out_dir must be a directory path, got {out_dir!r}")
    out_dir = os.fspath(out_dir)
    if checkpoint.is_file_path(out_dir):
        raise ValueError(f"out_dir {out_dir!r} must be a directory (a path ending in .pt names one checkpoint "
                         f"file, as agent.save writes)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"out_dir {out_dir!r} cannot be made: {parent!r} is a file")
    return out_dir


def claim_run_dir(agent: Agent, out_dir: Any, overwrite: bool = False, by: str = "learn") -> bool:
    """Check ``out_dir`` before anything is written there. True: it holds an earlier state of ``agent``'s own
    run (same algorithm, environment, seed and config, at most as many env steps), whose log is continued, with
    ``overwrite`` too. False: it is new, or holds none of natpg's outputs, or held another run and ``overwrite``
    deleted those outputs (``checkpoint.RUN_OUTPUTS``, nothing else). Another run without ``overwrite`` is a
    ValueError: never lost data; so are files with natpg's names but no natpg checkpoint or config.json beside
    them (another tool's tb/ or progress.csv), even with ``overwrite``. ``by``: 'learn', 'save' or 'resume' (the
    CLI's ``--resume DIR --out NEW``, where an older copy of the run in NEW is refused, or with ``overwrite``
    replaced, rather than continued after a gap), for the error's words."""
    out_dir = check_out_dir(out_dir)
    held = [name for name in checkpoint.RUN_OUTPUTS if os.path.lexists(os.path.join(out_dir, name))]
    if not held:
        return False
    if holds_this_run(agent, out_dir, held, overwrite, by):
        return True
    for name in held:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return False


def holds_this_run(agent: Agent, path: str, held: list[str], overwrite: bool, by: str, file: bool = False) -> bool:
    """True when ``path`` (a run directory holding ``held``, or with ``file`` a checkpoint file) holds an earlier
    state of ``agent``'s run; False when what it holds may be replaced: with ``overwrite``, or a run that failed
    before its first update (a cluster not reached, say: nothing to lose); else a ValueError naming it."""
    try:
        meta, _ = checkpoint.read(path)
    except (OSError, ValueError):
        meta = None
    if meta is not None and _continues(agent, meta):
        logged = not file and os.path.exists(os.path.join(path, checkpoint.PROGRESS_CSV))
        if logged and meta["env_steps"] < agent.env_steps:  # learn or save into it after calls without it
            if by == "resume":  # an older copy of the run resumed: refused, or replaced
                if overwrite:
                    return False
                raise ValueError(f"--out {path!r} holds this run's log up to env step {meta['env_steps']}, the run "
                                 f"resumed is at {agent.env_steps}: going on in it would leave a gap in its logs; "
                                 f"--overwrite replaces it with the resumed run's, or --resume {path!r} goes on "
                                 f"from its own checkpoint")
            warn(f"{path!r} holds this run's log up to env step {meta['env_steps']} (update {meta.get('updates')}), "
                 f"the agent is at {agent.env_steps} (update {agent.updates}): the updates between, trained "
                 f"without this directory, are not in its logs (progress.csv goes on after a gap, episodes.csv "
                 f"lacks their episodes, which ep_return_mean counts). Give a run's directory to every learn call "
                 f"(out_dir=...) to keep its whole log", UserWarning)
        return True
    natpgs = file or meta is not None or _holds_natpg_config(path)
    unstarted = meta is not None and meta.get("env_steps") == 0 and (file or _progress_rows(path) == 0)
    if overwrite and natpgs or unstarted:
        return False
    if not natpgs:  # tb/, best/, progress.csv of another tool (SB3 writes one) or the user: never deleted
        raise ValueError(f"{'out_dir' if by == 'learn' else 'directory'} {path!r} holds {', '.join(held)} but "
                         f"neither a readable natpg checkpoint nor natpg's config.json, so they may not be natpg's"
                         f"{' and overwrite does not delete them' if overwrite else ''}; choose another directory, "
                         f"or move them")
    what = (f"a natpg run ({meta.get('algorithm')} on {meta.get('env_id')}, seed {meta.get('seed')}, "
            f"{meta.get('env_steps')} env steps{_other_settings(agent, meta)})" if meta is not None
            else "a file that is not this run's" if file else f"natpg outputs ({', '.join(held)})")
    if by == "resume":
        raise ValueError(f"--out {path!r} already holds {what}; choose another --out, or replace it with "
                         f"--overwrite")
    if by == "learn":
        raise ValueError(f"out_dir {path!r} already holds {what}; choose another directory, continue that run "
                         f"(natpg.load(dir).learn(..., out_dir=dir); natpg train ... --resume DIR), or replace it "
                         f"with overwrite=True (natpg train --overwrite)")
    raise ValueError(f"{'file' if file else 'directory'} {path!r} already holds {what}; choose another path, or "
                     f"replace it with save(..., overwrite=True)")


def _holds_natpg_config(path: str) -> bool:
    """Whether the run directory ``path`` holds natpg's config.json (a run's identity: algorithm, environment,
    seed), the mark that its other outputs are natpg's too, when its checkpoint is unreadable."""
    try:
        with open(os.path.join(path, checkpoint.CONFIG_JSON)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"algorithm", "env_id", "seed"} <= config.keys()


def copy_run(src: str, dst: str) -> None:
    """Copy natpg's outputs (``checkpoint.RUN_OUTPUTS``) of the run in ``src`` into ``dst``, which holds none: a run
    continued in another directory (``natpg train --resume SRC --out DST``) keeps its whole log there, and the
    best policy its best return refers to; ``src`` is left as it was. A copy that fails (a full disk, Ctrl-C)
    deletes what it copied, so that the same command starts it again; the checkpoint goes last, so that one cut
    short by a kill leaves none, and the same command refuses ``dst`` rather than go on there without the logs."""
    names = [name for name in checkpoint.RUN_OUTPUTS if name != checkpoint.FILENAME] + [checkpoint.FILENAME]
    copied = []
    try:
        for name in names:
            path, target = os.path.join(src, name), os.path.join(dst, name)
            if not os.path.lexists(path):
                continue
            if os.path.lexists(target):  # claim_run_dir cleared dst: never copy over (or clean up) what was there
                raise FileExistsError(f"{target!r} exists: copy_run copies a run only into a directory without one")
            copied.append(target)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.copytree(path, target)
            else:
                shutil.copy2(path, target)
    except BaseException:
        for target in copied:
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                with contextlib.suppress(OSError):
                    os.remove(target)
        raise


def _changed_settings(agent: Agent, meta: dict[str, Any]) -> list[str] | None:
    """The settings (``'max_kl 0.01 → 0.005'``) in which ``agent`` differs from the run a checkpoint's metadata
    records, when it is the same algorithm, environment and seed; None when it is not, or not readable. The device
    (where a run computes: a CUDA run goes on on a CPU), the info_keys (what it records of its episodes) and the
    BOOKKEEPING settings are not what a run is."""
    if (meta.get("algorithm"), meta.get("env_id"), meta.get("seed")) != (agent.algorithm, agent.env_id, agent.seed):
        return None
    try:
        recorded = Config.from_dict(without_inert_settings(meta.get("config", {}), meta.get("action_space", {})))
    except (ValueError, TypeError, AttributeError):
        return None
    return [f"{k} {recorded.get(k)!r} → {agent.config.get(k)!r}" for k in Config.field_index()
            if recorded.get(k) != agent.config.get(k) and k not in ("device", "info_keys", *BOOKKEEPING)]


def _other_settings(agent: Agent, meta: dict[str, Any]) -> str:
    """', with other settings (max_kl 0.01 → 0.005)' where the run in a directory is ``agent``'s but for its
    settings (natpg.load(path, max_kl=...) makes such a run); else ''."""
    changed = _changed_settings(agent, meta)
    return f", with other settings ({', '.join(changed)}): a changed run goes to a new directory" if changed else ""


def _progress_rows(out_dir: str) -> int:
    """Rows of ``out_dir``'s progress.csv (0 when it is missing or holds only its header)."""
    try:
        with open(os.path.join(out_dir, checkpoint.PROGRESS_CSV)) as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)
    except OSError:
        return 0


def _continues(agent: Agent, meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's metadata is an earlier (or the same) state of the run ``agent`` is training."""
    return (_changed_settings(agent, meta) == [] and isinstance(meta.get("env_steps"), int)
            and meta["env_steps"] <= agent.env_steps)
