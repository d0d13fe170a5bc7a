//! The native delivery: api-guard as an Envoy dynamic module (`libapi_guard.so`, SPEC
//! section 7). Translation only, as `filter` is for proxy-wasm: every decision and all
//! sequencing live in [`crate::driver`]; this glue implements [`crate::host`] over the
//! dynamic-module ABI and maps the driver's [`crate::driver::Action`] to hook statuses.
//!
//! - `abi`: the `extern "C"` binding (ABI "v0.2.0", Envoy 1.40), callbacks resolved once;
//! - `hooks`: the `envoy_dynamic_module_on_*` functions Envoy looks up, each behind `guard`;
//! - `config`: one Envoy filter config: the JSON, counters (defined on the main thread), a
//!   [`crate::driver::Worker`] per worker thread, background JWKS refreshes;
//! - `stream`: one request: the [`crate::driver::Driver`] and the host calls it makes;
//! - `guard`: `catch_unwind` at every hook; a panic answers 500 `internal_error`;
//! - `logger`: the `log` crate and [`crate::host::Platform::log`] into Envoy's log.
//!
//! State the wasm filter keeps in shared data lives in [`crate::store::ProcessStore`]:
//! one per process, every worker thread sees it.

mod abi;
mod config;
mod guard;
mod hooks;
mod logger;
mod stream;
