"""Every space users bring: MultiDiscrete, MultiBinary, masked Discrete, tanh-squashed Box actions; Dict, Tuple,
Discrete and image observations. The analytic output Fisher of each new head against the expected outer product
of its score by enumeration (float64); the policy-level Fisher three ways; K-FAC on a Nature-CNN policy against
the dense Fisher where K-FAC is exact; every algorithm on an environment of each space."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch.distributions import Normal, TransformedDistribution, kl_divergence
from torch.distributions.transforms import AffineTransform, TanhTransform

import natpg
from natpg.fisher import KFAC, dense_fisher, fisher_vector_product
from natpg.fisher.fvp import kl_hessian_vector_product
from natpg.policies import (BernoulliHead, BernoulliMLP, CategoricalMLP, GaussianMLP, MultiCategoricalHead,
                            MultiCategoricalMLP, env_action)


# --------------------------------------------------------------------------------------------------
# Output Fisher of each head = E_a[s sᵀ], s = ∇_η log p(a | η), by enumerating every action
# --------------------------------------------------------------------------------------------------

def enumerated_fisher(head, eta: torch.Tensor, actions: list[torch.Tensor]) -> torch.Tensor:
    """Σ_a p(a|η) s_a s_aᵀ over the listed actions, for one η [K]."""
    F = torch.zeros(eta.numel(), eta.numel(), dtype=torch.float64)
    for a in actions:
        e = eta.detach().clone().requires_grad_(True)
        logp = head.dist(e.unsqueeze(0)).log_prob(a.unsqueeze(0)).squeeze(0)
        (s,) = torch.autograd.grad(logp, e)
        F += logp.exp().detach() * torch.outer(s, s)
    return F


def test_multicategorical_fisher_equals_enumerated_score_outer_product(float64):
    torch.manual_seed(0)
    nvec = [2, 3, 4]
    head = MultiCategoricalHead(nvec)
    actions = [torch.tensor(a) for a in itertools.product(*[range(n) for n in nvec])]
    for _ in range(3):
        eta = torch.randn(sum(nvec)) * 1.5
        F = head.fisher(eta.unsqueeze(0))[0]
        torch.testing.assert_close(F, enumerated_fisher(head, eta, actions), rtol=1e-12, atol=1e-14)
        u = torch.randn(sum(nvec))
        torch.testing.assert_close(head.fisher_mv(eta.unsqueeze(0), u.unsqueeze(0))[0], F @ u, rtol=1e-12, atol=1e-14)
        probs = sum(head.dist(eta.unsqueeze(0)).log_prob(a.unsqueeze(0)).exp() for a in actions)
        torch.testing.assert_close(probs, torch.ones(1), rtol=1e-12, atol=1e-12)


def test_bernoulli_fisher_equals_enumerated_score_outer_product(float64):
    torch.manual_seed(1)
    n = 4
    head = BernoulliHead()
    actions = [torch.tensor(a, dtype=torch.float64) for a in itertools.product([0, 1], repeat=n)]
    for _ in range(3):
        eta = torch.randn(n) * 2.0
        F = head.fisher(eta.unsqueeze(0))[0]
        torch.testing.assert_close(F, enumerated_fisher(head, eta, actions), rtol=1e-12, atol=1e-14)


def test_kl_and_entropy_of_new_heads_match_enumeration(float64):
    """KL(p‖q) = Σ_a p(a)(log p(a) − log q(a)) for the registered multi-categorical KL and Bernoulli's, and the
    entropy −Σ_a p(a) log p(a) over every joint action."""
    torch.manual_seed(2)
    cases = [(MultiCategoricalHead([3, 2]), [torch.tensor(a) for a in itertools.product(range(3), range(2))], 5),
             (BernoulliHead(), [torch.tensor(a, dtype=torch.float64) for a in itertools.product([0, 1], repeat=3)], 3)]
    for head, actions, K in cases:
        e1, e2 = torch.randn(1, K), torch.randn(1, K)
        p, q = head.dist(e1), head.dist(e2)
        ref = sum(p.log_prob(a[None]).exp() * (p.log_prob(a[None]) - q.log_prob(a[None])) for a in actions)
        torch.testing.assert_close(kl_divergence(p, q), ref, rtol=1e-12, atol=1e-14)
        entropy = -sum(p.log_prob(a[None]).exp() * p.log_prob(a[None]) for a in actions)
        torch.testing.assert_close(p.entropy(), entropy, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Policy-level Fisher: dense = Σ_a π(a|s) ∇θ log π ∇θ log πᵀ (loop) = FVP = KL Hessian
# --------------------------------------------------------------------------------------------------

def flat_grad(scalar, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params)])


def policy_score_fisher(policy, obs: torch.Tensor, actions_of) -> torch.Tensor:
    """(1/B) Σ_b Σ_a π(a|s_b) ∇θ log π(a|s_b) ∇θ log π(a|s_b)ᵀ, a loop over states and enumerated actions."""
    params = policy.actor_parameters()
    P = sum(p.numel() for p in params)
    F = torch.zeros(P, P, dtype=torch.float64)
    for b in range(obs.shape[0]):
        for a in actions_of(obs[b]):
            logp = policy.dist(obs[b : b + 1]).log_prob(a.unsqueeze(0)).squeeze(0)
            s = flat_grad(logp, params)
            F += logp.exp().detach() * torch.outer(s, s)
    return F / obs.shape[0]


def perturb(policy, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.actor_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


def masked_obs(n: int = 6, obs_dim: int = 3, n_actions: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, obs_dim, generator=g)
    mask = (torch.rand(n, n_actions, generator=g) > 0.4).double()
    mask[:, 0] = 1.0  # at least one action allowed
    mask[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # one state with a single allowed action
    return torch.cat([x, mask], dim=1)


POLICIES = {
    "multidiscrete": (lambda: MultiCategoricalMLP(3, [2, 3], hidden=(5,)),
                      lambda s: [torch.tensor(a) for a in itertools.product(range(2), range(3))], 3),
    "multibinary": (lambda: BernoulliMLP(3, 3, hidden=(5,)),
                    lambda s: [torch.tensor(a, dtype=torch.float64) for a in itertools.product([0, 1], repeat=3)], 3),
    "masked": (lambda: CategoricalMLP(3, 4, hidden=(5,), mask=True),
               lambda s: [torch.tensor(a) for a in range(4) if s[3 + a] > 0.5], None),
}


@pytest.mark.parametrize("kind", list(POLICIES))
def test_policy_fisher_three_ways(kind, float64):
    make, actions_of, obs_dim = POLICIES[kind]
    torch.manual_seed(3)
    policy = perturb(make())
    obs = masked_obs() if obs_dim is None else torch.randn(6, obs_dim)
    F = dense_fisher(policy, obs)
    torch.testing.assert_close(F, policy_score_fisher(policy, obs, actions_of), rtol=1e-10, atol=1e-12)
    P = F.shape[0]
    fvp, klh = fisher_vector_product(policy, obs), kl_hessian_vector_product(policy, obs)
    for v in torch.randn(3, P):
        torch.testing.assert_close(fvp(v), F @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(klh(v), F @ v, rtol=1e-9, atol=1e-11)


def test_masked_actions_have_zero_probability_and_no_gradient(float64):
    torch.manual_seed(4)
    policy = perturb(CategoricalMLP(3, 4, hidden=(5,), mask=True))
    obs = masked_obs()
    dist = policy.dist(obs)
    allowed = obs[:, 3:] > 0.5
    assert torch.all(dist.probs[~allowed] == 0)
    torch.testing.assert_close(dist.probs.sum(-1), torch.ones(6))
    assert torch.all(dist.probs[1] == torch.tensor([0.0, 0.0, 1.0, 0.0]))  # the single allowed action is certain
    # The state with one allowed action contributes nothing to the Fisher: it equals the Fisher of the others.
    F_all = dense_fisher(policy, obs) * 6
    F_rest = dense_fisher(policy, torch.cat([obs[:1], obs[2:]])) * 5
    torch.testing.assert_close(F_all, F_rest, rtol=1e-10, atol=1e-12)
    # KL to a perturbed copy is finite and sums over allowed actions only.
    other = perturb(CategoricalMLP(3, 4, hidden=(5,), mask=True), seed=9)
    p, q = policy.dist(obs), other.dist(obs)
    kl = kl_divergence(p, q)
    ref = torch.where(allowed, p.probs * (p.logits - q.logits), torch.zeros(())).sum(-1)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, ref, rtol=1e-10, atol=1e-12)


def test_tanh_squash_has_the_gaussian_score_so_the_same_fisher(float64):
    """log π(a|s) of a = low + (tanh(u)+1)(high−low)/2 (torch's TransformedDistribution) differs from the Gaussian's
    log N(u) by a θ-free Jacobian: the per-sample scores agree, hence the Fisher used for u is the squashed one's."""
    torch.manual_seed(5)
    policy = perturb(GaussianMLP(3, 2, hidden=(4,), log_std_init=-0.5, squash=True))
    low, high = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0])
    obs = torch.randn(5, 3)
    with torch.no_grad():
        u = policy.sample(policy(obs))
    params = policy.actor_parameters()
    for b in range(5):
        eta = policy(obs[b : b + 1])
        mean, log_std = eta[:, :2], eta[:, 2:]
        squashed = TransformedDistribution(Normal(mean, log_std.exp()),
                                           [TanhTransform(), AffineTransform((low + high) / 2, (high - low) / 2)])
        a = torch.as_tensor(env_action(u[b : b + 1].numpy(), spaces.Box(low.numpy(), high.numpy(), dtype=np.float64),
                                       squash=True))
        s_squashed = flat_grad(squashed.log_prob(a).sum(), params)
        s_gauss = flat_grad(policy.dist(obs[b : b + 1]).log_prob(u[b : b + 1]).sum(), params)
        torch.testing.assert_close(s_squashed, s_gauss, rtol=1e-8, atol=1e-10)


def test_env_action_maps_each_space():
    box = spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([1.0, 4.0], np.float32))
    u = np.array([[5.0, -5.0], [0.0, 0.0]])
    np.testing.assert_array_equal(env_action(u, box), [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(env_action(u, box, squash=True), [[np.tanh(5.0), 2 * (np.tanh(-5.0) + 1)], [0.0, 2.0]],
                               rtol=1e-6)
    ints = spaces.Box(-3, 3, (4,), np.int64)  # to the nearest integer: -0.7 is -1, not 0
    out = env_action(np.array([[-0.7, 0.4, 2.6, 9.0]]), ints)
    assert out.dtype == np.int64 and out.tolist() == [[-1, 0, 3, 3]]
    for dtype in (np.int64, np.uint64, np.int32, np.uint8):  # bounds the whole dtype: its ends, not wrapped
        info = np.iinfo(dtype)
        full = spaces.Box(info.min, info.max, (3,), dtype)
        out = env_action(np.array([[-1e300, 1e300, 2.4]]), full)
        lo, hi = int(out[0, 0]), int(out[0, 1])  # Python integers: exact
        assert out.dtype == dtype and out[0, 2] == 2 and full.contains(out[0])
        assert lo == info.min and 0 <= info.max - hi <= 2048, (dtype, lo, hi)  # a float ULP there
        squashed = env_action(np.array([[-50.0, 50.0, 0.0]]), full, squash=True)  # tanh: to the ends, the middle
        assert squashed.dtype == dtype and full.contains(squashed[0])
        assert int(squashed[0, 0]) == info.min and 0 <= info.max - int(squashed[0, 1]) <= 2048
        assert abs(int(squashed[0, 2]) - (info.min + info.max) / 2) <= 2048
    int8 = spaces.Box(-100, 100, (3,), np.int8)  # a width of 200, which int8 wraps to -56
    out = env_action(np.array([[-2.0, 0.0, 2.0]]), int8, squash=True)  # 100·tanh(±2) = ±96.4
    assert out.tolist() == [[-96, 0, 96]] and out.dtype == np.int8
    md = spaces.MultiDiscrete([[2, 3], [4, 5]])
    assert env_action(np.array([[1, 2, 3, 4]]), md).shape == (1, 2, 2)
    mb = spaces.MultiBinary(3)
    out = env_action(np.array([[1.0, 0.0, 1.0]]), mb)
    assert out.dtype == mb.dtype and out.tolist() == [[1, 0, 1]]


ACTING_POLICIES = {
    "gaussian": (lambda: GaussianMLP(3, 2, hidden=(5, 4), log_std_init=-0.3), lambda: torch.randn(7, 3)),
    "gaussian-squash": (lambda: GaussianMLP(3, 2, hidden=(5,), squash=True), lambda: torch.randn(7, 3)),
    "categorical": (lambda: CategoricalMLP(3, 4, hidden=(5,)), lambda: torch.randn(7, 3)),
    "masked": (lambda: CategoricalMLP(3, 4, hidden=(5,), mask=True), lambda: masked_obs(n=7).float()),
    "multidiscrete": (lambda: MultiCategoricalMLP(3, [2, 3], hidden=(5,)), lambda: torch.randn(7, 3)),
    "multibinary": (lambda: BernoulliMLP(3, 3, hidden=(5,)), lambda: torch.randn(7, 3)),
    "cnn": (lambda: CategoricalMLP(36 * 36, 3, image=SMALL_CNN), lambda: torch.rand(7, 36 * 36) * 255),
}


@pytest.mark.parametrize("kind", list(ACTING_POLICIES))
def test_rollout_act_equals_sample_of_forward_without_hooks(kind):
    """The sampler's lean per-step path gives bit for bit the actions of ``sample(policy(obs))`` from the same
    draws, for every head, and leaves the MLP layers' forward hooks (K-FAC's) unfired (a CNN torso's own
    layers are called as usual)."""
    make, make_obs = ACTING_POLICIES[kind]
    torch.manual_seed(1)
    policy = perturb(make(), scale=0.5)
    obs = make_obs()
    fired = []
    for m in policy.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda *_: fired.append(1))
    with torch.inference_mode():
        expected = policy.sample(policy(obs), torch.Generator().manual_seed(5))
        fired.clear()
        acted = policy.rollout_actor()(obs, torch.Generator().manual_seed(5))
    assert (fired == []) == (kind != "cnn") and acted.shape == expected.shape
    assert torch.equal(acted, expected)
    assert not torch.equal(acted, policy.rollout_actor()(obs, torch.Generator().manual_seed(6)))  # the draws matter


# --------------------------------------------------------------------------------------------------
# K-FAC on a Nature-CNN policy: exact blocks where K-FAC is exact
# --------------------------------------------------------------------------------------------------

SMALL_CNN = ((1, 36, 36), False, 4, (2, 3, 2))  # Nature-CNN layers, narrow: conv3 sees one 1×1 position


def layer_index(policy, layer) -> torch.Tensor:
    """Flat positions of W̄ = [W | b] (rows o, columns the flattened kernel then the bias) in actor order."""
    offsets, off = {}, 0
    for p in policy.actor_parameters():
        offsets[id(p)] = off
        off += p.numel()
    out_dim, in_dim = layer.weight.shape[0], layer.weight[0].numel()
    idx = [[offsets[id(layer.weight)] + o * in_dim + i for i in range(in_dim)] + [offsets[id(layer.bias)] + o]
           for o in range(out_dim)]
    return torch.tensor(idx).reshape(-1)


@pytest.mark.parametrize("head", ["categorical", "multidiscrete"])
def test_kfac_of_nature_cnn_equals_dense_fisher_where_exact(head, float64):
    """On identical observations every layer whose weight is used at one position (the Linear layers and conv3,
    whose output is 1×1) has a per-sample score g āᵀ with ā fixed: its K-FAC block A⊗G is the exact Fisher block.
    conv1 and conv2 share their weights over many positions: K-FAC's independence assumption is not exact there,
    and the test checks that it indeed differs."""
    torch.manual_seed(6)
    policy = (CategoricalMLP(36 * 36, 3, image=SMALL_CNN) if head == "categorical"
              else MultiCategoricalMLP(36 * 36, [2, 3], image=SMALL_CNN))
    perturb(policy, scale=0.3)
    with torch.no_grad():  # keep every ReLU alive (small weights, positive biases): no block is zero
        for m in policy.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(0.2)
                m.bias.abs_().add_(0.5)
    obs = (torch.rand(1, 36 * 36) * 255).expand(5, -1).contiguous()
    kfac = KFAC(damping=0.0, estimator="exact")
    kfac.fit(policy, obs)
    F = dense_fisher(policy, obs)
    kron = {slot.module: torch.kron(G, A) for slot, (A, G) in zip(kfac.structure.layers, kfac.factors)}
    torso = policy.logits_net[0]
    conv1, conv2, conv3 = torso.convs[0], torso.convs[2], torso.convs[4]
    assert len(kron) == 5
    for layer in (conv3, torso.fc[0], policy.logits_net[1]):
        i = layer_index(policy, layer)
        assert float(F[i][:, i].norm()) > 1e-3
        torch.testing.assert_close(kron[layer], F[i][:, i], rtol=1e-9, atol=1e-12)
    for layer in (conv1, conv2):
        i = layer_index(policy, layer)
        assert float((kron[layer] - F[i][:, i]).norm() / F[i][:, i].norm()) > 1e-3


# --------------------------------------------------------------------------------------------------
# Every algorithm on an environment of each space
# --------------------------------------------------------------------------------------------------

class SpaceEnv(gym.Env):
    """A small task over arbitrary spaces: reward 1 when the action's first entry matches a bit of the state."""

    def __init__(self, observation_space, action_space, length: int = 20):
        self.observation_space, self.action_space, self.length = observation_space, action_space, length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        assert self.action_space.contains(action), (action, self.action_space)
        self.t += 1
        first = float(np.asarray(action).reshape(-1)[0])
        return self.observation_space.sample(), float(first > 0), False, self.t >= self.length, {}


class MaskedSpaceEnv(SpaceEnv):
    """SpaceEnv whose info carries an action mask that forbids action 1 (asserted never sent)."""

    MASK = np.array([1, 0, 1], np.int8)

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return obs, {**info, "action_mask": self.MASK}

    def step(self, action):
        assert action != 1, "a masked action was sent"
        obs, rew, term, trunc, info = super().step(action)
        return obs, rew, term, trunc, {**info, "action_mask": self.MASK}


IMAGE = spaces.Box(0, 255, (36, 36, 1), np.uint8)  # channels last, as pixels come from most envs
SPACE_ENVS = {
    "natpgspace/MultiDiscrete-v0": lambda: SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.MultiDiscrete([3, 2])),
    "natpgspace/MultiBinary-v0": lambda: SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.MultiBinary(4)),
    # keys in the env's own order, not sorted (a list of pairs keeps it; a plain dict would be sorted)
    "natpgspace/DictObs-v0": lambda: SpaceEnv(spaces.Dict([("pos", spaces.Box(-1, 1, (2,))),
                                                           ("mode", spaces.Discrete(3)),
                                                           ("flags", spaces.MultiBinary(2))]), spaces.Discrete(2)),
    "natpgspace/TupleObs-v0": lambda: SpaceEnv(spaces.Tuple([spaces.Box(-1, 1, (2,)), spaces.MultiDiscrete([2, 3])]),
                                               spaces.Box(-1, 1, (2,))),
    "natpgspace/Image-v0": lambda: SpaceEnv(IMAGE, spaces.Discrete(3), length=8),
    "natpgspace/EmptyObs-v0": lambda: SpaceEnv(spaces.Box(-1, 1, (0,)), spaces.Discrete(2)),  # a bandit: no state
    # the critic's CNN reads the image and not the mask appended after it
    "natpgspace/MaskedImage-v0": lambda: MaskedSpaceEnv(IMAGE, spaces.Discrete(3), length=8),
}
# MiniGrid's symbolic 7×7×3 observation: uint8 with 3 axes but too small for the Nature-CNN (not in CASES)
SMALL_IMAGE_ENV = "natpgspace/SmallImage-v0"
gym.register(id=SMALL_IMAGE_ENV, entry_point=lambda: SpaceEnv(spaces.Box(0, 255, (7, 7, 3), np.uint8),
                                                               spaces.Discrete(3), length=8))
for _id, _entry in SPACE_ENVS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry)

ALGOS = ["NPG", "TRPO", "ACKTR", "NAC", "VPG", "PPO"]
CASES = [(env, {"action_mask": "action_mask"} if "Masked" in env else {}) for env in SPACE_ENVS] + [
    ("Taxi-v4", {"action_mask": "action_mask"}),  # Discrete observations (one-hot) and the info-key mask
    ("Pendulum-v1", {"action_squash": "tanh"}),
]


def tiny(algo: str, env: str, **kw):
    cfg = dict(n_envs=2, n_steps=8, tensorboard=False, hidden=(8,), critic_hidden=(8,), critic_epochs=1,
               cg_iters=3, ppo_epochs=1, **kw)
    if env in ("natpgspace/Image-v0", "natpgspace/MaskedImage-v0") and algo == "ACKTR":
        cfg["critic_optimizer"] = "adam"  # the K-FAC critic is for MLPs (a clear error says so; tested below)
    return cfg


@pytest.mark.parametrize("env,extra", CASES, ids=[c[0].split("/")[-1] for c in CASES])
@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_runs_on_every_space(algo, env, extra, tmp_path):
    agent = getattr(natpg, algo)(env, seed=0, **tiny(algo, env, **extra))
    before = [p.detach().clone() for p in agent.policy.actor_parameters()]
    agent.learn(32)
    assert agent.env_steps == 32
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.policy.actor_parameters())), "no update"
    probe = gym.make(env)
    obs, info = probe.reset(seed=3)
    kw = {"action_mask": info["action_mask"]} if extra.get("action_mask") else {}
    act = agent.predict(obs, **kw)
    if extra.get("action_mask"):
        assert info["action_mask"][act] == 1
    assert probe.action_space.contains(act), (act, probe.action_space)
    agent.save(tmp_path / "m")
    loaded = natpg.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(obs, **kw), act)
    mean, _ = natpg.evaluate(loaded, episodes=2, seed=5)
    assert np.isfinite(mean)


def test_a_saved_space_keeps_its_kind_bounds_and_dict_key_order():
    from natpg.checkpoint import space_from_dict, space_to_dict

    nested = spaces.Dict([("z", spaces.Tuple([spaces.Box(-1, 2, (2, 3), np.float64), spaces.Discrete(4, start=-1)])),
                          ("a", spaces.MultiDiscrete([2, 5], start=[1, 0])), ("m", spaces.MultiBinary([2, 2]))])
    copied = space_from_dict(json.loads(json.dumps(space_to_dict(nested))))
    assert copied == nested and list(copied.spaces) == ["z", "a", "m"]  # Dict's == ignores the order
    rng = np.random.default_rng(0)
    for _ in range(5):
        nested.seed(int(rng.integers(1 << 30)))
        o = nested.sample()
        np.testing.assert_array_equal(spaces.flatten(copied, o), spaces.flatten(nested, o))


def test_a_loaded_agent_reads_dict_observations_in_the_envs_key_order(tmp_path):
    """The flattened input follows the Dict's key order: a loaded agent must flatten as the env's space did in
    training (a space rebuilt from a plain dict would sort the keys, ["flags", "mode", "pos"], and feed the policy
    shuffled inputs without an error)."""
    agent = natpg.NPG("natpgspace/DictObs-v0", seed=0, **tiny("NPG", "natpgspace/DictObs-v0"))
    agent.learn(64)
    agent.save(tmp_path / "m")
    loaded = natpg.load(tmp_path / "m")
    assert list(loaded.observation_space.spaces) == list(gym.make("natpgspace/DictObs-v0").observation_space.spaces)
    space = loaded.observation_space
    space.seed(1)
    batch = [space.sample() for _ in range(200)]
    np.testing.assert_array_equal(loaded.predict(batch), agent.predict(batch))


def test_evaluation_on_an_env_whose_dict_has_the_same_keys_in_another_order_is_refused():
    """gymnasium's Dict == ignores the key order, which flattening follows: the policy would read shuffled inputs."""
    if "natpgspace/DictObsReordered-v0" not in gym.registry:
        gym.register("natpgspace/DictObsReordered-v0", entry_point=lambda: SpaceEnv(
            spaces.Dict([("mode", spaces.Discrete(3)), ("pos", spaces.Box(-1, 1, (2,))),
                         ("flags", spaces.MultiBinary(2))]), spaces.Discrete(2)))
    agent = natpg.NPG("natpgspace/DictObs-v0", seed=0, **tiny("NPG", "natpgspace/DictObs-v0"))
    reordered = gym.make("natpgspace/DictObsReordered-v0").observation_space
    assert reordered == agent.observation_space  # to gymnasium
    with pytest.raises(ValueError, match=r"environment 'natpgspace/DictObsReordered-v0' \(observations Dict\('mode'"
                                         r".*does not match the agent trained on 'natpgspace/DictObs-v0'"):
        natpg.evaluate(agent, "natpgspace/DictObsReordered-v0", episodes=1)
    assert np.isfinite(natpg.evaluate(agent, "natpgspace/DictObs-v0", episodes=1)[0])  # its own id, given


def test_acktr_kfac_critic_on_images_is_a_clear_error():
    with pytest.raises(ValueError, match="K-FAC critic\\) supports MLP critics only"):
        natpg.ACKTR("natpgspace/Image-v0", n_envs=2, n_steps=8, tensorboard=False)


def test_images_skip_running_normalisation_and_reach_a_cnn():
    agent = natpg.NPG("natpgspace/Image-v0", n_envs=2, n_steps=8, tensorboard=False)
    assert not agent.obs_normalizer.enabled
    assert isinstance(agent.policy.logits_net[0], natpg.policies.NatureCNN)
    assert agent.policy.logits_net[0].channels_last


def test_small_uint8_images_are_read_flat_by_an_mlp():
    """7×7×3 would crash the Nature-CNN's 8×8 convolution: such a Box is read like any other, flattened and
    normalised."""
    agent = natpg.NPG(SMALL_IMAGE_ENV, seed=0, n_envs=2, n_steps=8, tensorboard=False, hidden=(8,),
                      critic_hidden=(8,), critic_epochs=1, cg_iters=3)
    nets = [*agent.policy.modules(), *agent.critic.modules()]
    assert not any(isinstance(m, natpg.policies.NatureCNN) for m in nets)
    assert isinstance(agent.policy.logits_net[0], torch.nn.Linear) and agent.policy.logits_net[0].in_features == 147
    assert agent.obs_normalizer.enabled
    before = [p.detach().clone() for p in agent.policy.actor_parameters()]
    agent.learn(32)  # two updates
    assert agent.updates == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.policy.actor_parameters()))
    obs, _ = gym.make(SMALL_IMAGE_ENV).reset(seed=1)
    assert agent.predict(obs) in range(3)


@pytest.mark.parametrize("shape,layout", [
    ((4, 84, 84), ((4, 84, 84), False)),  # Atari after natpg's preprocessing: 4 stacked frames first
    ((84, 84, 4), ((84, 84, 4), True)),
    ((84, 84, 3), ((84, 84, 3), True)),
    ((210, 160, 3), ((210, 160, 3), True)),  # a raw Atari frame
    ((1, 84, 84), ((1, 84, 84), False)),
    ((3, 64, 48), ((3, 64, 48), False)),
    ((36, 36, 1), ((36, 36, 1), True)),  # the smallest the Nature-CNN reads
    ((7, 7, 3), None), ((16, 16, 3), None), ((4, 4, 1), None),  # too small: read flat
    ((35, 36, 3), None), ((3, 36, 35), None), ((84, 84), None), ((2, 84, 84, 3), None),
])
def test_image_layout(shape, layout):
    assert natpg.policies.image_layout(shape) == layout


@pytest.mark.parametrize("shape,last", [((4, 84, 84), False), ((84, 84, 4), True), ((210, 160, 3), True),
                                        ((4, 4, 1), True), ((4, 4, 4), True), ((3, 4, 4), False),
                                        ((1, 7, 7), False), ((7, 7, 3), True)])
def test_image_channels_last(shape, last):
    """(4, 4, 1) is a 4×4 one-channel image, [H, W, C] (it used to be read as 4 channels of 4×1)."""
    assert natpg.policies.image_channels_last(shape) is last


def test_nature_cnn_rejects_images_too_small_for_its_convolutions():
    with pytest.raises(ValueError, match=r"H, W ≥ 36, got \(16, 16, 3\)"):
        natpg.policies.NatureCNN((16, 16, 3), channels_last=True)


@pytest.mark.parametrize("algo", ["NPG", "ACKTR"])
def test_a_masked_image_policy_and_critic_read_the_image_before_the_mask(algo):
    """Flat observations are [image, mask]: the CNNs of the policy and the critic read the first C·H·W entries,
    whatever the mask, and the mask acts on the logits only (a CNN reading the last entries still trained)."""
    agent = getattr(natpg, algo)("natpgspace/MaskedImage-v0", seed=0, **tiny(algo, "natpgspace/MaskedImage-v0",
                                                                            action_mask="action_mask"))
    image = torch.rand(5, math.prod(IMAGE.shape), generator=torch.Generator().manual_seed(0)) * 255
    allow_all, allow_two = torch.ones(5, 3), torch.tensor([1.0, 0.0, 1.0]).expand(5, 3)
    cnn = agent.policy.logits_net[0]
    assert isinstance(cnn, natpg.policies.NatureCNN)
    torch.testing.assert_close(cnn(torch.cat([image, allow_all], 1)), cnn(torch.cat([image, allow_two], 1)),
                               rtol=0, atol=0)
    torch.testing.assert_close(cnn(torch.cat([image, allow_all], 1)), cnn(image), rtol=0, atol=0)
    shifted = torch.cat([image[:, 3:], allow_all], 1)  # the last C·H·W entries: another image
    assert not torch.equal(cnn(torch.cat([image, allow_all], 1)), cnn(shifted))
    with torch.no_grad():
        values = [agent.critic(torch.cat([image, m], 1)) for m in (allow_all, allow_two)]
        probs = agent.policy.dist(torch.cat([image, allow_two], 1)).probs
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    assert torch.all(probs[:, 1] == 0) and torch.all(probs.sum(1) > 0.999)


def test_predict_takes_native_dict_observations_and_batches():
    agent = natpg.NPG("natpgspace/DictObs-v0", n_envs=2, n_steps=8, tensorboard=False)
    env = gym.make("natpgspace/DictObs-v0")
    obs, _ = env.reset(seed=0)
    single = agent.predict(obs)
    batch = agent.predict([obs, obs])
    assert env.action_space.contains(single) and batch.tolist() == [single, single]
    with pytest.raises(ValueError, match="not in the policy's observation space"):
        agent.predict({"pos": [0.0, 0.0]})
    with pytest.raises(ValueError, match=r"not in the policy's observation space .*: it flattens to 8 values, the "
                                         r"space to 7"):  # an entry of another shape, not numpy's broadcast error
        agent.predict({**obs, "pos": np.zeros(3, np.float32)})


def test_masked_predict_needs_the_mask():
    agent = natpg.NPG("Taxi-v4", action_mask="action_mask", n_envs=2, n_steps=8, tensorboard=False)
    with pytest.raises(ValueError, match="trained with action masking: pass action_mask"):
        agent.predict(3)
    with pytest.raises(ValueError, match=r"action_mask allows no action in row\(s\) \[0\]"):
        agent.predict(3, action_mask=np.zeros(6))
    with pytest.raises(ValueError, match=r"allows no action in row\(s\) \[1\]"):
        agent.predict([3, 4], action_mask=[[1, 0, 0, 0, 0, 0], [0] * 6])
    with pytest.raises(ValueError, match=r"action_mask must have shape \(6,\) or \(1, 6\), got shape \(5,\)"):
        agent.predict(3, action_mask=np.ones(5))
    assert agent.predict(3, action_mask=[0, 0, 0, 0, 1, 0]) == 4
    plain = natpg.NPG("CartPole-v1", n_envs=2, n_steps=8, tensorboard=False)
    with pytest.raises(ValueError, match="trained without action masking"):
        plain.predict(np.zeros(4), action_mask=[1, 1])


def test_callable_action_mask_and_load_asks_for_it_again(tmp_path):
    """The callable sees the unwrapped env; here it forbids Taxi's 'pickup' and 'dropoff' (actions 4 and 5)."""
    moves_only = lambda env: np.array([1, 1, 1, 1, 0, 0])  # noqa: E731
    agent = natpg.NPG("Taxi-v4", action_mask=moves_only, n_envs=2, n_steps=8, tensorboard=False)
    agent.learn(16)
    rollout_policy = agent.policy
    obs = torch.zeros(1, 506)
    obs[0, 500:504] = 1.0
    assert torch.all(rollout_policy.dist(obs).probs[0, 4:] == 0)
    agent.save(tmp_path / "m")
    with pytest.raises(ValueError, match="callable action mask: pass it again"):
        natpg.load(tmp_path / "m")
    loaded = natpg.load(tmp_path / "m", action_mask=moves_only)
    assert loaded.predict(7, action_mask=moves_only(None)) in range(4)
    mean, _ = natpg.evaluate(loaded, episodes=2, seed=1)
    assert np.isfinite(mean)


class GameOverMaskEnv(SpaceEnv):
    """An episode of three steps whose last info allows no action (a board game that is over)."""

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return obs, {**info, "action_mask": np.array([1, 1, 0])}

    def step(self, action):
        assert action != 2, "a masked action was sent"
        obs, rew, term, trunc, info = super().step(action)
        done = self.t >= 3
        return obs, rew, done, False, {**info, "action_mask": np.array([0, 0, 0] if done else [1, 1, 0])}


GAME_OVER = "natpgspace/GameOverMask-v0"
if GAME_OVER not in gym.registry:
    gym.register(id=GAME_OVER, entry_point=lambda: GameOverMaskEnv(spaces.Box(-1, 1, (3,)), spaces.Discrete(3)))


@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_a_mask_allowing_nothing_names_the_copy_and_step_and_a_finished_game_may_allow_nothing(vectorization):
    seen = []  # the unwrapped env of each copy, in the order the copies first call the mask

    def fails_in_copy_1(env):
        if env not in seen:
            seen.append(env)
        fail = seen.index(env) == 1 and env.t == 2
        return np.zeros(3) if fail else np.array([1, 1, 0])

    if vectorization == "sync":  # the callable's bookkeeping lives in this process
        agent = natpg.NPG(GAME_OVER, action_mask=fails_in_copy_1, n_envs=2, n_steps=4, tensorboard=False)
        with pytest.raises(ValueError, match=r"\(copy 1\), step\(\): action mask allows no action at step 2 of "
                                             r"the episode \(1 = allowed\): \[0.0, 0.0, 0.0\]; end the episode"):
            agent.learn(8)
    agent = natpg.NPG(GAME_OVER, action_mask="action_mask", n_envs=2, n_steps=6, tensorboard=False,
                      vectorization=vectorization)
    agent.learn(12)  # every third step ends an episode on a mask allowing nothing: trains on
    assert agent.env_steps == 12 and agent._sampler.episodes == 2 * 2


def test_atari_preprocessing_gives_stacked_84x84_frames():
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    agent = natpg.NPG("ALE/Pong-v5", n_envs=1, n_steps=4, tensorboard=False, critic_epochs=1, cg_iters=2)
    assert agent.observation_space.shape == (4, 84, 84) and agent.observation_space.dtype == np.uint8
    assert isinstance(agent.policy.logits_net[0], natpg.policies.NatureCNN)
    assert not agent.policy.logits_net[0].channels_last
    agent.learn(4)
    assert agent.env_steps == 4


@pytest.mark.parametrize("env,extra", [("Taxi-v4", {"action_mask": "action_mask"}),
                                       ("natpgspace/MultiDiscrete-v0", {}), ("natpgspace/DictObs-v0", {})],
                         ids=["Taxi-mask", "MultiDiscrete", "DictObs"])
def test_worker_sampler_handles_every_space_like_the_local_one(env, extra):
    """The rollout workers build the same wrappers, policy and normaliser: the merged reset observations (masks
    included) equal the in-process ones (copy i seeded seed + i in both), and every action respects its mask.
    Later steps differ where the env reacts to actions: each worker samples with its own generator."""

    def first_batch(**kw):
        agent = natpg.NPG(env, seed=3, **tiny("NPG", env, **extra), normalize_obs=False, **kw)
        sampler = agent._make_sampler(agent.seed)
        try:
            rollout = sampler.collect(agent.policy, 8)
        finally:
            sampler.close()
        return rollout

    local = first_batch()
    workers = first_batch(sampler="workers", workers=2)
    torch.testing.assert_close(workers.obs[0], local.obs[0])
    assert workers.act.shape == local.act.shape
    if extra.get("action_mask"):
        assert local.obs.shape[-1] == 500 + 6
        for rollout in (local, workers):
            allowed = rollout.obs[..., 500:].gather(-1, rollout.act.unsqueeze(-1))
            assert torch.all(allowed == 1.0)


OFF_CENTRE = "natpgspace/OffCentreBox-v0"
if OFF_CENTRE not in gym.registry:
    gym.register(id=OFF_CENTRE, entry_point=lambda: SpaceEnv(spaces.Box(-1, 1, (3,)),
                                                             spaces.Box(np.array([10.0, -1.0], np.float32),
                                                                        np.array([11.0, 1.0], np.float32))))


def test_action_bounds_that_leave_out_zero_are_named_under_clipping():
    """The Gaussian starts centred on 0: under clipping every first action lands on the bound 10."""
    with pytest.warns(UserWarning, match=r"the action bounds of dimension\(s\) \[0\] .* leave out 0, where the "
                                         r"Gaussian policy starts: .*RescaleAction.* or use action_squash='tanh'"):
        agent = natpg.NPG(OFF_CENTRE, n_envs=2, n_steps=8, tensorboard=False)
    assert (agent.predict(np.zeros((50, 3)), deterministic=False)[:, 0] == 10.0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        natpg.NPG(OFF_CENTRE, n_envs=2, n_steps=8, tensorboard=False, action_squash="tanh")


WIDE = "natpgspace/WideBox-v0"
if WIDE not in gym.registry:
    gym.register(id=WIDE, entry_point=lambda: SpaceEnv(spaces.Box(-1, 1, (1024,)), spaces.Discrete(2)))


def test_k_fac_on_a_thousand_flat_inputs_is_named_as_slow_when_the_agent_is_built():
    with pytest.warns(UserWarning, match=r"K-FAC inverts the policy's and the critic's first-layer factor of "
                                         r"\(1024 \+ 1\)² entries, at O\(1024³\), each update .*critic_optimizer='adam'"):
        natpg.ACKTR(WIDE, n_envs=2, n_steps=8, tensorboard=False)
    with pytest.warns(UserWarning, match=r"K-FAC inverts the critic's first-layer factor"):
        natpg.ACKTR(WIDE, n_envs=2, n_steps=8, tensorboard=False, fisher="cg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        natpg.NPG(WIDE, n_envs=2, n_steps=8, tensorboard=False)  # CG on the same inputs: no factor to invert
        natpg.ACKTR("natpgspace/Image-v0", n_envs=2, n_steps=8, tensorboard=False, critic_optimizer="adam")


class OddButValidObs(gym.Env):
    """Observations in forms Gymnasium accepts but natpg's checks could trip over: ``form`` names one."""

    FORMS = {"tuple_as_array": (spaces.Tuple([spaces.Discrete(2), spaces.Discrete(3)]), lambda t: np.array([t % 2, t % 3])),
             "discrete_bool": (spaces.Discrete(2), lambda t: bool(t % 2)),
             "discrete_numpy": (spaces.Discrete(3, start=-1), lambda t: np.int64(t % 3 - 1)),
             "multibinary_bool": (spaces.MultiBinary(3), lambda t: np.array([t % 2, 1, 0], bool)),
             "int_box": (spaces.Box(-5, 5, (2,), np.int32), lambda t: np.array([t % 5, -1], np.int32)),
             "nested": (spaces.Dict({"a": spaces.Tuple([spaces.Box(-1, 1, (2,)), spaces.Discrete(2)]),
                                     "b": spaces.MultiDiscrete([2, 3])}),
                        lambda t: {"a": [np.zeros(2, np.float32), t % 2], "b": np.array([1, t % 3])})}

    def __init__(self, form: str):
        self.observation_space, self._obs = self.FORMS[form]
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(0), {}

    def step(self, action):
        self.t += 1
        return self._obs(self.t), float(action), False, self.t >= 5, {}


if "natpgspace/OddButValid-v0" not in gym.registry:
    gym.register("natpgspace/OddButValid-v0", entry_point=OddButValidObs, disable_env_checker=True)


@pytest.mark.parametrize("form", sorted(OddButValidObs.FORMS))
def test_observations_in_any_form_gymnasium_accepts_train(form):
    agent = natpg.NPG("natpgspace/OddButValid-v0", env_kwargs={"form": form}, n_envs=2, n_steps=8, tensorboard=False)
    agent.learn(32)
    assert agent.env_steps == 32 and agent._sampler.episodes > 0


@pytest.mark.parametrize("value, dtype, fits", [
    (np.array([255.0, 0.0]), np.uint8, True), (np.array([256.0]), np.uint8, False), (np.array([-1]), np.uint8, False),
    (np.array([7.5]), np.uint8, False), (np.array([3.0, np.nan]), np.uint8, False),
    (np.array([2**31 - 1]), np.int32, True), (np.array([np.float32(2**31)]), np.int32, False),
    (np.array([-2.0**31]), np.int32, True), (np.array([2.0**63]), np.int64, False), (np.array([2.0**64]), np.uint64, False),
    (np.array([True, False]), np.uint8, True), (np.zeros(0), np.uint8, True), (np.array([300.0]), np.float32, True)])
def test_integer_overflow_against_the_integers_the_dtype_holds(value, dtype, fits):
    """Whether each value is a whole number within [iinfo.min, iinfo.max], decided exactly with Python integers."""
    from natpg.envs import integer_overflow

    def reference():
        if np.dtype(dtype).kind not in "ui":
            return True
        info = np.iinfo(dtype)
        return all(v == v and float(v).is_integer() and info.min <= int(v) <= info.max for v in value.tolist())

    assert reference() == fits
    assert (integer_overflow(value, np.dtype(dtype)) is None) == fits


# --------------------------------------------------------------------------------------------------
# natpg.export: the deterministic policy as a plain torch module
# --------------------------------------------------------------------------------------------------

EXPORT_CASES = CASES + [("Pendulum-v1", {}), ("CartPole-v1", {}), ("natpgspace/IntBox-v0", {}),
                        ("natpgspace/IntBox-v0", {"action_squash": "tanh"}), ("natpgspace/Float64Box-v0", {}),
                        ("natpgspace/Float64Box-v0", {"action_squash": "tanh"})]
if "natpgspace/IntBox-v0" not in gym.registry:  # integer Box actions: rounded to the nearest value
    gym.register("natpgspace/IntBox-v0", entry_point=lambda: SpaceEnv(spaces.Box(-3, 3, (2, 2)),
                                                                       spaces.Box(-5, 5, (2,), np.int16)))
if "natpgspace/Float64Box-v0" not in gym.registry:  # float64 bounds that float32 cannot hold: 0.1 clips to 0.1
    gym.register("natpgspace/Float64Box-v0", entry_point=lambda: SpaceEnv(
        spaces.Box(-1, 1, (3,)), spaces.Box(-0.1, np.array([0.1, 0.3]), (2,), np.float64)))


@pytest.mark.parametrize("env_id, kw", EXPORT_CASES, ids=[f"{e}-{sorted(k.values())}" for e, k in EXPORT_CASES])
def test_an_exported_policy_acts_as_predict_does(env_id, kw, tmp_path):
    """natpg.export(agent)(obs[, mask]) equals agent.predict(obs) on a batch of the environment's own observations
    (normalisation statistics trained, so not the identity), in the action space's dtype, for every kind of space;
    after torch.save/torch.load of the module alone (no natpg object in it) too."""
    agent = natpg.NPG(env_id, seed=0, **tiny("NPG", env_id, **kw))
    agent.learn(agent.config.batch_size * 2)
    env = gym.make(env_id)
    obs, info = env.reset(seed=1)
    rows, masks = [], []
    for _ in range(16):
        rows.append(obs)
        masks.append(info.get("action_mask"))
        allowed = None if masks[-1] is None else np.asarray(masks[-1], np.int8)
        obs, _, term, trunc, info = env.step(env.action_space.sample(allowed))
        if term or trunc:
            obs, info = env.reset()
    space = agent.observation_space
    flat = np.stack([np.asarray(o) if isinstance(space, spaces.Box) else spaces.flatten(space, o) for o in rows])
    masked = "action_mask" in kw
    expected = agent.predict(rows if not isinstance(space, spaces.Box) else np.stack(rows),
                             action_mask=np.stack(masks) if masked else None)
    module = natpg.export(agent)
    args = (torch.as_tensor(flat),) + ((torch.as_tensor(np.stack(masks)),) if masked else ())
    with torch.no_grad():
        got = module(*args)
    assert got.numpy().dtype == np.asarray(expected).dtype or isinstance(agent.action_space, spaces.Discrete)
    if isinstance(agent.action_space, spaces.Box) and agent.action_space.dtype.kind == "f":
        assert all(agent.action_space.contains(a) for a in got.numpy())
    if kw.get("action_squash") == "tanh" and agent.action_space.dtype == np.float64:  # numpy's and torch's tanh
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-15, atol=0)        # differ by a float64 ULP
    else:  # tanh too: in float64 on both sides, then rounded to the space's float32
        np.testing.assert_array_equal(got.numpy(), expected)
    torch.save(module, tmp_path / "policy.pt")
    agent.learn(agent.config.batch_size)  # the module is a copy: training on does not change it
    reloaded = torch.load(tmp_path / "policy.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(reloaded(*args), got)


def test_an_exported_policy_goes_through_torch_export_and_asks_for_its_mask(tmp_path):
    """torch.export with a dynamic batch, saved and loaded as a program: the same actions as the module, for any batch
    size, a masked policy too (torch.export.load needs no natpg: checked by hand in a process that cannot import
    it)."""
    agent = natpg.PPO("Pendulum-v1", seed=0, n_envs=2, n_steps=32, tensorboard=False)
    agent.learn(128)
    masked = natpg.NPG("Taxi-v4", action_mask="action_mask", n_envs=2, n_steps=8, tensorboard=False)
    masked.learn(32)
    batch = torch.export.Dim("batch")
    for module, args, dims in [
            (natpg.export(agent), (torch.randn(5, 3),), ({0: batch},)),
            (natpg.export(masked), (torch.eye(500)[:5], torch.ones(5, 6)), ({0: batch}, {0: batch}))]:
        torch.export.save(torch.export.export(module, args, dynamic_shapes=dims), tmp_path / "policy.pt2")
        program = torch.export.load(tmp_path / "policy.pt2").module()
        assert torch.equal(program(*args), module(*args))
        more = tuple(torch.cat([a, a, a]) for a in args)  # another batch size
        assert torch.equal(program(*more), module(*more))
    with pytest.raises(ValueError, match=r"trained with action masking: pass action_mask \[B, n\]"):
        natpg.export(masked)(torch.zeros(1, 500))
    for call, error in [  # what predict refuses, refused in words, not by a reshape or a matmul
            (lambda: natpg.export(agent)(np.zeros((2, 3))), r"obs must be a torch.Tensor batch \[B, 3\], got ndarray"),
            (lambda: natpg.export(agent)(torch.zeros(3)), r"got shape \(3,\) \(one observation: obs.unsqueeze\(0\)\)"),
            (lambda: natpg.export(agent)(torch.zeros(2, 4)), r"obs must be a batch \[B, 3\], got shape \(2, 4\)$"),
            (lambda: natpg.export(agent)(torch.zeros(2, 3), torch.ones(2, 6)), "trained without action masking"),
            (lambda: natpg.export(masked)(torch.zeros(2, 500), torch.ones(6)),
             r"action_mask must be a torch.Tensor \[B, 6\] for the batch of 2 observations, got \(6,\)")]:
        with pytest.raises((TypeError, ValueError), match=error):
            call()


@pytest.mark.parametrize("env_id, kw", [("Pendulum-v1", {"action_squash": "tanh"}), ("natpgspace/Image-v0", {}),
                                        ("Taxi-v4", {"action_mask": "action_mask"})])
def test_natpg_export_writes_a_program_that_acts_as_the_run_does(env_id, kw, tmp_path, capsys):
    """natpg export DIR: DIR/policy.pt2, loaded by torch.export alone, gives natpg.export(agent)'s actions on a batch
    of its declared input shape and dtype (a uint8 image, a one-hot Taxi state with its mask); a bad output path is
    one line naming it."""
    from natpg.cli import main as cli

    agent = natpg.NPG(env_id, seed=0, **tiny("NPG", env_id, **kw))
    agent.learn(agent.config.batch_size)
    agent.save(str(tmp_path / "run"))
    assert cli(["export", str(tmp_path / "run")]) == 0
    assert f"wrote {tmp_path / 'run' / 'policy.pt2'}: torch.export.load(" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "run" / "policy.pt2")).module()
    space = agent.observation_space
    g = torch.Generator().manual_seed(0)
    if isinstance(space, spaces.Box):
        obs = torch.randint(0, 256, (3, *space.shape), generator=g).to(torch.uint8) if space.dtype == np.uint8 \
            else torch.rand(3, *space.shape, generator=g)
    else:
        obs = torch.eye(500)[[3, 77, 401]]
    args = (obs, torch.tensor([[1, 1, 0, 1, 0, 1]] * 3, dtype=torch.float32)) if "action_mask" in kw else (obs,)
    assert torch.equal(program(*args), natpg.export(agent)(*args))
    assert cli(["export", str(tmp_path / "run"), "-o", str(tmp_path / "no" / "p.pt2")]) == 2
    assert "natpg export: error: cannot write" in capsys.readouterr().err


def test_natpg_export_of_a_run_with_a_callable_mask_needs_no_callable(tmp_path, capsys):
    """A callable action mask is not saved; the exported policy takes the mask as an input, so natpg export needs
    none (natpg.load would ask for it). The module's buffers are copies: editing them leaves the agent alone."""
    from natpg.cli import main as cli

    moves_only = lambda env: np.array([1, 1, 1, 1, 0, 0])  # noqa: E731
    agent = natpg.NPG("Taxi-v4", action_mask=moves_only, n_envs=2, n_steps=8, tensorboard=False)
    agent.learn(16)
    agent.save(str(tmp_path / "run"))
    assert cli(["export", str(tmp_path / "run"), "-o", str(tmp_path / "p.PT2")]) == 0  # any case of .pt2
    assert "action_mask [B, 6] (torch.float32; 1 = allowed)" in capsys.readouterr().out
    program = torch.export.load(str(tmp_path / "p.PT2")).module()
    obs, mask = torch.eye(500)[[5, 123]], torch.tensor([[1.0, 1, 1, 1, 0, 0]] * 2)
    assert torch.equal(program(obs, mask), natpg.export(agent)(obs, mask))
    module = natpg.export(agent)
    before = agent.predict([5, 123], action_mask=mask.numpy())
    module.obs_mean.add_(100.0)
    assert np.array_equal(agent.predict([5, 123], action_mask=mask.numpy()), before)
    assert cli(["export", str(tmp_path / "run"), "-o", str(tmp_path)]) == 2
    assert f"{str(tmp_path)!r} is a directory: give the program file, e.g." in capsys.readouterr().err


def test_a_saturated_tanh_action_stays_inside_a_float64_box():
    """low + (tanh(u) + 1)/2·(high − low) at tanh(u) = ±1 can land an ULP past a float64 bound (0.30000000000000004
    for 0.3): clipped after the rescale, in env_action and the exported policy alike."""
    from natpg.policies import env_action

    space = spaces.Box(np.array([-0.1, -0.7]), np.array([0.3, 0.1]), (2,), np.float64)
    for u in ([30.0, 30.0], [-30.0, -30.0], [30.0, -30.0]):
        assert space.contains(env_action(np.array([u], np.float32), space, squash=True)[0])
