//! proxy-wasm glue: translates proxy-wasm callbacks into [`crate::driver`] calls and the
//! [`crate::host`] traits into host calls. No decisions are made here.

mod host;
mod http;
mod root;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Root::default()) });
}}
