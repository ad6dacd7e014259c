"""Hit rates restricted to the evaluated users whose target is of one event type (e.g. HR@50 on *liked* targets:
ml-100k ratings ≥ 4), for multi-task channels; the evaluator's lists and ranks (trainer.metrics) unchanged.

    events = target_events(test)                    # one event code per test row, aligned with Split.users
    liked_hit_rate(mat, split.targets, events, 50)  # HR@50 over the users whose target is a LIKE
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trainer.data.events import LIKE, event_codes
from trainer.metrics import target_ranks


def target_events(test: pd.DataFrame) -> np.ndarray:
    """int8 event code of each test target row (its `event` column, else the rating ≥ 4 → like rule, else click)."""
    return event_codes(test)


def event_hit_rate(mat: np.ndarray, targets: np.ndarray, events: np.ndarray, k: int = 50,
                   event: int | tuple[int, ...] = LIKE) -> float:
    """HR@k over the users whose target's event code is `event` (mat [n_users, ≥k] ranked item ids, -1 pads;
    targets [n_users], -1 = outside the catalog, a miss). NaN when no user has such a target."""
    keep = np.isin(np.asarray(events), np.atleast_1d(event))
    if not keep.any():
        return float("nan")
    mat = np.asarray(mat)[keep]
    if mat.shape[1] == 0:  # empty lists: every target missed
        return 0.0
    return float(np.mean(target_ranks(mat, np.asarray(targets)[keep]) <= k))


def liked_hit_rate(mat: np.ndarray, targets: np.ndarray, events: np.ndarray, k: int = 50) -> float:
    """HR@k restricted to the users whose test target is liked (event LIKE; ml-100k: rating ≥ 4)."""
    return event_hit_rate(mat, targets, events, k, LIKE)
