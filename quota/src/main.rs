//! `api-guard-quota [--config quota.toml] [--listen 127.0.0.1:8081] [--redis redis://host:6379]
//!  [--rls-listen 127.0.0.1:8089 --rls-config ratelimit/]`

use api_guard_quota::config::Config;
use api_guard_quota::metrics::Metrics;
use api_guard_quota::rls::config::RlsConfig;
use api_guard_quota::rls::service::{self as rls, RlsService, TlsFiles};
use api_guard_quota::store::memory::{MemoryStore, DEFAULT_MAX_CLIENTS};
use api_guard_quota::store::redis::RedisStore;
use api_guard_quota::store::Store;
use api_guard_quota::{api, app_with_metrics, ops_app};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Quota service for api-guard: global rate limits and daily/monthly quotas, and Envoy's rate
/// limit service gRPC API.
#[derive(Debug, Parser)]
#[command(name = "api-guard-quota", version)]
struct Args {
    /// TOML config file of the HTTP API (see quota/README.md). Without it, the HTTP listener
    /// serves only /healthz, /readyz and /metrics (for a rate-limit-service-only setup).
    #[arg(long, required_unless_present = "rls_config")]
    config: Option<PathBuf>,
    /// Address to serve HTTP on (port 0 picks a free port; the ready line names it).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Redis URL: redis://[:password@]host:port[/db], rediss:// for TLS, or
    /// redis+cluster://host1:port1,host2:port2 for Redis Cluster. Without it, state is kept
    /// in memory (lost on restart, not shared between replicas).
    #[arg(long)]
    redis: Option<String>,
    /// Timeout for each Redis call, in milliseconds.
    #[arg(long, default_value_t = 250)]
    redis_timeout_ms: u64,
    /// Most clients the in-memory store holds (and most rate limit service counters).
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS)]
    max_clients: usize,
    /// Address to serve Envoy's rate limit service gRPC API on (HTTP/2; port 0 picks one).
    #[arg(long, requires = "rls_config")]
    rls_listen: Option<SocketAddr>,
    /// envoyproxy/ratelimit YAML config: a file, or a folder of .yaml/.yml files (one
    /// `domain` each).
    #[arg(long, requires = "rls_listen")]
    rls_config: Option<PathBuf>,
    /// PEM certificate chain: serve the gRPC API over TLS (with --rls-tls-key).
    #[arg(long, requires_all = ["rls_tls_key", "rls_listen"])]
    rls_tls_cert: Option<PathBuf>,
    /// PEM private key for --rls-tls-cert.
    #[arg(long, requires = "rls_tls_cert")]
    rls_tls_key: Option<PathBuf>,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = match &args.config {
        None => None,
        Some(path) => match Config::load(path) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!("config {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    if let Some(c) = &config {
        if !c.tiers.contains_key(api_guard_quota::config::DEFAULT_TIER) {
            tracing::info!(
                "no [tiers.default]: requests of unlisted tiers are counted but not limited"
            );
        }
    }
    // A bad rate limit config refuses to start, like a bad TOML config.
    let rls_config = match &args.rls_config {
        None => None,
        Some(path) => match RlsConfig::load(path) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!("rls config: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let tls = match (&args.rls_tls_cert, &args.rls_tls_key) {
        (Some(c), Some(k)) => match (std::fs::read(c), std::fs::read(k)) {
            (Ok(cert_pem), Ok(key_pem)) => Some(TlsFiles { cert_pem, key_pem }),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("rls TLS files: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let store: Arc<dyn Store> = match &args.redis {
        None => Arc::new(MemoryStore::new(args.max_clients)),
        Some(url) => {
            match RedisStore::connect(url, Duration::from_millis(args.redis_timeout_ms)).await {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::error!("redis: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let kind = store.kind();
    let metrics = Arc::new(Metrics::new());
    let clock = api::system_clock();
    let router = match config {
        Some(c) => app_with_metrics(c, store.clone(), clock.clone(), metrics.clone()),
        None => ops_app(store.clone(), clock.clone(), metrics.clone()),
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();

    // One signal stops both servers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let rls_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut rls_task = None;
    let mut rls_line = String::new();
    if let (Some(rls_addr), Some(rc)) = (args.rls_listen, rls_config) {
        let l = match tokio::net::TcpListener::bind(rls_addr).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {rls_addr}: {e}");
                return ExitCode::from(1);
            }
        };
        let bound = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        rls_line = format!(" rls={bound}");
        tracing::info!(
            rls_listen = %bound,
            domains = rc.domains.len(),
            tls = tls.is_some(),
            "rate limit service"
        );
        let svc = RlsService::new(Arc::new(rc), store.clone(), metrics.clone(), clock);
        let shutdown = stopped(stop_rx.clone());
        let (stop, failed) = (stop_tx.clone(), rls_failed.clone());
        // The gRPC server failing (bad TLS material, say) stops the whole process.
        rls_task = Some(tokio::spawn(async move {
            if let Err(e) = rls::serve(l, svc, tls, shutdown).await {
                tracing::error!("rate limit service: {e}");
                failed.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = stop.send(true);
            }
        }));
    }
    // A stable line on stdout that scripts and tests wait for.
    println!("api-guard-quota ready listen={addr} store={kind}{rls_line}");
    tracing::info!(listen = %addr, store = kind, "ready");
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // No Nagle: every answer is one small write the caller is waiting for.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(stopped(stop_rx))
        .await;
    let mut code = ExitCode::SUCCESS;
    if let Err(e) = served {
        tracing::error!("server error: {e}");
        code = ExitCode::from(1);
    }
    if let Some(t) = rls_task {
        if t.await.is_err() || rls_failed.load(std::sync::atomic::Ordering::SeqCst) {
            code = ExitCode::from(1);
        }
    }
    code
}
