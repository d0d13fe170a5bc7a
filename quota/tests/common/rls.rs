//! Helpers for the rate limit service tests: `api-guard-quota` with `--rls-listen`, and a real
//! Envoy whose only rate limiting is its native `envoy.filters.http.ratelimit` filter. Free
//! ports, readiness deadlines, everything stopped on drop.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `api-guard-quota` serving the gRPC API (and HTTP for `/metrics` and as the
/// Envoy tests' upstream).
pub struct RlsProc {
    pub http: String,
    pub rls: String,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl RlsProc {
    /// `files`: (file name, YAML) written to a folder that `--rls-config` points at.
    pub fn start(files: &[(&str, &str)], redis: Option<&str>) -> Self {
        Self::start_with(files, redis, &[])
    }

    /// As [`RlsProc::start`], with more command-line arguments.
    pub fn start_with(files: &[(&str, &str)], redis: Option<&str>, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("ratelimit");
        std::fs::create_dir(&conf).expect("mkdir");
        for (name, text) in files {
            std::fs::write(conf.join(name), text).expect("write rls config");
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_api-guard-quota"));
        cmd.arg("--rls-config").arg(&conf).args([
            "--rls-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
        ]);
        if let Some(r) = redis {
            cmd.arg("--redis").arg(r);
        }
        cmd.args(extra);
        let (child, http, rls) = spawn_ready(cmd);
        Self {
            http,
            rls,
            child,
            dir,
        }
    }

    pub fn rls_port(&self) -> u16 {
        port_of(&self.rls)
    }

    pub fn http_port(&self) -> u16 {
        port_of(&self.http)
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port(), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// One metric sample's value (0 when absent), e.g.
    /// `api_guard_quota_rls_over_limit_total{domain="d",key="k"}`.
    pub fn metric(&self, sample: &str) -> u64 {
        let prefix = format!("{sample} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RlsProc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in address")
}

/// Starts the command and waits (20 s) for `api-guard-quota ready listen=A store=S rls=B`.
fn spawn_ready(mut cmd: Command) -> (Child, String, String) {
    // RLS_TEST_LOG=api_guard_quota=debug shows every request the service receives.
    cmd.env(
        "RUST_LOG",
        std::env::var("RLS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start api-guard-quota");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("api-guard-quota ready ") {
                let field = |k: &str| {
                    rest.split_whitespace()
                        .find_map(|f| f.strip_prefix(k))
                        .unwrap_or("")
                        .to_string()
                };
                let _ = tx.send((field("listen="), field("rls=")));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok((http, rls)) => (child, http, rls),
        Err(_) => {
            let _ = child.kill();
            panic!("api-guard-quota did not print its ready line within 20 s");
        }
    }
}

/// A minimal HTTP/1.1 GET (connection closed after), for admin and metrics endpoints.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some((status, body.to_string()));
    }
    // Envoy's admin answers chunked: join the chunks.
    let (mut out, mut rest) = (String::new(), body);
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 {
            return Some((status, out));
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n + 2..)?;
    }
}

/// The Envoy binary: `$ENVOY_BIN`, else the pinned one `make test` installs into `.tools/`.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/envoy/envoy/_bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found at {}: run `make tools` (it installs the pinned Envoy) or set ENVOY_BIN",
        p.display()
    );
    p
}

pub fn static_cluster(name: &str, ports: &[u16], http2: bool) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|p| {
            json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}})
        })
        .collect();
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}
    });
    if http2 {
        c["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        });
    }
    c
}

/// The native rate limit filter's config for `domain` against cluster `rls`.
pub fn ratelimit_filter(domain: &str, failure_mode_deny: bool) -> Value {
    json!({
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            "domain": domain,
            "failure_mode_deny": failure_mode_deny,
            "timeout": "2s",
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}}
            }
        }
    })
}

/// A route for `prefix` to the upstream (the service's own `/healthz`), with `rate_limits`.
pub fn route(prefix: &str, rate_limits: Value) -> Value {
    json!({
        "match": {"prefix": prefix},
        "route": {"cluster": "upstream", "prefix_rewrite": "/healthz", "timeout": "5s",
                  "rate_limits": rate_limits}
    })
}

/// A bootstrap: one listener with the native rate limit filter and the router; cluster
/// `rls` (HTTP/2) on `rls_ports`, cluster `upstream` on `upstream_port`.
pub fn bootstrap(
    filter: Value,
    routes: Vec<Value>,
    rls_ports: &[u16],
    upstream_port: u16,
) -> Value {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "use_remote_address": true,
                        "route_config": {"name": "local", "virtual_hosts": [
                            {"name": "all", "domains": ["*"], "routes": routes}
                        ]},
                        "http_filters": [
                            filter,
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                        ]
                    }
                }]}]
            }],
            "clusters": [
                static_cluster("rls", rls_ports, true),
                static_cluster("upstream", &[upstream_port], false)
            ]
        }
    })
}

/// A running Envoy, killed on drop (its log printed when the test panicked).
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    dir: tempfile::TempDir,
}

impl Envoy {
    pub fn start(bootstrap: &Value) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("envoy.json");
        std::fs::write(&cfg, serde_json::to_vec_pretty(bootstrap).unwrap()).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", "2", "--disable-hot-restart", "-l", "info"])
            .arg("--admin-address-path")
            .arg(dir.path().join("admin.txt"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run envoy");
        let mut e = Envoy {
            child,
            port: 0,
            admin_port: 0,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = e.child.try_wait() {
                panic!("Envoy exited with {st}\n{}", e.logs());
            }
            assert!(
                Instant::now() < deadline,
                "Envoy not ready in 30 s\n{}",
                e.logs()
            );
            if e.admin_port == 0 {
                if let Ok(s) = std::fs::read_to_string(e.dir.path().join("admin.txt")) {
                    e.admin_port = s
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                }
            }
            if e.admin_port != 0 {
                if let Some((200, _)) = http_get(e.admin_port, "/ready") {
                    if let Some((200, body)) = http_get(e.admin_port, "/listeners?format=json") {
                        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let p = v["listener_statuses"][0]["local_address"]["socket_address"]
                            ["port_value"]
                            .as_u64()
                            .unwrap_or(0);
                        if p != 0 {
                            e.port = p as u16;
                            return e;
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let logs = self.logs();
            let lines: Vec<&str> = logs.lines().collect();
            eprintln!(
                "--- Envoy log ---\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// `envoy --mode validate -c FILE`: Ok, or Envoy's output.
pub fn envoy_validate(path: &std::path::Path) -> Result<(), String> {
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(path)
        .args(["-l", "warning"])
        .output()
        .expect("run envoy --mode validate");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A self-signed certificate for `localhost` (P-256) and its key, as PEM files in `dir`:
/// (cert path, key path). Uses the `openssl` command.
pub fn self_signed_cert(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the TLS test needs the openssl command (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}
