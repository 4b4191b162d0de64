"""Numerical faults never reach the parameters: an update that fails is undone bit-exactly from a copy.

An actor update that reports a fault (``step/skipped`` with ``step/fault``), raises a numerical error or leaves a
non-finite parameter or KL behind is undone with the step's own state (``ActorSnapshot``); a critic fit whose
loss or parameters end non-finite is undone with its optimiser state. Each such iteration is logged with its
reason (``fault_of``), and the agent counts consecutive faults.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .algorithms import Batch
from .errors import first_line
from .params import finite
from .steps import skipped


def finite_module(module: nn.Module) -> bool:
    return finite(*(p.detach() for p in module.parameters()))


def restore_parameters(module: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(module.parameters(), saved):
            p.copy_(s)


def numerical_error(exc: BaseException) -> str | None:
    """The reason, when an exception raised inside an update is a numerical fault rather than a bug: a value
    that overflows the parameters' dtype, a distribution built from NaN/inf parameters, a failed factorisation."""
    msg = first_line(exc)
    if isinstance(exc, torch.linalg.LinAlgError) or (isinstance(exc, RuntimeError) and "overflow" in msg) or \
            (isinstance(exc, ValueError) and "invalid values" in str(exc)):
        return f"{type(exc).__name__}: {msg[:200]}"
    return None


def stateful_update_parts(actor_update: Any) -> dict[str, Any]:
    """Parts of an actor update that carry state across updates and can save it (``state_dict``)."""
    parts = {"update": actor_update, "step_rule": getattr(actor_update, "step_rule", None),
             "curvature": getattr(actor_update, "curvature", None)}
    return {k: v for k, v in parts.items() if hasattr(v, "state_dict") and hasattr(v, "load_state_dict")}


def step_state_of(actor_update: Any) -> dict[str, tuple[Any, Any]]:
    """A copy of what the actor update's step carries to the next update (PPO's Adam moments, the Adam step rule's,
    ACKTR's momentum), each with its part, to undo with the parameters (``restore_step_state``). The curvature's
    state is not copied (K-FAC's moving averages: it leaves a non-finite batch out of them by itself)."""
    return {name: (part, copy.deepcopy(part.state_dict()))
            for name, part in stateful_update_parts(actor_update).items() if name != "curvature"}


def restore_step_state(actor_update: Any, saved: dict[str, tuple[Any, Any]]) -> None:
    for part, state in saved.values():
        part.load_state_dict(state)


class ActorSnapshot:
    """What undoing an actor update puts back, copied before it: the policy's parameters, the step's own state
    (``step_state_of``) and the update generator's draws. K-FAC's moving averages are not copied (a non-finite
    batch is left out of them by K-FAC itself; an interrupted update's fit stays)."""

    def __init__(self, policy: nn.Module, actor_update: Any, generator: torch.Generator | None = None):
        self.policy, self.actor_update, self.generator = policy, actor_update, generator
        self.parameters = [p.detach().clone() for p in policy.parameters()]
        self.step_state = step_state_of(actor_update)
        self.draws = generator.get_state() if generator is not None else None

    def restore_actor(self) -> None:
        """Undo a faulty step: the parameters and the step's state (its draws stay drawn, as in a good step)."""
        restore_parameters(self.policy, self.parameters)
        restore_step_state(self.actor_update, self.step_state)

    def restore(self) -> None:
        """Undo an interrupted update whole, the generator's draws too."""
        self.restore_actor()
        if self.generator is not None:
            self.generator.set_state(self.draws)


def guarded_actor_update(actor_update, policy: nn.Module, batch: Batch, snapshot: ActorSnapshot | None = None
                         ) -> dict[str, Any]:
    """``actor_update.update(policy, batch)``, undone to ``snapshot`` (a copy taken here when None) when it
    reports a fault, raises a numerical error or leaves a non-finite parameter or KL behind. Always returns
    ``step/skipped`` (0 or 1); ``step/fault`` names the reason."""
    snapshot = snapshot or ActorSnapshot(policy, actor_update)
    try:
        stats = actor_update.update(policy, batch)
    except (RuntimeError, ValueError) as exc:
        reason = numerical_error(exc)
        if reason is None:
            raise
        stats = skipped(f"numerical error in the actor update ({reason})")
    fault = stats.get("step/fault") if stats.get("step/skipped") else None
    if fault is None and not finite_module(policy):
        fault = "non-finite parameters after the step"
    if fault is None and not math.isfinite(float(stats.get("step/kl", 0.0))):
        fault = "non-finite KL after the step (the stepped policy is not finite)"
    if fault is not None:
        snapshot.restore_actor()
        stats = {**stats, **skipped(fault)}
    stats.setdefault("step/skipped", 0.0)
    return stats


def critic_snapshot(critic: nn.Module):
    return [p.detach().clone() for p in critic.parameters()], copy.deepcopy(critic.fitter.state_dict())


def critic_restore(critic: nn.Module, snapshot) -> None:
    params, fitter_state = snapshot
    restore_parameters(critic, params)
    critic.fitter.load_state_dict(fitter_state)


def guarded_critic_fit(critic: nn.Module, batch: Batch, generator: torch.Generator, snapshot=None
                       ) -> dict[str, Any]:
    """``critic.fit``, undone (parameters and optimiser state, to ``snapshot`` or a copy taken here) when its
    loss or parameters end non-finite."""
    snapshot = snapshot or critic_snapshot(critic)
    try:
        stats = critic.fit(batch.obs, batch.ret, generator)
    except (RuntimeError, ValueError) as exc:
        reason = numerical_error(exc)
        if reason is None:
            raise
        stats = {"critic/loss_after": float("nan"), "critic/error": reason}
    loss = float(stats.get("critic/loss_after", 0.0))
    fault = None
    if "critic/error" in stats:
        fault = f"numerical error in the critic fit ({stats.pop('critic/error')})"
    elif not finite_module(critic):
        fault = "non-finite critic parameters after the fit"
    elif not math.isfinite(loss):
        fault = f"non-finite critic loss ({loss!r})"
    if fault is not None:
        critic_restore(critic, snapshot)
        return {**stats, "critic/skipped": 1.0, "critic/fault": fault}
    return {**stats, "critic/skipped": 0.0}


def fault_of(stats: dict[str, Any]) -> str | None:
    """The reason an iteration's update was (partly) skipped, or None."""
    reasons = dict.fromkeys(str(stats[k]) for k in ("step/fault", "critic/fault") if stats.get(k))  # once each
    return "; ".join(reasons) or None
