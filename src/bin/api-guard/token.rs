//! `api-guard token`: mint demo JWTs, and print the JWKS a filter config needs to accept them.

use api_guard::auth::mint::SigningKey;
use serde_json::{json, Map, Value};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

pub const USAGE: &str = "usage: api-guard token [options]
  --alg ALG        HS256 (default), HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512,
                   ES256, ES384 or EdDSA
  --key FILE       signing key as a private JWK: loaded if the file exists, else generated and
                   saved there (mode 0600); without it a fresh key is used and its JWKS printed
  --kid KID        key id for a generated key (default: demo)
  --jwks           print only the JWKS for local_jwks (public keys; the secret for HS*)
  --sub S          subject (default: demo-user)
  --iss I          issuer
  --aud A          audience (repeatable)
  --scope \"a b\"    space-delimited scopes
  --ttl SECONDS    lifetime (default: 3600)
  --claim K=V      any claim; V is parsed as JSON when it can be (repeatable)
Prints the token on stdout.";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("api-guard token: {msg}");
    ExitCode::from(2)
}

pub fn run(args: &[String]) -> ExitCode {
    let mut alg = None;
    let mut key_file = None;
    let mut kid = "demo".to_string();
    let mut jwks_only = false;
    let mut ttl: u64 = 3600;
    let mut claims = Map::new();
    claims.insert("sub".into(), "demo-user".into());
    let mut auds: Vec<Value> = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        let r: Result<(), String> = (|| {
            match flag.as_str() {
                "--alg" => alg = Some(value()?),
                "--key" => key_file = Some(value()?),
                "--kid" => kid = value()?,
                "--jwks" => jwks_only = true,
                "--sub" => {
                    claims.insert("sub".into(), value()?.into());
                }
                "--iss" => {
                    claims.insert("iss".into(), value()?.into());
                }
                "--aud" => auds.push(value()?.into()),
                "--scope" => {
                    claims.insert("scope".into(), value()?.into());
                }
                "--ttl" => {
                    ttl = value()?
                        .parse()
                        .map_err(|_| "--ttl needs a number of seconds".to_string())?
                }
                "--claim" => {
                    let kv = value()?;
                    let (k, v) = kv.split_once('=').ok_or("--claim needs NAME=VALUE")?;
                    let v = serde_json::from_str(v).unwrap_or_else(|_| Value::from(v));
                    claims.insert(k.to_string(), v);
                }
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown option {other}\n{USAGE}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            return fail(e);
        }
    }
    let saved = key_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok());
    let key = match &saved {
        Some(text) => {
            let jwk: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    return fail(format!(
                        "{} is not a JWK: {e}",
                        key_file.unwrap_or_default()
                    ))
                }
            };
            if let Some(a) = &alg {
                if jwk["alg"].as_str() != Some(a.as_str()) {
                    return fail(format!(
                        "the key in {} is for {}, not {a}",
                        key_file.unwrap_or_default(),
                        jwk["alg"]
                    ));
                }
            }
            match SigningKey::from_private_jwk(&jwk) {
                Ok(k) => k,
                Err(e) => return fail(e),
            }
        }
        None => {
            let a = alg.as_deref().unwrap_or("HS256");
            let k = match SigningKey::generate(a, &kid) {
                Ok(k) => k,
                Err(e) => return fail(e),
            };
            if let Some(f) = &key_file {
                if let Err(e) = save_private(f, &k.private_jwk()) {
                    return fail(format!("cannot write {f}: {e}"));
                }
                eprintln!("api-guard token: new {a} key saved to {f}");
            }
            k
        }
    };
    let jwks = json!({ "keys": [key.jwk()] });
    if jwks_only {
        println!("{jwks}");
        return ExitCode::SUCCESS;
    }
    match auds.len() {
        0 => {}
        1 => {
            claims.insert("aud".into(), auds.remove(0));
        }
        _ => {
            claims.insert("aud".into(), Value::Array(auds));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    claims.entry("iat").or_insert(now.into());
    claims
        .entry("exp")
        .or_insert(now.saturating_add(ttl).into());
    match key.sign(&claims) {
        Ok(t) => {
            println!("{t}");
            if key_file.is_none() {
                eprintln!("api-guard token: the key is not saved; JWKS for local_jwks:\n{jwks}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn save_private(path: &str, jwk: &Value) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    writeln!(f, "{jwk}")
}
