//! `api-guard check` on a whole Envoy config (bootstrap, listener, or LDS resources, already
//! parsed from YAML or JSON into a JSON value): finds every api-guard filter — the wasm filter
//! and the dynamic module — validates its config with the filter's own code, and lints the
//! surroundings that decide whether api-guard is safe there. Every finding names the path in
//! the Envoy document (`static_resources.listeners[0]...http_filters[1]...`).
//!
//! The lints are the traps users fell into (issue 14): who resolves the client address
//! (`use_remote_address`, `xff_num_trusted_hops` against `client_ip`), webhooks without
//! `allow_on_headers_stop_iteration`, callout clusters that do not exist, a wasm VM that fails
//! open, and the filter placed after the router (where it never runs).

use serde_json::Value;
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Where in the Envoy document.
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Wasm,
    Module,
}

/// One api-guard filter found in the document.
#[derive(Debug, Clone)]
pub struct FoundFilter {
    pub path: String,
    pub delivery: Delivery,
    /// Routes in its config (`None` when the config did not validate).
    pub routes: Option<usize>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub filters: Vec<FoundFilter>,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.count(Severity::Error)
    }
    pub fn warnings(&self) -> usize {
        self.count(Severity::Warning)
    }
    fn count(&self, s: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == s).count()
    }
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, path, message);
    }
    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, path, message);
    }
    fn push(&mut self, severity: Severity, path: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            severity,
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Whether a JSON document is an Envoy config rather than a filter config. A filter config
/// has none of these keys (unknown fields are refused there), so the guess cannot collide.
pub fn looks_like_envoy(doc: &Value) -> bool {
    const KEYS: &[&str] = &[
        "static_resources",
        "dynamic_resources",
        "admin",
        "node",
        "filter_chains",
        "resources",
        "listeners",
        "layered_runtime",
    ];
    doc.as_object()
        .is_some_and(|o| KEYS.iter().any(|k| o.contains_key(*k)))
}

/// Checks an Envoy document. `process_env` is the environment Envoy will run with (for
/// `{"env": NAME}` secrets the module and `host_env_keys` read).
pub fn check(doc: &Value, process_env: &dyn Fn(&str) -> Option<String>) -> Report {
    let mut report = Report::default();
    let clusters = cluster_names(doc);
    let mut hcms = Vec::new();
    find_hcms(doc, String::new(), &mut hcms);
    for (path, hcm) in hcms {
        check_hcm(&path, hcm, clusters.as_ref(), process_env, &mut report);
    }
    if report.filters.is_empty() {
        report.error(
            "",
            "no api-guard filter found: expected an `envoy.filters.http.wasm` filter whose \
             vm_config loads api_guard.wasm, or an `envoy.filters.http.dynamic_modules` filter \
             with dynamic_module_config.name `api_guard`, in an HttpConnectionManager's http_filters",
        );
    }
    report
}

/// One api-guard filter's own config, read out of an Envoy document (for `check --explain`).
pub struct Embedded {
    /// Where the filter is in the Envoy document.
    pub path: String,
    pub delivery: Delivery,
    /// The config as the filter would compile it (with the environment it would see), or why
    /// it would not.
    pub config: Result<(crate::config::Config, Vec<crate::config::Warning>), String>,
}

/// Every api-guard filter in an Envoy document, in document order, with its compiled config.
pub fn embedded_configs(
    doc: &Value,
    process_env: &dyn Fn(&str) -> Option<String>,
) -> Vec<Embedded> {
    let mut hcms = Vec::new();
    find_hcms(doc, String::new(), &mut hcms);
    let mut out = Vec::new();
    for (hcm_path, hcm) in hcms {
        let Some(filters) = hcm.get("http_filters").and_then(Value::as_array) else {
            continue;
        };
        for (i, filter) in filters.iter().enumerate() {
            let path = format!("{hcm_path}.http_filters[{i}]");
            let Some((delivery, _, holder)) = api_guard_filter(filter, &path) else {
                continue;
            };
            let key = match delivery {
                Delivery::Wasm => "configuration",
                Delivery::Module => "filter_config",
            };
            let env = filter_env(delivery, holder, process_env);
            let config = match holder
                .get(key)
                .and_then(|c| c.get("value"))
                .and_then(Value::as_str)
            {
                Some(text) => {
                    crate::config::parse(text.as_bytes(), &|n| env(n)).map_err(|e| e.to_string())
                }
                None => Err(format!("missing the api-guard config (`{key}.value`)")),
            };
            out.push(Embedded {
                path,
                delivery,
                config,
            });
        }
    }
    out
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_url(v: &Value) -> &str {
    v.get("@type").and_then(Value::as_str).unwrap_or("")
}

/// Every HttpConnectionManager config in the document, with its path.
fn find_hcms<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(o) => {
            if type_url(v).ends_with(".HttpConnectionManager") {
                out.push((path.clone(), v));
            }
            for (k, child) in o {
                find_hcms(child, join(&path, k), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                find_hcms(child, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Static cluster names; `None` when the document has no static clusters (a listener file,
/// or clusters from CDS), so existence cannot be checked here.
fn cluster_names(doc: &Value) -> Option<BTreeSet<String>> {
    let list = doc.pointer("/static_resources/clusters")?.as_array()?;
    Some(
        list.iter()
            .filter_map(|c| c.get("name").and_then(Value::as_str))
            .map(str::to_string)
            .collect(),
    )
}

fn is_api_guard_name(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    s.contains("api_guard") || s.contains("api-guard")
}

/// The api-guard filter a `http_filters` entry holds, if any: its delivery, the path of its
/// config string and the string.
fn api_guard_filter<'a>(filter: &'a Value, path: &str) -> Option<(Delivery, String, &'a Value)> {
    let tc = filter.get("typed_config")?;
    let t = type_url(tc);
    if t.ends_with("filters.http.wasm.v3.Wasm") {
        let cfg = tc.get("config")?;
        let code = cfg.pointer("/vm_config/code");
        let file = code
            .and_then(|c| {
                c.pointer("/local/filename")
                    .or_else(|| c.pointer("/remote/http_uri/uri"))
            })
            .and_then(Value::as_str)
            .unwrap_or("");
        let named = ["name", "root_id"].iter().any(|k| {
            cfg.get(*k)
                .and_then(Value::as_str)
                .is_some_and(is_api_guard_name)
        });
        if is_api_guard_name(file) || named {
            return Some((Delivery::Wasm, join(path, "typed_config.config"), cfg));
        }
    } else if t.ends_with("dynamic_modules.v3.DynamicModuleFilter") {
        let module = tc
            .pointer("/dynamic_module_config/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if module == "api_guard" {
            return Some((Delivery::Module, join(path, "typed_config"), tc));
        }
    }
    None
}

fn check_hcm(
    hcm_path: &str,
    hcm: &Value,
    clusters: Option<&BTreeSet<String>>,
    process_env: &dyn Fn(&str) -> Option<String>,
    report: &mut Report,
) {
    let Some(filters) = hcm.get("http_filters").and_then(Value::as_array) else {
        return;
    };
    let router = filters.iter().position(|f| {
        f.get("name").and_then(Value::as_str) == Some("envoy.filters.http.router")
            || type_url(f.get("typed_config").unwrap_or(&Value::Null)).ends_with(".Router")
    });
    for (i, filter) in filters.iter().enumerate() {
        let fpath = format!("{hcm_path}.http_filters[{i}]");
        let Some((delivery, cfg_path, holder)) = api_guard_filter(filter, &fpath) else {
            continue;
        };
        let mut found = FoundFilter {
            path: fpath.clone(),
            delivery,
            routes: None,
        };
        if let Some(r) = router.filter(|r| *r < i) {
            report.error(
                &fpath,
                format!(
                    "api-guard is placed after the router (http_filters[{r}]): the router \
                     forwards the request first and api-guard never checks anything; move it \
                     before `envoy.filters.http.router`"
                ),
            );
        }
        let (value_key, json) = match delivery {
            Delivery::Wasm => ("configuration", holder.get("configuration")),
            Delivery::Module => ("filter_config", holder.get("filter_config")),
        };
        let value_path = join(&cfg_path, &format!("{value_key}.value"));
        let Some(text) = json.and_then(|c| c.get("value")).and_then(Value::as_str) else {
            report.error(
                join(&cfg_path, value_key),
                "missing the api-guard config: give it as a google.protobuf.StringValue \
                 holding the JSON config (`\"@type\": type.googleapis.com/google.protobuf.StringValue`, \
                 `value: '{...}'`)",
            );
            report.filters.push(found);
            continue;
        };
        let env = filter_env(delivery, holder, process_env);
        let raw: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                report.error(
                    &value_path,
                    format!("the api-guard config is not JSON: {e}"),
                );
                report.filters.push(found);
                continue;
            }
        };
        match crate::config::parse(text.as_bytes(), &|name| env(name)) {
            Ok((cfg, warnings)) => {
                found.routes = Some(cfg.routes.len() + usize::from(cfg.default_route.is_some()));
                for w in warnings {
                    report.warn(&value_path, format!("`{}`: {}", w.path, w.message));
                }
            }
            Err(e) => report.error(&value_path, e.to_string()),
        }
        lint_client_ip(hcm_path, hcm, &value_path, &raw, report);
        lint_clusters(&value_path, &raw, clusters, report);
        if delivery == Delivery::Wasm {
            lint_wasm(&cfg_path, holder, &raw, report);
        }
        report.filters.push(found);
    }
}

/// What `{"env": NAME}` resolves to where this filter runs: for the wasm filter the VM's
/// `environment_variables` (`key_values`, or `host_env_keys` passing Envoy's own); for the
/// module, Envoy's process environment.
fn filter_env<'a>(
    delivery: Delivery,
    holder: &'a Value,
    process_env: &'a dyn Fn(&str) -> Option<String>,
) -> impl Fn(&str) -> Option<String> + 'a {
    let vars = holder.pointer("/vm_config/environment_variables");
    move |name: &str| match delivery {
        Delivery::Module => process_env(name),
        Delivery::Wasm => {
            let kv = vars
                .and_then(|v| v.get("key_values"))
                .and_then(|kv| kv.get(name))
                .and_then(Value::as_str);
            if let Some(v) = kv {
                return Some(v.to_string());
            }
            let passed = vars
                .and_then(|v| v.get("host_env_keys"))
                .and_then(Value::as_array)
                .is_some_and(|keys| keys.iter().any(|k| k.as_str() == Some(name)));
            if passed {
                process_env(name)
            } else {
                None
            }
        }
    }
}

fn lint_client_ip(hcm_path: &str, hcm: &Value, value_path: &str, raw: &Value, report: &mut Report) {
    let envoy_appends = hcm
        .get("use_remote_address")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let envoy_hops = hcm
        .get("xff_num_trusted_hops")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let ci = raw.get("client_ip");
    let hops = ci
        .and_then(|c| c.get("xff_trusted_hops"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let said = ci
        .and_then(|c| c.get("use_remote_address"))
        .and_then(Value::as_bool);
    let uses_ip = raw.to_string().contains("\"ip\"");
    if !envoy_appends {
        // Measured: with use_remote_address false, Envoy sets source.address from the last
        // x-forwarded-for entry, which a client connecting directly writes itself.
        report.warn(
            join(hcm_path, "use_remote_address"),
            format!(
                "Envoy's default (false): Envoy takes the client address from the request's own \
                 x-forwarded-for, so a client that reaches this listener directly chooses the \
                 address api-guard sees{}. Safe only behind a proxy that always rewrites \
                 x-forwarded-for; at the edge set `use_remote_address: true` (with \
                 `xff_num_trusted_hops` for trusted proxies in front) and client_ip.xff_trusted_hops 0",
                if uses_ip {
                    " (per-IP limits and logs)"
                } else {
                    " (logs)"
                }
            ),
        );
    }
    if hops == 0 {
        return;
    }
    if let Some(said) = said.filter(|s| *s != envoy_appends) {
        report.error(
            format!("{value_path} (client_ip.use_remote_address)"),
            format!(
                "client_ip.use_remote_address is {said} but the connection manager at `{hcm_path}` \
                 has use_remote_address {envoy_appends}{}: {}",
                if envoy_appends { "" } else { " (Envoy's default)" },
                if said {
                    "the filter skips an x-forwarded-for entry Envoy never appended and keys on \
                     one the client wrote"
                } else {
                    "the filter counts the entry Envoy appended as a trusted proxy, so every \
                     client gets the address of the hop in front"
                }
            ),
        );
    }
    if envoy_hops > 0 {
        report.warn(
            format!("{value_path} (client_ip.xff_trusted_hops)"),
            format!(
                "both Envoy (xff_num_trusted_hops {envoy_hops} at `{hcm_path}`) and the filter \
                 (xff_trusted_hops {hops}) resolve the client from x-forwarded-for; let Envoy do \
                 it alone: set client_ip.xff_trusted_hops to 0 (the filter then reads the address \
                 Envoy resolved)"
            ),
        );
    }
}

fn lint_clusters(
    value_path: &str,
    raw: &Value,
    clusters: Option<&BTreeSet<String>>,
    report: &mut Report,
) {
    let mut wanted: Vec<(String, &str)> = Vec::new();
    if let Some(c) = raw.pointer("/quota/cluster").and_then(Value::as_str) {
        wanted.push(("quota.cluster".into(), c));
    }
    if let Some(providers) = raw.get("jwt_providers").and_then(Value::as_object) {
        for (name, p) in providers {
            if let Some(c) = p.pointer("/remote_jwks/cluster").and_then(Value::as_str) {
                wanted.push((format!("jwt_providers.{name}.remote_jwks.cluster"), c));
            }
        }
    }
    let Some(clusters) = clusters else {
        for (at, c) in wanted {
            report.warn(
                format!("{value_path} ({at})"),
                format!(
                    "cluster `{c}` cannot be checked: this file has no static_resources.clusters \
                     (make sure CDS provides it, or every callout to it fails)"
                ),
            );
        }
        return;
    };
    for (at, c) in wanted {
        if !clusters.contains(c) {
            report.error(
                format!("{value_path} ({at})"),
                format!(
                    "cluster `{c}` is not defined in static_resources.clusters (defined: {}): \
                     every callout to it fails",
                    clusters.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
        }
    }
}

fn lint_wasm(cfg_path: &str, wasm: &Value, raw: &Value, report: &mut Report) {
    let has_webhooks = raw
        .get("webhooks")
        .and_then(Value::as_object)
        .is_some_and(|w| !w.is_empty());
    let stop_ok = wasm
        .get("allow_on_headers_stop_iteration")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let policies = || {
        raw.get("routes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .chain(raw.get("default_route"))
    };
    // A route's max_body_bytes holds a body of unknown length the same way, and a
    // json_schema route holds every body.
    let counts_bodies = policies().any(|r| r.get("max_body_bytes").is_some());
    let schema = policies().any(|r| r.get("json_schema").is_some_and(|s| !s.is_null()));
    if (has_webhooks || counts_bodies || schema) && !stop_ok {
        let what = if has_webhooks {
            "webhooks are configured"
        } else if counts_bodies {
            "a route sets max_body_bytes"
        } else {
            "a route sets json_schema"
        };
        report.error(
            join(cfg_path, "allow_on_headers_stop_iteration"),
            format!(
                "{what} but allow_on_headers_stop_iteration is not true: Envoy never hands \
                 the body to the filter while it holds the headers, and every request whose \
                 body the filter must see hangs until Envoy's timeout. Add \
                 `allow_on_headers_stop_iteration: true`"
            ),
        );
    }
    let file = wasm
        .pointer("/vm_config/code/local/filename")
        .or_else(|| wasm.pointer("/vm_config/code/remote/http_uri/uri"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if schema && file.rsplit(['/', '\\']).next() == Some("api_guard.wasm") {
        // The base .wasm has no validator and refuses such a config at load.
        report.error(
            join(cfg_path, "vm_config.code"),
            "a route sets json_schema, which needs api_guard_full.wasm (or the dynamic \
             module): api_guard.wasm is built without a JSON Schema validator and refuses \
             this config",
        );
    }
    let fail_open = wasm.get("failure_policy").and_then(Value::as_str) == Some("FAIL_OPEN")
        || wasm.get("fail_open").and_then(Value::as_bool) == Some(true);
    if fail_open {
        report.warn(
            join(cfg_path, "failure_policy"),
            "FAIL_OPEN: if the VM ever fails, requests pass unchecked (no auth, no limits). \
             Prefer FAIL_RELOAD (a fresh VM for the next request) or the default FAIL_CLOSED",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wasm_filter(cfg: &Value, extra: Value) -> Value {
        let mut c = json!({
            "vm_config": { "runtime": "envoy.wasm.runtime.v8",
                "code": { "local": { "filename": "/etc/envoy/api_guard.wasm" } } },
            "configuration": { "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": cfg.to_string() }
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        json!({ "name": "envoy.filters.http.wasm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": c } })
    }

    fn router() -> Value {
        json!({ "name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } })
    }

    fn bootstrap(hcm_extra: Value, filters: Vec<Value>, clusters: &[&str]) -> Value {
        let mut hcm = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress", "http_filters": filters });
        for (k, v) in hcm_extra.as_object().unwrap() {
            hcm[k] = v.clone();
        }
        json!({ "static_resources": {
            "listeners": [ { "name": "l", "filter_chains": [ { "filters": [
                { "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm } ] } ] } ],
            "clusters": clusters.iter().map(|c| json!({ "name": c })).collect::<Vec<_>>() } })
    }

    const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn open() -> Value {
        json!({ "default_route": { "auth": { "mode": "none" } } })
    }

    #[test]
    fn a_safe_setup_is_clean() {
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![wasm_filter(&open(), json!({})), router()],
            &[],
        );
        let r = check(&doc, &no_env);
        assert_eq!(r.filters.len(), 1);
        assert_eq!(r.filters[0].path, format!("{HCM}.http_filters[0]"));
        assert_eq!(r.filters[0].routes, Some(1));
        assert!(r.findings.is_empty(), "{:?}", r.findings);
    }

    #[test]
    fn each_trap_is_named_at_its_path() {
        let cfg = json!({
            "client_ip": { "xff_trusted_hops": 1, "use_remote_address": true },
            "webhooks": { "gh": { "scheme": "github", "secrets": [ { "env": "GH" } ] } },
            "quota": { "cluster": "quota" },
            "default_route": { "auth": { "mode": "none" } }
        });
        let doc = bootstrap(
            json!({}),
            vec![
                router(),
                wasm_filter(
                    &cfg,
                    json!({ "failure_policy": "FAIL_OPEN",
                    "vm_config": { "code": { "local": { "filename": "api_guard.wasm" } },
                        "environment_variables": { "key_values": { "GH": "s3cret" } } } }),
                ),
            ],
            &["upstream"],
        );
        let r = check(&doc, &no_env);
        let f = format!("{HCM}.http_filters[1]");
        let has = |sev: Severity, path: &str, text: &str| {
            r.findings
                .iter()
                .any(|x| x.severity == sev && x.path.starts_with(path) && x.message.contains(text))
        };
        assert!(
            has(Severity::Error, &f, "after the router"),
            "{:?}",
            r.findings
        );
        assert!(has(
            Severity::Error,
            &format!("{f}.typed_config.config.allow_on_headers_stop_iteration"),
            "hangs"
        ));
        assert!(has(
            Severity::Warning,
            &format!("{f}.typed_config.config.failure_policy"),
            "FAIL_OPEN"
        ));
        assert!(has(
            Severity::Error,
            &format!("{f}.typed_config.config.configuration.value"),
            "cluster `quota`"
        ));
        assert!(has(
            Severity::Error,
            &format!("{f}.typed_config.config.configuration.value"),
            "use_remote_address is true"
        ));
        assert!(has(
            Severity::Warning,
            &format!("{HCM}.use_remote_address"),
            "Envoy's default"
        ));
        // The secret came from key_values: the config itself validated.
        assert_eq!(r.filters[0].routes, Some(1));
    }

    #[test]
    fn filter_config_errors_and_missing_secrets_are_reported_with_both_paths() {
        let cfg = json!({ "webhooks": { "gh": { "scheme": "github", "secrets": [ { "env": "NOPE" } ] } },
            "default_route": { "auth": { "mode": "none" } } });
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![
                wasm_filter(&cfg, json!({ "allow_on_headers_stop_iteration": true })),
                router(),
            ],
            &[],
        );
        let r = check(&doc, &no_env);
        assert_eq!(r.errors(), 1, "{:?}", r.findings);
        let e = &r.findings[0];
        assert!(e.path.ends_with("typed_config.config.configuration.value"));
        assert!(
            e.message.contains("webhooks.gh.secrets[0]"),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_dynamic_module_is_found_and_reads_the_process_environment() {
        let cfg = json!({ "webhooks": { "gh": { "scheme": "github", "secrets": [ { "env": "GH" } ] } },
            "default_route": { "auth": { "mode": "none" } } });
        let module = json!({ "name": "envoy.filters.http.dynamic_modules", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
            "dynamic_module_config": { "name": "api_guard", "do_not_close": true },
            "filter_name": "api_guard",
            "filter_config": { "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": cfg.to_string() } } });
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![module, router()],
            &[],
        );
        let env = |n: &str| (n == "GH").then(|| "s3cret".to_string());
        let r = check(&doc, &env);
        assert_eq!(r.filters[0].delivery, Delivery::Module);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!(check(&doc, &no_env).errors(), 1);
    }

    #[test]
    fn a_document_without_api_guard_is_an_error_and_filter_configs_are_not_envoy() {
        let doc = bootstrap(json!({}), vec![router()], &[]);
        assert_eq!(check(&doc, &no_env).errors(), 1);
        assert!(looks_like_envoy(&doc));
        assert!(!looks_like_envoy(&open()));
    }

    #[test]
    fn a_route_counting_its_body_needs_stop_iteration_too() {
        let cfg = json!({
            "routes": [ { "name": "up", "match": { "path": "/up" }, "auth": { "mode": "none" },
                          "max_body_bytes": 1024 } ],
            "default_route": { "auth": { "mode": "none" } }
        });
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![wasm_filter(&cfg, json!({})), router()],
            &[],
        );
        let r = check(&doc, &no_env);
        assert!(
            r.findings.iter().any(|f| f.severity == Severity::Error
                && f.path.ends_with("allow_on_headers_stop_iteration")
                && f.message.contains("max_body_bytes")),
            "{:?}",
            r.findings
        );
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![
                wasm_filter(&cfg, json!({ "allow_on_headers_stop_iteration": true })),
                router(),
            ],
            &[],
        );
        assert_eq!(check(&doc, &no_env).errors(), 0);
    }

    #[test]
    fn a_json_schema_route_needs_the_full_wasm() {
        let cfg = json!({
            "routes": [ { "name": "up", "match": { "path": "/up" }, "auth": { "mode": "none" },
                          "json_schema": { "type": "object" } } ],
            "default_route": { "auth": { "mode": "none" } }
        });
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![
                wasm_filter(&cfg, json!({ "allow_on_headers_stop_iteration": true })),
                router(),
            ],
            &[],
        );
        let r = check(&doc, &no_env);
        assert!(
            r.findings.iter().any(|f| f.severity == Severity::Error
                && f.path.ends_with("vm_config.code")
                && f.message.contains("api_guard_full.wasm")),
            "{:?}",
            r.findings
        );
        let mut full = wasm_filter(&cfg, json!({ "allow_on_headers_stop_iteration": true }));
        full["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] =
            json!("/etc/envoy/api_guard_full.wasm");
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![full, router()],
            &[],
        );
        assert_eq!(
            check(&doc, &no_env).errors(),
            0,
            "{:?}",
            check(&doc, &no_env).findings
        );
        // It holds bodies: stop iteration is needed as for max_body_bytes.
        let doc = bootstrap(
            json!({ "use_remote_address": true }),
            vec![wasm_filter(&cfg, json!({})), router()],
            &[],
        );
        assert!(check(&doc, &no_env)
            .findings
            .iter()
            .any(|f| f.path.ends_with("allow_on_headers_stop_iteration")
                && f.message.contains("json_schema")));
    }

    #[test]
    fn embedded_configs_are_compiled_with_the_environment_each_delivery_sees() {
        let cfg = json!({ "webhooks": { "gh": { "scheme": "github", "secrets": [ { "env": "GH" } ] } },
            "routes": [ { "name": "a", "match": { "prefix": "/a" } } ],
            "default_route": { "auth": { "mode": "none" } } });
        // The wasm filter reads its VM's variables, not Envoy's process environment.
        let with_vars = wasm_filter(
            &cfg,
            json!({ "vm_config": { "runtime": "envoy.wasm.runtime.v8",
                "code": { "local": { "filename": "api_guard.wasm" } },
                "environment_variables": { "key_values": { "GH": "from-vm" } } } }),
        );
        let without = wasm_filter(&cfg, json!({}));
        let doc = bootstrap(json!({}), vec![with_vars, without, router()], &[]);
        let found = embedded_configs(&doc, &no_env);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].path, format!("{HCM}.http_filters[0]"));
        assert_eq!(found[0].delivery, Delivery::Wasm);
        let (compiled, _) = found[0].config.as_ref().expect("GH from the VM");
        assert_eq!(compiled.routes[0].name, "a");
        let err = found[1].config.as_ref().expect_err("GH unset in that VM");
        assert!(err.contains("GH"), "{err}");
        // Not an api-guard filter: nothing found.
        assert!(embedded_configs(&bootstrap(json!({}), vec![router()], &[]), &no_env).is_empty());
    }
}
