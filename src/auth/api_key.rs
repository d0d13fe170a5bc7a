//! API keys: the config holds only SHA-256 hashes; a presented key is hashed and compared
//! against every configured hash in constant time.

use crate::config::{ApiKeysConfig, ConfigError};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// Keys longer than this are refused without hashing (no real key is this long).
pub const MAX_KEY_BYTES: usize = 4096;

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub tier: Option<String>,
    pub scopes: Vec<String>,
    hash: [u8; 32],
}

/// The compiled `api_keys` section.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    /// Lower-case header the key is read from.
    pub header: String,
    keys: Vec<ApiKey>,
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Characters a tier or scope may use: they end up in headers and rate-limit keys.
pub(crate) fn is_token_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic())
}

impl ApiKeys {
    pub fn compile(cfg: &ApiKeysConfig) -> Result<ApiKeys, ConfigError> {
        let mut keys: Vec<ApiKey> = Vec::with_capacity(cfg.keys.len());
        for (i, k) in cfg.keys.iter().enumerate() {
            let path = format!("api_keys.keys[{i}]");
            if !is_token_text(&k.id) {
                return Err(ConfigError::new(
                    format!("{path}.id"),
                    "must be 1-256 visible ASCII characters (it becomes the client identity)",
                ));
            }
            if keys.iter().any(|o| o.id == k.id) {
                return Err(ConfigError::new(
                    format!("{path}.id"),
                    format!("id '{}' is used twice", k.id),
                ));
            }
            let hash = decode_hex32(&k.sha256).ok_or_else(|| {
                ConfigError::new(
                    format!("{path}.sha256"),
                    "must be the 64-digit hex SHA-256 of the key (e.g. `printf %s KEY | sha256sum`)",
                )
            })?;
            if keys.iter().any(|o| o.hash == hash) {
                return Err(ConfigError::new(
                    format!("{path}.sha256"),
                    "the same key hash is listed twice",
                ));
            }
            if let Some(t) = &k.tier {
                if !is_token_text(t) {
                    return Err(ConfigError::new(
                        format!("{path}.tier"),
                        "must be 1-256 visible ASCII characters",
                    ));
                }
            }
            for (j, s) in k.scopes.iter().enumerate() {
                if !is_token_text(s) {
                    return Err(ConfigError::new(
                        format!("{path}.scopes[{j}]"),
                        "a scope is 1-256 visible ASCII characters without spaces",
                    ));
                }
            }
            keys.push(ApiKey {
                id: k.id.clone(),
                tier: k.tier.clone(),
                scopes: k.scopes.clone(),
                hash,
            });
        }
        Ok(ApiKeys {
            header: cfg.header.clone(),
            keys,
        })
    }

    /// The configured key `presented` hashes to. Every configured hash is compared, in
    /// constant time, whatever matches, so timing says nothing about which keys exist.
    pub fn lookup(&self, presented: &str) -> Option<&ApiKey> {
        if presented.is_empty() || presented.len() > MAX_KEY_BYTES {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, k) in self.keys.iter().enumerate() {
            let hit = k.hash.ct_eq(&digest);
            index.conditional_assign(&(i as u32), hit);
            found |= hit;
        }
        if bool::from(found) {
            self.keys.get(index as usize)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    fn sha_hex(s: &str) -> String {
        Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn cfg(keys: Vec<(&str, String)>) -> ApiKeysConfig {
        ApiKeysConfig {
            header: "x-api-key".into(),
            keys: keys
                .into_iter()
                .map(|(id, sha256)| ApiKeyConfig {
                    id: id.into(),
                    sha256,
                    tier: Some("pro".into()),
                    scopes: vec!["read:orders".into()],
                })
                .collect(),
            forward: false,
        }
    }

    #[test]
    fn presented_keys_match_by_hash() {
        let keys = ApiKeys::compile(&cfg(vec![
            ("acme", sha_hex("acme-secret")),
            ("beta", sha_hex("beta-secret").to_uppercase()),
        ]))
        .unwrap();
        assert_eq!(
            keys.lookup("acme-secret").map(|k| k.id.as_str()),
            Some("acme")
        );
        assert_eq!(
            keys.lookup("beta-secret").map(|k| k.id.as_str()),
            Some("beta")
        );
        assert!(keys.lookup("acme-secreT").is_none());
        assert!(keys.lookup("").is_none());
        assert!(
            keys.lookup(&sha_hex("acme-secret")).is_none(),
            "the hash is not the key"
        );
        assert!(keys.lookup(&"x".repeat(MAX_KEY_BYTES + 1)).is_none());
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = ApiKeys::compile(&cfg(vec![("a", "abc".into())])).unwrap_err();
        assert_eq!(e.path, "api_keys.keys[0].sha256");
        let e = ApiKeys::compile(&cfg(vec![("a", "g".repeat(64))])).unwrap_err();
        assert_eq!(e.path, "api_keys.keys[0].sha256");
        let e = ApiKeys::compile(&cfg(vec![("a", sha_hex("x")), ("a", sha_hex("y"))])).unwrap_err();
        assert_eq!(e.path, "api_keys.keys[1].id");
        let e = ApiKeys::compile(&cfg(vec![("a", sha_hex("x")), ("b", sha_hex("x"))])).unwrap_err();
        assert_eq!(e.path, "api_keys.keys[1].sha256");
        let e = ApiKeys::compile(&cfg(vec![("has space", sha_hex("x"))])).unwrap_err();
        assert_eq!(e.path, "api_keys.keys[0].id");
    }
}
