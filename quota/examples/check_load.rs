//! Bounded load on `POST /v1/check` of a running service (loopback only): decisions per second
//! and latency percentiles. Used by `make bench` (quota case).
//!
//! Each worker owns one keep-alive HTTP/1.1 connection (hyper's client connection, no pool)
//! and sends one request at a time on it, so the generator itself costs little CPU on a
//! machine it shares with the service.
//!
//!   cargo run --release -p api-guard-quota --example check_load -- http://127.0.0.1:8081 [secs] [concurrency]

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
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
    let addr = host.to_string();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..conc {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            let mut i = 0u64;
            let mut conn = None;
            while Instant::now() < deadline {
                if conn.is_none() {
                    conn = connect(&addr).await;
                    if conn.is_none() {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
                let Some(sender) = conn.as_mut() else {
                    continue;
                };
                // 1000 distinct clients, as many keys as a real mix would touch.
                let body = format!(
                    r#"{{"client":"bench-{}","tier":"bench","route":"r","cost":1}}"#,
                    (i * 31 + w as u64) % 1000
                );
                i += 1;
                let req = hyper::Request::post("/v1/check")
                    .header("host", addr.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .expect("request");
                let t = Instant::now();
                let ok = match sender.send_request(req).await {
                    Ok(r) => {
                        let status = r.status();
                        // Read the whole answer, as a client applying it would.
                        r.into_body().collect().await.is_ok() && status == 200
                    }
                    Err(_) => {
                        conn = None;
                        false
                    }
                };
                if ok {
                    lat.push(t.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
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

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> Option<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}
