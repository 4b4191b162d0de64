"""Generalised advantage estimation (Schulman et al. 2016) as pure tensor functions."""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        done: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) over a rollout of T steps from N environment copies.

    Shapes: every input is [T, N]. ``next_values[t]`` is V(s_{t+1}) of the observation that followed step
    t — for a step that ended an episode, V of the episode's final observation. ``terminated`` zeroes the
    bootstrap (a true terminal state has no future); ``done = terminated | truncated`` cuts the λ-trace
    so that advantages never run across an episode boundary, and the trace also stops at the rollout's
    end (the last step's δ bootstraps from V(s_T)). Returns (advantages, returns = advantages + values).

        δ_t = r_t + γ (1 − terminated_t) V(s_{t+1}) − V(s_t)
        A_t = δ_t + γ λ (1 − done_t) A_{t+1},   A_T = 0
    """
    not_term = 1.0 - terminated.to(values.dtype)
    not_done = 1.0 - done.to(values.dtype)
    deltas = rewards + gamma * not_term * next_values - values
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[0])
    for t in range(values.shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * lam * not_done[t] * running
        adv[t] = running
    return adv, adv + values


def normalize_advantages(adv: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(A − mean) / (std + eps); a batch of one (std undefined) is only centred, never NaN.

    Advantages that are all equal (a bandit with a constant reward) give zeros, the centred batch they are:
    (A − mean) of equal values is the mean's rounding error, and dividing it by its own std would blow it up
    to ±1, a full step on nothing. A spread of a single rounding step is a signal like any other."""
    if adv.numel() < 2:
        return adv - adv.mean()
    if bool(adv.max() == adv.min()):
        return torch.zeros_like(adv)
    return (adv - adv.mean()) / (adv.std() + eps)
