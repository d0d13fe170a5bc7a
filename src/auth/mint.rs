//! Minting demo tokens (native only): `api-guard token` and the tests use it.
//!
//! Signing goes through jwt-simple, an implementation independent of this crate's verifier,
//! so a test token that verifies shows two implementations agree, not one agreeing with itself.

use jwt_simple::prelude::*;
use serde_json::{Map, Value};
use std::fmt;

/// A signing key and the `kid` it publishes.
pub enum SigningKey {
    HS256(HS256Key),
    HS384(HS384Key),
    HS512(HS512Key),
    RS256(RS256KeyPair),
    RS384(RS384KeyPair),
    RS512(RS512KeyPair),
    PS256(PS256KeyPair),
    PS384(PS384KeyPair),
    PS512(PS512KeyPair),
    ES256(ES256KeyPair),
    ES384(ES384KeyPair),
    EdDSA(Ed25519KeyPair),
}

/// Why a key could not be made or a token not signed.
#[derive(Debug)]
pub struct MintError(pub String);

impl fmt::Display for MintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MintError {}

fn err(e: impl fmt::Display) -> MintError {
    MintError(e.to_string())
}

impl SigningKey {
    /// A fresh key for `alg` (RSA: 2048 bits), published under `kid`.
    pub fn generate(alg: &str, kid: &str) -> Result<SigningKey, MintError> {
        Ok(match alg {
            // As long as the hash output (RFC 7518 3.2), which the verifier enforces.
            "HS256" => SigningKey::HS256(HS256Key::from_bytes(&random(32)?).with_key_id(kid)),
            "HS384" => SigningKey::HS384(HS384Key::from_bytes(&random(48)?).with_key_id(kid)),
            "HS512" => SigningKey::HS512(HS512Key::from_bytes(&random(64)?).with_key_id(kid)),
            "RS256" => {
                SigningKey::RS256(RS256KeyPair::generate(2048).map_err(err)?.with_key_id(kid))
            }
            "RS384" => {
                SigningKey::RS384(RS384KeyPair::generate(2048).map_err(err)?.with_key_id(kid))
            }
            "RS512" => {
                SigningKey::RS512(RS512KeyPair::generate(2048).map_err(err)?.with_key_id(kid))
            }
            "PS256" => {
                SigningKey::PS256(PS256KeyPair::generate(2048).map_err(err)?.with_key_id(kid))
            }
            "PS384" => {
                SigningKey::PS384(PS384KeyPair::generate(2048).map_err(err)?.with_key_id(kid))
            }
            "PS512" => {
                SigningKey::PS512(PS512KeyPair::generate(2048).map_err(err)?.with_key_id(kid))
            }
            "ES256" => SigningKey::ES256(ES256KeyPair::generate().with_key_id(kid)),
            "ES384" => SigningKey::ES384(ES384KeyPair::generate().with_key_id(kid)),
            "EdDSA" => SigningKey::EdDSA(Ed25519KeyPair::generate().with_key_id(kid)),
            other => return Err(MintError(format!("unsupported algorithm '{other}'"))),
        })
    }

    /// An RSA key from a private JWK (tests use a fixed one: RSA key generation is slow).
    pub fn rsa_from_jwk(
        alg: &str,
        private_jwk: &Value,
        kid: &str,
    ) -> Result<SigningKey, MintError> {
        // jwt-simple binds a JWK to one algorithm; drop `alg`/`use`/`kid` so one key serves all.
        let mut jwk = private_jwk.as_object().cloned().unwrap_or_default();
        for m in ["alg", "use", "kid", "key_ops"] {
            jwk.remove(m);
        }
        let text = Value::Object(jwk).to_string();
        Ok(match alg {
            "RS256" => {
                SigningKey::RS256(RS256KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            "RS384" => {
                SigningKey::RS384(RS384KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            "RS512" => {
                SigningKey::RS512(RS512KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            "PS256" => {
                SigningKey::PS256(PS256KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            "PS384" => {
                SigningKey::PS384(PS384KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            "PS512" => {
                SigningKey::PS512(PS512KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            other => return Err(MintError(format!("'{other}' is not an RSA algorithm"))),
        })
    }

    /// The whole key (private part included) as a JWK, to save and reload with
    /// [`SigningKey::from_private_jwk`].
    pub fn private_jwk(&self) -> Value {
        let text = match self {
            SigningKey::HS256(_) | SigningKey::HS384(_) | SigningKey::HS512(_) => {
                return self.jwk()
            }
            SigningKey::RS256(k) => k.to_jwk(),
            SigningKey::RS384(k) => k.to_jwk(),
            SigningKey::RS512(k) => k.to_jwk(),
            SigningKey::PS256(k) => k.to_jwk(),
            SigningKey::PS384(k) => k.to_jwk(),
            SigningKey::PS512(k) => k.to_jwk(),
            SigningKey::ES256(k) => k.to_jwk(),
            SigningKey::ES384(k) => k.to_jwk(),
            SigningKey::EdDSA(k) => k.to_jwk(),
        };
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Loads a key saved with [`SigningKey::private_jwk`]; its `alg` and `kid` come along.
    pub fn from_private_jwk(jwk: &Value) -> Result<SigningKey, MintError> {
        let alg = jwk["alg"]
            .as_str()
            .ok_or_else(|| MintError("the key file has no \"alg\"".into()))?;
        let kid = jwk["kid"].as_str().unwrap_or("demo");
        let text = jwk.to_string();
        let oct = || {
            jwk["k"]
                .as_str()
                .and_then(super::jwks::b64url_decode)
                .ok_or_else(|| MintError("the key file has no valid \"k\"".into()))
        };
        Ok(match alg {
            "HS256" => SigningKey::HS256(HS256Key::from_bytes(&oct()?).with_key_id(kid)),
            "HS384" => SigningKey::HS384(HS384Key::from_bytes(&oct()?).with_key_id(kid)),
            "HS512" => SigningKey::HS512(HS512Key::from_bytes(&oct()?).with_key_id(kid)),
            "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" => {
                return SigningKey::rsa_from_jwk(alg, jwk, kid)
            }
            "ES256" => {
                SigningKey::ES256(ES256KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            "ES384" => {
                SigningKey::ES384(ES384KeyPair::from_jwk(&text).map_err(err)?.with_key_id(kid))
            }
            "EdDSA" => SigningKey::EdDSA(
                Ed25519KeyPair::from_jwk(&text)
                    .map_err(err)?
                    .with_key_id(kid),
            ),
            other => return Err(MintError(format!("unsupported algorithm '{other}'"))),
        })
    }

    /// The key as a JWKS entry: the public key, or for HMAC the secret (`kty: oct`).
    pub fn jwk(&self) -> Value {
        let text = match self {
            SigningKey::HS256(k) => return oct_jwk("HS256", &k.to_bytes(), k.key_id().as_deref()),
            SigningKey::HS384(k) => return oct_jwk("HS384", &k.to_bytes(), k.key_id().as_deref()),
            SigningKey::HS512(k) => return oct_jwk("HS512", &k.to_bytes(), k.key_id().as_deref()),
            SigningKey::RS256(k) => k.public_key().to_jwk(),
            SigningKey::RS384(k) => k.public_key().to_jwk(),
            SigningKey::RS512(k) => k.public_key().to_jwk(),
            SigningKey::PS256(k) => k.public_key().to_jwk(),
            SigningKey::PS384(k) => k.public_key().to_jwk(),
            SigningKey::PS512(k) => k.public_key().to_jwk(),
            SigningKey::ES256(k) => k.public_key().to_jwk(),
            SigningKey::ES384(k) => k.public_key().to_jwk(),
            SigningKey::EdDSA(k) => k.public_key().to_jwk(),
        };
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Signs exactly `claims` (no claim is added or changed).
    pub fn sign(&self, claims: &Map<String, Value>) -> Result<String, MintError> {
        let mut c = Claims::with_custom_claims(claims.clone(), Duration::from_secs(0));
        c.issued_at = None;
        c.expires_at = None;
        c.invalid_before = None;
        match self {
            SigningKey::HS256(k) => k.authenticate(c),
            SigningKey::HS384(k) => k.authenticate(c),
            SigningKey::HS512(k) => k.authenticate(c),
            SigningKey::RS256(k) => k.sign(c),
            SigningKey::RS384(k) => k.sign(c),
            SigningKey::RS512(k) => k.sign(c),
            SigningKey::PS256(k) => k.sign(c),
            SigningKey::PS384(k) => k.sign(c),
            SigningKey::PS512(k) => k.sign(c),
            SigningKey::ES256(k) => k.sign(c),
            SigningKey::ES384(k) => k.sign(c),
            SigningKey::EdDSA(k) => k.sign(c),
        }
        .map_err(err)
    }
}

fn random(len: usize) -> Result<Vec<u8>, MintError> {
    let mut b = vec![0u8; len];
    getrandom::getrandom(&mut b).map_err(err)?;
    Ok(b)
}

fn oct_jwk(alg: &str, secret: &[u8], kid: Option<&str>) -> Value {
    use base64::Engine as _;
    let mut m = Map::new();
    m.insert("kty".into(), "oct".into());
    m.insert("alg".into(), alg.into());
    m.insert(
        "k".into(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(secret)
            .into(),
    );
    if let Some(kid) = kid {
        m.insert("kid".into(), kid.into());
    }
    Value::Object(m)
}
