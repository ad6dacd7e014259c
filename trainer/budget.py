"""The scale rule of the embedding trainers: a bound on the examples one fit trains, so a nightly's cost stops
growing with the log (two-tower, item2vec, EGES: their `max_examples` in docs/channels.md)."""

from __future__ import annotations

import numpy as np


def scaled_epochs(epochs: int, n_examples: int, max_examples: int | None) -> int:
    """Whole epochs, at most `epochs`, at least one, and no more than `max_examples` examples in all where one
    epoch fits (ml-100k keeps its epochs; big logs get fewer, never less than one)."""
    if max_examples is None or n_examples == 0:
        return epochs
    return max(1, min(epochs, max_examples // n_examples))


def walk_starts(nodes: np.ndarray, walks_per_node: int, walk_length: int, max_examples: int | None,
                rng: np.random.Generator) -> np.ndarray:
    """Start nodes of the walks: `walks_per_node` per node, or, when that corpus would exceed `max_examples` tokens,
    max_examples // walk_length starts taken in rounds (every node once, in a seeded order, before any twice)."""
    nodes = np.asarray(nodes, np.int64)
    if max_examples is None or len(nodes) * walks_per_node * walk_length <= max_examples or not len(nodes):
        return np.repeat(nodes, walks_per_node)
    keep = max(1, max_examples // walk_length)
    rounds = -(-keep // len(nodes))
    return np.concatenate([rng.permutation(nodes) for _ in range(rounds)])[:keep]
