//! Structured events: one JSON line each, for SIEM ingestion. They share the deny log's
//! shape (`event`, `route`, `policy`, `client`, `ip`, `request_id`, `message`), with the
//! event name prefixed `api_guard.` like the deny log's `api_guard.deny`.

use serde_json::Value;

/// One event's facts.
pub struct EventLine<'a> {
    /// `credential_abuse`, ...
    pub event: &'a str,
    pub route: &'a str,
    pub policy: Option<&'a str>,
    pub client: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub message: &'a str,
    /// Event-specific fields.
    pub extra: &'a [(&'a str, Value)],
}

impl EventLine<'_> {
    /// The JSON line, `event` first (fields in a fixed order, easy to read and to grep).
    pub fn line(&self) -> String {
        let opt = |v: Option<&str>| v.map_or(Value::Null, |s| Value::String(s.to_string()));
        let mut fields: Vec<(&str, Value)> = vec![
            ("event", format!("api_guard.{}", self.event).into()),
            ("route", self.route.into()),
            ("policy", opt(self.policy)),
            ("client", opt(self.client)),
            ("ip", opt(self.ip)),
            ("request_id", opt(self.request_id)),
            ("message", self.message.into()),
        ];
        fields.extend(self.extra.iter().map(|(k, v)| (*k, v.clone())));
        let mut s = String::with_capacity(256);
        s.push('{');
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&Value::from(*k).to_string());
            s.push(':');
            s.push_str(&v.to_string());
        }
        s.push('}');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_object_with_the_shared_fields() {
        let l = EventLine {
            event: "credential_abuse",
            route: "api",
            policy: Some("key_sharing"),
            client: Some("acme \"x\""),
            ip: None,
            request_id: Some("r1"),
            message: "m\nn",
            extra: &[("window_s", 600.into())],
        }
        .line();
        assert!(!l.contains('\n'));
        assert!(
            l.starts_with("{\"event\":\"api_guard.credential_abuse\","),
            "{l}"
        );
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["event"], "api_guard.credential_abuse");
        assert_eq!(v["client"], "acme \"x\"");
        assert_eq!(v["ip"], Value::Null);
        assert_eq!(v["window_s"], 600);
    }
}
