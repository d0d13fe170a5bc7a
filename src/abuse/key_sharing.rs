//! Key sharing: one client identity seen from more addresses than its policy allows
//! (`abuse.key_sharing`). A leaked API key or a shared account shows up as one client from
//! many places; per-IP and per-client limits each look normal.
//!
//! Per authenticated client, the distinct client addresses (or `/prefix_v4`, `/prefix_v6`
//! prefixes) of the current window are kept exactly, up to `max_distinct_ips`, in a fixed
//! table in shared data (all workers see one set). A request from an address already in the
//! set, or while the set has room, passes; one from a new address once the set is full is
//! "over": the action applies (`log`, `deny`, `tighten`). Windows align to UTC multiples of
//! `window_s`, so a set empties at the window's end.
//!
//! Memory: `tracked_clients` entries (default 4096) of `18 + 4 × max_distinct_ips` bytes, in
//! pages of [`ENTRIES`] (shared-data keys `ag:ks:<page>`), created at configuration. A client
//! has two candidate pages (two-choice hashing). An entry whose window has ended is reused; a
//! new client that finds both pages full of live entries is not tracked for that request
//! (counted as `untracked`, fail open: the limits still apply). Two workers racing a new client
//! at a window's turn may give it an entry in each page; its addresses then split between them
//! until the window ends (under-counting, never a false `over`).

use crate::store::{SharedStore, StoreError};
use std::net::IpAddr;
use xxhash_rust::xxh3::xxh3_64;

/// Entries per shared-data page.
pub const ENTRIES: usize = 4;
/// Largest `max_distinct_ips`: the set is kept exactly, in every entry.
pub const MAX_DISTINCT: u32 = 64;
const PAGE_VERSION: u8 = 1;
const KEY_PREFIX: &str = "ag:ks:";
const MAX_CAS_RETRIES: u32 = 32;
/// Entry flag: the window's `credential_abuse` event was already emitted.
const FLAG_REPORTED: u8 = 1;

/// What the set says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A known address, or a new one that fit.
    Within,
    /// A new address with the set full. `first`: the first such request of the window
    /// (emit the event once).
    Over { first: bool },
    /// Not tracked this time (no free entry, contention, no client address).
    Untracked,
}

/// The compiled settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySharing {
    pub max_distinct_ips: u32,
    pub window_s: u64,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    pub pages: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    fingerprint: u64,
    window_end_ms: u64,
    flags: u8,
    addrs: Vec<u32>,
}

impl KeySharing {
    fn entry_bytes(&self) -> usize {
        18 + 4 * self.max_distinct_ips as usize
    }

    fn page_bytes(&self) -> usize {
        1 + ENTRIES * self.entry_bytes()
    }

    fn decode(&self, bytes: &[u8]) -> Vec<Entry> {
        let mut out = vec![Entry::default(); ENTRIES];
        if bytes.len() != self.page_bytes() || bytes[0] != PAGE_VERSION {
            return out;
        }
        for (e, raw) in out
            .iter_mut()
            .zip(bytes[1..].chunks_exact(self.entry_bytes()))
        {
            let u64_at = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&raw[i..i + 8]);
                u64::from_le_bytes(b)
            };
            let n = (raw[17] as usize).min(self.max_distinct_ips as usize);
            *e = Entry {
                fingerprint: u64_at(0),
                window_end_ms: u64_at(8),
                flags: raw[16],
                addrs: raw[18..18 + 4 * n]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            };
        }
        out
    }

    fn encode(&self, entries: &[Entry]) -> Vec<u8> {
        let mut out = vec![0u8; self.page_bytes()];
        out[0] = PAGE_VERSION;
        for (e, raw) in entries
            .iter()
            .zip(out[1..].chunks_exact_mut(self.entry_bytes()))
        {
            raw[0..8].copy_from_slice(&e.fingerprint.to_le_bytes());
            raw[8..16].copy_from_slice(&e.window_end_ms.to_le_bytes());
            raw[16] = e.flags;
            let n = e.addrs.len().min(self.max_distinct_ips as usize);
            raw[17] = n as u8;
            for (a, c) in e.addrs[..n].iter().zip(raw[18..].chunks_exact_mut(4)) {
                c.copy_from_slice(&a.to_le_bytes());
            }
        }
        out
    }

    fn page_key(page: u32) -> String {
        format!("{KEY_PREFIX}{page}")
    }

    /// Creates the pages (idempotent); call at configuration, before traffic (Envoy inserts
    /// a missing key whatever CAS version a writer names). A page of another layout (another
    /// `max_distinct_ips`) is rewritten empty.
    pub fn prepare(&self, store: &dyn SharedStore) -> Result<u32, StoreError> {
        let empty = self.encode(&vec![Entry::default(); ENTRIES]);
        let mut created = 0;
        for page in 0..self.pages {
            let key = Self::page_key(page);
            match store.get(&key) {
                Some((v, _)) if v.len() == empty.len() => {}
                _ => {
                    store.set(&key, &empty, None)?;
                    created += 1;
                }
            }
        }
        Ok(created)
    }

    /// The hash of the address's prefix (never 0); `None` when `ip` is not an address.
    fn addr_hash(&self, ip: &str) -> Option<u32> {
        let ip: IpAddr = ip.parse().ok()?;
        let bytes: Vec<u8> = match ip.to_canonical() {
            IpAddr::V4(a) => {
                let bits = u32::from(a) & mask32(self.prefix_v4);
                let mut v = vec![4];
                v.extend_from_slice(&bits.to_be_bytes());
                v
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a) & mask128(self.prefix_v6);
                let mut v = vec![6];
                v.extend_from_slice(&bits.to_be_bytes());
                v
            }
        };
        Some((xxh3_64(&bytes) as u32).max(1))
    }

    /// The client's two candidate pages (two-choice hashing): a new client takes a free entry
    /// in the emptier one, so a table three-quarters full leaves under 1 % untracked, where one
    /// page per client left about 10 % untracked (bench/memory.py, 100k clients in 131,072).
    fn pages_of(&self, hash: u64) -> [u32; 2] {
        let at = |h: u64| ((u128::from(h) * u128::from(self.pages)) >> 64) as u32;
        [at(hash), at(hash.rotate_left(32))]
    }

    fn read(&self, store: &dyn SharedStore, page: u32) -> (Vec<Entry>, Option<u32>) {
        match store.get(&Self::page_key(page)) {
            Some((v, cas)) => (self.decode(&v), Some(cas.max(1))),
            None => (vec![Entry::default(); ENTRIES], None),
        }
    }

    /// Records that `client` sent a request from `ip` at `now_ms`, and says whether that
    /// address is over the client's allowance.
    pub fn observe(&self, store: &dyn SharedStore, client: &str, ip: &str, now_ms: u64) -> Seen {
        let Some(addr) = self.addr_hash(ip) else {
            return Seen::Untracked;
        };
        let hash = xxh3_64(client.as_bytes());
        let fingerprint = hash.max(1);
        let pages = self.pages_of(hash);
        let candidates = if pages[0] == pages[1] { 1 } else { 2 };
        let w = self.window_s * 1000;
        let window_end = now_ms - now_ms % w + w;
        let live = |e: &Entry| e.fingerprint == fingerprint && e.window_end_ms >= window_end;
        let free = |e: &Entry| e.fingerprint == 0 || e.window_end_ms < window_end;
        for _ in 0..MAX_CAS_RETRIES {
            // The page that holds the client's entry (the second page is read only when the
            // first does not hold it); else a free entry in the emptier page.
            let mut read: Vec<(Vec<Entry>, Option<u32>)> = Vec::with_capacity(2);
            let mut at = None;
            for &page in &pages[..candidates] {
                let (entries, cas) = self.read(store, page);
                let found = entries.iter().position(live);
                read.push((entries, cas));
                if let Some(i) = found {
                    at = Some((read.len() - 1, i));
                    break;
                }
            }
            let (n, i) = match at {
                Some(found) => found,
                None => {
                    // The page with more free entries (the "power of two choices": loads
                    // stay even, so a page fills only when the table nearly has).
                    let free_in = |n: usize| read[n].0.iter().filter(|e| free(e)).count();
                    let n = usize::from(read.len() == 2 && free_in(1) > free_in(0));
                    let Some(i) = read[n].0.iter().position(free) else {
                        return Seen::Untracked;
                    };
                    read[n].0[i] = Entry {
                        fingerprint,
                        window_end_ms: window_end,
                        flags: 0,
                        addrs: Vec::new(),
                    };
                    (n, i)
                }
            };
            let (entries, cas) = &mut read[n];
            let e = &mut entries[i];
            if e.addrs.contains(&addr) {
                return Seen::Within;
            }
            let result = if (e.addrs.len() as u32) < self.max_distinct_ips {
                e.addrs.push(addr);
                Seen::Within
            } else if e.flags & FLAG_REPORTED == 0 {
                e.flags |= FLAG_REPORTED;
                Seen::Over { first: true }
            } else {
                return Seen::Over { first: false };
            };
            match store.set(&Self::page_key(pages[n]), &self.encode(entries), *cas) {
                Ok(()) => return result,
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return Seen::Untracked,
            }
        }
        Seen::Untracked
    }
}

fn mask32(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - p),
    }
}

fn mask128(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p if p >= 128 => u128::MAX,
        p => u128::MAX << (128 - p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const T0: u64 = 1_700_000_400_000; // a multiple of 600 s

    fn ks(max: u32) -> KeySharing {
        KeySharing {
            max_distinct_ips: max,
            window_s: 600,
            prefix_v4: 32,
            prefix_v6: 64,
            pages: 4,
        }
    }

    #[test]
    fn the_first_n_addresses_pass_and_the_next_are_over_once_reported() {
        let k = ks(3);
        let store = MemoryStore::new();
        k.prepare(&store).unwrap();
        for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1"] {
            assert_eq!(k.observe(&store, "acme", ip, T0), Seen::Within, "{ip}");
        }
        assert_eq!(
            k.observe(&store, "acme", "192.0.2.4", T0 + 1),
            Seen::Over { first: true }
        );
        assert_eq!(
            k.observe(&store, "acme", "192.0.2.5", T0 + 2),
            Seen::Over { first: false }
        );
        // The established addresses keep working, other clients are separate.
        assert_eq!(k.observe(&store, "acme", "192.0.2.2", T0 + 3), Seen::Within);
        assert_eq!(
            k.observe(&store, "other", "192.0.2.9", T0 + 3),
            Seen::Within
        );
        // The next window starts empty.
        assert_eq!(
            k.observe(&store, "acme", "192.0.2.4", T0 + 600_000),
            Seen::Within
        );
    }

    #[test]
    fn prefixes_group_addresses() {
        let k = KeySharing {
            prefix_v4: 24,
            prefix_v6: 48,
            ..ks(1)
        };
        let store = MemoryStore::new();
        k.prepare(&store).unwrap();
        assert_eq!(k.observe(&store, "c", "198.51.100.1", T0), Seen::Within);
        assert_eq!(k.observe(&store, "c", "198.51.100.200", T0), Seen::Within);
        assert_eq!(
            k.observe(&store, "c", "::ffff:198.51.100.7", T0),
            Seen::Within
        );
        assert!(matches!(
            k.observe(&store, "c", "198.51.101.1", T0),
            Seen::Over { .. }
        ));
        assert_eq!(k.observe(&store, "d", "2001:db8:1:2::1", T0), Seen::Within);
        assert_eq!(
            k.observe(&store, "d", "2001:db8:1:ffff::9", T0),
            Seen::Within
        );
        assert!(matches!(
            k.observe(&store, "d", "2001:db8:2::1", T0),
            Seen::Over { .. }
        ));
        assert_eq!(k.observe(&store, "d", "", T0), Seen::Untracked);
        assert_eq!(k.observe(&store, "d", "junk", T0), Seen::Untracked);
    }

    #[test]
    fn a_full_table_of_live_clients_leaves_new_ones_untracked_until_windows_end() {
        let k = KeySharing { pages: 1, ..ks(2) };
        let store = MemoryStore::new();
        k.prepare(&store).unwrap();
        for c in 0..ENTRIES {
            assert_eq!(
                k.observe(&store, &format!("c{c}"), "192.0.2.1", T0),
                Seen::Within
            );
        }
        assert_eq!(k.observe(&store, "late", "192.0.2.1", T0), Seen::Untracked);
        assert_eq!(
            k.observe(&store, "late", "192.0.2.1", T0 + 600_000),
            Seen::Within
        );
        assert_eq!(store.len(), 1, "bounded: one page");
    }

    #[test]
    fn foreign_or_corrupt_pages_read_as_empty() {
        let k = ks(2);
        let store = MemoryStore::new();
        store.set("ag:ks:0", b"garbage", None).unwrap();
        k.prepare(&store).unwrap();
        let page = store.get("ag:ks:0").unwrap().0;
        assert_eq!(page.len(), k.page_bytes());
        let mut bad = page.clone();
        bad[18] = 255; // an address count beyond the maximum is clamped
        assert_eq!(k.decode(&bad).len(), ENTRIES);
    }

    #[test]
    fn a_million_addresses_and_100k_clients_stay_within_the_table() {
        let k = KeySharing {
            pages: 1024, // tracked_clients 4096
            ..ks(20)
        };
        let store = MemoryStore::new();
        k.prepare(&store).unwrap();
        let footprint = |s: &MemoryStore| {
            (0..k.pages)
                .map(|p| s.get(&KeySharing::page_key(p)).map_or(0, |(v, _)| v.len()))
                .sum::<usize>()
        };
        let before = footprint(&store);
        assert_eq!(before, 1024 * k.page_bytes());
        // One client from 1M addresses: 20 are kept, the rest are over.
        let mut over = 0;
        for i in 0u32..1_000_000 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            if matches!(k.observe(&store, "leaked", &ip, T0), Seen::Over { .. }) {
                over += 1;
            }
        }
        assert_eq!(over, 1_000_000 - 20);
        // 100k clients: at most 4096 tracked at once, the rest untracked, nothing grows.
        let mut untracked = 0;
        for c in 0..100_000 {
            if k.observe(&store, &format!("client-{c}"), "192.0.2.1", T0) == Seen::Untracked {
                untracked += 1;
            }
        }
        assert!(untracked >= 100_000 - 4096, "{untracked}");
        assert_eq!(store.len(), 1024, "no key beyond the pages");
        assert_eq!(footprint(&store), before, "no page grows");
    }

    #[test]
    fn two_candidate_pages_track_nearly_every_client_of_a_table_three_quarters_full() {
        let k = KeySharing {
            pages: 1024, // tracked_clients 4096
            ..ks(3)
        };
        let store = MemoryStore::new();
        k.prepare(&store).unwrap();
        let clients = 3072;
        let untracked = (0..clients)
            .filter(|c| {
                k.observe(&store, &format!("client-{c}"), "192.0.2.1", T0) == Seen::Untracked
            })
            .count();
        // One page per client left about 10 % out at this load; two choices under 1 %.
        assert!(
            untracked * 100 < clients,
            "{untracked} of {clients} untracked"
        );
        // And each tracked client is found again, in whichever page it went to: its set
        // fills to 3 and the 4th address is over.
        for c in 0..clients {
            let id = format!("client-{c}");
            if k.observe(&store, &id, "192.0.2.1", T0) == Seen::Untracked {
                continue;
            }
            assert_eq!(k.observe(&store, &id, "192.0.2.2", T0), Seen::Within);
            assert_eq!(k.observe(&store, &id, "192.0.2.3", T0), Seen::Within);
            assert_eq!(
                k.observe(&store, &id, "192.0.2.4", T0),
                Seen::Over { first: true },
                "{id}"
            );
        }
    }
}
