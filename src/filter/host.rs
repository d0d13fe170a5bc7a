//! [`Platform`] and [`Host`] over proxy-wasm host calls. Stateless: the host knows which
//! context is current. Host calls go through `hostcalls` directly, never the SDK's context
//! methods, which `unwrap()` host errors (a VM abort); `_bytes` variants only, since the
//! String ones panic on a value that is not UTF-8.

use crate::host::{
    Attribute, CalloutError, CalloutResponse, CalloutToken, CounterId, Host, LogLevel, Platform,
};
use crate::store::{SharedStore, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

/// Envoy shared data (process-wide, every worker's VM sees the same map).
pub struct ProxyStore;

impl SharedStore for ProxyStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(v), Some(cas))) => Some((v, cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Failed),
        }
    }
}

/// The current context (root or HTTP) of this VM.
pub struct WasmHost;

fn utf8_map(raw: Vec<(String, Vec<u8>)>) -> Vec<(String, String)> {
    raw.into_iter()
        .map(|(k, v)| {
            let v = match String::from_utf8(v) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            };
            (k, v)
        })
        .collect()
}

impl Platform for WasmHost {
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn store(&self) -> &dyn SharedStore {
        &ProxyStore
    }

    fn log(&self, level: LogLevel, msg: fmt::Arguments<'_>) {
        let level = match level {
            LogLevel::Debug => log::Level::Debug,
            LogLevel::Info => log::Level::Info,
            LogLevel::Warn => log::Level::Warn,
            LogLevel::Error => log::Level::Error,
        };
        log::log!(level, "{msg}");
    }

    fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        hostcalls::define_metric(MetricType::Counter, name)
            .ok()
            .map(CounterId)
    }

    fn increment_counter(&self, id: CounterId, n: u64) {
        let _ = hostcalls::increment_metric(id.0, n as i64);
    }

    fn dispatch_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<CalloutToken, CalloutError> {
        // Registers the token with the current context, which gets the answer.
        hostcalls::dispatch_http_call(
            cluster,
            headers.to_vec(),
            body,
            vec![],
            Duration::from_millis(timeout_ms),
        )
        .map(|t| CalloutToken(t.into()))
        .map_err(|e| CalloutError(format!("{e:?}")))
    }
}

impl Host for WasmHost {
    fn request_headers(&mut self) -> Vec<(String, String)> {
        utf8_map(hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default())
    }

    fn attribute(&mut self, attr: Attribute) -> Option<String> {
        let path = match attr {
            Attribute::SourceAddress => vec!["source", "address"],
            Attribute::RouteName => vec!["xds", "route_name"],
        };
        hostcalls::get_property(path)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
    }

    fn request_body(&mut self, start: usize, max: usize) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, start, max)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn resume_request(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
        let _ = hostcalls::send_http_response(status, headers.to_vec(), body);
    }

    fn response_headers(&mut self) -> Vec<(String, String)> {
        utf8_map(hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default())
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value);
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
    }
}

/// The answer to the callout whose `on_http_call_response` is running, read on demand.
pub struct WasmCallout {
    pub body_size: usize,
}

impl CalloutResponse for WasmCallout {
    fn status(&self) -> Option<u32> {
        hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
    }

    fn body_len(&self) -> usize {
        self.body_size
    }

    fn body(&self) -> Vec<u8> {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, self.body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    }
}
