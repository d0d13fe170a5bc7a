//! Defenses against distributed abuse that per-IP and per-client limits miss (`abuse`).
//!
//! - [`key_sharing`]: one client identity from more addresses than allowed.
//!
//! The pipeline stage runs after credentials and scopes, before the per-client limits, so a
//! `tighten` action can make this request's limits stricter.

pub mod key_sharing;

use self::key_sharing::{KeySharing, Seen, MAX_DISTINCT};
use crate::config::{Config, ConfigError, KeySharingConfig, RawConfig};
use crate::pipeline::{Env, Exchange, Request, Step};
use crate::reply::{ErrorCode, LocalReply};
use crate::store::{SharedStore, StoreError};

/// What happens to a request from an address over the allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pass, with one `credential_abuse` event per client and window.
    Log,
    /// 403 `credential_abuse`.
    Deny,
    /// Pass, with the route's per-client limits at half strength for this request
    /// (each limit takes twice the route's cost).
    Tighten,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Deny => "deny",
            Action::Tighten => "tighten",
        }
    }
}

/// How much a `tighten` multiplies the cost of the per-client limits.
pub const TIGHTEN_COST_FACTOR: u64 = 2;
/// Largest `tracked_clients` (about 1 MiB of shared data at the largest `max_distinct_ips`).
pub const MAX_TRACKED: u32 = 1 << 16;

/// The compiled `abuse` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Abuse {
    pub key_sharing: Option<(KeySharing, Action)>,
}

/// What the stage saw, for counters (the glue reads and clears it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AbuseState {
    pub over: bool,
    pub untracked: bool,
}

impl Abuse {
    pub fn compile(raw: &RawConfig) -> Result<Abuse, ConfigError> {
        let Some(a) = &raw.abuse else {
            return Ok(Abuse::default());
        };
        let key_sharing = a
            .key_sharing
            .as_ref()
            .map(|k| compile_key_sharing("abuse.key_sharing", k))
            .transpose()?;
        Ok(Abuse { key_sharing })
    }

    /// Creates the shared-data pages; call at configuration, before traffic.
    pub fn prepare(&self, store: &dyn SharedStore) -> Result<u32, StoreError> {
        match &self.key_sharing {
            Some((k, _)) => k.prepare(store),
            None => Ok(0),
        }
    }
}

fn compile_key_sharing(
    path: &str,
    k: &KeySharingConfig,
) -> Result<(KeySharing, Action), ConfigError> {
    let range = |field: &str, v: u64, lo: u64, hi: u64| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(ConfigError::new(
                format!("{path}.{field}"),
                format!("must be between {lo} and {hi}"),
            ))
        }
    };
    range(
        "max_distinct_ips",
        k.max_distinct_ips.into(),
        1,
        MAX_DISTINCT.into(),
    )?;
    range("window_s", k.window_s, 1, 7 * 86400)?;
    range("prefix_v4", k.prefix_v4.into(), 8, 32)?;
    range("prefix_v6", k.prefix_v6.into(), 16, 128)?;
    range(
        "tracked_clients",
        k.tracked_clients.into(),
        4,
        MAX_TRACKED.into(),
    )?;
    let action = match k.action.as_str() {
        "log" => Action::Log,
        "deny" => Action::Deny,
        "tighten" => Action::Tighten,
        other => {
            return Err(ConfigError::new(
                format!("{path}.action"),
                format!("'{other}' is not \"log\", \"deny\" or \"tighten\""),
            ))
        }
    };
    Ok((
        KeySharing {
            max_distinct_ips: k.max_distinct_ips,
            window_s: k.window_s,
            prefix_v4: k.prefix_v4,
            prefix_v6: k.prefix_v6,
            pages: k.tracked_clients.div_ceil(key_sharing::ENTRIES as u32),
        },
        action,
    ))
}

/// The pipeline stage: authenticated requests only.
pub fn stage(cfg: &Config, _req: &Request, ex: &mut Exchange, env: &Env) -> Step {
    let Some((ks, action)) = &cfg.abuse.key_sharing else {
        return Step::Next;
    };
    let Some(id) = &ex.identity else {
        return Step::Next;
    };
    let ip = ex.client_ip.as_deref().unwrap_or("");
    match ks.observe(env.store, &id.client, ip, env.now_ms) {
        Seen::Within => Step::Next,
        Seen::Untracked => {
            ex.abuse.untracked = true;
            Step::Next
        }
        Seen::Over { first } => {
            ex.abuse.over = true;
            let message = format!(
                "client '{}' was seen from more than {} addresses within {} s",
                id.client, ks.max_distinct_ips, ks.window_s
            );
            if first {
                let line = crate::events::EventLine {
                    event: "credential_abuse",
                    route: ex.route_name(cfg),
                    policy: Some("key_sharing"),
                    client: Some(&id.client),
                    ip: ex.client_ip.as_deref(),
                    request_id: ex.request_id.as_deref(),
                    message: &message,
                    extra: &[
                        ("action", action.as_str().into()),
                        ("max_distinct_ips", ks.max_distinct_ips.into()),
                        ("window_s", ks.window_s.into()),
                    ],
                }
                .line();
                ex.events.push(line);
            }
            match action {
                Action::Log => Step::Next,
                Action::Tighten => {
                    ex.tightened = true;
                    Step::Next
                }
                Action::Deny => Step::Reply(
                    LocalReply::new(ErrorCode::CredentialAbuse, message).with_policy("key_sharing"),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config;
    use crate::pipeline::{on_request_headers, Env, Exchange, Request, Verdict};
    use crate::reply::ErrorCode;
    use crate::store::MemoryStore;

    const KEYS: &str = r#""api_keys":{"header":"x-api-key","keys":[{"id":"acme","sha256":"6f0f8db1716f1a7909f09fef4ef9730dbcaa99df6f63e5f832f2122b27af2335","tier":"pro"}]}"#;

    fn run(json: &str, ips: &[&str]) -> Vec<(Verdict, Exchange)> {
        let c = config::parse(json.as_bytes(), &|_| None).unwrap().0;
        let store = MemoryStore::new();
        c.abuse.prepare(&store).unwrap();
        c.rate_limiter.prepare(&store).unwrap();
        ips.iter()
            .map(|ip| {
                let headers = vec![
                    (":method".to_string(), "GET".to_string()),
                    (
                        "x-api-key".to_string(),
                        "k-acme-0123456789abcdef".to_string(),
                    ),
                ];
                let source = format!("{ip}:5000");
                let req = Request {
                    method: "GET",
                    path: "/x",
                    headers: &headers,
                    source_address: Some(&source),
                    route_name: None,
                };
                let env = Env {
                    now_ms: 1_700_000_400_000,
                    store: &store,
                };
                let mut ex = Exchange::default();
                let v = on_request_headers(&c, &req, &mut ex, &env);
                (v, ex)
            })
            .collect()
    }

    #[test]
    fn deny_refuses_new_addresses_past_the_allowance_and_reports_once() {
        let json = format!(
            r#"{{{KEYS},"abuse":{{"key_sharing":{{"max_distinct_ips":2,"action":"deny"}}}},
                "default_route":{{"auth":{{"mode":"required","methods":["api_key"]}}}}}}"#
        );
        let out = run(
            &json,
            &[
                "192.0.2.1",
                "192.0.2.2",
                "192.0.2.3",
                "192.0.2.4",
                "192.0.2.1",
            ],
        );
        let codes: Vec<_> = out
            .iter()
            .map(|(v, _)| match v {
                Verdict::Reply(r) => Some(r.code),
                _ => None,
            })
            .collect();
        assert_eq!(
            codes,
            [
                None,
                None,
                Some(ErrorCode::CredentialAbuse),
                Some(ErrorCode::CredentialAbuse),
                None
            ]
        );
        assert_eq!(out[2].1.events.len(), 1, "one event per client and window");
        assert!(out[2].1.events[0].contains("\"event\":\"api_guard.credential_abuse\""));
        assert!(out[3].1.events.is_empty());
        assert!(out[3].1.abuse.over);
    }

    #[test]
    fn tighten_halves_the_client_limits_for_the_request() {
        let json = format!(
            r#"{{{KEYS},"abuse":{{"key_sharing":{{"max_distinct_ips":1,"action":"tighten"}}}},
                "rate_limits":{{"c":{{"key":["client"],"capacity":4,"refill_tokens":1,"refill_period_s":3600}}}},
                "default_route":{{"auth":{{"mode":"required","methods":["api_key"]}},"rate_limits":["c"]}}}}"#
        );
        // 1 token from the known address, then 2 each from the others: 1 + 2 = 3, 3 + 2 > 4.
        let out = run(&json, &["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        assert!(matches!(out[0].0, Verdict::Forward(_)));
        assert!(matches!(out[1].0, Verdict::Forward(_)));
        match &out[2].0 {
            Verdict::Reply(r) => assert_eq!(r.code, ErrorCode::RateLimitExceeded),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn config_errors_name_the_path() {
        for (ks, path) in [
            (
                r#"{"max_distinct_ips":0}"#,
                "abuse.key_sharing.max_distinct_ips",
            ),
            (
                r#"{"max_distinct_ips":65}"#,
                "abuse.key_sharing.max_distinct_ips",
            ),
            (r#"{"action":"ban"}"#, "abuse.key_sharing.action"),
            (r#"{"prefix_v4":33}"#, "abuse.key_sharing.prefix_v4"),
            (r#"{"prefix_v6":8}"#, "abuse.key_sharing.prefix_v6"),
            (r#"{"window_s":0}"#, "abuse.key_sharing.window_s"),
            (
                r#"{"tracked_clients":1}"#,
                "abuse.key_sharing.tracked_clients",
            ),
            (r#"{"bogus":1}"#, "abuse.key_sharing"),
        ] {
            let json = format!(r#"{{"abuse":{{"key_sharing":{ks}}}}}"#);
            let e = config::parse(json.as_bytes(), &|_| None).unwrap_err();
            assert!(e.path.starts_with(path), "{ks}: {e}");
        }
    }
}
