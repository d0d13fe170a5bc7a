//! Bounded load on `ShouldRateLimit` of a running service (loopback only): decisions per
//! second and latency percentiles over gRPC. Used by `make bench` (bench/rls.sh).
//!
//!   cargo run --release -p api-guard-quota --example rls_load -- 127.0.0.1:8089 [secs] [connections]
//!
//! Each call sends two descriptors of domain `bench` (`remote_address`, and `generic_key` =
//! `api`), spread over 1000 addresses, as Envoy's filter would.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use std::time::{Duration, Instant};

fn desc(k: &str, v: String) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: vec![Entry {
            key: k.into(),
            value: v,
        }],
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8089".into());
    let secs: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .min(60);
    let conc: usize = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16)
        .clamp(1, 256);
    if !(addr.starts_with("127.") || addr.starts_with("localhost") || addr.starts_with("[::1]")) {
        eprintln!("refusing to load a non-loopback address: {addr}");
        std::process::exit(2);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let url = format!("http://{addr}");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            // One HTTP/2 connection per worker, as each Envoy worker keeps its own.
            let Ok(mut client) = RateLimitServiceClient::connect(url).await else {
                return (lat, 1);
            };
            let mut i = 0u64;
            while Instant::now() < deadline {
                let ip = (i * 31 + w as u64) % 1000;
                i += 1;
                let req = RateLimitRequest {
                    domain: "bench".into(),
                    descriptors: vec![
                        desc("remote_address", format!("10.0.{}.{}", ip / 256, ip % 256)),
                        desc("generic_key", "api".into()),
                    ],
                    hits_addend: 0,
                };
                let t = Instant::now();
                match client.should_rate_limit(req).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u32),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "decisions/s {:.0}  p50 {} us  p99 {} us  max {} us  ({} ok, {} errors, {} s, {} connections)",
        all.len() as f64 / secs as f64,
        pct(0.50),
        pct(0.99),
        all.last().copied().unwrap_or(0),
        all.len(),
        errors,
        secs,
        conc
    );
}
