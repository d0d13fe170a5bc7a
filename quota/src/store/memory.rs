//! The embedded store: one process's memory, behind one mutex (a decision takes about a
//! microsecond, far less than the HTTP round trip around it). Lost on restart; use Redis for
//! replicas or durability.
//!
//! Bounded: entries expire like the Redis keys do (buckets once full, usage after its period
//! plus grace), swept at most once a minute, and the number of clients is capped.

use super::{
    lease, CheckArgs, ClientRecord, ReleaseArgs, RlsDecision, RlsItem, Store, StoreError,
    StoreFuture, UsageSnapshot, RLS_GRACE_MS, USAGE_GRACE_MS,
};
use crate::decision::{self, BucketState, ClientState, Decision, Input, UsageState};
use crate::lease::BucketKind;
use crate::periods::{Period, Periods};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

pub const DEFAULT_MAX_CLIENTS: usize = 1_000_000;
const SWEEP_EVERY_MS: u64 = 60_000;

#[derive(Debug, Clone)]
struct Usage {
    period_id: String,
    expires_ms: u64,
    state: UsageState,
}

#[derive(Debug, Default)]
struct Entry {
    record: ClientRecord,
    bucket: Option<(BucketState, u64)>,
    throttle: Option<(BucketState, u64)>,
    day: Option<Usage>,
    month: Option<Usage>,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.record != ClientRecord::default()
            || self.bucket.as_ref().is_some_and(|b| b.1 > now)
            || self.throttle.as_ref().is_some_and(|b| b.1 > now)
            || self.day.as_ref().is_some_and(|u| u.expires_ms > now)
            || self.month.as_ref().is_some_and(|u| u.expires_ms > now)
    }
}

fn current(u: &Option<Usage>, p: &Period, now: u64) -> UsageState {
    match u {
        Some(u) if u.period_id == p.id && u.expires_ms > now => u.state.clone(),
        _ => UsageState::default(),
    }
}

fn live_bucket(b: &Option<(BucketState, u64)>, now: u64) -> Option<BucketState> {
    b.as_ref().filter(|(_, exp)| *exp > now).map(|(s, _)| *s)
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    /// Rate limit service counters: key -> ([a, b], expires at).
    rls: HashMap<String, ([u64; 2], u64)>,
    /// Units given back per lease (`store::lease`): lease key -> (units, expires at).
    released: HashMap<String, (u64, u64)>,
    last_sweep_ms: u64,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_clients: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CLIENTS)
    }
}

impl MemoryStore {
    pub fn new(max_clients: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_clients,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave an entry half-written in a way that
        // breaks invariants (each write is a whole value), so recover the guard.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of clients held (for tests and the bound).
    pub fn clients(&self) -> usize {
        self.lock().map.len()
    }

    fn entry<'a>(
        &self,
        inner: &'a mut Inner,
        client: &str,
        now: u64,
    ) -> Result<&'a mut Entry, StoreError> {
        if now.saturating_sub(inner.last_sweep_ms) >= SWEEP_EVERY_MS {
            inner.map.retain(|_, e| e.live(now));
            inner.rls.retain(|_, v| v.1 > now);
            inner.last_sweep_ms = now;
        }
        if !inner.map.contains_key(client) {
            if inner.map.len() >= self.max_clients {
                inner.map.retain(|_, e| e.live(now));
                if inner.map.len() >= self.max_clients {
                    return Err(StoreError::Full(self.max_clients));
                }
            }
            inner.map.insert(client.to_string(), Entry::default());
        }
        inner
            .map
            .get_mut(client)
            .ok_or_else(|| StoreError::Unavailable("entry vanished".into()))
    }

    fn rls_check_sync(&self, items: &[RlsItem], now: u64) -> Result<RlsDecision, StoreError> {
        use crate::rls::config::Algorithm;
        use crate::rls::decide::{self, State, Write};
        let mut inner = self.lock();
        if now.saturating_sub(inner.last_sweep_ms) >= SWEEP_EVERY_MS {
            inner.map.retain(|_, e| e.live(now));
            inner.rls.retain(|_, v| v.1 > now);
            inner.last_sweep_ms = now;
        }
        let get = |k: &str| inner.rls.get(k).filter(|v| v.1 > now).map(|v| v.0);
        let states: Vec<State> = items
            .iter()
            .map(|it| match it.item.algorithm {
                Algorithm::FixedWindow => State {
                    a: get(&it.key).map(|v| v[0]),
                    b: None,
                },
                Algorithm::TokenBucket => {
                    let v = get(&it.key);
                    State {
                        a: v.map(|v| v[0]),
                        b: v.map(|v| v[1]),
                    }
                }
                Algorithm::SlidingWindow => State {
                    a: get(&it.key).map(|v| v[0]),
                    b: get(&it.prev_key).map(|v| v[0]),
                },
            })
            .collect();
        let d = decide::decide(
            &items.iter().map(|i| i.item).collect::<Vec<_>>(),
            &states,
            now,
        );
        let new_keys = d
            .items
            .iter()
            .zip(items)
            .filter(|(r, it)| r.write.is_some() && !inner.rls.contains_key(&it.key))
            .count();
        if new_keys > 0 && inner.rls.len() + new_keys > self.max_clients {
            inner.rls.retain(|_, v| v.1 > now);
            if inner.rls.len() + new_keys > self.max_clients {
                return Err(StoreError::Full(self.max_clients));
            }
        }
        // Same lifetimes as the Redis keys (`scripts::RLS_CHECK`).
        for (r, it) in d.items.iter().zip(items) {
            let i = &it.item;
            let to_end = i.window_end_ms.saturating_sub(now);
            let grace = RLS_GRACE_MS;
            match r.write {
                None => {}
                Some(Write::Count(c)) => {
                    let life = if i.algorithm == Algorithm::SlidingWindow {
                        to_end + i.unit_ms + grace
                    } else {
                        to_end + grace
                    };
                    inner
                        .rls
                        .insert(it.key.clone(), ([c, 0], now.saturating_add(life)));
                }
                Some(Write::Bucket { level, t_ms }) => {
                    let exp = now.saturating_add(r.reset_ms).saturating_add(grace);
                    inner.rls.insert(it.key.clone(), ([level, t_ms], exp));
                }
            }
        }
        Ok(d)
    }

    fn check_sync(&self, a: &CheckArgs<'_>) -> Result<Decision, StoreError> {
        let now = a.now_ms;
        let mut inner = self.lock();
        let e = self.entry(&mut inner, a.client, now)?;
        let (tier, policy) = match &e.record.overrides {
            Some(o) => o.apply(a.tier, a.tier_policy),
            None => (a.tier.to_string(), a.tier_policy.clone()),
        };
        let mut st = ClientState {
            bucket: live_bucket(&e.bucket, now),
            throttle: live_bucket(&e.throttle, now),
            daily: current(&e.day, &a.periods.day, now),
            monthly: current(&e.month, &a.periods.month, now),
        };
        let before = st.clone();
        let d = decision::decide(
            &mut st,
            &tier,
            &policy,
            &Input {
                now_ms: now,
                cost: a.cost,
                day_end_ms: a.periods.day.end_ms,
                month_end_ms: a.periods.month.end_ms,
                thresholds: a.thresholds,
            },
        );
        if st == before {
            return Ok(d);
        }
        // Same expiry rules as the Redis keys: a bucket lives until it would be full again.
        let expiry =
            |s: &BucketState, full_in: u64| (*s, now.saturating_add(full_in).saturating_add(1000));
        let full_in = d.bucket.map(|b| b.full_in_ms).unwrap_or(0);
        if st.bucket != before.bucket {
            e.bucket = st.bucket.as_ref().map(|s| expiry(s, full_in));
        }
        if st.throttle != before.throttle {
            e.throttle = st.throttle.as_ref().map(|s| expiry(s, full_in));
        }
        e.day = Some(Usage {
            period_id: a.periods.day.id.clone(),
            expires_ms: a.periods.day.end_ms.saturating_add(USAGE_GRACE_MS),
            state: st.daily,
        });
        e.month = Some(Usage {
            period_id: a.periods.month.id.clone(),
            expires_ms: a.periods.month.end_ms.saturating_add(USAGE_GRACE_MS),
            state: st.monthly,
        });
        Ok(d)
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn check<'a>(&'a self, args: CheckArgs<'a>) -> StoreFuture<'a, Decision> {
        let r = self.check_sync(&args);
        Box::pin(async move { r })
    }

    fn usage<'a>(
        &'a self,
        client: &'a str,
        periods: &'a Periods,
        now_ms: u64,
    ) -> StoreFuture<'a, UsageSnapshot> {
        let inner = self.lock();
        let snap = match inner.map.get(client) {
            None => UsageSnapshot::default(),
            Some(e) => UsageSnapshot {
                overrides: e.record.overrides.clone(),
                daily: current(&e.day, &periods.day, now_ms),
                monthly: current(&e.month, &periods.month, now_ms),
            },
        };
        Box::pin(async move { Ok(snap) })
    }

    fn put_client<'a>(&'a self, client: &'a str, rec: &'a ClientRecord) -> StoreFuture<'a, ()> {
        let mut inner = self.lock();
        let r = if *rec == ClientRecord::default() {
            if let Some(e) = inner.map.get_mut(client) {
                e.record = ClientRecord::default();
            }
            Ok(())
        } else {
            // Admin writes carry no clock; skip sweeping (now = last sweep) and only cap.
            let now = inner.last_sweep_ms;
            self.entry(&mut inner, client, now)
                .map(|e| e.record = rec.clone())
        };
        Box::pin(async move { r })
    }

    fn get_client<'a>(&'a self, client: &'a str) -> StoreFuture<'a, ClientRecord> {
        let rec = self
            .lock()
            .map
            .get(client)
            .map(|e| e.record.clone())
            .unwrap_or_default();
        Box::pin(async move { Ok(rec) })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn rls_check<'a>(&'a self, items: &'a [RlsItem], now_ms: u64) -> StoreFuture<'a, RlsDecision> {
        let r = self.rls_check_sync(items, now_ms);
        Box::pin(async move { r })
    }

    fn release<'a>(&'a self, a: ReleaseArgs<'a>) -> StoreFuture<'a, u64> {
        let r = self.release_sync(&a);
        Box::pin(async move { r })
    }
}

impl MemoryStore {
    /// `store::lease::RELEASE`, on the in-memory state.
    fn release_sync(&self, a: &ReleaseArgs<'_>) -> Result<u64, StoreError> {
        let now = a.now_ms;
        let keys = lease::ReleaseKeys::new(a.client, a.lease);
        let mut inner = self.lock();
        if inner.released.len() >= self.max_clients {
            inner.released.retain(|_, v| v.1 > now);
            if inner.released.len() >= self.max_clients {
                return Err(StoreError::Full(self.max_clients));
            }
        }
        let done = inner
            .released
            .get(&keys.lease)
            .filter(|v| v.1 > now)
            .map_or(0, |v| v.0);
        let n = lease::to_give_back(a.units, a.lease.granted, done);
        if n == 0 {
            return Ok(0);
        }
        let exp = now.saturating_add(lease::counter_ttl_ms(a.lease, now));
        inner.released.insert(keys.lease, (done + n, exp));
        let Some(e) = inner.map.get_mut(a.client) else {
            return Ok(n);
        };
        for (u, id) in [
            (&mut e.day, &a.lease.day_id),
            (&mut e.month, &a.lease.month_id),
        ] {
            if let Some(u) = u
                .as_mut()
                .filter(|u| u.period_id == *id && u.expires_ms > now)
            {
                u.state.used -= n.min(u.state.used);
            }
        }
        let bucket = match a.lease.bucket {
            BucketKind::None => None,
            BucketKind::Tier => e.bucket.as_mut(),
            BucketKind::Throttle => e.throttle.as_mut(),
        };
        // Above capacity is fine: every load caps the level (`decision::load_bucket`).
        if let Some((b, exp)) = bucket.filter(|(_, exp)| *exp > now) {
            b.level = b.level.saturating_add(n.saturating_mul(b.period_ms));
            let _ = exp;
        }
        Ok(n)
    }
}
