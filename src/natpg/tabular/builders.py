"""Ready-made finite MDPs: random, chain, gridworld, Gymnasium toy-text, and Kakade's two states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .mdp import MDP

__all__ = [
    "random_mdp",
    "chain",
    "gridworld",
    "from_gymnasium",
    "frozen_lake",
    "cliff_walking",
    "taxi",
    "kakade_two_state",
    "kakade_bad_start",
]


def random_mdp(
    n_states: int,
    n_actions: int,
    gamma: float = 0.9,
    seed: int = 0,
    branching: int | None = None,
    rho: str = "uniform",
) -> MDP:
    """A random MDP with rewards uniform in [0, 1] (so the Agarwal et al. bounds apply).

    Args:
        branching: if given, each ``(s, a)`` reaches ``branching`` random next states (Dirichlet
            weights on them); otherwise every row of ``P`` is ``Dirichlet(1, ..., 1)``.
        rho: ``"uniform"`` or ``"dirichlet"`` (a random full-support start distribution).
    """
    if n_states < 1 or n_actions < 1:
        raise ValueError(f"need n_states >= 1 and n_actions >= 1, got {n_states}, {n_actions}")
    rng = np.random.default_rng(seed)
    S, A = n_states, n_actions
    if branching is None:
        P = rng.dirichlet(np.ones(S), size=(S, A))
    else:
        if not 1 <= branching <= S:
            raise ValueError(f"branching must be in [1, n_states={S}], got {branching}")
        P = np.zeros((S, A, S))
        # argsort of uniforms = a random subset of `branching` next states per (s, a), vectorised.
        nxt = np.argsort(rng.random((S, A, S)), axis=2)[:, :, :branching]
        w = rng.dirichlet(np.ones(branching), size=(S, A))
        np.put_along_axis(P, nxt, w, axis=2)
    R = rng.random((S, A))
    if rho == "uniform":
        rho_v = np.full(S, 1.0 / S)
    elif rho == "dirichlet":
        rho_v = rng.dirichlet(np.ones(S))
    else:
        raise ValueError(f"rho must be 'uniform' or 'dirichlet', got {rho!r}")
    return MDP(P, R, gamma, rho_v)


def chain(
    n: int = 10,
    gamma: float = 0.9,
    slip: float = 0.0,
    small_reward: float = 0.1,
    large_reward: float = 1.0,
) -> MDP:
    """A chain of ``n`` states, start at state 0; action 0 = left, action 1 = right.

    ``left`` from state 0 stays and pays ``small_reward`` (a myopic trap); ``right`` moves one
    step right and pays ``large_reward`` when taken at the right end (where it stays). With
    probability ``slip`` the other action is executed. From a uniform policy the large reward is
    reached only after a random walk across the chain, so vanilla PG's gradient is tiny there.
    """
    if n < 2:
        raise ValueError(f"chain needs n >= 2 states, got {n}")
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip must be in [0, 1], got {slip}")
    s = np.arange(n)
    move = np.zeros((n, 2, n))  # deterministic effect of each action
    move[s, 0, np.maximum(s - 1, 0)] = 1.0
    move[s, 1, np.minimum(s + 1, n - 1)] = 1.0
    P = (1.0 - slip) * move + slip * move[:, ::-1, :]
    base = np.zeros((n, 2))
    base[0, 0] = small_reward
    base[n - 1, 1] = large_reward
    R = (1.0 - slip) * base + slip * base[:, ::-1]
    rho = np.zeros(n)
    rho[0] = 1.0
    return MDP(P, R, gamma, rho)


_DEFAULT_GRID = (
    "S...",
    ".#..",
    "...#",
    "#..G",
)

# up, right, down, left as (row, col) offsets
_MOVES = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])


def gridworld(
    layout: Sequence[str] = _DEFAULT_GRID,
    gamma: float = 0.95,
    slip: float = 0.0,
    goal_reward: float = 1.0,
    step_reward: float = 0.0,
) -> MDP:
    """A gridworld from a text layout; state ``r * cols + c`` is cell ``(r, c)``.

    Characters: ``S`` start (several allowed, uniform ``rho`` over them), ``G`` goal, ``#`` wall,
    ``.`` free. Actions 0..3 = up, right, down, left. Moving into a wall or the border stays put.
    With probability ``slip`` the move goes to one of the two perpendicular directions (half
    each), as in FrozenLake. Entering ``G`` pays ``goal_reward`` and ``G`` is absorbing with zero
    reward; every other step pays ``step_reward``. Wall cells are kept as (unreachable,
    self-looping, zero-reward) states so that state indices match cells.
    """
    rows = len(layout)
    cols = len(layout[0]) if rows else 0
    if rows == 0 or cols == 0 or any(len(line) != cols for line in layout):
        raise ValueError("layout must be a non-empty list of equal-length strings")
    grid = np.array([list(line) for line in layout])
    if not set(np.unique(grid)) <= set("SG#."):
        raise ValueError(f"layout may only use 'S', 'G', '#', '.', got {sorted(set(np.unique(grid)))}")
    if not (grid == "S").any():
        raise ValueError("layout needs at least one start cell 'S'")
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip must be in [0, 1], got {slip}")
    S, A = rows * cols, 4
    r, c = np.divmod(np.arange(S), cols)
    wall = (grid == "#").ravel()
    goal = (grid == "G").ravel()

    # target[s, m]: the cell reached from s by move m (staying put when blocked).
    nr = np.clip(r[:, None] + _MOVES[None, :, 0], 0, rows - 1)
    nc = np.clip(c[:, None] + _MOVES[None, :, 1], 0, cols - 1)
    target = nr * cols + nc
    target = np.where(wall[target], np.arange(S)[:, None], target)

    # Intended move with prob 1 - slip, each perpendicular move with prob slip / 2.
    P = np.zeros((S, A, S))
    for offset, prob in ((0, 1.0 - slip), (1, slip / 2), (3, slip / 2)):
        m = (np.arange(A) + offset) % A
        np.add.at(P, (np.arange(S)[:, None], np.arange(A)[None, :], target[:, m]), prob)
    absorbing = wall | goal
    idx = np.flatnonzero(absorbing)
    P[idx] = 0.0
    P[idx, :, idx] = 1.0  # self-loops: the paired indices broadcast over the action slice
    R = goal_reward * P[:, :, goal].sum(axis=2) + step_reward
    R[absorbing] = 0.0
    rho = (grid == "S").ravel().astype(np.float64)
    return MDP(P, R, gamma, rho / rho.sum())


def from_gymnasium(env: Any, gamma: float = 0.99, **make_kwargs: Any) -> MDP:
    """An MDP from a Gymnasium toy-text environment's transition table ``env.unwrapped.P``.

    Args:
        env: an environment id (made with ``gymnasium.make(env, **make_kwargs)``) or an env.
        gamma: discount.

    ``P[s][a]`` is a list of ``(prob, s', reward, terminated)``. A terminated transition keeps its
    reward and then moves to an extra absorbing, zero-reward sink state with index ``S`` (so the
    MDP has ``S + 1`` states), which gives exactly the episodic discounted return. ``rho`` is the
    env's ``initial_state_distrib``. Only what the table describes is modelled: time limits are
    ignored (the discount replaces them) and so are stochastic effects implemented outside ``P``
    (e.g. Taxi's optional fickle passenger).
    """
    if isinstance(env, str):
        import gymnasium  # local: gymnasium is only needed for this builder

        made = gymnasium.make(env, **make_kwargs)
        try:
            return from_gymnasium(made, gamma)
        finally:
            made.close()
    u = env.unwrapped
    table = getattr(u, "P", None)
    if not isinstance(table, dict):
        raise ValueError(f"{type(u).__name__} has no transition table `P` (only toy-text envs do)")
    S, A = int(u.observation_space.n), int(u.action_space.n)
    sink = S
    rows: list[tuple[int, int, int, float, float]] = []
    for s in range(S):
        for a in range(A):
            for prob, nxt, reward, terminated in table[s][a]:
                rows.append((s, a, sink if terminated else int(nxt), float(prob), float(reward)))
    s_i, a_i, n_i = (np.array([row[k] for row in rows], dtype=np.int64) for k in range(3))
    prob, reward = (np.array([row[k] for row in rows]) for k in (3, 4))
    P = np.zeros((S + 1, A, S + 1))
    R = np.zeros((S + 1, A))
    np.add.at(P, (s_i, a_i, n_i), prob)  # add.at: a table may list the same s' twice
    np.add.at(R, (s_i, a_i), prob * reward)
    P[sink, :, sink] = 1.0
    isd = getattr(u, "initial_state_distrib", None)
    rho = np.zeros(S + 1)
    if isd is None:
        raise ValueError(f"{type(u).__name__} has no `initial_state_distrib`")
    rho[:S] = np.asarray(isd, dtype=np.float64)
    return MDP(P, R, gamma, rho / rho.sum())


def frozen_lake(map_name: str = "4x4", is_slippery: bool = True, gamma: float = 0.99) -> MDP:
    """FrozenLake-v1 (reward 1 at the goal); state 16 (or 64) is the terminal sink."""
    return from_gymnasium("FrozenLake-v1", gamma, map_name=map_name, is_slippery=is_slippery)


def cliff_walking(gamma: float = 0.99) -> MDP:
    """CliffWalking-v1 (-1 per step, -100 for the cliff); state 48 is the terminal sink."""
    return from_gymnasium("CliffWalking-v1", gamma)


def taxi(gamma: float = 0.99) -> MDP:
    """Taxi-v4 (500 states x 6 actions); state 500 is the terminal sink."""
    return from_gymnasium("Taxi-v4", gamma)


def kakade_two_state(gamma: float = 0.9, rho_i: float = 0.8) -> MDP:
    """The two-state MDP of Kakade (2001, Sec. 'Experiments', Fig. 1A), discounted.

    States ``i = 0`` and ``j = 1``; action 0 = stay (self-loop), action 1 = switch to the other
    state. Staying in ``i`` pays 1, staying in ``j`` pays 2, switching pays 0; transitions are
    deterministic. ``rho = (rho_i, 1 - rho_i)`` puts most start mass on ``i``. For ``gamma > 1/2``
    the optimal policy switches from ``i`` and stays in ``j``.

    Kakade's experiment used the average-reward criterion; this is the discounted analogue. The
    plateau comes from a start that stays in ``i`` and leaves ``j`` (:func:`kakade_bad_start`):
    vanilla PG's gradient ``d(s) pi(a|s) A(s, a)`` is then scaled by the tiny probability of the
    good actions, while NPG's step ``A / (1 - gamma)`` is not.
    """
    if not 0.0 <= rho_i <= 1.0:
        raise ValueError(f"rho_i must be in [0, 1], got {rho_i}")
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[0, 1, 1] = 1.0  # i: stay, switch
    P[1, 0, 1] = P[1, 1, 0] = 1.0  # j: stay, switch
    R = np.array([[1.0, 0.0], [2.0, 0.0]])
    return MDP(P, R, gamma, np.array([rho_i, 1.0 - rho_i]))


def kakade_bad_start(strength: float = 6.0) -> np.ndarray:
    """``theta0[2, 2]`` for :func:`kakade_two_state`: stay in ``i``, switch away from ``j``.

    Each state prefers its bad action by ``strength`` logits, i.e. the good action has
    probability ``1 / (1 + e^strength)`` (``strength = 6``: about 0.25%).
    """
    return np.array([[strength, 0.0], [0.0, strength]], dtype=np.float64)
