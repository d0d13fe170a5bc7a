//! Releasing a lease's unused units (`POST /v1/lease/release`), shared by both stores: the
//! keys and the Redis script. A lease's units were taken by an ordinary decision; a release
//! gives back at most the units granted, once in total per lease however often it is called
//! (a per-lease counter of units already given back), to the periods and bucket the lease
//! came from (named in its id). Counters of a period that has ended are not recreated.

use super::key_base;
use crate::lease::{BucketKind, LeaseRef};

/// How long the per-lease release counter outlives the lease (a late or repeated release
/// still finds it).
pub const RELEASE_GRACE_MS: u64 = 600_000;

/// Everything one release needs.
#[derive(Debug, Clone)]
pub struct ReleaseArgs<'a> {
    pub client: &'a str,
    pub lease: &'a LeaseRef,
    pub units: u64,
    pub now_ms: u64,
}

/// The keys of a release, all in the client's hash slot (Cluster-safe): the per-lease
/// counter, the lease's day and month usage, and its bucket (`None`: no bucket).
pub struct ReleaseKeys {
    pub lease: String,
    pub day: String,
    pub month: String,
    pub bucket: Option<String>,
}

impl ReleaseKeys {
    pub fn new(client: &str, l: &LeaseRef) -> Self {
        let b = key_base(client);
        Self {
            lease: format!("{b}:l:{}", l.nonce),
            day: format!("{b}:d:{}", l.day_id),
            month: format!("{b}:m:{}", l.month_id),
            bucket: match l.bucket {
                BucketKind::None => None,
                BucketKind::Tier => Some(format!("{b}:b")),
                BucketKind::Throttle => Some(format!("{b}:tb")),
            },
        }
    }
}

/// Milliseconds the per-lease counter is kept from `now`.
pub fn counter_ttl_ms(l: &LeaseRef, now: u64) -> u64 {
    l.expires_ms
        .saturating_sub(now)
        .saturating_add(RELEASE_GRACE_MS)
}

/// KEYS: 1 per-lease released counter, 2 day usage (hash u), 3 month usage, 4 bucket (hash
/// l,t,p; with ARGV 4 = "1"). ARGV: 1 units, 2 granted, 3 counter TTL ms, 4 has bucket.
/// Returns the units given back. The bucket's level may go above capacity here: every load
/// caps it (`decision::load_bucket`, `CHECK`'s `load_bucket`).
pub const RELEASE: &str = r#"
local done = tonumber(redis.call('GET', KEYS[1])) or 0
local n = tonumber(ARGV[1])
local left = tonumber(ARGV[2]) - done
if n > left then n = left end
if n <= 0 then return 0 end
redis.call('SET', KEYS[1], done + n, 'PX', ARGV[3])
for _, k in ipairs({KEYS[2], KEYS[3]}) do
  local u = tonumber(redis.call('HGET', k, 'u'))
  if u then
    local back = n
    if back > u then back = u end
    redis.call('HSET', k, 'u', u - back)
  end
end
if ARGV[4] == '1' then
  local h = redis.call('HMGET', KEYS[4], 'l', 'p')
  if h[1] and h[2] then
    redis.call('HSET', KEYS[4], 'l', tonumber(h[1]) + n * tonumber(h[2]))
  end
end
return n
"#;

/// The units a release gives back when `done` were already given back for the lease.
pub fn to_give_back(units: u64, granted: u64, done: u64) -> u64 {
    units.min(granted.saturating_sub(done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_math_never_gives_back_more_than_granted() {
        assert_eq!(to_give_back(5, 10, 0), 5);
        assert_eq!(to_give_back(5, 10, 7), 3);
        assert_eq!(to_give_back(5, 10, 10), 0);
        assert_eq!(to_give_back(5, 10, 99), 0);
    }

    #[test]
    fn release_keys_share_the_client_slot() {
        let l = LeaseRef::parse("0123456789abcdef.20240229.202402.t.3.9").unwrap();
        let k = ReleaseKeys::new("a{b", &l);
        for key in [&k.lease, &k.day, &k.month, k.bucket.as_ref().unwrap()] {
            assert!(key.starts_with("ag:{a%7Bb}:"), "{key}");
        }
        assert_eq!(k.bucket.as_deref(), Some("ag:{a%7Bb}:tb"));
        assert_eq!(k.day, "ag:{a%7Bb}:d:20240229");
    }
}
