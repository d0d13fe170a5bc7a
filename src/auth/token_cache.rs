//! The verified-token cache, in shared data so every worker benefits from one verification.
//!
//! Keyed by SHA-256 over (provider, key-set fingerprint, the whole token string). Never by
//! signature bytes: ECDSA signatures are malleable, so (r, n-s) would be a second "identity"
//! for the same token, and only the whole string pins header, claims and signature together.
//! The key-set fingerprint means a key rotation never reuses a verdict made with old keys.
//!
//! Shared data has no delete and no TTL, so the cache is a fixed table of `slots` entries
//! (`ag:jwt:<n>`), direct-mapped by the hash; each value holds the rest of the hash and the
//! Unix second the verdict expires (the token's `exp` + skew, capped). A colliding token
//! simply replaces the entry. An entry only ever says "this exact token's signature was
//! checked with these keys": issuer, audience and time are re-checked on every request.

use crate::store::SharedStore;
use sha2::{Digest, Sha256};

/// Default number of slots: enough for the distinct live tokens of a busy API, about 0.5 MB
/// of shared data at Envoy's per-entry overhead.
pub const DEFAULT_SLOTS: u32 = 8192;
/// Longest a verdict is kept, whatever `exp` says (tokens without `exp` use this too).
pub const MAX_TTL_S: u64 = 3600;

const PREFIX: &str = "ag:jwt:";
const FP_LEN: usize = 16;
const VALUE_LEN: usize = FP_LEN + 8;

/// A token's cache identity.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn new(provider: &str, key_fingerprints: &[&[u8; 16]], token: &str) -> CacheKey {
        let mut h = Sha256::new();
        // Length-prefixed so no two different inputs concatenate to the same bytes.
        h.update((provider.len() as u64).to_be_bytes());
        h.update(provider.as_bytes());
        h.update((key_fingerprints.len() as u64).to_be_bytes());
        for fp in key_fingerprints {
            h.update(fp);
        }
        h.update(token.as_bytes());
        CacheKey(h.finalize().into())
    }

    fn slot(&self, slots: u32) -> u32 {
        let n = u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]);
        n % slots.max(1)
    }

    fn tag(&self) -> &[u8] {
        &self.0[4..4 + FP_LEN]
    }
}

/// Writes `ag:jwt:<slot>` into a stack buffer: the lookup happens on every JWT request.
fn slot_name(slot: u32, buf: &mut [u8; 20]) -> &str {
    let prefix = PREFIX.as_bytes();
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 10];
    let mut n = slot;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    std::str::from_utf8(&buf[..prefix.len() + len]).unwrap_or(PREFIX)
}

#[derive(Debug, Clone, Copy)]
pub struct TokenCache {
    slots: u32,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache::new(DEFAULT_SLOTS)
    }
}

impl TokenCache {
    pub fn new(slots: u32) -> TokenCache {
        TokenCache {
            slots: slots.max(1),
        }
    }

    /// Whether this exact token was verified with the same keys and the verdict is current.
    pub fn contains(&self, store: &dyn SharedStore, key: &CacheKey, now_s: u64) -> bool {
        let mut buf = [0u8; 20];
        let name = slot_name(key.slot(self.slots), &mut buf);
        match store.get(name) {
            Some((v, _)) if v.len() == VALUE_LEN => {
                let mut until = [0u8; 8];
                until.copy_from_slice(&v[FP_LEN..]);
                v[..FP_LEN] == *key.tag() && u64::from_be_bytes(until) > now_s
            }
            _ => false,
        }
    }

    /// Records a verified token until `min(valid_until_s, now + MAX_TTL_S)`. Best effort: a
    /// failed write only costs a future re-verification.
    pub fn insert(&self, store: &dyn SharedStore, key: &CacheKey, valid_until_s: u64, now_s: u64) {
        let until = valid_until_s.min(now_s.saturating_add(MAX_TTL_S));
        if until <= now_s {
            return;
        }
        let mut v = [0u8; VALUE_LEN];
        v[..FP_LEN].copy_from_slice(key.tag());
        v[FP_LEN..].copy_from_slice(&until.to_be_bytes());
        let mut buf = [0u8; 20];
        let name = slot_name(key.slot(self.slots), &mut buf);
        let _ = store.set(name, &v, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const FP: [u8; 16] = [7; 16];

    #[test]
    fn slot_names() {
        let mut b = [0u8; 20];
        assert_eq!(slot_name(0, &mut b), "ag:jwt:0");
        assert_eq!(slot_name(8191, &mut b), "ag:jwt:8191");
        assert_eq!(slot_name(u32::MAX, &mut b), "ag:jwt:4294967295");
    }

    #[test]
    fn verdicts_are_kept_until_they_expire() {
        let s = MemoryStore::new();
        let c = TokenCache::new(64);
        let k = CacheKey::new("main", &[&FP], "a.b.c");
        assert!(!c.contains(&s, &k, 100));
        c.insert(&s, &k, 200, 100);
        assert!(c.contains(&s, &k, 199));
        assert!(!c.contains(&s, &k, 200));
        // Capped at MAX_TTL_S, and never stored when already past.
        let k2 = CacheKey::new("main", &[&FP], "a.b.d");
        c.insert(&s, &k2, u64::MAX, 100);
        assert!(c.contains(&s, &k2, 100 + MAX_TTL_S - 1));
        assert!(!c.contains(&s, &k2, 100 + MAX_TTL_S));
        let k3 = CacheKey::new("main", &[&FP], "x.y.z");
        c.insert(&s, &k3, 50, 100);
        assert!(!c.contains(&s, &k3, 10));
    }

    #[test]
    fn key_depends_on_every_input() {
        let base = CacheKey::new("main", &[&FP], "a.b.c");
        assert_ne!(base, CacheKey::new("other", &[&FP], "a.b.c"));
        assert_ne!(base, CacheKey::new("main", &[&[8; 16]], "a.b.c"));
        assert_ne!(base, CacheKey::new("main", &[&FP, &FP], "a.b.c"));
        assert_ne!(base, CacheKey::new("main", &[&FP], "a.b.C"));
        assert_eq!(base, CacheKey::new("main", &[&FP], "a.b.c"));
    }

    #[test]
    fn the_table_is_bounded_and_collisions_replace() {
        let s = MemoryStore::new();
        let c = TokenCache::new(16);
        let keys: Vec<CacheKey> = (0..500)
            .map(|i| CacheKey::new("p", &[&FP], &format!("t{i}")))
            .collect();
        for k in &keys {
            c.insert(&s, k, 1000, 1);
        }
        assert!(s.len() <= 16, "{}", s.len());
        // The last writer of each slot is found; the others are not (no false positives).
        let hits = keys.iter().filter(|k| c.contains(&s, k, 2)).count();
        assert!(hits <= 16 && hits > 0, "{hits}");
        // A corrupt value is a miss, not a panic.
        s.set("ag:jwt:0", b"short", None).unwrap();
        for k in &keys {
            let _ = c.contains(&s, k, 2);
        }
    }
}
