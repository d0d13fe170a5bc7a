//! Every Lua script the Redis store runs. Each is sent once (`SCRIPT LOAD`) and then called
//! by SHA (`EVALSHA`); redis-rs reloads it when a server answers `NOSCRIPT` (after a restart
//! or failover). All KEYS of a script share the client's `{hash tag}`, so they work on Redis
//! Cluster.
//!
//! Why scripts and not MULTI/EXEC: a decision reads state, decides, then writes only when
//! allowed. MULTI cannot branch on what it reads, and WATCH-based optimistic locking would
//! retry under contention (N replicas hammering one client) and cost several round trips. A
//! script is one round trip and runs atomically, so N concurrent checks never admit more than
//! the limit.
//!
//! Why `now` is an argument and not Redis `TIME`: the in-memory store must do the same math
//! (`crate::decision`, of which `CHECK` is a port) and tests must be able to set the clock.
//! Replicas' clocks differ by at most NTP skew; a bucket never refills backwards (a `now`
//! older than the stored time adds nothing).

/// The decision itself, as a Lua function shared by [`CHECK`] and [`CHECK_MANY`] (port of
/// `crate::decision::decide`). A macro so both scripts are built from the same text with
/// `concat!`.
///
/// `check(K, now, cost, tier, policy, day_end, month_end, thresholds, grace)`:
///   K = {client override (string, JSON `Override`), tier bucket (hash l,t,p), throttle bucket
///        (hash l,t,p), day usage (hash u,tier,a<N>), month usage};
///   `policy` is the decoded tier policy (not modified: an override makes a copy);
///   `thresholds` is "80,90,100"; `grace` is ms kept after a period ends.
/// Returns {outcome 0 allowed|1 rate limited|2 quota exceeded, tier, bucket capacity (0 = no
///   bucket), bucket period s, bucket remaining, ms until full, throttled 0|1, retry after ms,
///   day used, day limit (-1 none), day policy (-1 none), month used, month limit, month
///   policy, fired alerts ("d80,m90"), exceeded quota (0 none|1 day|2 month)}.
macro_rules! check_fn {
    () => {
        r#"
local POLICY_CODE = {hard_stop = 0, throttle = 1, overage = 2}
-- Numbers go to redis.call as digits: Redis would format a Lua number with "%.17g", which is
-- several times slower (and prints large counts in exponent form).
local function int(x) return string.format('%d', x) end

-- A rate below the current choice's, compared without division.
local function slower(a, than)
  return a.refill_tokens * than.refill_period_s < than.refill_tokens * a.refill_period_s
end

-- Level is tokens x period_ms so refills stay integers. A bucket stored under another period
-- (the limit changed) starts full.
local function load_bucket(key, b, now)
  local pms = b.refill_period_s * 1000
  local cap = b.capacity * pms
  local level, t = cap, now
  local h = redis.call('HMGET', key, 'l', 't', 'p')
  if h[1] and tonumber(h[3]) == pms then
    level = tonumber(h[1])
    t = tonumber(h[2])
    if now > t then
      level = level + (now - t) * b.refill_tokens
      t = now
    end
    if level > cap then level = cap end
  end
  return level, t, cap, pms
end

local function lim(s) if type(s) == 'table' then return s.limit end return -1 end
local function pol(s) if type(s) == 'table' then return POLICY_CODE[s.policy] or -1 end return -1 end

local function check(K, now, cost, tier, policy, day_end, month_end, thresholds_csv, grace)
  local ov = redis.call('GET', K[1])
  if ov then
    local o = cjson.decode(ov)
    policy = {limit = policy.limit, daily = policy.daily, monthly = policy.monthly}
    if type(o.tier) == 'string' then tier = o.tier end
    if o.limit ~= nil then policy.limit = o.limit end
    if o.daily ~= nil then policy.daily = o.daily end
    if o.monthly ~= nil then policy.monthly = o.monthly end
  end
  local thresholds = {}
  for th in string.gmatch(thresholds_csv, '%d+') do thresholds[#thresholds + 1] = tonumber(th) end

  local quotas = {
    {K[4], policy.daily, day_end},
    {K[5], policy.monthly, month_end},
  }
  local used = {0, 0}
  local fresh = {false, false}
  local exceeded, reset_at = 0, 0
  local throttle = nil
  for i, q in ipairs(quotas) do
    local u = redis.call('HGET', q[1], 'u')
    fresh[i] = not u
    used[i] = tonumber(u) or 0
    local s = q[2]
    if type(s) == 'table' and used[i] + cost > s.limit then
      if s.policy == 'hard_stop' then
        if q[3] >= reset_at then exceeded = i; reset_at = q[3] end
      elseif s.policy == 'throttle' and type(s.throttle) == 'table' then
        if throttle == nil or slower(s.throttle, throttle) then throttle = s.throttle end
      end
    end
  end

  local b, bkey, throttled = policy.limit, K[2], 0
  if throttle ~= nil then b, bkey, throttled = throttle, K[3], 1 end
  local outcome, retry = 0, 0
  if exceeded > 0 then outcome = 2; retry = reset_at - now end
  if retry < 0 then retry = 0 end
  local cap_tokens, period_s, remaining, full_in = 0, 0, -1, 0
  if type(b) == 'table' then
    local level, t, cap, pms = load_bucket(bkey, b, now)
    local need = cost * pms
    if outcome == 0 then
      if need > level then
        outcome = 1
        if need > cap then retry = pms else retry = math.ceil((need - level) / b.refill_tokens) end
      else
        level = level - need
        full_in = math.ceil((cap - level) / b.refill_tokens)
        redis.call('HSET', bkey, 'l', int(level), 't', int(t), 'p', int(pms))
        redis.call('PEXPIRE', bkey, int(full_in + 1000))
      end
    end
    cap_tokens, period_s = b.capacity, b.refill_period_s
    remaining = math.floor(level / pms)
    full_in = math.ceil((cap - level) / b.refill_tokens)
  end

  local fired = {}
  if outcome == 0 then
    local tag = {'d', 'm'}
    for i, q in ipairs(quotas) do
      -- One HSET of the new count (read above, in this same atomic step) and the tier.
      used[i] = used[i] + cost
      redis.call('HSET', q[1], 'u', int(used[i]), 'tier', tier)
      -- Relative to the service's clock, not Redis's: the period is the service's idea. Set
      -- when the counter is created (it lives to the period's end plus a day of grace); a
      -- counter that exists has its expiry already, so later checks skip the write.
      if fresh[i] then redis.call('PEXPIRE', q[1], int(q[3] - now + grace)) end
      local s = q[2]
      if type(s) == 'table' and s.limit > 0 then
        for _, th in ipairs(thresholds) do
          -- The marker is set here, in the same atomic step as the count: exactly one
          -- request per period crosses each threshold, whatever the number of replicas.
          if used[i] * 100 >= th * s.limit and redis.call('HSETNX', q[1], 'a' .. th, 1) == 1 then
            fired[#fired + 1] = tag[i] .. th
          end
        end
      end
    end
  end

  return {outcome, tier, cap_tokens, period_s, remaining, full_in, throttled, retry,
          used[1], lim(policy.daily), pol(policy.daily),
          used[2], lim(policy.monthly), pol(policy.monthly),
          table.concat(fired, ','), exceeded}
end
"#
    };
}

/// One quota decision.
///
/// KEYS: 1 client override, 2 tier bucket, 3 throttle bucket, 4 day usage, 5 month usage.
/// ARGV: 1 now (Unix ms), 2 cost, 3 request tier, 4 tier policy (JSON `Policy`),
///       5 day end (Unix ms), 6 month end (Unix ms), 7 alert thresholds ("80,90,100"),
///       8 usage grace (ms kept after the period ends).
/// Returns: the reply of `check` (see [`check_fn`]).
pub const CHECK: &str = concat!(
    check_fn!(),
    r#"
return check(KEYS, tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], cjson.decode(ARGV[4]),
             tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]))
"#
);

/// Many quota decisions in one call (the Redis store's batching, see `store::redis`): each
/// is exactly [`CHECK`]'s, run one after the other inside one atomic script, so the result is
/// the same as sending them one by one in this order. A decision that fails (a key of the
/// wrong type, say) answers `{"E", message}` in its place without stopping the others, like a
/// failed `CHECK` call would. Only for standalone Redis: the keys of different clients are
/// in different Cluster slots.
///
/// KEYS: 5 per decision, as for [`CHECK`].
/// ARGV: 1 usage grace (ms), 2 number of distinct tier policies P, 3..2+P the policies (JSON,
///       each decoded once), then per decision 7 values: now, cost, request tier, policy
///       index (1-based), day end, month end, alert thresholds.
/// Returns: one `check` reply (or `{"E", message}`) per decision, in order.
pub const CHECK_MANY: &str = concat!(
    check_fn!(),
    r#"
local grace = tonumber(ARGV[1])
local np = tonumber(ARGV[2])
local policies = {}
for i = 1, np do policies[i] = cjson.decode(ARGV[2 + i]) end
local base = 2 + np
local n = (#ARGV - base) / 7
local out = {}
for i = 1, n do
  local a = base + (i - 1) * 7
  local k = 5 * (i - 1)
  local ok, r = pcall(check, {KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]},
                      tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3],
                      policies[tonumber(ARGV[a + 4])], tonumber(ARGV[a + 5]),
                      tonumber(ARGV[a + 6]), ARGV[a + 7], grace)
  if ok then
    out[i] = r
  else
    if type(r) == 'table' then r = r.err or r.message or 'script error' end
    out[i] = {'E', tostring(r)}
  end
end
return out
"#
);

/// A consistent read of one client's usage (script for one round trip and one snapshot).
///
/// KEYS: 1 client override, 2 day usage, 3 month usage.
/// Returns: {override JSON or "", day hash as [field, value, ...], month hash}.
pub const USAGE: &str = r#"
return {redis.call('GET', KEYS[1]) or '', redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"#;

/// Replaces a client's admin record atomically: both keys or neither, so a check never sees
/// a half-applied update. (A script rather than MULTI because redis-rs cannot run MULTI on a
/// Cluster connection; both keys share a slot, so a script can.)
///
/// KEYS: 1 override, 2 webhook. ARGV: 1 override JSON, 2 webhook JSON ("" deletes the key).
pub const PUT_CLIENT: &str = r#"
for i = 1, 2 do
  if ARGV[i] == '' then redis.call('DEL', KEYS[i]) else redis.call('SET', KEYS[i], ARGV[i]) end
end
return 1
"#;

/// Reads a client's admin record. KEYS: 1 override, 2 webhook. Returns {override, webhook}
/// with "" for a missing key (a script so the two reads are one slot-local round trip).
pub const GET_CLIENT: &str = r#"
return {redis.call('GET', KEYS[1]) or '', redis.call('GET', KEYS[2]) or ''}
"#;

/// One rate limit service decision over all of a request's limited descriptors (port of
/// `crate::rls::decide::decide`): every descriptor is assessed, then, only when no enforced
/// one denies, each that admits its hits is charged. One script, so concurrent requests on
/// any number of replicas never admit more than a limit. All keys of a request share the
/// domain's hash tag, so this also runs on Redis Cluster.
///
/// KEYS: per item, 1 counter or bucket key, 2 previous sliding window key.
/// ARGV: 1 now (Unix ms), 2 grace (ms kept past a window), then per item 7 values:
///       algorithm (0 fixed|1 token bucket|2 sliding), limit, unit ms, window start ms,
///       window end ms, hits (clamped to limit + 1), shadow (0|1).
/// Returns: {over 0|1, then per item: over, shadow denied, remaining, ms until reset}.
pub const RLS_CHECK: &str = r#"
local now = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local n = (#ARGV - 2) / 7
local function ceil_div(a, b) if b == 0 then return 0 end return math.ceil(a / b) end
local function floor_div(a, b) if b == 0 then return 0 end return math.floor(a / b) end
local function nonneg(x) if x < 0 then return 0 end return x end
-- Integers as digits: tostring would print large counts in exponent form and lose precision.
local function int(x) return string.format('%d', x) end
local items = {}
local over = 0
for i = 1, n do
  local o = 2 + (i - 1) * 7
  local it = {alg = tonumber(ARGV[o + 1]), l = tonumber(ARGV[o + 2]), u = tonumber(ARGV[o + 3]),
              ws = tonumber(ARGV[o + 4]), we = tonumber(ARGV[o + 5]), h = tonumber(ARGV[o + 6]),
              shadow = ARGV[o + 7] == '1', k1 = KEYS[2 * i - 1], k2 = KEYS[2 * i]}
  local l, u, h = it.l, it.u, it.h
  local to_end = nonneg(it.we - now)
  if it.alg == 0 then
    local used = tonumber(redis.call('GET', it.k1)) or 0
    local after = used + h
    it.admits = after <= l
    it.before = {nonneg(l - used), to_end}
    it.after = {nonneg(l - after), to_end}
    it.new = after
  elseif it.alg == 1 then
    local cap = l * u
    local level, t = cap, now
    local st = redis.call('HMGET', it.k1, 'l', 't')
    if st[1] and st[2] then
      level = tonumber(st[1])
      t = tonumber(st[2])
      if now > t then
        level = level + (now - t) * l
        t = now
      end
      if level > cap then level = cap end
    end
    local need = h * u
    it.admits = need <= level
    local left = level
    if it.admits then left = level - need end
    it.before = {floor_div(level, u), ceil_div(cap - level, l)}
    it.after = {floor_div(left, u), ceil_div(cap - left, l)}
    it.level, it.t = left, t
  else
    local elapsed = now - it.ws
    if elapsed < 0 then elapsed = 0 end
    if elapsed > u then elapsed = u end
    local cur = tonumber(redis.call('GET', it.k1)) or 0
    local prev = tonumber(redis.call('GET', it.k2)) or 0
    local w = prev * (u - elapsed) + cur * u
    local budget = l * u
    it.admits = w + h * u <= budget
    it.before = {floor_div(nonneg(budget - w), u), to_end}
    it.after = {floor_div(nonneg(budget - w - h * u), u), to_end}
    it.new = cur + h
  end
  if not it.admits and not it.shadow then over = 1 end
  items[i] = it
end
local out = {over}
for _, it in ipairs(items) do
  local r = it.before
  if over == 0 and it.admits then
    r = it.after
    if it.alg == 0 then
      redis.call('SET', it.k1, int(it.new), 'PX', int(nonneg(it.we - now) + grace))
    elseif it.alg == 1 then
      redis.call('HSET', it.k1, 'l', int(it.level), 't', int(it.t))
      redis.call('PEXPIRE', it.k1, int(r[2] + grace))
    else
      redis.call('SET', it.k1, int(it.new), 'PX', int(nonneg(it.we - now) + it.u + grace))
    end
  end
  local o, s = 0, 0
  if not it.admits then
    if it.shadow then s = 1 else o = 1 end
  end
  out[#out + 1] = o
  out[#out + 1] = s
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
end
return out
"#;
