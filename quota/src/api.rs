//! The HTTP API (SPEC section 5). Handlers parse and validate, read the clock once, call the
//! store, and turn its [`Decision`] into the JSON answer the filter applies. Every error is
//! `{"error": "<code>", "message": "<text>"}`; hostile input is a 4xx, never a panic.

use crate::alerts::{self, Alert, AlertQueue};
use crate::config::Config;
use crate::decision::{Decision, Outcome, QuotaReport, Which};
use crate::metrics::{DecisionOutcome, Metrics, StoreOp};
use crate::periods::{rfc3339, PeriodKind, Periods};
use crate::policy::{validate_name, Bucket, OveragePolicy, Override, Quota, Setting};
use crate::store::{CheckArgs, ClientRecord, ReleaseArgs, Store, StoreError, Webhook};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use subtle::ConstantTimeEq;

/// Request bodies above this are refused (a check is ~100 bytes, an override ~1 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest `cost` one request may carry.
pub const MAX_COST: u64 = 1_000_000;

/// Unix milliseconds; injected so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    })
}

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub alerts: AlertQueue,
    pub clock: Clock,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/check", post(check))
        .route("/v1/lease", post(lease))
        .route("/v1/lease/release", post(release))
        .route(
            "/v1/clients/{id}",
            put(put_client).get(get_client).delete(delete_client),
        )
        .route("/v1/clients/{id}/usage", get(usage))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Only `/healthz`, `/readyz` and `/metrics`: the HTTP listener of a service started without
/// `--config` (rate limit service only).
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint (the HTTP API needs --config)",
            )
        })
        .with_state(state)
}

/// An error answer in the SPEC's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    fn store(e: StoreError) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body refused: {e} (limit {MAX_BODY_BYTES} bytes)"),
        )
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// The `{id}` of a client path. axum's own rejection (e.g. `%FF`, not UTF-8) is plain text;
/// every error of this API is the SPEC's JSON (found by fuzzing, docs/FUZZING.md).
fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|e| ApiError::bad(format!("invalid client id in the path: {}", e.body_text())))
}

fn name(field: &str, s: &str) -> Result<(), ApiError> {
    validate_name(field, s).map_err(|e| ApiError::bad(e.to_string()))
}

async fn timed<T>(
    m: &Metrics,
    op: StoreOp,
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, ApiError> {
    let start = Instant::now();
    let r = f.await;
    m.store_call(op, start.elapsed(), r.is_ok());
    r.map_err(ApiError::store)
}

// ---------------------------------------------------------------- /v1/check

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    client: String,
    #[serde(default = "d_tier")]
    tier: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default = "d_cost")]
    cost: u64,
}
fn d_tier() -> String {
    "anonymous".into()
}
fn d_cost() -> u64 {
    1
}

/// The answer the filter applies. `headers` go on the response it sends (either way).
#[derive(Debug, Serialize)]
struct CheckResponse {
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset_at: Option<String>,
    /// Units left under the most constraining limit; `null` when nothing limits the client.
    remaining: Option<u64>,
    /// Seconds until that limit is fully available again.
    reset_s: Option<u64>,
    tier: String,
    headers: BTreeMap<&'static str, String>,
}

fn ceil_s(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// The quota (of those with a limit) with the least remaining, with its reset time.
fn tightest_quota(d: &Decision, p: &Periods) -> Option<(PeriodKind, u64, u64, u64)> {
    [
        (PeriodKind::Daily, &d.daily),
        (PeriodKind::Monthly, &d.monthly),
    ]
    .into_iter()
    .filter_map(|(k, q)| {
        q.limit
            .map(|l| (k, l, l.saturating_sub(q.used), p.get(k).end_ms))
    })
    .min_by_key(|(_, _, rem, _)| *rem)
}

fn overage(q: &QuotaReport) -> u64 {
    match (q.limit, q.policy) {
        (Some(l), Some(OveragePolicy::Overage)) => q.used.saturating_sub(l),
        _ => 0,
    }
}

fn build_response(d: &Decision, p: &Periods, now: u64) -> CheckResponse {
    let mut headers = BTreeMap::new();
    let mut remaining: Option<(u64, u64)> = None; // (units, seconds until full)
    if let Some(b) = d.bucket {
        let name = if d.throttled {
            "quota-throttle"
        } else {
            "quota-global"
        };
        let full_s = ceil_s(b.full_in_ms);
        headers.insert(
            "ratelimit-policy",
            format!("\"{name}\";q={};w={}", b.capacity, b.refill_period_s),
        );
        headers.insert(
            "ratelimit",
            format!("\"{name}\";r={};t={full_s}", b.remaining),
        );
        headers.insert("x-ratelimit-limit", b.capacity.to_string());
        headers.insert("x-ratelimit-remaining", b.remaining.to_string());
        headers.insert("x-ratelimit-reset", (now / 1000 + full_s).to_string());
        remaining = Some((b.remaining, full_s));
    }
    if let Some((_, limit, rem, end)) = tightest_quota(d, p) {
        let reset_s = ceil_s(end.saturating_sub(now));
        headers.insert("x-quota-limit", limit.to_string());
        headers.insert("x-quota-remaining", rem.to_string());
        headers.insert("x-quota-reset", (end / 1000).to_string());
        if remaining.is_none_or(|(r, _)| rem < r) {
            remaining = Some((rem, reset_s));
        }
    }
    let over = overage(&d.daily).max(overage(&d.monthly));
    if over > 0 {
        headers.insert("x-quota-overage", over.to_string());
    }
    let mut r = CheckResponse {
        allowed: d.outcome == Outcome::Allowed,
        status: None,
        error: None,
        message: None,
        retry_after_s: None,
        reset_at: None,
        remaining: remaining.map(|r| r.0),
        reset_s: remaining.map(|r| r.1),
        tier: d.tier.clone(),
        headers,
    };
    match d.outcome {
        Outcome::Allowed => {}
        Outcome::RateLimited => {
            let s = ceil_s(d.retry_after_ms).max(1);
            r.status = Some(429);
            r.error = Some("rate_limit_exceeded");
            r.message = Some(if d.throttled {
                format!("quota used up: throttled rate for tier {} exceeded", d.tier)
            } else {
                format!("global rate limit for tier {} exceeded", d.tier)
            });
            r.retry_after_s = Some(s);
            r.headers.insert("retry-after", s.to_string());
        }
        Outcome::QuotaExceeded => {
            let s = ceil_s(d.retry_after_ms).max(1);
            let (kind, q) = match d.exceeded {
                Some(Which::Monthly) => (PeriodKind::Monthly, &d.monthly),
                _ => (PeriodKind::Daily, &d.daily),
            };
            let end = p.get(kind).end_ms;
            r.status = Some(402);
            r.error = Some("quota_exceeded");
            r.message = Some(format!(
                "{} quota of {} used up; resets at {}",
                kind.as_str(),
                q.limit.unwrap_or(0),
                rfc3339(end)
            ));
            r.retry_after_s = Some(s);
            r.reset_at = Some(rfc3339(end));
            r.headers.insert("retry-after", s.to_string());
            r.headers
                .insert("x-quota-limit", q.limit.unwrap_or(0).to_string());
            r.headers.insert("x-quota-remaining", "0".into());
            r.headers.insert("x-quota-reset", (end / 1000).to_string());
        }
    }
    r
}

fn outcome_label(d: &Decision) -> DecisionOutcome {
    match d.outcome {
        Outcome::RateLimited => DecisionOutcome::rate_limited,
        Outcome::QuotaExceeded => DecisionOutcome::quota_exceeded,
        Outcome::Allowed if d.throttled => DecisionOutcome::allowed_throttled,
        Outcome::Allowed if overage(&d.daily) > 0 || overage(&d.monthly) > 0 => {
            DecisionOutcome::allowed_overage
        }
        Outcome::Allowed => DecisionOutcome::allowed,
    }
}

async fn check(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CheckRequest = parse_body(body)?;
    name("client", &req.client)?;
    name("tier", &req.tier)?;
    if let Some(r) = &req.route {
        name("route", r)?;
    }
    if req.cost > MAX_COST {
        return Err(ApiError::bad(format!("cost must be 0..={MAX_COST}")));
    }
    let now = (s.clock)();
    let periods = periods_at(now)?;
    let policy = s.config.tier_policy(&req.tier);
    let d = decide(
        &s,
        &req.client,
        &req.tier,
        &policy,
        req.cost,
        now,
        &periods,
        "check",
    )
    .await?;
    s.metrics.decision(outcome_label(&d));
    enqueue_alerts(&s, &req.client, &d, &periods);
    if d.outcome != Outcome::Allowed {
        // Debug, not info: a client hammering a spent quota must not flood the logs; the
        // decisions counter shows denials at any level.
        tracing::debug!(
            client = %req.client, tier = %d.tier, route = req.route.as_deref().unwrap_or("-"),
            outcome = ?outcome_label(&d), "denied"
        );
    }
    Ok(Json(build_response(&d, &periods, now)).into_response())
}

fn enqueue_alerts(s: &AppState, client: &str, d: &Decision, periods: &Periods) {
    for a in &d.alerts {
        let (kind, q) = match a.which {
            Which::Daily => (PeriodKind::Daily, &d.daily),
            Which::Monthly => (PeriodKind::Monthly, &d.monthly),
        };
        let p = periods.get(kind);
        s.alerts.enqueue(Alert {
            client: client.to_string(),
            tier: d.tier.clone(),
            quota: kind,
            threshold: a.threshold,
            used: q.used,
            limit: q.limit.unwrap_or(0),
            period_start_ms: p.start_ms,
            period_end_ms: p.end_ms,
        });
    }
}

/// One store decision, timed; a store error is counted, logged as `what` failing, and
/// answered (503). Shared by `/v1/check` and `/v1/lease` (each lease try is one decision).
#[allow(clippy::too_many_arguments)]
async fn decide(
    s: &AppState,
    client: &str,
    tier: &str,
    policy: &crate::policy::Policy,
    cost: u64,
    now: u64,
    periods: &Periods,
    what: &str,
) -> Result<Decision, ApiError> {
    let args = CheckArgs {
        client,
        tier,
        tier_policy: policy,
        cost,
        now_ms: now,
        periods,
        thresholds: &s.config.alerts.thresholds,
    };
    match timed(&s.metrics, StoreOp::check, s.store.check(args)).await {
        Ok(d) => Ok(d),
        Err(e) => {
            s.metrics.decision(DecisionOutcome::error);
            tracing::warn!(client = %client, error = %e.message, "{what} failed");
            Err(e)
        }
    }
}

/// The UTC periods at `now` (cached per day: computed once per UTC day).
fn periods_at(now: u64) -> Result<std::sync::Arc<Periods>, ApiError> {
    Periods::at_cached(now).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "clock_error",
            e.to_string(),
        )
    })
}

// ---------------------------------------------------------------- /v1/lease

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseRequest {
    client: String,
    #[serde(default = "d_tier")]
    tier: String,
    #[serde(default)]
    route: Option<String>,
    /// One request's cost: a lease is never smaller, and a refusal of it is the answer.
    #[serde(default = "d_cost")]
    cost: u64,
    /// Units the caller would like (its rate times the lease's life); the service decides.
    #[serde(default)]
    want: Option<u64>,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// `/v1/check`'s answer plus the lease. When denied: `granted` 0 and no lease.
#[derive(Debug, Serialize)]
struct LeaseResponse {
    #[serde(flatten)]
    answer: CheckResponse,
    granted: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
}

/// The decision as if `back` units had not been taken (given back right after).
fn minus(mut d: Decision, back: u64) -> Decision {
    if let Some(b) = d.bucket.as_mut() {
        b.remaining = b.remaining.saturating_add(back).min(b.capacity);
    }
    d.daily.used = d.daily.used.saturating_sub(back);
    d.monthly.used = d.monthly.used.saturating_sub(back);
    d
}

async fn lease(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: LeaseRequest = parse_body(body)?;
    name("client", &req.client)?;
    name("tier", &req.tier)?;
    if let Some(r) = &req.route {
        name("route", r)?;
    }
    if req.cost == 0 || req.cost > MAX_COST {
        return Err(ApiError::bad(format!("cost must be 1..={MAX_COST}")));
    }
    let now = (s.clock)();
    let periods = periods_at(now)?;
    let policy = s.config.tier_policy(&req.tier);
    let want = req.want.unwrap_or(req.cost);
    let mut size = crate::lease::first_size(&policy, req.cost, want);
    // The largest size the decision grants, halving down to one request's cost: each try is
    // an ordinary atomic decision, so nothing is taken unless all of it is.
    let d = loop {
        let d = decide(
            &s,
            &req.client,
            &req.tier,
            &policy,
            size,
            now,
            &periods,
            "lease",
        )
        .await?;
        if d.outcome == Outcome::Allowed {
            break d;
        }
        match crate::lease::smaller(size, req.cost) {
            Some(n) => size = n,
            None => break d,
        }
    };
    s.metrics.decision(outcome_label(&d));
    enqueue_alerts(&s, &req.client, &d, &periods);
    if d.outcome != Outcome::Allowed {
        let answer = build_response(&d, &periods, now);
        return Ok(Json(LeaseResponse {
            answer,
            granted: 0,
            lease_id: None,
            expires_at_ms: None,
        })
        .into_response());
    }
    let lref = crate::lease::LeaseRef {
        nonce: crate::lease::nonce(),
        day_id: periods.day.id.clone(),
        month_id: periods.month.id.clone(),
        bucket: crate::lease::BucketKind::of(&d),
        granted: size,
        expires_ms: crate::lease::expires_at(
            now,
            req.ttl_ms.unwrap_or(crate::lease::DEFAULT_TTL_MS),
            &periods,
        ),
    };
    let mut keep = crate::lease::keep(size, crate::lease::available_after(&d), req.cost);
    if keep < size {
        let back = ReleaseArgs {
            client: &req.client,
            lease: &lref,
            units: size - keep,
            now_ms: now,
        };
        // If the excess cannot go back, the caller keeps it: it is granted either way.
        match timed(&s.metrics, StoreOp::check, s.store.release(back)).await {
            Ok(n) => keep = size - n,
            Err(e) => {
                tracing::warn!(client = %req.client, error = %e.message, "lease trim failed");
                keep = size;
            }
        }
    }
    let d = minus(d, size - keep);
    let answer = build_response(&d, &periods, now);
    Ok(Json(LeaseResponse {
        answer,
        granted: keep,
        lease_id: Some(lref.id()),
        expires_at_ms: Some(lref.expires_ms),
    })
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    client: String,
    lease_id: String,
    units: u64,
}

async fn release(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ReleaseRequest = parse_body(body)?;
    name("client", &req.client)?;
    let lref = crate::lease::LeaseRef::parse(&req.lease_id)
        .ok_or_else(|| ApiError::bad("lease_id is not a lease id this service made"))?;
    let now = (s.clock)();
    let args = ReleaseArgs {
        client: &req.client,
        lease: &lref,
        units: req.units,
        now_ms: now,
    };
    let n = timed(&s.metrics, StoreOp::check, s.store.release(args)).await?;
    Ok(Json(json!({"released": n})).into_response())
}

// ---------------------------------------------------------------- admin API

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.config.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin API is disabled: set admin_token in the service config",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_credentials",
                "admin bearer token required",
            )
        })?;
    // Compare digests so the comparison is constant-time whatever the lengths.
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(token.as_bytes());
    if bool::from(a.ct_eq(&b)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "admin bearer token is wrong",
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PutClient {
    tier: Option<String>,
    limit: Option<Setting<Bucket>>,
    daily: Option<Setting<Quota>>,
    monthly: Option<Setting<Quota>>,
    alert_webhook: Option<Webhook>,
}

const MAX_URL_BYTES: usize = 2048;

fn validate_webhook(w: &Webhook) -> Result<(), ApiError> {
    if w.url.len() > MAX_URL_BYTES {
        return Err(ApiError::bad("alert_webhook.url is too long"));
    }
    let url = reqwest::Url::parse(&w.url)
        .map_err(|e| ApiError::bad(format!("alert_webhook.url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ApiError::bad("alert_webhook.url must be an http(s) URL"));
    }
    alerts::decode_secret(&w.secret)
        .map_err(|e| ApiError::bad(format!("alert_webhook.secret: {e}")))?;
    Ok(())
}

fn record_json(client: &str, rec: &ClientRecord) -> Value {
    let mut m = Map::new();
    m.insert("client".into(), json!(client));
    m.insert(
        "overrides".into(),
        serde_json::to_value(&rec.overrides).unwrap_or(Value::Null),
    );
    // The secret is write-only: show that one is set, never its value.
    m.insert(
        "alert_webhook".into(),
        rec.webhook
            .as_ref()
            .map(|w| json!({"url": w.url, "secret": "(set)"}))
            .unwrap_or(Value::Null),
    );
    Value::Object(m)
}

async fn put_client(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = path_id(id)?;
    name("client", &id)?;
    let req: PutClient = parse_body(body)?;
    if let Some(t) = &req.tier {
        name("tier", t)?;
    }
    // Naming a tier snapshots its settings now; explicit fields win over them.
    let base = req.tier.as_deref().map(|t| s.config.tier_policy(t));
    let ov = Override {
        limit: req.limit.or_else(|| base.as_ref().map(|b| b.limit.clone())),
        daily: req.daily.or_else(|| base.as_ref().map(|b| b.daily.clone())),
        monthly: req
            .monthly
            .or_else(|| base.as_ref().map(|b| b.monthly.clone())),
        tier: req.tier,
    };
    ov.validate().map_err(|e| ApiError::bad(e.to_string()))?;
    if let Some(w) = &req.alert_webhook {
        validate_webhook(w)?;
    }
    let rec = ClientRecord {
        overrides: (ov != Override::default()).then_some(ov),
        webhook: req.alert_webhook,
    };
    timed(&s.metrics, StoreOp::client, s.store.put_client(&id, &rec)).await?;
    tracing::info!(client = %id, "client overrides replaced");
    Ok(Json(record_json(&id, &rec)).into_response())
}

async fn get_client(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = path_id(id)?;
    name("client", &id)?;
    let rec = timed(&s.metrics, StoreOp::client, s.store.get_client(&id)).await?;
    Ok(Json(record_json(&id, &rec)).into_response())
}

async fn delete_client(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = path_id(id)?;
    name("client", &id)?;
    timed(
        &s.metrics,
        StoreOp::client,
        s.store.put_client(&id, &ClientRecord::default()),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    tier: Option<String>,
}

async fn usage(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<UsageQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let id = path_id(id)?;
    name("client", &id)?;
    let Query(q) = q.map_err(|e| ApiError::bad(format!("invalid query: {}", e.body_text())))?;
    if let Some(t) = &q.tier {
        name("tier", t)?;
    }
    let now = (s.clock)();
    let periods = Periods::at(now).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "clock_error",
            e.to_string(),
        )
    })?;
    let snap = timed(
        &s.metrics,
        StoreOp::usage,
        s.store.usage(&id, &periods, now),
    )
    .await?;
    // Which tier's limits to show: the override's, the one asked for, the last one seen.
    let asked = q
        .tier
        .or_else(|| snap.daily.tier.clone())
        .or_else(|| snap.monthly.tier.clone());
    let base = s
        .config
        .tier_policy(asked.as_deref().unwrap_or("anonymous"));
    let (tier, policy) = match &snap.overrides {
        Some(o) => o.apply(asked.as_deref().unwrap_or("anonymous"), &base),
        None => (asked.clone().unwrap_or_default(), base),
    };
    let quota = |kind: PeriodKind, setting: &Setting<Quota>, u: &crate::decision::UsageState| {
        let p = periods.get(kind);
        let q = setting.get();
        json!({
            "used": u.used,
            "limit": q.map(|q| q.limit),
            "remaining": q.map(|q| q.limit.saturating_sub(u.used)),
            "overage": q.map(|q| u.used.saturating_sub(q.limit)).unwrap_or(0),
            "policy": q.map(|q| q.policy.as_str()),
            "period_start": rfc3339(p.start_ms),
            "reset_at": rfc3339(p.end_ms),
            "alerts_sent": u.alerted,
        })
    };
    Ok(Json(json!({
        "client": id,
        "tier": (!tier.is_empty()).then_some(tier),
        "quotas": {
            "daily": quota(PeriodKind::Daily, &policy.daily, &snap.daily),
            "monthly": quota(PeriodKind::Monthly, &policy.monthly, &snap.monthly),
        }
    }))
    .into_response())
}

// ---------------------------------------------------------------- health and metrics

async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(s): State<AppState>) -> Result<Response, ApiError> {
    timed(&s.metrics, StoreOp::ping, s.store.ping()).await?;
    Ok(Json(json!({"status": "ready", "store": s.store.kind()})).into_response())
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}
