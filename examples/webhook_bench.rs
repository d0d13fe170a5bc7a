//! Native cost of one webhook verification (headers + streamed body + finish with the replay
//! memory), at 1 KiB and 64 KiB bodies: `cargo run --release --example webhook_bench`.
//! The in-Envoy cost adds the wasm and host-call overhead measured by `make bench`.

use api_guard::config;
use api_guard::store::MemoryStore;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Instant;

const HMAC_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn main() {
    let seed = [7u8; 32];
    let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(seed));
    let b64 = base64::engine::general_purpose::STANDARD;
    let pk = format!("whpk_{}", b64.encode(*kp.pk));
    let doc = format!(
        r#"{{"default_route":{{}},"webhooks":{{
            "std":{{"scheme":"standard","secrets":["{HMAC_SECRET}"],"replay_capacity":65536}},
            "ed":{{"scheme":"standard","secrets":["{pk}"],"replay_capacity":65536}},
            "gh":{{"scheme":"github","secrets":["It's a Secret to Everybody"],"replay_capacity":65536}}}}}}"#
    );
    let (cfg, _) = config::parse(doc.as_bytes(), &|_| None).expect("bench config");
    let key = b64.decode(&HMAC_SECRET[6..]).unwrap();
    let now_s = 1_700_000_000u64;
    let ts = now_s.to_string();

    println!("scheme              body     µs/verification");
    for &size in &[1024usize, 64 * 1024] {
        let iters = if size > 4096 { 2_000 } else { 20_000 };
        let body: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();

        // Standard Webhooks, v1 (HMAC-SHA256). Distinct ids so none is a replay.
        let deliveries: Vec<(String, String)> = (0..iters)
            .map(|i| {
                let id = format!("msg_{i}");
                let mut m = Hmac::<Sha256>::new_from_slice(&key).unwrap();
                m.update(format!("{id}.{ts}.").as_bytes());
                m.update(&body);
                (id, format!("v1,{}", b64.encode(m.finalize().into_bytes())))
            })
            .collect();
        let w = cfg.webhooks.get("std").unwrap();
        let store = MemoryStore::new();
        cfg.webhooks.prepare(&store);
        let t = Instant::now();
        for (id, sig) in &deliveries {
            run(
                w,
                &[
                    ("webhook-id", id),
                    ("webhook-timestamp", &ts),
                    ("webhook-signature", sig),
                ],
                &body,
                now_s,
                &store,
            );
        }
        report("standard v1 (HMAC)", size, t, iters);

        // Standard Webhooks, v1a (Ed25519), streamed.
        let ed_iters = iters / 10;
        let deliveries: Vec<(String, String)> = (0..ed_iters)
            .map(|i| {
                let id = format!("msg_{i}");
                let mut msg = format!("{id}.{ts}.").into_bytes();
                msg.extend_from_slice(&body);
                (id, format!("v1a,{}", b64.encode(*kp.sk.sign(&msg, None))))
            })
            .collect();
        let w = cfg.webhooks.get("ed").unwrap();
        let t = Instant::now();
        for (id, sig) in &deliveries {
            run(
                w,
                &[
                    ("webhook-id", id),
                    ("webhook-timestamp", &ts),
                    ("webhook-signature", sig),
                ],
                &body,
                now_s,
                &store,
            );
        }
        report("standard v1a (Ed25519)", size, t, ed_iters);

        // GitHub: same body each time, so a fresh store per delivery keeps it from being a
        // replay (an empty in-memory map costs next to nothing).
        let mut m = Hmac::<Sha256>::new_from_slice(b"It's a Secret to Everybody").unwrap();
        m.update(&body);
        let sig = format!("sha256={}", hex::encode(m.finalize().into_bytes()));
        let w = cfg.webhooks.get("gh").unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            run(
                w,
                &[("x-hub-signature-256", &sig)],
                &body,
                now_s,
                &MemoryStore::new(),
            );
        }
        report("github", size, t, iters);
    }
}

fn run(
    w: &api_guard::webhook::Webhook,
    h: &[(&str, &String)],
    body: &[u8],
    now_s: u64,
    store: &MemoryStore,
) {
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut v = w.begin(&h, now_s * 1000).expect("headers");
    // Envoy hands the body over in chunks of up to 16 KiB or so.
    for c in body.chunks(16 * 1024) {
        v.update(c).expect("size");
    }
    v.finish(now_s * 1000, store).expect("valid delivery");
}

fn report(name: &str, size: usize, t: Instant, iters: usize) {
    let us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;
    println!("{name:<22} {:>3} KiB  {us:>8.1}", size / 1024);
}
