//! The settings API's provider-key validators: `ProviderName`, `BaseUrl`,
//! `ProviderToken`.
//!
//! Properties: never panic; each accepts exactly what an independent
//! statement of the product rule accepts; an accepted base URL is stable
//! (parsing its stored form gives it back) and its endpoint is a valid URL.

#![no_main]

use libfuzzer_sys::fuzz_target;
use domain::{BaseUrl, ProviderName};
use domain::secrets::ProviderToken;

/// `^[a-z]+$`, at most 64.
fn name_rule(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_lowercase())
}

/// At most 2048 bytes (as sent and as stored); https, a host, no userinfo,
/// query or fragment; the path (trailing '/' dropped) does not end in `/v1`.
fn base_url_rule(s: &str) -> bool {
    if s.len() > 2048 {
        return false;
    }
    let Ok(u) = url::Url::parse(s.trim()) else {
        return false;
    };
    (u.scheme() == "https" || u.scheme() == "http")
        && u.host().is_some()
        && u.username().is_empty()
        && u.password().is_none()
        && u.query().is_none()
        && u.fragment().is_none()
        && !u
            .path()
            .trim_end_matches('/')
            .to_ascii_lowercase()
            .ends_with("/v1")
        && u.as_str().trim_end_matches('/').len() <= 2048
}

/// Non-empty, at most 4096, visible ASCII with inner spaces only.
fn token_rule(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 4096
        && s.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !s.starts_with(' ')
        && !s.ends_with(' ')
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    let name = ProviderName::parse(s);
    assert_eq!(name.is_ok(), name_rule(s), "name {s:?}");
    if let Ok(n) = name {
        assert_eq!(n.as_str(), s);
    }

    let base = BaseUrl::parse(s);
    assert_eq!(base.is_ok(), base_url_rule(s), "base_url {s:?}");
    if let Ok(b) = base {
        let stored = b.as_str();
        assert!(!stored.ends_with('/'), "{stored:?}");
        assert!(
            base_url_rule(stored),
            "stored form breaks the rule: {stored:?}"
        );
        assert_eq!(
            BaseUrl::parse(stored).ok(),
            Some(b.clone()),
            "unstable: {s:?}"
        );
        let endpoint = url::Url::parse(&b.endpoint("chat/completions")).expect("endpoint URL");
        assert_eq!(endpoint.host(), url::Url::parse(stored).unwrap().host());
        assert!(endpoint.path().ends_with("/v1/chat/completions"));
    }

    let token = ProviderToken::parse(s);
    assert_eq!(token.is_ok(), token_rule(s), "token {s:?}");
    if let Ok(t) = token {
        assert_eq!(t.expose_secret(), s);
        http::HeaderValue::from_str(&format!("Bearer {}", t.expose_secret()))
            .expect("a token is header-safe");
        assert_eq!(format!("{t:?}"), "ProviderToken([REDACTED])");
    }
});
