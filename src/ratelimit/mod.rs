//! Local rate limiting: token buckets in Envoy shared data, exact across workers and bounded
//! in memory (SPEC sections 2-3: `rate_limits`, route `cost`, rate-limit headers, 429).
//!
//! - [`bucket`]: the arithmetic of one bucket (pure).
//! - [`table`]: the fixed slot tables in shared data, CAS updates, `prepare`.
//! - [`config`]: validation and compilation of `rate_limits` / `rate_limit_table`.
//! - [`headers`]: the response headers.
//!
//! A request goes through [`RateLimiter::check`] twice: once with the route's pre-auth limits
//! (keys of `ip`, `route`, `header:*` only, and no tiers) before credentials are verified, so
//! credential stuffing is throttled before any signature work, and once with the rest after.
//! Within a stage the limits are checked first (one `get` each) and written only when all
//! pass (one CAS `set` each), so a request denied by one limit consumes nothing from the
//! others. A write that loses a race is re-read and re-decided; if it now denies, what the
//! request already took (this stage and the pre-auth one, kept in [`Taken`]) is refunded.

pub mod bucket;
pub mod config;
pub mod exempt;
pub mod headers;
pub mod near_miss;
pub mod stage;
pub mod table;
pub mod window;

pub use self::config::{KeyPart, Limit, LimitRule, RateLimiter, RoutePlan, TierRule};
pub use self::headers::{RateLimitHeaders, Report};
pub use self::table::WhenFull;

use self::bucket::{ceil_secs, BucketParams, BucketState, BucketStatus, Take};
use self::config::MAX_LIMITS_PER_ROUTE;
use self::table::{SlotKey, SlotView, Step, TableError};
use crate::identity::{Identity, ANONYMOUS_TIER};
use crate::store::SharedStore;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use xxhash_rust::xxh3::Xxh3Default;

/// What the key parts are computed from.
#[derive(Debug, Clone, Copy)]
pub struct RequestKeys<'a> {
    /// The client IP (`client_ip::resolve`); empty when unknown.
    pub ip: &'a str,
    /// The api-guard route name (empty for the default route).
    pub route: &'a str,
    /// Request headers with lower-case names, as read once from the host.
    pub headers: &'a [(String, String)],
    /// The verified identity; `None` before credentials or when there are none.
    pub identity: Option<&'a Identity>,
}

impl<'a> RequestKeys<'a> {
    pub fn tier(&self) -> &'a str {
        self.identity.map_or(ANONYMOUS_TIER, |i| i.tier.as_str())
    }

    fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn claim(&self, name: &str) -> Option<&'a str> {
        self.identity?
            .claims
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of a part, and whether it fell back to the IP (absent identity, header or
    /// claim: like Kong, a missing value never lets a request skip the limit, and never puts
    /// every request without it into one shared bucket).
    fn part(&self, p: &KeyPart) -> (&'a str, bool) {
        let v = match p {
            KeyPart::Ip => return (self.ip, false),
            KeyPart::Route => return (self.route, false),
            KeyPart::Tier => return (self.tier(), false),
            KeyPart::Client => self.identity.map(|i| i.client.as_str()),
            KeyPart::Header(h) => self.header(h),
            KeyPart::Claim(c) => self.claim(c),
        };
        match v {
            Some(v) => (v, false),
            None => (self.ip, true),
        }
    }
}

/// What happened at one limit, for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The limit admitted the request (and took its tokens).
    Allowed,
    /// The limit refused the request.
    Denied,
    /// A `shadow` limit would have refused it; it was let through.
    ShadowDenied,
    /// No slot was free for the key; `when_full` decided.
    SlotPressure,
    /// Shared data stayed contended (or refused a write); `when_full` decided.
    Contention,
    /// The request matched the limit's or the route's `exempt` and bypassed the limit.
    Exempt,
    /// The request made its key first reach `near_miss_ratio` of the limit, and the key had
    /// not reported within the limit's fill time: see [`Decision::near_misses`].
    NearMiss,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The bucket has too few tokens.
    Exhausted,
    /// No slot for the key and `when_full` is `deny`.
    SlotsFull,
    /// Shared data stayed contended and `when_full` is `deny`.
    Contention,
}

/// A refusal: the limit that refused, and when the request would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    pub limit: usize,
    pub reason: DenyReason,
    /// Whole seconds, rounded up, at least 1.
    pub retry_after_s: u64,
}

/// The outcome of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub denial: Option<Denial>,
    /// The limit to show in the headers (least remaining; the refusing one on a denial).
    pub report: Option<Report>,
    /// Near misses to log (allowed requests only).
    pub near_misses: [Option<NearMissHit>; MAX_LIMITS_PER_ROUTE],
}

/// A key that first reached `near_miss_ratio` of a limit (shadow limits too: near misses
/// are how a shadow limit's numbers get tuned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NearMissHit {
    pub limit: usize,
    /// Whole tokens in use after this request.
    pub used: u64,
    pub capacity: u64,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.denial.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TakenEntry {
    limit: usize,
    key: SlotKey,
    params: BucketParams,
    cost: u64,
}

/// Tokens a request has taken so far, so a later refusal can give them back. Lives in the
/// HTTP context from the pre-auth stage to the post-auth one.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    entries: [Option<TakenEntry>; MAX_LIMITS_PER_ROUTE],
}

impl Taken {
    fn push(&mut self, e: TakenEntry) {
        if let Some(slot) = self.entries.iter_mut().find(|s| s.is_none()) {
            *slot = Some(e);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.iter().all(Option::is_none)
    }
}

/// A limit that passed the check phase and waits for its write.
struct Pending {
    limit: usize,
    key: SlotKey,
    params: BucketParams,
    read: table::Read,
}

enum Commit {
    Allowed(BucketStatus),
    Denied {
        retry_after_ms: u64,
        status: BucketStatus,
    },
    Busy,
}

fn retry_secs(ms: u64) -> u64 {
    ceil_secs(ms).max(1)
}

impl RateLimiter {
    /// Pre-creates every slot page of every limit (idempotent). Call once per configuration
    /// from the root context's `on_configure`, before traffic.
    pub fn prepare(&self, store: &dyn SharedStore) -> Result<u32, TableError> {
        let mut created = 0;
        for l in &self.limits {
            created += l.table.prepare(store)?;
            if near_miss::prepare(store, &l.near_miss_key).map_err(|_| TableError::StoreFailed)? {
                created += 1;
            }
        }
        Ok(created)
    }

    /// The 64-bit hash identifying a request's bucket within a limit.
    fn key_hash(&self, limit: &Limit, keys: &RequestKeys<'_>) -> u64 {
        let mut h = Xxh3Default::new();
        for part in &limit.key {
            let (value, fallback) = keys.part(part);
            // Tag + length prefix: parts can never run into each other, and an identity
            // equal to an IP string never shares the IP's bucket.
            let tag = match (part, fallback) {
                (_, true) => b'i',
                (KeyPart::Ip, _) => b'p',
                (KeyPart::Client, _) => b'c',
                (KeyPart::Route, _) => b'r',
                (KeyPart::Tier, _) => b't',
                (KeyPart::Header(_), _) => b'h',
                (KeyPart::Claim(_), _) => b'm',
            };
            h.update(&[tag]);
            h.update(&(value.len() as u64).to_le_bytes());
            h.update(value.as_bytes());
        }
        if matches!(limit.rule, LimitRule::Tiered { .. }) {
            // One bucket per (key, tier): its numbers never change under it.
            let tier = keys.tier();
            h.update(b"T");
            h.update(&(tier.len() as u64).to_le_bytes());
            h.update(tier.as_bytes());
        }
        h.digest()
    }

    /// Checks, and if all pass takes `cost` tokens from, the limits `ids` (one stage of a
    /// route's [`RoutePlan`]), except those the request is exempt from (the limit's own
    /// `exempt`, or the route's `route_exempt`). On a refusal, everything in `taken` (earlier
    /// stages too) is given back. `observe` is told what happened at each limit, for stats.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &self,
        ids: &[usize],
        cost: u64,
        route_exempt: Option<&exempt::Exempt>,
        keys: &RequestKeys<'_>,
        now_ms: u64,
        store: &dyn SharedStore,
        taken: &mut Taken,
        observe: &mut dyn FnMut(usize, Event),
    ) -> Decision {
        let mut pending: [Option<Pending>; MAX_LIMITS_PER_ROUTE] = Default::default();
        let mut report: Option<Report> = None;
        let mut denial: Option<(Denial, Report)> = None;
        let when_full = self.when_full;

        let deny = |d: Denial, status: BucketStatus, denial: &mut Option<(Denial, Report)>| {
            let r = Report {
                limit: d.limit,
                status,
            };
            if denial.is_none_or(|(cur, _)| d.retry_after_s > cur.retry_after_s) {
                *denial = Some((d, r));
            }
        };

        // Check phase: one read per limit, nothing written.
        for (n, &id) in ids.iter().take(MAX_LIMITS_PER_ROUTE).enumerate() {
            let Some(limit) = self.limits.get(id) else {
                continue;
            };
            if route_exempt
                .into_iter()
                .chain(&limit.exempt)
                .any(|e| e.matches(keys))
            {
                observe(id, Event::Exempt);
                continue;
            }
            let Some(params) = limit.rule.params_for(keys.tier()) else {
                continue; // unlimited or uncovered tier
            };
            // A cost raised past a bucket's capacity (a `tighten`) asks for the whole bucket
            // rather than never passing; config validation keeps the route's own cost below.
            let cost = cost.min(params.capacity());
            let key = limit.table.locate(self.key_hash(limit, keys));
            let read = limit.table.read(store, key, now_ms);
            match read.view {
                SlotView::Busy { free_in_ms } => {
                    observe(id, Event::SlotPressure);
                    if when_full == WhenFull::Deny && !limit.shadow {
                        observe(id, Event::Denied);
                        let status = BucketStatus {
                            capacity: params.capacity(),
                            refill_period_s: params.refill_period_s(),
                            remaining: 0,
                            full_in_ms: free_in_ms,
                        };
                        deny(
                            Denial {
                                limit: id,
                                reason: DenyReason::SlotsFull,
                                retry_after_s: retry_secs(free_in_ms),
                            },
                            status,
                            &mut denial,
                        );
                    } else if !limit.shadow {
                        // Untracked this time: show what a fresh bucket would say.
                        report = Report::tighter(report, fresh_report(id, &params, cost, now_ms));
                    }
                }
                SlotView::Existing(_) | SlotView::Fresh => {
                    let state = read.view.state().unwrap_or(BucketState::FULL);
                    match params.take(state, cost, now_ms) {
                        Take::Allowed { .. } => {
                            pending[n] = Some(Pending {
                                limit: id,
                                key,
                                params,
                                read,
                            });
                        }
                        Take::Denied {
                            retry_after_ms,
                            status,
                        } => {
                            if limit.shadow {
                                observe(id, Event::ShadowDenied);
                            } else {
                                observe(id, Event::Denied);
                                deny(
                                    Denial {
                                        limit: id,
                                        reason: DenyReason::Exhausted,
                                        retry_after_s: retry_secs(retry_after_ms),
                                    },
                                    status,
                                    &mut denial,
                                );
                            }
                        }
                    }
                }
            }
        }
        if let Some((d, r)) = denial {
            self.refund(taken, now_ms, store);
            return Decision {
                denial: Some(d),
                report: Some(r),
                near_misses: Default::default(),
            };
        }

        // Commit phase: CAS-write each bucket, re-deciding on a lost race.
        let mut near_misses: [Option<NearMissHit>; MAX_LIMITS_PER_ROUTE] = Default::default();
        for (n, p) in pending.iter_mut().enumerate() {
            let Some(p) = p.take() else { continue };
            let Some(limit) = self.limits.get(p.limit) else {
                continue;
            };
            let (params, key) = (p.params, p.key);
            let cost = cost.min(params.capacity());
            let res = limit
                .table
                .update(store, key, now_ms, Some(p.read), |view| {
                    match view.state() {
                        None => Step::Stop(Commit::Busy),
                        Some(s) => match params.take(s, cost, now_ms) {
                            Take::Allowed { state, status } => {
                                Step::Write(state, Commit::Allowed(status))
                            }
                            Take::Denied {
                                retry_after_ms,
                                status,
                            } => Step::Stop(Commit::Denied {
                                retry_after_ms,
                                status,
                            }),
                        },
                    }
                });
            let failed = match res {
                Ok(Commit::Allowed(status)) => {
                    observe(p.limit, Event::Allowed);
                    taken.push(TakenEntry {
                        limit: p.limit,
                        key,
                        params,
                        cost,
                    });
                    let used = status.capacity.saturating_sub(status.remaining);
                    if self.near_miss.crossed(status.capacity, used, cost) {
                        near_misses[n] = Some(NearMissHit {
                            limit: p.limit,
                            used,
                            capacity: status.capacity,
                        });
                    }
                    if !limit.shadow {
                        report = Report::tighter(
                            report,
                            Some(Report {
                                limit: p.limit,
                                status,
                            }),
                        );
                    }
                    continue;
                }
                Ok(Commit::Denied {
                    retry_after_ms,
                    status,
                }) => {
                    if limit.shadow {
                        observe(p.limit, Event::ShadowDenied);
                        continue;
                    }
                    observe(p.limit, Event::Denied);
                    (DenyReason::Exhausted, retry_after_ms, status)
                }
                Ok(Commit::Busy) | Err(TableError::Busy) => {
                    observe(p.limit, Event::SlotPressure);
                    (DenyReason::SlotsFull, 1000, empty_status(&params))
                }
                Err(TableError::Contention) | Err(TableError::StoreFailed) => {
                    observe(p.limit, Event::Contention);
                    (DenyReason::Contention, 1000, empty_status(&params))
                }
            };
            let (reason, retry_ms, status) = failed;
            let enforce =
                !limit.shadow && (reason == DenyReason::Exhausted || when_full == WhenFull::Deny);
            if !enforce {
                if !limit.shadow {
                    report = Report::tighter(report, fresh_report(p.limit, &params, cost, now_ms));
                }
                continue;
            }
            if reason != DenyReason::Exhausted {
                observe(p.limit, Event::Denied);
            }
            self.refund(taken, now_ms, store);
            return Decision {
                denial: Some(Denial {
                    limit: p.limit,
                    reason,
                    retry_after_s: retry_secs(retry_ms),
                }),
                report: Some(Report {
                    limit: p.limit,
                    status,
                }),
                near_misses: Default::default(),
            };
        }
        // Admitted: report the crossings whose key has not reported within its period
        // (shared by every worker).
        for hit in near_misses.iter_mut() {
            let Some(h) = *hit else { continue };
            let Some(limit) = self.limits.get(h.limit) else {
                continue;
            };
            let Some(params) = limit.rule.params_for(keys.tier()) else {
                continue;
            };
            let period = near_miss::NearMiss::period_ms(
                params.capacity(),
                params.refill_tokens(),
                params.refill_period_s(),
            );
            if near_miss::admit(
                store,
                &limit.near_miss_key,
                self.key_hash(limit, keys),
                now_ms,
                period,
            ) {
                observe(h.limit, Event::NearMiss);
            } else {
                *hit = None;
            }
        }
        Decision {
            denial: None,
            report,
            near_misses,
        }
    }

    /// Gives back every token in `taken` (best effort: a bucket that refilled to full or
    /// whose update stays contended is left as is) and empties it.
    pub fn refund(&self, taken: &mut Taken, now_ms: u64, store: &dyn SharedStore) {
        for e in taken.entries.iter_mut().rev().filter_map(Option::take) {
            let Some(limit) = self.limits.get(e.limit) else {
                continue;
            };
            let _ = limit
                .table
                .update(store, e.key, now_ms, None, |view| match view {
                    SlotView::Existing(s) if !s.is_full_at(now_ms) => {
                        Step::Write(e.params.refund(*s, e.cost), ())
                    }
                    _ => Step::Stop(()),
                });
        }
    }

    /// A readable bucket key for the deny log: `ip=1.2.3.4,header:x-user=bob`. Values are
    /// cut at 64 bytes; credential headers are shown only as a hash prefix.
    pub fn describe_key(&self, limit: usize, keys: &RequestKeys<'_>) -> String {
        let mut out = String::new();
        let Some(limit) = self.limits.get(limit) else {
            return out;
        };
        for (i, part) in limit.key.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let (value, fallback) = keys.part(part);
            let name = match part {
                KeyPart::Ip => "ip".to_string(),
                KeyPart::Client => "client".to_string(),
                KeyPart::Route => "route".to_string(),
                KeyPart::Tier => "tier".to_string(),
                KeyPart::Header(h) => format!("header:{h}"),
                KeyPart::Claim(c) => format!("claim:{c}"),
            };
            out.push_str(&name);
            out.push('=');
            let secret =
                !fallback && matches!(part, KeyPart::Header(h) if self.secret_headers.contains(h));
            if fallback {
                out.push_str("ip:");
            }
            if secret {
                let d = Sha256::digest(value.as_bytes());
                out.push_str("sha256:");
                for b in &d[..6] {
                    let _ = write!(out, "{b:02x}");
                }
            } else {
                let mut cut = value.len().min(64);
                while !value.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.push_str(&value[..cut]);
            }
        }
        if matches!(limit.rule, LimitRule::Tiered { .. }) {
            let _ = write!(out, ";tier={}", keys.tier());
        }
        out
    }

    /// The headers for a report (see [`Decision::report`], merged over both stages with
    /// [`Report::tighter`]); `retry_after_s` on a 429 only.
    pub fn headers(
        &self,
        report: &Report,
        now_ms: u64,
        retry_after_s: Option<u64>,
    ) -> Option<RateLimitHeaders> {
        let limit = self.limits.get(report.limit)?;
        Some(RateLimitHeaders::new(
            &limit.name,
            &report.status,
            now_ms,
            retry_after_s,
        ))
    }
}

fn empty_status(p: &BucketParams) -> BucketStatus {
    BucketStatus {
        capacity: p.capacity(),
        refill_period_s: p.refill_period_s(),
        remaining: 0,
        full_in_ms: 1000,
    }
}

fn fresh_report(limit: usize, p: &BucketParams, cost: u64, now_ms: u64) -> Option<Report> {
    match p.take(BucketState::FULL, cost, now_ms) {
        Take::Allowed { status, .. } => Some(Report { limit, status }),
        Take::Denied { .. } => None,
    }
}

#[cfg(test)]
mod tests;
