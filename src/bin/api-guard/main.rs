//! `api-guard`: the native companion of the filter.
//!
//! - `api-guard check CONFIG.json | ENVOY.yaml` validates a filter config with the filter's own
//!   code, or every api-guard filter in an Envoy config and the settings around it;
//!   `--explain` also prints, per route, the checks a request meets in order.
//! - `api-guard demo-upstream [--listen ADDR]` runs the echo upstream used by `make run`.
//! - `api-guard token [...]` mints demo JWTs and prints the JWKS that accepts them.

mod check;
mod token;

use std::process::ExitCode;

const USAGE: &str = "usage:
  api-guard check [--explain] CONFIG.json | ENVOY.yaml
                                          validate a filter config, or every api-guard filter in an
                                          Envoy config and the settings around it (exit 0 = valid);
                                          --explain: per route, the checks a request meets in order
  api-guard demo-upstream [--listen ADDR] echo upstream for the demo (default 127.0.0.1:8081)
  api-guard token [--alg ALG] [--key FILE] [--jwks] [--sub S] [--scope S] [--claim K=V] ...
                                          mint a demo JWT (see `api-guard token --help`)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") => check::run(&args[1..]),
        Some("demo-upstream") => demo_upstream(&args[1..]),
        Some("token") => token::run(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn demo_upstream(args: &[String]) -> ExitCode {
    let listen = match args {
        [] => "127.0.0.1:8081".to_string(),
        [flag, addr] if flag == "--listen" => addr.clone(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match api_guard::echo::EchoServer::start(&listen) {
        Ok(s) => {
            println!(
                "demo upstream: echoing requests as JSON on 127.0.0.1:{}",
                s.port
            );
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("demo upstream: cannot listen on {listen}: {e}");
            ExitCode::FAILURE
        }
    }
}
