//! Standard Webhooks: `webhook-id`, `webhook-timestamp` and a space-separated
//! `webhook-signature` list of `v1,<base64 HMAC-SHA256>` and `v1a,<base64 Ed25519>` entries
//! over `"<id>.<timestamp>.<body>"`. Secrets are `whsec_<base64 key>` (HMAC, the decoded
//! bytes are the key) or `whpk_<base64 32-byte public key>` (Ed25519). Unknown versions are
//! skipped, as the reference libraries do. The `webhook-id` is signed, so it identifies the
//! delivery for replay detection.

use super::{
    decode_b64, parse_timestamp, required, Parsed, WebhookError, FP_WEBHOOK_ID,
    MAX_ED25519_SIGNATURES, MAX_HMAC_SIGNATURES, MAX_SIGNATURE_ENTRIES,
};
use base64::Engine as _;

pub(super) const HEADERS: [&str; 3] = ["webhook-id", "webhook-timestamp", "webhook-signature"];
const ID: &str = HEADERS[0];
const TIMESTAMP: &str = HEADERS[1];
const SIGNATURE: &str = HEADERS[2];
/// Longest `webhook-id` accepted; real ids are ~30 characters.
const MAX_ID_BYTES: usize = 256;

/// A configured Standard Webhooks key.
pub(super) enum Key {
    Hmac(Vec<u8>),
    Ed25519(ed25519_compact::PublicKey),
}

/// Decodes a configured secret; the error text is shown with the secret's JSON path.
pub(super) fn parse_secret(secret: &str) -> Result<Key, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64_nopad = base64::engine::general_purpose::STANDARD_NO_PAD;
    if let Some(rest) = secret.strip_prefix("whsec_") {
        let key = b64
            .decode(rest)
            .or_else(|_| b64_nopad.decode(rest))
            .map_err(|_| "the part after whsec_ is not valid base64".to_string())?;
        if key.is_empty() {
            return Err("the key after whsec_ is empty".into());
        }
        Ok(Key::Hmac(key))
    } else if let Some(rest) = secret.strip_prefix("whpk_") {
        let raw = b64
            .decode(rest)
            .or_else(|_| b64_nopad.decode(rest))
            .map_err(|_| "the part after whpk_ is not valid base64".to_string())?;
        let pk = ed25519_compact::PublicKey::from_slice(&raw).map_err(|_| {
            format!(
                "an Ed25519 public key is 32 bytes, this one is {}",
                raw.len()
            )
        })?;
        pk.validate().map_err(|_| {
            "not a valid Ed25519 public key (not canonical, or a weak point)".to_string()
        })?;
        Ok(Key::Ed25519(pk))
    } else if secret.starts_with("whsk_") {
        Err(
            "this is an Ed25519 signing (private) key: configure its public key (whpk_...) instead"
                .into(),
        )
    } else {
        Err("must start with whsec_ (HMAC key) or whpk_ (Ed25519 public key)".into())
    }
}

pub(super) fn parse<'h>(found: &[Option<&'h str>; 4]) -> Result<Parsed<'h>, WebhookError> {
    let id = required(found, 0, ID)?;
    let ts_text = required(found, 1, TIMESTAMP)?;
    let sig_text = required(found, 2, SIGNATURE)?;
    if id.len() > MAX_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(WebhookError::MalformedHeader {
            header: ID,
            reason: "expected up to 256 visible ASCII characters",
        });
    }
    let timestamp = parse_timestamp(TIMESTAMP, ts_text)?;
    let mut hmac_sigs = Vec::new();
    let mut ed25519_sigs = Vec::new();
    let too_many = WebhookError::MalformedHeader {
        header: SIGNATURE,
        reason: "too many signatures",
    };
    for (n, entry) in sig_text.split(' ').filter(|e| !e.is_empty()).enumerate() {
        if n >= MAX_SIGNATURE_ENTRIES {
            return Err(too_many);
        }
        // Garbled entries and unknown versions cannot match; valid ones beside them may.
        match entry.split_once(',') {
            Some(("v1", b64)) => {
                if let Some(sig) = decode_b64::<32>(b64) {
                    if hmac_sigs.len() >= MAX_HMAC_SIGNATURES {
                        return Err(too_many);
                    }
                    hmac_sigs.push(sig);
                }
            }
            Some(("v1a", b64)) => {
                if let Some(sig) = decode_b64::<64>(b64) {
                    if ed25519_sigs.len() >= MAX_ED25519_SIGNATURES {
                        return Err(too_many);
                    }
                    ed25519_sigs.push(sig);
                }
            }
            _ => {}
        }
    }
    if hmac_sigs.is_empty() && ed25519_sigs.is_empty() {
        return Err(WebhookError::MalformedHeader {
            header: SIGNATURE,
            reason: "no well-formed v1,<base64> or v1a,<base64> signature",
        });
    }
    Ok(Parsed {
        timestamp: Some(timestamp),
        prefix: [id, ".", ts_text, "."],
        hmac_sigs,
        ed25519_sigs,
        replay_id: Some((FP_WEBHOOK_ID, id)),
        replay_on_mac: false,
    })
}
