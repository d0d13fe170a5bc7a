//! envoyproxy/ratelimit's YAML descriptor config (one `domain` per file), validated into a
//! tree that [`crate::rls::matcher`] walks. Unknown keys are errors naming their path: a typo
//! must not silently lift a limit.

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Bounds that keep every algorithm's integer math exact in the store scripts (doubles in
/// Lua are exact below 2^53).
pub const MAX_REQUESTS_PER_UNIT: u64 = 1_000_000_000_000;
const MAX_DEPTH: usize = 16;

/// Read case-insensitively (`second`, `SECOND`), as envoyproxy/ratelimit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// Length used by the smooth algorithms (`token_bucket`, `sliding_window`), which need a
    /// rate rather than a calendar period: a month is 30 days and a year 365 days there.
    /// `fixed_window` uses calendar months and years (see `rls::window`).
    pub fn nominal_ms(self) -> u64 {
        match self {
            Unit::Second => 1_000,
            Unit::Minute => 60_000,
            Unit::Hour => 3_600_000,
            Unit::Day => 86_400_000,
            Unit::Week => 7 * 86_400_000,
            Unit::Month => 30 * 86_400_000,
            Unit::Year => 365 * 86_400_000,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

impl TryFrom<String> for Unit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => {
                return Err(format!(
                    "unknown unit `{s}`, expected second, minute, hour, day, week, month or year"
                ))
            }
        })
    }
}

/// How a limit counts (extension; envoyproxy/ratelimit only has `fixed_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// `requests_per_unit` per window; windows aligned to UTC unit boundaries, day/month/year
    /// on the calendar (envoyproxy/ratelimit's behaviour, with real months).
    #[default]
    FixedWindow,
    /// Capacity `requests_per_unit`, refilled continuously at `requests_per_unit` per unit:
    /// no double burst at a window edge.
    TokenBucket,
    /// The current window's count plus the previous window's, weighted by how much of it
    /// still overlaps the last unit of time.
    SlidingWindow,
}

impl Algorithm {
    pub fn code(self) -> u8 {
        match self {
            Algorithm::FixedWindow => 0,
            Algorithm::TokenBucket => 1,
            Algorithm::SlidingWindow => 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    domain: String,
    #[serde(default)]
    descriptors: Vec<RawDescriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDescriptor {
    key: String,
    value: Option<String>,
    rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    shadow_mode: bool,
    /// Accepted for compatibility; metrics here are always per configured key path.
    #[serde(default)]
    detailed_metric: bool,
    /// Accepted for compatibility (see `detailed_metric`).
    #[serde(default)]
    value_to_metric: bool,
    /// With a `value: prefix*` wildcard: every matching value shares one counter.
    #[serde(default)]
    share_threshold: bool,
    #[serde(default)]
    descriptors: Vec<RawDescriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    unit: Option<Unit>,
    requests_per_unit: Option<u64>,
    #[serde(default)]
    unlimited: bool,
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<RawReplace>,
    #[serde(default)]
    algorithm: Algorithm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplace {
    name: String,
}

/// A limit attached to a descriptor path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// `unlimited: true`: answered OK without touching the store.
    Unlimited,
    Counted(CountedLimit),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountedLimit {
    pub unit: Unit,
    pub requests_per_unit: u64,
    pub algorithm: Algorithm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitRule {
    pub limit: Limit,
    pub name: Option<String>,
    /// Names of limits this one replaces when both match one request.
    pub replaces: Vec<String>,
    pub shadow_mode: bool,
    /// The config path (`key_value.key2`), as envoyproxy/ratelimit names its stats; the
    /// metric label.
    pub stat_key: String,
}

/// One node of the descriptor tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub rule: Option<RateLimitRule>,
    /// Children by `key_value` (exact value) or by `key` (any value), as envoyproxy/ratelimit
    /// indexes them.
    pub children: HashMap<String, Node>,
    /// Children whose value ends in `*` (a prefix match), as `key_prefix`, in file order.
    pub wildcards: Vec<(String, Node)>,
    /// `share_threshold: true` on a wildcard: the pattern (`prefix*`) stands for the
    /// request's value in the counter's key, so all matching values share one counter.
    pub shared_value: Option<String>,
}

/// All domains, by name.
#[derive(Debug, Clone, Default)]
pub struct RlsConfig {
    pub domains: BTreeMap<String, Node>,
}

#[derive(Debug, thiserror::Error)]
pub enum RlsConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// The key a child is indexed under.
pub fn child_key(key: &str, value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{key}_{v}"),
        None => key.to_string(),
    }
}

type Children = (HashMap<String, Node>, Vec<(String, Node)>);

fn build(
    raw: &[RawDescriptor],
    path: &str,
    stat_prefix: &str,
    depth: usize,
    names: &mut Vec<String>,
) -> Result<Children, String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "{path}: descriptors nested deeper than {MAX_DEPTH}"
        ));
    }
    let mut out = HashMap::new();
    let mut wild = Vec::new();
    for (i, d) in raw.iter().enumerate() {
        let here = format!("{path}[{i}]");
        if d.key.is_empty() {
            return Err(format!("{here}.key: must not be empty"));
        }
        if d.value.as_deref() == Some("") {
            return Err(format!(
                "{here}.value: must not be empty (omit it to match any value)"
            ));
        }
        let ck = child_key(&d.key, d.value.as_deref());
        let stat_key = if stat_prefix.is_empty() {
            ck.clone()
        } else {
            format!("{stat_prefix}.{ck}")
        };
        let rule = match &d.rate_limit {
            None => None,
            Some(r) => Some(rule(r, &format!("{here}.rate_limit"), d, &stat_key, names)?),
        };
        let children = build(
            &d.descriptors,
            &format!("{here}.descriptors"),
            &stat_key,
            depth + 1,
            names,
        )?;
        let (children, wildcards) = children;
        let wildcard = d.value.as_deref().is_some_and(|v| v.ends_with('*'));
        if d.share_threshold && !wildcard {
            return Err(format!(
                "{here}.share_threshold: only for a value ending in * (a wildcard)"
            ));
        }
        let node = Node {
            rule,
            children,
            wildcards,
            shared_value: d.share_threshold.then(|| d.value.clone()).flatten(),
        };
        if let Some(prefix) = ck.strip_suffix('*').filter(|_| wildcard) {
            if wild.iter().any(|(p, _)| p == prefix) {
                return Err(format!("{here}: duplicate descriptor {ck}"));
            }
            wild.push((prefix.to_string(), node));
        } else if out.insert(ck.clone(), node).is_some() {
            return Err(format!("{here}: duplicate descriptor {ck}"));
        }
    }
    Ok((out, wild))
}

fn rule(
    r: &RawRateLimit,
    here: &str,
    d: &RawDescriptor,
    stat_key: &str,
    names: &mut Vec<String>,
) -> Result<RateLimitRule, String> {
    let _ = (d.detailed_metric, d.value_to_metric);
    let limit = if r.unlimited {
        if r.requests_per_unit.is_some_and(|n| n > 0) {
            return Err(format!(
                "{here}: unlimited: true and requests_per_unit cannot both be set"
            ));
        }
        Limit::Unlimited
    } else {
        let unit = r.unit.ok_or_else(|| format!("{here}.unit: required"))?;
        let n = r
            .requests_per_unit
            .ok_or_else(|| format!("{here}.requests_per_unit: required"))?;
        if n > MAX_REQUESTS_PER_UNIT {
            return Err(format!(
                "{here}.requests_per_unit: at most {MAX_REQUESTS_PER_UNIT}"
            ));
        }
        if r.algorithm != Algorithm::FixedWindow
            && u128::from(n) * u128::from(unit.nominal_ms()) >= 1u128 << 52
        {
            return Err(format!(
                "{here}.requests_per_unit: with algorithm {:?}, requests_per_unit x unit in ms must stay below 2^52 (use a shorter unit)",
                r.algorithm
            ));
        }
        Limit::Counted(CountedLimit {
            unit,
            requests_per_unit: n,
            algorithm: r.algorithm,
        })
    };
    if let Some(name) = &r.name {
        if name.is_empty() {
            return Err(format!("{here}.name: must not be empty"));
        }
        names.push(name.clone());
    }
    let mut replaces = Vec::new();
    for (j, rep) in r.replaces.iter().enumerate() {
        if rep.name.is_empty() {
            return Err(format!("{here}.replaces[{j}].name: must not be empty"));
        }
        replaces.push(rep.name.clone());
    }
    Ok(RateLimitRule {
        limit,
        name: r.name.clone(),
        replaces,
        shadow_mode: d.shadow_mode,
        stat_key: stat_key.to_string(),
    })
}

impl RlsConfig {
    /// Parses one file's text into a domain and its tree. Errors name the key path
    /// (`descriptors[0].rate_limit.unit`).
    pub fn parse_file(text: &str) -> Result<(String, Node), String> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            }
        })?;
        if raw.domain.is_empty() {
            return Err("domain: must not be empty".into());
        }
        let mut names = Vec::new();
        let (children, wildcards) = build(&raw.descriptors, "descriptors", "", 0, &mut names)?;
        Ok((
            raw.domain,
            Node {
                rule: None,
                children,
                wildcards,
                shared_value: None,
            },
        ))
    }

    /// Adds one file's domain; a domain defined twice is an error (as in envoyproxy/ratelimit).
    pub fn add(&mut self, file: &str, text: &str) -> Result<(), RlsConfigError> {
        let invalid = |message: String| RlsConfigError::Invalid {
            file: file.to_string(),
            message,
        };
        let (domain, node) = Self::parse_file(text).map_err(invalid)?;
        if self.domains.contains_key(&domain) {
            return Err(invalid(format!("domain {domain} is defined twice")));
        }
        self.domains.insert(domain, node);
        Ok(())
    }

    /// Loads a YAML file, or every `*.yaml`/`*.yml` file of a folder (sorted by name).
    pub fn load(path: &Path) -> Result<Self, RlsConfigError> {
        let read_err = |p: &Path, source| RlsConfigError::Read {
            path: p.display().to_string(),
            source,
        };
        let mut files = Vec::new();
        if path.is_dir() {
            for entry in std::fs::read_dir(path).map_err(|e| read_err(path, e))? {
                let p = entry.map_err(|e| read_err(path, e))?.path();
                let yaml = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e == "yaml" || e == "yml");
                if yaml && p.is_file() {
                    files.push(p);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(RlsConfigError::Invalid {
                    file: path.display().to_string(),
                    message: "no .yaml or .yml files in this folder".into(),
                });
            }
        } else {
            files.push(path.to_path_buf());
        }
        let mut cfg = RlsConfig::default();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| read_err(&f, e))?;
            cfg.add(&f.display().to_string(), &text)?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Node, String> {
        RlsConfig::parse_file(text).map(|(_, n)| n)
    }

    #[test]
    fn nested_tree_with_values_and_defaults() {
        let n = parse(
            "domain: d\ndescriptors:\n  - key: a\n    value: x\n    rate_limit: {unit: minute, requests_per_unit: 5}\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: day, requests_per_unit: 7, name: daily, algorithm: token_bucket}\n",
        )
        .unwrap();
        let ax = n.children.get("a_x").unwrap().rule.clone().unwrap();
        assert_eq!(
            ax.limit,
            Limit::Counted(CountedLimit {
                unit: Unit::Minute,
                requests_per_unit: 5,
                algorithm: Algorithm::FixedWindow
            })
        );
        assert_eq!(ax.stat_key, "a_x");
        let b = n.children["a"].children["b"].rule.clone().unwrap();
        assert_eq!(b.stat_key, "a.b");
        assert_eq!(b.name.as_deref(), Some("daily"));
        assert!(n.children["a"].rule.is_none());
    }

    #[test]
    fn unknown_keys_name_their_path() {
        let e = parse("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: minute, requests_per_unit: 5, burst: 3}\n").unwrap_err();
        assert!(e.contains("descriptors[0].rate_limit"), "{e}");
        assert!(e.contains("burst"), "{e}");
        let e = parse("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        valeu: x\n").unwrap_err();
        assert!(e.contains("descriptors[0].descriptors[0]"), "{e}");
        assert!(e.contains("valeu"), "{e}");
        let e = parse("domain: d\nextra: 1\n").unwrap_err();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        for (text, needle) in [
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 5}\n",
                "unit",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {requests_per_unit: 5}\n",
                "descriptors[0].rate_limit.unit",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second}\n",
                "requests_per_unit",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: -1}\n",
                "requests_per_unit",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 5, algorithm: leaky}\n",
                "algorithm",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n  - key: a\n",
                "duplicate descriptor a",
            ),
            ("domain: ''\n", "domain"),
            (
                "domain: d\ndescriptors:\n  - key: a\n    value: x\n    share_threshold: true\n",
                "descriptors[0].share_threshold",
            ),
            ("descriptors: []\n", "domain"),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: year, requests_per_unit: 1000000, algorithm: sliding_window}\n",
                "2^52",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, requests_per_unit: 4, unit: second}\n",
                "unlimited",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn hostile_files_are_errors_not_panics() {
        let mut deep = String::from("domain: d\ndescriptors:\n");
        for i in 0..20 {
            let pad = "  ".repeat(2 * i);
            deep.push_str(&format!("{pad}  - key: k{i}\n{pad}    descriptors:\n"));
        }
        let e = parse(&deep).unwrap_err();
        assert!(e.contains("nested deeper"), "{e}");
        for text in [
            "",
            "- 1",
            "domain: [",
            "\u{0}",
            "domain: d\ndescriptors: 5\n",
        ] {
            assert!(parse(text).is_err(), "{text:?}");
        }
        let e = parse("domain: d\ndescriptors:\n  - key: ''\n").unwrap_err();
        assert!(e.contains("descriptors[0].key"), "{e}");
    }

    #[test]
    fn same_domain_twice_is_refused() {
        let mut c = RlsConfig::default();
        c.add("a.yaml", "domain: d\n").unwrap();
        let e = c.add("b.yaml", "domain: d\n").unwrap_err().to_string();
        assert!(e.contains("b.yaml") && e.contains("twice"), "{e}");
    }

    #[test]
    fn folder_loads_every_yaml_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "domain: one\n").unwrap();
        std::fs::write(dir.path().join("b.yml"), "domain: two\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
        let c = RlsConfig::load(dir.path()).unwrap();
        assert_eq!(c.domains.keys().collect::<Vec<_>>(), ["one", "two"]);
        std::fs::write(dir.path().join("c.yaml"), "domain: [").unwrap();
        let e = RlsConfig::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("c.yaml"), "{e}");
    }
}
