//! The Redis store: standalone (`redis://`, `rediss://`) or Cluster (`redis+cluster://h1:p1,h2:p2`).
//! Every decision runs in a Lua script ([`scripts::CHECK`] / [`scripts::CHECK_MANY`]); nothing
//! is read-modify-written from the service. Connections reconnect by themselves (redis-rs
//! `ConnectionManager` / `ClusterConnection`), so a Redis restart costs the failed calls, not
//! the process.
//!
//! Batching (standalone only): concurrent checks are queued to one task that sends whatever
//! has queued as one `EVALSHA` of `CHECK_MANY` (up to [`MAX_BATCH`] decisions), with at most
//! [`MAX_IN_FLIGHT`] such calls outstanding. A lone check goes out at once (no timer); under
//! load, the checks that arrive during one round trip share the next one. On Cluster the
//! clients of a batch would live in different slots, so each check is its own `CHECK` call
//! (redis-rs pipelines concurrent calls per node). quota/README.md has the exactness argument.

use super::{
    admin_keys, lease, scripts, CheckArgs, ClientKeys, ClientRecord, ReleaseArgs, RlsDecision,
    RlsItem, Store, StoreError, StoreFuture, UsageSnapshot, Webhook, RLS_GRACE_MS, USAGE_GRACE_MS,
};
use crate::decision::{
    BucketReport, Decision, FiredAlert, Outcome, QuotaReport, UsageState, Which,
};
use crate::periods::Periods;
use crate::policy::{OveragePolicy, Override, Policy};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Script, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most decisions in one `CHECK_MANY` call: bounds the time Redis spends in one script
/// (12-15 us a decision measured, so about 1 ms) and so the wait of commands behind it.
pub const MAX_BATCH: usize = 64;
/// Batches outstanding at once: one being executed while the next is sent keeps Redis busy
/// without letting the queue grow behind a slow round trip.
pub const MAX_IN_FLIGHT: usize = 2;
/// Checks waiting for a batch; beyond this, callers wait (backpressure, not memory growth).
const QUEUE: usize = 16 * MAX_BATCH;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// One check, owned, on its way to the batching task.
struct Job {
    /// override, bucket, throttle, day, month
    keys: [String; 5],
    now: u64,
    cost: u64,
    tier: String,
    policy: Arc<str>,
    day_end: u64,
    month_end: u64,
    thresholds: String,
    reply: oneshot::Sender<Result<Decision, StoreError>>,
}

impl Job {
    fn new(
        a: &CheckArgs<'_>,
        policies: &PolicyCache,
    ) -> Result<(Self, oneshot::Receiver<Result<Decision, StoreError>>), StoreError> {
        let k = ClientKeys::new(a.client, a.periods);
        let (tx, rx) = oneshot::channel();
        let job = Job {
            keys: [k.overrides, k.bucket, k.throttle, k.day, k.month],
            now: a.now_ms,
            cost: a.cost,
            tier: a.tier.to_string(),
            policy: policies.json(a.tier_policy)?,
            day_end: a.periods.day.end_ms,
            month_end: a.periods.month.end_ms,
            thresholds: thresholds_csv(a.thresholds),
            reply: tx,
        };
        Ok((job, rx))
    }
}

/// Tier policies as the JSON the scripts read, serialized once: a service has a handful of
/// tiers and serializing one per check is measurable. Bounded (cleared when full) so
/// arbitrary policies (tests, future callers) cannot grow it.
#[derive(Default)]
struct PolicyCache(std::sync::Mutex<Vec<(Policy, Arc<str>)>>);

impl PolicyCache {
    const MAX: usize = 64;

    fn json(&self, p: &Policy) -> Result<Arc<str>, StoreError> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, j)) = v.iter().find(|(q, _)| q == p) {
            return Ok(j.clone());
        }
        let j: Arc<str> = serde_json::to_string(p)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .into();
        if v.len() >= Self::MAX {
            v.clear();
        }
        v.push((p.clone(), j.clone()));
        Ok(j)
    }
}

fn thresholds_csv(t: &[u32]) -> String {
    t.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Calls and decisions sent by the batching task (`decisions / calls` = mean batch size).
#[derive(Debug, Default)]
pub struct BatchStats {
    calls: AtomicU64,
    decisions: AtomicU64,
}

/// Sends `jobs` as one `CHECK_MANY` and answers each. A failed call fails every job of it;
/// a failed decision fails only its job.
async fn send_batch(conn: &Conn, script: &Script, timeout: Duration, jobs: Vec<Job>) {
    let results = run_many(conn, script, timeout, &jobs).await;
    for (job, r) in jobs.into_iter().zip(results) {
        // The caller may have given up (timeout); nothing to do then.
        let _ = job.reply.send(r);
    }
}

async fn run_many(
    conn: &Conn,
    script: &Script,
    timeout: Duration,
    jobs: &[Job],
) -> Vec<Result<Decision, StoreError>> {
    let all = |e: StoreError| jobs.iter().map(|_| Err(e.clone())).collect();
    // Distinct policies once each (usually one per tier), referenced by 1-based index.
    let mut index: HashMap<&str, usize> = HashMap::new();
    // (A policy is keyed by its JSON: equal policies share one entry.)
    let mut policies: Vec<&str> = Vec::new();
    let refs: Vec<usize> = jobs
        .iter()
        .map(|j| {
            *index.entry(&*j.policy).or_insert_with(|| {
                policies.push(&*j.policy);
                policies.len()
            })
        })
        .collect();
    let mut inv = script.prepare_invoke();
    inv.arg(USAGE_GRACE_MS).arg(policies.len());
    for p in &policies {
        inv.arg(*p);
    }
    for (j, pi) in jobs.iter().zip(&refs) {
        for k in &j.keys {
            inv.key(k.as_str());
        }
        inv.arg(j.now)
            .arg(j.cost)
            .arg(j.tier.as_str())
            .arg(*pi)
            .arg(j.day_end)
            .arg(j.month_end)
            .arg(j.thresholds.as_str());
    }
    let fut = async {
        match conn.clone() {
            Conn::Single(mut c) => inv.invoke_async::<Value>(&mut c).await,
            Conn::Cluster(mut c) => inv.invoke_async::<Value>(&mut c).await,
        }
    };
    let v = match tokio::time::timeout(timeout, fut).await {
        Err(_) => return all(timeout_error(timeout)),
        Ok(Err(e)) => return all(unavailable(e)),
        Ok(Ok(v)) => v,
    };
    let replies = match as_array(&v) {
        Ok(a) if a.len() == jobs.len() => a,
        _ => return all(corrupt("batched check reply has the wrong length")),
    };
    replies.iter().map(parse_batched).collect()
}

/// One element of `CHECK_MANY`'s reply: a decision or `{"E", message}`.
fn parse_batched(v: &Value) -> Result<Decision, StoreError> {
    if let Value::Array(a) = v {
        if let [Value::BulkString(tag), msg] = a.as_slice() {
            if tag.as_slice() == b"E" {
                return Err(StoreError::Unavailable(as_string(msg)?));
            }
        }
    }
    parse_decision(v)
}

fn timeout_error(timeout: Duration) -> StoreError {
    StoreError::Timeout(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
}

/// The batching task: waits for a free in-flight slot, then for at least one job, takes
/// every job queued by then (up to `MAX_BATCH`) and sends them as one call. Ends when the
/// store (the only sender) is dropped.
async fn batcher(
    mut rx: mpsc::Receiver<Job>,
    conn: Conn,
    script: Script,
    timeout: Duration,
    stats: Arc<BatchStats>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let script = Arc::new(script);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
            return;
        }
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats
            .decisions
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let (conn, script) = (conn.clone(), script.clone());
        tokio::spawn(async move {
            send_batch(&conn, &script, timeout, jobs).await;
            drop(permit);
        });
    }
}

pub struct RedisStore {
    conn: Conn,
    /// Standalone only: the queue to the batching task.
    batch: Option<mpsc::Sender<Job>>,
    batch_stats: Arc<BatchStats>,
    policies: PolicyCache,
    check_many: Script,
    check: Script,
    usage: Script,
    put_client: Script,
    get_client: Script,
    rls_check: Script,
    timeout: Duration,
}

/// How to reach Redis, parsed from `--redis`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    /// Seed nodes as `redis://` URLs.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// `redis://` / `rediss://` / `unix://` for one server; `redis+cluster://[user:pass@]h1:p1,h2:p2`
    /// (or `rediss+cluster://`) for Cluster seed nodes.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        for (scheme, inner) in [
            ("redis+cluster://", "redis://"),
            ("rediss+cluster://", "rediss://"),
        ] {
            if let Some(rest) = url.strip_prefix(scheme) {
                let (auth, hosts) = match rest.rsplit_once('@') {
                    Some((a, h)) => (format!("{a}@"), h),
                    None => (String::new(), rest),
                };
                let (hosts, path) = match hosts.split_once('/') {
                    Some((h, p)) => (h, format!("/{p}")),
                    None => (hosts, String::new()),
                };
                let nodes: Vec<String> = hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(|h| format!("{inner}{auth}{h}{path}"))
                    .collect();
                if nodes.is_empty() {
                    return Err(StoreError::Unavailable(format!(
                        "no cluster nodes in {scheme}..."
                    )));
                }
                return Ok(RedisTarget::Cluster(nodes));
            }
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")
        {
            Ok(RedisTarget::Single(url.to_string()))
        } else {
            Err(StoreError::Unavailable(
                "--redis must start with redis://, rediss://, unix:// or redis+cluster://".into(),
            ))
        }
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects (standalone connections are made lazily and retried, so the service can start
    /// before Redis; `/readyz` reports when it is reachable) and loads the scripts.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let conn = match RedisTarget::parse(url)? {
            RedisTarget::Single(u) => {
                let client = redis::Client::open(u.as_str()).map_err(unavailable)?;
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, cfg).map_err(unavailable)?,
                )
            }
            RedisTarget::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(unavailable)?;
                Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?)
            }
        };
        let check_many = Script::new(scripts::CHECK_MANY);
        let batch_stats = Arc::new(BatchStats::default());
        let batch = match &conn {
            Conn::Single(_) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(batcher(
                    rx,
                    conn.clone(),
                    check_many.clone(),
                    timeout,
                    batch_stats.clone(),
                ));
                Some(tx)
            }
            Conn::Cluster(_) => None,
        };
        let store = Self {
            conn,
            batch,
            batch_stats,
            policies: PolicyCache::default(),
            check_many,
            check: Script::new(scripts::CHECK),
            usage: Script::new(scripts::USAGE),
            put_client: Script::new(scripts::PUT_CLIENT),
            get_client: Script::new(scripts::GET_CLIENT),
            rls_check: Script::new(scripts::RLS_CHECK),
            timeout,
        };
        // Best effort: a Redis that is down now gets the scripts on first use (NOSCRIPT path).
        let _ = store.load_scripts().await;
        Ok(store)
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        for s in [
            &self.check,
            &self.check_many,
            &self.usage,
            &self.put_client,
            &self.get_client,
            &self.rls_check,
        ] {
            match self.conn.clone() {
                Conn::Single(mut c) => s.load_async(&mut c).await.map_err(unavailable)?,
                Conn::Cluster(mut c) => s.load_async(&mut c).await.map_err(unavailable)?,
            };
        }
        Ok(())
    }

    /// `(calls, decisions)` sent by the batching task so far (0 on Cluster).
    pub fn batch_stats(&self) -> (u64, u64) {
        (
            self.batch_stats.calls.load(Ordering::Relaxed),
            self.batch_stats.decisions.load(Ordering::Relaxed),
        )
    }

    /// Decides `checks` in one round trip, in order, as the batching task does (one
    /// `CHECK_MANY`; on Cluster one `CHECK` per check, since their keys are in different
    /// slots). One answer per check: a failed decision fails only its own entry.
    pub async fn check_batch(&self, checks: &[CheckArgs<'_>]) -> Vec<Result<Decision, StoreError>> {
        let mut jobs = Vec::with_capacity(checks.len());
        for a in checks {
            match Job::new(a, &self.policies) {
                Ok((j, _)) => jobs.push(j),
                Err(e) => return checks.iter().map(|_| Err(e.clone())).collect(),
            }
        }
        if jobs.is_empty() {
            return Vec::new();
        }
        match self.conn {
            Conn::Single(_) => run_many(&self.conn, &self.check_many, self.timeout, &jobs).await,
            Conn::Cluster(_) => {
                let mut out = Vec::with_capacity(checks.len());
                for a in checks {
                    out.push(self.check_one(a).await);
                }
                out
            }
        }
    }

    /// One check as its own `CHECK` call (Cluster).
    async fn check_one(&self, a: &CheckArgs<'_>) -> Result<Decision, StoreError> {
        let keys = ClientKeys::new(a.client, a.periods);
        let policy = self.policies.json(a.tier_policy)?;
        let thresholds = thresholds_csv(a.thresholds);
        let (now, cost) = (a.now_ms.to_string(), a.cost.to_string());
        let (day_end, month_end) = (
            a.periods.day.end_ms.to_string(),
            a.periods.month.end_ms.to_string(),
        );
        let grace = USAGE_GRACE_MS.to_string();
        let v = self
            .run(
                &self.check,
                &[
                    &keys.overrides,
                    &keys.bucket,
                    &keys.throttle,
                    &keys.day,
                    &keys.month,
                ],
                &[
                    &now,
                    &cost,
                    a.tier,
                    &policy,
                    &day_end,
                    &month_end,
                    &thresholds,
                    &grace,
                ],
            )
            .await?;
        parse_decision(&v)
    }

    async fn run(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, StoreError> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let fut = async {
            match self.conn.clone() {
                Conn::Single(mut c) => inv.invoke_async::<Value>(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async::<Value>(&mut c).await,
            }
        };
        let ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(StoreError::Timeout(ms)),
            Ok(r) => r.map_err(unavailable),
        }
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn as_i64(v: &Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("expected an integer")),
        _ => Err(corrupt("expected an integer")),
    }
}

fn as_u64(v: &Value) -> Result<u64, StoreError> {
    Ok(u64::try_from(as_i64(v)?.max(0)).unwrap_or(0))
}

fn as_string(v: &Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| corrupt("expected UTF-8")),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Okay => Ok("OK".into()),
        Value::Int(i) => Ok(i.to_string()),
        _ => Err(corrupt("expected a string")),
    }
}

fn as_array(v: &Value) -> Result<&[Value], StoreError> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(corrupt("expected an array")),
    }
}

fn quota_report(used: &Value, limit: &Value, policy: &Value) -> Result<QuotaReport, StoreError> {
    let limit = as_i64(limit)?;
    Ok(QuotaReport {
        used: as_u64(used)?,
        limit: u64::try_from(limit).ok(),
        policy: OveragePolicy::from_code(as_i64(policy)?),
    })
}

/// Reads `CHECK`'s reply into the same [`Decision`] the memory store builds.
fn parse_decision(v: &Value) -> Result<Decision, StoreError> {
    let a = as_array(v)?;
    if a.len() != 16 {
        return Err(corrupt("check script reply has the wrong length"));
    }
    let cap = as_u64(&a[2])?;
    let bucket = (cap > 0)
        .then(|| -> Result<BucketReport, StoreError> {
            Ok(BucketReport {
                capacity: cap,
                refill_period_s: as_u64(&a[3])?,
                remaining: as_u64(&a[4])?,
                full_in_ms: as_u64(&a[5])?,
            })
        })
        .transpose()?;
    let alerts_csv = as_string(&a[14])?;
    let mut alerts = Vec::new();
    for item in alerts_csv.split(',').filter(|s| !s.is_empty()) {
        let (which, th) = match item.split_at_checked(1) {
            Some(("d", th)) => (Which::Daily, th),
            Some(("m", th)) => (Which::Monthly, th),
            _ => return Err(corrupt("bad alert marker")),
        };
        let threshold = th.parse().map_err(|_| corrupt("bad alert threshold"))?;
        alerts.push(FiredAlert { which, threshold });
    }
    Ok(Decision {
        outcome: Outcome::from_code(as_i64(&a[0])?).ok_or_else(|| corrupt("bad outcome"))?,
        tier: as_string(&a[1])?,
        bucket,
        throttled: as_i64(&a[6])? == 1,
        retry_after_ms: as_u64(&a[7])?,
        daily: quota_report(&a[8], &a[9], &a[10])?,
        monthly: quota_report(&a[11], &a[12], &a[13])?,
        alerts,
        exceeded: match as_i64(&a[15])? {
            1 => Some(Which::Daily),
            2 => Some(Which::Monthly),
            _ => None,
        },
    })
}

/// Reads `RLS_CHECK`'s reply (writes are not reported back: the script made them).
fn parse_rls(v: &Value, n: usize) -> Result<RlsDecision, StoreError> {
    let a = as_array(v)?;
    if a.len() != 1 + 4 * n {
        return Err(corrupt("rate limit script reply has the wrong length"));
    }
    let items = a[1..]
        .chunks(4)
        .map(|c| {
            Ok(crate::rls::decide::ItemResult {
                over: as_i64(&c[0])? == 1,
                shadow_denied: as_i64(&c[1])? == 1,
                remaining: as_u64(&c[2])?,
                reset_ms: as_u64(&c[3])?,
                write: None,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(RlsDecision {
        over: as_i64(&a[0])? == 1,
        items,
    })
}

fn parse_usage_hash(v: &Value) -> Result<UsageState, StoreError> {
    let a = as_array(v)?;
    let mut u = UsageState::default();
    for pair in a.chunks(2) {
        let [k, val] = pair else {
            return Err(corrupt("odd HGETALL reply"));
        };
        let k = as_string(k)?;
        match k.as_str() {
            "u" => u.used = as_u64(val)?,
            "tier" => u.tier = Some(as_string(val)?),
            _ => {
                if let Some(th) = k.strip_prefix('a').and_then(|t| t.parse().ok()) {
                    u.alerted.push(th);
                }
            }
        }
    }
    u.alerted.sort_unstable();
    Ok(u)
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<Option<T>, StoreError> {
    if s.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(s)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("stored client record: {e}")))
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn check<'a>(&'a self, a: CheckArgs<'a>) -> StoreFuture<'a, Decision> {
        Box::pin(async move {
            let Some(queue) = &self.batch else {
                return self.check_one(&a).await;
            };
            let (job, rx) = Job::new(&a, &self.policies)?;
            // The deadline covers the queue and the batch's round trip.
            let answer = async {
                queue
                    .send(job)
                    .await
                    .map_err(|_| StoreError::Unavailable("batching task stopped".into()))?;
                rx.await
                    .map_err(|_| StoreError::Unavailable("batching task stopped".into()))?
            };
            match tokio::time::timeout(self.timeout, answer).await {
                Err(_) => Err(timeout_error(self.timeout)),
                Ok(r) => r,
            }
        })
    }

    fn usage<'a>(
        &'a self,
        client: &'a str,
        periods: &'a Periods,
        _now_ms: u64,
    ) -> StoreFuture<'a, UsageSnapshot> {
        Box::pin(async move {
            let keys = ClientKeys::new(client, periods);
            let v = self
                .run(&self.usage, &[&keys.overrides, &keys.day, &keys.month], &[])
                .await?;
            let a = as_array(&v)?;
            let [o, d, m] = a else {
                return Err(corrupt("usage script reply has the wrong length"));
            };
            Ok(UsageSnapshot {
                overrides: parse_json::<Override>(&as_string(o)?)?,
                daily: parse_usage_hash(d)?,
                monthly: parse_usage_hash(m)?,
            })
        })
    }

    fn put_client<'a>(&'a self, client: &'a str, rec: &'a ClientRecord) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (ko, kw) = admin_keys(client);
            let enc = |r: Result<String, serde_json::Error>| {
                r.map_err(|e| StoreError::Corrupt(e.to_string()))
            };
            let o = match &rec.overrides {
                Some(o) => enc(serde_json::to_string(o))?,
                None => String::new(),
            };
            let w = match &rec.webhook {
                Some(w) => enc(serde_json::to_string(w))?,
                None => String::new(),
            };
            self.run(&self.put_client, &[&ko, &kw], &[&o, &w]).await?;
            Ok(())
        })
    }

    fn get_client<'a>(&'a self, client: &'a str) -> StoreFuture<'a, ClientRecord> {
        Box::pin(async move {
            let (ko, kw) = admin_keys(client);
            let v = self.run(&self.get_client, &[&ko, &kw], &[]).await?;
            let [o, w] = as_array(&v)? else {
                return Err(corrupt("client script reply has the wrong length"));
            };
            Ok(ClientRecord {
                overrides: parse_json::<Override>(&as_string(o)?)?,
                webhook: parse_json::<Webhook>(&as_string(w)?)?,
            })
        })
    }

    fn rls_check<'a>(&'a self, items: &'a [RlsItem], now_ms: u64) -> StoreFuture<'a, RlsDecision> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(RlsDecision {
                    over: false,
                    items: Vec::new(),
                });
            }
            let mut keys: Vec<&str> = Vec::with_capacity(items.len() * 2);
            let mut args: Vec<String> = vec![now_ms.to_string(), RLS_GRACE_MS.to_string()];
            for it in items {
                keys.push(&it.key);
                keys.push(&it.prev_key);
                let i = &it.item;
                args.extend([
                    i.algorithm.code().to_string(),
                    i.limit.to_string(),
                    i.unit_ms.to_string(),
                    i.window_start_ms.to_string(),
                    i.window_end_ms.to_string(),
                    i.hits.to_string(),
                    u8::from(i.shadow).to_string(),
                ]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let v = self.run(&self.rls_check, &keys, &args).await?;
            parse_rls(&v, items.len())
        })
    }

    fn release<'a>(&'a self, a: ReleaseArgs<'a>) -> StoreFuture<'a, u64> {
        // Rare next to checks: the script's SHA is computed once, the script itself is loaded
        // on first use (redis-rs retries after NOSCRIPT).
        static RELEASE: std::sync::LazyLock<Script> =
            std::sync::LazyLock::new(|| Script::new(lease::RELEASE));
        Box::pin(async move {
            let k = lease::ReleaseKeys::new(a.client, a.lease);
            let (units, granted) = (a.units.to_string(), a.lease.granted.to_string());
            let ttl = lease::counter_ttl_ms(a.lease, a.now_ms).to_string();
            let has_bucket = if k.bucket.is_some() { "1" } else { "0" };
            let bucket = k.bucket.as_deref().unwrap_or(&k.lease);
            let v = self
                .run(
                    &RELEASE,
                    &[&k.lease, &k.day, &k.month, bucket],
                    &[&units, &granted, &ttl, has_bucket],
                )
                .await?;
            as_u64(&v)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let fut = async {
                let cmd = redis::cmd("PING");
                match self.conn.clone() {
                    Conn::Single(mut c) => cmd.query_async::<String>(&mut c).await,
                    Conn::Cluster(mut c) => cmd.query_async::<String>(&mut c).await,
                }
            };
            let ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
            match tokio::time::timeout(self.timeout, fut).await {
                Err(_) => Err(StoreError::Timeout(ms)),
                Ok(r) => r.map(|_| ()).map_err(unavailable),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_expand_to_seed_nodes() {
        assert_eq!(
            RedisTarget::parse("redis+cluster://:pw@a:7000,b:7001").unwrap(),
            RedisTarget::Cluster(vec![
                "redis://:pw@a:7000".into(),
                "redis://:pw@b:7001".into()
            ])
        );
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379/0").unwrap(),
            RedisTarget::Single("redis://127.0.0.1:6379/0".into())
        );
        assert!(RedisTarget::parse("http://x").is_err());
        assert!(RedisTarget::parse("redis+cluster://").is_err());
    }

    #[test]
    fn malformed_script_replies_are_errors_not_panics() {
        assert!(parse_decision(&Value::Nil).is_err());
        assert!(parse_decision(&Value::Array(vec![Value::Int(0)])).is_err());
        assert!(parse_usage_hash(&Value::Array(vec![Value::Int(0)])).is_err());
    }
}
