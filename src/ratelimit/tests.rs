//! Decision-level tests: several limits, stages, tiers, shadow, races between workers.

use super::*;
use crate::config::{RawConfig, Warning};
use crate::identity::AuthMethod;
use crate::store::{MemoryStore, StoreError};
use std::cell::{Cell, RefCell};

const T0: u64 = 1_700_000_000_000;

fn limiter(json: &str) -> RateLimiter {
    let raw: RawConfig = serde_json::from_str(json).unwrap();
    let mut w: Vec<Warning> = Vec::new();
    RateLimiter::compile(&raw, &mut w).unwrap()
}

fn ident(client: &str, tier: &str) -> Identity {
    Identity {
        method: AuthMethod::ApiKey,
        subject: client.into(),
        client: client.into(),
        tier: tier.into(),
        scopes: vec![],
        roles: vec![],
        forwarded: vec![],
        claims: vec![("tenant".into(), "t1".into())],
        strip_authorization: false,
    }
}

fn keys<'a>(
    ip: &'a str,
    identity: Option<&'a Identity>,
    headers: &'a [(String, String)],
) -> RequestKeys<'a> {
    RequestKeys {
        ip,
        route: "r",
        headers,
        identity,
    }
}

/// Runs both stages of `names` for one request, as the pipeline does; returns the decision
/// of the stage that decided and the events.
struct Harness {
    rl: RateLimiter,
    plan: RoutePlan,
    events: RefCell<Vec<(String, Event)>>,
}

impl Harness {
    fn new(json: &str, names: &[&str], cost: u64) -> Harness {
        let rl = limiter(json);
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let plan = rl.plan("routes[0]", &names, cost, &None).unwrap();
        Harness {
            rl,
            plan,
            events: RefCell::new(Vec::new()),
        }
    }

    fn request(
        &self,
        store: &dyn SharedStore,
        k: &RequestKeys<'_>,
        now: u64,
    ) -> (Decision, Option<Report>) {
        let mut taken = Taken::default();
        let mut obs = |id: usize, e: Event| {
            self.events
                .borrow_mut()
                .push((self.rl.limits[id].name.clone(), e))
        };
        let pre_keys = RequestKeys {
            identity: None,
            ..*k
        };
        let d1 = self.rl.check(
            &self.plan.pre_auth,
            self.plan.cost,
            self.plan.exempt.as_ref(),
            &pre_keys,
            now,
            store,
            &mut taken,
            &mut obs,
        );
        if !d1.allowed() {
            return (d1, d1.report);
        }
        let d2 = self.rl.check(
            &self.plan.post_auth,
            self.plan.cost,
            self.plan.exempt.as_ref(),
            k,
            now,
            store,
            &mut taken,
            &mut obs,
        );
        let report = if d2.allowed() {
            Report::tighter(d1.report, d2.report)
        } else {
            d2.report
        };
        (d2, report)
    }

    fn count(&self, name: &str, e: Event) -> usize {
        self.events
            .borrow()
            .iter()
            .filter(|(n, ev)| n == name && *ev == e)
            .count()
    }

    fn remaining(&self, store: &dyn SharedStore, name: &str, k: &RequestKeys<'_>, now: u64) -> u64 {
        let (id, l) = self
            .rl
            .limits
            .iter()
            .enumerate()
            .find(|(_, l)| l.name == name)
            .unwrap();
        let _ = id;
        let params = l.rule.params_for(k.tier()).unwrap();
        let r = l
            .table
            .read(store, l.table.locate(self.rl.key_hash(l, k)), now);
        params.status(r.view.state().unwrap(), now).remaining
    }
}

const LOGIN: &str = r#"{"rate_limits":{"login-per-ip":{"key":["ip"],"capacity":5,"refill_tokens":5,"refill_period_s":60}}}"#;

#[test]
fn counts_down_to_429_with_headers_and_retry_after() {
    let h = Harness::new(LOGIN, &["login-per-ip"], 1);
    let store = MemoryStore::new();
    h.rl.prepare(&store).unwrap();
    let k = keys("1.2.3.4", None, &[]);
    for want in (0..5).rev() {
        let (d, r) = h.request(&store, &k, T0);
        assert!(d.allowed());
        let hd = h.rl.headers(&r.unwrap(), T0, None).unwrap();
        assert_eq!(hd.x_remaining, want.to_string());
        assert_eq!(hd.policy, "\"login-per-ip\";q=5;w=60");
    }
    let (d, r) = h.request(&store, &k, T0 + 500);
    let den = d.denial.unwrap();
    assert_eq!(den.reason, DenyReason::Exhausted);
    assert_eq!(den.retry_after_s, 12, "11.5 s rounded up");
    let hd =
        h.rl.headers(&r.unwrap(), T0 + 500, Some(den.retry_after_s))
            .unwrap();
    assert_eq!(hd.ratelimit, "\"login-per-ip\";r=0;t=60");
    assert_eq!(hd.retry_after.as_deref(), Some("12"));
    assert_eq!(h.count("login-per-ip", Event::Allowed), 5);
    assert_eq!(h.count("login-per-ip", Event::Denied), 1);
    // Another IP has its own bucket; refill lets the first back in after 12 s.
    assert!(h
        .request(&store, &keys("5.6.7.8", None, &[]), T0)
        .0
        .allowed());
    assert!(h.request(&store, &k, T0 + 12_000).0.allowed());
    assert!(!h.request(&store, &k, T0 + 12_000).0.allowed());
}

const TWO: &str = r#"{"rate_limits":{
    "wide":{"key":["route"],"capacity":10,"refill_tokens":1,"refill_period_s":60},
    "narrow":{"key":["ip"],"capacity":2,"refill_tokens":1,"refill_period_s":60}}}"#;

#[test]
fn a_request_denied_by_one_limit_consumes_nothing_from_the_others() {
    let h = Harness::new(TWO, &["wide", "narrow"], 1);
    let store = MemoryStore::new();
    h.rl.prepare(&store).unwrap();
    let k = keys("1.1.1.1", None, &[]);
    assert!(h.request(&store, &k, T0).0.allowed());
    assert!(h.request(&store, &k, T0).0.allowed());
    assert_eq!(h.remaining(&store, "wide", &k, T0), 8);
    for _ in 0..5 {
        let (d, r) = h.request(&store, &k, T0);
        assert_eq!(d.denial.unwrap().limit, h.plan.pre_auth[1]);
        assert_eq!(h.rl.limits[r.unwrap().limit].name, "narrow");
    }
    assert_eq!(
        h.remaining(&store, "wide", &k, T0),
        8,
        "denied requests took nothing"
    );
    // The headers show the limit with the least remaining.
    let (_, r) = h.request(&store, &keys("2.2.2.2", None, &[]), T0);
    let r = r.unwrap();
    assert_eq!(h.rl.limits[r.limit].name, "narrow");
    assert_eq!(r.status.remaining, 1);
}

#[test]
fn a_post_auth_denial_refunds_the_pre_auth_limits() {
    let json = r#"{"rate_limits":{
        "per-ip":{"key":["ip"],"capacity":10,"refill_tokens":1,"refill_period_s":60},
        "per-client":{"key":["client"],"capacity":1,"refill_tokens":1,"refill_period_s":60}}}"#;
    let h = Harness::new(json, &["per-ip", "per-client"], 1);
    assert_eq!(h.plan.pre_auth.len(), 1);
    let store = MemoryStore::new();
    h.rl.prepare(&store).unwrap();
    let id = ident("acme", "pro");
    let k = keys("9.9.9.9", Some(&id), &[]);
    assert!(h.request(&store, &k, T0).0.allowed());
    assert_eq!(h.remaining(&store, "per-ip", &k, T0), 9);
    for _ in 0..3 {
        assert!(!h.request(&store, &k, T0).0.allowed());
    }
    assert_eq!(h.remaining(&store, "per-ip", &k, T0), 9);
}

#[test]
fn cost_takes_several_tokens() {
    let h = Harness::new(LOGIN, &["login-per-ip"], 2);
    let store = MemoryStore::new();
    h.rl.prepare(&store).unwrap();
    let k = keys("1.2.3.4", None, &[]);
    let (_, r) = h.request(&store, &k, T0);
    assert_eq!(r.unwrap().status.remaining, 3);
    assert!(h.request(&store, &k, T0).0.allowed());
    let (d, r) = h.request(&store, &k, T0);
    assert_eq!(d.denial.unwrap().retry_after_s, 12, "one token short: 12 s");
    assert_eq!(r.unwrap().status.remaining, 1);
}

#[test]
fn shadow_limits_count_but_never_deny_or_show() {
    let json = r#"{"rate_limits":{
        "s":{"key":["ip"],"capacity":2,"refill_tokens":1,"refill_period_s":60,"shadow":true},
        "real":{"key":["ip"],"capacity":100,"refill_tokens":1,"refill_period_s":60}}}"#;
    let h = Harness::new(json, &["s", "real"], 1);
    let store = MemoryStore::new();
    h.rl.prepare(&store).unwrap();
    let k = keys("1.2.3.4", None, &[]);
    for _ in 0..5 {
        let (d, r) = h.request(&store, &k, T0);
        assert!(d.allowed());
        assert_eq!(h.rl.limits[r.unwrap().limit].name, "real");
    }
    assert_eq!(h.count("s", Event::Allowed), 2);
    assert_eq!(h.count("s", Event::ShadowDenied), 3);
    assert_eq!(h.count("s", Event::Denied), 0);
    assert_eq!(h.remaining(&store, "real", &k, T0), 95);
}

const TIERS: &str = r#"{"rate_limits":{"per-client":{"key":["client"],"tiers":{
    "anonymous":{"capacity":2,"refill_tokens":1,"refill_period_s":60},
    "pro":{"capacity":4,"refill_tokens":1,"refill_period_s":60},
    "internal":"unlimited",
    "default":{"capacity":3,"refill_tokens":1,"refill_period_s":60}}}}}"#;

fn admitted(h: &Harness, store: &dyn SharedStore, k: &RequestKeys<'_>, n: u32) -> u32 {
    (0..n)
        .filter(|_| h.request(store, k, T0).0.allowed())
        .count() as u32
}

#[test]
fn tiers_pick_the_bucket_including_unlimited_and_default() {
    let h = Harness::new(TIERS, &["per-client"], 1);
    let store = MemoryStore::new();
    h.rl.prepare(&store).unwrap();
    let pro = ident("acme", "pro");
    let free = ident("bob", "free");
    let internal = ident("ops", "internal");
    assert_eq!(admitted(&h, &store, &keys("1.1.1.1", None, &[]), 10), 2);
    assert_eq!(
        admitted(&h, &store, &keys("1.1.1.1", Some(&pro), &[]), 10),
        4
    );
    assert_eq!(
        admitted(&h, &store, &keys("1.1.1.1", Some(&free), &[]), 10),
        3,
        "default"
    );
    assert_eq!(
        admitted(&h, &store, &keys("1.1.1.1", Some(&internal), &[]), 50),
        50
    );
    // Unlimited: no headers from this limit, nothing stored.
    let (d, r) = h.request(&store, &keys("1.1.1.1", Some(&internal), &[]), T0);
    assert!(d.allowed() && r.is_none());
    // A client whose tier changes gets the new tier's bucket, not the old one's debt.
    let pro_again = ident("bob", "pro");
    assert_eq!(
        admitted(&h, &store, &keys("1.1.1.1", Some(&pro_again), &[]), 10),
        4
    );
}

#[test]
fn missing_header_claim_or_identity_falls_back_to_the_ip() {
    let json = r#"{"rate_limits":{
        "h":{"key":["header:x-user"],"capacity":1,"refill_tokens":1,"refill_period_s":60},
        "c":{"key":["claim:tenant"],"capacity":1,"refill_tokens":1,"refill_period_s":60},
        "cl":{"key":["client"],"capacity":1,"refill_tokens":1,"refill_period_s":60}}}"#;
    let store = MemoryStore::new();
    let hh = Harness::new(json, &["h"], 1);
    hh.rl.prepare(&store).unwrap();
    let alice = vec![("x-user".to_string(), "alice".to_string())];
    let bob = vec![("x-user".to_string(), "bob".to_string())];
    assert!(hh
        .request(&store, &keys("1.1.1.1", None, &alice), T0)
        .0
        .allowed());
    assert!(hh
        .request(&store, &keys("1.1.1.1", None, &bob), T0)
        .0
        .allowed());
    assert!(!hh
        .request(&store, &keys("2.2.2.2", None, &bob), T0)
        .0
        .allowed());
    // No header: keyed by IP, per IP, not one bucket for everyone without it.
    assert!(hh
        .request(&store, &keys("1.1.1.1", None, &[]), T0)
        .0
        .allowed());
    assert!(!hh
        .request(&store, &keys("1.1.1.1", None, &[]), T0)
        .0
        .allowed());
    assert!(hh
        .request(&store, &keys("3.3.3.3", None, &[]), T0)
        .0
        .allowed());

    let hc = Harness::new(json, &["c"], 1);
    let a = ident("a", "pro");
    assert!(hc
        .request(&store, &keys("1.1.1.1", Some(&a), &[]), T0)
        .0
        .allowed());
    let b = ident("b", "pro"); // same tenant claim t1
    assert!(!hc
        .request(&store, &keys("5.5.5.5", Some(&b), &[]), T0)
        .0
        .allowed());
    assert!(hc
        .request(&store, &keys("5.5.5.5", None, &[]), T0)
        .0
        .allowed());

    // An identity that looks like an IP does not share the anonymous IP's bucket.
    let hl = Harness::new(json, &["cl"], 1);
    let ipish = ident("7.7.7.7", "pro");
    assert!(hl
        .request(&store, &keys("7.7.7.7", None, &[]), T0)
        .0
        .allowed());
    assert!(hl
        .request(&store, &keys("8.8.8.8", Some(&ipish), &[]), T0)
        .0
        .allowed());
}

#[test]
fn deny_log_key_is_readable_and_hides_credentials() {
    let json = r#"{"api_keys":{"keys":[]},"rate_limits":{
        "l":{"key":["ip","header:x-api-key","header:x-user","route"],"capacity":1,"refill_tokens":1,"refill_period_s":60},
        "t":{"key":["client"],"tiers":{"default":{"capacity":1,"refill_tokens":1,"refill_period_s":1}}}}}"#;
    let rl = limiter(json);
    let hdrs = vec![
        ("x-api-key".to_string(), "sk_live_secret".to_string()),
        ("x-user".to_string(), "é".repeat(40)),
    ];
    let d = rl.describe_key(0, &keys("1.2.3.4", None, &hdrs));
    assert!(d.starts_with("ip=1.2.3.4,header:x-api-key=sha256:"), "{d}");
    assert!(!d.contains("sk_live"), "{d}");
    assert!(d.ends_with(",route=r"), "{d}");
    assert!(
        d.contains(&"é".repeat(32)) && !d.contains(&"é".repeat(33)),
        "{d}"
    );
    let d = rl.describe_key(0, &keys("1.2.3.4", None, &[]));
    assert!(d.contains("header:x-user=ip:1.2.3.4"), "{d}");
    let id = ident("acme", "pro");
    assert_eq!(
        rl.describe_key(1, &keys("1.2.3.4", Some(&id), &[])),
        "client=acme;tier=pro"
    );
    assert_eq!(rl.describe_key(99, &keys("", None, &[])), "");
}

#[test]
fn when_full_decides_for_keys_without_a_slot() {
    for (policy, want_allowed) in [("deny", false), ("allow", true)] {
        let json = format!(
            r#"{{"rate_limit_table":{{"slots":8,"when_full":"{policy}"}},"rate_limits":{{"l":{{"key":["ip"],"capacity":1,"refill_tokens":1,"refill_period_s":60}}}}}}"#
        );
        let h = Harness::new(&json, &["l"], 1);
        let store = MemoryStore::new();
        h.rl.prepare(&store).unwrap();
        for i in 0..8 {
            assert!(h
                .request(&store, &keys(&format!("10.0.0.{i}"), None, &[]), T0)
                .0
                .allowed());
        }
        let (d, r) = h.request(&store, &keys("10.0.1.1", None, &[]), T0 + 1000);
        assert_eq!(d.allowed(), want_allowed, "{policy}");
        assert_eq!(h.count("l", Event::SlotPressure), 1);
        if let Some(den) = d.denial {
            assert_eq!(den.reason, DenyReason::SlotsFull);
            assert_eq!(den.retry_after_s, 59, "until the first slot frees");
        } else {
            assert_eq!(
                r.unwrap().status.remaining,
                0,
                "headers as for a fresh bucket"
            );
        }
        // A slot frees once its bucket is full: the newcomer is then tracked.
        assert!(h
            .request(&store, &keys("10.0.1.1", None, &[]), T0 + 60_000)
            .0
            .allowed());
        assert!(!h
            .request(&store, &keys("10.0.1.1", None, &[]), T0 + 60_000)
            .0
            .allowed());
        assert_eq!(store.len(), 2, "one page and the near-miss table");
    }
}

#[test]
fn shared_data_stays_at_the_cap_for_100k_distinct_ips() {
    let json = r#"{"rate_limit_table":{"slots":4096},"rate_limits":{"l":{"key":["ip"],"capacity":5,"refill_tokens":5,"refill_period_s":60}}}"#;
    let h = Harness::new(json, &["l"], 1);
    let store = MemoryStore::new();
    h.rl.prepare(&store).unwrap();
    let pages = store.len();
    assert_eq!(pages, 512 + 1, "the pages and the near-miss table");
    for i in 0..100_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
        let _ = h.request(&store, &keys(&ip, None, &[]), T0 + u64::from(i) / 10);
    }
    assert_eq!(store.len(), pages);
    let bytes: usize = (0..512)
        .map(|p| store.get(&format!("ag:rl:l:{p}")).unwrap().0.len())
        .sum();
    assert_eq!(bytes, 512 * table::PAGE_BYTES);
    assert_eq!(h.rl.limits[0].table.busy_slots(&store, T0 + 10_000), 4096);
    assert!(h.count("l", Event::SlotPressure) > 0);
}

type Rival<'a> = Box<dyn FnMut(&MemoryStore) + 'a>;

/// A store that lets a rival worker run just before selected writes of ours: the rival's
/// write bumps the version, so our CAS fails and must be re-read and re-decided.
struct Racing<'a> {
    inner: &'a MemoryStore,
    rival: RefCell<Option<Rival<'a>>>,
    every: u32,
    sets: Cell<u32>,
}

impl SharedStore for Racing<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.sets.set(self.sets.get() + 1);
        if self.sets.get().is_multiple_of(self.every) {
            let rival = self.rival.borrow_mut().take();
            if let Some(mut f) = rival {
                f(self.inner);
                *self.rival.borrow_mut() = Some(f);
            }
        }
        self.inner.set(key, value, cas)
    }
}

#[test]
fn two_interleaved_workers_admit_exactly_the_capacity() {
    let json = r#"{"rate_limits":{"l":{"key":["route"],"capacity":20,"refill_tokens":1,"refill_period_s":60}}}"#;
    let a = Harness::new(json, &["l"], 1);
    let b = Harness::new(json, &["l"], 1);
    let mem = MemoryStore::new();
    a.rl.prepare(&mem).unwrap();
    let k = keys("1.1.1.1", None, &[]);
    let b_admitted = Cell::new(0u32);
    let racing = Racing {
        inner: &mem,
        rival: RefCell::new(Some(Box::new(|s: &MemoryStore| {
            if b.request(s, &k, T0).0.allowed() {
                b_admitted.set(b_admitted.get() + 1);
            }
        }))),
        every: 2, // B writes between A's read and A's CAS on every second write of A
        sets: Cell::new(0),
    };
    let a_admitted = (0..40)
        .filter(|_| a.request(&racing, &k, T0).0.allowed())
        .count() as u32;
    drop(racing);
    assert!(a_admitted > 0 && b_admitted.get() > 0);
    assert_eq!(a_admitted + b_admitted.get(), 20);
}

#[test]
fn losing_a_race_on_the_second_limit_refunds_the_first() {
    // Worker A passes the check of both limits; before its write to "narrow", worker B takes
    // the last token there. A re-reads, is denied, and gives back what it took from "wide".
    let a = Harness::new(TWO, &["wide", "narrow"], 1);
    let b = Harness::new(
        r#"{"rate_limits":{"narrow":{"key":["ip"],"capacity":2,"refill_tokens":1,"refill_period_s":60}}}"#,
        &["narrow"],
        1,
    );
    let mem = MemoryStore::new();
    a.rl.prepare(&mem).unwrap();
    let k = keys("1.1.1.1", None, &[]);
    assert!(a.request(&mem, &k, T0).0.allowed()); // narrow: 1 left, wide: 9 left
    let racing = Racing {
        inner: &mem,
        rival: RefCell::new(Some(Box::new(|s: &MemoryStore| {
            assert!(b.request(s, &k, T0).0.allowed());
        }))),
        every: 2, // A's 1st write is "wide", its 2nd "narrow": B runs just before that one
        sets: Cell::new(0),
    };
    let (d, _) = a.request(&racing, &k, T0);
    drop(racing);
    assert_eq!(d.denial.unwrap().reason, DenyReason::Exhausted);
    assert_eq!(a.remaining(&mem, "wide", &k, T0), 9, "refunded");
    assert_eq!(a.remaining(&mem, "narrow", &k, T0), 0);
}
