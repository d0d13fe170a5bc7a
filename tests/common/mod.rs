//! End-to-end harness: the real pinned Envoy loading the real filter, an echo upstream, and a
//! raw HTTP/1.1 client (raw, so tests can send what real clients would not: unnormalized
//! paths, repeated headers, chunked bodies).
//!
//! The filter comes in two deliveries and every test runs against both: the proxy-wasm
//! filter (`api_guard.wasm`) and the native dynamic module (`libapi_guard.so`).
//! `API_GUARD_DELIVERY` picks: `wasm`, `native`, or `both` (the default). A test binary
//! serves one delivery per process: with `both` it serves the wasm one and, the first time a
//! test starts an Envoy, runs itself again (same arguments, same filter) for the native one
//! and waits for it; that test fails with the native run's output if it failed. Tests that
//! start an Envoy in the meantime wait too, so the two runs never compete for CPU.
//!
//! Every Envoy gets a fresh config in its own temp dir, binds port 0 for its listener and
//! admin (no port races), is waited for with a deadline, and is killed on drop, even when a
//! test fails.
#![allow(dead_code)]

use api_guard::echo::{EchoServer, Received};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

pub const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// The Envoy binary: `$ENVOY_BIN`, else the one `make test` installs into `.tools/`.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let p = repo().join(".tools/envoy/envoy/_bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found at {}: run `make test` (it installs the pinned Envoy) or set ENVOY_BIN",
        p.display()
    );
    p
}

/// How the filter is loaded into Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// `envoy.filters.http.wasm` with `api_guard.wasm` (V8).
    Wasm,
    /// `envoy.filters.http.dynamic_modules` with `libapi_guard.so` (in-process).
    Native,
}

/// What `API_GUARD_DELIVERY` asks for: `wasm`, `native` or `both` (unset: `both`).
fn requested_delivery() -> String {
    std::env::var("API_GUARD_DELIVERY").unwrap_or_else(|_| "both".into())
}

/// The delivery this test process serves (with `both`, the wasm one; its twin process
/// serves the native one).
pub fn delivery() -> Delivery {
    match requested_delivery().as_str() {
        "native" => Delivery::Native,
        "wasm" | "both" => Delivery::Wasm,
        other => panic!("API_GUARD_DELIVERY={other}: expected wasm, native or both"),
    }
}

/// Whether the native delivery is among those asked for (`native` or `both`).
pub fn native_requested() -> bool {
    requested_delivery() != "wasm"
}

static NATIVE_TWIN: OnceLock<Result<String, String>> = OnceLock::new();

/// With `both`: runs this test binary again for the native delivery, once, and waits for
/// it. The test that ran it fails if the native run failed.
fn run_native_twin() {
    if requested_delivery() != "both" {
        return;
    }
    let mut ran = false;
    let result = NATIVE_TWIN.get_or_init(|| {
        ran = true;
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("API_GUARD_DELIVERY", "native")
            .stdin(Stdio::null())
            .output()
            .expect("run the test binary again for the native delivery");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let summary: String = stdout
            .lines()
            .filter(|l| l.starts_with("test result:"))
            .collect::<Vec<_>>()
            .join("\n");
        if out.status.success() {
            Ok(summary)
        } else {
            Err(format!(
                "{stdout}\n{}",
                tail(&String::from_utf8_lossy(&out.stderr), 80)
            ))
        }
    });
    if ran {
        match result {
            // Not through eprintln!: the test harness would capture it.
            Ok(summary) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "native delivery (API_GUARD_DELIVERY=native run of this binary): {summary}"
                );
            }
            Err(out) => panic!("the native delivery run of this test binary failed:\n{out}"),
        }
    }
}

/// Whether the harness may reuse artifacts `make` built instead of building them.
fn skip_builds() -> bool {
    std::env::var_os("API_GUARD_SKIP_WASM_BUILD").is_some()
}

static BUILD: Once = Once::new();

/// The release `.wasm`, built once per test binary if `make` has not built it already.
pub fn wasm_path() -> PathBuf {
    let wasm = target_dir().join("wasm32-wasip1/release/api_guard.wasm");
    BUILD.call_once(|| {
        if skip_builds() && wasm.exists() {
            return;
        }
        // As the Makefile: the wasm aborts on panic (the VM is the sandbox), the native
        // module unwinds (it catches panics at every hook).
        build_wasm(false);
    });
    assert!(wasm.exists(), "missing {}", wasm.display());
    wasm
}

/// Builds the release `.wasm` as the Makefile does: `api_guard.wasm`, or with the
/// `json-schema` feature (whose output cargo writes to the same file).
fn build_wasm(full: bool) {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip1",
        "--lib",
        "--quiet",
        "--config",
        "profile.release.panic=\"abort\"",
    ]);
    if full {
        cmd.args(["--features", "json-schema"]);
    }
    let status = cmd
        .current_dir(repo())
        .status()
        .expect("run cargo to build the wasm filter");
    assert!(
        status.success(),
        "building the wasm filter (full: {full}) failed"
    );
}

static FULL_BUILD: Once = Once::new();

/// `api_guard_full.wasm`: the filter with the JSON Schema validator (`json_schema` routes),
/// which `make wasm` builds next to `api_guard.wasm`. Built once per test binary if absent.
pub fn full_wasm_path() -> PathBuf {
    let dir = target_dir().join("wasm32-wasip1/release");
    let full = dir.join("api_guard_full.wasm");
    FULL_BUILD.call_once(|| {
        if skip_builds() && full.exists() {
            return;
        }
        build_wasm(true);
        std::fs::copy(dir.join("api_guard.wasm"), &full).expect("copy api_guard_full.wasm");
        // Put the base filter back where cargo wrote the full one (recompiles only the
        // api-guard crate: its dependencies are cached per feature set).
        build_wasm(false);
    });
    assert!(full.exists(), "missing {}", full.display());
    full
}

static MODULE_BUILD: Once = Once::new();

/// The release `libapi_guard.so`, built once per test binary if `make` has not built it.
pub fn module_path() -> PathBuf {
    let so = target_dir().join("release/libapi_guard.so");
    MODULE_BUILD.call_once(|| {
        if skip_builds() && so.exists() {
            return;
        }
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--lib", "--quiet"])
            .current_dir(repo())
            .status()
            .expect("run cargo to build the dynamic module");
        assert!(status.success(), "building libapi_guard.so failed");
    });
    assert!(so.exists(), "missing {}", so.display());
    so
}

/// The debug `libapi_guard.so` that `cargo test` built with this test binary (the newest of
/// cargo's two copies): the only build that honours the panic probe
/// (`API_GUARD_DEBUG_PANIC_PATH`, compiled in only with debug assertions). Release builds
/// cannot be made to panic on purpose.
pub fn debug_module_path() -> PathBuf {
    let candidates = [
        target_dir().join("debug/deps/libapi_guard.so"),
        target_dir().join("debug/libapi_guard.so"),
    ];
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .expect("no debug libapi_guard.so: `cargo test` builds it with the library")
}

/// The name a filter stat has under `delivery`. Tests name stats as the wasm filter shows
/// them (`wasmcustom.api_guard.allowed`); Envoy puts a dynamic module's stats under the
/// module's metrics namespace instead (`dynamicmodulescustom.api_guard.allowed`).
pub fn stat_name(delivery: Delivery, name: &str) -> String {
    match (delivery, name.strip_prefix("wasmcustom.")) {
        (Delivery::Native, Some(rest)) => format!("dynamicmodulescustom.{rest}"),
        _ => name.to_string(),
    }
}

/// The native CLI built by cargo for these tests.
pub fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_api-guard"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh temp directory for one test's files.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "api-guard-e2e-{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst),
        tag
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// How to start an Envoy: the filter config plus the knobs tests need.
pub struct EnvoyBuilder {
    filter_config: String,
    concurrency: u32,
    env: Vec<(String, String)>,
    clusters: Vec<Value>,
    routes: Option<Vec<Value>>,
    upstream: Option<EchoServer>,
    use_remote_address: bool,
    xff_num_trusted_hops: u32,
    exact_balance: bool,
    extra_http_filters_before: Vec<Value>,
    delivery: Delivery,
    /// The test chose the delivery itself: no native twin run is needed for it.
    delivery_chosen: bool,
    module: Option<PathBuf>,
    allow_on_headers_stop_iteration: bool,
    /// The wasm delivery loads `api_guard_full.wasm` (the JSON Schema validator).
    full_wasm: bool,
}

impl EnvoyBuilder {
    /// Load the filter this way (default: [`delivery()`]).
    pub fn delivery(mut self, d: Delivery) -> Self {
        self.delivery = d;
        self.delivery_chosen = true;
        self
    }

    /// The native delivery with this `libapi_guard.so` (e.g. [`debug_module_path`]).
    pub fn module(mut self, so: PathBuf) -> Self {
        self.delivery = Delivery::Native;
        self.delivery_chosen = true;
        self.module = Some(so);
        self
    }

    /// Worker threads (default 2: every feature must hold across workers).
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// An environment variable visible to the filter (`{"env": NAME}` secrets): the wasm
    /// VM's environment, or Envoy's process environment for the native module.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// An extra static cluster (e.g. a JWKS server or the quota service) on 127.0.0.1:port.
    pub fn cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push(cluster_json(name, port));
        self
    }

    /// An extra cluster given as raw Envoy JSON.
    pub fn cluster_json(mut self, c: Value) -> Self {
        self.clusters.push(c);
        self
    }

    /// Replace the route list (Envoy routes JSON); default: one route `default-route`, prefix /.
    pub fn routes(mut self, routes: Vec<Value>) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Reuse an upstream (e.g. two Envoys in front of one echo server).
    pub fn upstream(mut self, up: EchoServer) -> Self {
        self.upstream = Some(up);
        self
    }

    pub fn use_remote_address(mut self, on: bool) -> Self {
        self.use_remote_address = on;
        self
    }

    /// The connection manager's `xff_num_trusted_hops` (Envoy resolves the client itself).
    pub fn xff_num_trusted_hops(mut self, n: u32) -> Self {
        self.xff_num_trusted_hops = n;
        self
    }

    /// Spread connections evenly over the workers (`exact_balance`): with N held [`Conn`]s
    /// and N workers, each worker serves exactly one, so a test drives each worker
    /// explicitly instead of hoping for the kernel's choice.
    pub fn exact_balance(mut self) -> Self {
        self.exact_balance = true;
        self
    }

    /// The wasm delivery loads `api_guard_full.wasm` (with the JSON Schema validator, for
    /// `json_schema` routes) instead of `api_guard.wasm`; no effect on the native one.
    pub fn full_wasm(mut self) -> Self {
        self.full_wasm = true;
        self
    }

    /// The Wasm plugin's `allow_on_headers_stop_iteration` (default here: true, as our docs
    /// require; Envoy's own default is false).
    pub fn allow_on_headers_stop_iteration(mut self, on: bool) -> Self {
        self.allow_on_headers_stop_iteration = on;
        self
    }

    /// Start Envoy; panics with Envoy's log if it does not become ready.
    pub fn start(self) -> Envoy {
        match self.try_start() {
            Ok(e) => e,
            Err(log) => panic!("Envoy did not start:\n{log}"),
        }
    }

    /// Start Envoy; `Err(log)` when it exits or does not become ready by the deadline.
    pub fn try_start(self) -> Result<Envoy, String> {
        if !self.delivery_chosen {
            run_native_twin();
        }
        let upstream = match self.upstream.clone() {
            Some(u) => u,
            None => EchoServer::start("127.0.0.1:0").expect("start echo upstream"),
        };
        let dir = temp_dir("envoy");
        let routes = self.routes.clone().unwrap_or_else(|| {
            vec![json!({
                "name": "default-route",
                "match": {"prefix": "/"},
                "route": {"cluster": "upstream", "timeout": "15s"}
            })]
        });
        let mut clusters = vec![cluster_json("upstream", upstream.port)];
        clusters.extend(self.clusters.iter().cloned());
        let env: serde_json::Map<String, Value> = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        let mut filters = self.extra_http_filters_before.clone();
        let mut process_env: Vec<(String, String)> = Vec::new();
        filters.push(match self.delivery {
            Delivery::Wasm => json!({
                "name": "envoy.filters.http.wasm",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": {
                        "name": "api_guard",
                        "root_id": "api_guard",
                        // Pause from request headers = StopIteration, so body callbacks still
                        // run (webhook signatures need the body before anything goes upstream).
                        "allow_on_headers_stop_iteration": self.allow_on_headers_stop_iteration,
                        "configuration": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": self.filter_config,
                        },
                        "vm_config": {
                            "vm_id": "api_guard",
                            "runtime": "envoy.wasm.runtime.v8",
                            "code": {"local": {"filename": if self.full_wasm {
                                full_wasm_path()
                            } else {
                                wasm_path()
                            }}},
                            "environment_variables": {"key_values": env},
                        }
                    }
                }
            }),
            Delivery::Native => {
                let so = self.module.clone().unwrap_or_else(module_path);
                let dir = so.parent().expect("the module's folder").to_path_buf();
                process_env.push((
                    "ENVOY_DYNAMIC_MODULES_SEARCH_PATH".into(),
                    dir.display().to_string(),
                ));
                process_env.extend(self.env.iter().cloned());
                json!({
                    "name": "envoy.filters.http.dynamic_modules",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                        "dynamic_module_config": {"name": "api_guard", "do_not_close": true},
                        "filter_name": "api_guard",
                        "filter_config": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": self.filter_config,
                        }
                    }
                })
            }
        });
        filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
        }));
        let mut bootstrap = json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    // As in envoy/demo.yaml: above the default webhook max_body_bytes.
                    "per_connection_buffer_limit_bytes": 2097152,
                    "connection_balance_config": if self.exact_balance {
                        json!({"exact_balance": {}})
                    } else {
                        Value::Null
                    },
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "ingress",
                            "use_remote_address": self.use_remote_address,
                            "xff_num_trusted_hops": self.xff_num_trusted_hops,
                            "route_config": {
                                "name": "local",
                                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
                            },
                            "http_filters": filters,
                        }
                    }]}]
                }],
                "clusters": clusters,
            }
        });
        if self.delivery == Delivery::Native {
            // As envoy/demo-native.yaml: Prometheus names without the module's metrics
            // namespace, the same as the wasm filter's (`api_guard_allowed`).
            bootstrap["layered_runtime"] = json!({"layers": [{"name": "static", "static_layer": {
                "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix": true
            }}]});
        }
        let cfg_path = dir.join("envoy.json");
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&bootstrap).unwrap()).unwrap();
        let admin_path = dir.join("admin.txt");
        let log_path = dir.join("envoy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg_path)
            .args(["--concurrency", &self.concurrency.to_string()])
            .arg("--disable-hot-restart")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["-l", "info"])
            .envs(process_env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", envoy_bin().display()))?;
        let mut envoy = Envoy {
            child,
            port: 0,
            admin_port: 0,
            dir,
            log_path,
            upstream,
            delivery: self.delivery,
        };
        envoy.wait_ready()?;
        Ok(envoy)
    }
}

pub fn cluster_json(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]
        }
    })
}

/// A running Envoy; killed (and its temp dir removed) on drop.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    log_path: PathBuf,
    pub upstream: EchoServer,
    pub delivery: Delivery,
}

impl Envoy {
    pub fn builder(filter_config: &str) -> EnvoyBuilder {
        EnvoyBuilder {
            filter_config: filter_config.to_string(),
            concurrency: 2,
            env: Vec::new(),
            clusters: Vec::new(),
            routes: None,
            upstream: None,
            use_remote_address: true,
            xff_num_trusted_hops: 0,
            exact_balance: false,
            extra_http_filters_before: Vec::new(),
            delivery: delivery(),
            delivery_chosen: false,
            module: None,
            allow_on_headers_stop_iteration: true,
            full_wasm: false,
        }
    }

    /// Envoy with 2 workers and the given filter config.
    pub fn start(filter_config: &str) -> Envoy {
        Self::builder(filter_config).start()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("Envoy exited with {status}\n{}", self.logs()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Envoy not ready after {STARTUP_DEADLINE:?}\n{}",
                    self.logs()
                ));
            }
            if self.admin_port == 0 {
                if let Ok(s) = std::fs::read_to_string(self.dir.join("admin.txt")) {
                    if let Some(p) = s.trim().rsplit(':').next().and_then(|p| p.parse().ok()) {
                        self.admin_port = p;
                    }
                }
            }
            if self.admin_port != 0 && self.port == 0 {
                let ready = http(self.admin_port, "GET", "/ready").send_opt();
                if matches!(ready, Some(ref r) if r.status == 200) {
                    if let Some(r) =
                        http(self.admin_port, "GET", "/listeners?format=json").send_opt()
                    {
                        let v = r.json();
                        let port = v["listener_statuses"][0]["local_address"]["socket_address"]
                            ["port_value"]
                            .as_u64()
                            .unwrap_or(0);
                        if port != 0 {
                            self.port = port as u16;
                            return Ok(());
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A request to the Envoy listener.
    pub fn req(&self, method: &str, path: &str) -> Req {
        http(self.port, method, path)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path).send()
    }

    /// Everything Envoy logged so far (the filter's JSON deny lines included).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The filter's structured events named `event` (`api_guard.<event>` JSON lines) in
    /// Envoy's log, in order.
    #[allow(dead_code)] // not every test file reads events
    pub fn events(&self, event: &str) -> Vec<Value> {
        let needle = format!("{{\"event\":\"api_guard.{event}\"");
        self.logs()
            .lines()
            .filter_map(|l| l.find(&needle).map(|i| &l[i..]))
            .map(|j| serde_json::from_str(j.trim()).unwrap_or_else(|e| panic!("{e}: {j}")))
            .collect()
    }

    /// The admin `/stats` text.
    pub fn stats(&self) -> String {
        String::from_utf8_lossy(&http(self.admin_port, "GET", "/stats").send().body).into_owned()
    }

    /// The admin `/stats/prometheus` text.
    pub fn prometheus(&self) -> String {
        String::from_utf8_lossy(
            &http(self.admin_port, "GET", "/stats/prometheus")
                .send()
                .body,
        )
        .into_owned()
    }

    /// Open connections per worker on the ingress listener (`listener.*.worker_N.
    /// downstream_cx_active`), in worker order.
    pub fn active_connections_per_worker(&self) -> Vec<u64> {
        let mut per: Vec<(u32, u64)> = self
            .stats()
            .lines()
            .filter(|l| l.starts_with("listener.") && !l.starts_with("listener.admin."))
            .filter_map(|l| {
                let (name, v) = l.split_once(": ")?;
                let rest = name.strip_suffix(".downstream_cx_active")?;
                let w = rest.rsplit_once(".worker_")?.1.parse().ok()?;
                Some((w, v.trim().parse().ok()?))
            })
            .collect();
        per.sort();
        per.into_iter().map(|(_, v)| v).collect()
    }

    /// One counter from `/stats`, named as the wasm filter shows it (e.g.
    /// `wasmcustom.api_guard.allowed`; see [`stat_name`] for the module), 0 when absent.
    pub fn stat(&self, name: &str) -> u64 {
        let prefix = format!("{}: ", stat_name(self.delivery, name));
        self.stats()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// What the upstream has received so far.
    pub fn received(&self) -> Vec<Received> {
        self.upstream.received()
    }

    /// Resident memory of the Envoy process, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- Envoy log ({}) ---\n{}",
                self.log_path.display(),
                tail(&self.logs(), 60)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A raw HTTP/1.1 request under construction.
pub struct Req {
    port: u16,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    chunks: Option<Vec<Vec<u8>>>,
    timeout: Duration,
}

pub fn http(port: u16, method: &str, path: &str) -> Req {
    Req {
        port,
        method: method.into(),
        path: path.into(),
        headers: Vec::new(),
        body: None,
        chunks: None,
        timeout: Duration::from_secs(20),
    }
}

impl Req {
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }

    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = Some(b.into());
        self
    }

    /// Send the body with `transfer-encoding: chunked`, one chunk per element.
    pub fn chunked(mut self, chunks: Vec<Vec<u8>>) -> Self {
        self.chunks = Some(chunks);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        self.bytes_with(true)
    }

    fn bytes_with(&self, close: bool) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nhost: localhost\r\n{}",
            self.method,
            self.path,
            if close { "connection: close\r\n" } else { "" }
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        let mut bytes;
        if let Some(chunks) = &self.chunks {
            out.push_str("transfer-encoding: chunked\r\n\r\n");
            bytes = out.into_bytes();
            for c in chunks {
                bytes.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                bytes.extend_from_slice(c);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        } else {
            let body = self.body.clone().unwrap_or_default();
            if self.body.is_some() || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH") {
                out.push_str(&format!("content-length: {}\r\n", body.len()));
            }
            out.push_str("\r\n");
            bytes = out.into_bytes();
            bytes.extend_from_slice(&body);
        }
        bytes
    }

    pub fn send(self) -> Resp {
        let what = format!("{} {} on port {}", self.method, self.path, self.port);
        self.send_opt()
            .unwrap_or_else(|| panic!("no HTTP response for {what}"))
    }

    pub fn send_opt(self) -> Option<Resp> {
        send_raw(self.port, &self.bytes(), self.timeout)
    }

    /// Sends on a held keep-alive connection (the request's own port is ignored).
    pub fn send_on(self, conn: &mut Conn) -> Resp {
        let bytes = self.bytes_with(false);
        conn.stream
            .get_mut()
            .write_all(&bytes)
            .expect("write on a held connection");
        read_response(&mut conn.stream).expect("a response on a held connection")
    }
}

/// A held HTTP/1.1 keep-alive connection: every request on it is served by one worker.
pub struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(port: u16) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            stream: BufReader::new(s),
        }
    }
}

/// Sends raw bytes and reads one response (the connection is closed after it).
pub fn send_raw(port: u16, bytes: &[u8], timeout: Duration) -> Option<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    // The server may answer (413, 401) before reading the whole body: ignore write errors.
    let _ = s.write_all(bytes);
    let mut r = BufReader::new(s);
    read_response(&mut r)
}

pub fn read_response(r: &mut impl BufRead) -> Option<Resp> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            break;
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                let _ = r.read_line(&mut end);
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + n, 0);
            r.read_exact(&mut resp.body[start..]).ok()?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).ok()?;
        }
    } else if let Some(n) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        resp.body.resize(n, 0);
        r.read_exact(&mut resp.body).ok()?;
    } else {
        let _ = r.read_to_end(&mut resp.body);
    }
    Some(resp)
}

/// A response as the client got it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// For a proxied request: the headers the upstream received, from the echo body.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0] == name)
            .and_then(|h| h[1].as_str().map(str::to_string))
    }

    /// Asserts this is a local reply with the SPEC's JSON body and returns the body.
    pub fn assert_error(&self, status: u16, error: &str) -> Value {
        assert_eq!(self.status, status, "status; body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert_eq!(self.header("cache-control"), Some("no-store"));
        let v = self.json();
        assert_eq!(v["error"], error, "body: {}", self.text());
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "message missing"
        );
        v
    }
}

/// Writes `contents` to a file in a fresh temp dir and returns its path.
pub fn write_temp(name: &str, contents: &str) -> PathBuf {
    let d = temp_dir("file");
    let p = d.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
