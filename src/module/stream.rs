//! One request (`on_http_filter_new` .. `on_http_filter_destroy`): the [`Driver`] and the
//! [`Host`] it drives, translated to the ABI's per-stream callbacks.

use super::abi::{
    self, Callbacks, EnvoyBuffer, EnvoyHttpHeader, FilterEnvoyPtr, ModuleBuffer, ModuleHttpHeader,
};
use super::config::{now_ms, FilterConfig};
use super::logger;
use crate::driver::{Driver, Worker};
use crate::host::{
    Attribute, CalloutError, CalloutResponse, CalloutToken, CounterId, Host, LogLevel,
    OwnedResponse, Platform,
};
use crate::store::{ProcessStore, SharedStore};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

/// The module's state for one stream. Hooks see it through a shared reference: Envoy may
/// call a hook of the same stream from inside another (a local reply runs the response
/// hooks at once; a callout may fail inside its dispatch), so everything that changes sits
/// in cells and `busy` tells a nested hook to keep its hands off the driver.
pub struct Stream {
    pub cfg: *const FilterConfig,
    pub worker: Rc<Worker>,
    /// `None` once a hook panicked: the request's state may be broken, so every later hook
    /// leaves the stream alone (the guard already answered or reset it).
    pub driver: RefCell<Option<Driver>>,
    /// A local reply went out (the driver's or the guard's).
    pub replied: Cell<bool>,
    /// A hook of this stream is running the driver.
    pub busy: Cell<bool>,
    /// Callout answers that arrived while `busy`, delivered when the running hook is done.
    pub deferred: RefCell<Vec<(CalloutToken, Option<OwnedResponse>)>>,
    /// Resumes and local replies the driver asked for, carried out once the driver call has
    /// returned (`host::Host::resume_request`): Envoy runs filter callbacks synchronously
    /// inside them (a local reply passes through our response hook at once), and those must
    /// find the driver free.
    pub pending: RefCell<Vec<Deferred>>,
}

/// A host call held until the driver call returns.
pub enum Deferred {
    Resume,
    Respond {
        status: u32,
        headers: Vec<(String, String)>,
        body: Option<Vec<u8>>,
    },
}

impl Stream {
    pub fn new(cfg: &FilterConfig, worker: Rc<Worker>) -> Stream {
        Stream {
            cfg,
            driver: RefCell::new(Some(Driver::new(worker.clone()))),
            worker,
            replied: Cell::new(false),
            busy: Cell::new(false),
            deferred: RefCell::new(Vec::new()),
            pending: RefCell::new(Vec::new()),
        }
    }

    /// Carries out the held resumes and replies (call with the driver free).
    pub fn run_pending(&self, api: &'static Callbacks, envoy: FilterEnvoyPtr) {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        for p in pending {
            let mut host = Stream::host(self.config(), api, envoy, false, &self.replied, None);
            match p {
                Deferred::Resume => host.resume_request(),
                Deferred::Respond {
                    status,
                    headers,
                    body,
                } => {
                    let refs: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    host.send_response(status, &refs, body.as_deref());
                }
            }
        }
    }

    /// The config this stream was created from (Envoy keeps it alive while streams exist).
    pub fn config(&self) -> &FilterConfig {
        // SAFETY: Envoy destroys a filter config only after every filter created from it.
        unsafe { &*self.cfg }
    }

    /// The host for one hook.
    pub fn host<'a>(
        cfg: &'a FilterConfig,
        api: &'static Callbacks,
        envoy: FilterEnvoyPtr,
        in_body_hook: bool,
        replied: &'a Cell<bool>,
        defer: Option<&'a RefCell<Vec<Deferred>>>,
    ) -> StreamHost<'a> {
        StreamHost {
            cfg,
            api,
            envoy,
            in_body_hook,
            replied,
            defer,
        }
    }
}

/// [`Host`] over one stream's Envoy pointer, for the duration of one hook.
pub struct StreamHost<'a> {
    cfg: &'a FilterConfig,
    api: &'static Callbacks,
    envoy: FilterEnvoyPtr,
    /// Inside `on_http_filter_request_body`: the chunk of this call is readable (as
    /// "received"; Envoy adds it to the buffered body only after the hook returns).
    in_body_hook: bool,
    /// Set when a local reply went out.
    replied: &'a Cell<bool>,
    /// While the driver runs: where resumes and replies wait until it has returned.
    defer: Option<&'a RefCell<Vec<Deferred>>>,
}

/// Module-owned header views for a call (the strings must outlive it).
pub fn module_headers(headers: &[(&str, &str)]) -> Vec<ModuleHttpHeader> {
    headers
        .iter()
        .map(|(k, v)| ModuleHttpHeader::new(k, v))
        .collect()
}

/// Up to `max` bytes from offset `start` of the body held as `slices` (in order).
fn copy_range(slices: &[&[u8]], start: usize, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut skip = start;
    for b in slices {
        if out.len() >= max {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let rest = &b[skip..];
        skip = 0;
        let take = rest.len().min(max - out.len());
        out.extend_from_slice(&rest[..take]);
    }
    out
}

/// Header bytes as text. Almost every header is valid UTF-8: checking that first (SIMD fast
/// path) beats `from_utf8_lossy`'s chunk walk, which showed up in the module's profile.
fn lossy(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(b).into_owned(),
    }
}

impl StreamHost<'_> {
    fn headers(&mut self, kind: abi::HeaderType) -> Vec<(String, String)> {
        // SAFETY: `envoy` is this stream's filter, alive during the hook.
        let n = unsafe { (self.api.get_headers_size)(self.envoy, kind) };
        if n == 0 {
            return Vec::new();
        }
        let mut raw = vec![EnvoyHttpHeader::NULL; n];
        // SAFETY: `raw` has room for the `n` entries Envoy reported.
        if !unsafe { (self.api.get_headers)(self.envoy, kind, raw.as_mut_ptr()) } {
            return Vec::new();
        }
        raw.iter()
            .map(|h| {
                // SAFETY: filled by Envoy just now, valid during this hook.
                let (k, v) = unsafe { h.parts() };
                (lossy(k), lossy(v))
            })
            .collect()
    }

    fn set_header(&mut self, kind: abi::HeaderType, name: &str, value: Option<&str>) {
        let v = value.map_or(ModuleBuffer::NULL, ModuleBuffer::str);
        // SAFETY: buffers outlive the call; a null value removes the header (abi.h).
        unsafe { (self.api.set_header)(self.envoy, kind, ModuleBuffer::str(name), v) };
    }

    /// The slices of one body (Envoy's memory, valid during the hook).
    fn body_slices(&self, kind: abi::BodyType) -> Vec<EnvoyBuffer> {
        // SAFETY: `envoy` is alive during the hook.
        let n = unsafe { (self.api.get_body_chunks_size)(self.envoy, kind) };
        if n == 0 {
            return Vec::new();
        }
        let mut v = vec![EnvoyBuffer::NULL; n];
        // SAFETY: room for the `n` slices Envoy reported.
        if unsafe { (self.api.get_body_chunks)(self.envoy, kind, v.as_mut_ptr()) } {
            v
        } else {
            Vec::new()
        }
    }

    /// The total request body Envoy holds for us now: what it buffered, plus this call's
    /// chunk inside the body hook.
    pub fn request_body_len(&self) -> usize {
        // SAFETY: `envoy` is alive during the hook.
        let buffered = unsafe { (self.api.get_body_size)(self.envoy, abi::BODY_BUFFERED_REQUEST) };
        let received = if self.in_body_hook {
            // SAFETY: as above.
            unsafe { (self.api.get_body_size)(self.envoy, abi::BODY_RECEIVED_REQUEST) }
        } else {
            0
        };
        buffered.saturating_add(received)
    }

    /// The request path (the guard's deny log), `""` when unreadable.
    pub fn method_and_path(&mut self) -> (String, String) {
        let hs = self.headers(abi::HEADER_REQUEST);
        let get = |n: &str| {
            hs.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        (get(":method"), get(":path"))
    }
}

impl Platform for StreamHost<'_> {
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
        self.cfg.counter(name)
    }

    fn increment_counter(&self, id: CounterId, n: u64) {
        // SAFETY: an id defined by this stream's config; no labels.
        unsafe {
            (self.api.increment_counter)(self.envoy, id.0 as usize, std::ptr::null_mut(), 0, n)
        };
    }

    fn dispatch_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<CalloutToken, CalloutError> {
        let mut hs = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: every buffer outlives the call (Envoy copies the request).
        let r = unsafe {
            (self.api.http_callout)(
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
            Err(CalloutError(format!(
                "cluster '{cluster}': {}",
                abi::callout_init_error(r)
            )))
        }
    }
}

impl Host for StreamHost<'_> {
    fn request_headers(&mut self) -> Vec<(String, String)> {
        let hs = self.headers(abi::HEADER_REQUEST);
        #[cfg(debug_assertions)]
        if let Some(probe) = &self.cfg.panic_probe {
            if hs.iter().any(|(k, v)| k == ":path" && v == probe) {
                panic!("api-guard panic probe: {probe}");
            }
        }
        hs
    }

    fn attribute(&mut self, attr: Attribute) -> Option<String> {
        let id = match attr {
            Attribute::SourceAddress => abi::ATTR_SOURCE_ADDRESS,
            Attribute::RouteName => abi::ATTR_XDS_ROUTE_NAME,
        };
        let mut out = EnvoyBuffer::NULL;
        // SAFETY: `out` is written by Envoy; its bytes are valid during the hook.
        if unsafe { (self.api.get_attribute_string)(self.envoy, id, &mut out) } {
            // SAFETY: as above.
            String::from_utf8(unsafe { out.bytes() }.to_vec()).ok()
        } else {
            None
        }
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.set_header(abi::HEADER_REQUEST, name, value);
    }

    fn request_body(&mut self, start: usize, max: usize) -> Vec<u8> {
        let mut slices = self.body_slices(abi::BODY_BUFFERED_REQUEST);
        if self.in_body_hook {
            slices.extend(self.body_slices(abi::BODY_RECEIVED_REQUEST));
        }
        // SAFETY: slices Envoy filled just now, valid during this hook.
        let views: Vec<&[u8]> = slices.iter().map(|s| unsafe { s.bytes() }).collect();
        copy_range(&views, start, max)
    }

    fn resume_request(&mut self) {
        if let Some(d) = self.defer {
            d.borrow_mut().push(Deferred::Resume);
            return;
        }
        // SAFETY: `envoy` is alive during the hook.
        unsafe { (self.api.continue_decoding)(self.envoy) };
    }

    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
        if let Some(d) = self.defer {
            d.borrow_mut().push(Deferred::Respond {
                status,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: body.map(<[u8]>::to_vec),
            });
            return;
        }
        let mut hs = module_headers(headers);
        self.replied.set(true);
        // SAFETY: every buffer outlives the call.
        unsafe {
            (self.api.send_response)(
                self.envoy,
                status,
                hs.as_mut_ptr(),
                hs.len(),
                body.map_or(ModuleBuffer::NULL, ModuleBuffer::of),
                ModuleBuffer::str("api_guard"),
            )
        };
    }

    fn response_headers(&mut self) -> Vec<(String, String)> {
        let hs = self.headers(abi::HEADER_RESPONSE);
        // The probe's response-path twin: an upstream answer carrying this header.
        #[cfg(debug_assertions)]
        if self.cfg.panic_probe.is_some() && hs.iter().any(|(k, _)| k == "x-api-guard-debug-panic")
        {
            panic!("api-guard panic probe (response)");
        }
        hs
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        self.set_header(abi::HEADER_RESPONSE, name, value);
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        // SAFETY: buffers outlive the call.
        unsafe {
            (self.api.add_header)(
                self.envoy,
                abi::HEADER_RESPONSE,
                ModuleBuffer::str(name),
                ModuleBuffer::str(value),
            )
        };
    }
}

/// A callout answer as the ABI hands it over (Envoy's memory, valid during the hook); read
/// lazily, so an oversized body is never copied.
pub struct AbiResponse<'a> {
    pub headers: &'a [EnvoyHttpHeader],
    pub chunks: &'a [EnvoyBuffer],
}

impl CalloutResponse for AbiResponse<'_> {
    fn status(&self) -> Option<u32> {
        self.headers.iter().find_map(|h| {
            // SAFETY: filled by Envoy for this hook.
            let (k, v) = unsafe { h.parts() };
            (k == b":status")
                .then(|| std::str::from_utf8(v).ok()?.parse().ok())
                .flatten()
        })
    }

    fn body_len(&self) -> usize {
        self.chunks.iter().map(|c| c.length).sum()
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body_len());
        for c in self.chunks {
            // SAFETY: filled by Envoy for this hook.
            out.extend_from_slice(unsafe { c.bytes() });
        }
        out
    }
}

impl AbiResponse<'_> {
    /// A copy that outlives the hook (an answer that arrived while another hook of the same
    /// stream was running).
    /// Bodies above every answer limit (JWKS, quota) are not copied: such an answer is
    /// unusable whatever its status, so it is kept as "no status".
    pub fn to_owned_response(&self) -> OwnedResponse {
        let limit = crate::auth::remote_jwks::MAX_BODY.max(crate::quota_client::MAX_ANSWER_BYTES);
        if self.body_len() > limit {
            return OwnedResponse::default();
        }
        OwnedResponse {
            status: self.status(),
            body: self.body(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::copy_range;

    #[test]
    fn body_ranges_span_slices() {
        let s: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        assert_eq!(copy_range(&s, 0, 100), b"abcdefgh");
        assert_eq!(copy_range(&s, 2, 3), b"cde");
        assert_eq!(copy_range(&s, 3, 2), b"de");
        assert_eq!(copy_range(&s, 7, 5), b"h");
        assert_eq!(copy_range(&s, 8, 5), b"");
        assert_eq!(copy_range(&s, 100, 5), b"");
        assert_eq!(copy_range(&s, 1, 0), b"");
        assert_eq!(copy_range(&[], 0, 4), b"");
    }
}
