//! Bounded load on `POST /v1/check` of a running service (loopback only): decisions per second
//! and latency percentiles. Used by `make bench` (quota case).
//!
//!   cargo run --release -p api-guard-quota --example check_load -- http://127.0.0.1:8081 [secs] [concurrency]

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8081".into());
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
    let host = base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")) {
        eprintln!("refusing to load a non-loopback address: {base}");
        std::process::exit(2);
    }
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/check");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                // 1000 distinct clients, as many keys as a real mix would touch.
                let body = format!(
                    r#"{{"client":"bench-{}","tier":"bench","route":"r","cost":1}}"#,
                    (i * 31 + w as u64) % 1000
                );
                i += 1;
                let t = Instant::now();
                match http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                    _ => errors += 1,
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
