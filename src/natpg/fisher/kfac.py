"""K-FAC: the Kronecker-factored approximate Fisher (Martens & Grosse, 2015; Grosse & Martens, 2016 for
convolutions), and the layer machinery it shares with the diagonal Fisher.

For a layer ``s = W̄ ā`` (``W̄ = [W | b]``, ``ā = [a; 1]`` — the bias as a homogeneous coordinate) the
per-sample score is ``∇_W̄ log π(a|s) = g āᵀ`` with ``g = ∂ log π / ∂s``, so the layer's Fisher block is

    F_W̄ = E[(ā āᵀ) ⊗ (g gᵀ)]  ≈  E[ā āᵀ] ⊗ E[g gᵀ] = A ⊗ G,

and different layers are taken to be uncorrelated (block diagonal). With row-major ``vec`` the
block acts on a matrix ``V`` [out, in+1] as ``(G ⊗ A) vec V = vec(G V A)``, and its inverse as
``vec(G⁻¹ V A⁻¹)``: a P×P solve becomes two small inverses per layer.

How ``g`` is obtained (``estimator``):

* ``"sampled"`` — ``a ~ π(·|s)`` drawn from the policy itself, one backward pass: an unbiased
  estimate of the true Fisher's G (Martens & Grosse's choice, and ACKTR's).
* ``"exact"`` — actions integrated out analytically: backward passes of the R columns of a square root
  ``F_out = L Lᵀ`` of the output distribution's Fisher (R = its dimension K, batched into one
  vectorised backward). ``G = E_s[(∂η/∂s)ᵀ F_out (∂η/∂s)]`` exactly, at R× the backward cost.
* ``"empirical"`` — the actions taken in the batch (``act``): the empirical-Fisher variant of K-FAC, as good as
  ``"sampled"`` on fresh on-policy data and biased off it (see ``natpg.fisher.empirical``).

Parameters that are not the weight/bias of a ``nn.Linear`` or ``nn.Conv2d`` (the Gaussian log-std)
get their own dense block ``E_s[J_sᵀ F_out J_s]`` (or, with ``"empirical"``, the taken actions' score
outer products): a diagonal Gaussian's state-independent log-std block is read off F_out, any other from
per-sample forward-mode Jacobians of η with respect to just those parameters (the cost grows with their
number, which is meant to be small).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.func import functional_call, jacfwd, vmap

from ..config import FISHER_ESTIMATORS
from ..params import parameter_names
from ..policies import CategoricalHead, GaussianMLP
from .fvp import checked_states

Estimator = Literal["sampled", "exact", "empirical"]
ESTIMATORS = tuple(e for e in FISHER_ESTIMATORS if e is not None)

# A Cholesky factor whose smallest pivot² is below this fraction of its largest is treated as a failure
# (the matrix is numerically singular): jitter is added, and counted as a fallback.
PIVOT_FLOOR = 1e-10
JITTERS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)  # relative to the largest diagonal entry, tried in turn
ZERO_FACTOR = torch.finfo(torch.float32).tiny  # a factor whose diagonal is below float32's smallest normal is zero
SHARED_IDENTITY_MAX = 1024  # rows of the largest identity ``identity`` keeps (8 MiB in float64)


# ----------------------------------------------------------------------------------------------------
# Layers of a policy and one pass that captures their inputs and output gradients
# ----------------------------------------------------------------------------------------------------

@dataclass
class LayerSlot:
    """A Linear/Conv2d layer whose weight is an actor parameter, and where it lives in the flat vector."""

    module: nn.Module
    weight: slice  # positions of the weight (row-major [out, in]) in the flat actor vector
    bias: slice | None  # positions of the bias, None when the layer has no actor bias
    out_dim: int
    in_dim: int  # columns of the weight matrix (C·kh·kw for a convolution), without the homogeneous 1

    @property
    def cols(self) -> int:
        """Columns of W̄ = [W | b]."""
        return self.in_dim + (self.bias is not None)

    def gather(self, v: torch.Tensor) -> torch.Tensor:
        """Flat vector [P] → this layer's W̄-shaped part [out, cols]."""
        V = v[self.weight].view(self.out_dim, self.in_dim)
        return torch.cat([V, v[self.bias].view(-1, 1)], dim=1) if self.bias is not None else V

    def scatter(self, out: torch.Tensor, V: torch.Tensor) -> None:
        """Write a W̄-shaped [out, cols] into its positions of the flat vector ``out`` [P]."""
        out[self.weight] = V[:, : self.in_dim].reshape(-1)
        if self.bias is not None:
            out[self.bias] = V[:, self.in_dim]


@dataclass
class Structure:
    """The policy's actor parameters split into K-FAC layers and the rest (flat positions ``rest_idx``)."""

    layers: list[LayerSlot]
    rest: list[nn.Parameter]
    rest_idx: torch.Tensor  # [R] long
    num_params: int
    key: tuple[int, ...]  # parameter identities, to notice a different policy
    shapes: list[list[int]]  # the actor parameters' shapes, to match a checkpoint's factors to a rebuilt policy


def find_layers(policy: nn.Module) -> Structure:
    """Find every ``nn.Linear``/``nn.Conv2d`` of ``policy`` whose weight is in ``actor_parameters()``."""
    params = list(policy.actor_parameters())
    offsets, start = {}, 0
    for p in params:
        offsets[id(p)] = slice(start, start + p.numel())
        start += p.numel()
    claimed: set[int] = set()
    layers: list[LayerSlot] = []
    for m in policy.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or id(m.weight) not in offsets or id(m.weight) in claimed:
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
                                         and m.padding != "valid"):
            raise NotImplementedError(f"K-FAC supports Conv2d with groups=1, zero padding given as numbers; got {m}")
        has_bias = m.bias is not None and id(m.bias) in offsets
        layers.append(LayerSlot(m, offsets[id(m.weight)], offsets[id(m.bias)] if has_bias else None,
                                m.weight.shape[0], m.weight[0].numel()))
        claimed |= {id(m.weight)} | ({id(m.bias)} if has_bias else set())
    rest = [p for p in params if id(p) not in claimed]
    idx = [torch.arange(offsets[id(p)].start, offsets[id(p)].stop) for p in rest]
    rest_idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    return Structure(layers, rest, rest_idx.to(params[0].device), start, tuple(id(p) for p in params),
                     [list(p.shape) for p in params])


def _layer_input(m: nn.Module, x: torch.Tensor, homogeneous: bool) -> torch.Tensor:
    """The layer's input as rows ā: [B, T, cols] (T = spatial positions for a convolution, else the flattened
    extra leading dimensions, usually 1)."""
    x = x.detach()
    if isinstance(m, nn.Conv2d):
        pad = 0 if m.padding == "valid" else m.padding
        x = Fn.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride).transpose(1, 2)
    else:
        x = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # not -1: a layer of 0 inputs
    if homogeneous:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    return x


def _layer_output_grad(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the layer output [S, B, *out_shape] → [S, B, T, out]."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


@dataclass
class Captured:
    a: list[torch.Tensor]  # per layer ā [B, T, cols]
    g: list[torch.Tensor]  # per layer g [S, B, T, out]: per-sample gradients of S pseudo log-likelihoods
    eta: torch.Tensor  # [B, K], detached


def capture(policy: nn.Module, obs: torch.Tensor, layers: list[LayerSlot],
            cotangents: Callable[[torch.Tensor], torch.Tensor]) -> Captured:
    """One forward pass with hooks on ``layers`` and one (vectorised) backward pass from η.

    ``cotangents(η)`` [B, K] → [S, B, K] gives the vectors pulled back from η: a score ∇_η log π(a|s)
    (S = 1) or the columns of a square root of F_out (S = K). The backward goes only to the layer
    outputs, so it neither needs nor touches the parameters' ``.grad``.
    """
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(module, args, out):
            if i in outputs:
                raise ValueError(f"layer {module} ran twice in one forward pass; K-FAC needs each layer used once")
            inputs[i], outputs[i] = args[0], out
        return fn

    handles = [slot.module.register_forward_hook(hook(i)) for i, slot in enumerate(layers)]
    try:
        with torch.enable_grad():
            eta = policy(obs)
    finally:
        for h in handles:
            h.remove()
    cot = cotangents(eta.detach())  # [S, B, K]
    used = [i for i in range(len(layers)) if i in outputs and outputs[i].requires_grad]
    grads: tuple = ()
    if used:
        batched = cot.shape[0] > 1
        grads = torch.autograd.grad(eta, [outputs[i] for i in used], grad_outputs=cot if batched else cot[0],
                                    is_grads_batched=batched, allow_unused=True)
    by_layer = dict(zip(used, grads))
    a, g = [], []
    for i, slot in enumerate(layers):
        m = slot.module
        if i in inputs:
            a.append(_layer_input(m, inputs[i], slot.bias is not None))
        else:  # a layer the forward pass never reached: no curvature
            a.append(torch.zeros(eta.shape[0], 1, slot.cols, dtype=eta.dtype, device=eta.device))
        gi = by_layer.get(i)
        if gi is None:
            shape = (cot.shape[0], eta.shape[0], a[-1].shape[1], slot.out_dim)
            g.append(torch.zeros(shape, dtype=eta.dtype, device=eta.device))
        else:
            g.append(_layer_output_grad(m, gi if cot.shape[0] > 1 else gi.unsqueeze(0)).detach())
    return Captured(a, g, eta.detach())


# ----------------------------------------------------------------------------------------------------
# What is pulled back from η: scores of sampled/taken actions, or a square root of the output Fisher
# ----------------------------------------------------------------------------------------------------

def output_fisher_sqrt(head, eta: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = F_out(η_b) for every sample, as columns: [B, K] → [R, B, K] (R = K)."""
    if hasattr(head, "fisher_diag"):  # diagonal heads: L = diag(√f)
        return torch.diag_embed(head.fisher_diag(eta).sqrt()).permute(2, 0, 1)
    if isinstance(head, CategoricalHead):  # diag(p) − ppᵀ = Σ_k p_k (e_k − p)(e_k − p)ᵀ
        p = torch.softmax(eta, dim=-1)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        return (p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0)))  # [K, B, K]
    lam, Q = torch.linalg.eigh(head.fisher(eta))  # [B, K], [B, K, K]; PSD, possibly singular (categorical)
    return (Q * lam.clamp_min(0).sqrt().unsqueeze(-2)).permute(2, 0, 1)


def sample_actions(policy: nn.Module, eta: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """a ~ π(·|η), reproducible given ``generator``. A generator on another device than η (the agent draws its
    updates' randomness from one CPU generator, η of a GPU learner is on the GPU) samples where it lives, and
    the actions move to η's device: the same actions as the run on the CPU draws."""
    if generator is not None and generator.device != eta.device:
        return sample_actions(policy, eta.detach().to(generator.device), generator).to(eta.device)
    if hasattr(policy, "sample"):
        return policy.sample(eta, generator=generator)
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[eta.device] if eta.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return policy.head.dist(eta).sample()


def score_wrt_eta(head, eta: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """∇_η log π(a_b | η_b) per sample: [B, K]."""
    with torch.enable_grad():
        e = eta.detach().requires_grad_(True)
        (s,) = torch.autograd.grad(head.dist(e).log_prob(act).sum(), e)
    return s


def checked_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {list(ESTIMATORS)}")
    return estimator


def make_cotangents(estimator: str, policy: nn.Module, act: torch.Tensor | None,
                    generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if checked_estimator(estimator) == "empirical" and act is None:
        raise ValueError("estimator='empirical' needs the taken actions: fit(policy, obs, act)")
    if estimator == "exact":
        return lambda eta: output_fisher_sqrt(policy.head, eta)
    if estimator == "empirical":
        return lambda eta: score_wrt_eta(policy.head, eta, act).unsqueeze(0)
    return lambda eta: score_wrt_eta(policy.head, eta, sample_actions(policy, eta, generator)).unsqueeze(0)


# ----------------------------------------------------------------------------------------------------
# Parameters outside Linear/Conv2d layers: their own dense block
# ----------------------------------------------------------------------------------------------------

def rest_jacobian(policy: nn.Module, obs: torch.Tensor, rest: list[nn.Parameter]) -> torch.Tensor:
    """Per-sample ∂η_b/∂θ_rest by forward mode, one tangent per rest parameter: [B, K, R]."""
    names = parameter_names(policy, rest)

    def f(*theta: torch.Tensor) -> torch.Tensor:
        return functional_call(policy, dict(zip(names, theta)), (obs,), strict=False)

    with torch.no_grad():  # forward mode only; no reverse graph for the rest of the network
        jac = jacfwd(f, argnums=tuple(range(len(rest))))(*[p.detach() for p in rest])
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac], dim=-1)


def rest_block(policy: nn.Module, obs: torch.Tensor, rest: list[nn.Parameter], eta: torch.Tensor,
               act: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Fisher block of the rest parameters, (1/B) Σ_b J_bᵀ F_out(η_b) J_b — or, given the taken actions
    ``act``, the empirical (1/B) Σ_b s_b s_bᵀ with s_b = J_bᵀ ∇_η log π(a_b|s_b). Returns [R, R]."""
    if _state_independent_log_std(policy, rest):
        # η = [μ(s), log σ] with ∂η/∂log σ = [0; I] in every state: the block is the log-σ corner of F_out
        # (2I for the Gaussian) or of the score outer products, with no Jacobian to compute.
        k = policy.act_dim
        if act is None:
            return torch.diag(policy.head.fisher_diag(eta)[:, k:].mean(0))
        s = score_wrt_eta(policy.head, eta, act)[:, k:]
        return s.T @ s / obs.shape[0]
    R = sum(p.numel() for p in rest)
    out = torch.zeros(R, R, dtype=eta.dtype, device=eta.device)
    for i in range(0, obs.shape[0], chunk):
        J = rest_jacobian(policy, obs[i : i + chunk], rest)  # [b, K, R]
        e = eta[i : i + chunk]
        if act is None:
            FJ = vmap(policy.head.fisher_mv, in_dims=(None, 2), out_dims=2)(e, J)  # F_out J: [b, K, R]
            out += torch.einsum("bkp,bkq->pq", J, FJ)
        else:
            s = torch.einsum("bkp,bk->bp", J, score_wrt_eta(policy.head, e, act[i : i + chunk]))
            out += s.T @ s
    return out / obs.shape[0]


def _state_independent_log_std(policy: nn.Module, rest: list[nn.Parameter]) -> bool:
    """The rest is only a Gaussian policy's state-independent log-std, which its output η carries as is."""
    return isinstance(policy, GaussianMLP) and len(rest) == 1 and rest[0] is policy.log_std


# ----------------------------------------------------------------------------------------------------
# Damped symmetric inverses with a fallback
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _shared_identity(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=dtype, device=device)


def identity(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.eye(n)``, shared for small n: read only, never modify it in place. The K-FAC critic damps and
    inverts six factors per minibatch step, where building identities cost ~2 %. The cache keeps the last 32
    (size, dtype, device) it was asked for, of at most ``SHARED_IDENTITY_MAX`` rows: a larger one is built each
    time (its inversion costs far more), so the cache holds at most 32 × 8 MiB."""
    if n > SHARED_IDENTITY_MAX:
        return torch.eye(n, dtype=dtype, device=device)
    return _shared_identity(n, dtype, torch.device(device))


def damped_inverse(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Inverse of a symmetric positive (semi-)definite matrix by Cholesky in float64, with a fallback.

    Returns (M', M'⁻¹, fell_back) where M' is the matrix actually inverted: M itself when its Cholesky
    factor exists with pivots² ≥ PIVOT_FLOOR·max, else M + εI for the first ε in ``JITTERS`` (relative to
    the largest diagonal entry) that gives one, else its diagonal (floored); a factor zero to float32 (its largest
    diagonal entry below float32's smallest normal, ``ZERO_FACTOR``: undamped, a layer whose inputs or gradients
    all vanished) is taken as ZERO_FACTOR·I, whose inverse float32 still holds. Cholesky rather than an
    eigendecomposition: ~10× cheaper, and ``eigh`` with several threads is pathologically slow on a
    loaded CPU (observed 100× on 2 cores).
    """
    M = M.double()
    if not bool(torch.isfinite(M).all()):
        M = torch.nan_to_num(M, nan=0.0, posinf=0.0, neginf=0.0)
    scale = float(M.diagonal().abs().max()) if M.numel() else 0.0
    if scale < ZERO_FACTOR:  # zero to float32 (a layer whose inputs or gradients all vanished, undamped): its
        eye = identity(M.shape[0], M.dtype, M.device)  # inverse must stay finite there, to multiply a zero
        return ZERO_FACTOR * eye, eye / ZERO_FACTOR, True
    for jitter in (0.0, *JITTERS):
        Mj = M + (jitter * scale) * identity(M.shape[0], M.dtype, M.device) if jitter else M
        L, info = torch.linalg.cholesky_ex(Mj)
        if int(info) == 0:
            piv = L.diagonal().square()
            if bool(piv.min() >= PIVOT_FLOOR * piv.max()):
                return Mj, torch.cholesky_inverse(L), jitter > 0
    d = M.diagonal().clamp_min(PIVOT_FLOOR * scale)
    return torch.diag(d), torch.diag(1.0 / d), True


def pi_correction(A: torch.Tensor, G: torch.Tensor) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G)), 1 when either trace vanishes (Martens & Grosse §6.3)."""
    ta, tg = float(A.trace()) / A.shape[0], float(G.trace()) / G.shape[0]
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


@dataclass
class Damped:
    """One layer's damped factors and their inverses: mv uses the first two, solve the rest."""

    A: torch.Tensor  # A + π√λ I  [cols, cols]
    G: torch.Tensor  # G + √λ/π I  [out, out]
    A_inv: torch.Tensor
    G_inv: torch.Tensor

    def to(self, dtype: torch.dtype) -> "Damped":
        return Damped(self.A.to(dtype), self.G.to(dtype), self.A_inv.to(dtype), self.G_inv.to(dtype))


def damp_and_invert(A: torch.Tensor, G: torch.Tensor, sqrt_damping: float) -> tuple[Damped, int]:
    """Factored Tikhonov damping with the π correction (Martens & Grosse §6.3), A + π√λ I and G + √λ/π I, and
    their inverses (``damped_inverse``: Cholesky, with jitter and then the diagonal where a damped factor is
    numerically singular, as with damping 0); with the number of such fallbacks. The damped factors are the
    matrices inverted, so mv and solve stay each other's inverse."""
    pi = pi_correction(A, G)
    Ad, A_inv, failA = damped_inverse(A + pi * sqrt_damping * identity(A.shape[0], A.dtype, A.device))
    Gd, G_inv, failG = damped_inverse(G + sqrt_damping / pi * identity(G.shape[0], G.dtype, G.device))
    return Damped(Ad, Gd, A_inv, G_inv), failA + failG


# ----------------------------------------------------------------------------------------------------
# K-FAC
# ----------------------------------------------------------------------------------------------------

class KFAC:
    """Kronecker-factored approximate Fisher: F ≈ blockdiag(A_l ⊗ G_l, …, F_rest), damped and inverted per block.

    The matrix that ``solve`` inverts and ``mv`` multiplies is, up to the order of coordinates within each layer
    (``actor_parameters()`` stores W row-major, then b; with b as W̄ = [W | b]'s last column, row-major, the block
    reads (G_l + …) ⊗ (A_l + …)),

        blockdiag over layers of (A_l + π_l √λ I) ⊗ (G_l + √λ/π_l I),  and  F_rest + λ I,

    with the factored Tikhonov damping of Martens & Grosse (§6.3): π_l = sqrt((tr A_l/dim A_l)/(tr G_l/dim G_l))
    balances the two factors and minimises the cross term √λ (A_l ⊗ I/π_l + π_l I ⊗ G_l) the product carries
    beside λ I — which is O(√λ), several times λ, so K-FAC's λ regularises more than the λ I of the other
    solvers. A_l = E[ā āᵀ] (layer inputs with a 1
    appended for the bias; for a convolution averaged over positions too), G_l = E[Σ_positions g gᵀ]
    (g = ∂ log π/∂(layer output)), each an exponential moving average over fits with decay
    ``ema_decay`` (the first fit initialises it; ``ema_decay=0`` keeps only the last batch). Factors
    are accumulated in float64 and, every ``refresh_every`` fits (the first included), a snapshot of
    them is damped and inverted by Cholesky in float64; ``solve`` and ``mv`` both use that snapshot,
    so they stay each other's inverse between refreshes. A numerically singular factor gets jitter
    added, or its diagonal used (``damped_inverse``); each such event counts in
    ``stats["fisher/kfac_fallbacks"]`` (cumulative). Changing ``damping`` takes effect at the next
    solve/mv (the snapshot is re-damped).

    When K-FAC is exact (``estimator="exact"``, λ = 0; with ``"sampled"`` the same holds in expectation
    over the sampled actions, since A is exact and G is an unbiased estimate): for a layer block
    F_W̄ = E_s[(ā āᵀ) ⊗ E_a[g gᵀ|s]] and K-FAC's A ⊗ G coincide whenever E_a[g gᵀ|s] does not depend on s,
    or ā does not. Checked numerically in tests/test_curvature.py, the cases are:

    * a policy that is a single Linear layer (no hidden layers) with a diagonal Gaussian head
      (``GaussianMLP(hidden=())``), any batch: E_a[g gᵀ|s] = diag(1/σ²) is constant, the log-std block is
      computed exactly and the Gaussian's mean/log-std cross terms are zero, so K-FAC = F;
    * a single Linear layer with any head (e.g. categorical) on a batch of identical observations;
    * for any depth, the output layer's block of a diagonal Gaussian policy (its g has the constant
      conditional covariance diag(1/σ²)), and on identical observations every layer's diagonal block —
      but not the full F, whose cross-layer blocks K-FAC drops.

    It is not exact for a categorical (or any other) policy whose output Fisher varies with the state
    over a batch of distinct states, nor for hidden layers in general.

    Cost per fit: one forward and one backward pass (R backward vectors for ``"exact"``, vectorised), the
    factor products O(B·(in² + out²)) per layer, one more forward (forward mode) when the policy has
    parameters outside its layers, and on a refresh a Cholesky and inverse O(in³ + out³) per layer.
    Per solve/mv: two matrix products O(out·in·(in + out)) per layer.
    """

    def __init__(self, damping: float = 0.01, ema_decay: float = 0.95, refresh_every: int = 1,
                 estimator: Estimator = "sampled", generator: torch.Generator | None = None):
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be ≥ 1, got {refresh_every}")
        self.damping, self.ema_decay, self.refresh_every = damping, ema_decay, refresh_every
        self.estimator, self.generator = checked_estimator(estimator), generator
        self.structure: Structure | None = None
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (A [cols, cols], G [out, out]), float64
        self.rest_fisher: torch.Tensor | None = None  # [R, R] float64
        self.fits = 0
        self.fallbacks = 0
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []  # factors at the last refresh
        self._rest_snapshot: torch.Tensor | None = None
        self._damped: tuple[float, list[Damped], tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self._dtype = torch.float32
        self._loaded: dict | None = None  # a checkpoint's state, adopted by the first fit on a matching policy
        self.stats: dict[str, float] = {}

    def __getstate__(self) -> dict:
        """A copy (pickle, ``copy.deepcopy`` of an agent) holds the state as a checkpoint does, loaded into it by
        ``__setstate__`` and adopted by its next fit: the layers are found by their parameters' identities, which a
        copy does not keep, so a copy of the found layers would take its own policy for another and start the
        factors afresh. (The factors go once, in that state, not also as the attributes the fit rebuilds.)"""
        return {**self.__dict__, "structure": None, "factors": [], "rest_fisher": None, "_snapshot": [],
                "_rest_snapshot": None, "_damped": None, "_loaded": None, "_copied": self.state_dict()}

    def __setstate__(self, state: dict) -> None:
        copied = state.pop("_copied")
        self.__dict__.update(state)
        self.load_state_dict(copied)

    # -- fit ------------------------------------------------------------------------------------------

    def fit(self, policy: nn.Module, obs: torch.Tensor, act: torch.Tensor | None = None) -> None:
        """Fold the batch's factors into the moving averages; refresh the inverses when due."""
        obs = checked_states(policy, obs)
        structure = find_layers(policy)
        if self.structure is None and self._loaded is not None:
            self._adopt(structure, obs.device)
        if self.structure is None or structure.key != self.structure.key:
            self.structure, self.factors, self.rest_fisher, self.fits = structure, [], None, 0
        cap = capture(policy, obs, structure.layers, make_cotangents(self.estimator, policy, act, self.generator))
        B = obs.shape[0]
        batch = []
        for a, g in zip(cap.a, cap.g):
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])  # rows: (sample, position), (vector, sample, position)
            batch.append(((a.T @ a / a.shape[0]).double(), (g.T @ g / B).double()))
        rest = None
        if structure.rest:
            rest = rest_block(policy, obs, structure.rest, cap.eta,
                              act if self.estimator == "empirical" else None).double()
        if self.fits == 0:
            self.factors, self.rest_fisher = batch, rest
        else:
            self.factors = [(self._ema(A0, A), self._ema(G0, G)) for (A0, G0), (A, G) in zip(self.factors, batch)]
            if rest is not None:
                self.rest_fisher = self._ema(self.rest_fisher, rest)
        nonfinite = sum(not bool(torch.isfinite(A).all() and torch.isfinite(G).all()) for A, G in batch)
        self._dtype = cap.eta.dtype
        refresh = self.fits % self.refresh_every == 0
        self.fits += 1
        if refresh:
            self._snapshot, self._rest_snapshot, self._damped = list(self.factors), self.rest_fisher, None
        self._inverses()  # invert now, so that this fit's stats include any fallback
        self.stats.update({"fisher/kfac_refreshed": float(refresh), "fisher/kfac_fallbacks": float(self.fallbacks),
                           "fisher/kfac_nonfinite_batches": float(nonfinite), "fisher/kfac_layers": float(len(batch))})

    def state_dict(self) -> dict:
        """The factors' moving averages, the snapshot last inverted and the counters: what a resumed run needs to
        go on bit-exactly (the inverses are recomputed from the snapshot, the layers found again). A state loaded
        but not yet adopted by a fit is returned as it was loaded, so saving again before training loses nothing."""
        if self._loaded is not None:
            return self._loaded
        return {"factors": [list(f) for f in self.factors], "rest_fisher": self.rest_fisher,
                "snapshot": [list(f) for f in self._snapshot], "rest_snapshot": self._rest_snapshot,
                "fits": self.fits, "fallbacks": self.fallbacks, "damping": self.damping,
                "dtype": str(self._dtype).removeprefix("torch."),
                "param_shapes": self.structure.shapes if self.structure else None}

    def load_state_dict(self, state: dict) -> None:
        """Keep ``state`` until the first ``fit`` sees the policy: its layers are found again then, and a policy
        whose actor parameters have other shapes than the saved one's starts afresh instead."""
        self._loaded = state if state.get("param_shapes") is not None else None

    def _adopt(self, structure: Structure, device: torch.device) -> None:
        state, self._loaded = self._loaded, None
        if [list(s) for s in state["param_shapes"]] != structure.shapes:
            return
        to = lambda t: None if t is None else t.to(device)  # noqa: E731  (map_location was the CPU)
        # The damping stays this instance's, the run's setting (natpg.load(path, damping=...) may change it); the
        # saved one is written for the record only.
        self.structure, self.fits = structure, int(state["fits"])
        self.factors = [(to(A), to(G)) for A, G in state["factors"]]
        self._snapshot = [(to(A), to(G)) for A, G in state["snapshot"]]
        self.rest_fisher, self._rest_snapshot = to(state["rest_fisher"]), to(state["rest_snapshot"])
        self._dtype, self._damped = getattr(torch, state["dtype"]), None
        self._inverses()  # as the uninterrupted run had them cached; its fallbacks were counted then
        self.fallbacks = int(state["fallbacks"])

    def _ema(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        # A non-finite batch statistic is dropped rather than poisoning the average for good (a first batch that
        # was not finite is replaced by the next finite one).
        if not bool(torch.isfinite(new).all()):
            return old
        if not bool(torch.isfinite(old).all()):
            return new
        return self.ema_decay * old + (1.0 - self.ema_decay) * new

    def _inverses(self) -> tuple[list[Damped], tuple[torch.Tensor, torch.Tensor] | None]:
        """Damped snapshot factors and their inverses for the current ``damping`` (cached until either changes)."""
        if self._damped is not None and self._damped[0] == self.damping:
            return self._damped[1], self._damped[2]
        sq, dt = math.sqrt(self.damping), self._dtype
        layers, cond = [], 1.0
        for A, G in self._snapshot:
            damped, fallbacks = damp_and_invert(A, G, sq)
            self.fallbacks += fallbacks
            cond = max(cond, _pivot_ratio(damped.A_inv), _pivot_ratio(damped.G_inv))
            layers.append(damped.to(dt))
        rest = None
        if self._rest_snapshot is not None:
            R = self._rest_snapshot
            Rd, R_inv, fail = damped_inverse(R + self.damping * torch.eye(R.shape[0], dtype=R.dtype, device=R.device))
            self.fallbacks += fail
            rest = (Rd.to(dt), R_inv.to(dt))
        self._damped = (self.damping, layers, rest)
        self.stats["fisher/kfac_diag_ratio_max"] = cond
        return layers, rest

    # -- solve / mv -----------------------------------------------------------------------------------

    def _apply(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        """The damped K-FAC matrix (or its inverse) times a flat vector v [P]: per layer G V A (or G⁻¹ V A⁻¹)."""
        if self.structure is None:
            raise RuntimeError("call fit(policy, obs) before solve/mv")
        layers, rest = self._inverses()
        out = torch.empty_like(v)
        for slot, d in zip(self.structure.layers, layers):
            V = slot.gather(v)
            slot.scatter(out, d.G_inv @ V @ d.A_inv if inverse else d.G @ V @ d.A)
        if rest is not None:
            idx = self.structure.rest_idx
            out[idx] = rest[1 if inverse else 0] @ v[idx]
        return out

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """The inverse of the damped K-FAC matrix (an approximation of F plus at least λI) times g [P] → [P]."""
        return self._apply(g, inverse=True)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """The damped K-FAC matrix (the one ``solve`` inverts) times v [P] → [P]."""
        return self._apply(v, inverse=False)


def _pivot_ratio(M_inv: torch.Tensor) -> float:
    """max/min of the inverse's diagonal: a cheap lower bound on the condition number, for logging."""
    d = M_inv.diagonal()
    return float(d.max() / d.min()) if d.numel() and float(d.min()) > 0 else float("inf")
