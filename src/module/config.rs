//! One Envoy filter config (`on_http_filter_config_new`): validated on the main thread, where
//! its counters are defined (the ABI defines metrics only there), then one
//! [`Worker`] per worker thread, built on first use from the same JSON (as the wasm filter
//! builds one per VM). Background JWKS refreshes and lease jobs run on the main thread, woken by a timer
//! thread through Envoy's config scheduler.

use super::abi::{self, ConfigSchedulerPtr, FilterConfigEnvoyPtr, ModuleBuffer};
use super::logger;
use crate::driver::Worker;
use crate::host::{CalloutError, CalloutToken, CounterId, LogLevel, Platform};
use crate::store::{ProcessStore, SharedStore};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment lookups for `{"env": NAME}` secrets: Envoy's own process environment.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Unix milliseconds (the module runs in Envoy's process: the system clock is Envoy's).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the module keeps per Envoy filter config. Shared by every worker thread through
/// Envoy's pointer: only immutable data is read off the main thread.
pub struct FilterConfig {
    /// Unique per config in this process: keys the per-thread workers.
    id: u64,
    json: Vec<u8>,
    envoy: FilterConfigEnvoyPtr,
    /// Counter name -> Envoy's id, defined in `config_new` (main thread).
    counters: HashMap<String, usize>,
    /// The worker of the main thread (background JWKS refreshes). Only the main thread
    /// touches it: `config_new`, `config_scheduled`, `config_http_callout_done`, destroy.
    main: MainThreadOnly<Worker>,
    ticker: Option<Arc<Mutex<Option<SchedulerHandle>>>>,
    /// Debug builds only: a request to this path panics inside the driver, and so does a
    /// response carrying `x-api-guard-debug-panic` (the panic-guard tests). Compiled out of
    /// release builds, so nothing can turn it on there.
    #[cfg(debug_assertions)]
    pub panic_probe: Option<String>,
}

/// A value only the main thread uses, inside a struct worker threads read.
struct MainThreadOnly<T>(T);

/// The config scheduler, used from the timer thread under a mutex (`None` once the config
/// is gone, so the timer never commits to a deleted scheduler).
struct SchedulerHandle(ConfigSchedulerPtr);
// SAFETY: abi.h: the scheduler's commit may be called from any thread; delete happens under
// the same mutex.
unsafe impl Send for SchedulerHandle {}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl FilterConfig {
    /// Validates the JSON and defines the counters; `None` (already logged): Envoy must
    /// reject the config.
    pub fn new(envoy: FilterConfigEnvoyPtr, json: &[u8]) -> Option<FilterConfig> {
        let mut platform = MainPlatform {
            envoy,
            counters: HashMap::new(),
        };
        let worker = Worker::configure(json, &env_var, &mut platform).ok()?;
        let api = abi::api()?;
        // SAFETY: plain call on the main thread (abi.h: `is_validation_mode`).
        let validating = unsafe { (api.is_validation_mode)() };
        let ticker = worker
            .tick_ms()
            .filter(|_| !validating)
            .map(|ms| start_ticker(envoy, ms));
        Some(FilterConfig {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            json: json.to_vec(),
            envoy,
            counters: platform.counters,
            main: MainThreadOnly(worker),
            ticker,
            #[cfg(debug_assertions)]
            panic_probe: std::env::var("API_GUARD_DEBUG_PANIC_PATH").ok(),
        })
    }

    /// The counter id Envoy gave `name` in `config_new`.
    pub fn counter(&self, name: &str) -> Option<CounterId> {
        self.counters.get(name).map(|&id| CounterId(id as u32))
    }

    /// This thread's worker for this config, built on first use. `None`: the config does not
    /// validate on this thread (it did on the main thread, so this is not expected).
    pub fn worker(&self) -> Option<Rc<Worker>> {
        WORKERS.with(|w| {
            let mut workers = w.borrow_mut();
            if let Some((_, worker)) = workers.iter().find(|(id, _)| *id == self.id) {
                return Some(worker.clone());
            }
            // A new config on this thread: drop workers of configs Envoy has destroyed.
            workers.retain(|(id, _)| LIVE.lock().is_ok_and(|l| l.contains(id)));
            let mut platform = WorkerPlatform { cfg: self };
            let worker = Rc::new(Worker::configure(&self.json, &env_var, &mut platform).ok()?);
            workers.push((self.id, worker.clone()));
            Some(worker)
        })
    }

    /// Main thread, from the scheduler: starts the JWKS refreshes that are due.
    pub fn on_tick(&self) {
        let mut platform = MainPlatform {
            envoy: self.envoy,
            counters: HashMap::new(),
        };
        self.main.0.tick(&mut platform);
    }

    /// Main thread: the answer to a background refresh.
    pub fn on_callout_done(
        &self,
        token: CalloutToken,
        response: Option<&dyn crate::host::CalloutResponse>,
    ) {
        let mut platform = MainPlatform {
            envoy: self.envoy,
            counters: HashMap::new(),
        };
        self.main.0.on_callout_done(&mut platform, token, response);
    }

    /// Marks the config live (after Envoy got the pointer) so workers are kept for it.
    pub fn register(&self) {
        if let Ok(mut l) = LIVE.lock() {
            l.push(self.id);
        }
    }
}

impl Drop for FilterConfig {
    fn drop(&mut self) {
        if let Ok(mut l) = LIVE.lock() {
            l.retain(|id| *id != self.id);
        }
        if let (Some(t), Some(api)) = (&self.ticker, abi::api()) {
            if let Some(s) = t.lock().unwrap_or_else(|e| e.into_inner()).take() {
                // SAFETY: created by `config_scheduler_new` for this config, deleted once.
                unsafe { (api.config_scheduler_delete)(s.0) };
            }
        }
    }
}

/// Configs Envoy has not destroyed yet (a handful; read when a thread builds a worker).
static LIVE: Mutex<Vec<u64>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's workers, one per live config it has served.
    static WORKERS: RefCell<Vec<(u64, Rc<Worker>)>> = const { RefCell::new(Vec::new()) };
}

/// A thread that asks the main thread every `period_ms` (`Worker::tick_ms`) to run
/// `Worker::tick`: due JWKS refreshes, queued lease jobs
/// (the wasm filter's root-context tick). It ends when the config is destroyed.
fn start_ticker(
    envoy: FilterConfigEnvoyPtr,
    period_ms: u64,
) -> Arc<Mutex<Option<SchedulerHandle>>> {
    let api = abi::api().expect("callbacks resolved at program init");
    // SAFETY: main thread, inside `config_new` (abi.h: `config_scheduler_new`).
    let handle = SchedulerHandle(unsafe { (api.config_scheduler_new)(envoy) });
    let shared = Arc::new(Mutex::new(Some(handle)));
    let timer = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name("api-guard-tick".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(period_ms));
            let guard = timer.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                // SAFETY: the scheduler is alive while it is in the mutex (see Drop).
                Some(s) => unsafe { (api.config_scheduler_commit)(s.0, 0) },
                None => return,
            }
        });
    if let Err(e) = spawned {
        logger::write(
            LogLevel::Error,
            format_args!("api-guard: cannot start the JWKS refresh timer: {e}"),
        );
    }
    shared
}

/// Platform services on the main thread, on behalf of a config.
struct MainPlatform {
    envoy: FilterConfigEnvoyPtr,
    /// Counters defined through this platform (only during `config_new`).
    counters: HashMap<String, usize>,
}

impl Platform for MainPlatform {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn store(&self) -> &dyn SharedStore {
        ProcessStore::global()
    }

    fn log(&self, level: LogLevel, msg: fmt::Arguments<'_>) {
        logger::write(level, msg);
    }

    fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        if let Some(&id) = self.counters.get(name) {
            return Some(CounterId(id as u32));
        }
        let api = abi::api()?;
        let mut id = 0usize;
        // SAFETY: main thread in `config_new`; `name` outlives the call; no labels.
        let r = unsafe {
            (api.define_counter)(
                self.envoy,
                ModuleBuffer::str(name),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        if r != abi::METRICS_SUCCESS {
            return None;
        }
        self.counters.insert(name.to_string(), id);
        Some(CounterId(id as u32))
    }

    fn increment_counter(&self, id: CounterId, n: u64) {
        if let Some(api) = abi::api() {
            // SAFETY: an id this config defined; no labels.
            unsafe {
                (api.config_increment_counter)(
                    self.envoy,
                    id.0 as usize,
                    std::ptr::null_mut(),
                    0,
                    n,
                )
            };
        }
    }

    fn dispatch_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<CalloutToken, CalloutError> {
        let api = abi::api().ok_or_else(|| CalloutError("not inside Envoy".into()))?;
        let mut hs = super::stream::module_headers(headers);
        let mut id = 0u64;
        // SAFETY: main thread; every buffer outlives the call (Envoy copies them).
        let r = unsafe {
            (api.config_http_callout)(
                self.envoy,
                &mut id,
                ModuleBuffer::str(cluster),
                hs.as_mut_ptr(),
                hs.len(),
                body.map_or(ModuleBuffer::NULL, ModuleBuffer::of),
                timeout_ms,
            )
        };
        if r == abi::CALLOUT_INIT_SUCCESS {
            Ok(CalloutToken(id))
        } else {
            Err(CalloutError(abi::callout_init_error(r).into()))
        }
    }
}

/// Platform services while a worker thread builds its [`Worker`]: counters are looked up
/// (they were defined on the main thread); nothing is dispatched.
struct WorkerPlatform<'a> {
    cfg: &'a FilterConfig,
}

impl Platform for WorkerPlatform<'_> {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn store(&self) -> &dyn SharedStore {
        ProcessStore::global()
    }

    fn log(&self, level: LogLevel, msg: fmt::Arguments<'_>) {
        // The main thread already said it (warnings, prepared tables) for this config.
        if level >= LogLevel::Error {
            logger::write(level, msg);
        }
    }

    fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        self.cfg.counter(name)
    }

    fn increment_counter(&self, _: CounterId, _: u64) {}

    fn dispatch_callout(
        &mut self,
        _: &str,
        _: &[(&str, &str)],
        _: Option<&[u8]>,
        _: u64,
    ) -> Result<CalloutToken, CalloutError> {
        Err(CalloutError("no callouts while configuring".into()))
    }
}
