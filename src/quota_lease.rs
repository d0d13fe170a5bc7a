//! `quota.mode: "lease"`: the filter holds units granted by the quota service
//! (`POST /v1/lease`, quota/README.md) and spends them locally, shared by every worker.
//!
//! State lives in shared data (`SharedStore`), in a fixed table of [`SLOTS`] pre-created keys
//! (shared data has no delete and creating a key is not atomic, so every write here is a CAS
//! on an existing key). A slot belongs to one client+tier and holds up to [`MAX_HELD`] leases;
//! a request takes its cost from one of them with a CAS, so across workers a unit is spent at
//! most once, and only units the service granted are ever spent (zero over-admission).
//!
//! Work that needs the service without holding a request (the next lease before this one runs
//! out, giving back the unused units of an expired or replaced lease) is queued in one shared
//! key ([`JOBS_KEY`]) and dispatched by whichever worker's timer drains it first
//! (`driver::Worker::tick`). A request waits for the service only when its client holds no
//! usable lease.
//!
//! Pure logic over `&dyn SharedStore` and a clock argument: unit-tested on `MemoryStore`.

use crate::store::{SharedStore, StoreError};
use serde::{Deserialize, Serialize};

/// Slots in the lease table (clients holding a lease at the same time on this Envoy).
pub const SLOTS: usize = 1024;
/// Leases one slot holds at once: the current one and the next, asked for ahead of time.
pub const MAX_HELD: usize = 2;
/// The lease life the filter asks for.
pub const TTL_MS: u64 = 5_000;
/// The longest a lease is held, whatever an answer says (the service's own maximum).
pub const MAX_LIFE_MS: u64 = 60_000;
/// The filter sizes leases to last about this long at the client's recent rate.
pub const TARGET_MS: u64 = 2_000;
/// A rate is measured over at least this long.
const RATE_WINDOW_MS: u64 = 200;
/// The first lease of a client with no measured rate: this many requests.
const FIRST_WANT: u64 = 32;
/// Largest `want` asked for (the service caps it too).
const MAX_WANT: u64 = 10_000;
/// After a refresh is queued, no other is queued for this long unless it is answered.
pub const REFRESH_HOLD_MS: u64 = 2_000;
/// An unused slot with no lease may be taken by another client after this long.
const IDLE_MS: u64 = 10_000;
/// Queued jobs beyond this are dropped (a lost release under-admits; a lost refresh is
/// queued again after [`REFRESH_HOLD_MS`]).
pub const MAX_JOBS: usize = 128;
/// CAS attempts before giving up on a contended key.
const CAS_TRIES: usize = 16;

pub const JOBS_KEY: &str = "api_guard.quota.lease.jobs";

fn slot_key(i: usize) -> String {
    format!("api_guard.quota.lease.{i}")
}

/// Creates the table's keys (once per process; later workers find them). Never empty: the
/// proxy-wasm SDK reads an empty value as a missing key.
pub fn prepare(store: &dyn SharedStore) {
    for i in 0..SLOTS {
        let k = slot_key(i);
        if store.get(&k).is_none() {
            let _ = store.set(&k, b"{}", None);
        }
    }
    if store.get(JOBS_KEY).is_none() {
        let _ = store.set(JOBS_KEY, b"[]", None);
    }
}

/// One lease held by this Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub id: String,
    pub left: u64,
    pub exp: u64,
}

/// One slot: a client+tier's leases and what is needed to ask for the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Slot {
    /// Owner: [`owner_key`]; empty = free.
    o: String,
    route: String,
    cost: u64,
    l: Vec<Held>,
    /// No refresh is queued before this time (one is in flight, or the service said no).
    hold: u64,
    want: u64,
    used_at: u64,
    /// Rate window: start (ms) and units spent since.
    win: (u64, u64),
    /// The service's headers from its last lease answer (units outside this Envoy's leases).
    h: Vec<(String, String)>,
}

impl Slot {
    fn left(&self) -> u64 {
        self.l.iter().map(|l| l.left).sum()
    }
}

/// Work for a worker's timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum Job {
    /// Ask for the next lease of the client in `slot`.
    Refresh {
        slot: usize,
        client: String,
        tier: String,
        route: String,
        cost: u64,
        want: u64,
    },
    /// Give back unused units.
    Release {
        client: String,
        id: String,
        units: u64,
    },
}

/// A lease the service granted (`/v1/lease`'s answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub granted: u64,
    pub expires_at_ms: u64,
}

/// Who a lease is for.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub client: &'a str,
    pub tier: &'a str,
    pub route: &'a str,
}

impl Owner<'_> {
    fn key(&self) -> String {
        owner_key(self.client, self.tier)
    }
}

/// `<client length>:<client><tier>`: one key per (client, tier) pair, whatever bytes they
/// hold (a separator could be forged by an identity containing it).
fn owner_key(client: &str, tier: &str) -> String {
    format!("{}:{client}{tier}", client.len())
}

fn fnv(s: &str) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    h as usize
}

/// The two slots a client may use.
fn candidates(owner: &str) -> [usize; 2] {
    let i = fnv(owner) % SLOTS;
    [i, (i + 1) % SLOTS]
}

fn read(store: &dyn SharedStore, i: usize) -> Option<(Slot, u32)> {
    let (bytes, cas) = store.get(&slot_key(i))?;
    if bytes.is_empty() {
        return Some((Slot::default(), cas));
    }
    // An unreadable slot (another build's format) is treated as free.
    Some((decode(&bytes).unwrap_or_default(), cas))
}

fn write(store: &dyn SharedStore, i: usize, s: &Slot, cas: u32) -> Result<(), StoreError> {
    let bytes = encode(s);
    // A key that was never created has version 0; writing it would not be a CAS.
    if cas == 0 {
        return Err(StoreError::Failed);
    }
    store.set(&slot_key(i), &bytes, Some(cas))
}

/// A slot as compact text (it is read and written on every request, so no JSON):
/// `v1|owner|route|cost|hold|want|used_at|win0|win1|id,left,exp;...|name,value;...`.
/// Strings are escaped (`%XX` for `%`, `|`, `,`, `;` and control bytes), so no client id,
/// route or header can forge a field.
fn encode(s: &Slot) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = String::with_capacity(128);
    let esc = |out: &mut String, v: &str| {
        for c in v.chars() {
            if matches!(c, '%' | '|' | ',' | ';') || c.is_control() && (c as u32) < 0x80 {
                let _ = write!(out, "%{:02X}", c as u32);
            } else {
                out.push(c);
            }
        }
    };
    out.push_str("v1|");
    esc(&mut out, &s.o);
    out.push('|');
    esc(&mut out, &s.route);
    let _ = write!(
        out,
        "|{}|{}|{}|{}|{}|{}|",
        s.cost, s.hold, s.want, s.used_at, s.win.0, s.win.1
    );
    for (i, l) in s.l.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        esc(&mut out, &l.id);
        let _ = write!(out, ",{},{}", l.left, l.exp);
    }
    out.push('|');
    for (i, (k, v)) in s.h.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        esc(&mut out, k);
        out.push(',');
        esc(&mut out, v);
    }
    out.into_bytes()
}

fn unescape(v: &str) -> Option<String> {
    if !v.contains('%') {
        return Some(v.to_string());
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Reads [`encode`]'s text; `None` for anything else (the caller treats the slot as free).
fn decode(bytes: &[u8]) -> Option<Slot> {
    if bytes.is_empty() || bytes == b"{}" {
        return Some(Slot::default());
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let f: Vec<&str> = text.split('|').collect();
    let [v, o, route, cost, hold, want, used_at, w0, w1, leases, headers] = f.as_slice() else {
        return None;
    };
    if *v != "v1" {
        return None;
    }
    let mut l = Vec::new();
    for item in leases.split(';').filter(|x| !x.is_empty()) {
        let mut p = item.split(',');
        let (id, left, exp) = (p.next()?, p.next()?, p.next()?);
        if p.next().is_some() {
            return None;
        }
        l.push(Held {
            id: unescape(id)?,
            left: left.parse().ok()?,
            exp: exp.parse().ok()?,
        });
    }
    let mut h = Vec::new();
    for item in headers.split(';').filter(|x| !x.is_empty()) {
        let (k, v) = item.split_once(',')?;
        h.push((unescape(k)?, unescape(v)?));
    }
    Some(Slot {
        o: unescape(o)?,
        route: unescape(route)?,
        cost: cost.parse().ok()?,
        l,
        hold: hold.parse().ok()?,
        want: want.parse().ok()?,
        used_at: used_at.parse().ok()?,
        win: (w0.parse().ok()?, w1.parse().ok()?),
        h,
    })
}

/// Removes expired leases (their units become release jobs) and empty ones.
fn expire(s: &mut Slot, client: &str, now: u64, jobs: &mut Vec<Job>) {
    s.l.retain(|l| {
        if l.exp > now && l.left > 0 {
            return true;
        }
        if l.left > 0 {
            jobs.push(Job::Release {
                client: client.to_string(),
                id: l.id.clone(),
                units: l.left,
            });
        }
        false
    });
}

fn owner_client(o: &str) -> &str {
    o.split_once(':')
        .and_then(|(n, rest)| rest.get(..n.parse::<usize>().ok()?))
        .unwrap_or("")
}

/// A slot another client may take: nobody's, or no live lease, nothing in flight, idle.
fn claimable(s: &Slot, now: u64) -> bool {
    s.o.is_empty()
        || (!s.l.iter().any(|l| l.exp > now && l.left > 0)
            && now >= s.hold
            && now.saturating_sub(s.used_at) >= IDLE_MS)
}

/// Finds the client's slot, or claims one; `None` when both candidates belong to others.
/// On success the slot is returned as read (owned by `owner`, possibly fresh) with its
/// version: the caller writes it with that CAS.
fn locate(
    store: &dyn SharedStore,
    owner: &str,
    now: u64,
    jobs: &mut Vec<Job>,
) -> Option<(usize, Slot, u32)> {
    let c = candidates(owner);
    let mut free = None;
    for i in c {
        let (s, cas) = read(store, i)?;
        if s.o == owner {
            return Some((i, s, cas));
        }
        if free.is_none() && claimable(&s, now) {
            free = Some((i, s, cas));
        }
    }
    let (i, mut old, cas) = free?;
    let prev = old.o.clone();
    expire(&mut old, owner_client(&prev), u64::MAX, jobs);
    Some((
        i,
        Slot {
            o: owner.to_string(),
            ..Default::default()
        },
        cas,
    ))
}

/// What a request gets from the lease table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// `cost` units were spent from a lease; the headers describe the client's limits.
    Taken { headers: Vec<(String, String)> },
    /// No usable lease: ask the service for one of about `want` units (and wait).
    Need { want: u64 },
}

/// The next `want` after spending `cost` at `now`: the recent rate times [`TARGET_MS`].
fn account(s: &mut Slot, cost: u64, now: u64) {
    let (start, used) = s.win;
    if start == 0 || now < start {
        s.win = (now, cost);
    } else if now - start >= RATE_WINDOW_MS {
        let rate_want = (used.saturating_add(cost) as u128 * u128::from(TARGET_MS)
            / u128::from(now - start).max(1)) as u64;
        s.want = rate_want.clamp(cost, MAX_WANT);
        s.win = (now, 0);
    } else {
        s.win.1 = used.saturating_add(cost);
    }
    s.used_at = now;
}

fn want_of(s: &Slot, cost: u64) -> u64 {
    if s.want == 0 {
        FIRST_WANT.saturating_mul(cost).min(MAX_WANT)
    } else {
        s.want.max(cost)
    }
}

/// Whether to ask for the next lease now: what is left would last less than half the target
/// (or the leases end soon), and no refresh is pending.
fn refresh_due(s: &Slot, cost: u64, now: u64) -> bool {
    if now < s.hold || s.l.len() >= MAX_HELD {
        return false;
    }
    let low = s.left() <= (want_of(s, cost) / 2).max(cost);
    let ending = s.l.iter().all(|l| l.exp.saturating_sub(now) <= TTL_MS / 3);
    low || ending
}

/// Spends `cost` units of the client's leases (CAS-exact across workers), queueing the next
/// lease in the background when this one runs low, and the release of expired leftovers.
pub fn take(store: &dyn SharedStore, who: Owner<'_>, cost: u64, now: u64) -> Take {
    let owner = who.key();
    let mut result = Take::Need { want: cost };
    let mut queued = Vec::new();
    for _ in 0..CAS_TRIES {
        let mut jobs = Vec::new();
        let Some((i, mut s, cas)) = locate(store, &owner, now, &mut jobs) else {
            // No slot: this request asks for exactly its cost (today's per-request callout).
            return Take::Need { want: cost };
        };
        expire(&mut s, who.client, now, &mut jobs);
        s.route = who.route.to_string();
        s.cost = cost;
        // The lease ending first pays first: fewer units are left to expire unused.
        s.l.sort_by_key(|l| l.exp);
        let Some(l) = s.l.iter_mut().find(|l| l.left >= cost) else {
            // Nothing usable: the request waits for a lease. Running dry while holding a
            // slot means the leases were too small for the rate: ask for twice as much.
            let want = want_of(&s, cost);
            if s.used_at > 0 {
                s.want = want.saturating_mul(2).min(MAX_WANT);
            }
            s.hold = now.saturating_add(REFRESH_HOLD_MS);
            match write(store, i, &s, cas) {
                Ok(()) => {
                    queued = jobs;
                    result = Take::Need { want };
                    break;
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => {
                    result = Take::Need { want };
                    break;
                }
            }
        };
        l.left -= cost;
        account(&mut s, cost, now);
        if refresh_due(&s, cost, now) {
            s.hold = now.saturating_add(REFRESH_HOLD_MS);
            jobs.push(Job::Refresh {
                slot: i,
                client: who.client.to_string(),
                tier: who.tier.to_string(),
                route: who.route.to_string(),
                cost,
                want: want_of(&s, cost),
            });
        }
        match write(store, i, &s, cas) {
            Ok(()) => {
                queued = jobs;
                result = Take::Taken {
                    headers: headers(&s.h, s.left()),
                };
                break;
            }
            Err(StoreError::CasMismatch) => continue,
            // Only on a broken store; asking the service is always safe.
            Err(StoreError::Failed) => break,
        }
    }
    push_jobs(store, queued);
    result
}

/// Adds a lease granted by the service to the client's slot, after `spent` of its units went
/// to the request that asked (0 for a background refresh). Units that cannot be held (no slot,
/// already [`MAX_HELD`] leases) are queued for release. `headers`: the service's answer.
/// Returns the headers for the asking request's response.
pub fn install(
    store: &dyn SharedStore,
    who: Owner<'_>,
    grant: &Grant,
    spent: u64,
    answer_headers: &[(String, String)],
    now: u64,
) -> Vec<(String, String)> {
    let owner = who.key();
    let left = grant.granted.saturating_sub(spent);
    let mut out = headers(answer_headers, left);
    let mut queued = Vec::new();
    let mut held = false;
    for _ in 0..CAS_TRIES {
        let mut jobs = Vec::new();
        let Some((i, mut s, cas)) = locate(store, &owner, now, &mut jobs) else {
            break;
        };
        expire(&mut s, who.client, now, &mut jobs);
        if left > 0 && grant.expires_at_ms > now {
            s.l.push(Held {
                id: grant.id.clone(),
                left,
                // Whatever the answer says, never held longer than the service's own limit.
                exp: grant.expires_at_ms.min(now.saturating_add(MAX_LIFE_MS)),
            });
            // Over the limit: the lease with the fewest units left goes back.
            while s.l.len() > MAX_HELD {
                let (at, _) =
                    s.l.iter()
                        .enumerate()
                        .min_by_key(|(_, l)| l.left)
                        .unwrap_or((0, &s.l[0]));
                let l = s.l.remove(at);
                jobs.push(Job::Release {
                    client: who.client.to_string(),
                    id: l.id,
                    units: l.left,
                });
            }
        }
        s.hold = 0;
        s.h = answer_headers.to_vec();
        s.route = who.route.to_string();
        if s.used_at == 0 {
            s.used_at = now;
        }
        match write(store, i, &s, cas) {
            Ok(()) => {
                // Held, or already queued for release by the trim above: either way it
                // must not be released again below (a double release would give back
                // units that were spent).
                held = s.l.iter().any(|l| l.id == grant.id)
                    || jobs
                        .iter()
                        .any(|j| matches!(j, Job::Release { id, .. } if *id == grant.id));
                out = headers(answer_headers, s.left());
                queued = jobs;
                break;
            }
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Failed) => break,
        }
    }
    if !held && left > 0 {
        queued.push(Job::Release {
            client: who.client.to_string(),
            id: grant.id.clone(),
            units: left,
        });
    }
    push_jobs(store, queued);
    out
}

/// The service refused or failed a background refresh: no new one before `until`.
pub fn hold(store: &dyn SharedStore, slot: usize, client: &str, tier: &str, until: u64) {
    let owner = owner_key(client, tier);
    for _ in 0..CAS_TRIES {
        let Some((mut s, cas)) = read(store, slot % SLOTS) else {
            return;
        };
        if s.o != owner {
            return;
        }
        s.hold = until;
        match write(store, slot % SLOTS, &s, cas) {
            Err(StoreError::CasMismatch) => continue,
            _ => return,
        }
    }
}

fn push_jobs(store: &dyn SharedStore, jobs: Vec<Job>) {
    if jobs.is_empty() {
        return;
    }
    for _ in 0..CAS_TRIES {
        let Some((bytes, cas)) = store.get(JOBS_KEY) else {
            return;
        };
        let mut all: Vec<Job> = serde_json::from_slice(&bytes).unwrap_or_default();
        for j in &jobs {
            if all.len() < MAX_JOBS {
                all.push(j.clone());
            }
        }
        let Ok(out) = serde_json::to_vec(&all) else {
            return;
        };
        if cas == 0 {
            return;
        }
        match store.set(JOBS_KEY, &out, Some(cas)) {
            Err(StoreError::CasMismatch) => continue,
            _ => return,
        }
    }
}

/// Takes every queued job (the caller dispatches them).
pub fn take_jobs(store: &dyn SharedStore) -> Vec<Job> {
    for _ in 0..CAS_TRIES {
        let Some((bytes, cas)) = store.get(JOBS_KEY) else {
            return Vec::new();
        };
        if bytes.is_empty() || bytes == b"[]" || cas == 0 {
            return Vec::new();
        }
        let all: Vec<Job> = serde_json::from_slice(&bytes).unwrap_or_default();
        match store.set(JOBS_KEY, b"[]", Some(cas)) {
            Ok(()) => return all,
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Failed) => return Vec::new(),
        }
    }
    Vec::new()
}

/// Expired leases of up to `n` slots from `from` become release jobs (so units come back
/// even when the client sent nothing more). Returns where to continue.
pub fn sweep(store: &dyn SharedStore, from: usize, n: usize, now: u64) -> usize {
    let mut queued = Vec::new();
    for k in 0..n {
        let i = (from + k) % SLOTS;
        for _ in 0..CAS_TRIES {
            let Some((mut s, cas)) = read(store, i) else {
                break;
            };
            if !s.l.iter().any(|l| l.exp <= now) {
                break;
            }
            let mut jobs = Vec::new();
            let owner = s.o.clone();
            expire(&mut s, owner_client(&owner), now, &mut jobs);
            match write(store, i, &s, cas) {
                Ok(()) => {
                    queued.extend(jobs);
                    break;
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => break,
            }
        }
    }
    push_jobs(store, queued);
    (from + n) % SLOTS
}

/// The request body of `POST /v1/lease`.
pub fn lease_body(client: &str, tier: &str, route: &str, cost: u64, want: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "client": client, "tier": tier, "route": route, "cost": cost, "want": want,
        "ttl_ms": TTL_MS,
    }))
    .unwrap_or_default()
}

/// The request body of `POST /v1/lease/release`.
pub fn release_body(client: &str, id: &str, units: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"client": client, "lease_id": id, "units": units}))
        .unwrap_or_default()
}

/// The service's headers with the units this Envoy still holds added back: the service
/// counts leased units as used, the client can still spend them.
fn headers(h: &[(String, String)], held: u64) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            let v = match k.as_str() {
                "x-ratelimit-remaining" | "x-quota-remaining" => v
                    .parse::<u64>()
                    .map(|n| n.saturating_add(held).to_string())
                    .unwrap_or_else(|_| v.clone()),
                "ratelimit" => add_to_r(v, held),
                _ => v.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// `"name";r=5;t=9` with `held` added to `r`.
fn add_to_r(v: &str, held: u64) -> String {
    v.split(';')
        .map(
            |p| match p.strip_prefix("r=").and_then(|n| n.parse::<u64>().ok()) {
                Some(n) => format!("r={}", n.saturating_add(held)),
                None => p.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn store() -> MemoryStore {
        let s = MemoryStore::new();
        prepare(&s);
        s
    }
    const WHO: Owner<'static> = Owner {
        client: "acme",
        tier: "pro",
        route: "orders",
    };
    fn grant(id: &str, n: u64, exp: u64) -> Grant {
        Grant {
            id: id.into(),
            granted: n,
            expires_at_ms: exp,
        }
    }
    fn hdr() -> Vec<(String, String)> {
        vec![
            ("ratelimit".into(), "\"quota-global\";r=10;t=5".into()),
            ("x-ratelimit-remaining".into(), "10".into()),
            ("x-quota-remaining".into(), "90".into()),
        ]
    }

    #[test]
    fn no_lease_means_wait_then_units_are_spent_exactly() {
        let s = store();
        assert_eq!(take(&s, WHO, 1, 100), Take::Need { want: 32 });
        let h = install(&s, WHO, &grant("a", 5, 5_000), 1, &hdr(), 100);
        assert!(
            h.contains(&("x-quota-remaining".into(), "94".into())),
            "{h:?}"
        );
        assert!(h.contains(&("ratelimit".into(), "\"quota-global\";r=14;t=5".into())));
        for left in (0..4).rev() {
            match take(&s, WHO, 1, 200) {
                Take::Taken { headers } => {
                    assert!(headers
                        .contains(&("x-ratelimit-remaining".into(), (10 + left).to_string())))
                }
                t => panic!("{t:?}"),
            }
        }
        assert!(
            matches!(take(&s, WHO, 1, 200), Take::Need { .. }),
            "4 units, 4 requests"
        );
        // A cost larger than what is left waits too (the rest is released at expiry).
        install(&s, WHO, &grant("b", 2, 5_000), 0, &hdr(), 300);
        assert!(matches!(take(&s, WHO, 3, 300), Take::Need { .. }));
    }

    #[test]
    fn a_refresh_is_queued_once_before_the_lease_runs_out() {
        let s = store();
        install(&s, WHO, &grant("a", 20, 5_000), 0, &hdr(), 0);
        let mut refreshes = 0;
        for _ in 0..20 {
            assert!(matches!(take(&s, WHO, 1, 10), Take::Taken { .. }));
            refreshes += take_jobs(&s)
                .iter()
                .filter(|j| matches!(j, Job::Refresh { .. }))
                .count();
        }
        assert_eq!(refreshes, 1, "one refresh in flight at a time");
        // Its answer adds a second lease; requests go on without waiting.
        install(&s, WHO, &grant("b", 20, 5_010), 0, &hdr(), 20);
        assert!(matches!(take(&s, WHO, 1, 20), Take::Taken { .. }));
    }

    #[test]
    fn expired_leases_are_released_and_never_spent() {
        let s = store();
        install(&s, WHO, &grant("a", 10, 1_000), 0, &hdr(), 0);
        assert!(matches!(take(&s, WHO, 1, 999), Take::Taken { .. }));
        let _ = take_jobs(&s);
        assert!(matches!(take(&s, WHO, 1, 1_000), Take::Need { .. }));
        assert_eq!(
            take_jobs(&s),
            vec![Job::Release {
                client: "acme".into(),
                id: "a".into(),
                units: 9
            }]
        );
        // The sweep finds expired leases without traffic.
        install(&s, WHO, &grant("b", 3, 2_000), 0, &hdr(), 1_000);
        let mut at = 0;
        for _ in 0..SLOTS / 64 {
            at = sweep(&s, at, 64, 2_000);
        }
        assert_eq!(
            take_jobs(&s),
            vec![Job::Release {
                client: "acme".into(),
                id: "b".into(),
                units: 3
            }]
        );
        assert_eq!(take_jobs(&s), vec![], "drained");
    }

    #[test]
    fn a_third_lease_releases_the_smallest() {
        let s = store();
        install(&s, WHO, &grant("a", 10, 5_000), 0, &hdr(), 0);
        install(&s, WHO, &grant("b", 3, 5_000), 0, &hdr(), 0);
        install(&s, WHO, &grant("c", 7, 5_000), 0, &hdr(), 0);
        assert_eq!(
            take_jobs(&s),
            vec![Job::Release {
                client: "acme".into(),
                id: "b".into(),
                units: 3
            }]
        );
        let mut n = 0;
        while matches!(take(&s, WHO, 1, 1), Take::Taken { .. }) {
            n += 1;
        }
        assert_eq!(n, 17);
    }

    #[test]
    fn slots_round_trip_and_no_string_forges_a_field() {
        let hostile = "a|b,c;d%e\n\u{1e}\u{7f}é|9,9,9";
        let s = Slot {
            o: owner_key(hostile, "pro"),
            route: hostile.into(),
            cost: 3,
            l: vec![
                Held {
                    id: hostile.into(),
                    left: 7,
                    exp: u64::MAX,
                },
                Held {
                    id: "b".into(),
                    left: 0,
                    exp: 1,
                },
            ],
            hold: 4,
            want: 5,
            used_at: 6,
            win: (7, 8),
            h: vec![
                (hostile.into(), "\"q\";r=1;t=2".into()),
                ("x".into(), "".into()),
            ],
        };
        assert_eq!(decode(&encode(&s)), Some(s));
        assert_eq!(decode(&encode(&Slot::default())), Some(Slot::default()));
        assert_eq!(decode(b"{}"), Some(Slot::default()));
        for bad in [
            &b"v2|||0|0|0|0|0|0||"[..],
            b"v1|||0|0|0|0|0|0|",
            b"v1|||x|0|0|0|0|0||",
            b"v1|||0|0|0|0|0|0|a,1|",
            b"v1|||0|0|0|0|0|0|a,1,2,3|",
            b"v1|%G1||0|0|0|0|0|0||",
            b"v1|%|0|0|0|0|0|0|0||",
            b"\xff",
        ] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn owners_are_unambiguous() {
        assert_ne!(owner_key("a\nb", "c"), owner_key("a", "b\nc"));
        assert_ne!(owner_key("a1", "2"), owner_key("a", "12"));
        assert_eq!(owner_client(&owner_key("a:b\n", "pro")), "a:b\n");
        assert_eq!(owner_client("junk"), "");
        assert_eq!(owner_client("99:x"), "");
    }

    #[test]
    fn a_lease_is_never_held_past_the_longest_life() {
        let s = store();
        install(&s, WHO, &grant("far", 5, u64::MAX), 0, &hdr(), 1_000);
        assert!(matches!(
            take(&s, WHO, 1, 1_000 + MAX_LIFE_MS - 1),
            Take::Taken { .. }
        ));
        assert!(matches!(
            take(&s, WHO, 1, 1_000 + MAX_LIFE_MS),
            Take::Need { .. }
        ));
    }

    #[test]
    fn a_new_lease_dropped_at_once_is_released_once() {
        let s = store();
        install(&s, WHO, &grant("a", 10, 5_000), 0, &hdr(), 0);
        install(&s, WHO, &grant("b", 10, 5_000), 0, &hdr(), 0);
        // "c" has the fewest units left after its request's cost: it goes back, once.
        install(&s, WHO, &grant("c", 4, 5_000), 1, &hdr(), 0);
        assert_eq!(
            take_jobs(&s),
            vec![Job::Release {
                client: "acme".into(),
                id: "c".into(),
                units: 3
            }]
        );
    }

    #[test]
    fn clients_get_their_own_slots_and_a_full_pair_falls_back_to_per_request() {
        let s = store();
        // Both of acme's candidate slots belong to clients holding live leases.
        for (n, i) in candidates(&WHO.key()).into_iter().enumerate() {
            let (_, cas) = read(&s, i).unwrap();
            let squatter = Slot {
                o: owner_key(&format!("other{n}"), "pro"),
                l: vec![Held {
                    id: format!("o{n}"),
                    left: 5,
                    exp: 5_000,
                }],
                ..Default::default()
            };
            write(&s, i, &squatter, cas).unwrap();
        }
        assert_eq!(
            take(&s, WHO, 2, 1),
            Take::Need { want: 2 },
            "no slot: exact cost"
        );
        install(&s, WHO, &grant("mine", 9, 5_000), 2, &hdr(), 1);
        assert!(take_jobs(&s).contains(&Job::Release {
            client: "acme".into(),
            id: "mine".into(),
            units: 7
        }));
        // Once the squatters' leases are gone and idle, the slot can be taken.
        let later = 5_000 + IDLE_MS;
        let _ = take(&s, WHO, 1, later);
        install(&s, WHO, &grant("mine2", 9, later + 5_000), 0, &hdr(), later);
        assert!(matches!(take(&s, WHO, 1, later), Take::Taken { .. }));
    }

    #[test]
    fn concurrent_takers_never_spend_more_than_granted() {
        // Interleave two "workers" at the CAS level: a reader whose write comes after
        // another's must retry, so the total spent is the grant exactly.
        let s = store();
        install(&s, WHO, &grant("a", 50, 5_000), 0, &hdr(), 0);
        let key = slot_key(
            candidates(&WHO.key())
                .into_iter()
                .find(|&i| read(&s, i).unwrap().0.o == WHO.key())
                .unwrap(),
        );
        let (stale, v) = s.get(&key).unwrap();
        assert!(matches!(take(&s, WHO, 1, 1), Take::Taken { .. }));
        assert_eq!(
            s.set(&key, &stale, Some(v)),
            Err(StoreError::CasMismatch),
            "a write based on a stale read fails"
        );
        let mut spent = 1;
        while matches!(take(&s, WHO, 1, 1), Take::Taken { .. }) {
            spent += 1;
        }
        assert_eq!(spent, 50);
    }

    /// `cargo test --release --lib quota_lease::tests::take_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn take_cost() {
        let s = store();
        install(&s, WHO, &grant("a", 1_000_000, u64::MAX), 0, &hdr(), 0);
        let t = std::time::Instant::now();
        for i in 0..100_000 {
            assert!(matches!(take(&s, WHO, 1, 1 + i / 1000), Take::Taken { .. }));
        }
        eprintln!("take: {:?} per request", t.elapsed() / 100_000);
    }

    #[test]
    fn want_follows_the_rate() {
        let s = store();
        install(&s, WHO, &grant("a", 10_000, 60_000), 0, &hdr(), 0);
        // 100 units per 10 ms = 10 per ms -> 20 000 wanted per 2 s, capped.
        for t in 0..=60 {
            for _ in 0..100 {
                take(&s, WHO, 1, 1 + t * 10);
            }
        }
        let (_, slot, _) = locate(&s, &WHO.key(), 1000, &mut vec![]).unwrap();
        assert_eq!(slot.want, MAX_WANT);
    }
}
