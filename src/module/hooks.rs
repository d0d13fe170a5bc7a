//! The event hooks Envoy looks up in `libapi_guard.so` (abi.h "HTTP Filter Event Hooks",
//! v0.2.0): `envoy_dynamic_module_on_program_init` and all 30
//! `envoy_dynamic_module_on_http_filter_*` the pinned Envoy resolves. Each is a few lines
//! of translation to [`crate::driver::Driver`] behind the panic guard; the ones api-guard
//! has no use for (response body and trailers, streamed callouts, scheduler events of a
//! stream, watermarks) let the stream go on untouched.
//!
//! Pointer contract (abi.h): `FilterConfigModulePtr` is a `Box<FilterConfig>` we handed out
//! in `config_new` and get back in `config_destroy`; `FilterModulePtr` is a `Box<Stream>`
//! from `filter_new`, released in `filter_destroy`. Envoy calls a stream's hooks on its
//! worker thread only.

#![allow(clippy::missing_safety_doc)]

use super::abi::{
    self, CalloutResult, EnvoyBuffer, EnvoyHttpHeader, FilterConfigEnvoyPtr, FilterConfigModulePtr,
    FilterEnvoyPtr, FilterModulePtr, PerRouteConfigModulePtr, StreamResetReason,
};
use super::config::FilterConfig;
use super::guard::{self, Phase};
use super::logger;
use super::stream::{AbiResponse, Stream};
use crate::driver::Action;
use crate::host::{CalloutResponse, CalloutToken, LogLevel};
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Our stream behind Envoy's module pointer.
///
/// # Safety
/// `p` must come from [`envoy_dynamic_module_on_http_filter_new`] and not be destroyed yet.
unsafe fn stream<'a>(p: FilterModulePtr) -> &'a Stream {
    &*(p as *const Stream)
}

/// # Safety
/// `p` must come from [`envoy_dynamic_module_on_http_filter_config_new`], not destroyed.
unsafe fn config<'a>(p: FilterConfigModulePtr) -> &'a FilterConfig {
    &*(p as *const FilterConfig)
}

/// Runs `f` and turns a panic into `fallback` (hooks that have no stream to answer).
fn quiet<R>(what: &str, fallback: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            logger::write(
                LogLevel::Error,
                format_args!("api-guard: panic in {what}, ignored"),
            );
            fallback
        }
    }
}

fn headers_status(a: Action) -> abi::HeadersStatus {
    match a {
        Action::Continue => abi::HEADERS_CONTINUE,
        Action::Pause => abi::HEADERS_STOP_ITERATION,
    }
}

fn body_status(a: Action) -> abi::BodyStatus {
    match a {
        Action::Continue => abi::BODY_CONTINUE,
        Action::Pause => abi::BODY_STOP_AND_BUFFER,
    }
}

fn trailers_status(a: Action) -> abi::TrailersStatus {
    match a {
        Action::Continue => abi::TRAILERS_CONTINUE,
        Action::Pause => abi::TRAILERS_STOP_ITERATION,
    }
}

// ----------------------------------------------------------------------------------------
// Program and config
// ----------------------------------------------------------------------------------------

/// `abi_version_module_ptr on_program_init(void)`: resolves the callbacks; null (the
/// module is unloaded) when this Envoy lacks one.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    quiet("on_program_init", std::ptr::null(), || match abi::init() {
        Ok(()) => {
            logger::install();
            abi::ABI_VERSION.as_ptr()
        }
        Err(missing) => {
            logger::write(
                LogLevel::Error,
                format_args!(
                    "api-guard: this Envoy does not export {missing}: libapi_guard.so is built \
                     for Envoy 1.40 (dynamic-module ABI v0.2.0)"
                ),
            );
            std::ptr::null()
        }
    })
}

/// `config_module_ptr on_http_filter_config_new(config_envoy_ptr, envoy_buffer name,
/// envoy_buffer config)`: null rejects the config (it is logged why).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: FilterConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> FilterConfigModulePtr {
    quiet("on_http_filter_config_new", std::ptr::null(), || {
        // SAFETY: Envoy's buffer, valid during this hook.
        let json = unsafe { config.bytes() };
        match FilterConfig::new(envoy, json) {
            Some(cfg) => {
                let cfg = Box::new(cfg);
                cfg.register();
                Box::into_raw(cfg) as FilterConfigModulePtr
            }
            None => std::ptr::null(),
        }
    })
}

/// `void on_http_filter_config_destroy(config_module_ptr)`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    p: FilterConfigModulePtr,
) {
    if p.is_null() {
        return;
    }
    quiet("on_http_filter_config_destroy", (), || {
        // SAFETY: ours from config_new, destroyed once.
        drop(unsafe { Box::from_raw(p as *mut FilterConfig) });
    });
}

/// `per_route_config_module_ptr on_http_filter_per_route_config_new(envoy_buffer name,
/// envoy_buffer config)`: api-guard has no per-route config (routes are matched in its own
/// config), so one is refused rather than silently ignored.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> PerRouteConfigModulePtr {
    logger::write(
        LogLevel::Error,
        format_args!(
            "api-guard: per-route filter config is not supported; routes are configured in \
             the filter config's `routes`"
        ),
    );
    std::ptr::null()
}

/// `void on_http_filter_per_route_config_destroy(per_route_config_module_ptr)`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    _p: PerRouteConfigModulePtr,
) {
}

/// `void on_http_filter_config_scheduled(config_envoy_ptr, config_module_ptr, uint64_t
/// event_id)`: the JWKS timer's tick, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _envoy: FilterConfigEnvoyPtr,
    p: FilterConfigModulePtr,
    _event_id: u64,
) {
    if p.is_null() {
        return;
    }
    // SAFETY: ours, alive until config_destroy (which runs on this same thread).
    let cfg = unsafe { config(p) };
    quiet("on_http_filter_config_scheduled", (), || cfg.on_tick());
}

/// `void on_http_filter_config_http_callout_done(config_envoy_ptr, config_module_ptr,
/// uint64_t callout_id, http_callout_result result, envoy_http_header* headers, size_t
/// headers_size, envoy_buffer* body_chunks, size_t body_chunks_size)`: a background JWKS
/// refresh answered.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _envoy: FilterConfigEnvoyPtr,
    p: FilterConfigModulePtr,
    callout_id: u64,
    result: CalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    if p.is_null() {
        return;
    }
    // SAFETY: ours, alive until config_destroy.
    let cfg = unsafe { config(p) };
    // SAFETY: Envoy's arrays, valid during this hook (null when empty).
    let response =
        unsafe { response(result, headers, headers_size, body_chunks, body_chunks_size) };
    quiet("on_http_filter_config_http_callout_done", (), || {
        cfg.on_callout_done(
            CalloutToken(callout_id),
            response.as_ref().map(|r| r as &dyn CalloutResponse),
        )
    });
}

/// The answer of a callout, `None` when it failed (reset, timeout, over the buffer limit).
///
/// # Safety
/// The pointers are Envoy's for the current hook, each null or valid for its size.
unsafe fn response<'a>(
    result: CalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    chunks: *mut EnvoyBuffer,
    chunks_size: usize,
) -> Option<AbiResponse<'a>> {
    if result != abi::CALLOUT_SUCCESS {
        return None;
    }
    let headers: &[EnvoyHttpHeader] = if headers.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(headers, headers_size)
    };
    let chunks: &[EnvoyBuffer] = if chunks.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(chunks, chunks_size)
    };
    Some(AbiResponse { headers, chunks })
}

// Streamed callouts started by a config: api-guard starts none.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _envoy: FilterConfigEnvoyPtr,
    _p: FilterConfigModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _envoy: FilterConfigEnvoyPtr,
    _p: FilterConfigModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _envoy: FilterConfigEnvoyPtr,
    _p: FilterConfigModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _envoy: FilterConfigEnvoyPtr,
    _p: FilterConfigModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _envoy: FilterConfigEnvoyPtr,
    _p: FilterConfigModulePtr,
    _stream_id: u64,
    _reason: StreamResetReason,
) {
}

// ----------------------------------------------------------------------------------------
// Streams
// ----------------------------------------------------------------------------------------

/// `filter_module_ptr on_http_filter_new(config_module_ptr, filter_envoy_ptr)`: null closes
/// the stream (fail closed when this thread cannot build its worker).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    p: FilterConfigModulePtr,
    _envoy: FilterEnvoyPtr,
) -> FilterModulePtr {
    if p.is_null() {
        return std::ptr::null();
    }
    // SAFETY: ours, alive while streams of it exist.
    let cfg = unsafe { config(p) };
    quiet("on_http_filter_new", std::ptr::null(), || {
        match cfg.worker() {
            Some(worker) => Box::into_raw(Box::new(Stream::new(cfg, worker))) as FilterModulePtr,
            None => {
                logger::write(
                    LogLevel::Error,
                    format_args!(
                        "api-guard: no worker for this config on this thread; stream closed"
                    ),
                );
                std::ptr::null()
            }
        }
    })
}

/// `request_headers_status on_http_filter_request_headers(filter_envoy_ptr,
/// filter_module_ptr, bool end_of_stream)`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    p: FilterModulePtr,
    end_of_stream: bool,
) -> abi::HeadersStatus {
    // SAFETY: ours until filter_destroy.
    let s = unsafe { stream(p) };
    guard::drive(
        s,
        envoy,
        Phase::Request,
        false,
        abi::HEADERS_CONTINUE,
        abi::HEADERS_STOP_ITERATION,
        |d, h| headers_status(d.on_request_headers(h, end_of_stream)),
    )
}

/// `request_body_status on_http_filter_request_body(filter_envoy_ptr, filter_module_ptr,
/// bool end_of_stream)`: the driver learns the total body Envoy holds (buffered + this
/// chunk) and reads what it has not seen.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: FilterEnvoyPtr,
    p: FilterModulePtr,
    end_of_stream: bool,
) -> abi::BodyStatus {
    // SAFETY: ours until filter_destroy.
    let s = unsafe { stream(p) };
    let skip = if s.replied.get() {
        abi::BODY_STOP_AND_BUFFER
    } else {
        abi::BODY_CONTINUE
    };
    guard::drive(
        s,
        envoy,
        Phase::Request,
        true,
        skip,
        abi::BODY_STOP_AND_BUFFER,
        |d, h| {
            let total = h.request_body_len();
            body_status(d.on_request_body(h, total, end_of_stream))
        },
    )
}

/// `request_trailers_status on_http_filter_request_trailers(filter_envoy_ptr,
/// filter_module_ptr)`: trailers end the body.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: FilterEnvoyPtr,
    p: FilterModulePtr,
) -> abi::TrailersStatus {
    // SAFETY: ours until filter_destroy.
    let s = unsafe { stream(p) };
    guard::drive(
        s,
        envoy,
        Phase::Request,
        false,
        abi::TRAILERS_CONTINUE,
        abi::TRAILERS_STOP_ITERATION,
        |d, h| trailers_status(d.on_request_trailers(h)),
    )
}

/// `response_headers_status on_http_filter_response_headers(filter_envoy_ptr,
/// filter_module_ptr, bool end_of_stream)`. Also runs, nested, for our own local replies
/// (the driver leaves those alone).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoyPtr,
    p: FilterModulePtr,
    _end_of_stream: bool,
) -> abi::HeadersStatus {
    // SAFETY: ours until filter_destroy.
    let s = unsafe { stream(p) };
    guard::drive(
        s,
        envoy,
        Phase::Response,
        false,
        abi::HEADERS_CONTINUE,
        abi::HEADERS_CONTINUE,
        |d, h| headers_status(d.on_response_headers(h)),
    )
}

/// `response_body_status on_http_filter_response_body(...)`: not inspected.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _end_of_stream: bool,
) -> abi::BodyStatus {
    abi::BODY_CONTINUE
}

/// `response_trailers_status on_http_filter_response_trailers(...)`: not inspected.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
) -> abi::TrailersStatus {
    abi::TRAILERS_CONTINUE
}

/// `void on_http_filter_http_callout_done(filter_envoy_ptr, filter_module_ptr, uint64_t
/// callout_id, http_callout_result result, envoy_http_header* headers, size_t headers_size,
/// envoy_buffer* body_chunks, size_t body_chunks_size)`: a quota or JWKS answer (or its
/// absence) for a held request.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    envoy: FilterEnvoyPtr,
    p: FilterModulePtr,
    callout_id: u64,
    result: CalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    // SAFETY: ours until filter_destroy.
    let s = unsafe { stream(p) };
    // SAFETY: Envoy's arrays, valid during this hook.
    let response =
        unsafe { response(result, headers, headers_size, body_chunks, body_chunks_size) };
    let token = CalloutToken(callout_id);
    if s.busy.get() {
        // Answered inside our own dispatch: deliver when the running hook is done.
        let owned = quiet("http_callout_done", None, || {
            response.as_ref().map(AbiResponse::to_owned_response)
        });
        s.deferred.borrow_mut().push((token, owned));
        return;
    }
    guard::drive(s, envoy, Phase::Request, false, (), (), |d, h| {
        d.on_callout_done(
            h,
            token,
            response.as_ref().map(|r| r as &dyn CalloutResponse),
        )
    });
}

/// `void on_http_filter_stream_complete(filter_envoy_ptr, filter_module_ptr)`.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: FilterEnvoyPtr,
    p: FilterModulePtr,
) {
    // SAFETY: ours until filter_destroy.
    let s = unsafe { stream(p) };
    guard::drive(s, envoy, Phase::Cleanup, false, (), (), |d, h| d.on_done(h));
}

/// `void on_http_filter_destroy(filter_module_ptr)`: never nested in another hook of the
/// stream (abi.h), so the stream can go.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(p: FilterModulePtr) {
    if p.is_null() {
        return;
    }
    quiet("on_http_filter_destroy", (), || {
        // SAFETY: ours from filter_new, destroyed once.
        drop(unsafe { Box::from_raw(p as *mut Stream) });
    });
}

/// `local_reply_status on_http_filter_local_reply(filter_envoy_ptr, filter_module_ptr,
/// uint32_t response_code, envoy_buffer details, bool reset_imminent)`: any filter's local
/// reply (ours included, nested in our hook): let it go out.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _response_code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> abi::LocalReplyStatus {
    abi::LOCAL_REPLY_CONTINUE
}

// Streamed callouts of a stream, stream scheduler events, watermarks: api-guard uses none.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _stream_id: u64,
    _reason: StreamResetReason,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: FilterEnvoyPtr,
    _p: FilterModulePtr,
) {
}
