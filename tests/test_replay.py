"""Prioritized replay: sum-tree sampling follows priorities; n-step targets equal a brute-force computation."""

from __future__ import annotations

import numpy as np

from rltrader.agents.replay import PrioritizedReplay, SumTree


def test_sum_tree_samples_in_proportion_to_priority() -> None:
    tree = SumTree(10)
    prio = np.array([1, 0, 3, 6, 0, 0, 2, 8, 0, 0], dtype=float)
    tree.update(np.arange(10), prio)
    assert tree.total == prio.sum()
    rng = np.random.default_rng(0)
    u = rng.random(200_000) * tree.total
    counts = np.bincount(tree.find(u), minlength=tree.cap)[:10]
    np.testing.assert_allclose(counts / counts.sum(), prio / prio.sum(), atol=0.005)
    assert counts[prio == 0].sum() == 0
    tree.update(np.array([3, 3]), np.array([0.0, 0.0]))
    assert tree.total == prio.sum() - 6


def test_n_step_returns_discounts_and_completion() -> None:
    B, n, gamma = 3, 3, 0.9
    rb = PrioritizedReplay(capacity=B * 50, n_envs=B, n_state=2, n_actions=4, n_step=n, gamma=gamma)
    rng = np.random.default_rng(1)
    T = 30
    rewards = rng.normal(size=(T, B)).astype(np.float32)
    dones = rng.random((T, B)) < 0.2
    for t in range(T):
        rb.add(rows=np.full(B, 1000 + t), state=np.full((B, 2), t, np.float32), mask=np.ones((B, 4), bool),
               action=np.full(B, t % 4), reward=rewards[t], done=dones[t])
        # the newest n rows are never sampleable (their n-step window or bootstrap obs is not there yet)
        assert rb.tree.get(np.arange(max(0, t - n + 1) * B, (t + 1) * B)).max() == 0
    batch = rb.sample(512, beta=0.4, rng=rng)
    for i, slot in enumerate(batch.slots):
        t, b = divmod(int(slot), B)
        ret, disc = 0.0, 1.0
        for k in range(n):
            ret += disc * rewards[t + k, b]
            disc *= gamma
            if dones[t + k, b]:
                disc = 0.0
                break
        assert abs(batch.returns[i] - ret) < 1e-5
        assert abs(batch.discount[i] - disc) < 1e-6
        assert batch.rows[i] == 1000 + t and batch.next_rows[i] == 1000 + t + n
    assert batch.weights.max() == 1.0


def test_priorities_update_and_ring_wraps() -> None:
    B = 2
    rb = PrioritizedReplay(capacity=B * 10, n_envs=B, n_state=1, n_actions=2, n_step=2)
    for t in range(25):
        rb.add(np.full(B, t), np.zeros((B, 1), np.float32), np.ones((B, 2), bool), np.zeros(B, int),
               np.ones(B, np.float32), np.zeros(B, bool))
    assert len(rb) == 20
    rng = np.random.default_rng(0)
    batch = rb.sample(64, 0.5, rng)
    assert (batch.rows >= 25 - 10).all() and (batch.next_rows == batch.rows + 2).all()
    rb.update_priorities(batch.slots, np.full(len(batch.slots), 5.0))
    assert rb.max_priority >= 5.0


def test_sum_tree_updates_keep_every_node_the_sum_of_its_children() -> None:
    """Batches of updates (repeated and unsorted indices, single leaves, whole blocks) leave each internal node
    equal to the sum of its two children, bit for bit, and the leaves equal to the last value written."""
    tree = SumTree(1000)
    rng = np.random.default_rng(1)
    leaves = np.zeros(tree.cap)
    for n in (1, 1, 7, 64, 300, 1000, 3):
        idx = rng.integers(0, 1000, n)
        values = rng.random(n)
        tree.update(idx, values)
        for i, v in zip(idx, values, strict=True):
            leaves[i] = v
        np.testing.assert_array_equal(tree.tree[tree.cap:], leaves)
        inner = np.arange(1, tree.cap)
        np.testing.assert_array_equal(tree.tree[inner], tree.tree[2 * inner] + tree.tree[2 * inner + 1])
