//! Remote JWKS: the state shared by all workers, and when to fetch.
//!
//! Shared data per provider (prefix `ag:jwks:<name>:<hash of cluster+path>`):
//! - `…:meta`, 40 bytes: generation, fetched_ms, lease_until_ms, last_attempt_ms,
//!   last_kid_fetch_ms (big-endian u64s). Updated with CAS, so one worker wins a lease.
//! - `…:body`: generation (8 bytes) + the last good JWKS document. Never overwritten by a
//!   failed fetch, so the last good set survives an IdP outage.
//!
//! Who fetches: the root context of any worker, on its tick, when a refresh is due and it wins
//! the lease (so one fetch serves every worker); a request whose token names a `kid` the set
//! lacks, at most once per [`KID_REFETCH_MS`] across all workers (rotation); and a request that
//! arrives before any set was fetched, which fetches for itself and waits (bounded by
//! `timeout_ms`; at most [`MAX_WAITER_FETCHES`] such fetches in flight per worker).
//! Each worker parses a new set once per generation and keeps it ([`RemoteCache`]).

use super::jwks::{self, AlgSet, KeySet, Source};
use super::{Authenticator, RemoteKeys};
use crate::store::SharedStore;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// A failed or refused fetch is retried after this long (not every tick).
pub const RETRY_MS: u64 = 2_000;
/// Unknown-`kid` refetches: at most one per this period, across all workers.
pub const KID_REFETCH_MS: u64 = 5_000;
/// A worker re-reads the shared generation at most this often (one host call).
pub const CHECK_MS: u64 = 1_000;
/// Largest JWKS document accepted.
pub const MAX_BODY: usize = 256 * 1024;
/// Requests fetching for themselves before the first set arrived, per worker.
pub const MAX_WAITER_FETCHES: u32 = 8;

const META_LEN: usize = 40;

/// The shared-data key prefix of a provider's remote set.
pub fn prefix(name: &str, cluster: &str, authority: Option<&str>, path: &str) -> String {
    let mut h = Sha256::new();
    for part in [cluster, authority.unwrap_or(""), path] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    let tag: String = d[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("ag:jwks:{name}:{tag}")
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    pub generation: u64,
    pub fetched_ms: u64,
    pub lease_until_ms: u64,
    pub last_attempt_ms: u64,
    pub last_kid_fetch_ms: u64,
}

impl Meta {
    fn encode(&self) -> [u8; META_LEN] {
        let mut b = [0u8; META_LEN];
        for (i, v) in [
            self.generation,
            self.fetched_ms,
            self.lease_until_ms,
            self.last_attempt_ms,
            self.last_kid_fetch_ms,
        ]
        .iter()
        .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Meta {
        let f = |i: usize| {
            b.get(i * 8..i * 8 + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map_or(0, u64::from_be_bytes)
        };
        Meta {
            generation: f(0),
            fetched_ms: f(1),
            lease_until_ms: f(2),
            last_attempt_ms: f(3),
            last_kid_fetch_ms: f(4),
        }
    }
}

fn read_meta(store: &dyn SharedStore, prefix: &str) -> (Meta, Option<u32>) {
    match store.get(&format!("{prefix}:meta")) {
        Some((v, cas)) => (Meta::decode(&v), Some(cas)),
        None => (Meta::default(), None),
    }
}

/// Creates the meta key so later CAS updates are real compare-and-swaps (Envoy inserts a
/// missing key whatever CAS says). Called once per worker from `on_configure`.
pub fn prepare(auth: &Authenticator, store: &dyn SharedStore) {
    for p in &auth.providers {
        if let Some(prefix) = &p.remote_prefix {
            let key = format!("{prefix}:meta");
            if store.get(&key).is_none() {
                let _ = store.set(&key, &Meta::default().encode(), None);
            }
        }
    }
}

/// Why a fetch is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Periodic refresh (or the first fetch), from a root context's tick.
    Refresh,
    /// A token names a `kid` the current set lacks.
    UnknownKid,
}

/// Claims the right to fetch, with CAS so only one worker wins. The lease lasts the fetch's
/// timeout; a crashed fetcher's lease simply expires.
pub fn try_lease(
    store: &dyn SharedStore,
    prefix: &str,
    refresh_s: u64,
    timeout_ms: u64,
    now_ms: u64,
    reason: Reason,
) -> bool {
    let (mut m, cas) = read_meta(store, prefix);
    let Some(cas) = cas else { return false };
    if m.lease_until_ms > now_ms {
        return false;
    }
    let ok = match reason {
        Reason::Refresh => {
            let due = m.fetched_ms == 0
                || now_ms.saturating_sub(m.fetched_ms) >= refresh_s.saturating_mul(1000);
            due && now_ms.saturating_sub(m.last_attempt_ms) >= RETRY_MS
        }
        Reason::UnknownKid => now_ms.saturating_sub(m.last_kid_fetch_ms) >= KID_REFETCH_MS,
    };
    if !ok {
        return false;
    }
    m.lease_until_ms = now_ms.saturating_add(timeout_ms);
    m.last_attempt_ms = now_ms;
    if reason == Reason::UnknownKid {
        m.last_kid_fetch_ms = now_ms;
    }
    store
        .set(&format!("{prefix}:meta"), &m.encode(), Some(cas))
        .is_ok()
}

/// Records a fetch's outcome. `body` is `Some` for an HTTP 200; it becomes the new set only
/// when it parses with at least one usable key. Returns the parse error otherwise.
pub fn store_result(
    store: &dyn SharedStore,
    prefix: &str,
    algorithms: AlgSet,
    body: Option<&[u8]>,
    now_ms: u64,
) -> Result<usize, String> {
    let parsed = match body {
        None => Err("fetch failed".to_string()),
        Some(b) if b.len() > MAX_BODY => Err(format!("JWKS is larger than {MAX_BODY} bytes")),
        Some(b) => serde_json::from_slice::<Value>(b)
            .map_err(|e| format!("JWKS is not JSON: {e}"))
            .and_then(|doc| {
                jwks::parse(&doc, algorithms, Source::Remote).map_err(|e| e.to_string())
            })
            .and_then(|p| {
                if p.keys.is_empty() {
                    Err("JWKS has no keys".to_string())
                } else {
                    Ok(p.keys.len())
                }
            }),
    };
    // CAS loop: another worker may be updating the same meta.
    for _ in 0..8 {
        let (mut m, cas) = read_meta(store, prefix);
        m.lease_until_ms = 0;
        m.last_attempt_ms = now_ms;
        if let (Ok(_), Some(b)) = (&parsed, body) {
            m.generation = m.generation.wrapping_add(1);
            m.fetched_ms = now_ms;
            let mut v = Vec::with_capacity(8 + b.len());
            v.extend_from_slice(&m.generation.to_be_bytes());
            v.extend_from_slice(b);
            // The body first: a reader that sees the new generation finds its body.
            if store.set(&format!("{prefix}:body"), &v, None).is_err() {
                return Err("shared data refused the JWKS".into());
            }
        }
        if store
            .set(&format!("{prefix}:meta"), &m.encode(), cas)
            .is_ok()
        {
            break;
        }
    }
    parsed
}

#[derive(Debug, Clone, Default)]
struct Entry {
    generation: u64,
    checked_ms: u64,
    keys: Option<Rc<KeySet>>,
}

/// A worker's parsed copies of the remote sets (one VM is single-threaded: `RefCell`).
#[derive(Debug, Clone, Default)]
pub struct RemoteCache {
    entries: RefCell<Vec<Entry>>,
    waiter_fetches: Cell<u32>,
}

/// The remote sets for one request.
pub struct Loaded {
    sets: Vec<Option<Rc<KeySet>>>,
}

impl RemoteKeys for Loaded {
    fn keys(&self, provider: usize) -> Option<&KeySet> {
        self.sets.get(provider).and_then(|s| s.as_deref())
    }
}

impl Authenticator {
    /// The current remote sets, re-reading shared data when the last check is older than
    /// [`CHECK_MS`] (or `force`, after a fetch this request waited for).
    pub fn remote_keys(&self, store: &dyn SharedStore, now_ms: u64, force: bool) -> Loaded {
        if !self.has_remote_jwks() {
            // Local keys only (the common case): nothing to read, nothing to allocate.
            return Loaded { sets: Vec::new() };
        }
        let mut entries = self.remote.entries.borrow_mut();
        if entries.len() != self.providers.len() {
            entries.resize(self.providers.len(), Entry::default());
        }
        let mut sets = Vec::with_capacity(self.providers.len());
        for (p, e) in self.providers.iter().zip(entries.iter_mut()) {
            let Some(prefix) = &p.remote_prefix else {
                sets.push(None);
                continue;
            };
            if force || e.keys.is_none() || now_ms.saturating_sub(e.checked_ms) >= CHECK_MS {
                e.checked_ms = now_ms;
                let (m, _) = read_meta(store, prefix);
                if m.generation != 0 && m.generation != e.generation {
                    if let Some((body, _)) = store.get(&format!("{prefix}:body")) {
                        let gen = body
                            .get(..8)
                            .and_then(|s| <[u8; 8]>::try_from(s).ok())
                            .map_or(0, u64::from_be_bytes);
                        let doc = body
                            .get(8..)
                            .and_then(|b| serde_json::from_slice::<Value>(b).ok());
                        if let Some(Ok(parsed)) =
                            doc.map(|d| jwks::parse(&d, p.rules.algorithms, Source::Remote))
                        {
                            e.generation = gen;
                            e.keys = Some(Rc::new(parsed.keys));
                        }
                    }
                }
            }
            sets.push(e.keys.clone());
        }
        Loaded { sets }
    }

    /// The generation of this worker's copy of a provider's remote set (0: none loaded).
    pub fn remote_generation(&self, provider: usize) -> u64 {
        self.remote
            .entries
            .borrow()
            .get(provider)
            .map_or(0, |e| e.generation)
    }

    /// After a refusal that wants keys: whether this request should fetch and wait. Unknown
    /// `kid` with a set loaded: only if it wins the shared, rate-limited refetch. No set yet:
    /// if this worker has fewer than [`MAX_WAITER_FETCHES`] such fetches in flight.
    pub fn should_fetch(
        &self,
        provider: usize,
        e: &super::AuthError,
        store: &dyn SharedStore,
        now_ms: u64,
    ) -> bool {
        let Some(p) = self.providers.get(provider) else {
            return false;
        };
        let (Some(prefix), Some(r)) = (&p.remote_prefix, &p.remote) else {
            return false;
        };
        match e {
            super::AuthError::InvalidToken {
                error: super::JwtError::UnknownKid,
                ..
            } => try_lease(
                store,
                prefix,
                r.refresh_s,
                r.timeout_ms,
                now_ms,
                Reason::UnknownKid,
            ),
            _ => {
                let n = self.remote.waiter_fetches.get();
                if n >= MAX_WAITER_FETCHES {
                    return false;
                }
                self.remote.waiter_fetches.set(n + 1);
                true
            }
        }
    }

    /// The glue reports that a waiter fetch (`Wait::Jwks { waiter: true }`) finished.
    pub fn waiter_fetch_done(&self) {
        let n = self.remote.waiter_fetches.get();
        self.remote.waiter_fetches.set(n.saturating_sub(1));
    }

    /// What the glue needs to fetch a provider's set: (cluster, authority, path, timeout_ms).
    pub fn fetch_target(&self, provider: usize) -> Option<(&str, &str, &str, u64)> {
        let p = self.providers.get(provider)?;
        let r = p.remote.as_ref()?;
        Some((
            r.cluster.as_str(),
            r.authority.as_deref().unwrap_or(r.cluster.as_str()),
            r.path.as_str(),
            r.timeout_ms,
        ))
    }

    /// Stores a fetch's outcome for `provider` (see [`store_result`]).
    pub fn fetch_finished(
        &self,
        provider: usize,
        store: &dyn SharedStore,
        body: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<usize, String> {
        let p = self.providers.get(provider).ok_or("no such provider")?;
        let prefix = p
            .remote_prefix
            .as_deref()
            .ok_or("provider has no remote_jwks")?;
        store_result(store, prefix, p.rules.algorithms, body, now_ms)
    }

    /// Providers whose periodic refresh this worker should fetch now (it won the lease).
    pub fn refreshes_due(&self, store: &dyn SharedStore, now_ms: u64) -> Vec<usize> {
        self.providers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let (prefix, r) = (p.remote_prefix.as_deref()?, p.remote.as_ref()?);
                try_lease(
                    store,
                    prefix,
                    r.refresh_s,
                    r.timeout_ms,
                    now_ms,
                    Reason::Refresh,
                )
                .then_some(i)
            })
            .collect()
    }

    pub fn has_remote_jwks(&self) -> bool {
        self.providers.iter().any(|p| p.remote.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::mint::SigningKey;
    use crate::auth::{AuthError, Credentials, NoRemoteKeys};
    use crate::config::{AuthConfig, RawConfig};
    use crate::store::MemoryStore;
    use serde_json::json;

    fn auth() -> Authenticator {
        let raw: RawConfig = serde_json::from_value(json!({"jwt_providers": {"idp": {
            "algorithms": ["ES256"],
            "remote_jwks": {"cluster": "idp", "path": "/jwks.json", "refresh_s": 60, "timeout_ms": 500}}}}))
        .unwrap();
        Authenticator::compile(&raw, &|_| None).unwrap()
    }

    fn route() -> AuthConfig {
        AuthConfig {
            mode: "required".into(),
            methods: vec!["jwt:idp".into()],
            scopes_all: vec![],
            scopes_any: vec![],
            roles_any: vec![],
        }
    }

    #[test]
    fn one_lease_at_a_time_and_refresh_schedule() {
        let a = auth();
        let s = MemoryStore::new();
        prepare(&a, &s);
        let prefix = a.providers[0].remote_prefix.clone().unwrap();
        let t = 1_000_000;
        assert!(try_lease(&s, &prefix, 60, 500, t, Reason::Refresh));
        // Another worker, same moment: the lease is taken.
        assert!(!try_lease(&s, &prefix, 60, 500, t, Reason::Refresh));
        assert!(!try_lease(&s, &prefix, 60, 500, t, Reason::UnknownKid));
        // The fetch fails: nothing stored, retried after RETRY_MS, not before.
        assert!(store_result(&s, &prefix, a.providers[0].rules.algorithms, None, t + 10).is_err());
        assert!(!try_lease(&s, &prefix, 60, 500, t + 100, Reason::Refresh));
        assert!(try_lease(
            &s,
            &prefix,
            60,
            500,
            t + 10 + RETRY_MS,
            Reason::Refresh
        ));
        let key = SigningKey::generate("ES256", "k1").unwrap();
        let body = json!({"keys": [key.jwk()]}).to_string();
        let t2 = t + 10 + RETRY_MS + 5;
        assert_eq!(
            store_result(
                &s,
                &prefix,
                a.providers[0].rules.algorithms,
                Some(body.as_bytes()),
                t2
            ),
            Ok(1)
        );
        // Fresh: no refresh until refresh_s has passed.
        assert!(!try_lease(
            &s,
            &prefix,
            60,
            500,
            t2 + 59_000,
            Reason::Refresh
        ));
        assert!(try_lease(
            &s,
            &prefix,
            60,
            500,
            t2 + 60_000,
            Reason::Refresh
        ));
    }

    #[test]
    fn failed_or_bad_fetches_keep_the_last_good_set() {
        let a = auth();
        let s = MemoryStore::new();
        prepare(&a, &s);
        let prefix = a.providers[0].remote_prefix.clone().unwrap();
        let algs = a.providers[0].rules.algorithms;
        let key = SigningKey::generate("ES256", "k1").unwrap();
        let good = json!({"keys": [key.jwk()]}).to_string();
        store_result(&s, &prefix, algs, Some(good.as_bytes()), 1_000).unwrap();
        for bad in [
            &b"not json"[..],
            b"{}",
            b"{\"keys\":[]}",
            b"{\"keys\":[{\"kty\":\"oct\",\"k\":\"AA\"}]}",
        ] {
            assert!(store_result(&s, &prefix, algs, Some(bad), 2_000).is_err());
        }
        assert!(store_result(&s, &prefix, algs, None, 3_000).is_err());
        let loaded = a.remote_keys(&s, 4_000, true);
        assert_eq!(loaded.keys(0).map(|k| k.len()), Some(1));
        // And a token signed by that key verifies through the authenticator.
        let token = key
            .sign(
                &json!({"sub": "u", "exp": 10_000})
                    .as_object()
                    .cloned()
                    .unwrap(),
            )
            .unwrap();
        let h = format!("Bearer {token}");
        let c = Credentials {
            authorization: Some(&h),
            ..Default::default()
        };
        assert!(a.authenticate(&route(), &c, &loaded, 4_000, &s).is_ok());
        assert!(a
            .authenticate(&route(), &c, &NoRemoteKeys, 4_000, &s)
            .is_err());
    }

    #[test]
    fn workers_pick_up_new_generations_and_kid_refetches_are_rate_limited() {
        const T: u64 = 1_700_000_000_000;
        let a = auth();
        let worker2 = a.clone();
        let s = MemoryStore::new();
        prepare(&a, &s);
        let prefix = a.providers[0].remote_prefix.clone().unwrap();
        let algs = a.providers[0].rules.algorithms;
        let k1 = SigningKey::generate("ES256", "k1").unwrap();
        let k2 = SigningKey::generate("ES256", "k2").unwrap();
        store_result(
            &s,
            &prefix,
            algs,
            Some(json!({"keys": [k1.jwk()]}).to_string().as_bytes()),
            T + 1_000,
        )
        .unwrap();
        assert_eq!(
            worker2
                .remote_keys(&s, T + 1_000, false)
                .keys(0)
                .map(|k| k.len()),
            Some(1)
        );
        assert_eq!(
            a.remote_keys(&s, T + 1_000, false).keys(0).map(|k| k.len()),
            Some(1)
        );
        // A token with kid k2: unknown kid, which wins one refetch, then is rate-limited.
        let t2 = k2
            .sign(
                &json!({"sub": "u", "exp": 2_000_000_000u64})
                    .as_object()
                    .cloned()
                    .unwrap(),
            )
            .unwrap();
        let h = format!("Bearer {t2}");
        let c = Credentials {
            authorization: Some(&h),
            ..Default::default()
        };
        let e = worker2
            .authenticate(
                &route(),
                &c,
                &worker2.remote_keys(&s, T + 2_000, false),
                T + 2_000,
                &s,
            )
            .unwrap_err();
        assert!(matches!(
            e,
            AuthError::InvalidToken {
                error: crate::auth::JwtError::UnknownKid,
                ..
            }
        ));
        assert!(worker2.should_fetch(0, &e, &s, T + 2_000));
        assert!(
            !a.should_fetch(0, &e, &s, T + 2_100),
            "another worker, same period"
        );
        store_result(
            &s,
            &prefix,
            algs,
            Some(json!({"keys": [k1.jwk(), k2.jwk()]}).to_string().as_bytes()),
            T + 2_200,
        )
        .unwrap();
        assert!(!a.should_fetch(0, &e, &s, T + 2_000 + KID_REFETCH_MS - 1));
        assert!(a.should_fetch(0, &e, &s, T + 2_000 + KID_REFETCH_MS));
        // Within CHECK_MS a worker keeps its copy; forced (after its own fetch) it reloads.
        assert_eq!(
            a.remote_keys(&s, T + 1_500, false).keys(0).map(|k| k.len()),
            Some(1)
        );
        assert_eq!(
            a.remote_keys(&s, T + 2_300, true).keys(0).map(|k| k.len()),
            Some(2)
        );
        assert!(a
            .authenticate(
                &route(),
                &c,
                &a.remote_keys(&s, T + 2_300, false),
                T + 2_300,
                &s
            )
            .is_ok());
    }

    #[test]
    fn waiter_fetches_are_bounded_per_worker() {
        let a = auth();
        let s = MemoryStore::new();
        let e = AuthError::InvalidToken {
            provider: 0,
            error: crate::auth::JwtError::KeysUnavailable,
        };
        for _ in 0..MAX_WAITER_FETCHES {
            assert!(a.should_fetch(0, &e, &s, 1));
        }
        assert!(!a.should_fetch(0, &e, &s, 1));
        a.waiter_fetch_done();
        assert!(a.should_fetch(0, &e, &s, 1));
    }
}
