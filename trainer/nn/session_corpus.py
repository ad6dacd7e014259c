"""Skip-gram corpora of click sessions (Airbnb listing embeddings): the sessions of at least `min_len` items, the
converted ones repeated, same-second tie groups shuffled per copy, and the conversion as a global context."""

from __future__ import annotations

import numpy as np

from trainer.data.sessions import Sessions, shuffle_within_groups
from trainer.nn.skipgram import Corpus, ExtraPairs


def session_corpus(sessions: Sessions, item_idx: np.ndarray, min_len: int, oversample: int,
                   conversion_context: bool, tie_group: np.ndarray | None = None,
                   rng: np.random.Generator | None = None) -> tuple[Corpus, ExtraPairs | None, dict[str, int]]:
    """(corpus of the kept sessions, converted ones `oversample` times; global-context pairs; counts).

    Sequence ids of the corpus are copy ids (a converted session's copies are separate sequences, each with its
    own global-context pairs): every item l ≠ b of a copy whose session converted on b gives the pair (l, b).
    With `tie_group` (the tie group of each interaction, `trainer.data.sessions.tie_groups`) and `rng`, the
    items of every tie group are put in a random order, drawn afresh for each copy (`ties: shuffle`)."""
    keep = np.flatnonzero(sessions.lengths >= min_len)
    conv = sessions.conversion[keep]
    reps = np.where(conv >= 0, oversample, 1)
    copy_sess = np.repeat(keep, reps)  # session of each copy, in order
    lengths = sessions.lengths[copy_sess]
    copy_id = np.repeat(np.arange(len(copy_sess), dtype=np.int64), lengths)
    offset = np.arange(len(copy_id)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = sessions.starts[copy_sess][copy_id] + offset  # interaction behind each token
    if tie_group is not None and len(pos):
        if rng is None:
            raise ValueError("session_corpus: shuffling tie groups needs an rng")
        g = np.asarray(tie_group, np.int64)[pos]
        run = np.cumsum(np.r_[True, (copy_id[1:] != copy_id[:-1]) | (g[1:] != g[:-1])])  # (copy, group) runs
        pos = pos[shuffle_within_groups(run, rng)]
    tokens = np.asarray(item_idx, np.int64)[pos]
    corpus = Corpus.from_flat(tokens, copy_id)
    extra = None
    n_extra = 0
    if conversion_context:
        b = sessions.conversion[copy_sess][copy_id]  # conversion of each token's session
        sel = (b >= 0) & (tokens != b)
        extra = ExtraPairs(centre=tokens[sel], context=b[sel], seq=copy_id[sel])
        n_extra = int(sel.sum())
    stats = {"sessions": int(len(keep)), "converted_sessions": int((conv >= 0).sum()),
             "sequences": int(len(copy_sess)), "tokens": int(len(tokens)), "global_context_pairs": n_extra}
    return corpus, extra, stats
