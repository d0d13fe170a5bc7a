//! A panic never reaches Envoy. In-process there is no sandbox: an unwind across the C ABI
//! is undefined behaviour and an abort takes the proxy down. Every hook runs its work through
//! [`drive`] (or `catch_unwind` directly); a panic poisons the stream (its driver is dropped,
//! later hooks leave it alone), is logged and counted (`api_guard.denied.internal_error`),
//! and then:
//! - on the request path (headers, body, trailers, callout answers): the request is answered
//!   500 `internal_error` in the SPEC's JSON shape, unless a reply already went out;
//! - on the response path: the stream is reset (the response may be on its way already);
//! - in cleanup hooks: nothing more.
//!
//! The next request gets a fresh driver: nothing of the poisoned one is reused.

use super::abi::{self, Callbacks, FilterEnvoyPtr, ModuleBuffer};
use super::stream::{Stream, StreamHost};
use crate::driver::Driver;
use crate::headers::{self, DenyLog};
use crate::host::{CalloutResponse, Host, LogLevel, Platform};
use crate::reply::{ErrorCode, LocalReply};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Where in the stream a hook is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Request,
    Response,
    Cleanup,
}

/// Runs `f` on the stream's driver with a host for this hook. `skip` is returned without
/// running anything when the stream is poisoned or another hook of it is running (a nested
/// call); `on_panic` after a panic was handled.
pub fn drive<R>(
    stream: &Stream,
    envoy: FilterEnvoyPtr,
    phase: Phase,
    in_body_hook: bool,
    skip: R,
    on_panic: R,
    f: impl FnOnce(&mut Driver, &mut StreamHost<'_>) -> R,
) -> R {
    let Some(api) = abi::api() else {
        return skip;
    };
    if stream.busy.get() {
        return skip;
    }
    stream.busy.set(true);
    let cfg = stream.config();
    let out = catch_unwind(AssertUnwindSafe(|| {
        let mut slot = stream.driver.borrow_mut();
        // `None`: poisoned by an earlier panic.
        let driver = slot.as_mut()?;
        let defer = Some(&stream.pending);
        let mut host = Stream::host(cfg, api, envoy, in_body_hook, &stream.replied, defer);
        let r = f(driver, &mut host);
        // Callout answers that arrived inside this hook (a dispatch that failed at once).
        loop {
            let next = {
                let mut d = stream.deferred.borrow_mut();
                (!d.is_empty()).then(|| d.remove(0))
            };
            let Some((token, response)) = next else {
                break;
            };
            let mut host = Stream::host(cfg, api, envoy, false, &stream.replied, defer);
            driver.on_callout_done(
                &mut host,
                token,
                response.as_ref().map(|r| r as &dyn CalloutResponse),
            );
        }
        Some(r)
    }));
    stream.busy.set(false);
    match out {
        Ok(Some(r)) => {
            stream.run_pending(api, envoy);
            r
        }
        Ok(None) => {
            // Poisoned, or never had a driver: a request that reaches us like this must
            // not go upstream unchecked.
            if phase == Phase::Request && !stream.replied.get() {
                reply_internal_error(stream, api, envoy, "no request state");
                return on_panic;
            }
            skip
        }
        Err(payload) => {
            // What the broken driver asked for is dropped with it.
            stream.pending.borrow_mut().clear();
            handle_panic(stream, api, envoy, phase, payload.as_ref());
            on_panic
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// After a panic in a hook of `stream`: poison, log, count, answer or reset.
pub fn handle_panic(
    stream: &Stream,
    api: &'static Callbacks,
    envoy: FilterEnvoyPtr,
    phase: Phase,
    payload: &(dyn Any + Send),
) {
    if let Ok(mut d) = stream.driver.try_borrow_mut() {
        *d = None;
    }
    super::logger::write(
        LogLevel::Error,
        format_args!(
            "api-guard: panic in a {phase:?} hook, the request is dropped: {}",
            panic_message(payload)
        ),
    );
    match phase {
        Phase::Request if !stream.replied.get() => {
            reply_internal_error(stream, api, envoy, "panic");
        }
        Phase::Request | Phase::Cleanup => count(stream, api, envoy),
        Phase::Response => {
            count(stream, api, envoy);
            // SAFETY: `envoy` is this stream's filter, alive during the hook.
            unsafe {
                (api.reset_stream)(
                    envoy,
                    abi::STREAM_RESET_LOCAL,
                    ModuleBuffer::str("api_guard_internal_error"),
                )
            };
        }
    }
}

fn count(stream: &Stream, api: &'static Callbacks, envoy: FilterEnvoyPtr) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let host = Stream::host(stream.config(), api, envoy, false, &stream.replied, None);
        stream
            .worker
            .metrics
            .denied(&host, ErrorCode::InternalError);
    }));
}

/// Answers 500 `internal_error` (SPEC JSON body, the usual local-reply headers), logs the
/// deny line and counts it. Falls back to a bare JSON reply if building the usual one fails.
fn reply_internal_error(
    stream: &Stream,
    api: &'static Callbacks,
    envoy: FilterEnvoyPtr,
    why: &str,
) {
    let reply = LocalReply::new(
        ErrorCode::InternalError,
        "the filter failed on this request",
    )
    .with_policy(why);
    let full = catch_unwind(AssertUnwindSafe(|| {
        let mut host = Stream::host(stream.config(), api, envoy, false, &stream.replied, None);
        stream
            .worker
            .metrics
            .denied(&host, ErrorCode::InternalError);
        let (method, path) = host.method_and_path();
        host.log(
            LogLevel::Info,
            format_args!(
                "{}",
                DenyLog {
                    reply: &reply,
                    route: "",
                    client: None,
                    ip: None,
                    request_id: None,
                    method: &method,
                    path: &path,
                }
                .line()
            ),
        );
        let hs = headers::local_reply_headers(&stream.worker.config, &reply, &[], &[]);
        let refs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        host.send_response(reply.status, &refs, Some(&reply.body()));
    }));
    if full.is_err() && !stream.replied.get() {
        let mut host = Stream::host(stream.config(), api, envoy, false, &stream.replied, None);
        host.send_response(
            500,
            &[
                ("content-type", "application/json"),
                ("cache-control", "no-store"),
            ],
            Some(br#"{"error":"internal_error","message":"the filter failed on this request"}"#),
        );
    }
}
