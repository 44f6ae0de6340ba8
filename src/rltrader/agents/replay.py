"""Prioritized experience replay with n-step returns, for B parallel envs, stored without observation copies.

Layout: a ring of ``rows`` (time steps) × ``B`` (envs). Slot ``(r, b)`` holds env ``b``'s transition at step
``r``: the feature row its observation window ends at, its position state and action mask, the action taken,
the reward and whether the episode ended. The observation window itself is NOT stored — it is re-gathered from
the env's feature matrix by row — so a million transitions cost ~60 MB instead of ~5 GB.

n-step targets are assembled at sample time from the next ``n - 1`` slots of the same env (stopping at an
episode end), so one stored transition serves any n. A slot becomes sampleable only once its n-step window is
complete (priority 0 until then).

Priorities live in a sum tree (array-backed, capacity a power of two). Sampling is stratified and vectorised:
B_s uniform draws descend the tree together, one numpy step per level; updates recompute parents level by level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SumTree:
    """Array sum tree: leaves ``[cap, 2·cap)``, node ``i`` = sum of ``2i`` and ``2i+1``."""

    def __init__(self, capacity: int) -> None:
        self.cap = 1 << max(0, int(np.ceil(np.log2(max(capacity, 1)))))
        self.tree = np.zeros(2 * self.cap, dtype=np.float64)
        self.depth = int(np.log2(self.cap))

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def update(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Set leaves ``idx`` (the last value wins for a repeated index) and recompute their ancestors.

        The touched nodes are sorted and de-duplicated once; halving keeps a sorted array sorted, so each level
        only drops neighbours that became equal (one comparison) instead of a ``np.unique`` sort per level
        (profiled: the sorts were most of the replay's cost per training step)."""
        node = np.asarray(idx, dtype=np.int64) + self.cap
        self.tree[node] = values
        node = np.unique(node)
        tree = self.tree
        for _ in range(self.depth):
            node >>= 1
            if len(node) > 1:
                node = node[np.concatenate(([True], node[1:] != node[:-1]))]
            tree[node] = tree[2 * node] + tree[2 * node + 1]

    def find(self, u: np.ndarray) -> np.ndarray:
        """Leaf indices whose cumulative-sum interval contains each ``u`` (0 ≤ u < total)."""
        node = np.ones(len(u), dtype=np.int64)
        u = u.copy()
        for _ in range(self.depth):
            left = 2 * node
            right = u >= self.tree[left]
            u -= self.tree[left] * right
            node = left + right
        return node - self.cap

    def get(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.tree[np.asarray(idx) + self.cap])


@dataclass
class Batch:
    slots: np.ndarray
    rows: np.ndarray
    state: np.ndarray
    mask: np.ndarray
    action: np.ndarray
    returns: np.ndarray
    """n-step discounted reward sum."""
    next_rows: np.ndarray
    next_state: np.ndarray
    next_mask: np.ndarray
    discount: np.ndarray
    """γ^k for the bootstrap term, 0 where the episode ended within the n steps."""
    weights: np.ndarray
    """Importance-sampling weights (max-normalised)."""


class PrioritizedReplay:
    def __init__(self, capacity: int, n_envs: int, n_state: int, n_actions: int, *, alpha: float = 0.6,
                 n_step: int = 3, gamma: float = 0.99, eps: float = 1e-6) -> None:
        self.B = n_envs
        self.n_rows = max(capacity // n_envs, n_step + 2)
        size = self.n_rows * n_envs
        self.tree = SumTree(size)
        self.size = size
        self.row_of_obs = np.zeros(size, dtype=np.int64)
        self.state = np.zeros((size, n_state), dtype=np.float32)
        self.mask = np.zeros((size, n_actions), dtype=bool)
        self.action = np.zeros(size, dtype=np.int64)
        self.reward = np.zeros(size, dtype=np.float32)
        self.done = np.zeros(size, dtype=bool)
        self.alpha, self.n, self.gamma, self.eps = alpha, n_step, gamma, eps
        self.max_priority = 1.0
        self.head = 0  # next time-row to write
        self.written = 0  # time-rows written in all

    def __len__(self) -> int:
        return min(self.written, self.n_rows) * self.B

    def add(self, rows: np.ndarray, state: np.ndarray, mask: np.ndarray, action: np.ndarray, reward: np.ndarray,
            done: np.ndarray) -> None:
        """One time step of all B envs: the observation (by feature row) the action was taken in, and its outcome."""
        sl = slice(self.head * self.B, (self.head + 1) * self.B)
        self.row_of_obs[sl], self.state[sl], self.mask[sl] = rows, state, mask
        self.action[sl], self.reward[sl], self.done[sl] = action, reward, done
        # this row's n-step window (and its successor obs) is incomplete: priority 0 (not sampled yet); the row
        # n steps back now has its n following steps (its bootstrap observation is this row's): max priority.
        # One tree update for both (distinct rows: n_rows ≥ n + 2).
        lanes = np.arange(self.B)
        idx, prio = self.head * self.B + lanes, np.zeros(self.B)
        self.written += 1
        if self.written > self.n:
            ready = ((self.head - self.n) % self.n_rows) * self.B + lanes
            idx = np.concatenate([idx, ready])
            prio = np.concatenate([prio, np.full(self.B, self.max_priority ** self.alpha)])
        self.tree.update(idx, prio)
        self.head = (self.head + 1) % self.n_rows

    def sample(self, batch_size: int, beta: float, rng: np.random.Generator) -> Batch:
        total = self.tree.total
        if total <= 0:
            raise ValueError("replay has no complete n-step transitions yet")
        u = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)
        slots = np.minimum(self.tree.find(np.minimum(u, np.nextafter(total, 0))), self.size - 1)
        prio = self.tree.get(slots)
        if (prio <= 0).any():  # float round-off at an interval edge can land on an empty leaf: take a neighbour
            slots[prio <= 0] = slots[prio > 0][0] if (prio > 0).any() else np.argmax(self.tree.tree[self.tree.cap:])
            prio = self.tree.get(slots)
        # n-step return: r_t + γ r_{t+1} + … until an episode end, then bootstrap from t+n (if none ended)
        ret = np.zeros(batch_size, dtype=np.float64)
        alive = np.ones(batch_size, dtype=bool)
        disc = np.ones(batch_size, dtype=np.float64)
        for k in range(self.n):
            s = (slots + k * self.B) % self.size
            ret += alive * disc * self.reward[s]
            disc *= self.gamma
            alive &= ~self.done[s]
        nxt = (slots + self.n * self.B) % self.size
        n_valid = len(self)
        probs = prio / total
        w = (n_valid * probs) ** (-beta)
        w /= w.max()
        return Batch(slots=slots, rows=self.row_of_obs[slots], state=self.state[slots], mask=self.mask[slots],
                     action=self.action[slots], returns=ret.astype(np.float32), next_rows=self.row_of_obs[nxt],
                     next_state=self.state[nxt], next_mask=self.mask[nxt],
                     discount=(disc * alive).astype(np.float32), weights=w.astype(np.float32))

    def update_priorities(self, slots: np.ndarray, td_error: np.ndarray) -> None:
        p = np.abs(td_error) + self.eps
        self.max_priority = max(self.max_priority, float(p.max()))
        # a slot may have been overwritten since it was sampled only if it became incomplete again: keep 0 there
        live = self.tree.get(slots) > 0
        self.tree.update(slots[live], p[live] ** self.alpha)
