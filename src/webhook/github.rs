//! GitHub: `x-hub-signature-256: sha256=<hex HMAC-SHA256(secret, body)>`.
//!
//! GitHub signs no timestamp, so replays are caught by memory alone: the body MAC (which an
//! attacker cannot change) and, when present, the `x-github-delivery` GUID (unsigned, but
//! GitHub's redeliveries reuse it), each remembered for `tolerance_s`.

use super::{decode_hex32, required, Parsed, WebhookError, FP_GITHUB_DELIVERY};

pub(super) const HEADERS: [&str; 2] = ["x-hub-signature-256", "x-github-delivery"];
const SIGNATURE: &str = HEADERS[0];

pub(super) fn parse<'h>(found: &[Option<&'h str>; 4]) -> Result<Parsed<'h>, WebhookError> {
    let v = required(found, 0, SIGNATURE)?;
    let hex = v
        .strip_prefix("sha256=")
        .ok_or(WebhookError::MalformedHeader {
            header: SIGNATURE,
            reason: "expected sha256=<64 hex digits>",
        })?;
    let sig = decode_hex32(hex).ok_or(WebhookError::MalformedHeader {
        header: SIGNATURE,
        reason: "expected sha256=<64 hex digits>",
    })?;
    let delivery = found[1].filter(|d| !d.is_empty());
    Ok(Parsed {
        timestamp: None,
        prefix: [""; 4],
        hmac_sigs: vec![sig],
        ed25519_sigs: Vec::new(),
        replay_id: delivery.map(|d| (FP_GITHUB_DELIVERY, d)),
        replay_on_mac: true,
    })
}
