//! HTTP context: proxy-wasm callbacks in, [`Driver`] calls out, [`DriverAction`] mapped to
//! proxy-wasm actions (`Pause` from headers is StopIteration, from a body callback
//! StopIterationAndBuffer).

use super::host::{WasmCallout, WasmHost};
use crate::driver::{Action as DriverAction, Driver, Worker};
use crate::host::CalloutToken;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct Http {
    driver: Driver,
}

impl Http {
    pub fn new(worker: Rc<Worker>) -> Self {
        Self {
            driver: Driver::new(worker),
        }
    }
}

fn action(a: DriverAction) -> Action {
    match a {
        DriverAction::Continue => Action::Continue,
        DriverAction::Pause => Action::Pause,
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        _: usize,
    ) {
        // No headers: Envoy's way of reporting a timeout or a reset.
        let answer = WasmCallout { body_size };
        let answer = (num_headers > 0).then_some(&answer as _);
        self.driver
            .on_callout_done(&mut WasmHost, CalloutToken(token.into()), answer);
    }

    fn on_done(&mut self) -> bool {
        self.driver.on_done(&mut WasmHost);
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.driver.on_request_headers(&mut WasmHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(
            self.driver
                .on_request_body(&mut WasmHost, body_size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.driver.on_request_trailers(&mut WasmHost))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.driver.on_response_headers(&mut WasmHost))
    }
}
