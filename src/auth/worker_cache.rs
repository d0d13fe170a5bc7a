//! The per-worker verified-token cache: the identity a token produced, kept in the VM.
//!
//! The shared [`super::token_cache`] makes each signature be checked once for all workers,
//! but a hit there still costs, on every request, a SHA-256 of the token, a shared-data read
//! (a host call under Envoy's process-wide lock), a base64 decode and two JSON parses to
//! rebuild the identity. This layer in front of it answers a repeated token with a map
//! lookup: measured in Envoy, see `docs/PERFORMANCE.md`.
//!
//! Exactness:
//! - Keyed by the WHOLE token string (the hash only picks a bucket; a lookup compares the
//!   full string), so no crafted collision can borrow another token's identity.
//! - An entry also records the provider it was verified for, the token's `iss` (to redo the
//!   provider choice among a route's candidates exactly as the full path would) and the
//!   fingerprints of the key sets that verified it; a different provider or a rotated key
//!   set is a miss.
//! - It is valid exactly while the full path's time checks would pass:
//!   `nbf - skew <= now`, `iat - skew <= now` and `now < exp + skew`, the same arithmetic as
//!   `jwt::check_claims`; capped at [`MAX_TTL_S`] like the shared cache.
//! - Only identities from verified tokens are inserted. Issuer, audience, algorithms, skew
//!   and claim mapping come from the config, and the cache lives in the compiled config, so
//!   a new config starts empty.
//!
//! Bounded: at most [`MAX_ENTRIES`] entries and about [`MAX_BYTES`] of tokens and identities
//! per worker; when full, expired entries go first, then the least recently used.

use crate::identity::Identity;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use xxhash_rust::xxh3::Xxh3Builder;

/// Most entries per worker.
pub const MAX_ENTRIES: usize = 1024;
/// Most bytes (tokens plus an estimate of their identities) per worker.
pub const MAX_BYTES: usize = 2 << 20;
/// Longest an entry is kept, whatever `exp` says (as the shared cache).
pub const MAX_TTL_S: u64 = super::token_cache::MAX_TTL_S;
/// Most key sets a provider checks a token against (its local and its remote set).
const MAX_SETS: usize = 2;

/// Which key sets verified a token: their fingerprints, in the order the verifier uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct KeySetIds {
    fps: [[u8; 16]; MAX_SETS],
    len: u8,
}

impl KeySetIds {
    /// `None` when there are more sets than an entry records (then nothing is cached).
    pub fn new(fingerprints: &[&[u8; 16]]) -> Option<KeySetIds> {
        if fingerprints.len() > MAX_SETS {
            return None;
        }
        let mut ids = KeySetIds::default();
        for (slot, fp) in ids.fps.iter_mut().zip(fingerprints) {
            *slot = **fp;
        }
        ids.len = fingerprints.len() as u8;
        Some(ids)
    }
}

/// The time window in which a verified token is accepted (Unix seconds), from its claims
/// and the provider's clock skew.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Validity {
    /// First second the token is accepted: `max(nbf, iat) - skew`.
    pub from_s: u64,
    /// First second it is refused again: `exp + skew` (capped by [`MAX_TTL_S`]).
    pub until_s: u64,
}

impl Validity {
    /// The window `jwt::check_claims` enforces, for a token verified at `now_s`.
    pub fn of(
        exp: Option<u64>,
        nbf: Option<u64>,
        iat: Option<u64>,
        skew_s: u64,
        now_s: u64,
    ) -> Validity {
        let from_s = nbf
            .map_or(0, |n| n.saturating_sub(skew_s))
            .max(iat.map_or(0, |i| i.saturating_sub(skew_s)));
        let until_s = exp
            .map_or(u64::MAX, |e| e.saturating_add(skew_s))
            .min(now_s.saturating_add(MAX_TTL_S));
        Validity { from_s, until_s }
    }

    fn contains(&self, now_s: u64) -> bool {
        self.from_s <= now_s && now_s < self.until_s
    }
}

/// What a cached token says about itself before the caller decides it applies.
pub struct Probe<'a> {
    /// The token's `iss` claim (verified), to choose among a route's providers.
    pub iss: Option<&'a str>,
}

/// The provider and key sets the caller would verify the token with now.
pub struct Expect {
    pub provider: usize,
    pub keys: KeySetIds,
}

/// A token that just passed every check, and what it produced.
pub struct Verified<'a> {
    /// The provider (index) that checked it.
    pub provider: usize,
    /// The key sets it was checked against.
    pub keys: KeySetIds,
    /// Its `iss` claim.
    pub iss: Option<&'a str>,
    pub validity: Validity,
    pub identity: &'a Identity,
}

struct Entry {
    provider: usize,
    keys: KeySetIds,
    iss: Option<String>,
    validity: Validity,
    identity: Identity,
    /// Bytes charged against [`MAX_BYTES`].
    cost: usize,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Box<str>, Entry, Xxh3Builder>,
    bytes: usize,
    /// Bumped on every hit and insert; orders entries for LRU eviction.
    clock: u64,
}

/// See the module documentation. One per worker (it lives in the compiled config).
pub struct WorkerTokenCache {
    inner: RefCell<Inner>,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for WorkerTokenCache {
    fn default() -> Self {
        WorkerTokenCache::new(MAX_ENTRIES, MAX_BYTES)
    }
}

impl Clone for WorkerTokenCache {
    /// A clone starts empty: entries belong to one worker.
    fn clone(&self) -> Self {
        WorkerTokenCache::new(self.max_entries, self.max_bytes)
    }
}

impl fmt::Debug for WorkerTokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerTokenCache")
            .field("entries", &self.len())
            .field("max_entries", &self.max_entries)
            .finish()
    }
}

fn string_bytes(s: &str) -> usize {
    s.len() + 24
}

/// A rough upper bound of an identity's heap use, so the byte budget covers it.
fn identity_bytes(id: &Identity) -> usize {
    let list = |v: &[String]| v.iter().map(|s| string_bytes(s)).sum::<usize>();
    let pairs = |v: &[(String, String)]| {
        v.iter()
            .map(|(a, b)| string_bytes(a) + string_bytes(b))
            .sum::<usize>()
    };
    let method = match &id.method {
        crate::identity::AuthMethod::Jwt(p) => string_bytes(p),
        crate::identity::AuthMethod::ApiKey => 0,
    };
    method
        + string_bytes(&id.subject)
        + string_bytes(&id.client)
        + string_bytes(&id.tier)
        + list(&id.scopes)
        + list(&id.roles)
        + pairs(&id.forwarded)
        + pairs(&id.claims)
}

impl WorkerTokenCache {
    pub fn new(max_entries: usize, max_bytes: usize) -> WorkerTokenCache {
        // A random seed per cache: bucket collisions cannot be planned from outside (lookups
        // compare the whole token either way). Without randomness, a fixed seed still works.
        let mut seed = [0u8; 8];
        let _ = getrandom::getrandom(&mut seed);
        let map = HashMap::with_hasher(Xxh3Builder::new().with_seed(u64::from_le_bytes(seed)));
        WorkerTokenCache {
            inner: RefCell::new(Inner {
                map,
                bytes: 0,
                clock: 0,
            }),
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.try_borrow().map_or(0, |i| i.map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The identity of `token` when it was verified for the provider and key sets `expect`
    /// picks (given the token's `iss`) and `now_s` is inside its validity window. An entry
    /// that has expired, or was verified for another provider or other keys, is dropped.
    pub fn get(
        &self,
        token: &str,
        now_s: u64,
        expect: impl FnOnce(&Probe<'_>) -> Option<Expect>,
    ) -> Option<Identity> {
        let mut guard = self.inner.try_borrow_mut().ok()?;
        let inner = &mut *guard;
        let entry = inner.map.get_mut(token)?;
        let want = expect(&Probe {
            iss: entry.iss.as_deref(),
        });
        let fresh = entry.validity.contains(now_s);
        match want {
            Some(w) if fresh && w.provider == entry.provider && w.keys == entry.keys => {
                inner.clock += 1;
                entry.last_used = inner.clock;
                Some(entry.identity.clone())
            }
            // Not before its window (a clock step back): keep it, it will apply later.
            _ if now_s < entry.validity.from_s => None,
            _ => {
                if let Some(e) = inner.map.remove(token) {
                    inner.bytes = inner.bytes.saturating_sub(e.cost);
                }
                None
            }
        }
    }

    /// Frees room for an entry of `cost` bytes: expired entries first, then the least
    /// recently used down to 7/8 of the bounds, so that a stream of new tokens (a busy API,
    /// or a flood of distinct valid HS256 tokens, each cheap to verify) pays one O(n log n)
    /// pass per n/8 inserts rather than a full scan on every insert.
    fn make_room(&self, inner: &mut Inner, cost: usize, now_s: u64) {
        let before = inner.map.len();
        inner.map.retain(|_, e| e.validity.until_s > now_s);
        if inner.map.len() != before {
            inner.bytes = inner.map.values().map(|e| e.cost).sum();
        }
        let max_entries = self.max_entries - self.max_entries / 8;
        let max_bytes = (self.max_bytes - self.max_bytes / 8).saturating_sub(cost);
        if inner.map.len() < max_entries.max(1) && inner.bytes <= max_bytes {
            return;
        }
        // Ages and sizes only (no key copies); `last_used` values are unique, so the cut-off
        // age removes exactly the oldest entries.
        let mut by_age: Vec<(u64, usize)> =
            inner.map.values().map(|e| (e.last_used, e.cost)).collect();
        by_age.sort_unstable();
        let (mut len, mut bytes) = (inner.map.len(), inner.bytes);
        let mut cut = None;
        for (used, c) in by_age {
            if len < max_entries.max(1) && bytes <= max_bytes {
                break;
            }
            len -= 1;
            bytes = bytes.saturating_sub(c);
            cut = Some(used);
        }
        if let Some(cut) = cut {
            inner.map.retain(|_, e| e.last_used > cut);
            inner.bytes = inner.map.values().map(|e| e.cost).sum();
        }
    }

    /// Records the identity of a token just verified (signature checked here or by another
    /// worker through the shared cache). Entries that cannot be valid, or that exceed the
    /// byte budget on their own, are not stored.
    pub fn insert(&self, token: &str, v: Verified<'_>, now_s: u64) {
        let Verified {
            provider,
            keys,
            iss,
            validity,
            identity,
        } = v;
        if !validity.contains(now_s) {
            return;
        }
        let cost = string_bytes(token)
            + iss.map_or(0, string_bytes)
            + identity_bytes(identity)
            + std::mem::size_of::<Entry>();
        if cost > self.max_bytes {
            return;
        }
        let Ok(mut guard) = self.inner.try_borrow_mut() else {
            return;
        };
        let inner = &mut *guard;
        if let Some(old) = inner.map.remove(token) {
            inner.bytes = inner.bytes.saturating_sub(old.cost);
        }
        if inner.map.len() >= self.max_entries || inner.bytes + cost > self.max_bytes {
            self.make_room(inner, cost, now_s);
        }
        inner.clock += 1;
        let last_used = inner.clock;
        inner.bytes += cost;
        inner.map.insert(
            token.into(),
            Entry {
                provider,
                keys,
                iss: iss.map(str::to_string),
                validity,
                identity: identity.clone(),
                cost,
                last_used,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AuthMethod;

    const FP_A: [u8; 16] = [1; 16];
    const FP_B: [u8; 16] = [2; 16];

    fn id(sub: &str) -> Identity {
        Identity {
            method: AuthMethod::Jwt("main".into()),
            subject: sub.into(),
            client: sub.into(),
            tier: "authenticated".into(),
            scopes: vec!["read".into()],
            roles: vec![],
            forwarded: vec![],
            claims: vec![],
            strip_authorization: false,
        }
    }

    fn keys(fps: &[&[u8; 16]]) -> KeySetIds {
        KeySetIds::new(fps).unwrap()
    }

    fn expect(provider: usize, k: KeySetIds) -> impl FnOnce(&Probe<'_>) -> Option<Expect> {
        move |_| Some(Expect { provider, keys: k })
    }

    fn entry<'a>(
        provider: usize,
        keys: KeySetIds,
        iss: Option<&'a str>,
        validity: Validity,
        identity: &'a Identity,
    ) -> Verified<'a> {
        Verified {
            provider,
            keys,
            iss,
            validity,
            identity,
        }
    }

    fn window(from_s: u64, until_s: u64) -> Validity {
        Validity { from_s, until_s }
    }

    #[test]
    fn validity_matches_check_claims_arithmetic() {
        // exp 1000, skew 30: accepted while now < 1030.
        let v = Validity::of(Some(1000), None, None, 30, 900);
        assert_eq!(v, window(0, 1030));
        // nbf and iat: accepted from max(nbf, iat) - skew.
        let v = Validity::of(Some(1000), Some(500), Some(600), 30, 900);
        assert_eq!(v, window(570, 1030));
        // No exp: capped at MAX_TTL_S from verification; saturating at the edges.
        let v = Validity::of(None, Some(10), None, 60, 100);
        assert_eq!(v, window(0, 100 + MAX_TTL_S));
        let v = Validity::of(Some(u64::MAX), None, Some(u64::MAX), u64::MAX, u64::MAX);
        assert_eq!(v, window(0, u64::MAX));
    }

    #[test]
    fn a_hit_needs_the_exact_token_provider_and_keys() {
        let c = WorkerTokenCache::default();
        let k = keys(&[&FP_A]);
        c.insert("a.b.c", entry(0, k, None, window(0, 2000), &id("u1")), 100);
        assert_eq!(c.get("a.b.c", 100, expect(0, k)), Some(id("u1")));
        // One character different, a prefix, a longer string: misses.
        assert_eq!(c.get("a.b.C", 100, expect(0, k)), None);
        assert_eq!(c.get("a.b.", 100, expect(0, k)), None);
        assert_eq!(c.get("a.b.cc", 100, expect(0, k)), None);
        // The caller declines (e.g. no provider applies): a miss.
        assert_eq!(c.get("a.b.c", 100, |_| None), None);
        // Another provider or rotated keys: a miss, and the stale entry is gone.
        c.insert("x.y.z", entry(0, k, None, window(0, 2000), &id("u2")), 100);
        assert_eq!(c.get("x.y.z", 100, expect(1, k)), None);
        assert_eq!(c.get("x.y.z", 100, expect(0, k)), None, "dropped");
        c.insert("x.y.z", entry(0, k, None, window(0, 2000), &id("u2")), 100);
        assert_eq!(c.get("x.y.z", 100, expect(0, keys(&[&FP_B]))), None);
        assert_eq!(c.get("x.y.z", 100, expect(0, keys(&[&FP_A, &FP_B]))), None);
        assert_eq!(c.get("x.y.z", 100, expect(0, k)), None, "dropped");
    }

    #[test]
    fn the_callers_choice_sees_the_cached_issuer() {
        let c = WorkerTokenCache::default();
        let k = keys(&[&FP_A]);
        c.insert(
            "t",
            entry(1, k, Some("https://iss"), window(0, 2000), &id("u")),
            100,
        );
        let got = c.get("t", 100, |p| {
            Some(Expect {
                provider: if p.iss == Some("https://iss") { 1 } else { 0 },
                keys: k,
            })
        });
        assert_eq!(got, Some(id("u")));
    }

    #[test]
    fn entries_apply_exactly_inside_their_window() {
        let c = WorkerTokenCache::default();
        let k = keys(&[&FP_A]);
        c.insert("t", entry(0, k, None, window(500, 1030), &id("u")), 600);
        assert!(c.get("t", 500, expect(0, k)).is_some());
        assert!(c.get("t", 1029, expect(0, k)).is_some());
        // Before the window (the clock stepped back): refused, but kept.
        assert!(c.get("t", 499, expect(0, k)).is_none());
        assert!(c.get("t", 600, expect(0, k)).is_some());
        // At exp + skew: refused and dropped.
        assert!(c.get("t", 1030, expect(0, k)).is_none());
        assert!(c.is_empty());
        // An entry that is not valid when inserted is not stored.
        c.insert("t", entry(0, k, None, window(500, 1030), &id("u")), 1030);
        c.insert("t", entry(0, k, None, window(500, 1030), &id("u")), 10);
        assert!(c.is_empty());
    }

    #[test]
    fn entries_are_bounded_and_the_least_recently_used_goes_first() {
        let c = WorkerTokenCache::new(4, MAX_BYTES);
        let k = keys(&[&FP_A]);
        for t in ["t0", "t1", "t2", "t3"] {
            c.insert(t, entry(0, k, None, window(0, 2000), &id(t)), 100);
        }
        // t0 used again: t1 is now the least recently used.
        assert!(c.get("t0", 100, expect(0, k)).is_some());
        c.insert("t4", entry(0, k, None, window(0, 2000), &id("t4")), 100);
        assert_eq!(c.len(), 4);
        assert!(c.get("t1", 100, expect(0, k)).is_none());
        for t in ["t0", "t2", "t3", "t4"] {
            assert!(c.get(t, 100, expect(0, k)).is_some(), "{t}");
        }
        // Expired entries are evicted before live ones.
        let c = WorkerTokenCache::new(2, MAX_BYTES);
        c.insert("old", entry(0, k, None, window(0, 150), &id("o")), 100);
        c.insert("live", entry(0, k, None, window(0, 2000), &id("l")), 100);
        assert!(c.get("old", 100, expect(0, k)).is_some(), "most recent use");
        c.insert("new", entry(0, k, None, window(0, 2000), &id("n")), 200);
        assert!(c.get("live", 200, expect(0, k)).is_some());
        assert!(c.get("new", 200, expect(0, k)).is_some());
    }

    #[test]
    fn eviction_frees_an_eighth_at_once_oldest_first() {
        let c = WorkerTokenCache::new(64, MAX_BYTES);
        let k = keys(&[&FP_A]);
        let put = |t: &str| c.insert(t, entry(0, k, None, window(0, 2000), &id("u")), 100);
        for i in 0..64 {
            put(&format!("t{i}"));
        }
        // The first ten are used again: the least recently used are now t10, t11, ...
        for i in 0..10 {
            assert!(c.get(&format!("t{i}"), 100, expect(0, k)).is_some());
        }
        put("new-0");
        assert_eq!(c.len(), 56, "down to 7/8 of the bound, then the new entry");
        for i in 10..19 {
            assert!(c.get(&format!("t{i}"), 100, expect(0, k)).is_none(), "t{i}");
        }
        for i in (0..10).chain(19..64) {
            assert!(c.get(&format!("t{i}"), 100, expect(0, k)).is_some(), "t{i}");
        }
        // A long stream of new tokens never exceeds the bounds.
        for i in 0..5000 {
            put(&format!("stream-{i}"));
            assert!(c.len() <= 64);
        }
        let inner = c.inner.borrow();
        assert!(inner.bytes <= MAX_BYTES);
        assert_eq!(
            inner.bytes,
            inner.map.values().map(|e| e.cost).sum::<usize>()
        );
    }

    #[test]
    fn bytes_are_bounded() {
        let c = WorkerTokenCache::new(1000, 4096);
        let k = keys(&[&FP_A]);
        let big = "x".repeat(5000);
        c.insert(&big, entry(0, k, None, window(0, 2000), &id("u")), 100);
        assert!(c.is_empty(), "larger than the whole budget");
        for i in 0..100 {
            let t = format!("{i:0>1000}");
            c.insert(&t, entry(0, k, None, window(0, 2000), &id("u")), 100);
        }
        let inner = c.inner.borrow();
        assert!(inner.bytes <= 4096, "{}", inner.bytes);
        assert!(!inner.map.is_empty() && inner.map.len() < 4);
        assert_eq!(
            inner.bytes,
            inner.map.values().map(|e| e.cost).sum::<usize>()
        );
    }

    #[test]
    fn replacing_an_entry_keeps_the_byte_count_exact() {
        let c = WorkerTokenCache::default();
        let k = keys(&[&FP_A]);
        c.insert("t", entry(0, k, None, window(0, 2000), &id("a")), 100);
        c.insert(
            "t",
            entry(0, k, None, window(0, 2000), &id("bbbbbbbb")),
            100,
        );
        assert_eq!(c.len(), 1);
        let inner = c.inner.borrow();
        assert_eq!(
            inner.bytes,
            inner.map.values().map(|e| e.cost).sum::<usize>()
        );
    }

    #[test]
    fn more_key_sets_than_recorded_are_not_cacheable() {
        assert!(KeySetIds::new(&[&FP_A, &FP_B, &FP_A]).is_none());
        assert_ne!(keys(&[&FP_A, &FP_B]), keys(&[&FP_B, &FP_A]));
        assert_ne!(keys(&[]), keys(&[&[0; 16]]));
    }
}
