//! Webhook signature verification (SPEC section 4): GitHub, Stripe, Standard Webhooks, Slack.
//!
//! A delivery is verified in three steps so the glue never has to hold more than it must:
//! [`Webhook::begin`] parses the headers and runs the cheap checks (header present and
//! well-formed, timestamp within `tolerance_s` in both directions, declared length within
//! `max_body_bytes`); [`Verifier::update`] streams each body chunk into the MACs (and the
//! Ed25519 hashes) while counting bytes; [`Verifier::finish`] compares in constant time and
//! records the delivery in the replay memory shared by all workers.
//!
//! Ed25519 (`v1a`) needs no buffered body either: its verification hashes `R ‖ A ‖ message`
//! once, so `ed25519-compact`'s incremental verifier absorbs the body as it streams.
//!
//! Nothing here reads a clock or calls the host: time and the shared store come in as
//! arguments, so every case runs natively in unit tests.

mod github;
pub mod replay;
mod slack;
pub mod stage;
mod standard;
mod stripe;

use crate::config::{resolve_secret, ConfigError, EnvLookup, Warning, WebhookConfig};
use crate::store::SharedStore;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use replay::{Fingerprint, ReplayError, ReplayTable};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use subtle::{Choice, ConstantTimeEq};

type HmacSha256 = Hmac<Sha256>;

/// Most secrets/keys one webhook may list (rotation needs two or three).
pub const MAX_SECRETS: usize = 8;
/// Most entries a signature header may carry; honest senders send one per active secret.
pub const MAX_SIGNATURE_ENTRIES: usize = 16;
/// Most `v1` HMAC signatures considered per delivery.
pub const MAX_HMAC_SIGNATURES: usize = 8;
/// Most `v1a` Ed25519 signatures considered per delivery: each one costs a SHA-512 pass over
/// the body and a scalar multiplication per configured public key.
pub const MAX_ED25519_SIGNATURES: usize = 4;
/// Standard Webhooks keys SHOULD be 24 to 64 random bytes; shorter ones get a warning.
const MIN_STANDARD_KEY_BYTES: usize = 24;
const MAX_TOLERANCE_S: u64 = 86_400;
const MAX_BODY_LIMIT: usize = 64 * 1024 * 1024;
const MIN_REPLAY_CAPACITY: u32 = 64;
const MAX_REPLAY_CAPACITY: u32 = 1 << 20;

/// Which signature format a webhook entry checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Github,
    Stripe,
    Standard,
    Slack,
}

impl Scheme {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "github" => Some(Scheme::Github),
            "stripe" => Some(Scheme::Stripe),
            "standard" => Some(Scheme::Standard),
            "slack" => Some(Scheme::Slack),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Github => "github",
            Scheme::Stripe => "stripe",
            Scheme::Standard => "standard",
            Scheme::Slack => "slack",
        }
    }

    /// The request headers the scheme reads, in the order its parser expects them.
    fn headers(self) -> &'static [&'static str] {
        match self {
            Scheme::Github => &github::HEADERS,
            Scheme::Stripe => &stripe::HEADERS,
            Scheme::Standard => &standard::HEADERS,
            Scheme::Slack => &slack::HEADERS,
        }
    }
}

/// Why a delivery was refused. [`WebhookError::status`] and [`WebhookError::code`] give the
/// local reply (SPEC: 413 `payload_too_large`, otherwise 401 `invalid_signature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookError {
    MissingHeader(&'static str),
    MalformedHeader {
        header: &'static str,
        reason: &'static str,
    },
    TimestampTooOld {
        tolerance_s: u64,
    },
    TimestampInFuture {
        tolerance_s: u64,
    },
    PayloadTooLarge {
        limit: usize,
    },
    SignatureMismatch,
    Replayed,
    /// The replay memory could not be updated (heavy contention or a host error); the
    /// delivery is refused rather than accepted without replay protection.
    ReplayMemoryUnavailable,
}

impl WebhookError {
    pub fn status(&self) -> u16 {
        match self {
            WebhookError::PayloadTooLarge { .. } => 413,
            _ => 401,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            WebhookError::PayloadTooLarge { .. } => "payload_too_large",
            _ => "invalid_signature",
        }
    }

    /// A short stable name for logs and stats (`reason` in the denial log line).
    pub fn reason(&self) -> &'static str {
        match self {
            WebhookError::MissingHeader(_) => "webhook_missing_header",
            WebhookError::MalformedHeader { .. } => "webhook_malformed_header",
            WebhookError::TimestampTooOld { .. } => "webhook_timestamp_too_old",
            WebhookError::TimestampInFuture { .. } => "webhook_timestamp_in_future",
            WebhookError::PayloadTooLarge { .. } => "webhook_payload_too_large",
            WebhookError::SignatureMismatch => "webhook_signature_mismatch",
            WebhookError::Replayed => "webhook_replayed",
            WebhookError::ReplayMemoryUnavailable => "webhook_replay_memory_unavailable",
        }
    }
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WebhookError::MissingHeader(h) => write!(f, "the {h} header is missing or empty"),
            WebhookError::MalformedHeader { header, reason } => {
                write!(f, "the {header} header is malformed: {reason}")
            }
            WebhookError::TimestampTooOld { tolerance_s } => write!(
                f,
                "the signed timestamp is more than {tolerance_s} s old (check the sender's clock)"
            ),
            WebhookError::TimestampInFuture { tolerance_s } => write!(
                f,
                "the signed timestamp is more than {tolerance_s} s in the future (check the sender's clock)"
            ),
            WebhookError::PayloadTooLarge { limit } => {
                write!(f, "the body is larger than the webhook's limit of {limit} bytes")
            }
            WebhookError::SignatureMismatch => f.write_str(
                "no signature matches a configured secret (wrong secret, or the body or signed headers were changed)",
            ),
            WebhookError::Replayed => {
                f.write_str("this delivery was already accepted within the tolerance window")
            }
            WebhookError::ReplayMemoryUnavailable => {
                f.write_str("the replay memory is busy; retry the delivery")
            }
        }
    }
}

impl std::error::Error for WebhookError {}

/// One compiled `webhooks` entry.
#[derive(Clone)]
pub struct Webhook {
    name: Arc<str>,
    scheme: Scheme,
    /// Keyed HMAC states, cloned per delivery so the key schedule runs once, at configure.
    hmac_keys: Vec<HmacSha256>,
    ed25519_keys: Vec<ed25519_compact::PublicKey>,
    tolerance_s: u64,
    max_body_bytes: usize,
    replay: ReplayTable,
}

impl fmt::Debug for Webhook {
    // Secrets stay out of logs: only their count is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("scheme", &self.scheme)
            .field("hmac_keys", &self.hmac_keys.len())
            .field("ed25519_keys", &self.ed25519_keys.len())
            .field("tolerance_s", &self.tolerance_s)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("replay", &self.replay)
            .finish()
    }
}

/// All compiled `webhooks` entries, by name.
#[derive(Debug, Clone, Default)]
pub struct Webhooks {
    by_name: BTreeMap<String, Webhook>,
}

impl Webhooks {
    pub fn get(&self, name: &str) -> Option<&Webhook> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Creates every replay-memory slot in shared data. The glue calls this once in
    /// `on_configure`: creating a key is never atomic, so it must not happen per request.
    pub fn prepare(&self, store: &dyn SharedStore) {
        for w in self.by_name.values() {
            w.replay.prepare(store);
        }
    }
}

/// Validates and compiles the `webhooks` section; errors name the JSON path.
pub fn compile(
    raw: &BTreeMap<String, WebhookConfig>,
    env: EnvLookup<'_>,
) -> Result<(Webhooks, Vec<Warning>), ConfigError> {
    let mut by_name = BTreeMap::new();
    let mut warnings = Vec::new();
    for (name, cfg) in raw {
        let w = compile_one(name, cfg, env, &mut warnings)?;
        by_name.insert(name.clone(), w);
    }
    Ok((Webhooks { by_name }, warnings))
}

fn compile_one(
    name: &str,
    cfg: &WebhookConfig,
    env: EnvLookup<'_>,
    warnings: &mut Vec<Warning>,
) -> Result<Webhook, ConfigError> {
    let path = format!("webhooks.{name}");
    let scheme = Scheme::parse(&cfg.scheme).ok_or_else(|| {
        ConfigError::new(
            format!("{path}.scheme"),
            format!(
                "'{}' is not one of \"github\", \"stripe\", \"standard\", \"slack\"",
                cfg.scheme
            ),
        )
    })?;
    if cfg.secrets.is_empty() {
        return Err(ConfigError::new(
            format!("{path}.secrets"),
            "must list at least one secret",
        ));
    }
    if cfg.secrets.len() > MAX_SECRETS {
        return Err(ConfigError::new(
            format!("{path}.secrets"),
            format!("lists more than {MAX_SECRETS} secrets"),
        ));
    }
    let mut hmac_keys = Vec::new();
    let mut ed25519_keys = Vec::new();
    for (i, s) in cfg.secrets.iter().enumerate() {
        let sp = format!("{path}.secrets[{i}]");
        let secret = resolve_secret(s, &sp, env)?;
        if scheme == Scheme::Standard {
            match standard::parse_secret(&secret).map_err(|m| ConfigError::new(&sp, m))? {
                standard::Key::Hmac(key) => {
                    if key.len() < MIN_STANDARD_KEY_BYTES {
                        warnings.push(Warning {
                            path: sp.clone(),
                            message: format!(
                                "the key decodes to {} bytes; Standard Webhooks keys should be 24 to 64 random bytes",
                                key.len()
                            ),
                        });
                    }
                    hmac_keys.push(new_mac(&key, &sp)?);
                }
                standard::Key::Ed25519(pk) => ed25519_keys.push(pk),
            }
        } else {
            // GitHub, Slack and Stripe key the HMAC with the secret string itself
            // (Stripe's `whsec_` prefix included).
            hmac_keys.push(new_mac(secret.as_bytes(), &sp)?);
        }
    }
    if cfg.tolerance_s == 0 || cfg.tolerance_s > MAX_TOLERANCE_S {
        return Err(ConfigError::new(
            format!("{path}.tolerance_s"),
            format!("must be between 1 and {MAX_TOLERANCE_S} seconds"),
        ));
    }
    if cfg.max_body_bytes == 0 || cfg.max_body_bytes > MAX_BODY_LIMIT {
        return Err(ConfigError::new(
            format!("{path}.max_body_bytes"),
            format!("must be between 1 and {MAX_BODY_LIMIT} bytes"),
        ));
    }
    if !(MIN_REPLAY_CAPACITY..=MAX_REPLAY_CAPACITY).contains(&cfg.replay_capacity) {
        return Err(ConfigError::new(
            format!("{path}.replay_capacity"),
            format!("must be between {MIN_REPLAY_CAPACITY} and {MAX_REPLAY_CAPACITY}"),
        ));
    }
    Ok(Webhook {
        name: Arc::from(name),
        scheme,
        hmac_keys,
        ed25519_keys,
        tolerance_s: cfg.tolerance_s,
        max_body_bytes: cfg.max_body_bytes,
        replay: ReplayTable::new(name, cfg.replay_capacity),
    })
}

fn new_mac(key: &[u8], path: &str) -> Result<HmacSha256, ConfigError> {
    HmacSha256::new_from_slice(key).map_err(|_| ConfigError::new(path, "unusable HMAC key"))
}

/// What a scheme's header parser found; signature values are already strictly decoded.
pub(crate) struct Parsed<'h> {
    /// Unix seconds the sender signed, for schemes that sign one.
    timestamp: Option<u64>,
    /// Signed-content parts that precede the body (`"<t>."`, `"<id>.<ts>."`, `"v0:<ts>:"`).
    prefix: [&'h str; 4],
    hmac_sigs: Vec<[u8; 32]>,
    ed25519_sigs: Vec<[u8; 64]>,
    /// An identifier remembered for replay detection besides the MAC (`webhook-id`,
    /// `x-github-delivery`), with its tag.
    replay_id: Option<(u8, &'h str)>,
    /// Whether the MAC (under the first configured secret) identifies the delivery.
    replay_on_mac: bool,
}

/// Tags keeping fingerprints of different kinds apart.
const FP_MAC: u8 = b'm';
pub(crate) const FP_WEBHOOK_ID: u8 = b'i';
pub(crate) const FP_GITHUB_DELIVERY: u8 = b'd';

impl Webhook {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub fn tolerance_s(&self) -> u64 {
        self.tolerance_s
    }

    /// Parses the request headers and runs every check that needs no body. `headers` is the
    /// whole request header map as the host returns it (names lower-case); a signature
    /// header sent twice is refused rather than guessed at.
    pub fn begin<K: AsRef<str>, V: AsRef<str>>(
        &self,
        headers: &[(K, V)],
        now_ms: u64,
    ) -> Result<Verifier, WebhookError> {
        let names = self.scheme.headers();
        let mut found: [Option<&str>; 4] = [None; 4];
        let mut content_length: Option<&str> = None;
        for (k, v) in headers {
            let (k, v) = (k.as_ref(), v.as_ref());
            if k.eq_ignore_ascii_case("content-length") {
                content_length = Some(v);
                continue;
            }
            for (i, name) in names.iter().enumerate() {
                if k.eq_ignore_ascii_case(name) {
                    if found[i].is_some() {
                        return Err(WebhookError::MalformedHeader {
                            header: name,
                            reason: "sent more than once",
                        });
                    }
                    found[i] = Some(v);
                }
            }
        }
        // A declared length over the limit is refused before any body arrives.
        if let Some(len) = content_length.and_then(|v| v.trim().parse::<u64>().ok()) {
            if len > self.max_body_bytes as u64 {
                return Err(WebhookError::PayloadTooLarge {
                    limit: self.max_body_bytes,
                });
            }
        }
        let parsed = match self.scheme {
            Scheme::Github => github::parse(&found)?,
            Scheme::Stripe => stripe::parse(&found)?,
            Scheme::Standard => standard::parse(&found)?,
            Scheme::Slack => slack::parse(&found)?,
        };
        let now_s = now_ms / 1000;
        if let Some(ts) = parsed.timestamp {
            check_window(ts, now_s, self.tolerance_s)?;
        }

        // Only signature kinds this webhook has keys for are worth hashing the body for.
        let hmac_sigs = if self.hmac_keys.is_empty() {
            Vec::new()
        } else {
            parsed.hmac_sigs
        };
        let mut ed_states = Vec::new();
        for pk in &self.ed25519_keys {
            for sig in &parsed.ed25519_sigs {
                // A signature whose R or S is not canonical can never verify: skip it now.
                if let Ok(st) = pk.verify_incremental(&ed25519_compact::Signature::new(*sig)) {
                    ed_states.push(st);
                }
            }
        }
        if hmac_sigs.is_empty() && ed_states.is_empty() {
            return Err(WebhookError::SignatureMismatch);
        }
        let mut macs: Vec<HmacSha256> = if hmac_sigs.is_empty() {
            Vec::new()
        } else {
            self.hmac_keys.clone()
        };
        for part in parsed.prefix.iter().filter(|p| !p.is_empty()) {
            for m in &mut macs {
                m.update(part.as_bytes());
            }
            for st in &mut ed_states {
                st.absorb(part.as_bytes());
            }
        }
        let replay_id = parsed
            .replay_id
            .map(|(tag, id)| replay::fingerprint(tag, id.as_bytes()));
        Ok(Verifier {
            name: Arc::clone(&self.name),
            replay: self.replay.clone(),
            tolerance_s: self.tolerance_s,
            max_body_bytes: self.max_body_bytes,
            timestamp: parsed.timestamp,
            macs,
            hmac_sigs,
            ed_states,
            replay_id,
            replay_on_mac: parsed.replay_on_mac,
            body_len: 0,
        })
    }
}

/// Accepts a timestamp within `tolerance_s` of now, in both directions (bounds inclusive).
fn check_window(ts: u64, now_s: u64, tolerance_s: u64) -> Result<(), WebhookError> {
    if ts.saturating_add(tolerance_s) < now_s {
        Err(WebhookError::TimestampTooOld { tolerance_s })
    } else if ts > now_s.saturating_add(tolerance_s) {
        Err(WebhookError::TimestampInFuture { tolerance_s })
    } else {
        Ok(())
    }
}

/// The result of a successful verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The replay memory was full and forgot a live entry early to make room: raise the
    /// webhook's `replay_capacity` (the glue logs this).
    pub replay_evicted: bool,
}

/// An in-progress verification: feed the body with [`Verifier::update`], then call
/// [`Verifier::finish`]. Owns everything it needs, so the HTTP context can keep it.
pub struct Verifier {
    name: Arc<str>,
    replay: ReplayTable,
    tolerance_s: u64,
    max_body_bytes: usize,
    timestamp: Option<u64>,
    macs: Vec<HmacSha256>,
    hmac_sigs: Vec<[u8; 32]>,
    ed_states: Vec<ed25519_compact::VerifyingState>,
    replay_id: Option<Fingerprint>,
    replay_on_mac: bool,
    body_len: usize,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("name", &self.name)
            .field("timestamp", &self.timestamp)
            .field("macs", &self.macs.len())
            .field("ed_states", &self.ed_states.len())
            .field("body_len", &self.body_len)
            .finish()
    }
}

impl Verifier {
    /// The `webhooks` entry this verifies for.
    pub fn webhook_name(&self) -> &str {
        &self.name
    }

    /// Bytes of body seen so far.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// The most body bytes worth reading for the next [`Verifier::update`]: what is left
    /// under `max_body_bytes`, plus one so that an oversized body is seen to be one. The
    /// glue copies no more than this out of Envoy's buffer, whatever the client sent.
    pub fn read_limit(&self) -> usize {
        self.max_body_bytes
            .saturating_sub(self.body_len)
            .saturating_add(1)
    }

    /// Streams one body chunk. Fails with `PayloadTooLarge` as soon as the total would pass
    /// `max_body_bytes`; the chunk is then not hashed and the glue should reply 413.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), WebhookError> {
        let total = self
            .body_len
            .checked_add(chunk.len())
            .filter(|t| *t <= self.max_body_bytes)
            .ok_or(WebhookError::PayloadTooLarge {
                limit: self.max_body_bytes,
            })?;
        self.body_len = total;
        for m in &mut self.macs {
            m.update(chunk);
        }
        for st in &mut self.ed_states {
            st.absorb(chunk);
        }
        Ok(())
    }

    /// Completes the check once the whole body was streamed: the timestamp is checked again
    /// (a body trickled in slowly must not outlive the window), every signature is compared
    /// in constant time against every key, and a valid delivery is recorded in the replay
    /// memory. Forged deliveries never touch shared data.
    pub fn finish(self, now_ms: u64, store: &dyn SharedStore) -> Result<Verified, WebhookError> {
        let now_s = now_ms / 1000;
        if let Some(ts) = self.timestamp {
            check_window(ts, now_s, self.tolerance_s)?;
        }
        let (matched, first_mac) = compare_macs(self.macs, &self.hmac_sigs);
        // Which key matched is not secret; only the MAC comparisons must not leak.
        let ok = matched || self.ed_states.iter().any(|st| st.verify().is_ok());
        if !ok {
            return Err(WebhookError::SignatureMismatch);
        }

        // Remember the delivery until its timestamp leaves the window (GitHub signs none:
        // one window from now).
        let expires_s = self
            .timestamp
            .unwrap_or(now_s)
            .max(now_s)
            .saturating_add(self.tolerance_s);
        // The MAC under the first secret identifies the signed content whichever secret
        // matched, so dropping one of several rotated signatures does not dodge the memory.
        let mac_fp = if self.replay_on_mac {
            first_mac.map(|t| replay::fingerprint(FP_MAC, &t))
        } else {
            None
        };
        let mut evicted = false;
        for fp in [mac_fp, self.replay_id].into_iter().flatten() {
            match self.replay.check_and_record(store, &fp, expires_s, now_s) {
                Ok(r) => evicted |= r.evicted,
                Err(ReplayError::Replayed) => return Err(WebhookError::Replayed),
                Err(ReplayError::Unavailable) => return Err(WebhookError::ReplayMemoryUnavailable),
            }
        }
        Ok(Verified {
            replay_evicted: evicted,
        })
    }
}

/// Finalizes each MAC and compares it with every candidate signature, in constant time and
/// without stopping early. Returns whether any matched and the first key's MAC.
fn compare_macs(macs: Vec<HmacSha256>, sigs: &[[u8; 32]]) -> (bool, Option<[u8; 32]>) {
    let mut matched = Choice::from(0);
    let mut first: Option<[u8; 32]> = None;
    for mac in macs {
        let tag: [u8; 32] = mac.finalize().into_bytes().into();
        for sig in sigs {
            matched |= tag.ct_eq(sig);
        }
        first.get_or_insert(tag);
    }
    (bool::from(matched), first)
}

/// Parses a Unix timestamp strictly: 1 to 19 ASCII digits, nothing else (no sign, space or
/// fraction), so the signed text and the checked value cannot disagree.
pub(crate) fn parse_timestamp(header: &'static str, v: &str) -> Result<u64, WebhookError> {
    let bad = WebhookError::MalformedHeader {
        header,
        reason: "the timestamp is not a whole number of seconds",
    };
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    v.parse::<u64>().map_err(|_| bad)
}

/// Decodes exactly 64 hex digits (either case) into a 32-byte MAC.
pub(crate) fn decode_hex32(v: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if v.len() != 64 {
        return None;
    }
    hex::decode_to_slice(v, &mut out).ok()?;
    Some(out)
}

/// Decodes canonical padded standard base64 into exactly `N` bytes.
pub(crate) fn decode_b64<const N: usize>(v: &str) -> Option<[u8; N]> {
    // Padded base64 of N bytes is exactly this long; checking first bounds the work.
    if v.len() != N.div_ceil(3) * 4 {
        return None;
    }
    let mut buf = [0u8; 66];
    let n = base64::engine::general_purpose::STANDARD
        .decode_slice(v, &mut buf)
        .ok()?;
    buf.get(..n)?.try_into().ok()
}

/// Looks up the value a scheme parser asked for, treating an empty value as missing.
pub(crate) fn required<'h>(
    found: &[Option<&'h str>; 4],
    i: usize,
    name: &'static str,
) -> Result<&'h str, WebhookError> {
    match found.get(i).copied().flatten() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(WebhookError::MissingHeader(name)),
    }
}

#[cfg(test)]
pub(crate) mod tests;
