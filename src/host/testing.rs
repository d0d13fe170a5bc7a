//! An in-memory host for unit tests: records everything the driver asks of it, so a test
//! runs the whole request path natively and inspects what Envoy would have seen.

use super::{Attribute, CalloutError, CalloutToken, CounterId, Host, LogLevel, Platform};
use crate::store::{MemoryStore, SharedStore};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

/// A callout the driver dispatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCallout {
    pub token: CalloutToken,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout_ms: u64,
}

impl SentCallout {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A local response the driver sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl SentResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).into_owned()
    }
}

/// The host of one test: platform state (store, clock, counters, logs, callouts) lives as
/// long as the host; request state is reset by [`FakeHost::request`].
pub struct FakeHost {
    pub now: Cell<u64>,
    pub store: Rc<MemoryStore>,
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    counter_names: Vec<String>,
    counters: RefCell<Vec<u64>>,
    /// Callouts dispatched, in order.
    pub callouts: Vec<SentCallout>,
    /// Makes `dispatch_callout` fail (an unknown cluster, say).
    pub refuse_callouts: bool,
    next_token: u64,
    // Request state.
    pub request_headers: Vec<(String, String)>,
    pub source_address: Option<String>,
    pub route_name: Option<String>,
    /// How often the driver read the request headers / an attribute (host calls).
    pub header_reads: usize,
    pub attribute_reads: usize,
    /// The body bytes the host holds (the test appends before `on_request_body`).
    pub body: Vec<u8>,
    /// The largest body read the driver asked for, in bytes.
    pub largest_body_read: usize,
    pub resumed: usize,
    pub sent: Option<SentResponse>,
    pub response_headers: Vec<(String, String)>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeHost {
    pub fn new() -> Self {
        Self {
            now: Cell::new(1_700_000_000_000),
            store: Rc::new(MemoryStore::new()),
            logs: RefCell::new(Vec::new()),
            counter_names: Vec::new(),
            counters: RefCell::new(Vec::new()),
            callouts: Vec::new(),
            refuse_callouts: false,
            next_token: 1,
            request_headers: Vec::new(),
            source_address: Some("10.0.0.1:4000".into()),
            route_name: None,
            header_reads: 0,
            attribute_reads: 0,
            body: Vec::new(),
            largest_body_read: 0,
            resumed: 0,
            sent: None,
            response_headers: Vec::new(),
        }
    }

    /// Starts a new request (platform state is kept): `:method`, `:path`, `:authority`
    /// plus `headers`.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) {
        let mut all = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
            (":authority".to_string(), "api.test".to_string()),
        ];
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.request_headers = all;
        self.header_reads = 0;
        self.attribute_reads = 0;
        self.body.clear();
        self.largest_body_read = 0;
        self.resumed = 0;
        self.sent = None;
        self.response_headers.clear();
    }

    /// The value of a counter by its full name (0 when never incremented or not defined).
    pub fn counter(&self, name: &str) -> u64 {
        self.counter_names
            .iter()
            .position(|n| n == name)
            .and_then(|i| self.counters.borrow().get(i).copied())
            .unwrap_or(0)
    }

    /// Log lines at `level` or above containing `needle`.
    pub fn logged(&self, level: LogLevel, needle: &str) -> usize {
        self.logs
            .borrow()
            .iter()
            .filter(|(l, m)| *l >= level && m.contains(needle))
            .count()
    }

    /// The request header's first value as the upstream would see it.
    pub fn request_header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn response_header_values(&self, name: &str) -> Vec<&str> {
        self.response_headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

impl Platform for FakeHost {
    fn now_ms(&self) -> u64 {
        self.now.get()
    }

    fn store(&self) -> &dyn SharedStore {
        &*self.store
    }

    fn log(&self, level: LogLevel, msg: fmt::Arguments<'_>) {
        self.logs.borrow_mut().push((level, msg.to_string()));
    }

    fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        let id = match self.counter_names.iter().position(|n| n == name) {
            Some(i) => i,
            None => {
                self.counter_names.push(name.to_string());
                self.counters.borrow_mut().push(0);
                self.counter_names.len() - 1
            }
        };
        Some(CounterId(id as u32))
    }

    fn increment_counter(&self, id: CounterId, n: u64) {
        if let Some(c) = self.counters.borrow_mut().get_mut(id.0 as usize) {
            *c += n;
        }
    }

    fn dispatch_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<CalloutToken, CalloutError> {
        if self.refuse_callouts {
            return Err(CalloutError(format!("no cluster '{cluster}'")));
        }
        let token = CalloutToken(self.next_token);
        self.next_token += 1;
        self.callouts.push(SentCallout {
            token,
            cluster: cluster.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.map(<[u8]>::to_vec),
            timeout_ms,
        });
        Ok(token)
    }
}

impl Host for FakeHost {
    fn request_headers(&mut self) -> Vec<(String, String)> {
        self.header_reads += 1;
        self.request_headers.clone()
    }

    fn attribute(&mut self, attr: Attribute) -> Option<String> {
        self.attribute_reads += 1;
        match attr {
            Attribute::SourceAddress => self.source_address.clone(),
            Attribute::RouteName => self.route_name.clone(),
        }
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.request_headers.retain(|(k, _)| k != name);
        if let Some(v) = value {
            self.request_headers.push((name.to_string(), v.to_string()));
        }
    }

    fn request_body(&mut self, start: usize, max: usize) -> Vec<u8> {
        self.largest_body_read = self.largest_body_read.max(max);
        let end = start.saturating_add(max).min(self.body.len());
        self.body
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn resume_request(&mut self) {
        self.resumed += 1;
    }

    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>) {
        assert!(
            self.sent.is_none(),
            "a second local response on one request"
        );
        self.sent = Some(SentResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.map(<[u8]>::to_vec),
        });
    }

    fn response_headers(&mut self) -> Vec<(String, String)> {
        self.response_headers.clone()
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        self.response_headers.retain(|(k, _)| k != name);
        if let Some(v) = value {
            self.response_headers
                .push((name.to_string(), v.to_string()));
        }
    }

    fn add_response_header(&mut self, name: &str, value: &str) {
        self.response_headers
            .push((name.to_string(), value.to_string()));
    }
}
