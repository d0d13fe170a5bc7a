//! Authentication and authorization.
pub mod jwks;
pub mod jwt;
#[cfg(not(target_arch = "wasm32"))]
pub mod mint;
