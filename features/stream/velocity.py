"""Velocity from the activity logs: one script call per entity and event appends the event
to the entity's sorted sets, trims them and returns the window aggregates, atomically and
idempotently (every key of one call shares the entity's cluster slot).

Keys, with the id as hash tag like every feature key:
- `user:{u}:activity`: member `tx_id|merchant_id|amount`, score the event time; the last
  24 h (and at most `max_events`), TTL 25 h.
- `user:{u}:merchants`: member the merchant id, score the last time paid (`ZADD GT`: a
  late event never moves it back); the last 30 days, TTL 31 days.
- `merchant:{m}:activity`: member the tx id, score the event time; 24 h, TTL 25 h.
- `user:{u}:version`, `merchant:{m}:version`: a counter each script call increments, TTL 31
  days. The groups are written with it as their version, so of two consumers that applied
  events of one entity at once, the one that applied last is the one whose values stay.

Windows end at the entity's newest event time (its anchor), not the wall clock: the values
are true as of that event time, which is the group's event time, so replaying a backlog
gives the values each moment had, and out-of-order events give the same values as in
order. An event older than the anchor's 24 h window is late: it is not added to the 24 h
logs (where it would be trimmed at once) but still counts as a merchant paid, if it is
within 7 days, for distinct_merchants_7d.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from features._script import Call, Script
from features.stream.event import TransactionEvent

HOUR_S = 3600
DAY_S = 86400
WEEK_S = 7 * DAY_S
MONTH_S = 30 * DAY_S
ACTIVITY_TTL_S = DAY_S + HOUR_S
MERCHANTS_TTL_S = MONTH_S + DAY_S


def user_activity_key(user_id: str) -> str:
    """The user's 24 h transaction log."""
    return f"user:{{{user_id}}}:activity"


def user_merchants_key(user_id: str) -> str:
    """The merchants the user paid in the last 30 days, by last time paid."""
    return f"user:{{{user_id}}}:merchants"


def merchant_activity_key(merchant_id: str) -> str:
    """The merchant's 24 h transaction log."""
    return f"merchant:{{{merchant_id}}}:activity"


def version_key(entity: str, entity_id: str) -> str:
    """The counter of script calls on an entity's logs: its groups' version."""
    return f"{entity}:{{{entity_id}}}:version"


class Applied(StrEnum):
    """What one event did to an entity's log."""

    NEW = "new"
    DUPLICATE = "duplicate"  # its tx id was in the log already: nothing counted twice
    LATE = "late"  # older than the 24 h window of the entity's newest event


# KEYS: activity log, merchants, version. ARGV: tx id, merchant id, amount, event time, max events,
# 1 h, 24 h, 7 d, 30 d (s), the two TTLs. The log is read whole (at most max events) to find
# the tx id and to sum: in score order, so the float sums do not depend on arrival order.
USER_SCRIPT = Script("""
local log, merchants = KEYS[1], KEYS[2]
local version = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[11])
local tx, merchant, amount = ARGV[1], ARGV[2], ARGV[3]
local ts, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local hour, day, week, month = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
  tonumber(ARGV[9])
local function num(x) return string.format('%.17g', x) end
local anchor = ts
local newest = redis.call('ZREVRANGE', log, 0, 0, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) > anchor then anchor = tonumber(newest[2]) end
local status = 'new'
if ts < anchor - day then
  status = 'late'
else
  local prefix = tx .. '|'
  for _, member in ipairs(redis.call('ZRANGE', log, 0, -1)) do
    if string.sub(member, 1, #prefix) == prefix then status = 'duplicate'; break end
  end
  if status == 'new' then redis.call('ZADD', log, ts, prefix .. merchant .. '|' .. amount) end
end
if status ~= 'duplicate' then redis.call('ZADD', merchants, 'GT', ts, merchant) end
redis.call('ZREMRANGEBYSCORE', log, '-inf', '(' .. num(anchor - day))
redis.call('ZREMRANGEBYRANK', log, 0, -cap - 1)
redis.call('ZREMRANGEBYSCORE', merchants, '-inf', '(' .. num(anchor - month))
redis.call('EXPIRE', log, ARGV[10])
redis.call('EXPIRE', merchants, ARGV[11])
local n1, s1, n24, s24 = 0, 0, 0, 0
local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  local paid = tonumber(string.match(entries[i], '|([^|]*)$'))
  n24, s24 = n24 + 1, s24 + paid
  if tonumber(entries[i + 1]) >= anchor - hour then n1, s1 = n1 + 1, s1 + paid end
end
local distinct = redis.call('ZCOUNT', merchants, num(anchor - week), '+inf')
return {status, num(anchor), version, n1, num(s1), n24, num(s24), distinct}
""")

# KEYS: the merchant's activity log, its version. ARGV: tx id, event time, max events, 24 h,
# the log's TTL, the version's.
MERCHANT_SCRIPT = Script("""
local log = KEYS[1]
local version = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
local ts, cap, day = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function num(x) return string.format('%.17g', x) end
local anchor = ts
local newest = redis.call('ZREVRANGE', log, 0, 0, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) > anchor then anchor = tonumber(newest[2]) end
local status = 'new'
if ts < anchor - day then
  status = 'late'
elseif redis.call('ZADD', log, 'NX', ts, ARGV[1]) == 0 then
  status = 'duplicate'
end
redis.call('ZREMRANGEBYSCORE', log, '-inf', '(' .. num(anchor - day))
redis.call('ZREMRANGEBYRANK', log, 0, -cap - 1)
redis.call('EXPIRE', log, ARGV[5])
return {status, num(anchor), version, redis.call('ZCARD', log)}
""")


@dataclass(frozen=True, slots=True)
class Velocity:
    """An entity's window aggregates after one event, as of `anchor_ts`."""

    applied: Applied
    anchor_ts: float
    version: int
    values: dict[str, float]


def user_call(event: TransactionEvent, max_events: int) -> Call:
    """The USER_SCRIPT call that applies `event` to its user's logs."""
    user = event.user_id
    keys = (user_activity_key(user), user_merchants_key(user), version_key("user", user))
    windows = (HOUR_S, DAY_S, WEEK_S, MONTH_S)
    args = (event.tx_id, event.merchant_id, repr(event.amount), repr(event.event_ts))
    return keys, [*args, max_events, *windows, ACTIVITY_TTL_S, MERCHANTS_TTL_S]


def merchant_call(event: TransactionEvent, max_events: int) -> Call:
    """The MERCHANT_SCRIPT call that applies `event` to its merchant's log."""
    merchant = event.merchant_id
    keys = (merchant_activity_key(merchant), version_key("merchant", merchant))
    args = [event.tx_id, repr(event.event_ts), max_events, DAY_S, ACTIVITY_TTL_S]
    return keys, [*args, MERCHANTS_TTL_S]


def user_velocity(reply: Sequence[Any]) -> Velocity:
    """USER_SCRIPT's reply as the values of `user:features` (every feature of the group:
    it is written whole); ValueError if malformed."""
    status, anchor, version, n1, s1, n24, s24, distinct = reply
    values = {
        "tx_count_1h": int(n1),
        "tx_sum_1h": float(s1),
        "tx_count_24h": int(n24),
        "tx_sum_24h": float(s24),
        "distinct_merchants_7d": int(distinct),
    }
    return Velocity(Applied(_str(status)), float(anchor), int(version), values)


def merchant_velocity(reply: Sequence[Any]) -> Velocity:
    """MERCHANT_SCRIPT's reply as the values of `merchant:velocity`; ValueError if malformed."""
    status, anchor, version, count = reply
    values: dict[str, float] = {"merchant_tx_count_24h": int(count)}
    return Velocity(Applied(_str(status)), float(anchor), int(version), values)


def _str(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
