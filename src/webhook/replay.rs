//! Replay memory for webhooks, shared by all workers through Envoy shared data.
//!
//! Shared data has no delete and no TTL, so the memory is a fixed table per webhook:
//! `ceil(replay_capacity / 8)` slots, each one shared-data key holding up to 8 entries of
//! (16-byte fingerprint, expiry in Unix seconds). A fingerprint picks its slot; an entry is
//! live while `now <= expiry`, and dead entries are dropped whenever their slot is written.
//! Check-and-record is one read and one compare-and-swap write of that slot, retried on a
//! conflict, so two workers racing with the same delivery cannot both accept it.
//!
//! Only verified deliveries are recorded, so a forger cannot fill the table. If legitimate
//! traffic does fill a slot, the entry closest to expiry is forgotten early and the caller is
//! told, so the filter can log that `replay_capacity` is too small.

use crate::store::{SharedStore, StoreError};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// A delivery's identity in the replay memory: a truncated SHA-256 of what identifies it.
pub type Fingerprint = [u8; 16];

/// Entries per slot (one shared-data value).
pub const ENTRIES_PER_SLOT: usize = 8;
const ENTRY_BYTES: usize = 16 + 8;
/// Compare-and-swap attempts before giving up; conflicts need two deliveries for the same
/// slot in the same microseconds, so this is rarely more than one.
const MAX_ATTEMPTS: usize = 16;

/// Hashes a tagged identifier into a fingerprint (128 bits: collisions are not a concern).
pub fn fingerprint(tag: u8, material: &[u8]) -> Fingerprint {
    let digest = Sha256::new()
        .chain_update([tag])
        .chain_update(material)
        .finalize();
    let mut fp = [0u8; 16];
    fp.copy_from_slice(&digest[..16]);
    fp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// The fingerprint is live in the memory.
    Replayed,
    /// The slot could not be written (persistent conflicts or a host failure).
    Unavailable,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplayError::Replayed => "seen before within the window",
            ReplayError::Unavailable => "replay memory could not be updated",
        })
    }
}

/// The outcome of recording a fresh fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// A live entry was forgotten early to make room.
    pub evicted: bool,
}

/// One webhook's slot table.
#[derive(Debug, Clone)]
pub struct ReplayTable {
    prefix: Arc<str>,
    slots: u32,
}

impl ReplayTable {
    /// A table for `webhook` holding at least `capacity` entries.
    pub fn new(webhook: &str, capacity: u32) -> Self {
        let slots = capacity.div_ceil(ENTRIES_PER_SLOT as u32).max(1);
        Self {
            prefix: Arc::from(format!("ag:webhook:replay:{webhook}:")),
            slots,
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub(crate) fn key(&self, slot: u32) -> String {
        format!("{}{slot}", self.prefix)
    }

    fn slot_of(&self, fp: &Fingerprint) -> u32 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&fp[..8]);
        (u64::from_le_bytes(b) % u64::from(self.slots)) as u32
    }

    /// Creates every slot that does not exist yet (an empty value). Run once at configure
    /// time: a missing key is written unconditionally by the host, so creating it while
    /// requests race could lose an entry.
    pub fn prepare(&self, store: &dyn SharedStore) {
        for slot in 0..self.slots {
            let key = self.key(slot);
            if store.get(&key).is_none() {
                // Nothing to do on failure: `check_and_record` copes with a missing slot.
                let _ = store.set(&key, &[], None);
            }
        }
    }

    /// Fails with `Replayed` if `fp` is live; otherwise records it until `expires_s`.
    pub fn check_and_record(
        &self,
        store: &dyn SharedStore,
        fp: &Fingerprint,
        expires_s: u64,
        now_s: u64,
    ) -> Result<Recorded, ReplayError> {
        let key = self.key(self.slot_of(fp));
        for _ in 0..MAX_ATTEMPTS {
            let (value, cas) = match store.get(&key) {
                Some((v, c)) => (v, Some(c)),
                None => (Vec::new(), None),
            };
            // A value of the wrong shape (another version's layout) is treated as empty.
            let entries = value.chunks_exact(ENTRY_BYTES).take(ENTRIES_PER_SLOT);
            let mut live: Vec<(&[u8], u64)> = Vec::with_capacity(ENTRIES_PER_SLOT);
            for e in entries {
                let (efp, exp) = e.split_at(16);
                let mut b = [0u8; 8];
                b.copy_from_slice(exp);
                let expiry = u64::from_le_bytes(b);
                if now_s > expiry {
                    continue;
                }
                if efp == fp.as_slice() {
                    return Err(ReplayError::Replayed);
                }
                live.push((efp, expiry));
            }
            let mut evicted = false;
            if live.len() >= ENTRIES_PER_SLOT {
                if let Some(i) = live
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, (_, exp))| *exp)
                    .map(|(i, _)| i)
                {
                    live.swap_remove(i);
                    evicted = true;
                }
            }
            let mut out = Vec::with_capacity((live.len() + 1) * ENTRY_BYTES);
            for (efp, exp) in &live {
                out.extend_from_slice(efp);
                out.extend_from_slice(&exp.to_le_bytes());
            }
            out.extend_from_slice(fp);
            out.extend_from_slice(&expires_s.to_le_bytes());
            match store.set(&key, &out, cas) {
                Ok(()) => return Ok(Recorded { evicted }),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return Err(ReplayError::Unavailable),
            }
        }
        Err(ReplayError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::cell::Cell;

    fn fp(n: u32) -> Fingerprint {
        fingerprint(b't', &n.to_le_bytes())
    }

    #[test]
    fn a_fingerprint_is_refused_while_live_and_accepted_after_expiry() {
        let store = MemoryStore::new();
        let t = ReplayTable::new("hook", 64);
        t.prepare(&store);
        assert_eq!(store.len(), 8);
        let f = fp(1);
        assert_eq!(
            t.check_and_record(&store, &f, 1300, 1000),
            Ok(Recorded { evicted: false })
        );
        assert_eq!(
            t.check_and_record(&store, &f, 1300, 1000),
            Err(ReplayError::Replayed)
        );
        // Live up to and including its expiry second.
        assert_eq!(
            t.check_and_record(&store, &f, 1600, 1300),
            Err(ReplayError::Replayed)
        );
        assert!(t.check_and_record(&store, &f, 1601, 1301).is_ok());
        assert_eq!(store.len(), 8, "the table never grows");
    }

    #[test]
    fn tables_of_different_webhooks_are_separate() {
        let store = MemoryStore::new();
        let a = ReplayTable::new("a", 64);
        let b = ReplayTable::new("b", 64);
        assert!(a.check_and_record(&store, &fp(1), 100, 0).is_ok());
        assert!(b.check_and_record(&store, &fp(1), 100, 0).is_ok());
        assert_eq!(
            a.check_and_record(&store, &fp(1), 100, 0),
            Err(ReplayError::Replayed)
        );
    }

    #[test]
    fn a_full_slot_forgets_the_entry_closest_to_expiry_and_says_so() {
        let store = MemoryStore::new();
        let t = ReplayTable::new("hook", 8); // one slot
        assert_eq!(t.slots(), 1);
        for i in 0..8u32 {
            let r = t.check_and_record(&store, &fp(i), 1000 + u64::from(i), 0);
            assert_eq!(r, Ok(Recorded { evicted: false }));
        }
        assert_eq!(
            t.check_and_record(&store, &fp(100), 2000, 0),
            Ok(Recorded { evicted: true })
        );
        // fp(0) expired soonest and was dropped; the others are still remembered.
        assert!(t.check_and_record(&store, &fp(0), 2000, 0).is_ok());
        for i in 2..8u32 {
            assert_eq!(
                t.check_and_record(&store, &fp(i), 2000, 0),
                Err(ReplayError::Replayed),
                "{i}"
            );
        }
        let (v, _) = store.get("ag:webhook:replay:hook:0").unwrap();
        assert_eq!(v.len(), 8 * ENTRY_BYTES);
    }

    #[test]
    fn dead_entries_make_room_without_eviction() {
        let store = MemoryStore::new();
        let t = ReplayTable::new("hook", 8);
        for i in 0..8u32 {
            t.check_and_record(&store, &fp(i), 10, 0).unwrap();
        }
        assert_eq!(
            t.check_and_record(&store, &fp(50), 100, 11),
            Ok(Recorded { evicted: false })
        );
        let (v, _) = store.get("ag:webhook:replay:hook:0").unwrap();
        assert_eq!(v.len(), ENTRY_BYTES);
    }

    #[test]
    fn garbage_in_a_slot_is_treated_as_empty() {
        let store = MemoryStore::new();
        let t = ReplayTable::new("hook", 8);
        store
            .set("ag:webhook:replay:hook:0", &[0xff; 7], None)
            .unwrap();
        assert!(t.check_and_record(&store, &fp(1), 10, 0).is_ok());
        store
            .set("ag:webhook:replay:hook:0", &vec![0xff; 10_000], None)
            .unwrap();
        assert!(t.check_and_record(&store, &fp(1), 10, 0).is_ok());
    }

    /// A store where another worker writes the same key between our read and our write,
    /// `races` times.
    struct RacingStore {
        inner: MemoryStore,
        races: Cell<usize>,
        rival: Box<dyn Fn(&MemoryStore)>,
    }

    impl SharedStore for RacingStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            let got = self.inner.get(key);
            if self.races.get() > 0 {
                self.races.set(self.races.get() - 1);
                (self.rival)(&self.inner);
            }
            got
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn a_concurrent_record_of_the_same_delivery_wins_and_ours_is_a_replay() {
        let t = ReplayTable::new("hook", 8);
        let rival_table = t.clone();
        let store = RacingStore {
            inner: MemoryStore::new(),
            races: Cell::new(1),
            rival: Box::new(move |s| {
                rival_table.check_and_record(s, &fp(7), 100, 0).unwrap();
            }),
        };
        t.prepare(&store.inner);
        assert_eq!(
            t.check_and_record(&store, &fp(7), 100, 0),
            Err(ReplayError::Replayed)
        );
    }

    #[test]
    fn a_concurrent_write_of_another_entry_is_kept_after_retry() {
        let t = ReplayTable::new("hook", 8);
        let rival_table = t.clone();
        let store = RacingStore {
            inner: MemoryStore::new(),
            races: Cell::new(1),
            rival: Box::new(move |s| {
                rival_table.check_and_record(s, &fp(8), 100, 0).unwrap();
            }),
        };
        t.prepare(&store.inner);
        assert!(t.check_and_record(&store, &fp(7), 100, 0).is_ok());
        assert_eq!(
            t.check_and_record(&store.inner, &fp(8), 100, 0),
            Err(ReplayError::Replayed)
        );
        assert_eq!(
            t.check_and_record(&store.inner, &fp(7), 100, 0),
            Err(ReplayError::Replayed)
        );
    }

    #[test]
    fn endless_conflicts_fail_closed() {
        let t = ReplayTable::new("hook", 8);
        let store = RacingStore {
            inner: MemoryStore::new(),
            races: Cell::new(usize::MAX),
            rival: Box::new(|s| {
                let k = "ag:webhook:replay:hook:0";
                let v = s.get(k).map(|x| x.0).unwrap_or_default();
                s.set(k, &v, None).unwrap();
            }),
        };
        t.prepare(&store.inner);
        assert_eq!(
            t.check_and_record(&store, &fp(1), 100, 0),
            Err(ReplayError::Unavailable)
        );
    }
}
