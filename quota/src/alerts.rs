//! Quota alerts: when a check crosses a threshold (marked atomically by the store, so once per
//! threshold per period), the handler queues an [`Alert`]; a background task POSTs it to the
//! client's webhook, signed per Standard Webhooks, retrying with exponential backoff.
//! `/v1/check` never waits for any of it: a full queue drops the alert and counts it.

use crate::config::AlertSettings;
use crate::metrics::{AlertResult, Metrics};
use crate::periods::{rfc3339, PeriodKind};
use crate::store::Store;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Semaphore};

/// Deliveries in flight at once; more wait (the queue in front of them is bounded).
const MAX_IN_FLIGHT: usize = 32;

/// A threshold crossed by a client in one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub client: String,
    pub tier: String,
    pub quota: PeriodKind,
    pub threshold: u32,
    pub used: u64,
    pub limit: u64,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("webhook secret must look like whsec_<base64 key>")]
    Format,
    #[error("webhook secret key must be 24..=64 bytes after base64 decoding")]
    Length,
}

/// The HMAC key of a `whsec_<base64>` secret.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let b64 = secret.strip_prefix("whsec_").ok_or(SecretError::Format)?;
    let key = B64.decode(b64).map_err(|_| SecretError::Format)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::Length);
    }
    Ok(key)
}

/// `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`.
pub fn sign(key: &[u8], id: &str, timestamp_s: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; the fallback is unreachable but must not panic.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The same for every retry of one alert, so a receiver can deduplicate on it.
pub fn webhook_id(a: &Alert) -> String {
    let mut h = Sha256::new();
    for part in [
        a.client.as_bytes(),
        a.quota.as_str().as_bytes(),
        a.period_start_ms.to_string().as_bytes(),
        a.threshold.to_string().as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("msg_quota_{hex}")
}

#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: PayloadData<'a>,
}

#[derive(Serialize)]
struct PayloadData<'a> {
    client: &'a str,
    tier: &'a str,
    quota: &'static str,
    threshold_percent: u32,
    used: u64,
    limit: u64,
    period_start: String,
    reset_at: String,
}

/// The JSON body (Standard Webhooks envelope: `type`, `timestamp`, `data`).
pub fn payload(a: &Alert, now_ms: u64) -> String {
    let p = Payload {
        kind: "quota.threshold_reached",
        timestamp: rfc3339(now_ms),
        data: PayloadData {
            client: &a.client,
            tier: &a.tier,
            quota: a.quota.as_str(),
            threshold_percent: a.threshold,
            used: a.used,
            limit: a.limit,
            period_start: rfc3339(a.period_start_ms),
            reset_at: rfc3339(a.period_end_ms),
        },
    };
    serde_json::to_string(&p).unwrap_or_default()
}

/// Delay before attempt `n` (1-based, n >= 2): initial x 2^(n-2), capped.
pub fn backoff_ms(settings: &AlertSettings, attempt: u32) -> u64 {
    let shift = attempt.saturating_sub(2).min(30);
    settings
        .initial_backoff_ms
        .saturating_mul(1u64 << shift)
        .min(settings.max_backoff_ms)
}

/// The handle `/v1/check` uses: never blocks.
#[derive(Clone)]
pub struct AlertQueue {
    tx: mpsc::Sender<Alert>,
    metrics: Arc<Metrics>,
}

impl AlertQueue {
    pub fn enqueue(&self, alert: Alert) {
        if self.tx.try_send(alert).is_err() {
            self.metrics.alert(AlertResult::dropped);
            tracing::warn!("alert queue full: alert dropped");
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Starts the delivery task; returns the queue handle.
pub fn spawn(settings: AlertSettings, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> AlertQueue {
    let (tx, mut rx) = mpsc::channel::<Alert>(settings.queue);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("api-guard-quota")
        .build()
        .unwrap_or_default();
    let m = metrics.clone();
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        while let Some(alert) = rx.recv().await {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (http, store, m, settings) =
                (http.clone(), store.clone(), m.clone(), settings.clone());
            tokio::spawn(async move {
                deliver(&http, store.as_ref(), &m, &settings, &alert).await;
                drop(permit);
            });
        }
    });
    AlertQueue { tx, metrics }
}

async fn deliver(
    http: &reqwest::Client,
    store: &dyn Store,
    m: &Metrics,
    s: &AlertSettings,
    a: &Alert,
) {
    let hook = match store.get_client(&a.client).await {
        Ok(rec) => rec.webhook,
        Err(e) => {
            tracing::warn!(client = %a.client, error = %e, "alert: cannot read webhook config");
            m.alert(AlertResult::failed);
            return;
        }
    };
    let Some(hook) = hook else {
        m.alert(AlertResult::no_webhook);
        return;
    };
    let Ok(key) = decode_secret(&hook.secret) else {
        m.alert(AlertResult::failed);
        return;
    };
    let id = webhook_id(a);
    for attempt in 1..=s.max_attempts {
        if attempt > 1 {
            tokio::time::sleep(Duration::from_millis(backoff_ms(s, attempt))).await;
        }
        let now = unix_ms();
        let body = payload(a, now);
        let ts = now / 1000;
        let sig = sign(&key, &id, ts, body.as_bytes());
        let r = http
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                m.alert(AlertResult::sent);
                tracing::info!(client = %a.client, quota = a.quota.as_str(), threshold = a.threshold, "alert delivered");
                return;
            }
            Ok(resp) => {
                m.alert(AlertResult::attempt_failed);
                tracing::warn!(client = %a.client, status = resp.status().as_u16(), attempt, "alert attempt rejected");
            }
            Err(e) => {
                m.alert(AlertResult::attempt_failed);
                tracing::warn!(client = %a.client, error = %e, attempt, "alert attempt failed");
            }
        }
    }
    m.alert(AlertResult::failed);
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fixed vectors from the Standard Webhooks reference libraries (python test_sign_function,
    // rust test_sign), as collected in shared/vectors/webhooks/standard_webhooks.json.
    #[test]
    fn signs_like_the_reference_libraries() {
        for (secret, id, ts, body, want) in [
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330u64,
                "{\"test\": 2432232314}",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
            (
                "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                "{\"email\":\"test@example.com\",\"username\":\"test_user\"}",
                "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
            ),
        ] {
            let key = decode_secret(secret).unwrap();
            assert_eq!(sign(&key, id, ts, body.as_bytes()), want);
        }
    }

    #[test]
    fn secrets_must_be_whsec_base64() {
        assert_eq!(
            decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::Format)
        );
        assert_eq!(decode_secret("whsec_!!!"), Err(SecretError::Format));
        assert_eq!(decode_secret("whsec_YWJj"), Err(SecretError::Length));
    }

    fn alert() -> Alert {
        Alert {
            client: "acme".into(),
            tier: "pro".into(),
            quota: PeriodKind::Daily,
            threshold: 80,
            used: 8,
            limit: 10,
            period_start_ms: 1_709_251_200_000,
            period_end_ms: 1_709_337_600_000,
        }
    }

    #[test]
    fn webhook_id_is_stable_per_alert_and_distinct_across() {
        let a = alert();
        assert_eq!(webhook_id(&a), webhook_id(&a.clone()));
        let b = Alert {
            threshold: 90,
            ..alert()
        };
        assert_ne!(webhook_id(&a), webhook_id(&b));
        assert!(webhook_id(&a).starts_with("msg_"));
    }

    #[test]
    fn payload_is_a_standard_webhooks_envelope() {
        let v: serde_json::Value =
            serde_json::from_str(&payload(&alert(), 1_709_300_000_000)).unwrap();
        assert_eq!(v["type"], "quota.threshold_reached");
        assert_eq!(v["data"]["threshold_percent"], 80);
        assert_eq!(v["data"]["reset_at"], "2024-03-02T00:00:00Z");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = AlertSettings {
            initial_backoff_ms: 100,
            max_backoff_ms: 350,
            ..Default::default()
        };
        assert_eq!(
            (2..=6).map(|n| backoff_ms(&s, n)).collect::<Vec<_>>(),
            vec![100, 200, 350, 350, 350]
        );
    }
}
