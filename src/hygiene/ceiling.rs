//! The backend ceiling's counters: one shared-data key per route (`ag:ceil:...`), updated
//! with compare-and-swap, so the cap holds across every worker and client.
//!
//! The value packs two things:
//! - `max_rps`: a token bucket of capacity `max_rps` refilling `max_rps` per second (the GCRA
//!   form of `ratelimit::bucket`), so at most `max_rps` requests start in any second;
//! - `max_in_flight`: requests admitted and not yet ended, counted per *generation*. Shared
//!   data has no TTL, and a stream whose end never reaches the filter (a crashed worker, a
//!   native stream dropped after a caught panic) would hold its count forever. So an
//!   admission is counted in the generation of its start (`now / gen_ms`), and only the last
//!   [`GENERATIONS`] generations count: a leaked admission stops counting after
//!   `in_flight_expiry_s` (at most one generation more). The price: a request that really runs
//!   longer than that also stops counting (documented in docs/CONFIG.md).
//!
//! A release names the generation it was counted in; when that generation has been reused
//! meanwhile, the release does nothing (its count already expired).

use crate::config::{BackendCeilingConfig, ConfigError};
use crate::ratelimit::bucket::{ceil_secs, BucketParams, BucketState, Take};
use crate::store::{SharedStore, StoreError};

/// Generations kept (the ring's size).
pub const GENERATIONS: usize = 8;
/// Default `in_flight_expiry_s`.
pub const DEFAULT_EXPIRY_S: u64 = 300;
/// Largest `in_flight_expiry_s`: one day.
pub const MAX_EXPIRY_S: u64 = 86_400;
/// Largest `max_in_flight` (counts are `u32`; a million concurrent requests per route is
/// beyond any single Envoy).
pub const MAX_IN_FLIGHT: u64 = 1_000_000;
/// CAS attempts per update (each failure means another worker wrote meanwhile).
pub const MAX_CAS_RETRIES: u32 = 32;

const VERSION: u8 = 1;
const GEN_BYTES: usize = 12;
/// Version, bucket (`full_at_ms` u64, `frac` u32), then the generations (u64 id, u32 count).
pub const VALUE_BYTES: usize = 1 + 12 + GENERATIONS * GEN_BYTES;

/// A route's ceiling, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ceiling {
    key: String,
    rps: Option<BucketParams>,
    max_in_flight: Option<u32>,
    /// Width of one generation: `expiry / (GENERATIONS - 1)`, rounded up, so an admission
    /// counts for at least the expiry.
    gen_ms: u64,
}

/// An admission counted in flight; give it back with [`Ceiling::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    generation: u64,
}

/// The ceiling's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go on; `Some` when counted in flight (release it at the stream's end).
    Admitted(Option<Lease>),
    /// Over the ceiling: which one, and whole seconds to wait (at least 1).
    Denied {
        limit: &'static str,
        retry_after_s: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Generation {
    id: u64,
    count: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct State {
    bucket: BucketState,
    gens: [Generation; GENERATIONS],
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(a)
}

impl State {
    /// Anything not in the current layout reads as nothing counted.
    fn decode(b: &[u8]) -> State {
        let mut s = State::default();
        if b.len() != VALUE_BYTES || b[0] != VERSION {
            return s;
        }
        s.bucket = BucketState {
            full_at_ms: u64_at(b, 1),
            frac: u32_at(b, 9),
        };
        for (i, g) in s.gens.iter_mut().enumerate() {
            let at = 13 + i * GEN_BYTES;
            *g = Generation {
                id: u64_at(b, at),
                count: u32_at(b, at + 8),
            };
        }
        s
    }

    fn encode(&self) -> [u8; VALUE_BYTES] {
        let mut b = [0u8; VALUE_BYTES];
        b[0] = VERSION;
        b[1..9].copy_from_slice(&self.bucket.full_at_ms.to_le_bytes());
        b[9..13].copy_from_slice(&self.bucket.frac.to_le_bytes());
        for (i, g) in self.gens.iter().enumerate() {
            let at = 13 + i * GEN_BYTES;
            b[at..at + 8].copy_from_slice(&g.id.to_le_bytes());
            b[at + 8..at + 12].copy_from_slice(&g.count.to_le_bytes());
        }
        b
    }

    /// Admissions still counted in generation `now_gen`: those of the last
    /// [`GENERATIONS`] generations (one written by a worker whose clock is slightly ahead
    /// counts too).
    fn in_flight(&self, now_gen: u64) -> u64 {
        self.gens
            .iter()
            .filter(|g| g.count > 0 && g.id.saturating_add(GENERATIONS as u64) > now_gen)
            .map(|g| u64::from(g.count))
            .sum()
    }

    fn slot(id: u64) -> usize {
        (id % GENERATIONS as u64) as usize
    }
}

impl Ceiling {
    /// Validates `backend_ceiling` (`path` is its JSON path).
    pub fn compile(
        path: &str,
        key: &str,
        c: &BackendCeilingConfig,
    ) -> Result<Ceiling, ConfigError> {
        if c.max_rps.is_none() && c.max_in_flight.is_none() {
            return Err(ConfigError::new(path, "needs max_rps and/or max_in_flight"));
        }
        let rps = match c.max_rps {
            None => None,
            Some(n) => Some(BucketParams::new(n, n, 1).map_err(|_| {
                ConfigError::new(
                    format!("{path}.max_rps"),
                    format!("must be 1..={}", crate::ratelimit::bucket::MAX_TOKENS),
                )
            })?),
        };
        let max_in_flight = match c.max_in_flight {
            None => None,
            Some(n) if n == 0 || n > MAX_IN_FLIGHT => {
                return Err(ConfigError::new(
                    format!("{path}.max_in_flight"),
                    format!("must be 1..={MAX_IN_FLIGHT}"),
                ))
            }
            Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        };
        let expiry_s = c.in_flight_expiry_s.unwrap_or(DEFAULT_EXPIRY_S);
        if expiry_s == 0 || expiry_s > MAX_EXPIRY_S {
            return Err(ConfigError::new(
                format!("{path}.in_flight_expiry_s"),
                format!("must be 1..={MAX_EXPIRY_S}"),
            ));
        }
        if c.in_flight_expiry_s.is_some() && max_in_flight.is_none() {
            return Err(ConfigError::new(
                format!("{path}.in_flight_expiry_s"),
                "only applies with max_in_flight",
            ));
        }
        Ok(Ceiling {
            key: key.to_string(),
            rps,
            max_in_flight,
            gen_ms: (expiry_s * 1000).div_ceil(GENERATIONS as u64 - 1),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Creates the route's key when missing (idempotent): call before traffic, since Envoy
    /// inserts a missing key whatever CAS version a writer names.
    pub fn prepare(&self, store: &dyn SharedStore) {
        if store.get(&self.key).is_none() {
            let _ = store.set(&self.key, &State::default().encode(), None);
        }
    }

    /// Admits one request at `now_ms` or says which ceiling it hits. Nothing is counted for
    /// a denied request. `Err` when other workers kept winning the CAS race or the store
    /// refused the write.
    pub fn admit(&self, store: &dyn SharedStore, now_ms: u64) -> Result<Admission, StoreError> {
        for _ in 0..MAX_CAS_RETRIES {
            let (bytes, cas) = match store.get(&self.key) {
                Some((b, v)) => (b, Some(v)),
                None => (Vec::new(), None),
            };
            let mut st = State::decode(&bytes);
            if let Some(p) = &self.rps {
                match p.take(st.bucket, 1, now_ms) {
                    Take::Allowed { state, .. } => st.bucket = state,
                    Take::Denied { retry_after_ms, .. } => {
                        return Ok(Admission::Denied {
                            limit: "max_rps",
                            retry_after_s: ceil_secs(retry_after_ms).max(1),
                        })
                    }
                }
            }
            let lease = match self.max_in_flight {
                None => None,
                Some(max) => {
                    let now_gen = now_ms / self.gen_ms;
                    if st.in_flight(now_gen) >= u64::from(max) {
                        // When a slot frees is unknown: a second is the shortest honest wait.
                        return Ok(Admission::Denied {
                            limit: "max_in_flight",
                            retry_after_s: 1,
                        });
                    }
                    let g = &mut st.gens[State::slot(now_gen)];
                    if g.id != now_gen {
                        // The slot's last user is GENERATIONS generations old: expired.
                        *g = Generation {
                            id: now_gen,
                            count: 0,
                        };
                    }
                    g.count = g.count.saturating_add(1);
                    Some(Lease {
                        generation: now_gen,
                    })
                }
            };
            match store.set(&self.key, &st.encode(), cas) {
                Ok(()) => return Ok(Admission::Admitted(lease)),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::CasMismatch)
    }

    /// Gives back an in-flight admission (at the stream's end, however it ended).
    pub fn release(&self, store: &dyn SharedStore, lease: Lease) -> Result<(), StoreError> {
        for _ in 0..MAX_CAS_RETRIES {
            let Some((bytes, cas)) = store.get(&self.key) else {
                return Ok(());
            };
            let mut st = State::decode(&bytes);
            let g = &mut st.gens[State::slot(lease.generation)];
            if g.id != lease.generation || g.count == 0 {
                // Expired (the generation was reused) or never counted: nothing to give back.
                return Ok(());
            }
            g.count -= 1;
            match store.set(&self.key, &st.encode(), Some(cas)) {
                Ok(()) => return Ok(()),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::CasMismatch)
    }

    /// Requests counted in flight at `now_ms` (for tests and diagnostics).
    pub fn in_flight(&self, store: &dyn SharedStore, now_ms: u64) -> u64 {
        store
            .get(&self.key)
            .map(|(b, _)| State::decode(&b).in_flight(now_ms / self.gen_ms))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, ProcessStore};

    fn ceiling(rps: Option<u64>, fl: Option<u64>, exp: Option<u64>) -> Ceiling {
        Ceiling::compile(
            "r.backend_ceiling",
            "ag:ceil:r:t",
            &BackendCeilingConfig {
                max_rps: rps,
                max_in_flight: fl,
                in_flight_expiry_s: exp,
            },
        )
        .unwrap()
    }

    fn lease(a: Admission) -> Lease {
        match a {
            Admission::Admitted(Some(l)) => l,
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = |rps, fl, exp| {
            Ceiling::compile(
                "routes[2].backend_ceiling",
                "k",
                &BackendCeilingConfig {
                    max_rps: rps,
                    max_in_flight: fl,
                    in_flight_expiry_s: exp,
                },
            )
            .unwrap_err()
            .path
        };
        assert_eq!(err(None, None, None), "routes[2].backend_ceiling");
        assert_eq!(
            err(Some(0), None, None),
            "routes[2].backend_ceiling.max_rps"
        );
        assert_eq!(
            err(Some(2_000_000_000), None, None),
            "routes[2].backend_ceiling.max_rps"
        );
        assert_eq!(
            err(None, Some(0), None),
            "routes[2].backend_ceiling.max_in_flight"
        );
        assert_eq!(
            err(None, Some(MAX_IN_FLIGHT + 1), None),
            "routes[2].backend_ceiling.max_in_flight"
        );
        assert_eq!(
            err(None, Some(1), Some(0)),
            "routes[2].backend_ceiling.in_flight_expiry_s"
        );
        assert_eq!(
            err(Some(1), None, Some(10)),
            "routes[2].backend_ceiling.in_flight_expiry_s"
        );
    }

    #[test]
    fn in_flight_is_exact_and_released() {
        let c = ceiling(None, Some(3), None);
        let s = MemoryStore::new();
        c.prepare(&s);
        let now = 1_700_000_000_000;
        let leases: Vec<Lease> = (0..3).map(|_| lease(c.admit(&s, now).unwrap())).collect();
        assert_eq!(c.in_flight(&s, now), 3);
        assert_eq!(
            c.admit(&s, now + 5).unwrap(),
            Admission::Denied {
                limit: "max_in_flight",
                retry_after_s: 1
            }
        );
        c.release(&s, leases[0]).unwrap();
        assert_eq!(c.in_flight(&s, now), 2);
        let l = lease(c.admit(&s, now + 10).unwrap());
        assert!(matches!(
            c.admit(&s, now + 10).unwrap(),
            Admission::Denied { .. }
        ));
        for l in [l, leases[1], leases[2]] {
            c.release(&s, l).unwrap();
        }
        assert_eq!(c.in_flight(&s, now), 0);
        // A double release gives nothing extra back (counts never go negative).
        c.release(&s, l).unwrap();
        assert_eq!(c.in_flight(&s, now), 0);
    }

    #[test]
    fn leaked_admissions_expire_and_late_releases_do_nothing() {
        let c = ceiling(None, Some(2), Some(70)); // generations of 10 s
        let s = MemoryStore::new();
        let t0 = 1_700_000_000_000;
        let old = lease(c.admit(&s, t0).unwrap());
        let _leaked = lease(c.admit(&s, t0).unwrap());
        assert!(matches!(
            c.admit(&s, t0 + 69_000).unwrap(),
            Admission::Denied { .. }
        ));
        // Past the expiry plus one generation, the leaked admissions no longer count.
        let t1 = t0 + 80_000;
        assert_eq!(c.in_flight(&s, t1), 0);
        let fresh = lease(c.admit(&s, t1).unwrap());
        let _ = lease(c.admit(&s, t1).unwrap());
        // The old request finally ends: its generation is gone, nothing is taken off the
        // new ones.
        c.release(&s, old).unwrap();
        assert_eq!(c.in_flight(&s, t1), 2);
        c.release(&s, fresh).unwrap();
        assert_eq!(c.in_flight(&s, t1), 1);
    }

    #[test]
    fn max_rps_is_a_one_second_bucket_and_denials_count_nothing() {
        let c = ceiling(Some(2), Some(10), None);
        let s = MemoryStore::new();
        let now = 1_700_000_000_000;
        lease(c.admit(&s, now).unwrap());
        lease(c.admit(&s, now).unwrap());
        assert_eq!(
            c.admit(&s, now).unwrap(),
            Admission::Denied {
                limit: "max_rps",
                retry_after_s: 1
            }
        );
        assert_eq!(c.in_flight(&s, now), 2, "a denial holds no slot");
        // Half a second refills one token.
        lease(c.admit(&s, now + 500).unwrap());
        let only_rps = ceiling(Some(1), None, None);
        assert_eq!(
            only_rps.admit(&MemoryStore::new(), now).unwrap(),
            Admission::Admitted(None)
        );
    }

    #[test]
    fn exact_across_threads_on_the_process_store() {
        let c = std::sync::Arc::new(ceiling(None, Some(50), None));
        let s = std::sync::Arc::new(ProcessStore::new());
        c.prepare(&*s);
        let now = 1_700_000_000_000;
        let admitted: u64 = (0..4)
            .map(|_| {
                let (c, s) = (c.clone(), s.clone());
                std::thread::spawn(move || {
                    (0..40)
                        .filter(|_| {
                            matches!(c.admit(&*s, now).unwrap(), Admission::Admitted(Some(_)))
                        })
                        .count() as u64
                })
            })
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(admitted, 50);
        assert_eq!(c.in_flight(&*s, now), 50);
    }

    #[test]
    fn garbage_in_the_store_reads_as_empty() {
        let c = ceiling(None, Some(1), None);
        let s = MemoryStore::new();
        s.set(c.key(), b"junk", None).unwrap();
        assert!(matches!(
            c.admit(&s, 5_000).unwrap(),
            Admission::Admitted(Some(_))
        ));
    }
}
