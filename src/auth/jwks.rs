//! JSON Web Key Sets: parsing JWKS documents into verification keys, and the signature
//! primitives those keys run.
//!
//! Parsing is strict. A key states (or implies, by its type) which algorithms it may verify,
//! and a key only ever verifies those: an RSA public key is never used as an HMAC secret (the
//! classic RS256 -> HS256 confusion), a P-256 key never verifies ES384, and so on.
//! `local_jwks` come from the operator, so any problem is a config error naming the key.
//! `remote_jwks` come from an identity provider that may publish keys we cannot use (encryption
//! keys, other curves); those are skipped and reported, the rest are kept.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};
use std::fmt;

/// Largest number of keys a set may hold: bounds memory and the work a token without `kid`
/// can cause.
pub const MAX_KEYS: usize = 64;
/// A token without `kid` is tried against at most this many keys of its algorithm.
pub const MAX_KEYS_TRIED: usize = 8;
/// RSA moduli below this size are rejected (RFC 7518 section 3.3).
pub const MIN_RSA_BITS: usize = 2048;
/// RSA moduli above this size are rejected: verification cost grows with the square of it.
pub const MAX_RSA_BITS: usize = 8192;

/// A JWS algorithm this verifier implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alg {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Alg {
    pub const ALL: [Alg; 12] = [
        Alg::HS256,
        Alg::HS384,
        Alg::HS512,
        Alg::RS256,
        Alg::RS384,
        Alg::RS512,
        Alg::PS256,
        Alg::PS384,
        Alg::PS512,
        Alg::ES256,
        Alg::ES384,
        Alg::EdDSA,
    ];

    /// Parses a JOSE `alg` name. Case-sensitive, as RFC 7515 requires: `rs256` is not `RS256`.
    pub fn parse(name: &str) -> Option<Alg> {
        Alg::ALL.iter().copied().find(|a| a.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::HS256 => "HS256",
            Alg::HS384 => "HS384",
            Alg::HS512 => "HS512",
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
        }
    }

    /// The JWK `kty` a key for this algorithm has.
    pub fn kty(self) -> &'static str {
        match self {
            Alg::HS256 | Alg::HS384 | Alg::HS512 => "oct",
            Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => "RSA",
            Alg::ES256 | Alg::ES384 => "EC",
            Alg::EdDSA => "OKP",
        }
    }

    /// Smallest HMAC key: as long as the hash output (RFC 7518 section 3.2).
    fn min_hmac_len(self) -> usize {
        match self {
            Alg::HS384 => 48,
            Alg::HS512 => 64,
            _ => 32,
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of algorithms, as a bit mask (cheap to copy and test on the request path).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct AlgSet(u16);

impl AlgSet {
    pub const EMPTY: AlgSet = AlgSet(0);

    pub fn of(algs: &[Alg]) -> AlgSet {
        let mut s = AlgSet::EMPTY;
        for a in algs {
            s.insert(*a);
        }
        s
    }
    pub fn insert(&mut self, a: Alg) {
        self.0 |= a.bit();
    }
    pub fn contains(self, a: Alg) -> bool {
        self.0 & a.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn intersect(self, o: AlgSet) -> AlgSet {
        AlgSet(self.0 & o.0)
    }
    pub fn iter(self) -> impl Iterator<Item = Alg> {
        Alg::ALL.into_iter().filter(move |a| self.contains(*a))
    }
    /// `RS256, ES256` for messages.
    pub fn names(self) -> String {
        self.iter().map(Alg::name).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Debug for AlgSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.names())
    }
}

/// The public part of a key (or the secret of an HMAC key).
#[derive(Clone)]
enum Material {
    Hmac(Vec<u8>),
    Rsa(Box<RsaKey>),
    P256(EcKey<p256::ecdsa::VerifyingKey>),
    P384(Box<p384::ecdsa::VerifyingKey>),
    Ed25519(ed25519_compact::PublicKey),
}

/// A P-256 public key, validated at parse time (a point on the curve): in wasm the RustCrypto
/// key, natively its SEC1 bytes for `ring` ([`ring_verify`]).
#[cfg(target_arch = "wasm32")]
type EcKey<K> = Box<K>;
#[cfg(not(target_arch = "wasm32"))]
type EcKey<K> = (Vec<u8>, std::marker::PhantomData<K>);

#[cfg(target_arch = "wasm32")]
fn ec_key<K>(k: K, _sec1: Vec<u8>) -> EcKey<K> {
    Box::new(k)
}
#[cfg(not(target_arch = "wasm32"))]
fn ec_key<K>(_k: K, sec1: Vec<u8>) -> EcKey<K> {
    (sec1, std::marker::PhantomData)
}

/// An RSA public key as `ring` takes it: big-endian modulus and exponent without leading
/// zeros, checked at parse time against everything `ring` checks at verification time (so a
/// key that loads is a key that verifies).
#[derive(Clone)]
struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

/// One verification key and the algorithms it may verify.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    pub algs: AlgSet,
    material: Material,
}

impl fmt::Debug for Key {
    // Never prints key material: an HMAC key is a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.material {
            Material::Hmac(_) => "oct",
            Material::Rsa(_) => "RSA",
            Material::P256(..) => "EC P-256",
            Material::P384(..) => "EC P-384",
            Material::Ed25519(_) => "OKP Ed25519",
        };
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("kty", &kind)
            .field("algs", &self.algs)
            .finish()
    }
}

impl Key {
    /// Checks `signature` over `signing_input` with `alg`. False for any algorithm this key is
    /// not for, so a caller cannot be talked into key confusion.
    pub fn verify(&self, alg: Alg, signing_input: &[u8], signature: &[u8]) -> bool {
        if !self.algs.contains(alg) {
            return false;
        }
        match (&self.material, alg) {
            (Material::Hmac(k), _) => hmac_verify(alg, k, signing_input, signature),
            (Material::Rsa(k), _) => rsa_verify(k, alg, signing_input, signature),
            #[cfg(not(target_arch = "wasm32"))]
            (Material::P256((sec1, _)), Alg::ES256) => ring_verify(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                sec1,
                signing_input,
                signature,
            ),
            #[cfg(target_arch = "wasm32")]
            (Material::P256(k), Alg::ES256) => {
                use p256::ecdsa::signature::Verifier as _;
                // `from_slice` takes exactly r||s (64 bytes) and rejects r or s of 0 or >= n:
                // the "psychic signature" (r = s = 0) never reaches the arithmetic.
                match p256::ecdsa::Signature::from_slice(signature) {
                    Ok(sig) => k.verify(signing_input, &sig).is_ok(),
                    Err(_) => false,
                }
            }
            (Material::P384(k), Alg::ES384) => {
                use p384::ecdsa::signature::Verifier as _;
                match p384::ecdsa::Signature::from_slice(signature) {
                    Ok(sig) => k.verify(signing_input, &sig).is_ok(),
                    Err(_) => false,
                }
            }
            (Material::Ed25519(k), Alg::EdDSA) => {
                match ed25519_compact::Signature::from_slice(signature) {
                    Ok(sig) => k.verify(signing_input, &sig).is_ok(),
                    Err(_) => false,
                }
            }
            _ => false,
        }
    }
}

/// ES256 (fixed-width r||s, r and s checked in range) with `ring` natively (the dynamic
/// module and the CLI): its P-256 assembly verifies about 3x faster than RustCrypto's
/// portable code (measured natively: about 95 µs against 280 µs). Not P-384 (`ring` has no
/// fast path there and measured slower: 870 µs against 700 µs) nor Ed25519 (no measurable
/// difference), and not in wasm, where `ring` has no assembly.
#[cfg(not(target_arch = "wasm32"))]
fn ring_verify(
    alg: &'static dyn ring::signature::VerificationAlgorithm,
    key: &[u8],
    data: &[u8],
    sig: &[u8],
) -> bool {
    ring::signature::UnparsedPublicKey::new(alg, key)
        .verify(data, sig)
        .is_ok()
}

/// Constant-time HMAC check; the tag must be full length (no truncated tags).
fn hmac_verify(alg: Alg, key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    macro_rules! check {
        ($d:ty) => {
            match <Hmac<$d> as Mac>::new_from_slice(key) {
                Ok(mut mac) => {
                    mac.update(data);
                    mac.verify_slice(tag).is_ok()
                }
                Err(_) => false,
            }
        };
    }
    match alg {
        Alg::HS256 => check!(Sha256),
        Alg::HS384 => check!(Sha384),
        Alg::HS512 => check!(Sha512),
        _ => false,
    }
}

/// RSASSA-PKCS1-v1_5 and RSASSA-PSS (salt length = hash length, RFC 7518 section 3.5) with
/// `ring`: in wasm about 2x faster than the pure-Rust `rsa` crate (measured in Envoy: cold
/// RS256 about 0.34 ms per request instead of 0.68 ms).
/// `ring` also requires the signature to be exactly as long as the modulus.
fn rsa_verify(key: &RsaKey, alg: Alg, data: &[u8], sig: &[u8]) -> bool {
    use ring::signature as rs;
    let params: &rs::RsaParameters = match alg {
        Alg::RS256 => &rs::RSA_PKCS1_2048_8192_SHA256,
        Alg::RS384 => &rs::RSA_PKCS1_2048_8192_SHA384,
        Alg::RS512 => &rs::RSA_PKCS1_2048_8192_SHA512,
        Alg::PS256 => &rs::RSA_PSS_2048_8192_SHA256,
        Alg::PS384 => &rs::RSA_PSS_2048_8192_SHA384,
        Alg::PS512 => &rs::RSA_PSS_2048_8192_SHA512,
        _ => return false,
    };
    rs::RsaPublicKeyComponents {
        n: key.n.as_slice(),
        e: key.e.as_slice(),
    }
    .verify(params, data, sig)
    .is_ok()
}

/// Smallest and largest public exponent `ring` verifies with.
const RSA_MIN_EXPONENT: u64 = 3;
const RSA_MAX_EXPONENT: u64 = (1 << 33) - 1;

/// Validates an RSA public key (JWK `n`, `e`, big-endian) as `ring` will use it.
fn rsa_key(n: &[u8], e: &[u8]) -> Result<RsaKey, String> {
    let strip = |b: &[u8]| -> Vec<u8> {
        let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[first..].to_vec()
    };
    let (n, e) = (strip(n), strip(e));
    let bits = match n.first() {
        Some(top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "RSA modulus is {bits} bits; at least {MIN_RSA_BITS} are required"
        ));
    }
    if bits > MAX_RSA_BITS {
        return Err(format!(
            "RSA modulus is {bits} bits; at most {MAX_RSA_BITS} are supported"
        ));
    }
    if n.last().is_some_and(|b| b & 1 == 0) {
        return Err("not a valid RSA public key: the modulus is even".into());
    }
    if e.len() > 8 {
        return Err("RSA exponent is too large".into());
    }
    let value = e.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b));
    if !(RSA_MIN_EXPONENT..=RSA_MAX_EXPONENT).contains(&value) || value & 1 == 0 {
        return Err(format!(
            "not a valid RSA public key: the exponent must be odd and between {RSA_MIN_EXPONENT} and 2^33-1"
        ));
    }
    Ok(RsaKey { n, e })
}

/// Why a key set could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksError {
    /// Index in `keys` of the offending key, when one is at fault.
    pub index: Option<usize>,
    pub message: String,
}

impl JwksError {
    fn doc(message: impl Into<String>) -> Self {
        Self {
            index: None,
            message: message.into(),
        }
    }
    /// The JSON path below the JWKS document (`keys[2]`), for config errors.
    pub fn path(&self) -> String {
        match self.index {
            Some(i) => format!("keys[{i}]"),
            None => String::new(),
        }
    }
}

impl fmt::Display for JwksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "JWKS keys[{i}]: {}", self.message),
            None => write!(f, "JWKS: {}", self.message),
        }
    }
}

impl std::error::Error for JwksError {}

/// Where a JWKS comes from, which decides what happens to a key we cannot use.
pub enum Source<'a> {
    /// `local_jwks` in the config: every problem is an error. `k` of an HMAC key may be
    /// `{"env": "NAME"}`, looked up with this function.
    Local(&'a dyn Fn(&str) -> Option<String>),
    /// A fetched document: unusable keys are skipped (and reported), malformed JSON is an error.
    Remote,
}

/// What `parse` produced: the keys, and a note for each key that was skipped (remote only).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub keys: KeySet,
    pub skipped: Vec<String>,
}

/// The keys of one provider, with a fingerprint of the document they came from (part of the
/// verified-token cache key, so a key rotation never reuses an old verdict).
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
    fingerprint: [u8; 16],
}

/// Why no key could be chosen for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectError {
    /// The token names a `kid` that no key has (and no key without `kid` takes the alg).
    UnknownKid,
    /// No key takes the token's `alg` (with the token's `kid`, when it has one).
    NoKeyForAlg,
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    pub fn fingerprint(&self) -> &[u8; 16] {
        &self.fingerprint
    }
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The keys to try for a token. As in Envoy's jwt_verify_lib: with a `kid`, keys with that
    /// exact `kid`, plus keys that have none; without one, every key; in both cases only keys
    /// whose algorithms include `alg`.
    pub fn select<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Alg,
    ) -> Result<impl Iterator<Item = &'a Key> + 'a, SelectError> {
        let kid_ok = move |k: &Key| match (kid, k.kid.as_deref()) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        };
        if !self.keys.iter().any(kid_ok) {
            return Err(SelectError::UnknownKid);
        }
        if !self.keys.iter().any(|k| kid_ok(k) && k.algs.contains(alg)) {
            return Err(SelectError::NoKeyForAlg);
        }
        Ok(self
            .keys
            .iter()
            .filter(move |k| kid_ok(k) && k.algs.contains(alg))
            .take(MAX_KEYS_TRIED))
    }
}

/// Decodes base64url strictly: no padding, no whitespace, and canonical (the unused low bits
/// of the last character must be zero, so one value has exactly one encoding).
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// Parses a JWKS document (`{"keys": [...]}`) into the keys usable with `allowed`.
pub fn parse(doc: &Value, allowed: AlgSet, source: Source<'_>) -> Result<Parsed, JwksError> {
    let obj = doc
        .as_object()
        .ok_or_else(|| JwksError::doc("must be a JSON object with a \"keys\" array"))?;
    let list = obj
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::doc("must have a \"keys\" array"))?;
    if list.len() > MAX_KEYS {
        return Err(JwksError::doc(format!(
            "has {} keys; at most {MAX_KEYS} are accepted",
            list.len()
        )));
    }
    let local = matches!(source, Source::Local(_));
    let mut keys: Vec<Key> = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    for (i, k) in list.iter().enumerate() {
        match parse_key(k, allowed, &source) {
            Ok(key) => {
                if local {
                    if let Some(kid) = &key.kid {
                        if keys.iter().any(|o| o.kid.as_ref() == Some(kid)) {
                            return Err(JwksError {
                                index: Some(i),
                                message: format!("kid '{kid}' is used by an earlier key"),
                            });
                        }
                    }
                }
                keys.push(key);
            }
            Err(message) => {
                if local {
                    return Err(JwksError {
                        index: Some(i),
                        message,
                    });
                }
                skipped.push(format!("keys[{i}]: {message}"));
            }
        }
    }
    if keys.is_empty() && !list.is_empty() {
        return Err(JwksError::doc(format!(
            "none of its {} keys is usable ({})",
            list.len(),
            skipped.join("; ")
        )));
    }
    // serde_json's Map is ordered, so equal documents hash equally whatever their whitespace.
    let canonical = serde_json::to_vec(doc).unwrap_or_default();
    let digest = Sha256::digest(&canonical);
    let mut fingerprint = [0u8; 16];
    fingerprint.copy_from_slice(&digest[..16]);
    Ok(Parsed {
        keys: KeySet { keys, fingerprint },
        skipped,
    })
}

fn str_member<'a>(o: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match o.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("\"{name}\" must be a string")),
    }
}

fn b64_member(o: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let s = str_member(o, name)?.ok_or_else(|| format!("\"{name}\" is missing"))?;
    b64url_decode(s).ok_or_else(|| format!("\"{name}\" is not canonical unpadded base64url"))
}

const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "oth"];

fn parse_key(v: &Value, allowed: AlgSet, source: &Source<'_>) -> Result<Key, String> {
    let o = v.as_object().ok_or("must be a JSON object")?;
    let kty = str_member(o, "kty")?.ok_or("\"kty\" is missing")?;
    let kid = str_member(o, "kid")?.map(str::to_string);
    if let Some(u) = str_member(o, "use")? {
        if u != "sig" {
            return Err(format!(
                "\"use\" is \"{u}\"; only signature keys (\"sig\") verify tokens"
            ));
        }
    }
    if let Some(ops) = o.get("key_ops") {
        let ops = ops.as_array().ok_or("\"key_ops\" must be an array")?;
        if !ops.iter().any(|op| op.as_str() == Some("verify")) {
            return Err("\"key_ops\" does not include \"verify\"".into());
        }
    }
    let declared = match str_member(o, "alg")? {
        None => None,
        Some(name) => match Alg::parse(name) {
            Some(a) if a.kty() == kty => Some(a),
            Some(a) => {
                return Err(format!(
                    "\"alg\" {a} needs kty \"{}\", not \"{kty}\"",
                    a.kty()
                ))
            }
            None => return Err(format!("\"alg\" \"{name}\" is not supported")),
        },
    };
    if kty != "oct" {
        if let Some(m) = PRIVATE_MEMBERS.iter().find(|m| o.contains_key(**m)) {
            return Err(format!(
                "has private key member \"{m}\"; a JWKS must hold public keys only"
            ));
        }
    }
    // The algorithms this key's type can do, before the provider's allow-list and `alg`.
    let (material, possible) = match kty {
        "oct" => {
            let secret = match (o.get("k"), source) {
                (Some(Value::Object(_)), Source::Local(env)) => {
                    let name = o
                        .get("k")
                        .and_then(|k| k.get("env"))
                        .and_then(Value::as_str)
                        .ok_or("\"k\" must be base64url or {\"env\": \"NAME\"}")?;
                    let val = env(name).ok_or_else(|| {
                        format!("environment variable {name} (for \"k\") is not set")
                    })?;
                    b64url_decode(val.trim()).ok_or_else(|| {
                        format!("environment variable {name} is not canonical unpadded base64url")
                    })?
                }
                _ => b64_member(o, "k")?,
            };
            if secret.len() < 32 {
                return Err(format!(
                    "HMAC key is {} bytes; at least 32 are required",
                    secret.len()
                ));
            }
            let mut possible = AlgSet::EMPTY;
            for a in [Alg::HS256, Alg::HS384, Alg::HS512] {
                if secret.len() >= a.min_hmac_len() {
                    possible.insert(a);
                }
            }
            if let Some(a) = declared {
                if !possible.contains(a) {
                    return Err(format!(
                        "HMAC key is {} bytes; {a} needs at least {}",
                        secret.len(),
                        a.min_hmac_len()
                    ));
                }
            }
            (Material::Hmac(secret), possible)
        }
        "RSA" => {
            let n = b64_member(o, "n")?;
            let e = b64_member(o, "e")?;
            let key = rsa_key(&n, &e)?;
            let possible = AlgSet::of(&[
                Alg::RS256,
                Alg::RS384,
                Alg::RS512,
                Alg::PS256,
                Alg::PS384,
                Alg::PS512,
            ]);
            (Material::Rsa(Box::new(key)), possible)
        }
        "EC" => {
            let crv = str_member(o, "crv")?.ok_or("\"crv\" is missing")?;
            let x = b64_member(o, "x")?;
            let y = b64_member(o, "y")?;
            let width = match crv {
                "P-256" => 32,
                "P-384" => 48,
                other => return Err(format!("curve \"{other}\" is not supported (P-256, P-384)")),
            };
            if x.len() != width || y.len() != width {
                return Err(format!("\"x\" and \"y\" must be {width} bytes for {crv}"));
            }
            let mut sec1 = Vec::with_capacity(1 + 2 * width);
            sec1.push(0x04);
            sec1.extend_from_slice(&x);
            sec1.extend_from_slice(&y);
            if crv == "P-256" {
                let k = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map_err(|_| "not a point on P-256".to_string())?;
                (Material::P256(ec_key(k, sec1)), AlgSet::of(&[Alg::ES256]))
            } else {
                let k = p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map_err(|_| "not a point on P-384".to_string())?;
                (Material::P384(Box::new(k)), AlgSet::of(&[Alg::ES384]))
            }
        }
        "OKP" => {
            let crv = str_member(o, "crv")?.ok_or("\"crv\" is missing")?;
            if crv != "Ed25519" {
                return Err(format!("curve \"{crv}\" is not supported (Ed25519)"));
            }
            let x = b64_member(o, "x")?;
            let k = ed25519_compact::PublicKey::from_slice(&x)
                .map_err(|_| "\"x\" is not a 32-byte Ed25519 public key".to_string())?;
            (Material::Ed25519(k), AlgSet::of(&[Alg::EdDSA]))
        }
        other => return Err(format!("kty \"{other}\" is not supported")),
    };
    let algs = match declared {
        Some(a) if !allowed.contains(a) => {
            return Err(format!(
                "\"alg\" {a} is not in the provider's algorithms ({})",
                allowed.names()
            ))
        }
        Some(a) => AlgSet::of(&[a]),
        None => possible.intersect(allowed),
    };
    if algs.is_empty() {
        return Err(format!(
            "a {kty} key fits none of the provider's algorithms ({})",
            allowed.names()
        ));
    }
    Ok(Key {
        kid,
        algs,
        material,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn all() -> AlgSet {
        AlgSet::of(&Alg::ALL)
    }

    fn local(doc: Value) -> Result<Parsed, JwksError> {
        parse(&doc, all(), Source::Local(&no_env))
    }

    const K32: &str = "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr8"; // 32 bytes

    #[test]
    fn alg_names_are_case_sensitive_and_none_is_not_one() {
        assert_eq!(Alg::parse("RS256"), Some(Alg::RS256));
        assert_eq!(Alg::parse("rs256"), None);
        assert_eq!(Alg::parse("EdDSA"), Some(Alg::EdDSA));
        for n in ["none", "None", "NONE", "nOnE", "", "ES512", "Ed25519"] {
            assert_eq!(Alg::parse(n), None, "{n}");
        }
    }

    #[test]
    fn short_hmac_keys_are_rejected() {
        let e = local(json!({"keys": [{"kty": "oct", "k": "c2hvcnQ"}]})).unwrap_err();
        assert_eq!(e.index, Some(0));
        assert!(e.message.contains("at least 32"), "{e}");
        // 32 bytes is enough for HS256 but not for an HS512 declaration.
        let e = local(json!({"keys": [{"kty": "oct", "k": K32, "alg": "HS512"}]})).unwrap_err();
        assert!(e.message.contains("HS512 needs at least 64"), "{e}");
        let p = local(json!({"keys": [{"kty": "oct", "k": K32}]})).unwrap();
        assert_eq!(p.keys.keys()[0].algs, AlgSet::of(&[Alg::HS256]));
    }

    #[test]
    fn hmac_key_may_come_from_the_environment() {
        let env = |n: &str| (n == "HS_KEY").then(|| K32.to_string());
        let doc = json!({"keys": [{"kty": "oct", "k": {"env": "HS_KEY"}}]});
        let p = parse(&doc, all(), Source::Local(&env)).unwrap();
        assert_eq!(p.keys.len(), 1);
        let e = local(doc.clone()).unwrap_err();
        assert!(e.message.contains("HS_KEY"), "{e}");
        // Remote documents never read the environment.
        assert!(parse(&doc, all(), Source::Remote).is_err());
    }

    #[test]
    fn strict_base64url_in_key_material() {
        // Padding, standard-alphabet characters and non-canonical trailing bits all fail.
        for k in [
            format!("{K32}="),
            K32.replace('-', "+"),
            "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr9".to_string(),
        ] {
            let e = local(json!({"keys": [{"kty": "oct", "k": k}]})).unwrap_err();
            assert!(e.message.contains("base64url"), "{k}: {e}");
        }
    }

    #[test]
    fn key_type_and_alg_must_agree() {
        let e = local(json!({"keys": [{"kty": "oct", "k": K32, "alg": "RS256"}]})).unwrap_err();
        assert!(e.message.contains("needs kty \"RSA\""), "{e}");
        let e = local(json!({"keys": [{"kty": "oct", "k": K32, "alg": "none"}]})).unwrap_err();
        assert!(e.message.contains("not supported"), "{e}");
    }

    #[test]
    fn allow_list_limits_what_a_key_verifies() {
        let doc = json!({"keys": [{"kty": "oct", "k": K32}]});
        let e = parse(&doc, AlgSet::of(&[Alg::RS256]), Source::Local(&no_env)).unwrap_err();
        assert!(e.message.contains("fits none"), "{e}");
        // Remote: skipped, and a set with nothing usable is an error (keep the last good one).
        let e = parse(&doc, AlgSet::of(&[Alg::RS256]), Source::Remote).unwrap_err();
        assert!(e.message.contains("none of its 1 keys"), "{e}");
    }

    #[test]
    fn remote_sets_skip_keys_they_cannot_use() {
        let doc = json!({"keys": [
            {"kty": "oct", "k": K32, "kid": "a"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA", "kid": "b"},
            {"kty": "oct", "k": K32, "use": "enc", "kid": "c"},
            {"kty": "oct", "k": K32, "alg": "HS256", "kid": "d"}
        ]});
        let p = parse(&doc, all(), Source::Remote).unwrap();
        assert_eq!(p.keys.len(), 2);
        assert_eq!(p.skipped.len(), 2, "{:?}", p.skipped);
        assert!(local(doc).is_err());
    }

    #[test]
    fn private_members_are_refused() {
        let e = local(json!({"keys": [{"kty": "EC", "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
            "d": "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}]}))
        .unwrap_err();
        assert!(e.message.contains("private"), "{e}");
    }

    #[test]
    fn ec_points_must_be_on_the_curve() {
        let e = local(json!({"keys": [{"kty": "EC", "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a4"}]}))
        .unwrap_err();
        assert!(e.message.contains("not a point"), "{e}");
    }

    #[test]
    fn small_rsa_keys_are_rejected() {
        // A 1024-bit modulus (all 0xff bytes is not a real key, but the size check comes first).
        let n = URL_SAFE_NO_PAD.encode([0xffu8; 128]);
        let e = local(json!({"keys": [{"kty": "RSA", "n": n, "e": "AQAB"}]})).unwrap_err();
        assert!(e.message.contains("1024 bits"), "{e}");
    }

    #[test]
    fn rsa_keys_are_checked_as_ring_will_use_them() {
        use crate::auth::mint::SigningKey;
        let key = SigningKey::generate("RS256", "k").unwrap();
        let jwk = key.jwk();
        let b64 = |s: &Value| URL_SAFE_NO_PAD.decode(s.as_str().unwrap()).unwrap();
        let (n, e) = (b64(&jwk["n"]), b64(&jwk["e"]));
        let with = |n: &[u8], e: &[u8]| {
            local(json!({"keys": [{"kty": "RSA", "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e)}]}))
        };
        // Leading zero bytes (some IdPs publish them) are dropped, and the key still verifies.
        let padded: Vec<u8> = [0u8, 0].iter().chain(&n).copied().collect();
        let ks = with(&padded, &[0, 1, 0, 1]).unwrap().keys;
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), "u".into());
        let token = key.sign(&claims).unwrap();
        let (si, sig) = token.rsplit_once('.').unwrap();
        let sig = b64url_decode(sig).unwrap();
        assert!(ks.keys()[0].verify(Alg::RS256, si.as_bytes(), &sig));
        assert!(!ks.keys()[0].verify(Alg::RS256, b"other", &sig));
        // Even, too small and too large exponents; an even modulus; an oversized modulus.
        for bad_e in [&[2u8][..], &[1], &[0], &[], &[2, 0, 0, 0, 1]] {
            let err = with(&n, bad_e).unwrap_err();
            assert!(err.message.contains("exponent"), "{bad_e:?}: {err}");
        }
        let mut even = n.clone();
        if let Some(last) = even.last_mut() {
            *last &= 0xfe;
        }
        assert!(with(&even, &e).unwrap_err().message.contains("even"));
        let huge = [0xffu8; 1025];
        assert!(with(&huge, &e).unwrap_err().message.contains("8200 bits"));
    }

    #[test]
    fn duplicate_kids_in_local_sets_are_errors() {
        let e = local(json!({"keys": [
            {"kty": "oct", "k": K32, "kid": "a"}, {"kty": "oct", "k": K32, "kid": "a"}]}))
        .unwrap_err();
        assert_eq!(e.index, Some(1));
    }

    #[test]
    fn document_shape_and_size_are_bounded() {
        assert!(local(json!([])).is_err());
        assert!(local(json!({"keys": {}})).is_err());
        let many: Vec<Value> = (0..=MAX_KEYS)
            .map(|i| json!({"kty": "oct", "k": K32, "kid": i.to_string()}))
            .collect();
        let e = local(json!({ "keys": many })).unwrap_err();
        assert!(e.message.contains("at most"), "{e}");
    }

    #[test]
    fn selection_by_kid_and_alg() {
        let p = local(json!({"keys": [
            {"kty": "oct", "k": K32, "kid": "a"},
            {"kty": "oct", "k": K32, "kid": "b", "alg": "HS256"}
        ]}))
        .unwrap();
        let ks = &p.keys;
        assert_eq!(ks.select(Some("a"), Alg::HS256).unwrap().count(), 1);
        assert_eq!(ks.select(None, Alg::HS256).unwrap().count(), 2);
        assert_eq!(
            ks.select(Some("zz"), Alg::HS256).err(),
            Some(SelectError::UnknownKid)
        );
        assert_eq!(
            ks.select(Some("a"), Alg::RS256).err(),
            Some(SelectError::NoKeyForAlg)
        );
        // Fingerprints follow the document, not its formatting.
        let again = local(serde_json::from_str(
            r#"{ "keys": [ {"kid":"a","kty":"oct","k":"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr8"},
                 {"kty":"oct","k":"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr8","kid":"b","alg":"HS256"} ] }"#,
        ).unwrap())
        .unwrap();
        assert_eq!(again.keys.fingerprint(), ks.fingerprint());
        let other = local(json!({"keys": [{"kty": "oct", "k": K32, "kid": "a"}]})).unwrap();
        assert_ne!(other.keys.fingerprint(), ks.fingerprint());
    }

    #[test]
    fn a_key_never_verifies_an_algorithm_it_is_not_for() {
        let p = local(json!({"keys": [{"kty": "oct", "k": K32, "alg": "HS256"}]})).unwrap();
        let key = &p.keys.keys()[0];
        let mut mac = <Hmac<Sha384> as Mac>::new_from_slice(&b64url_decode(K32).unwrap()).unwrap();
        mac.update(b"x");
        let tag = mac.finalize().into_bytes();
        assert!(!key.verify(Alg::HS384, b"x", &tag));
    }
}
