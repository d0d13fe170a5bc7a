//! Local replies: the SPEC's JSON error body and the denial reasons behind them.

use serde_json::Value;

/// Every reason the filter answers a request itself (SPEC section 3, error table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidRequest,
    MissingCredentials,
    InvalidToken,
    InvalidApiKey,
    InvalidSignature,
    InsufficientScope,
    CorsRejected,
    PayloadTooLarge,
    RateLimitExceeded,
    QuotaExceeded,
    QuotaUnavailable,
    /// A request body's content type outside the route's `content_types`.
    UnsupportedMediaType,
    /// The route's `backend_ceiling` is reached.
    BackendOverloaded,
    /// The filter failed on this request (a panic caught by the native module's guard).
    InternalError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::InvalidRequest,
        ErrorCode::MissingCredentials,
        ErrorCode::InvalidToken,
        ErrorCode::InvalidApiKey,
        ErrorCode::InvalidSignature,
        ErrorCode::InsufficientScope,
        ErrorCode::CorsRejected,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RateLimitExceeded,
        ErrorCode::QuotaExceeded,
        ErrorCode::QuotaUnavailable,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::BackendOverloaded,
        ErrorCode::InternalError,
    ];

    /// The `error` field of the body, also the stats and log reason.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MissingCredentials => "missing_credentials",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::InsufficientScope => "insufficient_scope",
            ErrorCode::CorsRejected => "cors_rejected",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimitExceeded => "rate_limit_exceeded",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::QuotaUnavailable => "quota_unavailable",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::BackendOverloaded => "backend_overloaded",
            ErrorCode::InternalError => "internal_error",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::MissingCredentials
            | ErrorCode::InvalidToken
            | ErrorCode::InvalidApiKey
            | ErrorCode::InvalidSignature => 401,
            ErrorCode::InsufficientScope | ErrorCode::CorsRejected => 403,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimitExceeded => 429,
            ErrorCode::QuotaExceeded => 402,
            ErrorCode::QuotaUnavailable | ErrorCode::BackendOverloaded => 503,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::InternalError => 500,
        }
    }

    pub fn index(self) -> usize {
        ErrorCode::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// A response the filter sends instead of forwarding.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    pub code: ErrorCode,
    /// Normally `code.status()`; a quota service answer may choose 402 or 429 itself.
    pub status: u32,
    pub message: String,
    /// Extra body fields (`retry_after`, `reset_at`, ...).
    pub fields: Vec<(&'static str, Value)>,
    /// Extra response headers (`www-authenticate`, `retry-after`, ...).
    pub headers: Vec<(String, String)>,
    /// The policy that denied (limit name, provider, webhook ...), for the deny log.
    pub policy: Option<String>,
    /// The bucket key that denied (rate limits), for the deny log; never sent to the client.
    pub key: Option<String>,
}

impl LocalReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.status(),
            message: message.into(),
            fields: Vec::new(),
            headers: Vec::new(),
            policy: None,
            key: None,
        }
    }

    pub fn with_field(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        self.fields.push((name, value.into()));
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_policy(mut self, policy: impl Into<String>) -> Self {
        self.policy = Some(policy.into());
        self
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// `{"error": ..., "message": ..., <fields>}`
    pub fn body(&self) -> Vec<u8> {
        let mut map = serde_json::Map::with_capacity(2 + self.fields.len());
        map.insert("error".into(), Value::from(self.code.as_str()));
        map.insert("message".into(), Value::from(self.message.as_str()));
        for (k, v) in &self.fields {
            map.insert((*k).into(), v.clone());
        }
        serde_json::to_vec(&Value::Object(map)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_error_message_and_fields() {
        let r =
            LocalReply::new(ErrorCode::RateLimitExceeded, "slow down").with_field("retry_after", 3);
        let v: Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"], "rate_limit_exceeded");
        assert_eq!(v["message"], "slow down");
        assert_eq!(v["retry_after"], 3);
        assert_eq!(r.status, 429);
    }

    #[test]
    fn codes_are_distinct_and_indexed() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        assert_eq!(ErrorCode::QuotaExceeded.status(), 402);
        assert_eq!(ErrorCode::QuotaUnavailable.status(), 503);
    }
}
