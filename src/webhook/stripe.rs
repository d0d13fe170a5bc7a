//! Stripe: `stripe-signature: t=<unix>,v1=<hex>[,v1=<hex>...]`, each `v1` an
//! HMAC-SHA256 of `"<t>.<body>"` keyed with the whole secret string (`whsec_` included).
//! Stripe sends one `v1` per active secret while a secret is being rolled; other schemes
//! (`v0`, test-mode extras) are ignored as Stripe's own libraries do.

use super::{
    decode_hex32, parse_timestamp, required, Parsed, WebhookError, MAX_HMAC_SIGNATURES,
    MAX_SIGNATURE_ENTRIES,
};

pub(super) const HEADERS: [&str; 1] = ["stripe-signature"];
const SIGNATURE: &str = HEADERS[0];

fn malformed(reason: &'static str) -> WebhookError {
    WebhookError::MalformedHeader {
        header: SIGNATURE,
        reason,
    }
}

pub(super) fn parse<'h>(found: &[Option<&'h str>; 4]) -> Result<Parsed<'h>, WebhookError> {
    let v = required(found, 0, SIGNATURE)?;
    let mut t_text: Option<&str> = None;
    let mut sigs = Vec::new();
    for (n, item) in v.split(',').enumerate() {
        if n >= MAX_SIGNATURE_ENTRIES {
            return Err(malformed("too many entries"));
        }
        let (key, value) = item
            .split_once('=')
            .ok_or(malformed("every entry must be key=value"))?;
        match key {
            "t" if t_text.is_some() => return Err(malformed("more than one t= timestamp")),
            "t" => t_text = Some(value),
            "v1" => {
                // A garbled v1 cannot match; a valid one beside it still may.
                if let Some(sig) = decode_hex32(value) {
                    if sigs.len() >= MAX_HMAC_SIGNATURES {
                        return Err(malformed("too many v1 signatures"));
                    }
                    sigs.push(sig);
                }
            }
            _ => {}
        }
    }
    let t_text = t_text.ok_or(malformed("no t= timestamp"))?;
    let timestamp = parse_timestamp(SIGNATURE, t_text)?;
    if sigs.is_empty() {
        return Err(malformed("no v1=<64 hex digits> signature"));
    }
    Ok(Parsed {
        timestamp: Some(timestamp),
        prefix: [t_text, ".", "", ""],
        hmac_sigs: sigs,
        ed25519_sigs: Vec::new(),
        replay_id: None,
        replay_on_mac: true,
    })
}
