"""A news-like synthetic dataset with real collaborative signal, in the standard dataset format.

Items belong to categories and, inside a category, to sub-topics; users have a Dirichlet preference over
categories (tilted by age group and gender) and a latent vector that picks sub-topics. Users click in
sessions (a burst of clicks minutes apart, hours or days between sessions) that stay on one category and
mostly one sub-topic, so items clicked together share topics. Item popularity is a power law, damped by
freshness (news is read in the days after it is published). Timestamps span 30 days.

Side information and events (generator version 2): each item has a brand (nested in its category, brands
specialise in sub-topics) and a market (a group of regions, mostly shared by a sub-topic's items). Some
sessions end in a purchase: the purchased item is one the session clicked after an earlier click, more
likely for buyer-type users, strong brands, good items and items of the user's home market; some other
clicks are liked (good items, on-topic clicks). Events are flags on click rows, drawn from generators of
their own, so every other column is exactly what version 1 produced.

Generation is vectorised per chunk of users (~500k clicks), each chunk with its own seeded generator,
and the interactions are streamed to parquet row groups (or CSV), so memory stays bounded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.data.events import CLICK, EVENT_TYPES, LIKE, PURCHASE

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
META_FILE = "synth.json"
DEFAULT_PATH = Path("var/data/synthetic-default")
DEFAULT_PARAMS = {"n_users": 20_000, "n_items": 10_000, "n_clicks": 400_000, "seed": 42}

T0 = 1_709_251_200  # 2024-03-01 00:00:00 UTC: first second of the click window
DAY = 86_400
N_DAYS = 30
CHUNK_CLICKS = 500_000

AGE_GROUPS = np.array(["<18", "18-24", "25-34", "35-44", "45-54", "55+"], dtype=object)
AGE_P = np.array([0.06, 0.22, 0.30, 0.20, 0.13, 0.09])
GENDERS = np.array(["F", "M", "U"], dtype=object)
GENDER_P = np.array([0.47, 0.47, 0.06])
DEVICES = np.array(["android", "ios", "desktop", "tablet"], dtype=object)
DEVICE_P = np.array([0.48, 0.30, 0.16, 0.06])
ENVIRONMENTS = ["app", "web", "miniapp"]
N_REGIONS = 28
EXTRA_TAGS = np.array(["video", "live", "analysis", "opinion", "breaking", "local", "explainer", "interview",
                       "photo", "longread", "data", "podcast", "review", "guide", "update", "exclusive"], dtype=object)
# share of sessions starting in each hour of the day (evening peak, quiet nights)
DIURNAL = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1.2, 2.2, 2.8, 2.5, 2.2, 2.3, 2.8, 2.5, 2.2, 2.2, 2.4, 2.8,
                    3.2, 3.8, 4.2, 4.0, 3.0, 1.8])
DIURNAL = DIURNAL / DIURNAL.sum()

P_NEW_SESSION = 0.28  # per click: sessions are geometric with mean ≈ 3.6 clicks
P_SAME_SUBTOPIC = 0.6  # a click inside a session stays on the session's sub-topic
P_EXPLORE = 0.1  # a click leaves the user's taste entirely (category by global share)
FRESH_TAU_DAYS = 3.0
FRESH_FLOOR = 0.005  # old items keep this fraction of their appeal
LATENT_DIM = 8
GROUP_ITEMS = 40
POP_EXPONENT = 0.7
RESAMPLE_ROUNDS = 5
P_REREAD = 0.1  # share of repeated (user, item) clicks kept as genuine re-reads

# side information and events: drawn from generators of their own ([seed, 3] and [seed, 2, chunk])
REGIONS_PER_MARKET = 4  # market m (0-based) holds regions 4m+1..4m+4: 7 markets
N_MARKETS = -(-N_REGIONS // REGIONS_PER_MARKET)
P_GROUP_MARKET = 0.8  # an item's market is its sub-topic group's market, else one drawn by market size
BRAND_ITEMS = 30  # about one brand per this many items of a category, 2..12 brands per category
BRAND_CONCENTRATION = 0.5  # Dirichlet concentration of a brand's affinity over its category's sub-topics
BUY_BASE = -1.6  # purchase logit of a session's candidate click, before user/brand/item/market effects
BUY_MARKET = 1.0  # purchase logit bonus when the item's market is the user's home market
LIKE_BASE = -3.0  # like logit of a click, before item quality, user and on-topic effects
LIKE_ON_TOPIC = 0.7


def _sizes(n_items: int) -> tuple[int, int]:
    """(categories, sub-topics per category): ~20–50 categories, sub-topics of ~GROUP_ITEMS items or more."""
    k = int(np.clip(round(np.sqrt(n_items) / 3), 20, 50))
    k = max(1, min(k, n_items // 10))
    s = int(np.clip(n_items // (k * GROUP_ITEMS), 1, 8))
    return k, s


def _categorical(cum: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Row-wise inverse-CDF sampling: rows of `cum` are cumulative (unnormalised) weights."""
    return np.minimum((cum < (r * cum[:, -1])[:, None]).sum(axis=1), cum.shape[1] - 1)


class _World:
    """Everything shared by all chunks: items, their sampling tables, user attributes and click counts."""

    def __init__(self, n_users: int, n_items: int, n_clicks: int, seed: int):
        rng = np.random.default_rng([seed, 0])
        self.n_users, self.n_items, self.n_clicks = n_users, n_items, n_clicks
        k, s = _sizes(n_items)
        self.k, self.s = k, s
        g = k * s

        # categories: Zipf-ish shares; every (category, sub-topic) group gets at least one item
        self.cat_w = rng.permutation(np.arange(1, k + 1) ** -0.8)
        self.cat_w /= self.cat_w.sum()
        cat = np.concatenate([np.repeat(np.arange(k), s), rng.choice(k, n_items - g, p=self.cat_w)])
        sub = np.concatenate([np.tile(np.arange(s), k), rng.integers(0, s, n_items - g)])
        anchor = np.zeros(n_items, bool)
        anchor[:g] = True  # one old item per group, so every (group, day) sampling table is non-empty
        perm = rng.permutation(n_items)
        self.cat, self.sub, anchor = cat[perm], sub[perm], anchor[perm]
        self.group = self.cat * s + self.sub

        back = anchor | (rng.random(n_items) < 0.25)  # back catalogue published before the window
        self.created = np.where(back, T0 - rng.integers(1, 60 * DAY, n_items),
                                T0 + rng.integers(0, N_DAYS * DAY, n_items)).astype(np.int64)
        self.pop = (rng.permutation(n_items) + 1.0) ** -POP_EXPONENT  # power-law appeal
        cat_words = np.exp(rng.normal(6.0, 0.35, k))
        self.words = np.maximum(20, np.round(cat_words[self.cat] * rng.lognormal(0, 0.35, n_items))).astype(np.int32)
        n_extra = rng.choice(3, n_items, p=[0.45, 0.4, 0.15])
        extra1 = EXTRA_TAGS[rng.integers(0, len(EXTRA_TAGS), n_items)]
        extra2 = EXTRA_TAGS[rng.integers(0, len(EXTRA_TAGS), n_items)]
        topic = pd.Series(self.cat + 1).astype(str).radd("topic").str.cat(pd.Series(self.sub + 1).astype(str), sep="_")
        tags = topic.where(n_extra < 1, topic + "|" + extra1)
        tags = tags.where((n_extra < 2) | (extra1 == extra2), tags + "|" + extra2)
        self.tags = tags.to_numpy(object)

        # latent space: sub-topic embeddings; users' vectors pick sub-topics inside a category
        self.topic_emb = rng.normal(0, 1, (k, s, LATENT_DIM)).astype(np.float32)

        # users: attributes (which also tilt category taste), latent vectors, activity
        self.age = rng.choice(len(AGE_GROUPS), n_users, p=AGE_P).astype(np.int8)
        self.gender = rng.choice(len(GENDERS), n_users, p=GENDER_P).astype(np.int8)
        region_w = rng.permutation(np.arange(1, N_REGIONS + 1) ** -0.7)
        self.region = (rng.choice(N_REGIONS, n_users, p=region_w / region_w.sum()) + 1).astype(np.int16)
        self.device = rng.choice(len(DEVICES), n_users, p=DEVICE_P).astype(np.int8)
        self.tilt_age = np.exp(rng.normal(0, 0.8, (len(AGE_GROUPS), k)))
        self.tilt_gender = np.exp(rng.normal(0, 0.6, (len(GENDERS), k)))
        self.user_vec = rng.normal(0, 1, (n_users, LATENT_DIM)).astype(np.float32)
        activity = rng.lognormal(0, 1.0, n_users)
        self.counts = rng.multinomial(n_clicks, activity / activity.sum()) if n_users else np.zeros(0, np.int64)
        self._build_tables()
        self._side_info(np.random.default_rng([seed, 3]))

    def _side_info(self, rng: np.random.Generator) -> None:
        """Brands (nested in categories, specialised in sub-topics), markets, and the latent effects of events."""
        k, s, n_items = self.k, self.s, self.n_items
        n_brands = np.clip(np.round(np.bincount(self.cat, minlength=k) / BRAND_ITEMS), 2, 12).astype(np.int64)
        j = np.arange(n_brands.max())
        share = np.where(j[None, :] < n_brands[:, None], (j[None, :] + 1.0) ** -1.0, 0.0)  # Zipf inside a category
        affinity = rng.dirichlet(np.full(s, BRAND_CONCENTRATION), size=share.shape)  # [k, brands, s]
        w = share[self.cat] * affinity[self.cat, :, self.sub]
        first_brand = np.concatenate([[0], np.cumsum(n_brands)[:-1]])
        self.brand = first_brand[self.cat] + _categorical(np.cumsum(w, axis=1), rng.random(n_items))
        self.n_brands = int(n_brands.sum())
        self.user_market = (self.region.astype(np.int64) - 1) // REGIONS_PER_MARKET
        size = np.bincount(self.user_market, minlength=N_MARKETS) + 1.0
        group_market = rng.choice(N_MARKETS, k * s, p=size / size.sum())
        self.market = np.where(rng.random(n_items) < P_GROUP_MARKET, group_market[self.group],
                               rng.choice(N_MARKETS, n_items, p=size / size.sum()))
        self.quality = rng.normal(0, 0.6, n_items)
        self.brand_buy = rng.normal(0, 0.7, self.n_brands)
        self.user_buy = rng.normal(0, 0.8, self.n_users)
        self.user_like = rng.normal(0, 0.5, self.n_users)

    def _build_tables(self) -> None:
        """Per (group, day) inverse-CDF tables over the items published before that day, weighted by
        appeal × freshness; stacked so one `searchsorted` samples every click of a chunk."""
        segs, items, weights = [], [], []
        for d in range(N_DAYS):  # a loop over days, not over clicks
            start = T0 + d * DAY
            cand = np.flatnonzero(self.created < start)
            age_days = (start + DAY / 2 - self.created[cand]) / DAY
            segs.append(self.group[cand].astype(np.int64) * N_DAYS + d)
            items.append(cand)
            weights.append(self.pop[cand] * (FRESH_FLOOR + np.exp(-age_days / FRESH_TAU_DAYS)))
        seg = np.concatenate(segs)
        order = np.argsort(seg, kind="stable")
        seg, self.table_items = seg[order], np.concatenate(items)[order].astype(np.int32)
        w = np.concatenate(weights)[order]
        n_seg = self.k * self.s * N_DAYS
        bounds = np.searchsorted(seg, np.arange(n_seg + 1))
        if np.any(np.diff(bounds) == 0):
            raise AssertionError("empty sampling segment")  # impossible: every group has an old anchor item
        cw = np.cumsum(w)
        before = np.concatenate([[0.0], cw])[bounds[:-1]]
        total = cw[bounds[1:] - 1] - before
        self.table_cdf = seg + (cw - before[seg]) / total[seg]
        self.seg_lo, self.seg_hi = bounds[:-1], bounds[1:] - 1

    def chunks(self) -> list[tuple[int, int]]:
        """User ranges holding about CHUNK_CLICKS clicks each."""
        cum = np.cumsum(self.counts)
        cuts = np.searchsorted(cum, np.arange(CHUNK_CLICKS, self.n_clicks, CHUNK_CLICKS), side="left") + 1
        edges = np.unique(np.concatenate([[0], cuts, [self.n_users]]))
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def clicks(self, a: int, b: int, rng: np.random.Generator,
               event_rng: np.random.Generator) -> dict[str, np.ndarray]:
        """All clicks of users [a, b), sorted by (user, time); `event_rng` draws only the event column."""
        n = self.counts[a:b]
        m = int(n.sum())
        user = np.repeat(np.arange(a, b), n)
        if m == 0:
            return {"user": user, "item": user.copy(), "ts": user.copy(), "env": user.astype(np.int8),
                    "region": user.astype(np.int16), "event": user.astype(np.int8)}
        # sessions: a click opens a new one with probability P_NEW_SESSION; a user's first click always does
        new = rng.random(m) < P_NEW_SESSION
        new[np.cumsum(n)[n > 0] - n[n > 0]] = True
        sess = np.cumsum(new) - 1
        s_user = user[new]
        n_s = len(s_user)
        # session starts: a day of the window and a diurnal hour, time-ordered within each user
        start = rng.integers(0, N_DAYS, n_s) * DAY + rng.choice(24, n_s, p=DIURNAL) * 3600 + rng.integers(0, 3600, n_s)
        start = start[np.lexsort((start, s_user))]
        gap = np.where(new, 0, 10 + rng.exponential(90.0, m)).astype(np.int64)  # seconds between clicks
        cs = np.cumsum(gap)
        ts = T0 + start[sess] + cs - cs[np.flatnonzero(new)][sess]

        # session context: usual environment (app on phones/tablets, web on desktop) and home region
        main_env = np.where(self.device[s_user] == 2, 1, 0)
        s_env = np.where(rng.random(n_s) < 0.85, main_env, rng.integers(0, len(ENVIRONMENTS), n_s)).astype(np.int8)
        s_region = np.where(rng.random(n_s) < 0.95, self.region[s_user],
                            rng.integers(1, N_REGIONS + 1, n_s)).astype(np.int16)

        # taste: Dirichlet over categories (base share × age and gender tilt, concentration 1.5)
        alpha = self.cat_w[None, :] * self.tilt_age[self.age[a:b]] * self.tilt_gender[self.gender[a:b]]
        alpha *= 1.5 / alpha.sum(axis=1, keepdims=True)
        theta = rng.gamma(np.maximum(alpha, 1e-3))
        s_cat = _categorical(np.cumsum(theta, axis=1)[s_user - a], rng.random(n_s))
        logits = np.einsum("nd,nsd->ns", self.user_vec[s_user], self.topic_emb[s_cat])
        s_cum = np.cumsum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1)
        s_sub = _categorical(s_cum, rng.random(n_s))

        cat = s_cat[sess]
        sub = np.where(rng.random(m) < P_SAME_SUBTOPIC, s_sub[sess], _categorical(s_cum[sess], rng.random(m)))
        explore = rng.random(m) < P_EXPLORE
        n_ex = int(explore.sum())
        cat[explore] = rng.choice(self.k, n_ex, p=self.cat_w)
        sub[explore] = rng.integers(0, self.s, n_ex)

        day = np.clip((ts - T0) // DAY, 0, N_DAYS - 1)
        seg = (cat.astype(np.int64) * self.s + sub) * N_DAYS + day
        pos = np.searchsorted(self.table_cdf, seg + rng.random(m), side="right")
        item = self.table_items[np.clip(pos, self.seg_lo[seg], self.seg_hi[seg])]
        # re-reads happen but are rare: redraw repeated (user, item) clicks from the same table, a few times
        reread = rng.random(m) < P_REREAD
        for _ in range(RESAMPLE_ROUNDS):
            key = user * np.int64(self.n_items) + item
            dup = ~reread
            dup[np.unique(key, return_index=True)[1]] = False
            if not dup.any():
                break
            pos = np.searchsorted(self.table_cdf, seg[dup] + rng.random(int(dup.sum())), side="right")
            item[dup] = self.table_items[np.clip(pos, self.seg_lo[seg[dup]], self.seg_hi[seg[dup]])]

        order = np.lexsort((ts, user))
        on_topic = (cat == s_cat[sess]) & (sub == s_sub[sess])
        event = self.events(user[order], item[order], sess[order], on_topic[order], event_rng)
        return {"user": user[order], "item": item[order], "ts": ts[order], "env": s_env[sess][order],
                "region": s_region[sess][order], "event": event}

    def events(self, user: np.ndarray, item: np.ndarray, sess: np.ndarray, on_topic: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
        """Event code per click (arrays in output order): purchases and likes, only on first clicks of a pair.

        A session's purchase candidate is its last on-topic click after an earlier first click of the session (so
        it still follows one after the dedupe), bought with probability sigmoid(BUY_BASE + user + brand + item
        quality + home-market bonus); likes fall on other clicks, more on good items and on-topic clicks."""
        m = len(user)
        event = np.full(m, CLICK, np.int8)
        first = np.zeros(m, bool)
        first[np.unique(user.astype(np.int64) * self.n_items + item, return_index=True)[1]] = True
        by_sess = np.argsort(sess, kind="stable")  # each session's clicks, in output order
        sorted_sess = sess[by_sess]
        starts = np.flatnonzero(np.r_[True, sorted_sess[1:] != sorted_sess[:-1]])
        f = first[by_sess].astype(np.int64)
        seen = np.cumsum(f) - f  # first clicks before this one, counted from the chunk's start ...
        earlier = np.empty(m, np.int64)
        earlier[by_sess] = seen - np.repeat(seen[starts], np.diff(np.r_[starts, m]))  # ... and from the session's
        pos = np.where(first & on_topic & (earlier > 0), np.arange(m), -1)
        cand = np.maximum.reduceat(pos[by_sess], starts)
        cand = cand[cand >= 0]
        u, it = user[cand], item[cand]
        logit = (BUY_BASE + self.user_buy[u] + self.brand_buy[self.brand[it]] + self.quality[it]
                 + BUY_MARKET * (self.market[it] == self.user_market[u]))
        event[cand[rng.random(len(cand)) < 1 / (1 + np.exp(-logit))]] = PURCHASE
        logit = LIKE_BASE + self.quality[item] + self.user_like[user] + LIKE_ON_TOPIC * on_topic
        event[first & (event == CLICK) & (rng.random(m) < 1 / (1 + np.exp(-logit)))] = LIKE
        return event

    def users_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"user_id": np.arange(1, self.n_users + 1, dtype=np.int64),
                             "age_group": AGE_GROUPS[self.age], "gender": GENDERS[self.gender],
                             "region": self.region, "device": DEVICES[self.device]})

    def items_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"item_id": np.arange(1, self.n_items + 1, dtype=np.int64),
                             "category_id": (self.cat + 1).astype(np.int32), "words_count": self.words,
                             "created_at_ts": self.created, "tags": self.tags,
                             "brand": pd.Series(self.brand + 1).astype(str).radd("b").to_numpy(object),
                             "market": pd.Series(self.market + 1).astype(str).radd("m").to_numpy(object)})


def _table(c: dict[str, np.ndarray]) -> pa.Table:
    env = pa.DictionaryArray.from_arrays(pa.array(c["env"], pa.int8()), pa.array(ENVIRONMENTS))
    event = pa.DictionaryArray.from_arrays(pa.array(c["event"], pa.int8()), pa.array(EVENT_TYPES))
    return pa.table({"user_id": pa.array(c["user"] + 1, pa.int64()), "item_id": pa.array(c["item"] + 1, pa.int64()),
                     "timestamp": pa.array(c["ts"], pa.int64()), "environment": env,
                     "region": pa.array(c["region"], pa.int16()), "event": event})


def write_synthetic(out: str | Path, n_users: int, n_items: int, n_clicks: int, seed: int = 42,
                    fmt: str = "parquet", progress: bool = True) -> Path:
    """Generate the dataset into directory `out` (interactions, users, items + synth.json); returns `out`.

    Deterministic for (n_users, n_items, n_clicks, seed)."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', not {fmt!r}")
    if n_users < 1 or n_items < 10 or n_clicks < 1:
        raise ValueError(f"need users ≥ 1, items ≥ 10, clicks ≥ 1 (got {n_users}, {n_items}, {n_clicks})")
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stem in ("interactions", "users", "items", "click_log", "articles"):
        for ext in (".parquet", ".csv"):  # a stale file of the other format would shadow ours
            (out / f"{stem}{ext}").unlink(missing_ok=True)
    world = _World(n_users, n_items, n_clicks, seed)
    path = out / f"interactions.{fmt}"
    schema = _table({"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64), "ts": np.zeros(0, np.int64),
                     "env": np.zeros(0, np.int8), "region": np.zeros(0, np.int16),
                     "event": np.zeros(0, np.int8)}).schema
    n_events = np.zeros(len(EVENT_TYPES), np.int64)
    writer = pq.ParquetWriter(path, schema, compression="zstd") if fmt == "parquet" else None
    csv_writer = None
    try:
        with tqdm(total=n_clicks, unit="click", unit_scale=True, desc="synth", disable=not progress) as bar:
            for i, (a, b) in enumerate(world.chunks()):
                c = world.clicks(a, b, np.random.default_rng([seed, 1, i]), np.random.default_rng([seed, 2, i]))
                n_events += np.bincount(c["event"], minlength=len(EVENT_TYPES))
                t = _table(c)
                if writer is not None:
                    writer.write_table(t, row_group_size=len(t) or None)
                else:
                    t = t.set_column(3, "environment", t["environment"].cast(pa.string()))
                    t = t.set_column(5, "event", t["event"].cast(pa.string()))
                    csv_writer = csv_writer or pacsv.CSVWriter(str(path), t.schema)
                    csv_writer.write_table(t)
                bar.update(len(t))
    finally:
        if writer is not None:
            writer.close()
        if csv_writer is not None:
            csv_writer.close()
    for name, frame in (("users", world.users_frame()), ("items", world.items_frame())):
        if fmt == "parquet":
            frame.to_parquet(out / f"{name}.parquet", index=False)
        else:
            frame.to_csv(out / f"{name}.csv", index=False)
    meta = {"generator_version": GENERATOR_VERSION, "n_users": n_users, "n_items": n_items, "n_clicks": n_clicks,
            "seed": seed, "format": fmt, "categories": world.k, "subtopics_per_category": world.s,
            "brands": world.n_brands, "markets": N_MARKETS, "regions_per_market": REGIONS_PER_MARKET,
            "events": dict(zip(EVENT_TYPES, n_events.tolist(), strict=True)), "window": [T0, T0 + N_DAYS * DAY]}
    (out / META_FILE).write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    log.info("synthetic dataset: %d clicks, %d users, %d items (%d categories × %d sub-topics) → %s in %.1f s",
             n_clicks, n_users, n_items, world.k, world.s, out, time.perf_counter() - t_start)
    return out


def _is_complete(path: Path, want: dict) -> bool:
    try:
        meta = orjson.loads((path / META_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return False
    return all(meta.get(k) == v for k, v in want.items()) and (path / "interactions.parquet").exists()


def ensure_default_dataset(path: str | Path | None = None) -> Path:
    """The built-in dataset (20k users, 10k items, 400k clicks), generated once and cached at `path`
    (default var/data/synthetic-default); regenerated only if missing, partial or from another generator version."""
    target = Path(path) if path is not None else DEFAULT_PATH
    want = {**DEFAULT_PARAMS, "generator_version": GENERATOR_VERSION, "format": "parquet"}
    if _is_complete(target, want):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and swap it in, so a reader (or a concurrent builder) never sees half a dataset
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_synthetic(tmp, **DEFAULT_PARAMS, fmt="parquet", progress=False)
        if target.exists() and not _is_complete(target, want):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target, want):  # someone else won the race with a complete dataset: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
