//! Which addresses an upstream may resolve to: one table of the ranges in
//! IANA's IPv4 and IPv6 Special-Purpose Address Registries (plus multicast,
//! and IPv6 space never allocated for global unicast), all refused by default.
//!
//! Addresses that embed an IPv4 address:
//! - IPv4-mapped `::ffff:a.b.c.d` is the IPv4 address itself to a dual-stack
//!   socket, so it is judged as that IPv4 address (`::ffff:8.8.8.8` passes,
//!   `::ffff:127.0.0.1` does not).
//! - Every other form (IPv4-compatible `::a.b.c.d`, IPv4-translated
//!   `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, 6to4
//!   `2002::/16`, Teredo `2001::/32`) is refused whole, whatever it embeds:
//!   those packets go through a translator or relay whose own network the
//!   gateway cannot judge (a local NAT64 reaches private IPv4 space), and no
//!   real provider needs them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 range: network, prefix length, what it is.
type V4Range = (Ipv4Addr, u8, &'static str);
/// An IPv6 range: network, prefix length, what it is.
type V6Range = (Ipv6Addr, u8, &'static str);

const fn v6(s: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])
}

/// IANA IPv4 Special-Purpose Address Registry (every entry), and multicast.
/// Some entries are marked globally reachable by IANA (anycast relays, AS112);
/// none is a place an LLM provider lives, so all are refused.
pub const FORBIDDEN_V4: &[V4Range] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\" (RFC 791)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private use (RFC 1918)"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "shared address space, CGNAT (RFC 6598)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback (RFC 1122)"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link local, cloud metadata (RFC 3927)",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private use (RFC 1918)"),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        "IETF protocol assignments (RFC 6890)",
    ),
    (
        Ipv4Addr::new(192, 0, 2, 0),
        24,
        "documentation TEST-NET-1 (RFC 5737)",
    ),
    (Ipv4Addr::new(192, 31, 196, 0), 24, "AS112-v4 (RFC 7535)"),
    (Ipv4Addr::new(192, 52, 193, 0), 24, "AMT (RFC 7450)"),
    (
        Ipv4Addr::new(192, 88, 99, 0),
        24,
        "deprecated 6to4 relay anycast (RFC 7526)",
    ),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private use (RFC 1918)"),
    (
        Ipv4Addr::new(192, 175, 48, 0),
        24,
        "direct delegation AS112 service (RFC 7534)",
    ),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking (RFC 2544)"),
    (
        Ipv4Addr::new(198, 51, 100, 0),
        24,
        "documentation TEST-NET-2 (RFC 5737)",
    ),
    (
        Ipv4Addr::new(203, 0, 113, 0),
        24,
        "documentation TEST-NET-3 (RFC 5737)",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast (RFC 5771)"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved (RFC 1112)"),
    (
        Ipv4Addr::new(255, 255, 255, 255),
        32,
        "limited broadcast (RFC 919)",
    ),
];

/// IANA IPv6 Special-Purpose Address Registry (every entry), multicast,
/// deprecated site-local, and everything outside `2000::/3` (the only space
/// allocated for global unicast). IPv4-mapped `::ffff:0:0/96` is judged by
/// its IPv4 address before this table is read. More specific ranges come
/// first, so a log names the narrowest one.
pub const FORBIDDEN_V6: &[V6Range] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0]), 128, "unspecified (RFC 4291)"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1]), 128, "loopback (RFC 4291)"),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0]),
        96,
        "IPv4-compatible, deprecated (RFC 4291)",
    ),
    (
        v6([0, 0, 0, 0, 0xffff, 0, 0, 0]),
        96,
        "IPv4-translated (RFC 2765)",
    ),
    (
        v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]),
        96,
        "IPv4/IPv6 translation, NAT64 (RFC 6052)",
    ),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]),
        48,
        "local-use IPv4/IPv6 translation (RFC 8215)",
    ),
    (
        v6([0x100, 0, 0, 0, 0, 0, 0, 0]),
        64,
        "discard-only (RFC 6666)",
    ),
    (
        v6([0x100, 0, 0, 1, 0, 0, 0, 0]),
        64,
        "dummy IPv6 prefix (RFC 9780)",
    ),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 32, "Teredo (RFC 4380)"),
    (
        v6([0x2001, 2, 0, 0, 0, 0, 0, 0]),
        48,
        "benchmarking (RFC 5180)",
    ),
    (v6([0x2001, 3, 0, 0, 0, 0, 0, 0]), 32, "AMT (RFC 7450)"),
    (
        v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0]),
        48,
        "AS112-v6 (RFC 7535)",
    ),
    (
        v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0]),
        28,
        "deprecated ORCHID (RFC 4843)",
    ),
    (
        v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0]),
        28,
        "ORCHIDv2 (RFC 7343)",
    ),
    (
        v6([0x2001, 0x30, 0, 0, 0, 0, 0, 0]),
        28,
        "drone remote ID (RFC 9374)",
    ),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0]),
        23,
        "IETF protocol assignments (RFC 2928)",
    ),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]),
        32,
        "documentation (RFC 3849)",
    ),
    (v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16, "6to4 (RFC 3056)"),
    (
        v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0]),
        48,
        "direct delegation AS112 service (RFC 7534)",
    ),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]),
        20,
        "documentation (RFC 9637)",
    ),
    (
        v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]),
        16,
        "segment routing SIDs (RFC 9602)",
    ),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]),
        7,
        "unique local (RFC 4193)",
    ),
    (
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]),
        10,
        "link-local unicast (RFC 4291)",
    ),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]),
        10,
        "site-local, deprecated (RFC 3879)",
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, "multicast (RFC 4291)"),
    // Not global unicast (IANA IPv6 Address Space): reserved or unassigned.
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0]),
        3,
        "not allocated for global unicast",
    ),
    (
        v6([0x4000, 0, 0, 0, 0, 0, 0, 0]),
        2,
        "not allocated for global unicast",
    ),
    (
        v6([0x8000, 0, 0, 0, 0, 0, 0, 0]),
        1,
        "not allocated for global unicast",
    ),
];

fn in_v4(ip: Ipv4Addr, (net, len, _): &V4Range) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(*net) & mask
}

fn in_v6(ip: Ipv6Addr, (net, len, _): &V6Range) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(*net) & mask
}

/// The special-purpose range `ip` falls in (for logs), `None` when it is public.
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => FORBIDDEN_V4.iter().find(|r| in_v4(v4, r)).map(|r| r.2),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden_range(IpAddr::V4(v4)),
            None => FORBIDDEN_V6.iter().find(|r| in_v6(v6, r)).map(|r| r.2),
        },
    }
}

/// True for addresses an upstream must not resolve to by default.
pub fn is_forbidden(ip: IpAddr) -> bool {
    forbidden_range(ip).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One address inside each range of the tables (not the network address
    /// where a host address is possible), and which range it must be found in.
    #[test]
    fn one_address_from_each_special_purpose_range_is_forbidden() {
        let v4 = [
            ("0.1.2.3", "this network"),
            ("10.20.30.40", "RFC 1918"),
            ("100.127.255.254", "CGNAT"),
            ("127.8.9.10", "loopback"),
            ("169.254.169.254", "link local"),
            ("172.31.0.1", "RFC 1918"),
            ("192.0.0.9", "IETF protocol"),
            ("192.0.2.77", "TEST-NET-1"),
            ("192.31.196.1", "AS112-v4"),
            ("192.52.193.1", "AMT"),
            ("192.88.99.1", "6to4 relay"),
            ("192.168.1.1", "RFC 1918"),
            ("192.175.48.6", "AS112 service"),
            ("198.19.255.1", "benchmarking"),
            ("198.51.100.200", "TEST-NET-2"),
            ("203.0.113.9", "TEST-NET-3"),
            ("239.255.255.250", "multicast"),
            ("250.1.2.3", "reserved"),
            ("255.255.255.255", "reserved"),
        ];
        let v6 = [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::7f00:1", "IPv4-compatible"),
            ("::808:808", "IPv4-compatible"),
            ("::ffff:0:7f00:1", "IPv4-translated"),
            ("::ffff:0:808:808", "IPv4-translated"),
            ("64:ff9b::a00:1", "NAT64"),
            ("64:ff9b::808:808", "NAT64"),
            ("64:ff9b:1::1", "local-use"),
            ("100::1", "discard-only"),
            ("100:0:0:1::1", "dummy"),
            ("2001:1::1", "IETF protocol"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:2::1", "benchmarking"),
            ("2001:3::1", "AMT"),
            ("2001:4:112::1", "AS112-v6"),
            ("2001:10::1", "deprecated ORCHID"),
            ("2001:20::1", "ORCHIDv2"),
            ("2001:30::1", "drone"),
            ("2001:1ff::1", "IETF protocol"),
            ("2001:db8::1", "documentation"),
            ("2002:c0a8:101::1", "6to4"),
            ("2002:808:808::1", "6to4"),
            ("2620:4f:8000::1", "AS112 service"),
            ("3fff:fff::1", "documentation"),
            ("5f00::1", "segment routing"),
            ("fc00::1", "unique local"),
            ("fdff:ffff::1", "unique local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("1::1", "not allocated"),
            ("4000::1", "not allocated"),
            ("e000::1", "not allocated"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link local"),
            ("::ffff:10.0.0.1", "RFC 1918"),
        ];
        let cases = v4
            .iter()
            .map(|(a, r)| (IpAddr::V4(a.parse().unwrap()), *r))
            .chain(v6.iter().map(|(a, r)| (IpAddr::V6(a.parse().unwrap()), *r)));
        for (ip, range) in cases {
            let found = forbidden_range(ip).unwrap_or_else(|| panic!("{ip} is allowed"));
            assert!(found.contains(range), "{ip}: found in {found}, not {range}");
        }
        // Every table entry is exercised by at least one address above.
        for r in FORBIDDEN_V4 {
            assert!(
                v4.iter().any(|(a, _)| in_v4(a.parse().unwrap(), r)),
                "no test address in {r:?}"
            );
        }
        for r in FORBIDDEN_V6 {
            assert!(
                v6.iter().any(|(a, _)| in_v6(a.parse().unwrap(), r)),
                "no test address in {r:?}"
            );
        }
    }

    #[test]
    fn public_addresses_stay_allowed() {
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "104.18.32.7",
            "192.0.1.1",
            "192.0.3.1",
            "198.20.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "223.255.255.254",
            "2606:4700::1111",
            "2a00:1450:4001:82b::200e",
            "2001:200::1",
            "2001:4860:4860::8888",
            "2620:4f:8001::1",
            "3ffe::1",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(forbidden_range(ip), None, "{a} is refused");
        }
    }
}
