//! `api-guard check`: the filter's own validation, offline.

use std::process::ExitCode;

pub fn run(args: &[String]) -> ExitCode {
    let path = match args {
        [p] => p,
        _ => {
            eprintln!("usage: api-guard check CONFIG.json");
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
    // Same lookup as the filter: secrets given as {"env": NAME} must be set here too.
    match api_guard::config::parse(&bytes, &|name| std::env::var(name).ok()) {
        Ok((cfg, warnings)) => {
            for w in &warnings {
                println!("warning: `{}`: {}", w.path, w.message);
            }
            println!(
                "ok: {path} is valid ({} route{}{}, {} warning{})",
                cfg.routes.len(),
                if cfg.routes.len() == 1 { "" } else { "s" },
                if cfg.default_route.is_some() {
                    " + default_route"
                } else {
                    ""
                },
                warnings.len(),
                if warnings.len() == 1 { "" } else { "s" },
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
