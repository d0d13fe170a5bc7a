//! Adaptive tightening (per route `adaptive`): while a route's request rate surges past
//! `surge_factor` × its baseline, its rate limits are tightened for `cooldown_s`.
//!
//! State per route, shared by every worker: one shared-data value (`ag:adapt:r:<route>`,
//! `ag:adapt:d` for the default route), created at configuration and updated with CAS by
//! every request of the route. It holds
//! - the current second (Unix time / 1000) and the route's requests counted in it: the
//!   *current rate* is that count, so a surge is seen by the request that makes it;
//! - the *baseline*: an exponentially weighted mean of the per-second count with time
//!   constant `baseline_s`, folded once per completed second (the first completed second
//!   sets it; seconds without requests fold as 0);
//! - whether the route is tightened, since when and until when.
//!
//! Rules:
//! - a request surges when the count of its second exceeds
//!   `surge_factor × max(baseline, min_rps)`, and only once the baseline has learned for
//!   `min(baseline_s, 60)` seconds (a fresh or idle route is never "surging" on its first
//!   requests: `min_rps` floors an idle route's baseline);
//! - a surge switches the route on for `cooldown_s`; each further surging request while on
//!   pushes the end to `now + cooldown_s`, so the route goes off `cooldown_s` after the last
//!   surging request, not while the surge goes on (no flapping);
//! - while on, the baseline learns nothing (neither surge traffic nor silence);
//! - the switch off happens at the first request of the route at or after the end (the
//!   tightening itself stops exactly at the end: requests compare the clock);
//! - every switch is one CAS write, so exactly one request (on one worker) sees it and emits
//!   the `adaptive_on` / `adaptive_off` event and counter.
//!
//! A tightened route's limits are scaled by `tighten_to` through the request cost: each of
//! its limits takes [`Adaptive::cost_factor`] = ⌈1 / `tighten_to`⌉ times the route's cost
//! (clamped to each bucket's capacity, as the key-sharing `tighten` does), so the limits
//! admit 1 / ⌈1 / `tighten_to`⌉ of their numbers (0.5 → 0.5, 0.25 → 0.25, 0.3 → 0.25).

use crate::store::{SharedStore, StoreError};

const VERSION: u8 = 2;
const RECORD_BYTES: usize = 54;
const MAX_CAS_RETRIES: u32 = 16;
/// Longest warm-up before a route is judged, in seconds.
pub const MAX_WARMUP_S: u64 = 60;

/// A route's compiled `adaptive`.
#[derive(Debug, Clone, PartialEq)]
pub struct Adaptive {
    pub surge_factor: f64,
    pub baseline_s: u64,
    pub tighten_to: f64,
    pub cooldown_s: u64,
    pub min_rps: f64,
    /// Shared-data key of the route's state.
    pub key: String,
}

/// The shared state of one route.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Record {
    /// The second `count` belongs to; 0 = never seen a request.
    sec: u64,
    count: u32,
    /// Requests per second.
    baseline: f64,
    /// Seconds folded into the baseline (saturating).
    learned_s: u32,
    on: bool,
    since_ms: u64,
    until_ms: u64,
    /// 401s and 429s of the route in `sec`, and their baseline (per second), learned like
    /// the request rate.
    denials: u32,
    deny_baseline: f64,
}

impl Record {
    fn decode(b: &[u8]) -> Option<Record> {
        if b.len() != RECORD_BYTES || b[0] != VERSION {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let baseline = f64::from_bits(u64_at(14));
        let deny_baseline = f64::from_bits(u64_at(46));
        let sane = |x: f64| if x.is_finite() && x >= 0.0 { x } else { 0.0 };
        Some(Record {
            on: b[1] == 1,
            sec: u64_at(2),
            count: u32_at(10),
            baseline: if baseline.is_finite() && baseline >= 0.0 {
                baseline
            } else {
                0.0
            },
            learned_s: u32_at(22),
            since_ms: u64_at(26),
            until_ms: u64_at(34),
            denials: u32_at(42),
            deny_baseline: sane(deny_baseline),
        })
    }

    fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0] = VERSION;
        b[1] = u8::from(self.on);
        b[2..10].copy_from_slice(&self.sec.to_le_bytes());
        b[10..14].copy_from_slice(&self.count.to_le_bytes());
        b[14..22].copy_from_slice(&self.baseline.to_bits().to_le_bytes());
        b[22..26].copy_from_slice(&self.learned_s.to_le_bytes());
        b[26..34].copy_from_slice(&self.since_ms.to_le_bytes());
        b[34..42].copy_from_slice(&self.until_ms.to_le_bytes());
        b[42..46].copy_from_slice(&self.denials.to_le_bytes());
        b[46..54].copy_from_slice(&self.deny_baseline.to_bits().to_le_bytes());
        b
    }
}

/// A switch this request made (it won the CAS that made it): log and count it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Switch {
    /// `rate`: requests (or, with `denials`, 401s and 429s) in the current second;
    /// `baseline`: their usual count per second.
    On {
        rate: u32,
        baseline: f64,
        denials: bool,
    },
    /// `tightened_ms`: how long the route was tightened.
    Off { tightened_ms: u64 },
}

/// What one request saw.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observed {
    /// The route's limits are tightened for this request.
    pub tightened: bool,
    pub switches: [Option<Switch>; 2],
}

impl Adaptive {
    /// How many times its cost a request takes from each limit of a tightened route.
    pub fn cost_factor(&self) -> u64 {
        // tighten_to is in (0, 1) (validation); the small epsilon keeps 1/0.2 at 5.
        ((1.0 / self.tighten_to) - 1e-9).ceil().max(1.0) as u64
    }

    /// The share of the limits a tightened route admits.
    pub fn effective_share(&self) -> f64 {
        1.0 / self.cost_factor() as f64
    }

    /// Seconds of learning before the route is judged.
    pub fn warmup_s(&self) -> u64 {
        self.baseline_s.min(MAX_WARMUP_S)
    }

    /// Creates the route's record if missing or foreign (idempotent; at configuration).
    pub fn prepare(&self, store: &dyn SharedStore) -> Result<bool, StoreError> {
        match store.get(&self.key) {
            Some((v, _)) if Record::decode(&v).is_some() => Ok(false),
            _ => store
                .set(&self.key, &Record::default().encode(), None)
                .map(|()| true),
        }
    }

    /// Counts one request of the route at `now_ms` and says whether its limits are
    /// tightened (and which switch, if any, this request made). A missing record or a store
    /// that stays contended leaves the request uncounted, with the state last read.
    pub fn observe(&self, store: &dyn SharedStore, now_ms: u64) -> Observed {
        let mut last = Observed::default();
        for _ in 0..MAX_CAS_RETRIES {
            let Some((bytes, cas)) = store.get(&self.key) else {
                return last;
            };
            let Some(mut r) = Record::decode(&bytes) else {
                return last;
            };
            last.tightened = r.on && now_ms < r.until_ms;
            let out = self.step(&mut r, now_ms);
            match store.set(&self.key, &r.encode(), Some(cas)) {
                Ok(()) => return out,
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return last,
            }
        }
        last
    }

    /// Counts one 401 or 429 answered on the route at `now_ms` (the request itself was
    /// counted by [`Adaptive::observe`]). A surge of them (credential stuffing, a client
    /// hammering a limit) switches the route on like a request surge; while on, denials do
    /// not extend the cooldown, so the 429s the tightening itself causes cannot keep it on.
    pub fn observe_denial(&self, store: &dyn SharedStore, now_ms: u64) -> Observed {
        for _ in 0..MAX_CAS_RETRIES {
            let Some((bytes, cas)) = store.get(&self.key) else {
                return Observed::default();
            };
            let Some(mut r) = Record::decode(&bytes) else {
                return Observed::default();
            };
            let mut out = self.advance(&mut r, now_ms);
            r.denials = r.denials.saturating_add(1);
            let warmed = u64::from(r.learned_s) >= self.warmup_s();
            let threshold = self.surge_factor * r.deny_baseline.max(self.min_rps);
            if warmed && !r.on && f64::from(r.denials) > threshold {
                r.on = true;
                r.since_ms = now_ms;
                r.until_ms = now_ms.saturating_add(self.cooldown_s.saturating_mul(1000));
                let at = usize::from(out.switches[0].is_some());
                out.switches[at] = Some(Switch::On {
                    rate: r.denials,
                    baseline: r.deny_baseline,
                    denials: true,
                });
            }
            out.tightened = r.on;
            match store.set(&self.key, &r.encode(), Some(cas)) {
                Ok(()) => return out,
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return Observed::default(),
            }
        }
        Observed::default()
    }

    /// Moves the record to `now_ms`'s second (folding completed seconds into the baselines)
    /// and switches off an expired tightening.
    fn advance(&self, r: &mut Record, now_ms: u64) -> Observed {
        let mut out = Observed::default();
        let sec = now_ms / 1000;
        let was_on = r.on;
        if r.on && now_ms >= r.until_ms {
            r.on = false;
            out.switches[0] = Some(Switch::Off {
                tightened_ms: r.until_ms.saturating_sub(r.since_ms),
            });
        }
        if r.sec == 0 {
            r.sec = sec;
            r.count = 0;
            r.denials = 0;
        } else if sec > r.sec {
            // The baseline does not learn while tightened (the completed second was a surge,
            // and silence under tightening says nothing either).
            if !was_on {
                self.fold(r, sec - r.sec - 1);
            }
            r.sec = sec;
            r.count = 0;
            r.denials = 0;
        }
        out
    }

    /// The pure transition of one request.
    fn step(&self, r: &mut Record, now_ms: u64) -> Observed {
        let mut out = self.advance(r, now_ms);
        // A worker whose clock is behind (sec < r.sec) counts into the newest second.
        r.count = r.count.saturating_add(1);
        let warmed = u64::from(r.learned_s) >= self.warmup_s();
        let threshold = self.surge_factor * r.baseline.max(self.min_rps);
        if warmed && f64::from(r.count) > threshold {
            let until = now_ms.saturating_add(self.cooldown_s.saturating_mul(1000));
            if !r.on {
                r.on = true;
                r.since_ms = now_ms;
                let at = usize::from(out.switches[0].is_some());
                out.switches[at] = Some(Switch::On {
                    rate: r.count,
                    baseline: r.baseline,
                    denials: false,
                });
            }
            r.until_ms = r.until_ms.max(until);
        }
        out.tightened = r.on;
        out
    }

    /// Folds the completed second (`r.count`, `r.denials`) and then `gap` seconds without
    /// requests into both baselines.
    fn fold(&self, r: &mut Record, gap: u64) {
        let tau = self.baseline_s as f64;
        let decay = (-(gap.min(1 << 20) as f64) / tau).exp();
        for (base, c) in [
            (&mut r.baseline, f64::from(r.count)),
            (&mut r.deny_baseline, f64::from(r.denials)),
        ] {
            if r.learned_s == 0 {
                *base = c;
            } else {
                let a = 1.0 - (-1.0 / tau).exp();
                *base += a * (c - *base);
            }
            *base *= decay;
        }
        r.learned_s = r
            .learned_s
            .saturating_add(u32::try_from(gap.saturating_add(1)).unwrap_or(u32::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const T0: u64 = 1_700_000_000_000;

    fn route(baseline_s: u64, cooldown_s: u64) -> Adaptive {
        Adaptive {
            surge_factor: 10.0,
            baseline_s,
            tighten_to: 0.5,
            cooldown_s,
            min_rps: 1.0,
            key: "ag:adapt:r:t".into(),
        }
    }

    /// `n` requests spread over second `s` (relative to T0).
    fn second(a: &Adaptive, store: &MemoryStore, s: u64, n: u64) -> Vec<Observed> {
        (0..n)
            .map(|i| a.observe(store, T0 + s * 1000 + i * 999 / n.max(1)))
            .collect()
    }

    fn switches(obs: &[Observed]) -> Vec<Switch> {
        obs.iter()
            .flat_map(|o| o.switches.into_iter().flatten())
            .collect()
    }

    #[test]
    fn a_surge_switches_on_then_off_after_the_cooldown_once_each() {
        let a = route(5, 3);
        let s = MemoryStore::new();
        a.prepare(&s).unwrap();
        // Baseline: 5 req/s for 10 s.
        let mut obs = Vec::new();
        for sec in 0..10 {
            obs.extend(second(&a, &s, sec, 5));
        }
        assert!(switches(&obs).is_empty());
        assert!(obs.iter().all(|o| !o.tightened));
        // 50 in one second is 10x: not over; the 51st is.
        let surge = second(&a, &s, 10, 60);
        assert!(surge[..50].iter().all(|o| !o.tightened));
        assert!(surge[50].tightened);
        let sw = switches(&surge);
        assert_eq!(sw.len(), 1, "{sw:?}");
        assert!(
            matches!(sw[0], Switch::On { rate: 51, baseline, denials: false } if (baseline - 5.0).abs() < 0.5),
            "{sw:?}"
        );
        // Quiet traffic while tightened: still on, no events, baseline frozen.
        let quiet = second(&a, &s, 12, 5);
        assert!(quiet.iter().all(|o| o.tightened) && switches(&quiet).is_empty());
        // The cooldown ran from the last surging request (in second 10) for 3 s.
        let after = second(&a, &s, 14, 5);
        assert!(after.iter().all(|o| !o.tightened));
        let sw = switches(&after);
        assert_eq!(sw.len(), 1);
        assert!(
            matches!(sw[0], Switch::Off { tightened_ms } if (2000..=4000).contains(&tightened_ms))
        );
        // The surge did not teach the baseline: the same surge trips again.
        let again = second(&a, &s, 15, 60);
        assert_eq!(switches(&again).len(), 1);
    }

    #[test]
    fn a_sustained_surge_stays_on_without_flapping() {
        let a = route(5, 2);
        let s = MemoryStore::new();
        a.prepare(&s).unwrap();
        for sec in 0..6 {
            second(&a, &s, sec, 2);
        }
        let mut all = Vec::new();
        for sec in 6..20 {
            all.extend(second(&a, &s, sec, 100));
        }
        let sw = switches(&all);
        assert_eq!(sw.len(), 1, "one on, no off while the surge lasts: {sw:?}");
        // Each second's first requests are under the threshold but the route stays on.
        assert!(all[100..].iter().all(|o| o.tightened));
    }

    #[test]
    fn an_idle_or_fresh_route_is_not_surging_on_its_first_requests() {
        let a = route(600, 60);
        let s = MemoryStore::new();
        a.prepare(&s).unwrap();
        // Fresh: 500 requests in the first second, then bursts during the warm-up.
        let mut obs = second(&a, &s, 0, 500);
        obs.extend(second(&a, &s, 30, 500));
        assert!(switches(&obs).is_empty());
        assert_eq!(a.warmup_s(), 60);
        // A route that went idle: its baseline decays to 0 but `min_rps` floors it.
        let a = route(5, 2);
        for (burst, want) in [(10, 0), (11, 1)] {
            let s = MemoryStore::new();
            a.prepare(&s).unwrap();
            for sec in 0..6 {
                second(&a, &s, sec, 3);
            }
            let sw = switches(&second(&a, &s, 1000, burst));
            assert_eq!(sw.len(), want, "{burst} req/s against a floor of 1/s x 10");
        }
    }

    #[test]
    fn two_workers_racing_emit_each_switch_once() {
        // Two "workers": the same store, interleaved requests, each racing through CAS. A
        // store that fails the first CAS of every other write models the lost races.
        struct Racy {
            inner: MemoryStore,
            n: std::cell::Cell<u32>,
        }
        impl SharedStore for Racy {
            fn get(&self, k: &str) -> Option<(Vec<u8>, u32)> {
                self.inner.get(k)
            }
            fn set(&self, k: &str, v: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
                self.n.set(self.n.get() + 1);
                if self.n.get().is_multiple_of(2) {
                    // Another worker's request lands in between.
                    let (cur, ver) = self.inner.get(k).unwrap();
                    let mut r = Record::decode(&cur).unwrap();
                    r.count += 1;
                    self.inner.set(k, &r.encode(), Some(ver)).unwrap();
                }
                self.inner.set(k, v, cas)
            }
        }
        let a = route(5, 2);
        let s = Racy {
            inner: MemoryStore::new(),
            n: Default::default(),
        };
        a.prepare(&s).unwrap();
        let mut all = Vec::new();
        for sec in 0..8 {
            for i in 0..4 {
                all.push(a.observe(&s, T0 + sec * 1000 + i * 200));
            }
        }
        for i in 0..80 {
            all.push(a.observe(&s, T0 + 8000 + i * 10));
        }
        for i in 0..4 {
            all.push(a.observe(&s, T0 + 20_000 + i));
        }
        let sw = switches(&all);
        assert_eq!(sw.len(), 2, "{sw:?}");
        assert!(matches!(sw[0], Switch::On { .. }) && matches!(sw[1], Switch::Off { .. }));
    }

    #[test]
    fn cost_factor_and_foreign_records() {
        let mut a = route(5, 2);
        for (t, f) in [
            (0.5, 2),
            (0.25, 4),
            (0.3, 4),
            (0.2, 5),
            (0.9, 2),
            (0.01, 100),
        ] {
            a.tighten_to = t;
            assert_eq!(a.cost_factor(), f, "{t}");
        }
        let s = MemoryStore::new();
        assert_eq!(
            a.observe(&s, T0),
            Observed::default(),
            "no record: untouched"
        );
        s.set(&a.key, b"junk", None).unwrap();
        assert_eq!(a.observe(&s, T0), Observed::default());
        assert!(a.prepare(&s).unwrap());
        assert!(!a.prepare(&s).unwrap());
        let r = Record {
            sec: 5,
            count: 7,
            baseline: 2.5,
            learned_s: 9,
            on: true,
            since_ms: 11,
            until_ms: 13,
            denials: 17,
            deny_baseline: 0.75,
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
    }

    #[test]
    fn a_surge_of_401s_and_429s_switches_on_but_cannot_keep_it_on() {
        let a = route(5, 3);
        let s = MemoryStore::new();
        a.prepare(&s).unwrap();
        // 20 req/s with 1 denial a second for 10 s: the denial baseline is about 1/s.
        for sec in 0..10 {
            second(&a, &s, sec, 20);
            assert!(a.observe_denial(&s, T0 + sec * 1000 + 500).switches == [None, None]);
        }
        // Same request rate, but 11 denials in one second: more than 10 x max(1, 1).
        let at = T0 + 10_000;
        second(&a, &s, 10, 20);
        let seen: Vec<Observed> = (0..11)
            .map(|i| a.observe_denial(&s, at + 100 + i))
            .collect();
        assert!(seen[..10].iter().all(|o| !o.tightened));
        let sw = switches(&seen);
        assert!(
            matches!(
                sw[..],
                [Switch::On {
                    rate: 11,
                    denials: true,
                    ..
                }]
            ),
            "{sw:?}"
        );
        // While on, more denials (the tightening's own 429s) do not extend the cooldown.
        for sec in 11..13 {
            for i in 0..30 {
                a.observe_denial(&s, T0 + sec * 1000 + i);
            }
        }
        let after = second(&a, &s, 14, 5);
        let sw = switches(&after);
        assert!(matches!(sw[..], [Switch::Off { .. }]), "{sw:?}");
        assert!(after.iter().all(|o| !o.tightened));
    }
}
