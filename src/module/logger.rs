//! Logs into Envoy's log (`[dynamic_modules]` lines), from the `log` crate (used by some
//! modules) and from [`crate::host::Platform::log`]. Outside Envoy (callbacks not resolved)
//! lines go to stderr.

use super::abi::{self, ModuleBuffer};
use crate::host::LogLevel;
use std::fmt::{self, Write as _};
use std::io::Write as _;

fn abi_level(level: LogLevel) -> abi::LogLevel {
    match level {
        LogLevel::Debug => abi::LOG_DEBUG,
        LogLevel::Info => abi::LOG_INFO,
        LogLevel::Warn => abi::LOG_WARN,
        LogLevel::Error => abi::LOG_ERROR,
    }
}

/// Writes one line at `level`; nothing is formatted when Envoy's level is above it.
pub fn write(level: LogLevel, msg: fmt::Arguments<'_>) {
    match abi::api() {
        Some(api) => {
            let l = abi_level(level);
            // SAFETY: plain value in, bool out (abi.h: `log_enabled`).
            if !unsafe { (api.log_enabled)(l) } {
                return;
            }
            let mut line = String::with_capacity(128);
            let _ = line.write_fmt(msg);
            // SAFETY: `line` outlives the call; Envoy only reads it during the call.
            unsafe { (api.log)(l, ModuleBuffer::str(&line)) };
        }
        None => {
            let _ = writeln!(std::io::stderr(), "{msg}");
        }
    }
}

struct EnvoyLogger;

impl log::Log for EnvoyLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = match record.level() {
            log::Level::Error => LogLevel::Error,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Info => LogLevel::Info,
            log::Level::Debug | log::Level::Trace => LogLevel::Debug,
        };
        write(level, *record.args());
    }

    fn flush(&self) {}
}

/// Routes the `log` crate to Envoy (once per process; a host program that installed its
/// own logger keeps it).
pub fn install() {
    static LOGGER: EnvoyLogger = EnvoyLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}
