//! api-guard: API security and rate limiting inside Envoy.
//!
//! The logic lives in plain modules that take time and storage as arguments, so it runs
//! natively in unit tests and in the `api-guard` CLI; `filter` is the thin proxy-wasm glue.

pub mod abuse;
pub mod auth;
pub mod client_ip;
pub mod config;
pub mod cors;
pub mod driver;
pub mod events;
pub mod headers;
pub mod host;
pub mod hygiene;
pub mod identity;
pub mod pipeline;
pub mod quota_client;
pub mod quota_lease;
pub mod ratelimit;
pub mod reply;
pub mod routes;
pub mod store;
pub mod webhook;

#[cfg(not(target_arch = "wasm32"))]
pub mod echo;
#[cfg(not(target_arch = "wasm32"))]
pub mod envoy_check;
#[cfg(not(target_arch = "wasm32"))]
pub mod explain;
/// Fuzz target logic shared by `fuzz/` (libFuzzer) and `tests/fuzz_replay.rs`; not an API.
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;

#[cfg(target_arch = "wasm32")]
mod filter;

/// The dynamic-module glue (`libapi_guard.so`): its hooks are exported from the cdylib.
#[cfg(not(target_arch = "wasm32"))]
mod module;
