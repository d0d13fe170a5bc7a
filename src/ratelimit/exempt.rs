//! Exemptions (`exempt` on a limit or a route): client IP ranges, client identities and tiers
//! that bypass a limit. Explicit, and counted (`api_guard.exempt`, per limit `.exempt`), so an
//! internal service account is exempt by config, never by accident, and the bypass is visible.

use super::RequestKeys;
use crate::config::{ConfigError, ExemptConfig};
use ipnet::IpNet;
use std::net::IpAddr;

/// Most entries in one `exempt` list (each is checked per request).
pub const MAX_ENTRIES: usize = 256;

/// A compiled `exempt`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exempt {
    nets: Vec<IpNet>,
    clients: Vec<String>,
    tiers: Vec<String>,
}

impl Exempt {
    /// Validates `c` (at JSON path `path`).
    pub fn compile(path: &str, c: &ExemptConfig) -> Result<Exempt, ConfigError> {
        if c.cidrs.is_empty() && c.clients.is_empty() && c.tiers.is_empty() {
            return Err(ConfigError::new(
                path,
                "lists nothing: give `cidrs`, `clients` and/or `tiers`, or remove it",
            ));
        }
        for (field, n) in [
            ("cidrs", c.cidrs.len()),
            ("clients", c.clients.len()),
            ("tiers", c.tiers.len()),
        ] {
            if n > MAX_ENTRIES {
                return Err(ConfigError::new(
                    format!("{path}.{field}"),
                    format!("at most {MAX_ENTRIES} entries"),
                ));
            }
        }
        let mut nets = Vec::with_capacity(c.cidrs.len());
        for (i, s) in c.cidrs.iter().enumerate() {
            let net = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError::new(
                        format!("{path}.cidrs[{i}]"),
                        format!(
                            "'{s}' is not an IP range such as \"10.0.0.0/8\" or \"2001:db8::/32\""
                        ),
                    )
                })?;
            if net.prefix_len() == 0 {
                return Err(ConfigError::new(
                    format!("{path}.cidrs[{i}]"),
                    format!("'{s}' exempts every address: remove the limit instead"),
                ));
            }
            // Host bits set ("10.1.2.3/8") are almost always a typo for a narrower range.
            if net.trunc() != net {
                return Err(ConfigError::new(
                    format!("{path}.cidrs[{i}]"),
                    format!("'{s}' has host bits set; did you mean '{}'?", net.trunc()),
                ));
            }
            nets.push(net);
        }
        for (field, list) in [("clients", &c.clients), ("tiers", &c.tiers)] {
            for (i, v) in list.iter().enumerate() {
                if v.is_empty() || v.len() > 256 {
                    return Err(ConfigError::new(
                        format!("{path}.{field}[{i}]"),
                        "must be 1 to 256 characters",
                    ));
                }
            }
        }
        Ok(Exempt {
            nets,
            clients: c.clients.clone(),
            tiers: c.tiers.clone(),
        })
    }

    /// For `api-guard check --explain`: `cidrs 10.0.0.0/8; clients svc`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (name, list) in [
            (
                "cidrs",
                self.nets.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            ),
            ("clients", self.clients.clone()),
            ("tiers", self.tiers.clone()),
        ] {
            if !list.is_empty() {
                parts.push(format!("{name} {}", list.join(", ")));
            }
        }
        parts.join("; ")
    }

    /// Whether deciding needs the verified identity (then the limit waits for credentials).
    pub fn needs_identity(&self) -> bool {
        !self.clients.is_empty() || !self.tiers.is_empty()
    }

    /// Whether the request bypasses the limit. Identities and tiers count only once verified
    /// (`keys.identity` is `None` before credentials), so an unverified claim exempts nothing.
    pub fn matches(&self, keys: &RequestKeys<'_>) -> bool {
        if !self.nets.is_empty() {
            if let Ok(ip) = keys.ip.parse::<IpAddr>() {
                let ip = ip.to_canonical();
                if self.nets.iter().any(|n| n.contains(&ip)) {
                    return true;
                }
            }
        }
        let Some(id) = keys.identity else {
            return false;
        };
        self.clients.contains(&id.client) || self.tiers.contains(&id.tier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{AuthMethod, Identity};

    fn ex(json: &str) -> Result<Exempt, ConfigError> {
        Exempt::compile("x", &serde_json::from_str(json).unwrap())
    }

    fn keys<'a>(ip: &'a str, id: Option<&'a Identity>) -> RequestKeys<'a> {
        RequestKeys {
            ip,
            route: "r",
            headers: &[],
            identity: id,
        }
    }

    #[test]
    fn cidrs_match_v4_v6_and_mapped_addresses() {
        let e = ex(r#"{"cidrs":["10.0.0.0/8","2001:db8::/32","192.0.2.7"]}"#).unwrap();
        for ip in ["10.1.2.3", "2001:db8::1", "192.0.2.7", "::ffff:10.9.9.9"] {
            assert!(e.matches(&keys(ip, None)), "{ip}");
        }
        for ip in ["11.0.0.1", "2001:db9::1", "192.0.2.8", "", "not-an-ip"] {
            assert!(!e.matches(&keys(ip, None)), "{ip}");
        }
        assert!(!e.needs_identity());
    }

    #[test]
    fn clients_and_tiers_need_a_verified_identity() {
        let e = ex(r#"{"clients":["svc-billing"],"tiers":["internal"]}"#).unwrap();
        assert!(e.needs_identity());
        let mut id = Identity {
            method: AuthMethod::ApiKey,
            subject: "svc-billing".into(),
            client: "svc-billing".into(),
            tier: "pro".into(),
            scopes: vec![],
            roles: vec![],
            forwarded: vec![],
            claims: vec![],
            strip_authorization: false,
        };
        assert!(e.matches(&keys("1.2.3.4", Some(&id))));
        id.client = "acme".into();
        assert!(!e.matches(&keys("1.2.3.4", Some(&id))));
        id.tier = "internal".into();
        assert!(e.matches(&keys("1.2.3.4", Some(&id))));
        assert!(!e.matches(&keys("1.2.3.4", None)));
    }

    #[test]
    fn bad_entries_are_refused_with_their_path() {
        for (json, path) in [
            (r#"{}"#, "x"),
            (r#"{"cidrs":["10.0.0.0/33"]}"#, "x.cidrs[0]"),
            (r#"{"cidrs":["10.0.0.0/8","bogus"]}"#, "x.cidrs[1]"),
            (r#"{"cidrs":["0.0.0.0/0"]}"#, "x.cidrs[0]"),
            (r#"{"cidrs":["10.1.2.3/8"]}"#, "x.cidrs[0]"),
            (r#"{"clients":[""]}"#, "x.clients[0]"),
        ] {
            let err = ex(json).unwrap_err();
            assert_eq!(err.path, path, "{json}: {err}");
        }
    }
}
