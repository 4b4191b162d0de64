"""The value network V(s) and its regression on returns."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .policies import linear_activation_pairs, mlp_backward, mlp_outputs, network


_ONE = torch.tensor(1.0)  # the step increment, as torch's foreach Adam passes it for step counts on the CPU


@torch.no_grad()
def adam_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()`` of a critic's Adam (``AdamRegression``'s: one group, foreach, no AMSGrad, weight decay,
    maximize or capturable) by torch's own foreach kernels in torch's order, so bit-identical to it (test),
    without ``Optimizer.step``'s per-call bookkeeping: a sixth of the critic fit at minibatches of 256 × 64,
    where per-call overhead, not arithmetic, dominates. Any other optimizer, a first step (no state yet) or
    a parameter without a gradient takes ``optimizer.step()``."""
    group = optimizer.param_groups[0]
    params = group["params"]
    states = [optimizer.state.get(p) for p in params]
    if (type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1 or not group["foreach"]
            or group["amsgrad"] or group["weight_decay"] or group["maximize"] or group["capturable"]
            or group["differentiable"] or group["fused"] or not all(states)
            or any(p.grad is None or not s["step"].is_cpu for p, s in zip(params, states))):
        optimizer.step()
        return
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    grads = [p.grad for p in params]
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, _ONE, alpha=1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = [(lr / (1 - beta1 ** step.item())) * -1 for step in steps]
    bias_correction2_sqrt = [(1 - beta2 ** step.item()) ** 0.5 for step in steps]
    denominator = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominator, bias_correction2_sqrt)
    torch._foreach_add_(denominator, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominator, step_size)


def minibatch_indices(n: int, epochs: int, size: int, generator: torch.Generator | None, device
                      ) -> Iterator[torch.Tensor]:
    """``epochs`` passes over n samples, each a fresh permutation (drawn from ``generator`` as its pass begins)
    cut into index tensors of ``size`` (the last one shorter) on ``device``: the loop of every minibatch fit."""
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, size):
            yield perm[start : start + size]


@torch.no_grad()
def mean_squared_error(critic: nn.Module, obs: torch.Tensor, returns: torch.Tensor) -> float:
    return float(((critic(obs) - returns) ** 2).mean())


class ValueCritic(nn.Module):
    """V(s) as an MLP (a Nature-CNN torso on images) with orthogonal init. ``fit`` regresses it on return targets
    by its ``fitter``, made from the network: ``AdamRegression`` (the default), PPO's ``ppo.ClippedRegression`` or
    ACKTR's ``acktr.KFACRegression``; ``fitter.state_dict()`` is its optimiser's state (what a checkpoint saves)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh", *, image=None,
                 fitter: Callable[[nn.Module], Any] | None = None):
        super().__init__()
        self.net = network(obs_dim, 1, hidden, activation, 1.0, image)
        self.fitter = (fitter or AdamRegression)(self.net)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)

    def fit(self, obs: torch.Tensor, returns: torch.Tensor, generator: torch.Generator | None = None
            ) -> dict[str, float]:
        """Regress V on ``returns`` [B] at ``obs`` [B, D]: the critic/* columns of the fit."""
        return self.fitter.fit(self, obs, returns, generator)


class AdamRegression:
    """Minimise mean (V(s) − R)² over ``epochs`` shuffled passes of ``minibatch`` samples with Adam."""

    def __init__(self, net: nn.Module, lr: float = 1e-3, epochs: int = 10, minibatch: int = 256):
        self.lr, self.epochs, self.minibatch = lr, epochs, minibatch
        # foreach: one call per Adam operation for all tensors, not one per tensor; on the CPU the same
        # kernels run in the same order, so the fit is bit-identical to the default loop, and cheaper.
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)
        self._mlp = linear_activation_pairs(net)

    def fit(self, critic: ValueCritic, obs: torch.Tensor, returns: torch.Tensor,
            generator: torch.Generator | None = None) -> dict[str, float]:
        before = mean_squared_error(critic, obs, returns)
        for idx in minibatch_indices(obs.shape[0], self.epochs, self.minibatch, generator, obs.device):
            if self._mlp is not None:
                self._set_squared_error_gradients(obs[idx], returns[idx])
            else:
                loss = ((critic(obs[idx]) - returns[idx]) ** 2).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            adam_step(self.optimizer)
        return {"critic/loss_before": before, "critic/loss_after": mean_squared_error(critic, obs, returns)}

    @torch.no_grad()
    def _set_squared_error_gradients(self, obs: torch.Tensor, returns: torch.Tensor) -> None:
        """Each parameter's ``.grad`` of mean (V(s) − R)² by a hand-written backward through the MLP: the
        kernels autograd runs for it, in its order, so the gradients are bit-identical to
        ``loss.backward()`` (test), at about two-thirds of its cost on the 256 × 64 minibatches of the
        default fit, where PyTorch's per-operation overhead, not arithmetic, dominates."""
        outputs = mlp_outputs(self._mlp, obs)
        error = outputs[-1].squeeze(-1) - returns
        # d mean(e²)/dV as autograd forms it: (1/N, expanded) · 2e.
        g = (torch.ones((), dtype=error.dtype, device=error.device).expand(error.numel()) / error.numel()
             * (2 * error)).unsqueeze(-1)
        grads = mlp_backward(self._mlp, [linear.weight for linear, _ in self._mlp], outputs, g)
        for i, (linear, _) in enumerate(self._mlp):
            linear.weight.grad, linear.bias.grad = grads[2 * i], grads[2 * i + 1]

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adam's moments and step counts from ``state``; the rate stays this fitter's own (the run's critic_lr,
        which natpg.load(path, critic_lr=...) may have changed), not the one saved with them."""
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
