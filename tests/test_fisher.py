"""The exact Fisher three independent ways: score outer products (enumerated / exact quadrature),
the Gauss–Newton product, and the KL Hessian by double backward — all in float64."""

import itertools

import numpy as np
import pytest
import torch

from natpg.fisher import (CG, Dense, conjugate_gradient, dense_fisher, fisher_vector_product,
                          kl_hessian_vector_product)
from natpg.params import flatten
from natpg.policies import BernoulliMLP, CategoricalMLP, GaussianMLP, MultiCategoricalMLP


def perturbed(policy, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return policy


def score(policy, obs_row, action):
    logp = policy.dist(obs_row.unsqueeze(0)).log_prob(action.unsqueeze(0)).sum()
    return flatten(torch.autograd.grad(logp, policy.actor_parameters()))


def categorical_score_fisher(policy, obs):
    """Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ averaged over s, actions enumerated exactly."""
    P = sum(p.numel() for p in policy.actor_parameters())
    F = torch.zeros(P, P)
    for s in obs:
        probs = policy.dist(s.unsqueeze(0)).probs.squeeze(0).detach()
        for a in range(len(probs)):
            g = score(policy, s, torch.tensor(a))
            F += probs[a] * torch.outer(g, g)
    return F / len(obs)


def gaussian_score_fisher(policy, obs, nodes=6):
    """E_{a~N(μ,σ²)}[∇log π ∇log πᵀ] by tensor-product Gauss–Hermite quadrature: the score is a
    polynomial of degree ≤ 2 in a, its outer product degree ≤ 4, so 6 nodes integrate it exactly."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(−x²/2)
    w = w / w.sum()
    P = sum(p.numel() for p in policy.actor_parameters())
    F = torch.zeros(P, P)
    for s in obs:
        eta = policy(s.unsqueeze(0)).detach().squeeze(0)
        mean, std = eta[: policy.act_dim], eta[policy.act_dim:].exp()
        for idx in itertools.product(range(nodes), repeat=policy.act_dim):
            a = mean + std * torch.tensor(x[list(idx)])
            g = score(policy, s, a)
            F += float(np.prod(w[list(idx)])) * torch.outer(g, g)
    return F / len(obs)


POLICIES = {
    "categorical": lambda: CategoricalMLP(3, 4, hidden=(5, 4)),
    "gaussian": lambda: GaussianMLP(3, 2, hidden=(5, 4), log_std_init=-0.3),
}


@pytest.mark.parametrize("kind", POLICIES)
def test_dense_fisher_equals_expected_score_outer_product(float64, kind):
    torch.manual_seed(0)
    policy = perturbed(POLICIES[kind]())
    obs = torch.randn(6, 3)
    reference = categorical_score_fisher(policy, obs) if kind == "categorical" else gaussian_score_fisher(policy, obs)
    F = dense_fisher(policy, obs)
    assert torch.allclose(F, reference, atol=1e-12, rtol=1e-10)
    if kind == "gaussian":  # the log-std block is part of the actor's Fisher: 2·I for a state-independent log σ
        d = policy.act_dim
        assert torch.allclose(F[-d:, -d:], 2.0 * torch.eye(d), atol=1e-12)


@pytest.mark.parametrize("kind", POLICIES)
def test_fvp_equals_dense_and_kl_hessian(float64, kind):
    torch.manual_seed(1)
    policy = perturbed(POLICIES[kind]())
    obs = torch.randn(9, 3)
    F = dense_fisher(policy, obs)
    fvp = fisher_vector_product(policy, obs)
    hvp = kl_hessian_vector_product(policy, obs)
    damped = fisher_vector_product(policy, obs, damping=0.3)
    for _ in range(3):
        v = torch.randn(F.shape[0])
        assert torch.allclose(fvp(v), F @ v, atol=1e-12, rtol=1e-10)
        assert torch.allclose(hvp(v), F @ v, atol=1e-12, rtol=1e-10)
        assert torch.allclose(damped(v), F @ v + 0.3 * v, atol=1e-12, rtol=1e-10)


def test_kl_hessian_vanishes_if_old_distribution_is_not_detached(float64):
    """The trap the oracle avoids: differentiating through both arguments of KL(π_θ‖π_θ) gives zero."""
    torch.manual_seed(2)
    policy = perturbed(POLICIES["gaussian"]())
    obs = torch.randn(5, 3)
    params = policy.actor_parameters()
    kl = torch.distributions.kl_divergence(policy.dist(obs), policy.dist(obs)).mean()
    grads = torch.autograd.grad(kl, params, create_graph=True)
    v = torch.randn(sum(p.numel() for p in params))
    gv = torch.dot(flatten(grads), v)
    hv = torch.autograd.grad(gv, params, allow_unused=True)
    assert all(h is None or torch.all(h == 0) for h in hv)
    assert torch.linalg.vector_norm(kl_hessian_vector_product(policy, obs)(v)) > 1e-3


def test_conjugate_gradient_matches_linalg_solve(float64):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(30, 30, generator=g)
    F = A @ A.T / 30 + 0.05 * torch.eye(30)
    b = torch.randn(30, generator=g)
    x, info = conjugate_gradient(lambda v: F @ v, b, max_iters=200, tol=1e-13)
    assert info.converged
    assert torch.allclose(x, torch.linalg.solve(F, b), atol=1e-9)


def test_conjugate_gradient_is_deterministic_and_honours_x0_and_cap(float64):
    g = torch.Generator().manual_seed(4)
    A = torch.randn(20, 20, generator=g)
    F = A @ A.T + torch.eye(20)
    b = torch.randn(20, generator=g)
    x1, _ = conjugate_gradient(lambda v: F @ v, b, max_iters=5)
    x2, _ = conjugate_gradient(lambda v: F @ v, b, max_iters=5)
    assert torch.equal(x1, x2)
    exact = torch.linalg.solve(F, b)
    x, info = conjugate_gradient(lambda v: F @ v, b, x0=exact, max_iters=5, tol=1e-8)
    assert info.iterations == 0 and torch.equal(x, exact)
    calls = []
    _, info = conjugate_gradient(lambda v: calls.append(1) or F @ v, b, max_iters=3, tol=0.0)
    assert info.iterations == 3 and len(calls) == 3  # x0 = 0 needs no product for the first residual
    x1, _ = conjugate_gradient(lambda v: F @ v, b, max_iters=1)
    assert torch.allclose(x1, (b @ b) / (b @ F @ b) * b)  # one CG step from zero = exact line search along b


def test_conjugate_gradient_stops_on_the_residual_relative_to_b(float64):
    """‖r‖ ≤ tol·‖b‖: scaling b scales x and changes neither the iterations nor the stop (a gradient of 1e-9
    is solved as carefully as one of 1); the returned residual is ‖b − Fx‖. Powers of two scale exactly."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(25, 25, generator=g)
    F = A @ A.T / 25 + 0.01 * torch.eye(25)
    b = torch.randn(25, generator=g)
    scales = (2.0**-30, 2.0**20)
    runs = [conjugate_gradient(lambda v: F @ v, c * b, max_iters=100, tol=1e-6) for c in (1.0, *scales)]
    (x, info), *scaled = runs
    assert info.converged and 1 < info.iterations < 100
    for c, (xc, info_c) in zip(scales, scaled):
        assert info_c.iterations == info.iterations and info_c.converged
        assert torch.equal(xc, c * x)
        assert info_c.residual_norm <= 1e-6 * c * float(torch.linalg.vector_norm(b))
        torch.testing.assert_close(info_c.residual_norm, float(torch.linalg.vector_norm(c * b - F @ xc)), rtol=1e-5,
                                   atol=0.0)


def test_preconditioned_cg_is_plain_cg_on_the_transformed_system(float64):
    """PCG with M is plain CG on M^-1/2 F M^-1/2 y = M^-1/2 b, x = M^-1/2 y, iterate for iterate (the
    transformed system formed as a dense matrix here); it converges to F⁻¹b; with M = F it takes one step."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(30, 30, generator=g)
    F = A @ A.T / 30 + torch.diag(torch.logspace(-3, 2, 30)) + 1e-3 * torch.eye(30)  # spread spectrum
    b = torch.randn(30, generator=g)
    B = torch.randn(30, 30, generator=g)
    M = torch.diag(F.diagonal()) + 0.1 * B @ B.T / 30  # SPD, near F's diagonal
    evals, evecs = torch.linalg.eigh(M)
    M_isqrt = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    M_inv = torch.linalg.inv(M)
    for k in (1, 2, 5, 12):
        x, info = conjugate_gradient(lambda v: F @ v, b, max_iters=k, tol=0.0, precondition=lambda r: M_inv @ r)
        y, _ = conjugate_gradient(lambda v: M_isqrt @ F @ M_isqrt @ v, M_isqrt @ b, max_iters=k, tol=0.0)
        assert info.iterations == k
        torch.testing.assert_close(x, M_isqrt @ y, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(info.residual_norm, float(torch.linalg.vector_norm(b - F @ x)), rtol=1e-6,
                                   atol=1e-12)
    x, info = conjugate_gradient(lambda v: F @ v, b, max_iters=200, tol=1e-13, precondition=lambda r: M_inv @ r)
    assert info.converged
    torch.testing.assert_close(x, torch.linalg.solve(F, b), rtol=1e-9, atol=1e-9)
    F_inv = torch.linalg.inv(F)
    x, info = conjugate_gradient(lambda v: F @ v, b, max_iters=5, tol=1e-10, precondition=lambda r: F_inv @ r)
    assert info.iterations == 1 and info.converged
    x, info = conjugate_gradient(lambda v: F @ v, b, max_iters=5, precondition=lambda r: -r)  # not positive
    assert info.iterations == 0 and torch.equal(x, torch.zeros_like(b))


@pytest.mark.parametrize("kind", POLICIES)
def test_cg_and_dense_curvatures_solve_the_damped_fisher(float64, kind):
    torch.manual_seed(5)
    policy = perturbed(POLICIES[kind]())
    obs = torch.randn(12, 3)
    F = dense_fisher(policy, obs)
    lam = 0.05
    g = torch.randn(F.shape[0])
    expected = torch.linalg.solve(F + lam * torch.eye(F.shape[0]), g)
    cg = CG(damping=lam, iters=500, tol=1e-14)
    cg.fit(policy, obs)
    dense = Dense(damping=lam)
    dense.fit(policy, obs)
    assert torch.allclose(cg.solve(g), expected, atol=1e-7)
    assert torch.allclose(dense.solve(g), expected, atol=1e-9)
    assert cg.stats["fisher/cg_residual"] < 1e-10


def test_fvp_subsample_is_fixed_for_one_update(float64):
    torch.manual_seed(6)
    policy = perturbed(POLICIES["gaussian"]())
    obs = torch.randn(40, 3)
    cg = CG(damping=0.0, subsample=0.25, generator=torch.Generator().manual_seed(0), step_length="subsample")
    cg.fit(policy, obs)
    v = torch.randn(sum(p.numel() for p in policy.actor_parameters()))
    first = cg.mv(v)
    assert torch.equal(cg.mv(v), first)  # the same 10 rows on every product within the update
    F_full = dense_fisher(policy, obs)
    assert not torch.allclose(first, F_full @ v)  # it really is a subsample


@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_subsampled_solver_can_measure_the_step_length_on_the_whole_batch(float64, solver):
    """step_length='batch': solve inverts the subsample's (F + λI), mv is the whole batch's (F + λI) —
    each checked against its own dense matrix; 'subsample' keeps mv on the solver's matrix."""
    torch.manual_seed(7)
    policy = perturbed(POLICIES["gaussian"]())
    obs = torch.randn(40, 3)
    lam = 0.05
    P = sum(p.numel() for p in policy.actor_parameters())
    g, v = torch.randn(P), torch.randn(P)
    rows = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:10]  # fixed_subsample's draw
    F_sub = dense_fisher(policy, obs[rows]) + lam * torch.eye(P)
    F_batch = dense_fisher(policy, obs) + lam * torch.eye(P)
    assert not torch.allclose(F_sub @ v, F_batch @ v, rtol=1e-2)  # the two matrices really differ

    def make(step_length):
        kwargs = dict(damping=lam, subsample=0.25, generator=torch.Generator().manual_seed(0),
                      step_length=step_length)
        curvature = CG(iters=500, tol=1e-14, **kwargs) if solver == "cg" else Dense(**kwargs)
        curvature.fit(policy, obs)
        return curvature

    batch, subsample = make("batch"), make("subsample")
    expected = torch.linalg.solve(F_sub, g)
    assert torch.allclose(batch.solve(g), expected, atol=1e-7)
    assert torch.allclose(subsample.solve(g), expected, atol=1e-7)
    assert torch.allclose(batch.mv(v), F_batch @ v, atol=1e-10)
    assert torch.allclose(subsample.mv(v), F_sub @ v, atol=1e-10)

    whole = CG(damping=lam, subsample=1.0, step_length="batch")  # no subsample: one matrix, one product set
    whole.fit(policy, obs)
    assert whole._step_fvp is whole._fvp
    for make_solver in (CG, Dense):  # refused when built, before any batch is seen
        with pytest.raises(ValueError, match=r"step_length must be one of \('subsample', 'batch'\)"):
            make_solver(subsample=0.5, step_length="whole")


def test_dense_fisher_refuses_sizes_that_do_not_fit():
    policy = GaussianMLP(3, 2, hidden=(8,))
    with pytest.raises(ValueError, match="dense .*Fisher needs"):
        dense_fisher(policy, torch.randn(2, 3), max_bytes=1000)


@pytest.mark.parametrize("call", ["dense_fisher", "fisher_vector_product", "kl_hessian_vector_product",
                                  "per_sample_scores", "KFAC", "Diagonal", "CG", "Empirical"])
def test_curvature_functions_name_observations_they_cannot_read(call):
    """A numpy array, one unbatched state, or float64 states for a float32 policy: a clear error before torch."""
    from natpg.fisher import KFAC, Diagonal, Empirical, kl_hessian_vector_product, per_sample_scores

    policy = GaussianMLP(3, 1, hidden=(4,))
    act = torch.zeros(2, 1)
    run = {"dense_fisher": lambda o: dense_fisher(policy, o),
           "fisher_vector_product": lambda o: fisher_vector_product(policy, o),
           "kl_hessian_vector_product": lambda o: kl_hessian_vector_product(policy, o),
           "per_sample_scores": lambda o: per_sample_scores(policy, o, act), "KFAC": lambda o: KFAC().fit(policy, o),
           "Diagonal": lambda o: Diagonal().fit(policy, o), "CG": lambda o: CG().fit(policy, o),
           "Empirical": lambda o: Empirical().fit(policy, o, act)}[call]
    with pytest.raises(TypeError, match=r"observations must be a torch.Tensor \[B, obs_dim\], got ndarray: "
                                        r"torch.as_tensor\(obs, dtype=torch.float32\) first"):
        run(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"must be a batch \[B, obs_dim\], got shape \(3,\) \(one state: obs.unsqueeze"):
        run(torch.zeros(3))
    with pytest.raises(ValueError, match=r"observations are torch.float64 on cpu, the policy's parameters torch.float32 "
                                         r"on cpu: .*policy.double\(\)"):
        run(torch.zeros(2, 3, dtype=torch.float64))
    run(torch.zeros(2, 3))  # as it should be
    policy = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))  # no output Fisher
    with pytest.raises(TypeError, match=r"take one of natpg.policies' networks \(GaussianMLP, CategoricalMLP, .*got "
                                        r"Sequential"):
        run(torch.zeros(2, 3))


PLAIN_MLPS = {
    "gaussian": lambda act: GaussianMLP(17, 6, (64, 64), act, log_std_init=-0.5),
    "gaussian_1d": lambda act: GaussianMLP(3, 1, (32,), act),  # Pendulum's shape: a one-column mean slice
    "gaussian_deep": lambda act: GaussianMLP(5, 3, (16, 16, 16), act),
    "categorical": lambda act: CategoricalMLP(4, 3, (64, 64), act),
    "multi_categorical": lambda act: MultiCategoricalMLP(4, [3, 2], (32, 32), act),
    "bernoulli": lambda act: BernoulliMLP(4, 3, (32,), act),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("kind", PLAIN_MLPS)
def test_plain_mlp_fisher_products_are_autograds_bit_for_bit(kind, activation, dtype):
    """The hand-written Jv/Jᵀw of plain MLP policies calls autograd's kernels in autograd's order: every
    product equals the autograd construction's exactly, not merely to rounding (so training is unchanged)."""
    from natpg.fisher import fvp as fvp_module

    torch.manual_seed(0)
    policy = perturbed(PLAIN_MLPS[kind](activation)).to(dtype)
    obs = torch.randn(257, policy.mean_net[0].in_features if kind.startswith("gaussian")
                      else policy.logits_net[0].in_features, dtype=dtype)
    assert fvp_module._plain_mlp(policy) is not None
    fast = fisher_vector_product(policy, obs, damping=0.1)
    reference = fvp_module._autograd_fisher_vector_product(policy, obs, 0.1)
    with torch.no_grad():  # the products hold the Fisher of the fit's parameters, not of later ones
        for p in policy.parameters():
            p.add_(1.0)
    for _ in range(3):
        v = torch.randn(sum(p.numel() for p in policy.actor_parameters()), dtype=dtype)
        assert torch.equal(fast(v), reference(v))


def test_policies_that_are_not_plain_mlps_take_autograds_fisher_products():
    from natpg.fisher import fvp as fvp_module

    hooked = GaussianMLP(3, 2, (8,))
    hooked.mean_net[0].register_forward_hook(lambda module, inputs, output: output * 2.0)
    others = [GaussianMLP(3, 2, (8,), "elu"), CategoricalMLP(3, 2, (8,), mask=True), hooked]
    for policy in others:
        assert fvp_module._plain_mlp(policy) is None
    # and the hook is honoured: the product is that of the network it changes
    obs = torch.randn(5, 3)
    F = dense_fisher(hooked, obs)
    v = torch.randn(F.shape[0])
    assert torch.allclose(fisher_vector_product(hooked, obs)(v), F @ v, atol=1e-5, rtol=1e-4)


# Found by stop 47's mutation audit: behaviours no test above pins down.

def test_cg_stops_at_zero_or_negative_curvature_with_the_iterate_so_far(float64):
    """pᵀFp ≤ 0 stops CG with the iterate reached (an undamped Fisher with g outside its range): F = diag(1, 1, 0),
    b = (1, 0, 1): one step along b, then p = (0, 0, 2) with pᵀFp = 0, where α = rz/0 would make x inf/NaN; a first
    direction of negative curvature takes no step at all."""
    F = torch.diag(torch.tensor([1.0, 1.0, 0.0]))
    b = torch.tensor([1.0, 0.0, 1.0])
    x, info = conjugate_gradient(lambda v: F @ v, b, max_iters=10, tol=0.0)
    assert info.iterations == 1 and not info.converged
    torch.testing.assert_close(x, 2.0 * b, rtol=0, atol=0)
    F = torch.diag(torch.tensor([1.0, -2.0]))
    x, info = conjugate_gradient(lambda v: F @ v, torch.tensor([1.0, 1.0]), max_iters=10)
    assert info.iterations == 0 and torch.equal(x, torch.zeros(2))


def test_cg_stopped_by_its_iteration_cap_reports_not_converged(float64):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(20, 20, generator=g)
    F = A @ A.T / 20 + torch.diag(torch.logspace(-3, 2, 20))
    b = torch.randn(20, generator=g)
    _, info = conjugate_gradient(lambda v: F @ v, b, max_iters=2, tol=1e-12)
    assert info.iterations == 2 and not info.converged and info.residual_norm > 1e-12 * float(b.norm())


def test_fvp_of_a_policy_whose_output_does_not_reach_its_parameters_is_the_damping(float64):
    """η independent of the actor's parameters (a hook cuts the graph): F = 0, so the damped product is λv."""
    policy = CategoricalMLP(3, 4, (5,))
    policy.logits_net.register_forward_hook(lambda module, inputs, out: out.detach().requires_grad_(True))
    obs = torch.randn(6, 3)
    v = torch.randn(sum(p.numel() for p in policy.actor_parameters()))
    torch.testing.assert_close(fisher_vector_product(policy, obs, damping=0.5)(v), 0.5 * v)
    torch.testing.assert_close(fisher_vector_product(policy, obs)(v), torch.zeros_like(v))


@pytest.mark.parametrize("chunk", [1, 3, 4, 7])
def test_dense_fisher_is_the_mean_over_every_state_whatever_its_chunk(float64, chunk):
    """The agent's batches (2048 states) are larger than dense_fisher's default chunk (256): the chunked sum must be
    the mean over every state (an 8× larger F from dividing by the last chunk's size went unseen)."""
    policy = perturbed(GaussianMLP(3, 2, (5,)))
    obs = torch.randn(10, 3, generator=torch.Generator().manual_seed(2))
    F = dense_fisher(policy, obs)
    torch.testing.assert_close(dense_fisher(policy, obs, chunk=chunk), F, rtol=1e-12, atol=1e-13)
    v = torch.randn(F.shape[0])
    torch.testing.assert_close(F @ v, fisher_vector_product(policy, obs)(v), rtol=1e-10, atol=1e-12)
