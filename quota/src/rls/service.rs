//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: resolves each descriptor
//! against the config, asks the store for one atomic decision over the limited ones, and
//! answers in the shape Envoy's `envoy.filters.http.ratelimit` filter reads (overall code, one
//! status per descriptor, in order).

use crate::api::Clock;
use crate::metrics::{Metrics, RlsCode, RlsCodeLabels, RlsLabels, StoreOp};
use crate::rls::config::{Algorithm, CountedLimit, Limit, RateLimitRule, RlsConfig, Unit};
use crate::rls::decide::{self, Item};
use crate::rls::matcher;
use crate::store::{RlsItem, Store};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit as PbUnit, Code, DescriptorStatus, RateLimit as PbRateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use std::sync::Arc;
use std::time::Instant;

/// Hostile-input bounds: more is refused with INVALID_ARGUMENT (Envoy then applies its
/// failure mode), never allocated or sent to the store.
pub const MAX_DESCRIPTORS: usize = 64;
pub const MAX_ENTRIES: usize = 32;
pub const MAX_ENTRY_BYTES: usize = 1024;

#[derive(Clone)]
pub struct RlsService {
    pub config: Arc<RlsConfig>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
}

/// Percent-encodes what would break a key's structure (`{}` end the Cluster hash tag early,
/// `:` `=` `,` separate parts), so distinct descriptors never share a key.
fn esc(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            ':' => out.push_str("%3A"),
            '=' => out.push_str("%3D"),
            ',' => out.push_str("%2C"),
            c => out.push(c),
        }
    }
}

/// `ag:rls:{domain}:k=v,k2=v2`: one hash tag per domain, so one request's keys share a Redis
/// Cluster slot and one script can decide them all.
pub fn key_base(domain: &str, entries: &[(&str, &str)]) -> String {
    let mut s = String::from("ag:rls:{");
    esc(domain, &mut s);
    s.push_str("}:");
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        esc(k, &mut s);
        s.push('=');
        esc(v, &mut s);
    }
    s
}

fn pb_unit(u: Unit) -> PbUnit {
    match u {
        Unit::Second => PbUnit::Second,
        Unit::Minute => PbUnit::Minute,
        Unit::Hour => PbUnit::Hour,
        Unit::Day => PbUnit::Day,
        Unit::Week => PbUnit::Week,
        Unit::Month => PbUnit::Month,
        Unit::Year => PbUnit::Year,
    }
}

fn unit_from_pb(v: i32) -> Option<Unit> {
    match PbUnit::try_from(v).ok()? {
        PbUnit::Second => Some(Unit::Second),
        PbUnit::Minute => Some(Unit::Minute),
        PbUnit::Hour => Some(Unit::Hour),
        PbUnit::Day => Some(Unit::Day),
        PbUnit::Week => Some(Unit::Week),
        PbUnit::Month => Some(Unit::Month),
        PbUnit::Year => Some(Unit::Year),
        PbUnit::Unknown => None,
    }
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn duration(ms: u64) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// What one descriptor resolved to.
enum Resolved<'a> {
    None,
    Unlimited(&'a RateLimitRule, u64),
    Counted {
        limit: CountedLimit,
        name: Option<String>,
        stat_key: String,
        hits: u64,
        /// Index into the store items.
        slot: usize,
    },
}

/// Adds a store item and returns its slot. A descriptor identical to an earlier one of the
/// same request (same counter, same limit) joins it with its hits added: both are decided
/// together, so two copies of one descriptor take two hits from one counter, exactly.
fn add_item(items: &mut Vec<RlsItem>, it: RlsItem) -> usize {
    let same = |a: &RlsItem| {
        a.key == it.key
            && Item {
                hits: it.item.hits,
                ..a.item
            } == it.item
    };
    if let Some(i) = items.iter().position(same) {
        let merged = &mut items[i].item;
        merged.hits = merged
            .hits
            .saturating_add(it.item.hits)
            .min(merged.limit.saturating_add(1));
        return i;
    }
    items.push(it);
    items.len() - 1
}

fn invalid(msg: impl Into<String>) -> tonic::Status {
    tonic::Status::invalid_argument(msg.into())
}

fn validate(req: &RateLimitRequest) -> Result<(), tonic::Status> {
    if req.domain.is_empty() {
        return Err(invalid("rate limit domain must not be empty"));
    }
    if req.descriptors.is_empty() {
        return Err(invalid("rate limit descriptor list must not be empty"));
    }
    if req.descriptors.len() > MAX_DESCRIPTORS {
        return Err(invalid(format!(
            "at most {MAX_DESCRIPTORS} descriptors per request"
        )));
    }
    for d in &req.descriptors {
        if d.entries.len() > MAX_ENTRIES {
            return Err(invalid(format!(
                "at most {MAX_ENTRIES} entries per descriptor"
            )));
        }
        if d.entries
            .iter()
            .any(|e| e.key.len() > MAX_ENTRY_BYTES || e.value.len() > MAX_ENTRY_BYTES)
        {
            return Err(invalid(format!(
                "descriptor keys and values are at most {MAX_ENTRY_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

/// Hits for one descriptor: its own `hits_addend` when set (0 = check without counting),
/// else the request's, where 0 means unset and counts 1 (Envoy's proto). A refund
/// (`is_negative_hits`) is not supported: it is checked without counting.
fn hits_of(d: &RateLimitDescriptor, request_hits: u32) -> u64 {
    if d.is_negative_hits {
        return 0;
    }
    match &d.hits_addend {
        Some(h) => h.value,
        None => u64::from(request_hits.max(1)),
    }
}

impl RlsService {
    pub fn new(
        config: Arc<RlsConfig>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        Self {
            config,
            store,
            metrics,
            clock,
        }
    }

    /// The whole call, without the gRPC layer (the in-process tests call it directly).
    pub async fn decide(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, tonic::Status> {
        validate(req)?;
        let now = (self.clock)();
        let root = self.config.domains.get(&req.domain);
        let entries: Vec<Vec<(&str, &str)>> = req
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| (e.key.as_str(), e.value.as_str()))
                    .collect()
            })
            .collect();
        let matches: Vec<Option<matcher::Match>> = entries
            .iter()
            .map(|e| root.and_then(|r| matcher::find_match(r, e)))
            .collect();
        let rules =
            matcher::apply_replaces(matches.iter().map(|m| m.as_ref().map(|m| m.rule)).collect());
        // share_threshold: the wildcard pattern stands for the value in the counter's key.
        let entries: Vec<Vec<(&str, &str)>> = entries
            .into_iter()
            .zip(&matches)
            .map(|(mut e, m)| {
                for (i, pattern) in m.iter().flat_map(|m| m.shared.iter()) {
                    if let Some(slot) = e.get_mut(*i) {
                        slot.1 = pattern;
                    }
                }
                e
            })
            .collect();

        let mut resolved = Vec::with_capacity(rules.len());
        let mut items: Vec<RlsItem> = Vec::new();
        for ((d, rule), ents) in req.descriptors.iter().zip(rules).zip(&entries) {
            let hits = hits_of(d, req.hits_addend);
            // A per-request override (Envoy's `limit` in the descriptor) replaces the
            // configured numbers, keeping the rule's algorithm and shadow mode.
            let over = d.limit.and_then(|o| {
                unit_from_pb(o.unit).map(|unit| (unit, u64::from(o.requests_per_unit)))
            });
            let counted = match (rule, over) {
                (Some(r), None) => match &r.limit {
                    Limit::Unlimited => {
                        resolved.push(Resolved::Unlimited(r, hits));
                        continue;
                    }
                    Limit::Counted(c) => Some((c.clone(), r)),
                },
                (rule, Some((unit, n))) => {
                    let algorithm = match rule.map(|r| &r.limit) {
                        Some(Limit::Counted(c)) => c.algorithm,
                        _ => Algorithm::FixedWindow,
                    };
                    // Keep the smooth algorithms inside their exact range.
                    let algorithm = if algorithm != Algorithm::FixedWindow
                        && u128::from(n) * u128::from(unit.nominal_ms()) >= 1u128 << 52
                    {
                        Algorithm::FixedWindow
                    } else {
                        algorithm
                    };
                    let limit = CountedLimit {
                        unit,
                        requests_per_unit: n,
                        algorithm,
                    };
                    match rule {
                        Some(r) => Some((limit, r)),
                        None => {
                            let it = self.item(&req.domain, ents, &limit, hits, false, now)?;
                            resolved.push(Resolved::Counted {
                                limit: limit.clone(),
                                name: None,
                                stat_key: "_override".into(),
                                hits,
                                slot: add_item(&mut items, it),
                            });
                            continue;
                        }
                    }
                }
                (None, None) => None,
            };
            match counted {
                None => resolved.push(Resolved::None),
                Some((limit, r)) => {
                    let it = self.item(&req.domain, ents, &limit, hits, r.shadow_mode, now)?;
                    resolved.push(Resolved::Counted {
                        limit: limit.clone(),
                        name: r.name.clone(),
                        stat_key: r.stat_key.clone(),
                        hits,
                        slot: add_item(&mut items, it),
                    });
                }
            }
        }

        let decision = if items.is_empty() {
            decide::Decision {
                over: false,
                items: Vec::new(),
            }
        } else {
            let started = Instant::now();
            let r = self.store.rls_check(&items, now).await;
            self.metrics
                .store_call(StoreOp::rls, started.elapsed(), r.is_ok());
            r.map_err(|e| tonic::Status::unavailable(e.to_string()))?
        };
        if decision.items.len() != items.len() {
            return Err(tonic::Status::internal(
                "store answered for the wrong items",
            ));
        }

        let m = &self.metrics.rls;
        let labels = |key: &str| RlsLabels {
            domain: req.domain.clone(),
            key: key.to_string(),
        };
        let mut statuses = Vec::with_capacity(resolved.len());
        for r in &resolved {
            statuses.push(match r {
                Resolved::None => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                Resolved::Unlimited(rule, hits) => {
                    let l = labels(&rule.stat_key);
                    m.total_hits.get_or_create(&l).inc_by(*hits);
                    m.within_limit.get_or_create(&l).inc_by(*hits);
                    DescriptorStatus {
                        code: Code::Ok as i32,
                        limit_remaining: u32::MAX,
                        ..Default::default()
                    }
                }
                Resolved::Counted {
                    limit,
                    name,
                    stat_key,
                    hits,
                    slot,
                    ..
                } => {
                    let res = decision.items[*slot];
                    let l = labels(stat_key);
                    m.total_hits.get_or_create(&l).inc_by(*hits);
                    // As envoyproxy/ratelimit counts: a shadow-mode denial is over the limit
                    // (and in shadow_mode), though answered OK.
                    if res.over || res.shadow_denied {
                        m.over_limit.get_or_create(&l).inc_by(*hits);
                        if res.shadow_denied {
                            m.shadow_mode.get_or_create(&l).inc_by(*hits);
                        }
                    } else {
                        m.within_limit.get_or_create(&l).inc_by(*hits);
                        let used = limit.requests_per_unit.saturating_sub(res.remaining);
                        if u128::from(used) * 10 >= u128::from(limit.requests_per_unit) * 8 {
                            m.near_limit.get_or_create(&l).inc_by(*hits);
                        }
                    }
                    DescriptorStatus {
                        code: if res.over {
                            Code::OverLimit as i32
                        } else {
                            Code::Ok as i32
                        },
                        current_limit: Some(PbRateLimit {
                            name: name.clone().unwrap_or_default(),
                            requests_per_unit: clamp_u32(limit.requests_per_unit),
                            unit: pb_unit(limit.unit) as i32,
                        }),
                        limit_remaining: clamp_u32(res.remaining),
                        duration_until_reset: Some(duration(res.reset_ms)),
                        quota: None,
                    }
                }
            });
        }
        Ok(RateLimitResponse {
            overall_code: if decision.over {
                Code::OverLimit as i32
            } else {
                Code::Ok as i32
            },
            statuses,
            ..Default::default()
        })
    }

    fn item(
        &self,
        domain: &str,
        entries: &[(&str, &str)],
        limit: &CountedLimit,
        hits: u64,
        shadow: bool,
        now: u64,
    ) -> Result<RlsItem, tonic::Status> {
        let (start, end) = decide::window(limit.unit, limit.algorithm, now)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let unit_ms = limit.unit.nominal_ms();
        let base = key_base(domain, entries);
        let unit = limit.unit.as_str();
        let (key, prev_key) = match limit.algorithm {
            Algorithm::FixedWindow => {
                let k = format!("{base}:f:{unit}:{start}");
                (k.clone(), k)
            }
            Algorithm::TokenBucket => {
                let k = format!("{base}:t:{unit}");
                (k.clone(), k)
            }
            Algorithm::SlidingWindow => (
                format!("{base}:s:{unit}:{start}"),
                format!("{base}:s:{unit}:{}", start.saturating_sub(unit_ms)),
            ),
        };
        Ok(RlsItem {
            key,
            prev_key,
            item: Item {
                algorithm: limit.algorithm,
                limit: limit.requests_per_unit,
                unit_ms,
                window_start_ms: start,
                window_end_ms: end,
                // Anything above the limit can never pass; clamping keeps the math exact.
                hits: hits.min(limit.requests_per_unit.saturating_add(1)),
                shadow,
            },
        })
    }
}

#[tonic::async_trait]
impl RateLimitService for RlsService {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let started = Instant::now();
        tracing::debug!(request = ?request.get_ref(), "ShouldRateLimit");
        let r = self.decide(request.get_ref()).await;
        let code = match &r {
            Ok(resp) if resp.overall_code == Code::OverLimit as i32 => RlsCode::over_limit,
            Ok(_) => RlsCode::ok,
            Err(e) => {
                tracing::warn!(code = ?e.code(), "ShouldRateLimit: {}", e.message());
                RlsCode::error
            }
        };
        self.metrics
            .rls
            .requests
            .get_or_create(&RlsCodeLabels { code })
            .inc();
        self.metrics
            .rls
            .latency
            .observe(started.elapsed().as_secs_f64());
        r.map(tonic::Response::new)
    }
}

/// PEM certificate chain and key for serving the gRPC API over TLS.
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Serves the gRPC API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: RlsService,
    tls: Option<TlsFiles>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        let identity = tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let incoming = tokio_stream_listener(listener);
    builder
        .add_service(RateLimitServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_separators_and_share_the_domain_tag() {
        assert_eq!(
            key_base("d", &[("a", "1"), ("b", "2")]),
            "ag:rls:{d}:a=1,b=2"
        );
        assert_ne!(
            key_base("d", &[("a", "1,b=2")]),
            key_base("d", &[("a", "1"), ("b", "2")])
        );
        assert_eq!(key_base("x}y", &[("k", "{v}")]), "ag:rls:{x%7Dy}:k=%7Bv%7D");
    }

    #[test]
    fn request_hits_zero_means_one_and_descriptor_hits_win() {
        let mut d = RateLimitDescriptor::default();
        assert_eq!(hits_of(&d, 0), 1);
        assert_eq!(hits_of(&d, 5), 5);
        d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
        assert_eq!(hits_of(&d, 5), 0);
        d.is_negative_hits = true;
        d.hits_addend = None;
        assert_eq!(hits_of(&d, 5), 0);
    }
}
