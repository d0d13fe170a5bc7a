//! `bench-tokens jwk KEY.der` prints the public JWK of a PKCS#8 RSA key;
//! `bench-tokens sign KEY.der COUNT ISS AUD EXP` prints COUNT distinct RS256 tokens, one per
//! line (distinct `jti`), signed on every core: the JWT cold-path runs need tens of thousands
//! of never-seen tokens, which `openssl` one process per token cannot mint in time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RsaPublicKeyComponents, RSA_PKCS1_SHA256};
use std::io::Write;
use std::process::ExitCode;

const KID: &str = "bench";

fn load(path: &str) -> Result<RsaKeyPair, String> {
    let der = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    RsaKeyPair::from_pkcs8(&der).map_err(|e| format!("{path} is not a PKCS#8 RSA key: {e}"))
}

fn token(
    kp: &RsaKeyPair,
    rng: &SystemRandom,
    iss: &str,
    aud: &str,
    exp: u64,
    i: usize,
) -> Result<String, String> {
    let header = format!(r#"{{"alg":"RS256","typ":"JWT","kid":"{KID}"}}"#);
    let claims = format!(
        r#"{{"iss":"{iss}","aud":"{aud}","sub":"bench-user-{}","exp":{exp},"jti":"{i}","scope":"read:orders","subscription_tier":"pro"}}"#,
        i % 100
    );
    let signing_input = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let mut sig = vec![0u8; kp.public().modulus_len()];
    kp.sign(&RSA_PKCS1_SHA256, rng, signing_input.as_bytes(), &mut sig)
        .map_err(|_| "signing failed".to_string())?;
    Ok(format!("{signing_input}.{}", B64.encode(sig)))
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, key] if cmd == "jwk" => {
            let kp = load(key)?;
            let c: RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
            println!(
                r#"{{"kty":"RSA","alg":"RS256","use":"sig","kid":"{KID}","n":"{}","e":"{}"}}"#,
                B64.encode(&c.n),
                B64.encode(&c.e)
            );
            Ok(())
        }
        [cmd, key, count, iss, aud, exp] if cmd == "sign" => {
            let kp = load(key)?;
            let count: usize = count.parse().map_err(|_| "COUNT must be a number")?;
            let exp: u64 = exp.parse().map_err(|_| "EXP must be Unix seconds")?;
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let chunks: Vec<Result<Vec<String>, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let kp = &kp;
                        s.spawn(move || {
                            let rng = SystemRandom::new();
                            (t..count)
                                .step_by(threads)
                                .map(|i| token(kp, &rng, iss, aud, exp, i))
                                .collect::<Result<Vec<_>, _>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("a signing thread panicked".into()))
                    })
                    .collect()
            });
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for chunk in chunks {
                for t in chunk? {
                    writeln!(out, "{t}").map_err(|e| e.to_string())?;
                }
            }
            out.flush().map_err(|e| e.to_string())
        }
        _ => Err(
            "usage: bench-tokens jwk KEY.der | bench-tokens sign KEY.der COUNT ISS AUD EXP".into(),
        ),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-tokens: {e}");
            ExitCode::FAILURE
        }
    }
}
