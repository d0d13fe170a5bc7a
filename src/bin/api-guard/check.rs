//! `api-guard check`: the filter's own validation, offline — on a filter config (JSON), or on
//! a whole Envoy config (YAML or JSON: bootstrap, listener, LDS resources), where every
//! api-guard filter is found, validated, and its surroundings linted (`envoy_check`).
//! `--explain` prints, per route, the checks a request meets in order and their settings
//! (`api_guard::explain`), for the filter config or each api-guard filter in an Envoy config.

use api_guard::envoy_check::{self, Delivery, Severity};
use std::process::ExitCode;

const USAGE: &str = "usage: api-guard check [--explain] CONFIG.json | ENVOY.yaml";

pub fn run(args: &[String]) -> ExitCode {
    let explain = args.iter().any(|a| a == "--explain");
    let rest: Vec<&String> = args.iter().filter(|a| *a != "--explain").collect();
    let path = match rest[..] {
        [p] if !p.starts_with("--") => p,
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot read {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let yaml = path.ends_with(".yaml") || path.ends_with(".yml");
    if !yaml {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(doc) if envoy_check::looks_like_envoy(&doc) => {
                return envoy(path, &doc, explain);
            }
            // Not JSON at all: maybe YAML under another name.
            Err(_)
                if std::str::from_utf8(&bytes).is_ok_and(|t| !t.trim_start().starts_with('{')) => {}
            _ => return filter_config(path, &bytes, explain),
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    match serde_yaml_ng::from_str::<serde_json::Value>(&text) {
        Ok(doc) => envoy(path, &doc, explain),
        Err(e) => {
            eprintln!("error: {path}: not valid YAML: {e}");
            ExitCode::FAILURE
        }
    }
}

fn kind(d: Delivery) -> &'static str {
    match d {
        Delivery::Wasm => "wasm filter",
        Delivery::Module => "dynamic module",
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn filter_config(path: &str, bytes: &[u8], explain: bool) -> ExitCode {
    // Same lookup as the filter: secrets given as {"env": NAME} must be set here too.
    match api_guard::config::parse(bytes, &|name| std::env::var(name).ok()) {
        Ok((cfg, warnings)) => {
            if explain {
                println!("{path}:\n");
                print!("{}", api_guard::explain::explain(&cfg));
                println!();
            }
            for w in &warnings {
                println!("warning: `{}`: {}", w.path, w.message);
            }
            let schema = cfg
                .routes
                .iter()
                .map(|r| &r.policy)
                .chain(cfg.default_route.as_ref())
                .any(|p| p.hygiene.as_ref().is_some_and(|h| h.json_schema.is_some()));
            if schema {
                // The CLI always has the validator; the base .wasm does not.
                println!(
                    "note: json_schema is set: load api_guard_full.wasm or the dynamic module \
                     (the base api_guard.wasm refuses this config)"
                );
            }
            println!(
                "ok: {path} is valid ({} route{}{}, {} warning{})",
                cfg.routes.len(),
                plural(cfg.routes.len()),
                if cfg.default_route.is_some() {
                    " + default_route"
                } else {
                    ""
                },
                warnings.len(),
                plural(warnings.len()),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn envoy(path: &str, doc: &serde_json::Value, explain: bool) -> ExitCode {
    let report = envoy_check::check(doc, &|name| std::env::var(name).ok());
    if explain {
        for f in envoy_check::embedded_configs(doc, &|name| std::env::var(name).ok()) {
            // An invalid config is reported below with the other errors.
            if let Ok((cfg, _)) = f.config {
                println!("api-guard {} at `{}`:\n", kind(f.delivery), f.path);
                print!("{}", api_guard::explain::explain(&cfg));
                println!();
            }
        }
    }
    for f in &report.filters {
        let kind = kind(f.delivery);
        match f.routes {
            Some(n) => println!(
                "found: api-guard {kind} at `{}` ({n} route{})",
                f.path,
                plural(n)
            ),
            None => println!("found: api-guard {kind} at `{}`", f.path),
        }
    }
    for f in &report.findings {
        let (label, at) = match f.severity {
            Severity::Error => ("error", &f.path),
            Severity::Warning => ("warning", &f.path),
        };
        let line = if at.is_empty() {
            format!("{label}: {}", f.message)
        } else {
            format!("{label}: `{at}`: {}", f.message)
        };
        match f.severity {
            Severity::Error => eprintln!("{line}"),
            Severity::Warning => println!("{line}"),
        }
    }
    let (errors, warnings) = (report.errors(), report.warnings());
    if errors > 0 {
        eprintln!(
            "error: {path}: {errors} error{}, {warnings} warning{}",
            plural(errors),
            plural(warnings)
        );
        ExitCode::FAILURE
    } else {
        println!(
            "ok: {path}: {} api-guard filter{} valid, {warnings} warning{}",
            report.filters.len(),
            plural(report.filters.len()),
            plural(warnings)
        );
        ExitCode::SUCCESS
    }
}
