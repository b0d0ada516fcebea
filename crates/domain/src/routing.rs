//! How a provider's upstream is reached, as admins configure it: the weight
//! of each endpoint, static extra headers (secret values), timeouts, and the
//! health the gateways report per endpoint. Parsed once from the client's
//! JSON into types that cannot hold a bad value; refusals name the field
//! and, for headers, the header, never a value.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ValidationError;

/// Smallest endpoint weight.
pub const WEIGHT_MIN: u16 = 1;
/// Largest endpoint weight.
pub const WEIGHT_MAX: u16 = 1000;
/// Most endpoints a provider has, its own included.
pub const MAX_ENDPOINTS: usize = 32;

/// An endpoint's share of its provider's traffic, relative to the others':
/// an integer from [`WEIGHT_MIN`] to [`WEIGHT_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Weight(u16);

impl Default for Weight {
    fn default() -> Self {
        Self(WEIGHT_MIN)
    }
}

impl Weight {
    /// Reads a JSON integer (a string or a fraction is refused).
    pub fn parse(value: &Value) -> Result<Self, ValidationError> {
        value
            .as_u64()
            .filter(|w| (u64::from(WEIGHT_MIN)..=u64::from(WEIGHT_MAX)).contains(w))
            .map(|w| Self(w as u16))
            .ok_or_else(|| {
                ValidationError::new(
                    "weight",
                    format!("weight must be an integer from {WEIGHT_MIN} to {WEIGHT_MAX}"),
                )
            })
    }

    pub fn get(self) -> u16 {
        self.0
    }

    /// Wraps a value read back from the database, where a CHECK holds the range.
    pub fn from_db(raw: i32) -> Self {
        Self(raw.clamp(i32::from(WEIGHT_MIN), i32::from(WEIGHT_MAX)) as u16)
    }
}

/// Most static headers a provider has.
pub const MAX_HEADERS: usize = 32;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 128;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Most bytes all names and values of a provider's headers take together.
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;
/// What a header name is (an HTTP token), for the OpenAPI document.
pub const HEADER_NAME_PATTERN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$";
/// What a header value is, for the OpenAPI document: printable ASCII
/// without leading or trailing spaces, as for tokens.
pub const HEADER_VALUE_PATTERN: &str = crate::secrets::TOKEN_PATTERN;

/// Header names an admin may not set, lowercase, each with why: the gateway
/// owns them (credentials, framing, tracing, request ids), or they are
/// hop-by-hop and mean nothing past one connection.
pub const RESERVED_HEADERS: &[(&str, &str)] = &[
    (
        "authorization",
        "the gateway sends the endpoint's token in it",
    ),
    ("host", "the gateway sets it from the endpoint's base URL"),
    ("content-length", "the gateway frames the request body"),
    ("transfer-encoding", "the gateway frames the request body"),
    ("content-type", "the gateway sets it for the body it sends"),
    ("content-encoding", "the gateway sends the body as it is"),
    (
        "accept-encoding",
        "the gateway reads the upstream's answer (usage, errors) and needs it unencoded",
    ),
    ("connection", "it is a hop-by-hop header"),
    ("keep-alive", "it is a hop-by-hop header"),
    ("te", "it is a hop-by-hop header"),
    ("trailer", "it is a hop-by-hop header"),
    ("upgrade", "it is a hop-by-hop header"),
    ("expect", "the gateway sends the body without waiting"),
    ("x-request-id", "the gateway sends each request's own id"),
    (
        "traceparent",
        "the gateway passes on each request's trace context",
    ),
    (
        "tracestate",
        "the gateway passes on each request's trace context",
    ),
];

/// Header-name prefixes an admin may not use, lowercase, with why.
pub const RESERVED_HEADER_PREFIXES: &[(&str, &str)] = &[
    ("proxy-", "Proxy-* headers are hop-by-hop"),
    ("x-llmgw-", "the x-llmgw- prefix is the gateway's own"),
];

/// Why `name` may not be a static header, if it may not.
pub fn reserved_header(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    RESERVED_HEADERS
        .iter()
        .find(|(n, _)| *n == lower)
        .or_else(|| {
            RESERVED_HEADER_PREFIXES
                .iter()
                .find(|(p, _)| lower.starts_with(p))
        })
        .map(|(_, why)| *why)
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A provider's static extra upstream headers: names as given (compared
/// case-insensitively), values secret. `Debug` prints the names only.
#[derive(Clone, Default)]
pub struct StaticHeaders(Vec<(String, SecretString)>);

impl fmt::Debug for StaticHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(n, _)| (n, "[REDACTED]")))
            .finish()
    }
}

impl StaticHeaders {
    /// Reads the client's `headers` object (`null` or `{}`: none). Every
    /// refusal has the field `headers` and names the header it is about.
    pub fn parse(value: &Value) -> Result<Self, Vec<ValidationError>> {
        let err = |m: String| ValidationError::new("headers", m);
        let Some(map) = crate::settings_object(
            value,
            "headers",
            "headers must be an object of header name to value (or null for none)",
        )?
        else {
            return Ok(Self::default());
        };
        if map.len() > MAX_HEADERS {
            return Err(vec![err(format!(
                "headers may hold at most {MAX_HEADERS} headers"
            ))]);
        }
        let mut errors = Vec::new();
        let mut out: Vec<(String, SecretString)> = Vec::with_capacity(map.len());
        let mut bytes = 0;
        for (name, v) in map {
            if name.is_empty()
                || name.len() > MAX_HEADER_NAME_LEN
                || !name.bytes().all(is_token_char)
            {
                // Not echoed: it may hold anything, control characters included.
                errors.push(err(format!(
                    "a header name must be 1 to {MAX_HEADER_NAME_LEN} letters, digits or !#$%&'*+-.^_`|~"
                )));
                continue;
            }
            if let Some(why) = reserved_header(name) {
                errors.push(err(format!("{name} cannot be a static header: {why}")));
                continue;
            }
            if out.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                errors.push(err(format!(
                    "{name} is given more than once (header names are case-insensitive)"
                )));
                continue;
            }
            let Some(value) = v.as_str().filter(|s| is_header_value(s)) else {
                errors.push(err(format!(
                    "the value of {name} must be a string of 1 to {MAX_HEADER_VALUE_LEN} printable ASCII characters without leading or trailing spaces"
                )));
                continue;
            };
            bytes += name.len() + value.len();
            out.push((name.clone(), SecretString::from(value.to_owned())));
        }
        if bytes > MAX_HEADERS_BYTES {
            errors.push(err(format!(
                "headers may take at most {MAX_HEADERS_BYTES} bytes of names and values together"
            )));
        }
        if errors.is_empty() {
            Ok(Self(out))
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, as given: what answers show.
    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Each name with its value, for the upstream request.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.expose_secret()))
    }

    /// What is sealed: a JSON object of name to value.
    pub fn to_plaintext(&self) -> Vec<u8> {
        let map: Map<String, Value> = self
            .iter()
            .map(|(n, v)| (n.to_owned(), Value::String(v.to_owned())))
            .collect();
        serde_json::to_vec(&map).expect("a map of strings serializes")
    }

    /// Reads what [`StaticHeaders::to_plaintext`] sealed (validated when
    /// saved, and again here: a value that is no header value opens nothing).
    pub fn from_decrypted(plain: &[u8]) -> Option<Self> {
        let value: Value = serde_json::from_slice(plain).ok()?;
        Self::parse(&value).ok()
    }
}

fn is_header_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_HEADER_VALUE_LEN
        && s.trim() == s
        && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Largest timeout, in milliseconds (ten minutes).
pub const MAX_TIMEOUT_MS: u32 = 600_000;
/// The fields of [`Timeouts`], in the order answers list them.
pub const TIMEOUT_FIELDS: [&str; 3] = ["connect_ms", "first_byte_ms", "total_ms"];

/// A provider's own timeouts; `None`: the gateway's setting. Each is from
/// 1 to [`MAX_TIMEOUT_MS`] ms, and neither the connect nor the first-byte
/// timeout exceeds the total one when both are set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// To establish the connection (TCP and TLS).
    #[serde(default)]
    pub connect_ms: Option<u32>,
    /// From sending the request to the answer's first byte.
    #[serde(default)]
    pub first_byte_ms: Option<u32>,
    /// For the whole exchange, the answer's body included.
    #[serde(default)]
    pub total_ms: Option<u32>,
}

impl Timeouts {
    /// Reads the client's `timeouts` object (`null` or `{}`: the gateway's
    /// settings for all three). Fields are named `timeouts.<name>`.
    pub fn parse(value: &Value) -> Result<Self, Vec<ValidationError>> {
        let Some(map) = crate::settings_object(
            value,
            "timeouts",
            "timeouts must be an object with connect_ms, first_byte_ms, total_ms (or null for the gateway's settings)",
        )?
        else {
            return Ok(Self::default());
        };
        let mut out = Self::default();
        let mut errors = Vec::new();
        for (k, v) in map {
            let (field, slot) = match k.as_str() {
                "connect_ms" => ("timeouts.connect_ms", &mut out.connect_ms),
                "first_byte_ms" => ("timeouts.first_byte_ms", &mut out.first_byte_ms),
                "total_ms" => ("timeouts.total_ms", &mut out.total_ms),
                _ => {
                    errors.push(ValidationError::new(
                        "timeouts",
                        format!(
                            "timeouts has an unknown field; the fields are {}",
                            TIMEOUT_FIELDS.join(", ")
                        ),
                    ));
                    continue;
                }
            };
            match crate::optional_integer(v, 1..=u64::from(MAX_TIMEOUT_MS)) {
                Ok(ms) => *slot = ms.map(|ms| ms as u32),
                Err(()) => errors.push(ValidationError::new(
                    field,
                    format!("{field} must be an integer number of milliseconds from 1 to {MAX_TIMEOUT_MS}, or null for the gateway's setting"),
                )),
            }
        }
        if let Some(total) = out.total_ms {
            for (field, part) in [
                ("timeouts.connect_ms", out.connect_ms),
                ("timeouts.first_byte_ms", out.first_byte_ms),
            ] {
                if part.is_some_and(|p| p > total) {
                    errors.push(ValidationError::new(
                        field,
                        format!("{field} must not exceed timeouts.total_ms"),
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn connect(&self) -> Option<Duration> {
        self.connect_ms.map(|ms| Duration::from_millis(ms.into()))
    }

    pub fn first_byte(&self) -> Option<Duration> {
        self.first_byte_ms
            .map(|ms| Duration::from_millis(ms.into()))
    }

    pub fn total(&self) -> Option<Duration> {
        self.total_ms.map(|ms| Duration::from_millis(ms.into()))
    }
}

/// An endpoint's health as the gateways see it (the worst of their
/// reports); `Unknown` while none is available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointHealth {
    #[default]
    Unknown,
    Healthy,
    /// Taken out of rotation after repeated failures.
    Ejected,
    /// Being probed before it gets traffic again.
    Probing,
}

impl EndpointHealth {
    /// Every value, in the order the document lists them.
    pub const ALL: [EndpointHealth; 4] = [
        EndpointHealth::Healthy,
        EndpointHealth::Ejected,
        EndpointHealth::Probing,
        EndpointHealth::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Ejected => "ejected",
            Self::Probing => "probing",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(r: Result<StaticHeaders, Vec<ValidationError>>) -> Vec<String> {
        r.unwrap_err()
            .into_iter()
            .map(|e| {
                assert_eq!(e.field, "headers");
                e.message
            })
            .collect()
    }

    #[test]
    fn weights_are_integers_in_range() {
        assert_eq!(Weight::parse(&json!(1)).unwrap().get(), 1);
        assert_eq!(Weight::parse(&json!(1000)).unwrap().get(), 1000);
        for bad in [
            json!(0),
            json!(1001),
            json!(-1),
            json!(1.5),
            json!("5"),
            json!(null),
        ] {
            let e = Weight::parse(&bad).unwrap_err();
            assert_eq!(e.field, "weight");
            assert!(e.message.contains("1 to 1000"), "{e}");
        }
        assert_eq!(Weight::default().get(), 1);
    }

    #[test]
    fn headers_parse_and_keep_their_values_out_of_debug() {
        let h = StaticHeaders::parse(
            &json!({"X-Tenant": "acme", "api-key": "sk-header-secret", "OpenAI-Organization": "org 1"}),
        )
        .unwrap();
        assert_eq!(h.names().len(), 3);
        assert!(h
            .iter()
            .any(|(n, v)| n == "api-key" && v == "sk-header-secret"));
        assert!(!format!("{h:?}").contains("sk-header-secret"));
        let back = StaticHeaders::from_decrypted(&h.to_plaintext()).unwrap();
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            h.iter().collect::<Vec<_>>()
        );
        assert!(StaticHeaders::parse(&json!(null)).unwrap().is_empty());
        assert!(StaticHeaders::parse(&json!({})).unwrap().is_empty());
    }

    #[test]
    fn reserved_and_malformed_headers_are_refused_by_name_never_by_value() {
        for name in [
            "Authorization",
            "host",
            "Content-Length",
            "Transfer-Encoding",
            "Connection",
            "Keep-Alive",
            "Proxy-Authorization",
            "proxy-connection",
            "TE",
            "Trailer",
            "Upgrade",
            "X-Request-Id",
            "traceparent",
            "X-LLMGW-Model",
        ] {
            let m = messages(StaticHeaders::parse(&json!({ name: "v" })));
            assert_eq!(m.len(), 1);
            assert!(m[0].starts_with(name), "{m:?}");
        }
        let m = messages(StaticHeaders::parse(
            &json!({"X-A": "ok", "x-a": "dup", "X-B": "bad\nvalue-SECRET", "X C": "v", "X-D": 5, "X-E": " pad"}),
        ));
        assert_eq!(m.len(), 5, "{m:?}");
        assert!(m
            .iter()
            .all(|m| !m.contains("SECRET") && !m.contains("X C")));
        assert!(m.iter().any(|m| m.contains("x-a is given more than once")));
        let many: Map<String, Value> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-{i}"), json!("v")))
            .collect();
        assert_eq!(
            messages(StaticHeaders::parse(&Value::Object(many))).len(),
            1
        );
        let big: Map<String, Value> = (0..5)
            .map(|i| (format!("x-{i}"), json!("v".repeat(4000))))
            .collect();
        assert!(messages(StaticHeaders::parse(&Value::Object(big)))[0].contains("16384 bytes"));
        assert_eq!(messages(StaticHeaders::parse(&json!(["x"]))).len(), 1);
    }

    #[test]
    fn timeouts_are_bounded_and_ordered() {
        let t = Timeouts::parse(&json!({"connect_ms": 2000, "total_ms": 60000})).unwrap();
        assert_eq!(t.connect(), Some(Duration::from_secs(2)));
        assert_eq!(t.first_byte(), None);
        assert!(Timeouts::parse(&json!(null)).unwrap().is_empty());
        let fields = |v: Value| -> Vec<&'static str> {
            Timeouts::parse(&v)
                .unwrap_err()
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(fields(json!({"connect_ms": 0})), ["timeouts.connect_ms"]);
        assert_eq!(fields(json!({"total_ms": 600001})), ["timeouts.total_ms"]);
        assert_eq!(
            fields(json!({"first_byte_ms": "5"})),
            ["timeouts.first_byte_ms"]
        );
        assert_eq!(
            fields(json!({"first_byte_ms": 1.5})),
            ["timeouts.first_byte_ms"]
        );
        assert_eq!(fields(json!({"idle_ms": 5})), ["timeouts"]);
        assert_eq!(fields(json!(5)), ["timeouts"]);
        assert_eq!(
            fields(json!({"connect_ms": 5000, "first_byte_ms": 9000, "total_ms": 4000})),
            ["timeouts.connect_ms", "timeouts.first_byte_ms"]
        );
        // Stored and answered with every field, null when unset.
        assert_eq!(
            serde_json::to_value(t).unwrap(),
            json!({"connect_ms": 2000, "first_byte_ms": null, "total_ms": 60000})
        );
    }

    #[test]
    fn the_header_patterns_are_the_checks() {
        let name = regex::Regex::new(HEADER_NAME_PATTERN).unwrap();
        for s in ["X-A", "a", "x y", "", "é", "x:y", &"a".repeat(129)] {
            let parsed = StaticHeaders::parse(&json!({ s: "v" })).is_ok();
            assert_eq!(name.is_match(s), parsed, "{s:?}");
        }
    }
}
