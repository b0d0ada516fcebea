//! Throttling of the password endpoints (login, signup) per client address
//! and per email, and the client address itself (`X-Forwarded-For` from
//! trusted proxies only).
//!
//! Limits (GCRA, `governor`): per address 10 a minute with bursts of 20
//! (a whole office behind one NAT still gets in), per email 5 a minute with
//! bursts of 10 (slows guessing one account's password to a crawl).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::HttpRequest;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

use crate::error::ApiError;

/// Attempts per minute, and burst, from one client address.
pub const PER_ADDRESS_PER_MINUTE: u32 = 10;
pub const PER_ADDRESS_BURST: u32 = 20;
/// Attempts per minute, and burst, for one email.
pub const PER_EMAIL_PER_MINUTE: u32 = 5;
pub const PER_EMAIL_BURST: u32 = 10;

/// Keys a limiter may hold. Past it, keys that have fully recovered are
/// dropped; if that is not enough (more distinct addresses or emails inside
/// two minutes than this) the limiter starts afresh: memory stays bounded
/// (~100 bytes a key), and the password pool still bounds the work.
const MAX_KEYS: usize = 100_000;
/// Recovered keys are swept every this many checks.
const SWEEP_EVERY: u64 = 4096;
/// `X-Forwarded-For` hops looked at, from the right.
const MAX_FORWARDED_HOPS: usize = 16;

/// `LLMGW_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Comma-separated IP addresses and CIDR blocks (`10.0.0.0/8, 192.0.2.7, fd00::/8`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let net = match item.parse::<IpNet>() {
                Ok(n) => n.trunc(),
                Err(_) => item.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                    format!("{item:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8)")
                })?,
            };
            nets.push(net);
        }
        Ok(Self(nets))
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(&ip))
    }
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// The client's address: the TCP peer, or, when the peer is a trusted proxy,
/// the right-most `X-Forwarded-For` hop that is not itself a trusted proxy
/// (hops further left are whatever the client chose to send).
pub(crate) fn client_ip(req: &HttpRequest, trusted: &TrustedProxies) -> IpAddr {
    let peer = req
        .peer_addr()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip().to_canonical());
    if !trusted.contains(peer) {
        return peer;
    }
    let values: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .collect();
    let mut client = peer;
    let hops = values.iter().rev().flat_map(|v| v.rsplit(','));
    for hop in hops.take(MAX_FORWARDED_HOPS) {
        let Some(ip) = parse_hop(hop) else {
            break;
        };
        client = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    client
}

/// An IPv6 client controls its whole /64: one key for all of it.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            IpAddr::V6(Ipv6Addr::new(seg[0], seg[1], seg[2], seg[3], 0, 0, 0, 0))
        }
    }
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// A keyed limiter whose key count stays under [`MAX_KEYS`].
struct Bounded<K: std::hash::Hash + Eq + Clone> {
    quota: Quota,
    limiter: RwLock<Arc<Keyed<K>>>,
    checks: AtomicU64,
}

impl<K: std::hash::Hash + Eq + Clone> Bounded<K> {
    fn new(per_minute: u32, burst: u32) -> Self {
        let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(nz(per_minute)).allow_burst(nz(burst));
        Self {
            quota,
            limiter: RwLock::new(Arc::new(RateLimiter::keyed(quota))),
            checks: AtomicU64::new(0),
        }
    }

    fn current(&self) -> Arc<Keyed<K>> {
        self.limiter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `Err(wait)` when `key` is over its quota.
    fn check(&self, key: &K) -> Result<(), Duration> {
        let limiter = self.current();
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 || limiter.len() >= MAX_KEYS {
            self.sweep(&limiter);
        }
        limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn sweep(&self, limiter: &Keyed<K>) {
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() >= MAX_KEYS {
            tracing::warn!(
                keys = limiter.len(),
                "login throttle is tracking too many clients; starting afresh"
            );
            *self.limiter.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(RateLimiter::keyed(self.quota));
        }
    }
}

/// Per-address and per-email throttles of the password endpoints.
pub(crate) struct AuthThrottle {
    by_address: Bounded<IpAddr>,
    // Emails are keyed by a keyed hash: fixed-size keys, whatever a client sends.
    by_email: Bounded<u64>,
    email_hasher: RandomState,
}

fn too_many(wait: Duration) -> ApiError {
    ApiError::TooManyRequests {
        retry_after_secs: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
    }
}

impl AuthThrottle {
    pub fn new() -> Self {
        Self {
            by_address: Bounded::new(PER_ADDRESS_PER_MINUTE, PER_ADDRESS_BURST),
            by_email: Bounded::new(PER_EMAIL_PER_MINUTE, PER_EMAIL_BURST),
            email_hasher: RandomState::new(),
        }
    }

    /// Counts one attempt from `ip`.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.by_address.check(&address_key(ip)).map_err(too_many)
    }

    /// Counts one attempt for `email` (as typed: case and spaces do not matter).
    pub fn check_email(&self, email: &str) -> Result<(), ApiError> {
        let key = self
            .email_hasher
            .hash_one(email.trim().to_lowercase().as_str());
        self.by_email.check(&key).map_err(too_many)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn from(peer: &str, xff: &[&str]) -> HttpRequest {
        let mut r = TestRequest::default().peer_addr(peer.parse().unwrap());
        for v in xff {
            r = r.append_header(("x-forwarded-for", *v));
        }
        r.to_http_request()
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers() {
        let trusted = TrustedProxies::parse("127.0.0.1, 10.0.0.0/8").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_ip(&from("192.0.2.1:5000", &["203.0.113.9"]), &trusted),
            ip("192.0.2.1")
        );
        assert_eq!(
            client_ip(&from("127.0.0.1:5000", &["203.0.113.9"]), &trusted),
            ip("203.0.113.9")
        );
        // The client's own spoofed hop on the left is not believed.
        assert_eq!(
            client_ip(
                &from("127.0.0.1:5000", &["1.1.1.1, 203.0.113.9, 10.1.2.3"]),
                &trusted
            ),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(
                &from("127.0.0.1:5000", &["1.1.1.1", "203.0.113.9:443"]),
                &trusted
            ),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(&from("127.0.0.1:5000", &["garbage"]), &trusted),
            ip("127.0.0.1")
        );
        assert_eq!(
            client_ip(&from("127.0.0.1:5000", &[]), &TrustedProxies::default()),
            ip("127.0.0.1")
        );
        assert_eq!(
            client_ip(&from("[::ffff:127.0.0.1]:5000", &["2001:db8::1"]), &trusted),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn trusted_proxies_parse() {
        assert!(TrustedProxies::parse("").unwrap().0.is_empty());
        assert_eq!(
            TrustedProxies::parse("10.0.0.0/8,::1, 192.0.2.7")
                .unwrap()
                .0
                .len(),
            3
        );
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("proxy.internal").is_err());
    }

    #[test]
    fn throttles_per_email_and_per_address() {
        let t = AuthThrottle::new();
        for _ in 0..PER_EMAIL_BURST {
            t.check_email("Victim@Example.com").unwrap();
        }
        let e = t.check_email(" victim@example.com").unwrap_err();
        assert!(
            matches!(e, ApiError::TooManyRequests { retry_after_secs } if retry_after_secs >= 1)
        );
        t.check_email("other@example.com").unwrap();

        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        for _ in 0..PER_ADDRESS_BURST {
            t.check_address(a).unwrap();
        }
        // The rest of the /64 shares the budget; the next /64 does not.
        assert!(t
            .check_address("2001:db8:1:2::ffff".parse().unwrap())
            .is_err());
        t.check_address("2001:db8:1:3::1".parse().unwrap()).unwrap();
    }

    #[test]
    fn key_count_stays_bounded() {
        let b = Bounded::<u64>::new(1, 1);
        for k in 0..(MAX_KEYS as u64 + 10) {
            let _ = b.check(&k);
        }
        assert!(b.current().len() < MAX_KEYS);
    }
}
