//! Storage shared by every worker: the abstraction over Envoy's shared data.
//!
//! Envoy's shared data is a process-wide key/value map with compare-and-swap: every `set`
//! bumps a per-key version (`cas`), and a `set` that names a stale version fails. It has no
//! delete and no TTL, so every user of it keeps a bounded key space (fixed slot tables).
//! Logic takes `&dyn SharedStore` so it runs natively in tests against [`MemoryStore`].

use std::cell::RefCell;
use std::collections::HashMap;

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
}
