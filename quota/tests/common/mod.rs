//! Test helpers: a real `redis-server` and real `api-guard-quota` processes on free loopback
//! ports, each waited for with a deadline and stopped on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn find_on_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|f| f.is_file())
    })
}

pub fn redis_server_bin() -> PathBuf {
    find_on_path("redis-server").unwrap_or_else(|| {
        panic!(
            "redis-server not found on PATH: these tests need a real Redis. `make test` installs it \
             (apt-get install -y redis-server)"
        )
    })
}

/// A `redis-server` owned by one test. Persistence (AOF, fsync on every write) is on when
/// asked, so a restart on the same directory keeps everything acknowledged.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    persist: bool,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start(persist: bool) -> Self {
        let mut s = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            persist,
            child: None,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(redis_server_bin());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("")
            .arg("--protected-mode")
            .arg("no");
        if self.persist {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_ping(self.port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server without a chance to save (SIGKILL), then starts it again on the same
    /// port and data directory.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three `redis-server` masters forming a Redis Cluster (slots split by `redis-cli --cluster
/// create`), for the Cluster variant of the store suite.
pub struct RedisCluster {
    nodes: Vec<(u16, tempfile::TempDir, Child)>,
}

fn cluster_port() -> u16 {
    // The cluster bus listens on port + 10000: pick ports where both are free.
    loop {
        let p = free_port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

impl RedisCluster {
    pub fn start() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = cluster_port();
            let dir = tempfile::tempdir().expect("tempdir");
            let child = Command::new(redis_server_bin())
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                ])
                .args([
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--protected-mode",
                    "no",
                ])
                .arg("--cluster-config-file")
                .arg(dir.path().join("nodes.conf"))
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server (cluster mode)");
            nodes.push((port, dir, child));
        }
        let c = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(10);
        for (port, _, _) in &c.nodes {
            while !redis_ping(*port) {
                assert!(
                    Instant::now() < deadline,
                    "cluster node {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let cli = find_on_path("redis-cli").expect("redis-cli (package redis-tools) on PATH");
        let mut create = Command::new(cli.clone());
        create.arg("--cluster").arg("create");
        for (port, _, _) in &c.nodes {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for (port, _, _) in &c.nodes {
            loop {
                let info = Command::new(&cli)
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok on {port}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|(p, _, _)| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Keys held by each node (to show that clients spread over the slots).
    pub fn key_counts(&self) -> Vec<u64> {
        let cli = find_on_path("redis-cli").expect("redis-cli");
        self.nodes
            .iter()
            .map(|(p, _, _)| {
                let out = Command::new(&cli)
                    .args(["-p", &p.to_string(), "dbsize"])
                    .output()
                    .expect("dbsize");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, _, c) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw RESP PING, so the helper needs no client library state.
fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// A running `api-guard-quota` process.
pub struct Service {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Service {
    pub fn start(config: &str, redis: Option<&str>) -> Self {
        Self::start_with(config, redis, &[])
    }

    pub fn start_with(config: &str, redis: Option<&str>, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("quota.toml");
        std::fs::write(&path, config).expect("write config");
        let (child, addr) = spawn_service(&path, redis, env);
        Self {
            addr,
            child,
            _dir: dir,
            config_path: path,
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the process and starts a new one with the same config and store, on a new port.
    pub fn restart(&mut self, redis: Option<&str>) {
        self.stop();
        let (child, addr) = spawn_service(&self.config_path, redis, &[]);
        self.child = child;
        self.addr = addr;
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_service(config: &Path, redis: Option<&str>, env: &[(&str, &str)]) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_api-guard-quota"));
    cmd.arg("--config")
        .arg(config)
        .arg("--listen")
        .arg("127.0.0.1:0");
    if let Some(r) = redis {
        cmd.arg("--redis").arg(r);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("RUST_LOG", "warn");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start api-guard-quota");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("api-guard-quota ready listen=") {
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                let _ = tx.send(addr);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(addr) => (child, addr),
        Err(_) => {
            let _ = child.kill();
            panic!("api-guard-quota did not print its ready line within 20 s");
        }
    }
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A config with one tier (`t`) built from TOML lines, plus the admin token.
pub fn config_with(tier_toml: &str, extra: &str) -> String {
    format!("admin_token = \"{ADMIN_TOKEN}\"\n{extra}\n[tiers.t]\n{tier_toml}\n")
}

pub async fn check(
    http: &reqwest::Client,
    base: &str,
    client: &str,
    cost: u64,
) -> serde_json::Value {
    let r = http
        .post(format!("{base}/v1/check"))
        .json(&serde_json::json!({"client": client, "tier": "t", "route": "r", "cost": cost}))
        .send()
        .await
        .expect("check request");
    assert_eq!(r.status(), 200, "check answered {}", r.status());
    r.json().await.expect("check JSON")
}
pub mod rls;
