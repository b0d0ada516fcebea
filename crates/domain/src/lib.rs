//! llmgw's domain, with no database: input parsed once at the edge into
//! types that cannot hold a bad value (here), the secrets and their one-way
//! forms ([`secrets`]), the envelope of provider tokens at rest ([`crypto`]),
//! list cursors ([`page`]) and how a provider's upstream is reached
//! ([`routing`]: endpoint weights, static headers, timeouts, health).
//! `storage` maps these to and from rows; `upstream`, the API and the
//! gateway use them without linking sqlx.

pub mod crypto;
pub mod limits;
pub mod page;
pub mod routing;
pub mod secrets;

use std::fmt;

use serde::{Deserialize, Serialize};

/// A client's input broke a rule; `field` names the JSON field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// A settings object's JSON (`limits`, `timeouts`): `null` is `None` (none
/// set), an object its fields; anything else is refused with `message`
/// against `field`.
pub(crate) fn settings_object<'a>(
    value: &'a serde_json::Value,
    field: &'static str,
    message: &str,
) -> Result<Option<&'a serde_json::Map<String, serde_json::Value>>, Vec<ValidationError>> {
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::Object(m) => Ok(Some(m)),
        _ => Err(vec![ValidationError::new(field, message)]),
    }
}

/// One optional integer field of a settings object: `null` leaves it unset,
/// an integer within `range` sets it; `Err` for anything else (a string, a
/// fraction, out of range), for the caller to name.
pub(crate) fn optional_integer(
    value: &serde_json::Value,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ()> {
    match value {
        serde_json::Value::Null => Ok(None),
        _ => value
            .as_u64()
            .filter(|n| range.contains(n))
            .map(Some)
            .ok_or(()),
    }
}

/// A custom provider's name: `^[a-z]+$`, at most 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ProviderName(String);

/// The pattern a provider name must match (also stated in the OpenAPI document).
pub const PROVIDER_NAME_PATTERN: &str = "^[a-z]+$";
/// Longest provider name, in characters.
pub const PROVIDER_NAME_MAX_LEN: usize = 64;

/// The rule, quoted in error messages.
pub const PROVIDER_NAME_RULE: &str =
    "name must match ^[a-z]+$ (lowercase letters a-z only, no digits, dashes or underscores) and be at most 64 characters";

impl ProviderName {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if !Self::is_valid(raw) {
            return Err(ValidationError::new("name", PROVIDER_NAME_RULE));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The rule itself ([`PROVIDER_NAME_PATTERN`], at most
    /// [`PROVIDER_NAME_MAX_LEN`]), for callers that only need a yes or no
    /// (the gateway, before it looks a name up).
    pub fn is_valid(raw: &str) -> bool {
        !raw.is_empty()
            && raw.len() <= PROVIDER_NAME_MAX_LEN
            && raw.bytes().all(|b| b.is_ascii_lowercase())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a value read back from the database, where a CHECK enforced the rule.
    pub fn from_db(raw: String) -> Self {
        Self(raw)
    }
}

impl fmt::Display for ProviderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest base URL, in bytes, as given and as stored.
pub const BASE_URL_MAX_LEN: usize = 2048;

/// What the OpenAPI document states about a base URL, as far as a regular
/// expression can: https, an ASCII host name or dotted-quad IPv4, an optional
/// port, a path of plain characters without `.`/`..` segments whose last
/// segment is not `v1`, no userinfo, query or fragment. Every string it
/// matches passes [`BaseUrl::parse`] (the SSRF policy is checked apart);
/// the parser stays the authority and accepts more (IPv6 literals,
/// percent-encoding, international names).
pub const BASE_URL_PATTERN: &str = concat!(
    "^https://",
    // Host: a dotted-quad IPv4 address, or labels whose last one starts with
    // a letter (URL parsing reads a numeric last label as an IPv4 number).
    "((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}",
    "|([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\\.)*[A-Za-z]([A-Za-z0-9-]*[A-Za-z0-9])?)",
    "(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?",
    // Path characters are those URL parsing never percent-encodes. Middle
    // segments may be empty but are never `.` or `..` (which parsing
    // resolves); the last non-empty one is not `v1` in any case.
    "((/([A-Za-z0-9._~!$&'()*+,;=:@-]*[A-Za-z0-9_~!$&'()*+,;=:@-][A-Za-z0-9._~!$&'()*+,;=:@-]*|\\.{3,})?)*",
    "/([A-Za-z0-9_~!$&'()*+,;=:@-]",
    "|[A-UW-Za-uw-z0-9_~!$&'()*+,;=:@-][A-Za-z0-9._~!$&'()*+,;=:@-]",
    "|[vV][A-Za-z02-9._~!$&'()*+,;=:@-]",
    "|\\.[A-Za-z0-9_~!$&'()*+,;=:@-]",
    "|[A-Za-z0-9._~!$&'()*+,;=:@-]{3,}))?",
    "/*$"
);

/// A provider's base URL: https (or plain http, which only the operator's
/// opt-in lets anyone save or call: [`BaseUrl::check_scheme`]), a host, no
/// userinfo/query/fragment, no trailing `/`, not ending in `/v1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BaseUrl(String);

impl BaseUrl {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let err = |m: &str| ValidationError::new("base_url", m);
        if raw.len() > BASE_URL_MAX_LEN {
            return Err(err("base_url must be at most 2048 characters"));
        }
        let url = url::Url::parse(raw.trim()).map_err(|e| {
            ValidationError::new("base_url", format!("base_url is not a valid URL ({e})"))
        })?;
        if url.scheme() != "https" && url.scheme() != "http" {
            return Err(err(
                "base_url must use https:// (http:// only when the server sets LLMGW_UPSTREAM_ALLOW_HTTP=true)",
            ));
        }
        if url.host().is_none() {
            return Err(err("base_url must have a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(err("base_url must not contain credentials (user:password@); put the token in the token field"));
        }
        if url.query().is_some() {
            return Err(err("base_url must not contain a query string"));
        }
        if url.fragment().is_some() {
            return Err(err("base_url must not contain a fragment"));
        }
        // The path, not the whole string: `https://v1` is a host named v1.
        let path = url.path().trim_end_matches('/');
        if path.to_ascii_lowercase().ends_with("/v1") {
            return Err(err(
                "base_url must not end with /v1: the gateway appends /v1/chat/completions itself (use https://host instead of https://host/v1)",
            ));
        }
        // Percent-encoding can lengthen it: the limit holds for the stored
        // form too, so a saved value can always be submitted again.
        let stored = url.as_str().trim_end_matches('/');
        if stored.len() > BASE_URL_MAX_LEN {
            return Err(err("base_url must be at most 2048 characters"));
        }
        Ok(Self(stored.to_owned()))
    }

    /// Wraps a value read back from the database (validated when saved).
    pub fn from_db(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for `http://`: requests and the token travel unencrypted.
    pub fn is_plain_http(&self) -> bool {
        self.0.starts_with("http://")
    }

    /// The operator's scheme policy, applied when saving and again when
    /// connecting: https always, plain http only with `allow_http`
    /// (`LLMGW_UPSTREAM_ALLOW_HTTP`), so a provider saved while the opt-in
    /// was on stops working once it is turned off.
    pub fn check_scheme(&self, allow_http: bool) -> Result<(), ValidationError> {
        if self.is_plain_http() && !allow_http {
            return Err(ValidationError::new("base_url", PLAIN_HTTP_REFUSED));
        }
        Ok(())
    }

    /// The URL's host as the URL parser normalized it (IPv4 in any spelling
    /// becomes dotted quad; IPv6 keeps its brackets).
    pub fn host(&self) -> Option<url::Host<String>> {
        url::Url::parse(&self.0).ok()?.host().map(|h| h.to_owned())
    }

    /// `{base_url}/v1/{path}`.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}/v1/{}", self.0, path)
    }
}

/// Why a plain-http base URL is refused, with how the operator opts in.
pub const PLAIN_HTTP_REFUSED: &str = "base_url uses plain http://, which this server does not allow: use https://, \
or have the operator set LLMGW_UPSTREAM_ALLOW_HTTP=true (for self-hosted servers such as vLLM, Ollama or llama.cpp \
on a private network; requests and the provider token then travel unencrypted)";

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a provider may be used by the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderStatus {
    Active,
    Inactive,
}

impl ProviderStatus {
    /// Every status.
    pub const ALL: [ProviderStatus; 2] = [ProviderStatus::Active, ProviderStatus::Inactive];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Inactive => "inactive",
        }
    }

    pub fn from_db(s: &str) -> Self {
        if s == "active" {
            Self::Active
        } else {
            Self::Inactive
        }
    }
}

/// A member's role; `Owner > Admin > Member`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    /// Every role, highest first.
    pub const ALL: [Role; 3] = [Role::Owner, Role::Admin, Role::Member];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
        }
    }

    /// `owner`, `admin` or `member`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Reads a stored role (a CHECK constraint allows only the three).
    pub fn from_db(s: &str) -> Self {
        Self::parse(s).unwrap_or(Self::Member)
    }
}

/// Longest email address, in bytes.
pub const EMAIL_MAX_LEN: usize = 320;

/// A normalized email address (trimmed; compared case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let s = raw.trim();
        let ok = s.len() <= EMAIL_MAX_LEN
            && s.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && !domain.is_empty() && !domain.contains('@')
            })
            && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(ValidationError::new(
                "email",
                "email must be an address like name@example.com",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Longest display name, in characters.
pub const LABEL_MAX_CHARS: usize = 200;

/// What [`parse_label`] accepts, for the OpenAPI document: something besides
/// whitespace, and no control characters (category Cc).
pub const LABEL_PATTERN: &str =
    "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$";

/// A free-text display name (organization, API key): 1–200 characters, no control characters.
pub fn parse_label(field: &'static str, raw: &str) -> Result<String, ValidationError> {
    let s = raw.trim();
    if s.is_empty() || s.chars().count() > LABEL_MAX_CHARS || s.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            format!("{field} must be 1 to 200 characters without control characters"),
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_follow_the_product_rule() {
        for ok in ["mycompany", "internal", "testing", "a", &"z".repeat(64)] {
            assert!(ProviderName::parse(ok).is_ok(), "{ok} refused");
        }
        for bad in [
            "MyCompany",
            "my-company",
            "my_company",
            "123test",
            "",
            "my company",
            "caf\u{e9}",
            "abc\n",
            &"z".repeat(65),
        ] {
            let e = ProviderName::parse(bad).unwrap_err();
            assert_eq!(e.field, "name");
            assert!(e.message.contains("^[a-z]+$"));
        }
    }

    #[test]
    fn base_urls_follow_the_product_rule() {
        assert_eq!(
            BaseUrl::parse("https://api.example.com").unwrap().as_str(),
            "https://api.example.com"
        );
        assert_eq!(
            BaseUrl::parse("https://api.example.com/").unwrap().as_str(),
            "https://api.example.com"
        );
        let with_path = BaseUrl::parse("https://h.example.com/openai/").unwrap();
        assert_eq!(with_path.as_str(), "https://h.example.com/openai");
        assert_eq!(
            BaseUrl::parse("https://api.example.com")
                .unwrap()
                .endpoint("chat/completions"),
            "https://api.example.com/v1/chat/completions"
        );
        for bad in [
            "ftp://api.example.com",
            "http://api.example.com/v1",
            "http://user:pw@api.example.com",
            "https://user:pw@api.example.com",
            "https://api.example.com?x=1",
            "https://api.example.com#frag",
            "https://api.example.com/v1",
            "https://api.example.com/v1/",
            "not a url",
            "https://",
            "",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad} accepted");
        }
        // Found by fuzzing: a host named `v1` is not a `/v1` path.
        assert_eq!(
            BaseUrl::parse("https://v1/").unwrap().as_str(),
            "https://v1"
        );
        assert!(BaseUrl::parse("https://v1/V1").is_err());
        // Also found by fuzzing: 723 bytes that percent-encode to over 2048.
        let long = format!("https://h.example.com/{}x", " ".repeat(700));
        assert!(long.len() < 2048 && BaseUrl::parse(&long).is_err());
        assert!(BaseUrl::parse("https://api.example.com/v1")
            .unwrap_err()
            .message
            .contains("appends /v1/chat/completions"));
        assert_eq!(
            BaseUrl::parse("https://2130706433").unwrap().host(),
            Some(url::Host::Ipv4("127.0.0.1".parse().unwrap()))
        );
    }

    #[test]
    fn plain_http_parses_but_needs_the_opt_in() {
        let http = BaseUrl::parse("http://127.0.0.1:8000/").unwrap();
        assert_eq!(http.as_str(), "http://127.0.0.1:8000");
        assert!(http.is_plain_http());
        let e = http.check_scheme(false).unwrap_err();
        assert_eq!(e.field, "base_url");
        assert!(e.message.contains("LLMGW_UPSTREAM_ALLOW_HTTP=true"), "{e}");
        assert!(http.check_scheme(true).is_ok());
        let https = BaseUrl::parse("https://api.example.com").unwrap();
        assert!(!https.is_plain_http() && https.check_scheme(false).is_ok());
        // The scheme is compared as the URL parser normalized it.
        assert!(BaseUrl::parse("HTTP://h.example.com")
            .unwrap()
            .check_scheme(false)
            .is_err());
        assert!(BaseUrl::parse("ftp://h.example.com")
            .unwrap_err()
            .message
            .contains("LLMGW_UPSTREAM_ALLOW_HTTP"));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Owner > Role::Admin && Role::Admin > Role::Member);
    }

    #[test]
    fn roles_read_back_what_they_write() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert_eq!(Role::from_db(r.as_str()), r);
        }
        for bad in ["", "Owner", "admin ", "root"] {
            assert_eq!(Role::parse(bad), None, "{bad:?}");
        }
    }

    /// The pattern the OpenAPI document states and the check agree.
    #[test]
    fn the_provider_name_pattern_is_the_check() {
        let re = regex::Regex::new(PROVIDER_NAME_PATTERN).unwrap();
        for s in [
            "",
            "a",
            "abc",
            "aBc",
            "a1",
            "a-b",
            "a_b",
            "a b",
            "caf\u{e9}",
            "abc\n",
            "\nabc",
            "\u{ff41}",
            "z",
        ] {
            assert_eq!(ProviderName::is_valid(s), re.is_match(s), "{s:?}");
        }
        let long = "a".repeat(PROVIDER_NAME_MAX_LEN);
        assert!(ProviderName::is_valid(&long));
        assert!(!ProviderName::is_valid(&format!("{long}a")));
    }
}
