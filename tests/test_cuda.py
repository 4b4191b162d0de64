"""CUDA learner: every update computation on the GPU gives the CPU's result within float32 tolerance.

Skipped where CUDA is unavailable (CI has no GPU). On a GPU machine: ``bash benchmarks/gpu_job.sh`` runs
these and the GPU benchmarks. References are the same computations on the CPU, in float32 on both sides
(CUDA's matmuls may use TF32 unless disabled; these tests disable it so that the tolerance is float32's).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import natpg
from natpg import fisher
from natpg.evaluation import evaluation_episodes
from natpg.algorithms import Batch, make_actor_update, make_critic
from natpg.policies import CategoricalMLP, GaussianMLP
from natpg.presets import default_config

# NATPG_TEST_CUDA_DEVICE=cpu runs these tests with the CPU standing in for the GPU: a check of the tests' own
# references and tolerances on a machine without one (not of the device handling, which needs two devices).
CUDA = torch.device(os.environ.get("NATPG_TEST_CUDA_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_devices = pytest.mark.skipif(CUDA.type == "cpu", reason="about a GPU learner beside the CPU")
TOL = dict(rtol=2e-4, atol=2e-5)


@pytest.fixture(autouse=True)
def _float32_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def policy_and_batch(kind: str, n: int = 512, seed: int = 0):
    torch.manual_seed(seed)
    policy = GaussianMLP(11, 3, (64, 64)) if kind == "gauss" else CategoricalMLP(11, 4, (64, 64))
    with torch.no_grad():
        for p in policy.actor_parameters():
            p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(seed + 1)
    obs = torch.randn(n, 11, generator=gen)
    with torch.no_grad():
        eta = policy(obs)
        act = policy.sample(eta, generator=gen)
        logp = policy.head.dist(eta).log_prob(act)
    adv = torch.randn(n, generator=gen)
    batch = Batch(obs=obs, act=act, adv=(adv - adv.mean()) / adv.std(), ret=torch.randn(n, generator=gen),
                  logp_old=logp, eta_old=eta)
    return policy, batch


def to_cuda(batch: Batch) -> Batch:
    return Batch(**{k: getattr(batch, k).to(CUDA) for k in ("obs", "act", "adv", "ret", "logp_old", "eta_old")})


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in params])


@pytest.mark.parametrize("kind", ["gauss", "categorical"])
def test_fisher_products_and_solvers_match_cpu(kind):
    policy, batch = policy_and_batch(kind)
    gpu = copy.deepcopy(policy).to(CUDA)
    P = sum(p.numel() for p in policy.actor_parameters())
    v = torch.randn(P)
    cpu_fvp = fisher.fisher_vector_product(policy, batch.obs, damping=0.1)
    gpu_fvp = fisher.fisher_vector_product(gpu, batch.obs.to(CUDA), damping=0.1)
    torch.testing.assert_close(gpu_fvp(v.to(CUDA)).cpu(), cpu_fvp(v), **TOL)
    torch.testing.assert_close(fisher.dense_fisher(gpu, batch.obs.to(CUDA)).cpu(),
                               fisher.dense_fisher(policy, batch.obs), **TOL)
    for make in (lambda: fisher.CG(damping=0.1, iters=10), lambda: fisher.KFAC(damping=0.1, estimator="exact"),
                 lambda: fisher.Diagonal(damping=0.1), lambda: fisher.Empirical(damping=0.1)):
        a, b = make(), make()
        a.fit(policy, batch.obs, batch.act)
        b.fit(gpu, batch.obs.to(CUDA), batch.act.to(CUDA))
        torch.testing.assert_close(b.solve(v.to(CUDA)).cpu(), a.solve(v), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["npg", "trpo", "acktr", "vpg", "nac", "ppo"])
def test_one_update_of_every_algorithm_matches_cpu(algorithm):
    """The actor update and the critic fit on the same batch, CPU against CUDA (exact K-FAC: no sampling)."""
    policy, batch = policy_and_batch("gauss")
    cfg = default_config(algorithm, "classic")
    results = []
    for device in (torch.device("cpu"), CUDA):
        torch.manual_seed(0)
        pol = copy.deepcopy(policy).to(device)
        critic = make_critic(cfg, 11).to(device)
        update = make_actor_update(cfg, torch.Generator().manual_seed(0))
        if hasattr(update, "curvature") and isinstance(update.curvature, fisher.KFAC):
            update.curvature.estimator = "exact"
        b = batch if device.type == "cpu" else to_cuda(batch)
        stats = update.update(pol, b)
        critic.fit(b.obs, b.ret, torch.Generator().manual_seed(0))
        results.append((flat(pol.actor_parameters()), flat(critic.parameters()), stats))
    (p_cpu, c_cpu, s_cpu), (p_gpu, c_gpu, s_gpu) = results
    torch.testing.assert_close(p_gpu, p_cpu, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(c_gpu, c_cpu, rtol=1e-3, atol=1e-4)
    if "step/kl" in s_cpu:
        assert s_gpu["step/kl"] == pytest.approx(s_cpu["step/kl"], rel=1e-2, abs=1e-6)


@two_devices
def test_agent_trains_on_cuda_and_keeps_its_tensors_there(tmp_path):
    agent = natpg.NPG("CartPole-v1", seed=0, device=CUDA.type, n_envs=4, n_steps=64, tensorboard=False)
    agent.learn(512)
    assert all(p.device.type == CUDA.type for p in agent.policy.parameters())
    assert all(p.device.type == CUDA.type for p in agent.critic.parameters())
    agent.save(tmp_path / "m")
    loaded = natpg.load(tmp_path / "m")
    # the CPU generator the sampler acts with is saved and restored apart from the CUDA one (bit-exact resume)
    assert loaded.sampling_generator is not loaded.generator
    assert torch.equal(loaded.sampling_generator.get_state(), agent.sampling_generator.get_state())
    obs = torch.zeros(4).numpy()
    assert loaded.predict(obs) == agent.predict(obs)
    mean, _ = natpg.evaluate(loaded, episodes=2, seed=1)
    assert mean > 0


@two_devices
def test_gpu_learner_acts_with_a_cpu_copy_of_the_policy():
    """device='cuda' with the local sampler: the updates run on the GPU, the per-step forward on a CPU copy
    given the policy's weights once per rollout (no host-device copy per step), the rollout lands on the GPU."""
    agent = natpg.NPG("Pendulum-v1", seed=0, n_envs=4, n_steps=64, device=CUDA.type, tensorboard=False)
    seen = []
    collect = None
    try:
        agent.learn(256)
        sampler = agent._sampler
        collect = sampler.collect

        def recording(policy, n_steps):
            rollout = collect(policy, n_steps)
            seen.append((rollout, {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}))
            return rollout

        sampler.collect = recording
        agent.learn(256, reset=False)
        actor = sampler._cpu_actor
        assert actor is not None and all(p.device.type == "cpu" for p in actor.parameters())
        assert all(p.device.type == CUDA.type for p in agent.policy.parameters())
        rollout, weights = seen[-1]
        assert rollout.obs.device.type == CUDA.type and rollout.act.device.type == CUDA.type
        for name, value in actor.state_dict().items():  # the copy acted with the weights of that rollout
            assert torch.equal(value, weights[name]), name
        assert agent.sampling_generator.device.type == "cpu"
    finally:
        agent.close()


def test_sampled_curvatures_on_the_gpu_draw_the_actions_the_cpu_run_draws():
    """K-FAC and the diagonal with sampled actions, given the agent's CPU generator and η on the GPU: the actions
    are drawn on the CPU from that generator, so the factors equal the CPU run's."""
    policy, batch = policy_and_batch("gauss")
    gpu = copy.deepcopy(policy).to(CUDA)
    v = torch.randn(sum(p.numel() for p in policy.actor_parameters()))
    for make in (lambda g: fisher.KFAC(damping=0.1, estimator="sampled", generator=g),
                 lambda g: fisher.Diagonal(damping=0.1, estimator="sampled", generator=g),
                 lambda g: fisher.CG(damping=0.1, iters=10, preconditioner="kfac", generator=g)):
        a, b = make(torch.Generator().manual_seed(5)), make(torch.Generator().manual_seed(5))
        a.fit(policy, batch.obs, batch.act)
        b.fit(gpu, batch.obs.to(CUDA), batch.act.to(CUDA))
        torch.testing.assert_close(b.solve(v.to(CUDA)).cpu(), a.solve(v), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("cls", [natpg.ACKTR, natpg.VPG])
def test_a_gpu_run_with_step_rule_state_resumes_on_the_gpu(tmp_path, cls):
    """ACKTR's momentum (actor and K-FAC critic) and VPG's Adam moments are saved on the CPU; loaded for a GPU run,
    they follow it to the GPU at the next update (a sampled K-FAC draws on the CPU generator)."""
    momentum = {"momentum": 0.9} if cls is natpg.ACKTR else {}  # Pendulum's ACKTR preset has none
    agent = cls("Pendulum-v1", seed=0, device=CUDA.type, n_envs=2, n_steps=64, tensorboard=False, **momentum)
    agent.learn(256)
    agent.save(tmp_path / "m")
    loaded = natpg.load(tmp_path / "m")
    loaded.learn(256, reset=False)
    state = loaded.actor_update.step_rule.state_dict()
    assert all(t.device.type == CUDA.type for t in state.values() if isinstance(t, torch.Tensor))
    assert all(p.device.type == CUDA.type for p in loaded.policy.parameters()) and loaded.env_steps == 512


def test_a_run_moves_between_cpu_and_gpu_with_its_sampling_generator(tmp_path):
    """The CPU generator the rollouts draw their actions from goes on across devices, both ways."""
    cpu = natpg.NPG("CartPole-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False)
    cpu.learn(64)
    cpu.save(tmp_path / "cpu")
    on_gpu = natpg.load(tmp_path / "cpu", device=CUDA.type)
    assert torch.equal(on_gpu.sampling_generator.get_state(), cpu.sampling_generator.get_state())
    gpu = natpg.NPG("CartPole-v1", seed=0, device=CUDA.type, n_envs=2, n_steps=32, tensorboard=False)
    gpu.learn(64)
    gpu.save(tmp_path / "gpu")
    on_cpu = natpg.load(tmp_path / "gpu", device="cpu")
    assert torch.equal(on_cpu.sampling_generator.get_state(), gpu.sampling_generator.get_state())


def test_stochastic_predict_and_evaluation_draw_what_the_cpu_draws(tmp_path):
    """predict(deterministic=False) and evaluate(deterministic=False) of a GPU agent draw on the CPU, as its rollouts
    do: the same actions and returns as the same weights on the CPU."""
    natpg.NPG("Pendulum-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False).learn(64, out_dir=tmp_path / "p")
    cpu, gpu = natpg.load(tmp_path / "p", device="cpu"), natpg.load(tmp_path / "p", device=CUDA.type)
    obs = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)).numpy()
    for _ in range(3):
        a_cpu, a_gpu = cpu.predict(obs, deterministic=False), gpu.predict(obs, deterministic=False)
        assert not (a_cpu == cpu.predict(obs, deterministic=True)).all()
        torch.testing.assert_close(torch.from_numpy(a_gpu), torch.from_numpy(a_cpu), rtol=1e-4, atol=1e-5)
    natpg.NPG("CartPole-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False).learn(64, out_dir=tmp_path / "c")
    cpu, gpu = natpg.load(tmp_path / "c", device="cpu"), natpg.load(tmp_path / "c", device=CUDA.type)
    # Exact returns: float32 logits differ between devices in the last bits, which flips a draw with a chance of
    # the order of 1e-4 over these ~100 draws; a failure here names that case, not a device bug, if it recurs.
    stochastic = evaluation_episodes(cpu, episodes=4, seed=3, deterministic=False)["return"]
    assert (evaluation_episodes(gpu, episodes=4, seed=3, deterministic=False)["return"] == stochastic).all()
    assert (evaluation_episodes(cpu, episodes=4, seed=3)["return"] != stochastic).any()


@pytest.mark.parametrize("sampler", ["workers", "processes"])
def test_a_gpu_learner_over_distributed_samplers_learns_what_the_cpu_learns(sampler):
    """The worker samplers act with CPU copies of the weights (sent from the GPU); the merged rollout goes to the
    GPU, and two updates there give the CPU run's parameters within float32 tolerance."""
    params = {}
    for device in ("cpu", CUDA.type):
        agent = natpg.NPG("Pendulum-v1", seed=0, sampler=sampler, workers=2, n_envs=4, n_steps=64, device=device,
                          tensorboard=False)
        try:
            agent.learn(512)
        finally:
            agent.close()
        assert all(p.device.type == device for p in agent.policy.parameters()) and agent.env_steps == 512
        params[device] = flat(agent.policy.parameters())
    torch.testing.assert_close(params[CUDA.type], params["cpu"], rtol=1e-3, atol=1e-4)


def solve_on_both(policy, obs, act, make, v):
    """make() fitted on the CPU and on the GPU (the same CPU generator seed each); both solves, on the CPU."""
    gpu = copy.deepcopy(policy).to(CUDA)
    a, b = make(), make()
    a.fit(policy, obs, act)
    b.fit(gpu, obs.to(CUDA), act.to(CUDA))
    return b.solve(v.to(CUDA)).cpu(), a.solve(v)


@pytest.mark.parametrize("name", ["cg-subsample", "cg+kfac", "cg+diagonal", "dense", "empirical-undamped"])
def test_the_other_solvers_match_cpu(name):
    """The Fisher subsample (drawn on the CPU generator), CG preconditioned by K-FAC or the diagonal, the dense
    Fisher's Cholesky and the undamped empirical Fisher's pseudo-inverse, GPU against CPU."""
    policy, batch = policy_and_batch("gauss", n=256 if name == "dense" else 512)
    if name == "dense":  # a small torso: the P×P matrix is formed
        torch.manual_seed(3)
        policy = GaussianMLP(11, 3, (16,))
    make = {"cg-subsample": lambda: fisher.CG(damping=0.1, iters=10, subsample=0.5,
                                              generator=torch.Generator().manual_seed(1)),
            "cg+kfac": lambda: fisher.CG(damping=0.1, iters=10, preconditioner="kfac",
                                         generator=torch.Generator().manual_seed(1)),
            "cg+diagonal": lambda: fisher.CG(damping=0.1, iters=10, preconditioner="diagonal"),
            "dense": lambda: fisher.Dense(damping=0.1),
            "empirical-undamped": lambda: fisher.Empirical(damping=0.0, subsample=0.25,
                                                           generator=torch.Generator().manual_seed(1))}[name]
    v = torch.randn(sum(p.numel() for p in policy.actor_parameters()), generator=torch.Generator().manual_seed(2))
    if name == "empirical-undamped":  # in the span of the scores, where the pseudo-inverse is well defined
        emp = make()
        emp.fit(policy, batch.obs, batch.act)
        v = emp.mv(v)
    on_gpu, on_cpu = solve_on_both(policy, batch.obs, batch.act, make, v)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["multibinary", "multidiscrete", "cnn"])
def test_other_heads_and_the_cnn_match_cpu(kind):
    """The Bernoulli and multi-categorical heads' Fisher products and K-FAC, and K-FAC of a Nature-CNN's conv
    layers, GPU against CPU."""
    from natpg.policies import BernoulliMLP, MultiCategoricalMLP

    torch.manual_seed(0)
    if kind == "cnn":
        policy, obs = CategoricalMLP(36 * 36, 3, image=((1, 36, 36), False, 4, (2, 3, 2))), torch.rand(64, 36 * 36)
    else:
        policy = BernoulliMLP(11, 3, (32,)) if kind == "multibinary" else MultiCategoricalMLP(11, [2, 3], (32,))
        obs = torch.randn(256, 11)
    with torch.no_grad():
        act = policy.sample(policy(obs), generator=torch.Generator().manual_seed(1))
    v = torch.randn(sum(p.numel() for p in policy.actor_parameters()), generator=torch.Generator().manual_seed(2))
    gpu = copy.deepcopy(policy).to(CUDA)
    torch.testing.assert_close(fisher.fisher_vector_product(gpu, obs.to(CUDA), damping=0.1)(v.to(CUDA)).cpu(),
                               fisher.fisher_vector_product(policy, obs, damping=0.1)(v), **TOL)
    on_gpu, on_cpu = solve_on_both(policy, obs, act, lambda: fisher.KFAC(damping=0.1, estimator="exact"), v)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-4)


def test_an_exported_gpu_policy_runs_on_the_cpu_and_acts_as_predict_does():
    """natpg.export of a GPU learner: a CPU module (weights and statistics copied), whose actions are predict's within
    float32 tolerance (predict runs the network on the GPU)."""
    agent = natpg.NPG("Pendulum-v1", seed=0, device=CUDA.type, n_envs=4, n_steps=64, tensorboard=False)
    agent.learn(512)
    module = natpg.export(agent)
    assert all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])
    obs = torch.randn(16, 3)
    expected = torch.as_tensor(agent.predict(obs.numpy()))
    torch.testing.assert_close(module(obs), expected, **TOL)
