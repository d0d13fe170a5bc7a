//! Storage shared by every worker: the abstraction over Envoy's shared data.
//!
//! Envoy's shared data is a process-wide key/value map with compare-and-swap: every `set`
//! bumps a per-key version (`cas`), and a `set` that names a stale version fails. It has no
//! delete and no TTL, so every user of it keeps a bounded key space (fixed slot tables).
//! Logic takes `&dyn SharedStore` so it runs natively in tests against [`MemoryStore`];
//! the dynamic module (native, in-process) uses [`ProcessStore`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone wrote the key since we read it: re-read and retry.
    CasMismatch,
    /// The host refused the write for another reason.
    Failed,
}

/// A process-wide key/value store with compare-and-swap.
pub trait SharedStore {
    /// The value and its version, or `None` when the key was never written.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;

    /// Writes `value`. With `cas = Some(v)` the write succeeds only if the key's version is
    /// still `v`; with `None` it is unconditional (only safe for idempotent initialisation).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// In-memory store with the same CAS semantics as Envoy's shared data; for tests and the CLI.
#[derive(Default)]
pub struct MemoryStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys ever written: shared data never shrinks, so this is its footprint.
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.map.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut map = self.map.borrow_mut();
        match map.get_mut(key) {
            Some(entry) => {
                if let Some(v) = cas {
                    if v != 0 && v != entry.1 {
                        return Err(StoreError::CasMismatch);
                    }
                }
                entry.0 = value.to_vec();
                entry.1 = entry.1.wrapping_add(1).max(1);
                Ok(())
            }
            None => {
                // As in Envoy (proxy-wasm host `SharedData::set`): a missing key is inserted
                // whatever `cas` says, so creation is never atomic. Pre-create keys instead.
                map.insert(key.to_string(), (value.to_vec(), 1));
                Ok(())
            }
        }
    }
}

/// Shards of [`ProcessStore`]: enough that workers rarely meet on one lock (a request touches
/// a handful of keys, each held for a copy of at most a few KiB).
const SHARDS: usize = 64;

/// Keys a [`ProcessStore`] accepts before it refuses new ones. Every user keeps a fixed,
/// pre-created key space (rate-limit pages, token-cache slots, replay slots, JWKS sets: a few
/// thousand keys at most), so this is a backstop against a bug, not a working limit: Envoy's
/// shared data has no bound at all.
pub const PROCESS_STORE_MAX_KEYS: usize = 1 << 20;

/// One shard: key -> (value, CAS version).
type Shard = Mutex<HashMap<Box<str>, (Vec<u8>, u32)>>;

/// The store of the native dynamic module: process-wide, shared by every worker thread, with
/// exactly [`MemoryStore`]'s (and Envoy shared data's) CAS semantics. Keys are spread over
/// [`SHARDS`] mutexes by hash; no delete, no TTL, as in Envoy.
pub struct ProcessStore {
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
    keys: AtomicUsize,
    max_keys: usize,
}

impl Default for ProcessStore {
    fn default() -> Self {
        Self::with_max_keys(PROCESS_STORE_MAX_KEYS)
    }
}

impl ProcessStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that refuses to create more than `max_keys` keys (tests use small bounds).
    pub fn with_max_keys(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            keys: AtomicUsize::new(0),
            max_keys,
        }
    }

    /// The one store of this process (all filter configs, all workers), as Envoy shared data.
    pub fn global() -> &'static ProcessStore {
        static STORE: std::sync::OnceLock<ProcessStore> = std::sync::OnceLock::new();
        STORE.get_or_init(ProcessStore::new)
    }

    /// Number of keys ever written.
    pub fn len(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> &Shard {
        let mut h = self.hasher.build_hasher();
        h.write(key.as_bytes());
        &self.shards[(h.finish() as usize) % SHARDS]
    }
}

impl SharedStore for ProcessStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        // A poisoned shard (a panic while holding it) still holds consistent entries: every
        // write below is a single assignment.
        let map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).map(|(v, cas)| (v.clone(), *cas))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(key) {
            Some(entry) => {
                if let Some(v) = cas {
                    if v != 0 && v != entry.1 {
                        return Err(StoreError::CasMismatch);
                    }
                }
                entry.0.clear();
                entry.0.extend_from_slice(value);
                entry.1 = entry.1.wrapping_add(1).max(1);
                Ok(())
            }
            None => {
                // As Envoy: a missing key is inserted whatever `cas` says.
                if self.keys.fetch_add(1, Ordering::Relaxed) >= self.max_keys {
                    self.keys.fetch_sub(1, Ordering::Relaxed);
                    return Err(StoreError::Failed);
                }
                map.insert(key.into(), (value.to_vec(), 1));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rejects_stale_writes() {
        let s = MemoryStore::new();
        assert!(s.get("k").is_none());
        s.set("k", b"a", None).unwrap();
        let (v, cas) = s.get("k").unwrap();
        assert_eq!(v, b"a");
        s.set("k", b"b", Some(cas)).unwrap();
        assert_eq!(s.set("k", b"c", Some(cas)), Err(StoreError::CasMismatch));
        assert_eq!(s.get("k").unwrap().0, b"b");
        assert_eq!(s.set("missing", b"x", Some(7)), Ok(()));
    }

    #[test]
    fn process_store_has_the_same_cas_semantics() {
        let s = ProcessStore::new();
        assert!(s.get("k").is_none());
        s.set("k", b"a", None).unwrap();
        let (v, cas) = s.get("k").unwrap();
        assert_eq!((v.as_slice(), cas), (b"a".as_slice(), 1));
        s.set("k", b"b", Some(cas)).unwrap();
        assert_eq!(s.set("k", b"c", Some(cas)), Err(StoreError::CasMismatch));
        assert_eq!(s.get("k").unwrap(), (b"b".to_vec(), 2));
        // cas 0 is unconditional, as in Envoy.
        s.set("k", b"d", Some(0)).unwrap();
        assert_eq!(s.get("k").unwrap(), (b"d".to_vec(), 3));
        assert_eq!(s.set("missing", b"x", Some(7)), Ok(()));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn process_store_refuses_keys_past_its_bound_but_updates_existing_ones() {
        let s = ProcessStore::with_max_keys(2);
        s.set("a", b"1", None).unwrap();
        s.set("b", b"1", None).unwrap();
        assert_eq!(s.set("c", b"1", None), Err(StoreError::Failed));
        assert!(s.get("c").is_none());
        s.set("a", b"2", Some(1)).unwrap();
        assert_eq!(s.get("a").unwrap(), (b"2".to_vec(), 2));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn process_store_cas_is_exact_across_threads() {
        // Eight threads each add 1 to one counter 500 times through CAS retries: no update
        // may be lost, which is what token buckets rely on.
        let s = std::sync::Arc::new(ProcessStore::new());
        s.set("n", &0u64.to_le_bytes(), None).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        loop {
                            let (v, cas) = s.get("n").unwrap();
                            let n = u64::from_le_bytes(v.try_into().unwrap()) + 1;
                            if s.set("n", &n.to_le_bytes(), Some(cas)).is_ok() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (v, _) = s.get("n").unwrap();
        assert_eq!(u64::from_le_bytes(v.try_into().unwrap()), 4000);
    }
}
