//! What the request driver ([`crate::driver`]) needs from Envoy, as two small traits.
//!
//! Both deliveries implement them: the proxy-wasm glue (`filter`) and the native dynamic
//! module. Everything that decides or sequences lives in the driver; an implementation only
//! translates calls to its ABI. [`testing::FakeHost`] implements them in memory so the whole
//! request path runs in unit tests.
//!
//! Text from the host: header values are decoded UTF-8-lossy by the implementation (a byte
//! 0xFF from a client must never abort anything; a credential with such bytes is invalid
//! either way). Names are tokens validated by Envoy's codecs.

use crate::store::SharedStore;
use std::fmt;

/// Log levels, mapped to the host's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// A counter defined by [`Platform::define_counter`]; the id is the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterId(pub u32);

/// A callout in flight, as the host numbers it; comes back in
/// [`crate::driver::Driver::on_callout_done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CalloutToken(pub u64);

/// Request properties that are not headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute {
    /// The downstream peer, `ip:port` (Envoy `source.address`).
    SourceAddress,
    /// The name of the Envoy route the request matched (`xds.route_name`).
    RouteName,
}

/// The answer to a callout, read lazily: the driver copies the body only when it is within
/// the limit of the callout's purpose (the peer decides the size; a 10 MiB JWKS must never
/// be copied by every worker). Implementations read their ABI's response on demand.
pub trait CalloutResponse {
    /// The `:status` of the answer; `None` when absent or not a number.
    fn status(&self) -> Option<u32>;
    /// The body's size in bytes.
    fn body_len(&self) -> usize;
    /// A copy of the body. Called at most once, and only when `body_len()` is within the
    /// caller's limit.
    fn body(&self) -> Vec<u8>;
}

/// A [`CalloutResponse`] already in memory (tests, and hosts that receive the answer as data).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedResponse {
    pub status: Option<u32>,
    pub body: Vec<u8>,
}

impl CalloutResponse for OwnedResponse {
    fn status(&self) -> Option<u32> {
        self.status
    }
    fn body_len(&self) -> usize {
        self.body.len()
    }
    fn body(&self) -> Vec<u8> {
        self.body.clone()
    }
}

/// Why a callout was not dispatched (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutError(pub String);

impl fmt::Display for CalloutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Services of the host that do not belong to one request: the clock, the store shared by
/// all workers, logs, counters, callouts.
pub trait Platform {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> u64;

    /// The process-wide store (token buckets, replay memory, JWKS sets, token cache).
    fn store(&self) -> &dyn SharedStore;

    /// Writes one log line. `Arguments`, so a line below the host's level costs no format.
    fn log(&self, level: LogLevel, msg: fmt::Arguments<'_>);

    /// Defines a counter named `name` (full stat name, e.g. `api_guard.allowed`); called
    /// once per name while a worker is configured. `None`: the host has no counters.
    fn define_counter(&mut self, name: &str) -> Option<CounterId>;

    fn increment_counter(&self, id: CounterId, n: u64);

    /// Starts an HTTP callout to `cluster`. `headers` include the pseudo-headers
    /// (`:method`, `:path`, `:authority`). The answer (or its absence: timeout, reset) comes
    /// back once, through `on_callout_done` with the returned token.
    fn dispatch_callout(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<CalloutToken, CalloutError>;
}

/// One request's stream.
pub trait Host: Platform {
    /// Every request header in order, repeated ones included, pseudo-headers included
    /// (`:method`, `:path`, ...), values decoded UTF-8-lossy. One host call where possible:
    /// this runs once per request (again after a wait).
    fn request_headers(&mut self) -> Vec<(String, String)>;

    /// A request property; `None` when the host does not have it.
    fn attribute(&mut self, attr: Attribute) -> Option<String>;

    /// Sets (replacing every value) or, with `None`, removes a request header.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);

    /// Up to `max` bytes of the request body the host holds, from byte `start` of the body
    /// (offsets count from the first body byte, across callbacks: the driver reports the
    /// total through `on_request_body` and asks for what it has not seen yet).
    fn request_body(&mut self, start: usize, max: usize) -> Vec<u8>;

    /// Lets a held request go on (after the driver answered `Pause` and decided later).
    ///
    /// This and [`Host::send_response`] are always the driver's last host call in a driver
    /// call, with its state already final. An ABI that runs filter callbacks synchronously
    /// inside them (a local reply passing through this filter's response hook, a later
    /// filter answering at once) must still not re-enter the `Driver` while it is borrowed:
    /// such a host defers the call until the driver call has returned.
    fn resume_request(&mut self);

    /// Answers the request locally; the upstream never sees it.
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: Option<&[u8]>);

    /// Every response header, as [`Host::request_headers`].
    fn response_headers(&mut self) -> Vec<(String, String)>;

    /// Sets (replacing every value) or, with `None`, removes a response header.
    fn set_response_header(&mut self, name: &str, value: Option<&str>);

    /// Adds a value to a response header, keeping the existing ones.
    fn add_response_header(&mut self, name: &str, value: &str);
}

#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
