//! The Envoy dynamic-module ABI, as far as api-guard uses it: ABI version "v0.2.0" (Envoy
//! 1.40).
//!
//! Read from `source/extensions/dynamic_modules/abi/abi.h` of Envoy v1.40.0 (the copy read:
//! repository `agrawroh/envoy`, commit `05f72c01c038709243e7b58d9faccc6e7d1b7754`, which
//! defines `ENVOY_DYNAMIC_MODULES_ABI_VERSION "v0.2.0"`). The header's policy: a released
//! entity never changes in place; changes come as new `_v2` names. Every callback bound here
//! is exported by the pinned binary (`nm -D envoy | grep envoy_dynamic_module_callback_http`),
//! and every `envoy_dynamic_module_on_http_filter_*` hook it looks up is exported by
//! `module::hooks`.
//!
//! Two kinds of functions cross the boundary:
//! - hooks (`envoy_dynamic_module_on_*`): Envoy calls them; `module::hooks` defines them with
//!   the signatures documented there;
//! - callbacks (`envoy_dynamic_module_callback_*`): Envoy exports them and the module calls
//!   them. They are resolved once with `dlsym(RTLD_DEFAULT, ..)` in
//!   [`Callbacks::resolve`] (from `envoy_dynamic_module_on_program_init`), not linked as
//!   undefined symbols: the same crate is also an rlib for the CLI and the tests, whose
//!   executables have no Envoy to link against. A missing callback refuses the module at load
//!   time with the name of what is missing, instead of a crash at request time.
//!
//! C enums are passed as `u32` (their size on x86_64 Linux), with the enumerators as consts.

use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

/// What `envoy_dynamic_module_on_program_init` returns: the ABI this module was built for.
pub const ABI_VERSION: &CStr = c"v0.2.0";

// ---------------------------------------------------------------------------------------
// Types (abi.h "Common Types" and "HTTP Filter Types")
// ---------------------------------------------------------------------------------------

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy, valid during the hook.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl EnvoyBuffer {
    pub const NULL: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// The bytes, empty for a null buffer.
    ///
    /// # Safety
    /// Envoy must have filled this buffer during the current hook (its data stays valid
    /// until the hook returns, unless a setter changes the same map).
    pub unsafe fn bytes<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            &[]
        } else {
            std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length)
        }
    }
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module, read during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl ModuleBuffer {
    /// A null buffer: "no value" where the ABI allows it (e.g. `set_header` removes).
    pub const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    pub fn of(b: &[u8]) -> ModuleBuffer {
        ModuleBuffer {
            ptr: b.as_ptr().cast(),
            length: b.len(),
        }
    }

    pub fn str(s: &str) -> ModuleBuffer {
        Self::of(s.as_bytes())
    }
}

/// `envoy_dynamic_module_type_envoy_http_header`: a header owned by Envoy's header map.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EnvoyHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

impl EnvoyHttpHeader {
    pub const NULL: EnvoyHttpHeader = EnvoyHttpHeader {
        key_ptr: std::ptr::null(),
        key_length: 0,
        value_ptr: std::ptr::null(),
        value_length: 0,
    };

    /// Name and value.
    ///
    /// # Safety
    /// As [`EnvoyBuffer::bytes`].
    pub unsafe fn parts<'a>(&self) -> (&'a [u8], &'a [u8]) {
        let k = EnvoyBuffer {
            ptr: self.key_ptr,
            length: self.key_length,
        };
        let v = EnvoyBuffer {
            ptr: self.value_ptr,
            length: self.value_length,
        };
        (k.bytes(), v.bytes())
    }
}

/// `envoy_dynamic_module_type_module_http_header`: a header owned by the module.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModuleHttpHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

impl ModuleHttpHeader {
    pub fn new(k: &str, v: &str) -> ModuleHttpHeader {
        ModuleHttpHeader {
            key_ptr: k.as_ptr().cast(),
            key_length: k.len(),
            value_ptr: v.as_ptr().cast(),
            value_length: v.len(),
        }
    }
}

/// `envoy_dynamic_module_type_http_filter_config_envoy_ptr` (Envoy's filter config).
pub type FilterConfigEnvoyPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_config_module_ptr` (ours; released in
/// `on_http_filter_config_destroy`).
pub type FilterConfigModulePtr = *const c_void;
/// `envoy_dynamic_module_type_http_filter_per_route_config_module_ptr` (unused: no per-route
/// config).
pub type PerRouteConfigModulePtr = *const c_void;
/// `envoy_dynamic_module_type_http_filter_envoy_ptr` (Envoy's per-stream filter; valid until
/// `on_http_filter_destroy`).
pub type FilterEnvoyPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_module_ptr` (ours; released in
/// `on_http_filter_destroy`).
pub type FilterModulePtr = *const c_void;
/// `envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr`.
pub type ConfigSchedulerPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
pub type HeaderType = u32;
pub const HEADER_REQUEST: HeaderType = 0;
pub const HEADER_RESPONSE: HeaderType = 2;

/// `envoy_dynamic_module_type_http_body_type`.
pub type BodyType = u32;
/// The chunk of the current `on_http_filter_request_body` call (only inside that hook).
pub const BODY_RECEIVED_REQUEST: BodyType = 0;
/// What Envoy has buffered for this filter so far (earlier chunks it was told to buffer).
pub const BODY_BUFFERED_REQUEST: BodyType = 1;

/// `envoy_dynamic_module_type_log_level`.
pub type LogLevel = u32;
pub const LOG_DEBUG: LogLevel = 1;
pub const LOG_INFO: LogLevel = 2;
pub const LOG_WARN: LogLevel = 3;
pub const LOG_ERROR: LogLevel = 4;

/// `envoy_dynamic_module_type_attribute_id` (the enum's position; `SourceAddress` is 24).
pub type AttributeId = u32;
pub const ATTR_SOURCE_ADDRESS: AttributeId = 24;
pub const ATTR_XDS_ROUTE_NAME: AttributeId = 61;

/// `envoy_dynamic_module_type_http_callout_init_result`.
pub type CalloutInitResult = u32;
pub const CALLOUT_INIT_SUCCESS: CalloutInitResult = 0;

/// Why a callout could not start, for the log.
pub fn callout_init_error(r: CalloutInitResult) -> &'static str {
    match r {
        1 => "missing required headers",
        2 => "cluster not found",
        3 => "duplicate callout id",
        4 => "cannot create request (no healthy upstream?)",
        _ => "unknown init result",
    }
}

/// `envoy_dynamic_module_type_http_callout_result`.
pub type CalloutResult = u32;
pub const CALLOUT_SUCCESS: CalloutResult = 0;

/// `envoy_dynamic_module_type_metrics_result`.
pub type MetricsResult = u32;
pub const METRICS_SUCCESS: MetricsResult = 0;

/// `envoy_dynamic_module_type_on_http_filter_request_headers_status` (and the response one,
/// same numbering).
pub type HeadersStatus = u32;
pub const HEADERS_CONTINUE: HeadersStatus = 0;
/// `StopIteration`: hold the headers; body callbacks still run (webhook checks need them).
pub const HEADERS_STOP_ITERATION: HeadersStatus = 1;

/// `envoy_dynamic_module_type_on_http_filter_request_body_status` (response: same numbering).
pub type BodyStatus = u32;
pub const BODY_CONTINUE: BodyStatus = 0;
pub const BODY_STOP_AND_BUFFER: BodyStatus = 1;

/// `envoy_dynamic_module_type_on_http_filter_request_trailers_status` (response: same).
pub type TrailersStatus = u32;
pub const TRAILERS_CONTINUE: TrailersStatus = 0;
pub const TRAILERS_STOP_ITERATION: TrailersStatus = 1;

/// `envoy_dynamic_module_type_on_http_filter_local_reply_status`.
pub type LocalReplyStatus = u32;
pub const LOCAL_REPLY_CONTINUE: LocalReplyStatus = 0;

/// `envoy_dynamic_module_type_http_filter_stream_reset_reason`: `LocalReset`.
pub const STREAM_RESET_LOCAL: u32 = 0;

/// `envoy_dynamic_module_type_http_stream_reset_reason` (streamed callouts; unused).
pub type StreamResetReason = u32;

// ---------------------------------------------------------------------------------------
// Callbacks (Envoy exports them)
// ---------------------------------------------------------------------------------------

/// Declares [`Callbacks`]: one field per bound callback, its C signature, and the exported
/// name it is resolved from.
macro_rules! callbacks {
    ($( $(#[$doc:meta])* $field:ident = $sym:literal : fn($($arg:ty),*) $(-> $ret:ty)?; )*) => {
        /// The Envoy callbacks api-guard calls, resolved once per process.
        pub struct Callbacks {
            $( $(#[$doc])* pub $field: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
        }

        impl Callbacks {
            /// Every exported name bound here (tests compare it with the pinned binary).
            #[cfg(test)]
            pub const NAMES: &'static [&'static str] = &[$($sym),*];

            /// Looks every callback up in the process (Envoy's exports). `Err(name)`: the
            /// first one missing, i.e. this Envoy does not speak the ABI we were built for.
            pub fn resolve() -> Result<Callbacks, &'static str> {
                Ok(Callbacks {
                    $( $field: {
                        let p = lookup(concat!($sym, "\0"));
                        if p.is_null() {
                            return Err($sym);
                        }
                        // SAFETY: the symbol is Envoy's implementation of this callback,
                        // whose C signature (abi.h v0.2.0) is the field's type.
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p) }
                    }, )*
                })
            }
        }
    };
}

callbacks! {
    /// `void (log_level, module_buffer message)`: a line in Envoy's log under `[dynamic_modules]`.
    log = "envoy_dynamic_module_callback_log": fn(LogLevel, ModuleBuffer);
    /// `bool (log_level)`: whether a level is on, so disabled lines are not even formatted.
    log_enabled = "envoy_dynamic_module_callback_log_enabled": fn(LogLevel) -> bool;
    /// `bool (void)`: `envoy --mode validate`; no background work is started then.
    is_validation_mode = "envoy_dynamic_module_callback_is_validation_mode": fn() -> bool;

    /// `metrics_result (config_envoy_ptr, module_buffer name, module_buffer* label_names,
    /// size_t label_names_length, size_t* counter_id_ptr)`; only during `config_new`.
    define_counter = "envoy_dynamic_module_callback_http_filter_config_define_counter":
        fn(FilterConfigEnvoyPtr, ModuleBuffer, *mut ModuleBuffer, usize, *mut usize) -> MetricsResult;
    /// `metrics_result (filter_envoy_ptr, size_t id, module_buffer* label_values,
    /// size_t label_values_length, uint64_t value)`.
    increment_counter = "envoy_dynamic_module_callback_http_filter_increment_counter":
        fn(FilterEnvoyPtr, usize, *mut ModuleBuffer, usize, u64) -> MetricsResult;
    /// As `increment_counter`, from the config (outside a request: background refreshes).
    config_increment_counter = "envoy_dynamic_module_callback_http_filter_config_increment_counter":
        fn(FilterConfigEnvoyPtr, usize, *mut ModuleBuffer, usize, u64) -> MetricsResult;

    /// `size_t (filter_envoy_ptr, header_type)`: how many entries the map has.
    get_headers_size = "envoy_dynamic_module_callback_http_get_headers_size":
        fn(FilterEnvoyPtr, HeaderType) -> usize;
    /// `bool (filter_envoy_ptr, header_type, envoy_http_header* result_headers)`: every entry
    /// (repeats included) into an array of `get_headers_size` elements.
    get_headers = "envoy_dynamic_module_callback_http_get_headers":
        fn(FilterEnvoyPtr, HeaderType, *mut EnvoyHttpHeader) -> bool;
    /// `bool (filter_envoy_ptr, header_type, module_buffer key, module_buffer value)`:
    /// replaces every value; a null `value` removes the header (the ABI has no remove).
    set_header = "envoy_dynamic_module_callback_http_set_header":
        fn(FilterEnvoyPtr, HeaderType, ModuleBuffer, ModuleBuffer) -> bool;
    /// `bool (filter_envoy_ptr, header_type, module_buffer key, module_buffer value)`:
    /// appends a value, keeping existing ones.
    add_header = "envoy_dynamic_module_callback_http_add_header":
        fn(FilterEnvoyPtr, HeaderType, ModuleBuffer, ModuleBuffer) -> bool;

    /// `void (filter_envoy_ptr, uint32_t status_code, module_http_header* headers_vector,
    /// size_t headers_vector_size, module_buffer body, module_buffer details)`: a local reply.
    send_response = "envoy_dynamic_module_callback_http_send_response":
        fn(FilterEnvoyPtr, u32, *mut ModuleHttpHeader, usize, ModuleBuffer, ModuleBuffer);

    /// `size_t (filter_envoy_ptr, body_type)`: bytes in that body.
    get_body_size = "envoy_dynamic_module_callback_http_get_body_size":
        fn(FilterEnvoyPtr, BodyType) -> usize;
    /// `size_t (filter_envoy_ptr, body_type)`: how many slices the body has.
    get_body_chunks_size = "envoy_dynamic_module_callback_http_get_body_chunks_size":
        fn(FilterEnvoyPtr, BodyType) -> usize;
    /// `bool (filter_envoy_ptr, body_type, envoy_buffer* result_buffer_vector)`: the slices,
    /// into an array of `get_body_chunks_size` elements (no copy).
    get_body_chunks = "envoy_dynamic_module_callback_http_get_body_chunks":
        fn(FilterEnvoyPtr, BodyType, *mut EnvoyBuffer) -> bool;

    /// `bool (filter_envoy_ptr, attribute_id, envoy_buffer* result)`.
    get_attribute_string = "envoy_dynamic_module_callback_http_filter_get_attribute_string":
        fn(FilterEnvoyPtr, AttributeId, *mut EnvoyBuffer) -> bool;

    /// `callout_init_result (filter_envoy_ptr, uint64_t* callout_id_out, module_buffer
    /// cluster_name, module_http_header* headers, size_t headers_size, module_buffer body,
    /// uint64_t timeout_milliseconds)`; answered in `on_http_filter_http_callout_done`.
    http_callout = "envoy_dynamic_module_callback_http_filter_http_callout":
        fn(FilterEnvoyPtr, *mut u64, ModuleBuffer, *mut ModuleHttpHeader, usize, ModuleBuffer, u64) -> CalloutInitResult;
    /// As `http_callout`, owned by the config (main thread); answered in
    /// `on_http_filter_config_http_callout_done`.
    config_http_callout = "envoy_dynamic_module_callback_http_filter_config_http_callout":
        fn(FilterConfigEnvoyPtr, *mut u64, ModuleBuffer, *mut ModuleHttpHeader, usize, ModuleBuffer, u64) -> CalloutInitResult;

    /// `void (filter_envoy_ptr, http_filter_stream_reset_reason reason, module_buffer
    /// details)`: resets the stream (a panic on the response path, when headers may be out).
    reset_stream = "envoy_dynamic_module_callback_http_filter_reset_stream":
        fn(FilterEnvoyPtr, u32, ModuleBuffer);
    /// `void (filter_envoy_ptr)`: resumes a request held with `StopIteration`.
    continue_decoding = "envoy_dynamic_module_callback_http_filter_continue_decoding":
        fn(FilterEnvoyPtr);

    /// `config_scheduler_module_ptr (config_envoy_ptr)`: a handle to run
    /// `on_http_filter_config_scheduled` on the main thread from any thread.
    config_scheduler_new = "envoy_dynamic_module_callback_http_filter_config_scheduler_new":
        fn(FilterConfigEnvoyPtr) -> ConfigSchedulerPtr;
    /// `void (config_scheduler_module_ptr, uint64_t event_id)`.
    config_scheduler_commit = "envoy_dynamic_module_callback_http_filter_config_scheduler_commit":
        fn(ConfigSchedulerPtr, u64);
    /// `void (config_scheduler_module_ptr)`.
    config_scheduler_delete = "envoy_dynamic_module_callback_http_filter_config_scheduler_delete":
        fn(ConfigSchedulerPtr);
}

extern "C" {
    // glibc >= 2.34 has dlsym in libc itself; RTLD_DEFAULT is the null handle there.
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

fn lookup(name_nul: &str) -> *mut c_void {
    // SAFETY: `name_nul` is NUL-terminated (the macro appends it); a null handle is
    // RTLD_DEFAULT on glibc: search the executable and its loaded libraries.
    unsafe { dlsym(std::ptr::null_mut(), name_nul.as_ptr().cast()) }
}

static CALLBACKS: OnceLock<Result<Callbacks, &'static str>> = OnceLock::new();

/// Resolves the callbacks (first call) and tells whether all were found.
pub fn init() -> Result<(), &'static str> {
    match CALLBACKS.get_or_init(Callbacks::resolve) {
        Ok(_) => Ok(()),
        Err(missing) => Err(missing),
    }
}

/// The resolved callbacks; `None` outside Envoy or when the ABI did not match (the module
/// was then refused at load, so hooks never run).
pub fn api() -> Option<&'static Callbacks> {
    CALLBACKS.get().and_then(|r| r.as_ref().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pinned Envoy exports every callback bound here (read from its dynamic symbol
    /// table); skipped when the binary is not installed.
    #[test]
    fn pinned_envoy_exports_every_bound_callback() {
        let envoy = std::env::var_os("ENVOY_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join(".tools/envoy/envoy/_bin/envoy")
            });
        let Ok(out) = std::process::Command::new("nm")
            .arg("-D")
            .arg("--defined-only")
            .arg(&envoy)
            .output()
        else {
            eprintln!("nm not available: skipped");
            return;
        };
        if !out.status.success() {
            eprintln!("{} not readable: skipped", envoy.display());
            return;
        }
        let syms = String::from_utf8_lossy(&out.stdout);
        let exported: std::collections::HashSet<&str> = syms
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2))
            .collect();
        for name in Callbacks::NAMES {
            assert!(
                exported.contains(name),
                "{name} not exported by {}",
                envoy.display()
            );
        }
    }

    #[test]
    fn callbacks_are_absent_outside_envoy() {
        // A test binary exports none of them: resolve names the first one it misses.
        assert_eq!(Callbacks::resolve().err(), Some(Callbacks::NAMES[0]));
    }

    #[test]
    fn layouts_match_the_header() {
        // Two-word structs and four-word headers, as abi.h lays them out on x86_64.
        assert_eq!(std::mem::size_of::<EnvoyBuffer>(), 16);
        assert_eq!(std::mem::size_of::<ModuleBuffer>(), 16);
        assert_eq!(std::mem::size_of::<EnvoyHttpHeader>(), 32);
        assert_eq!(std::mem::size_of::<ModuleHttpHeader>(), 32);
    }
}
