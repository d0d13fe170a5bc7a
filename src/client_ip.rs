//! Which address is the client's (SPEC section 2, `client_ip`).
//!
//! With `xff_trusted_hops = 0` the client is the downstream peer (`source.address`). With N > 0
//! it is the Nth `x-forwarded-for` entry from the right, as Envoy's `xff_num_trusted_hops`
//! counts them: over the header as it arrived at Envoy. With the connection manager's
//! `use_remote_address: true` Envoy appends one entry before the filter runs — the peer, or for
//! a loopback peer Envoy's own local address — so the last entry is skipped. The filter cannot
//! see that setting, so with N > 0 the config must say it (`client_ip.use_remote_address` has
//! no default: guessing wrong lets the client pick its own address). Entries left of the
//! trusted ones are client-controlled and never looked at.

/// Strips the port from `source.address` (`1.2.3.4:5678`, `[::1]:80`).
pub fn strip_port(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rfind(':') {
        // One colon: IPv4 with port. More: bare IPv6 without brackets, keep it whole.
        Some(i) if addr[..i].find(':').is_none() => &addr[..i],
        _ => addr,
    }
}

/// Returns the client IP. `xff` is the `x-forwarded-for` value, `peer` is `source.address`,
/// `envoy_appended` says Envoy added the last `x-forwarded-for` entry itself.
pub fn resolve<'a>(
    trusted_hops: u32,
    envoy_appended: bool,
    xff: Option<&'a str>,
    peer: Option<&'a str>,
) -> Option<&'a str> {
    let peer_ip = peer.map(strip_port).filter(|p| !p.is_empty());
    if trusted_hops == 0 {
        return peer_ip;
    }
    let xff = match xff {
        Some(x) => x,
        None => return peer_ip,
    };
    let mut entries = xff.rsplit(',').map(str::trim);
    if envoy_appended {
        entries.next();
    }
    // `nth` stops at the end of the header: the work is bounded by the header, never by
    // `trusted_hops` (a huge configured value used to spin ~4e9 times per request).
    let cur = entries.nth((trusted_hops - 1) as usize);
    match cur {
        Some(ip) if is_ip(ip) => Some(ip),
        // Too few hops or garbage: the nearest address we can trust is the peer.
        _ => peer_ip,
    }
}

fn is_ip(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("1.2.3.4:80"), "1.2.3.4");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("1.2.3.4"), "1.2.3.4");
    }

    #[test]
    fn zero_hops_uses_the_peer_whatever_xff_says() {
        assert_eq!(
            resolve(0, true, Some("9.9.9.9"), Some("10.0.0.1:1234")),
            Some("10.0.0.1")
        );
        assert_eq!(resolve(0, true, None, None), None);
    }

    #[test]
    fn nth_from_the_right_skipping_envoys_appended_entry() {
        // Client forged "6.6.6.6", the trusted LB appended the real client 1.1.1.1, and Envoy
        // appended the LB (10.0.0.1) as peer.
        let xff = "6.6.6.6, 1.1.1.1, 10.0.0.1";
        assert_eq!(
            resolve(1, true, Some(xff), Some("10.0.0.1:5555")),
            Some("1.1.1.1")
        );
        assert_eq!(
            resolve(2, true, Some(xff), Some("10.0.0.1:5555")),
            Some("6.6.6.6")
        );
        // A loopback peer: Envoy appends its own local address, not the peer.
        let xff = "6.6.6.6,1.1.1.1,192.0.2.2";
        assert_eq!(
            resolve(1, true, Some(xff), Some("127.0.0.1:5555")),
            Some("1.1.1.1")
        );
        // use_remote_address: false: nothing appended, the count starts at the end.
        assert_eq!(
            resolve(1, false, Some("6.6.6.6, 1.1.1.1"), Some("10.0.0.9:1")),
            Some("1.1.1.1")
        );
    }

    #[test]
    fn too_few_entries_or_garbage_fall_back_to_the_peer() {
        let peer = Some("10.0.0.1:1");
        assert_eq!(
            resolve(3, true, Some("1.1.1.1, 10.0.0.1"), peer),
            Some("10.0.0.1")
        );
        assert_eq!(
            resolve(1, true, Some("not-an-ip, 10.0.0.1"), peer),
            Some("10.0.0.1")
        );
        assert_eq!(resolve(1, true, None, peer), Some("10.0.0.1"));
        assert_eq!(resolve(1, true, Some("192.0.2.2"), peer), Some("10.0.0.1"));
        assert_eq!(resolve(1, false, Some(""), peer), Some("10.0.0.1"));
    }

    #[test]
    fn a_huge_hop_count_costs_no_more_than_the_header() {
        // Used to loop `trusted_hops` times whatever the header held (seconds per request).
        let t = std::time::Instant::now();
        let peer = Some("10.0.0.1:1");
        assert_eq!(
            resolve(u32::MAX, true, Some("1.1.1.1, 2.2.2.2"), peer),
            Some("10.0.0.1")
        );
        assert_eq!(resolve(u32::MAX, false, Some(""), peer), Some("10.0.0.1"));
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
    }
}
