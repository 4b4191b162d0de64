"""A trained policy as a plain torch module, for use without natpg: observations in, the environment's actions out.

``natpg.export(agent)`` copies what ``agent.predict(obs)`` (deterministic) computes into one ``nn.Module`` of
buffers and the policy network: the frozen observation normalisation, the network, the greedy action, and the
clipping or tanh rescaling into the action space's bounds. Nothing of it calls natpg, numpy or Gymnasium at run
time: ``torch.export.export`` (a dynamic batch dimension too) gives a program that ``torch.export.save`` writes and
``torch.export.load`` runs without natpg installed; ``torch.save`` of the module itself pickles natpg's classes.
"""

from __future__ import annotations

import copy
import io
import math
import os

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from .policies import integer_range


class ExportedPolicy(nn.Module):
    """``forward(obs[, action_mask])`` → actions [B, *action_shape], equal to ``agent.predict(obs)`` row by row.

    ``obs`` is a batch [B, *shape] of the agent's Box observations as the environment gives them (any dtype; an
    image as its uint8 frame), or, for a Dict, Tuple or Discrete observation space, of
    ``gymnasium.spaces.flatten(space, obs)`` vectors [B, flatdim] (a program ``write_program`` saves takes them, and
    masks, as float32). A policy trained with action masking takes
    ``action_mask`` [B, n] (1 = allowed) as its second argument. The actions have the action space's dtype (int64
    for Discrete); a Gaussian policy's are its mean, clipped to the bounds or tanh-rescaled into them as in
    training."""

    def __init__(self, agent) -> None:
        super().__init__()
        obs_space, act_space = agent.observation_space, agent.action_space
        self.policy = copy.deepcopy(agent.policy).to("cpu").eval()
        for p in self.policy.parameters():
            p.requires_grad_(False)
        self.obs_shape = tuple(obs_space.shape) if isinstance(obs_space, gym.spaces.Box) \
            else (int(gym.spaces.flatdim(obs_space)),)
        self.obs_width = math.prod(self.obs_shape)
        self.masked = agent.config.env.action_mask is not None
        self.n_actions = int(act_space.n) if self.masked else 0
        norm = agent.obs_normalizer
        self.normalize, self.clip, self.passthrough = bool(norm.enabled), float(norm.clip), int(norm.passthrough)
        # float64, as natpg normalises: the same float32 inputs reach the network
        self.register_buffer("obs_mean", torch.tensor(np.asarray(norm.rms.mean), dtype=torch.float64))  # copies
        self.register_buffer("obs_scale", torch.sqrt(torch.tensor(np.asarray(norm.rms.var), dtype=torch.float64)
                                                     + 1e-8))
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        self.action_shape = tuple(act_space.shape)
        self.action_dtype = torch.int64 if self.discrete else torch.from_numpy(np.zeros(0, act_space.dtype)).dtype
        self.box = isinstance(act_space, gym.spaces.Box)
        self.squash = bool(getattr(agent.policy, "squash", False))
        self.integer = self.box and act_space.dtype.kind in "ui"
        if self.box:  # env_action's arithmetic: the float32 action against the bounds in their own float type
            bound = np.float64 if self.integer or self.squash else act_space.dtype  # (tanh and integers in float64)
            self.register_buffer("low", torch.from_numpy(np.array(act_space.low, bound)))
            self.register_buffer("high", torch.from_numpy(np.array(act_space.high, bound)))
            self.work_dtype = torch.promote_types(torch.float32, self.low.dtype)
            self.integer_range = integer_range(act_space.dtype) if self.integer else (0.0, 0.0)

    def forward(self, obs: torch.Tensor, action_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(obs, action_mask)
        x = obs.reshape(obs.shape[0], self.obs_width).to(torch.float64)
        if self.masked:
            x = torch.cat([x, action_mask.to(torch.float64)], dim=1)
        if self.normalize:  # the statistics span the appended mask too, whose entries pass through
            z = ((x - self.obs_mean) / self.obs_scale).clamp(-self.clip, self.clip)
            if self.passthrough:
                z = torch.cat([z[:, : -self.passthrough], x[:, -self.passthrough :]], dim=1)
            x = z
        act = self.policy.mode(self.policy(x.to(torch.float32)))
        if self.discrete:
            return act.to(torch.int64)
        act = act.reshape(act.shape[0], *self.action_shape)
        if self.box:  # policies.env_action in torch (the tests hold the two to the same actions on every space)
            if self.squash:
                act = self.low + (torch.tanh(act.to(torch.float64)) + 1.0) * 0.5 * (self.high - self.low)
            act = torch.maximum(torch.minimum(act.to(self.work_dtype), self.high), self.low)
            if self.integer:  # to the nearest value, not truncated towards 0
                act = torch.round(act).clamp(*self.integer_range)
        return act.to(self.action_dtype)

    def _check(self, obs, action_mask) -> None:
        """Clear errors for inputs predict would refuse, instead of torch's from a reshape or a matmul (static under
        torch.export: shapes but the batch are fixed)."""
        shape = "".join(f", {d}" for d in self.obs_shape)
        if not isinstance(obs, torch.Tensor):
            raise TypeError(f"obs must be a torch.Tensor batch [B{shape}], got {type(obs).__name__} "
                            f"(torch.as_tensor(obs))")
        if obs.dim() != len(self.obs_shape) + 1 or tuple(obs.shape[1:]) != self.obs_shape:
            one = " (one observation: obs.unsqueeze(0))" if tuple(obs.shape) == self.obs_shape else ""
            raise ValueError(f"obs must be a batch [B{shape}], got shape {tuple(obs.shape)}{one}")
        if not self.masked:
            if action_mask is not None:
                raise ValueError("action_mask given, but this policy was trained without action masking")
            return
        if action_mask is None:
            raise ValueError("this policy was trained with action masking: pass action_mask [B, n] (1 = allowed)")
        if not isinstance(action_mask, torch.Tensor) or action_mask.dim() != 2 \
                or action_mask.shape[1] != self.n_actions or action_mask.shape[0] != obs.shape[0]:
            got = tuple(action_mask.shape) if isinstance(action_mask, torch.Tensor) else type(action_mask).__name__
            raise ValueError(f"action_mask must be a torch.Tensor [B, {self.n_actions}] for the batch of "
                             f"{obs.shape[0]} observations, got {got}")


def export(agent) -> ExportedPolicy:
    """The agent's deterministic policy as a standalone ``nn.Module`` (``ExportedPolicy``), on the CPU, its weights
    and normalisation statistics copied: later training of ``agent`` does not change it."""
    return ExportedPolicy(agent)


def write_program(agent, path: str) -> str:
    """``torch.export`` the agent's exported policy with a dynamic batch dimension and save the program to ``path``
    (a .pt2 file): ``torch.export.load(path).module()(obs[, action_mask])`` runs it, natpg not needed. Returns a
    description of the inputs it takes."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory: give the program file, e.g. {os.path.join(path, 'policy.pt2')!r}")
    if not path.lower().endswith(".pt2"):
        raise ValueError(f"the program file's name must end in .pt2 (torch.export's archive), got {path!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"cannot write {path!r}: its folder {os.path.dirname(os.path.abspath(path))!r} does not exist")
    module = export(agent)
    space = agent.observation_space
    dtype = torch.from_numpy(np.zeros(0, space.dtype)).dtype if isinstance(space, gym.spaces.Box) else torch.float32
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, *module.obs_shape, dtype=dtype),)
    takes = f"obs [B{''.join(f', {d}' for d in module.obs_shape)}] ({dtype})"
    if module.masked:
        args += (torch.ones(2, module.n_actions),)
        takes += f", action_mask [B, {module.n_actions}] (torch.float32; 1 = allowed)"
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
    archive = io.BytesIO()  # written by Python's open: a full disk or a read-only folder is an OSError naming the file
    torch.export.save(program, archive)
    with open(path, "wb") as f:
        f.write(archive.getvalue())
    return takes
