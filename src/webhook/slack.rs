//! Slack: `x-slack-request-timestamp: <unix>` and
//! `x-slack-signature: v0=<hex HMAC-SHA256(signing secret, "v0:<ts>:<body>")>`.

use super::{decode_hex32, parse_timestamp, required, Parsed, WebhookError};

pub(super) const HEADERS: [&str; 2] = ["x-slack-request-timestamp", "x-slack-signature"];
const TIMESTAMP: &str = HEADERS[0];
const SIGNATURE: &str = HEADERS[1];

pub(super) fn parse<'h>(found: &[Option<&'h str>; 4]) -> Result<Parsed<'h>, WebhookError> {
    let ts_text = required(found, 0, TIMESTAMP)?;
    let sig_text = required(found, 1, SIGNATURE)?;
    let timestamp = parse_timestamp(TIMESTAMP, ts_text)?;
    let sig = sig_text.strip_prefix("v0=").and_then(decode_hex32).ok_or(
        WebhookError::MalformedHeader {
            header: SIGNATURE,
            reason: "expected v0=<64 hex digits>",
        },
    )?;
    Ok(Parsed {
        timestamp: Some(timestamp),
        prefix: ["v0:", ts_text, ":", ""],
        hmac_sigs: vec![sig],
        ed25519_sigs: Vec::new(),
        replay_id: None,
        replay_on_mac: true,
    })
}
