"""Flat views of an explicit list of parameters (the actor's), in ``actor_parameters()`` order."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def finite(*tensors: torch.Tensor) -> bool:
    """Whether every entry of every tensor is finite (a step, a gradient, a batch natpg may use)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one vector [P]."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a vector [P] into views shaped like ``like``."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[i : i + n].view_as(t))
        i += n
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, parameters have {i}")
    return out


def num_params(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def get_flat(params: Sequence[nn.Parameter]) -> torch.Tensor:
    return flatten([p.detach() for p in params]).clone()


@torch.no_grad()
def set_flat(params: Sequence[nn.Parameter], vec: torch.Tensor) -> None:
    """Copy ``vec`` into the parameters (bit-exact: a plain copy, no arithmetic)."""
    for p, v in zip(params, unflatten(vec, params)):
        p.copy_(v)


@torch.no_grad()
def add_flat(params: Sequence[nn.Parameter], vec: torch.Tensor, scale: float = 1.0) -> None:
    for p, v in zip(params, unflatten(vec, params)):
        p.add_(v, alpha=scale)


def parameter_names(module: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """Names (as in ``module.named_parameters()``) of an explicit parameter list, for functional calls."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"actor parameters at positions {missing} are not parameters of the policy module")
    return [by_id[id(p)] for p in params]
