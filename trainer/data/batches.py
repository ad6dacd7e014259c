"""N-way K-shot session batches for metric learning (EasyRec's CoMetricLearningI2I, pytorch-metric-learning's
MPerClassSampler): each batch holds N distinct sessions and up to K items of each, at least `min_positives` of
them positive (clicked / liked), so every session contributes positive pairs and every other session negatives.

Per epoch, a session with ≥ `min_positives` positive items is drawn `draws[s]` times (default once). Each draw
samples K of the session's items without replacement: `min_positives` positives chosen at random first, the
other slots uniformly among the rest of the session (positives and non-positives alike); a session shorter
than K leaves padding (-1). Draws are shuffled within rounds (round r = every session's r-th draw) and a batch
never spans two rounds, so a session appears at most once per batch. Everything is vectorised over the epoch
and reproducible from the numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.sessions import Sessions


@dataclass(frozen=True)
class KShotBatch:
    """One batch: `items` [N, K] item indices (-1 = padding), `positive` [N, K] labels, `session` [N] session ids."""

    items: np.ndarray  # int64 [N, K]
    positive: np.ndarray  # bool [N, K] (False on padding)
    session: np.ndarray  # int64 [N], distinct

    @property
    def valid(self) -> np.ndarray:
        """bool [N, K]: a real item (not padding)."""
        return self.items >= 0

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, positive, session) of the real slots, row-major: what the pair masks are built from."""
        v = self.valid
        return self.items[v], self.positive[v], np.broadcast_to(self.session[:, None], v.shape)[v]


def _rank_in_groups(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, … within each run of equal values of a sorted `groups` array."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, np.int64)
    start = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(n) - np.repeat(start, np.diff(np.r_[start, n]))


class SessionBatcher:
    """Builds an epoch of N-way K-shot batches from `sessions` (trainer.data.sessions) and per-interaction labels."""

    def __init__(self, sessions: Sessions, item_idx: np.ndarray, positive: np.ndarray, n_way: int, k_shot: int,
                 min_positives: int = 2):
        if n_way < 1 or k_shot < min_positives or min_positives < 1:
            raise ValueError(f"need n_way ≥ 1 and k_shot ≥ min_positives ≥ 1 (got {n_way}, {k_shot}, {min_positives})")
        self.sessions, self.n_way, self.k_shot, self.min_positives = sessions, n_way, k_shot, min_positives
        self.item_idx = np.asarray(item_idx, np.int64)
        self.positive = np.asarray(positive, bool)
        if len(self.item_idx) != len(self.positive) or len(self.item_idx) != len(sessions.ids):
            raise ValueError("item_idx, positive and the sessions' interactions must have one length")
        n_pos = np.add.reduceat(self.positive.astype(np.int64), sessions.starts) if len(sessions) else np.zeros(0, int)
        self.n_positive = n_pos
        self.eligible = np.flatnonzero(n_pos >= min_positives)  # sessions that can be drawn

    def default_draws(self, max_draws: int = 1) -> np.ndarray:
        """Draws per eligible session: ceil(length / K) capped at `max_draws` (1: every session once)."""
        lengths = self.sessions.lengths[self.eligible]
        return np.minimum(-(-lengths // self.k_shot), max_draws).astype(np.int64)

    def epoch(self, rng: np.random.Generator, draws: np.ndarray | None = None) -> list[KShotBatch]:
        """The batches of one epoch; `draws[j]` = draws of eligible session j (None: once each)."""
        elig = self.eligible
        draws = np.ones(len(elig), np.int64) if draws is None else np.asarray(draws, np.int64)
        if len(draws) != len(elig):
            raise ValueError("draws needs one count per eligible session")
        sess = np.repeat(elig, draws)  # one entry per draw
        if len(sess) == 0:
            return []
        rounds = _rank_in_groups(np.repeat(np.arange(len(elig)), draws))
        order = np.lexsort((rng.random(len(sess)), rounds))
        sess, rounds = sess[order], rounds[order]
        items, positive = self._sample(sess, rng)
        # batches of n_way within each round (so a session is never twice in a batch)
        pos_in_round = _rank_in_groups(rounds)
        batch_key = rounds * (len(sess) // self.n_way + 1) + pos_in_round // self.n_way
        cuts = np.flatnonzero(np.diff(batch_key)) + 1
        return [KShotBatch(i, p, s) for i, p, s in
                zip(np.split(items, cuts), np.split(positive, cuts), np.split(sess, cuts), strict=True)]

    def _sample(self, sess: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """[D, K] items and labels of one draw per entry of `sess`: `min_positives` positives first, then uniform."""
        s = self.sessions
        lengths = s.lengths[sess]
        draw = np.repeat(np.arange(len(sess)), lengths)
        offset = np.arange(len(draw)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        inter = s.starts[sess][draw] + offset  # every interaction of every drawn session
        key = rng.random(len(inter))
        pos = self.positive[inter]
        # the `min_positives` positives with the smallest keys jump ahead of everything else
        o = np.lexsort((key, ~pos, draw))
        rank_pos = np.empty(len(inter), np.int64)
        rank_pos[o] = _rank_in_groups(draw[o] * 2 + (~pos[o]))
        final = key - 2.0 * (pos & (rank_pos < self.min_positives))
        o = np.lexsort((final, draw))
        slot = _rank_in_groups(draw[o])
        keep = slot < self.k_shot
        items = np.full((len(sess), self.k_shot), -1, np.int64)
        labels = np.zeros((len(sess), self.k_shot), bool)
        items[draw[o][keep], slot[keep]] = self.item_idx[inter[o][keep]]
        labels[draw[o][keep], slot[keep]] = pos[o][keep]
        return items, labels
