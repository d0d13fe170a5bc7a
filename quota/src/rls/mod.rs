//! Envoy's rate limit service API (`envoy.service.ratelimit.v3.RateLimitService`, SPEC section
//! 8): a drop-in for envoyproxy/ratelimit reading its YAML descriptor config, deciding on the
//! same stores as the HTTP API, all descriptors of a request at once.
//!
//! `config` parses and validates the YAML; `matcher` finds a descriptor's rule; `decide` is
//! the pure all-or-nothing decision (ported to Lua for Redis); `service` is the gRPC surface.

pub mod config;
pub mod decide;
pub mod matcher;
pub mod service;
