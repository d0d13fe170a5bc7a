//! Bounded slot tables in shared data: where the buckets live.
//!
//! Envoy's shared data has no delete and no TTL, so one key per client would grow without
//! bound under IP rotation. Each limit instead owns a fixed table of `pages` shared-data keys
//! (`ag:rl:<limit>:<page>`), each value packing [`WAYS`] slots. A bucket key is hashed
//! (by the caller) to 64 bits: the high bits pick its page, the whole hash is the fingerprint
//! stored in the slot. The key may sit in any slot of its page (set-associative).
//!
//! Why pages of several slots rather than one slot per shared-data key: the key's candidate
//! slots are all in one value, so a decision is one `get` and one CAS `set` (a one-slot-per-key
//! design with k candidates needs up to k `get`s, and inserting into one of several keys cannot
//! be made atomic, so a key could end up with two buckets). A CAS on a page also guarantees a
//! key is never in two slots. The price is contention between different keys of one page;
//! with P pages, two concurrent requests for different keys collide with probability 1/P,
//! and a collision costs one re-read. Envoy's per-entry overhead (key string, map node) is
//! paid once per page instead of once per slot.
//!
//! Takeover rule: a slot holding another key may be reused only when that key's bucket is
//! full, which is exactly the state a fresh bucket starts in, so evicting a client never gives
//! it (or anyone) extra tokens. When no slot of the page is free the caller applies its
//! `when_full` policy and counts it as slot pressure.
//!
//! Memory: a page value is [`PAGE_BYTES`] bytes (1 version byte + 8 slots x 24 bytes:
//! fingerprint u64, full_at_ms u64, sub-ms remainder or window count u32, previous window's
//! count u32, little-endian). With Envoy's map node and key string, measured on Envoy 1.40
//! with the earlier 20-byte slots: 1,048,576 slots added 35 MiB of RSS, about 35 bytes per
//! slot; the 4 bytes of the sliding window's second count make that about 39. The default of
//! [`DEFAULT_SLOTS`] slots per limit is 2048 pages, about 0.6 MiB per limit, for every worker
//! together (shared data is process-wide).

use super::bucket::BucketState;
use crate::store::{SharedStore, StoreError};

/// Slots per page (shared-data value).
pub const WAYS: usize = 8;
/// Bytes per slot in a page value.
pub const SLOT_BYTES: usize = 24;
/// Bytes of one page value.
pub const PAGE_BYTES: usize = 1 + WAYS * SLOT_BYTES;
/// Layout version, first byte of every page; a page of another layout reads as empty.
const PAGE_VERSION: u8 = 2;

/// Slots per limit when `rate_limit_table.slots` is not set.
pub const DEFAULT_SLOTS: u32 = 16_384;
/// Smallest table: one page.
pub const MIN_SLOTS: u32 = WAYS as u32;
/// Largest table (about 35 MiB per limit): a typo must not exhaust Envoy's memory.
pub const MAX_SLOTS: u32 = 1 << 20;
/// CAS attempts per update before giving up (each failure means another worker wrote).
pub const MAX_CAS_RETRIES: u32 = 32;

/// What to do when every slot a new key could use is held by a busy bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Admit the request without tracking it (fail open, like the quota `failure_mode`).
    #[default]
    Allow,
    /// Refuse it with 429 until a slot frees up (fail closed).
    Deny,
}

impl WhenFull {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(WhenFull::Allow),
            "deny" => Some(WhenFull::Deny),
            _ => None,
        }
    }
}

/// Where a bucket key lives: its page and its fingerprint (never 0, which marks a free slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotKey {
    pub page: u32,
    pub fingerprint: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Slot {
    fingerprint: u64,
    state: BucketState,
}

/// One decoded page value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    slots: [Slot; WAYS],
}

impl Page {
    /// Decodes a stored value; anything not in the current layout reads as an empty page.
    pub fn decode(bytes: &[u8]) -> Page {
        let mut page = Page::default();
        if bytes.len() != PAGE_BYTES || bytes.first() != Some(&PAGE_VERSION) {
            return page;
        }
        for (slot, raw) in page
            .slots
            .iter_mut()
            .zip(bytes[1..].chunks_exact(SLOT_BYTES))
        {
            let u64_at = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&raw[i..i + 8]);
                u64::from_le_bytes(b)
            };
            let u32_at = |i: usize| {
                let mut b = [0u8; 4];
                b.copy_from_slice(&raw[i..i + 4]);
                u32::from_le_bytes(b)
            };
            *slot = Slot {
                fingerprint: u64_at(0),
                state: BucketState {
                    full_at_ms: u64_at(8),
                    frac: u32_at(16),
                    aux: u32_at(20),
                },
            };
        }
        page
    }

    pub fn encode(&self) -> [u8; PAGE_BYTES] {
        let mut out = [0u8; PAGE_BYTES];
        out[0] = PAGE_VERSION;
        for (slot, raw) in self.slots.iter().zip(out[1..].chunks_exact_mut(SLOT_BYTES)) {
            raw[0..8].copy_from_slice(&slot.fingerprint.to_le_bytes());
            raw[8..16].copy_from_slice(&slot.state.full_at_ms.to_le_bytes());
            raw[16..20].copy_from_slice(&slot.state.frac.to_le_bytes());
            raw[20..24].copy_from_slice(&slot.state.aux.to_le_bytes());
        }
        out
    }

    /// Where `fp` is or could go at `now_ms`.
    fn find(&self, fp: u64, now_ms: u64) -> Position {
        if let Some(i) = self.slots.iter().position(|s| s.fingerprint == fp) {
            return Position::Existing(i);
        }
        // A free slot: never used, or holding a bucket that has refilled to full. Prefer the
        // one that has been full longest, so recently active keys keep their slots.
        let free = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.fingerprint == 0 || s.state.is_full_at(now_ms))
            .min_by_key(|(_, s)| (s.fingerprint != 0, s.state.full_at_ms, s.state.frac))
            .map(|(i, _)| i);
        match free {
            Some(i) => Position::Free(i),
            None => {
                let soonest = self
                    .slots
                    .iter()
                    .map(|s| {
                        let at = s
                            .state
                            .full_at_ms
                            .saturating_add(u64::from(s.state.frac > 0));
                        at.saturating_sub(now_ms)
                    })
                    .min()
                    .unwrap_or(0);
                Position::Busy {
                    free_in_ms: soonest,
                }
            }
        }
    }

    /// Slots whose bucket is not full at `now_ms` (the ones a new key cannot take).
    pub fn busy_slots(&self, now_ms: u64) -> usize {
        self.slots
            .iter()
            .filter(|s| s.fingerprint != 0 && !s.state.is_full_at(now_ms))
            .count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    Existing(usize),
    Free(usize),
    Busy { free_in_ms: u64 },
}

/// What a read found for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotView {
    /// The key has a slot; its bucket state.
    Existing(BucketState),
    /// The key has no slot but a free one is available: a fresh, full bucket.
    Fresh,
    /// No slot available; the first one frees up in `free_in_ms`.
    Busy { free_in_ms: u64 },
}

impl SlotView {
    /// The bucket state to compute with (a fresh bucket is full); `None` when busy.
    pub fn state(&self) -> Option<BucketState> {
        match self {
            SlotView::Existing(s) => Some(*s),
            SlotView::Fresh => Some(BucketState::FULL),
            SlotView::Busy { .. } => None,
        }
    }
}

/// A page as read, remembered so the first write can reuse it (one `get` per decision).
#[derive(Debug, Clone)]
pub struct Read {
    key: SlotKey,
    page: Page,
    /// The version to CAS against; `None` when the page was missing (see [`Table::prepare`]).
    cas: Option<u32>,
    pos: Position,
    pub view: SlotView,
}

/// Why a table update gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    /// Other workers kept winning the CAS race for [`MAX_CAS_RETRIES`] attempts.
    Contention,
    /// The host refused a write for another reason.
    StoreFailed,
    /// The key has no slot and none is free (only from [`Table::update`] writes).
    Busy,
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::Contention => write!(
                f,
                "shared data stayed contended after {MAX_CAS_RETRIES} attempts"
            ),
            TableError::StoreFailed => write!(f, "Envoy refused a shared-data write"),
            TableError::Busy => write!(f, "every slot of the page holds a busy bucket"),
        }
    }
}

impl std::error::Error for TableError {}

/// What an update closure wants done with the slot it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<T> {
    /// Store this bucket state for the key, then return the value.
    Write(BucketState, T),
    /// Write nothing and return the value.
    Stop(T),
}

/// The slot table of one limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Shared-data key prefix, e.g. `ag:rl:login-per-ip:`
    prefix: String,
    pages: u32,
}

/// Longest prefix accepted (limit names are bounded by config validation).
pub const MAX_PREFIX: usize = 100;

impl Table {
    /// A table of at least `slots` slots (rounded up to whole pages) under `prefix`.
    pub fn new(prefix: &str, slots: u32) -> Table {
        let slots = slots.clamp(MIN_SLOTS, MAX_SLOTS);
        let mut prefix = prefix.to_string();
        if prefix.len() > MAX_PREFIX {
            let mut cut = MAX_PREFIX;
            while !prefix.is_char_boundary(cut) {
                cut -= 1;
            }
            prefix.truncate(cut);
        }
        Table {
            prefix,
            pages: slots.div_ceil(WAYS as u32),
        }
    }

    pub fn pages(&self) -> u32 {
        self.pages
    }

    pub fn slots(&self) -> u64 {
        u64::from(self.pages) * WAYS as u64
    }

    /// Maps a 64-bit key hash to its page (multiply-shift: uniform, no division) and
    /// fingerprint.
    pub fn locate(&self, hash: u64) -> SlotKey {
        let page = ((u128::from(hash) * u128::from(self.pages)) >> 64) as u32;
        SlotKey {
            page,
            fingerprint: if hash == 0 { 1 } else { hash },
        }
    }

    /// The shared-data key of a page, written into `buf` (no allocation on the request path).
    pub fn page_key<'b>(&self, page: u32, buf: &'b mut [u8; MAX_PREFIX + 10]) -> &'b str {
        let p = self.prefix.as_bytes();
        buf[..p.len()].copy_from_slice(p);
        let mut digits = [0u8; 10];
        let mut n = page;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let d = &digits[i..];
        buf[p.len()..p.len() + d.len()].copy_from_slice(d);
        // Prefix is a str and digits are ASCII, so this is valid UTF-8.
        std::str::from_utf8(&buf[..p.len() + d.len()]).unwrap_or("")
    }

    /// Creates every missing page, idempotently; existing pages are left alone. Call once per
    /// configuration (root `on_configure`) before traffic: Envoy inserts a missing key whatever
    /// CAS version the writer names, so creating pages under traffic could lose an update.
    /// Returns the number of pages created.
    pub fn prepare(&self, store: &dyn SharedStore) -> Result<u32, TableError> {
        let empty = Page::default().encode();
        let mut buf = [0u8; MAX_PREFIX + 10];
        let mut created = 0;
        for page in 0..self.pages {
            let key = self.page_key(page, &mut buf);
            if store.get(key).is_none() {
                store
                    .set(key, &empty, None)
                    .map_err(|_| TableError::StoreFailed)?;
                created += 1;
            }
        }
        Ok(created)
    }

    /// Reads the page of `key` and says where the key is or could go.
    pub fn read(&self, store: &dyn SharedStore, key: SlotKey, now_ms: u64) -> Read {
        let mut buf = [0u8; MAX_PREFIX + 10];
        let (page, cas) = match store.get(self.page_key(key.page, &mut buf)) {
            Some((bytes, cas)) => (Page::decode(&bytes), Some(cas)),
            None => (Page::default(), None),
        };
        let pos = page.find(key.fingerprint, now_ms);
        let view = match pos {
            Position::Existing(i) => SlotView::Existing(page.slots[i].state),
            Position::Free(_) => SlotView::Fresh,
            Position::Busy { free_in_ms } => SlotView::Busy { free_in_ms },
        };
        Read {
            key,
            page,
            cas,
            pos,
            view,
        }
    }

    /// Writes `state` for the key of `read` with a CAS against the version `read` saw.
    pub fn write(
        &self,
        store: &dyn SharedStore,
        read: &Read,
        state: BucketState,
    ) -> Result<(), StoreError> {
        let i = match read.pos {
            Position::Existing(i) | Position::Free(i) => i,
            Position::Busy { .. } => return Err(StoreError::Failed),
        };
        let mut page = read.page.clone();
        page.slots[i] = Slot {
            fingerprint: read.key.fingerprint,
            state,
        };
        let mut buf = [0u8; MAX_PREFIX + 10];
        // cas 0 would mean "unconditional" to Envoy; a missing page has no version at all.
        let cas = read.cas.map(|c| c.max(1));
        store.set(self.page_key(read.key.page, &mut buf), &page.encode(), cas)
    }

    /// Read-modify-write of one key's bucket with bounded CAS retries. `first` is a read
    /// already made for this key (saves a `get`); `f` sees the current view on every attempt
    /// and decides. Returns what `f` returned with the write that succeeded (or no write).
    pub fn update<T>(
        &self,
        store: &dyn SharedStore,
        key: SlotKey,
        now_ms: u64,
        first: Option<Read>,
        mut f: impl FnMut(&SlotView) -> Step<T>,
    ) -> Result<T, TableError> {
        let mut read = match first {
            Some(r) => r,
            None => self.read(store, key, now_ms),
        };
        for _ in 0..MAX_CAS_RETRIES {
            match f(&read.view) {
                Step::Stop(v) => return Ok(v),
                Step::Write(state, v) => {
                    if matches!(read.view, SlotView::Busy { .. }) {
                        return Err(TableError::Busy);
                    }
                    match self.write(store, &read, state) {
                        Ok(()) => return Ok(v),
                        Err(StoreError::CasMismatch) => read = self.read(store, key, now_ms),
                        Err(StoreError::Failed) => return Err(TableError::StoreFailed),
                    }
                }
            }
        }
        Err(TableError::Contention)
    }

    /// Busy slots across the whole table (diagnostics and tests; reads every page).
    pub fn busy_slots(&self, store: &dyn SharedStore, now_ms: u64) -> u64 {
        let mut buf = [0u8; MAX_PREFIX + 10];
        (0..self.pages)
            .filter_map(|p| store.get(self.page_key(p, &mut buf)))
            .map(|(bytes, _)| Page::decode(&bytes).busy_slots(now_ms) as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::super::bucket::{BucketParams, Take};
    use super::*;
    use crate::store::MemoryStore;

    const T0: u64 = 1_700_000_000_000;

    fn take(
        t: &Table,
        store: &dyn SharedStore,
        b: &BucketParams,
        hash: u64,
        now: u64,
    ) -> Result<bool, TableError> {
        t.update(store, t.locate(hash), now, None, |view| {
            match view.state() {
                None => Step::Stop(false),
                Some(s) => match b.take(s, 1, now) {
                    Take::Allowed { state, .. } => Step::Write(state, true),
                    Take::Denied { .. } => Step::Stop(false),
                },
            }
        })
    }

    /// Hashes that all land on page 0 of a one-page table.
    fn same_page(n: u64) -> Vec<u64> {
        (1..=n)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect()
    }

    #[test]
    fn page_round_trips_and_rejects_foreign_layouts() {
        let mut p = Page::default();
        p.slots[3] = Slot {
            fingerprint: u64::MAX,
            state: BucketState {
                full_at_ms: T0,
                frac: 7,
                aux: 9,
            },
        };
        let bytes = p.encode();
        assert_eq!(bytes.len(), PAGE_BYTES);
        assert_eq!(Page::decode(&bytes), p);
        assert_eq!(Page::decode(&bytes[..PAGE_BYTES - 1]), Page::default());
        assert_eq!(Page::decode(b""), Page::default());
        let mut other = bytes;
        other[0] = 99;
        assert_eq!(Page::decode(&other), Page::default());
    }

    #[test]
    fn page_keys_and_locations_are_stable_and_in_range() {
        let t = Table::new("ag:rl:x:", 16_384);
        assert_eq!(t.pages(), 2048);
        assert_eq!(t.slots(), 16_384);
        let mut buf = [0u8; MAX_PREFIX + 10];
        assert_eq!(t.page_key(0, &mut buf), "ag:rl:x:0");
        assert_eq!(t.page_key(4_294_967_295, &mut buf), "ag:rl:x:4294967295");
        for h in [0, 1, u64::MAX, 1 << 63, 12345] {
            let k = t.locate(h);
            assert!(k.page < t.pages());
            assert_ne!(k.fingerprint, 0);
        }
        assert_eq!(Table::new("p", 0).pages(), 1);
        assert_eq!(Table::new("p", 9).pages(), 2);
        assert_eq!(Table::new("p", u32::MAX).slots(), u64::from(MAX_SLOTS));
        let long = "é".repeat(200);
        let t = Table::new(&long, 8);
        assert!(t.page_key(7, &mut buf).ends_with('7'));
    }

    #[test]
    fn prepare_creates_every_page_once() {
        let store = MemoryStore::new();
        let t = Table::new("rl.a.", 64);
        assert_eq!(t.prepare(&store), Ok(8));
        assert_eq!(store.len(), 8);
        let b = BucketParams::new(2, 1, 60).unwrap();
        assert_eq!(take(&t, &store, &b, 42, T0), Ok(true));
        // A second prepare (another worker, a config reload) keeps the state.
        assert_eq!(t.prepare(&store), Ok(0));
        assert_eq!(take(&t, &store, &b, 42, T0), Ok(true));
        assert_eq!(take(&t, &store, &b, 42, T0), Ok(false));
    }

    #[test]
    fn a_slot_is_taken_over_only_when_its_bucket_is_full() {
        let store = MemoryStore::new();
        let t = Table::new("rl.t.", 8); // one page of 8 slots
        t.prepare(&store).unwrap();
        let b = BucketParams::new(2, 2, 10).unwrap(); // full 10 s after emptying
        let keys = same_page(9);
        // Eight keys take one token each: all eight slots now hold busy buckets.
        for &k in &keys[..8] {
            assert_eq!(take(&t, &store, &b, k, T0), Ok(true));
        }
        assert_eq!(t.busy_slots(&store, T0), 8);
        // A ninth key finds no free slot, and is told when the first one frees.
        let r = t.read(&store, t.locate(keys[8]), T0 + 1000);
        assert_eq!(r.view, SlotView::Busy { free_in_ms: 4000 });
        assert_eq!(take(&t, &store, &b, keys[8], T0), Ok(false));
        // The first key drains its bucket: it keeps its slot while not full.
        assert_eq!(take(&t, &store, &b, keys[0], T0), Ok(true));
        assert_eq!(take(&t, &store, &b, keys[0], T0), Ok(false));
        // At T0+5 s the seven half-used buckets are full again: the ninth key takes one of
        // them; key 0 (still refilling) keeps its slot and its debt.
        assert_eq!(take(&t, &store, &b, keys[8], T0 + 5000), Ok(true));
        let r0 = t.read(&store, t.locate(keys[0]), T0 + 5000);
        assert!(matches!(r0.view, SlotView::Existing(_)));
        assert_eq!(
            b.status(r0.view.state().unwrap(), T0 + 5000).remaining,
            1,
            "the draining key lost nothing by the takeover"
        );
        // An evicted key comes back to a fresh bucket: exactly what it had (full), no more.
        let evicted = keys[1..8]
            .iter()
            .find(|&&k| matches!(t.read(&store, t.locate(k), T0 + 5000).view, SlotView::Fresh))
            .copied()
            .expect("one of the full keys was evicted");
        let mut n = 0;
        while take(&t, &store, &b, evicted, T0 + 5000) == Ok(true) {
            n += 1;
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn footprint_stays_at_the_cap_whatever_the_number_of_keys() {
        let store = MemoryStore::new();
        let t = Table::new("rl.m.", 1024);
        t.prepare(&store).unwrap();
        let b = BucketParams::new(5, 5, 60).unwrap();
        let (mut admitted, mut refused) = (0u32, 0u32);
        for i in 0..100_000u64 {
            let h = xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
            match take(&t, &store, &b, h, T0 + i) {
                Ok(true) => admitted += 1,
                _ => refused += 1,
            }
        }
        assert_eq!(store.len(), 128, "one shared-data key per page, never more");
        assert!(store
            .get("rl.m.0")
            .is_some_and(|(v, _)| v.len() == PAGE_BYTES));
        assert_eq!(admitted + refused, 100_000);
        assert!(admitted >= 1024, "every slot got used: {admitted}");
        assert!(refused > 0, "100k keys in 12 s cannot all fit 1024 slots");
    }

    /// Two workers share one store; their steps interleave between read and CAS write.
    #[test]
    fn interleaved_workers_admit_exactly_the_capacity() {
        let store = MemoryStore::new();
        let t = Table::new("rl.x.", 8);
        t.prepare(&store).unwrap();
        let b = BucketParams::new(20, 20, 60).unwrap();
        let key = t.locate(77);
        let mut admitted = 0;
        for _ in 0..40 {
            // Worker A and B both read the same version...
            let ra = t.read(&store, key, T0);
            let rb = t.read(&store, key, T0);
            let decide = |view: &SlotView| match b.take(view.state().unwrap(), 1, T0) {
                Take::Allowed { state, .. } => Step::Write(state, true),
                Take::Denied { .. } => Step::Stop(false),
            };
            // ...A writes first; B's CAS fails, it re-reads and decides again.
            for r in [ra, rb] {
                if t.update(&store, key, T0, Some(r), decide) == Ok(true) {
                    admitted += 1;
                }
            }
        }
        assert_eq!(admitted, 20);
    }

    #[test]
    fn stale_reads_never_overwrite_newer_state() {
        let store = MemoryStore::new();
        let t = Table::new("rl.s.", 8);
        t.prepare(&store).unwrap();
        let key = t.locate(5);
        let stale = t.read(&store, key, T0);
        let fresh = t.read(&store, key, T0);
        let s1 = BucketState {
            full_at_ms: T0 + 1,
            frac: 0,
            aux: 0,
        };
        t.write(&store, &fresh, s1).unwrap();
        assert_eq!(
            t.write(&store, &stale, BucketState::FULL),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(t.read(&store, key, T0).view, SlotView::Existing(s1));
    }

    /// A store whose writes always lose the race.
    struct AlwaysContended(MemoryStore);
    impl SharedStore for AlwaysContended {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.0.get(key)
        }
        fn set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<(), StoreError> {
            Err(StoreError::CasMismatch)
        }
    }

    #[test]
    fn retries_are_bounded() {
        let store = AlwaysContended(MemoryStore::new());
        let t = Table::new("rl.c.", 8);
        t.prepare(&store.0).unwrap();
        let b = BucketParams::new(1, 1, 1).unwrap();
        assert_eq!(take(&t, &store, &b, 9, T0), Err(TableError::Contention));
    }
}
