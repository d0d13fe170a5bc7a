//! `api-guard-quota --config quota.toml [--listen 127.0.0.1:8081] [--redis redis://host:6379]`

use api_guard_quota::config::Config;
use api_guard_quota::store::memory::{MemoryStore, DEFAULT_MAX_CLIENTS};
use api_guard_quota::store::redis::RedisStore;
use api_guard_quota::store::Store;
use api_guard_quota::{api, app};
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Quota service for api-guard: global rate limits and daily/monthly quotas.
#[derive(Debug, Parser)]
#[command(name = "api-guard-quota", version)]
struct Args {
    /// TOML config file (see quota/README.md).
    #[arg(long)]
    config: PathBuf,
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
    /// Most clients the in-memory store holds.
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENTS)]
    max_clients: usize,
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
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("config {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if !config
        .tiers
        .contains_key(api_guard_quota::config::DEFAULT_TIER)
    {
        tracing::info!(
            "no [tiers.default]: requests of unlisted tiers are counted but not limited"
        );
    }
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
    let router = app(config, store, api::system_clock());
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
    // A stable line on stdout that scripts and tests wait for.
    println!("api-guard-quota ready listen={addr} store={kind}");
    tracing::info!(listen = %addr, store = kind, "ready");
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
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
        })
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("server error: {e}");
            ExitCode::from(1)
        }
    }
}
