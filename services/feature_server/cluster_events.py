"""POST /events on a Redis Cluster (docs/redis_cluster.md): the writes of app.EVENTS_LUA, in per-slot steps.

One script cannot touch keys in several slots, so a batch is written in two steps, each atomic in its slot:
1. on the `{log}` slot, LOG_LUA: the bound check (a batch past EVENT_LOG_MAX_LEN writes nothing), the event-id
   markers (a retried event is skipped) and the log entries; it returns which events are new;
2. for the new events, USER_LUA once per user (recent list + counters, both under `{u:<user_id>}`) and INCRBY on
   each item's click counter, pipelined per node.
The log, the nightly's source of truth, is written first. If step 2 fails (a master down mid-batch: 503), the log
holds the events but the real-time state may miss some of them until the next nightly folds the log in; a client
retry with the same event ids is then skipped as a duplicate, and one without ids is counted again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.keyspace import Keyspace, pack_json
from common.settings import Settings

# KEYS: the log, then the marker of each event that has an id. ARGV: n, log bound, marker TTL, then per event:
# has-marker ('1'/'0'), user id, item id, ts, event type, environment, region. Returns {accepted, log length,
# 1-based indices of the events written...}, or {-1, length} when the batch would pass the bound.
LOG_LUA = """
local n = tonumber(ARGV[1])
local log_key = KEYS[1]
local log_len = redis.call('XLEN', log_key)
if log_len + n > tonumber(ARGV[2]) then return {-1, log_len} end
local marker_ttl = tonumber(ARGV[3])
local fresh, m = {}, 1
for i = 1, n do
  local a = 3 + 7 * (i - 1)
  local new = true
  if ARGV[a + 1] == '1' then
    m = m + 1
    new = redis.call('SET', KEYS[m], '1', 'NX', 'EX', marker_ttl) ~= false
  end
  if new then
    fresh[#fresh + 1] = i
    local entry = {'user_id', ARGV[a + 2], 'item_id', ARGV[a + 3], 'timestamp', ARGV[a + 4], 'event', ARGV[a + 5]}
    if ARGV[a + 6] ~= '' then entry[#entry + 1] = 'environment'; entry[#entry + 1] = ARGV[a + 6] end
    if ARGV[a + 7] ~= '' then entry[#entry + 1] = 'region'; entry[#entry + 1] = ARGV[a + 7] end
    redis.call('XADD', log_key, '*', unpack(entry))
  end
end
return {#fresh, log_len + #fresh, unpack(fresh)}
"""

# One user's real-time state. KEYS: recent list, counters hash. ARGV: recent_n, TTL, then per event (oldest
# first): packed event, ts, environment, region.
USER_LUA = """
local rk, ck = KEYS[1], KEYS[2]
local recent_n, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for a = 3, #ARGV, 4 do
  local ts = tonumber(ARGV[a + 1])
  redis.call('LPUSH', rk, ARGV[a])
  redis.call('HINCRBY', ck, 'clicks', 1)
  local last = redis.call('HGET', ck, 'last_ts')
  if (not last) or ts > tonumber(last) then redis.call('HSET', ck, 'last_ts', ARGV[a + 1]) end
  local first = redis.call('HGET', ck, 'first_ts')
  if (not first) or ts < tonumber(first) then redis.call('HSET', ck, 'first_ts', ARGV[a + 1]) end
  if ARGV[a + 2] ~= '' then redis.call('HINCRBY', ck, 'env:' .. ARGV[a + 2], 1) end
  if ARGV[a + 3] ~= '' then redis.call('HINCRBY', ck, 'region:' .. ARGV[a + 3], 1) end
end
redis.call('LTRIM', rk, 0, recent_n - 1)
redis.call('EXPIRE', rk, ttl)
redis.call('EXPIRE', ck, ttl)
return 1
"""


async def write_events_cluster(client, ks: Keyspace, settings: Settings, rows: Sequence[tuple[int, Any]]) -> tuple[int, int]:
    """Write `rows` ((ts, Event), oldest first) through the cluster client; returns (events written, log length),
    or (-1, log length) when the log is at its bound (nothing written)."""
    keys, args = [ks.event_log()], [len(rows), settings.event_log_max_len, settings.event_id_ttl_s]
    for ts, e in rows:
        if e.event_id:
            keys.append(ks.realtime_event_id(e.event_id))
        args += ["1" if e.event_id else "0", e.user_id, e.item_id, ts, e.event, e.environment or "", e.region or ""]
    written, log_len, *fresh = await client.eval(LOG_LUA, len(keys), *keys, *args)
    if int(written) <= 0:
        return int(written), int(log_len)
    per_user: dict[str, list] = {}
    clicks: dict[str, int] = {}
    for i in fresh:
        ts, e = rows[int(i) - 1]
        per_user.setdefault(e.user_id, []).extend(
            [pack_json([e.item_id, ts, e.environment, e.region]), ts, e.environment or "", e.region or ""])
        clicks[e.item_id] = clicks.get(e.item_id, 0) + 1
    pipe = client.pipeline(transaction=False)
    for user, user_args in per_user.items():
        pipe.execute_command("EVAL", USER_LUA, 2, ks.realtime_recent(user), ks.realtime_counters(user),
                             settings.recent_n, settings.realtime_ttl_s, *user_args)
    for item, n in clicks.items():
        pipe.incrby(ks.realtime_item_clicks(item), n)
        pipe.expire(ks.realtime_item_clicks(item), settings.realtime_ttl_s)
    await pipe.execute()
    return int(written), int(log_len)
