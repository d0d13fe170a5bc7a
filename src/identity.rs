//! Who is calling: the verified identity that credentials produce and policies consume.

/// How the caller authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// A JWT from the named provider.
    Jwt(String),
    /// An API key from `api_keys`.
    ApiKey,
}

/// A verified caller. Built only from verified credentials; never from unverified claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub method: AuthMethod,
    /// JWT `sub` (or the API key's `id`).
    pub subject: String,
    /// Client identity (SPEC: API key -> key `id`; JWT -> `sub`).
    pub client: String,
    /// API key `tier`, else the JWT `tier_claim`, else `authenticated`.
    pub tier: String,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    /// (upstream header, value) pairs from the provider's `forward_claims`.
    pub forwarded: Vec<(String, String)>,
    /// Claims a rate-limit key may name (`claim:<name>`), as strings.
    pub claims: Vec<(String, String)>,
    /// Whether to drop `authorization` before forwarding (`keep_authorization: false`).
    pub strip_authorization: bool,
}

/// Tier name of a request with no verified identity.
pub const ANONYMOUS_TIER: &str = "anonymous";
/// Tier of an authenticated client whose credential names none.
pub const AUTHENTICATED_TIER: &str = "authenticated";
