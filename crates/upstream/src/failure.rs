//! Why a call to an upstream failed, in the words a client may see: a short
//! class and a fixed hint, never an address, a host's resolution or a cause
//! chain (those go to the log). Found by downcasting the error's sources to
//! the types this crate and rustls raise, never by reading message text.
//!
//! What a client can still learn about a name it cannot resolve itself (the
//! internal DNS view): whether it resolves at all, and then one bit, whether
//! any of its addresses is allowed or all are refused ("address not
//! allowed"). The addresses themselves, and which range refused them, stay
//! in the log. Save time tells even less: an unresolvable name is accepted.

use std::error::Error as StdError;
use std::io;
use std::net::IpAddr;

/// A failure's class: what went wrong, as a client may be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The SSRF policy refused the address (literal or resolved).
    AddressNotAllowed,
    /// A plain-http base URL while `LLMGW_UPSTREAM_ALLOW_HTTP` is off.
    PlainHttpNotAllowed,
    /// The host name did not resolve.
    NameDoesNotResolve,
    /// The certificate chain does not lead to a trusted root.
    TlsUntrusted,
    /// The certificate is not for this host name.
    TlsWrongHost,
    /// The certificate expired or is not valid yet.
    TlsExpired,
    /// Any other TLS failure (often: the port does not speak TLS).
    Tls,
    ConnectionRefused,
    /// No route to the host or network.
    Unreachable,
    /// The connection closed or reset before the answer was complete.
    ConnectionBroke,
    TimedOut,
    /// The provider answered with this (unsuccessful) status.
    Status(u16),
    /// Anything else.
    Failed,
}

impl FailureClass {
    /// The fixed hint for this class, if there is one to give.
    pub fn hint(self) -> Option<&'static str> {
        Some(match self {
            Self::AddressNotAllowed => PRIVATE_HINT,
            Self::PlainHttpNotAllowed => {
                "use https://, or have the operator set LLMGW_UPSTREAM_ALLOW_HTTP=true (self-hosted servers on a private network)"
            }
            Self::NameDoesNotResolve => "check the host name in base_url",
            Self::TlsUntrusted => "set LLMGW_UPSTREAM_CA_FILE for an internal CA",
            Self::TlsWrongHost => "use a host name the provider's certificate names",
            Self::TlsExpired => "the provider's certificate must be renewed",
            Self::Tls => "check that base_url's host and port serve HTTPS",
            Self::ConnectionRefused => {
                "check base_url's host and port, and that the server is running"
            }
            Self::Status(401 | 403) => "check the provider's token",
            Self::Status(404) => {
                "check base_url: the gateway appends /v1/… itself, so leave it out"
            }
            _ => return None,
        })
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AddressNotAllowed => "address not allowed",
            Self::PlainHttpNotAllowed => "plain http not allowed",
            Self::NameDoesNotResolve => "name does not resolve",
            Self::TlsUntrusted => "TLS failure: certificate not trusted",
            Self::TlsWrongHost => "TLS failure: certificate not valid for this host",
            Self::TlsExpired => "TLS failure: certificate expired or not yet valid",
            Self::Tls => "TLS failure",
            Self::ConnectionRefused => "connection refused",
            Self::Unreachable => "host unreachable",
            Self::ConnectionBroke => "connection broken",
            Self::TimedOut => "timed out",
            Self::Status(s) => return write!(f, "HTTP {s}"),
            Self::Failed => "request failed",
        })
    }
}

/// Hint given with every SSRF refusal.
pub(crate) const PRIVATE_HINT: &str =
    "set LLMGW_UPSTREAM_ALLOW_PRIVATE=true to allow private and loopback upstreams (self-hosted deployments)";

/// The client-safe description of a failed upstream call. Its `Display` is
/// `class` or `class — hint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure {
    pub class: FailureClass,
    pub hint: Option<&'static str>,
}

impl StdError for UpstreamFailure {}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hint {
            Some(h) => write!(f, "{} — {h}", self.class),
            None => write!(f, "{}", self.class),
        }
    }
}

impl From<FailureClass> for UpstreamFailure {
    fn from(class: FailureClass) -> Self {
        Self {
            class,
            hint: class.hint(),
        }
    }
}

impl UpstreamFailure {
    /// An unsuccessful HTTP status from the provider.
    pub fn status(status: u16) -> Self {
        FailureClass::Status(status).into()
    }

    /// Classifies a failed call by the errors in its source chain.
    pub fn of(e: &reqwest::Error) -> Self {
        Self::of_error(e).unwrap_or_else(|| {
            let class = if e.is_timeout() {
                FailureClass::TimedOut
            } else if e.is_body() || e.is_decode() {
                FailureClass::ConnectionBroke
            } else if let Some(s) = e.status() {
                FailureClass::Status(s.as_u16())
            } else {
                FailureClass::Failed
            };
            class.into()
        })
    }

    /// Classifies any error by its source chain; `None` when nothing in it is known.
    pub fn of_error(e: &(dyn StdError + 'static)) -> Option<Self> {
        let chain: Vec<&(dyn StdError + 'static)> = causes(e).collect();
        // The most telling cause wins, wherever it sits in the chain.
        let find = |f: &dyn Fn(&(dyn StdError + 'static)) -> Option<FailureClass>| {
            chain.iter().find_map(|c| f(*c))
        };
        let class = find(&|c| {
            c.is::<ForbiddenAddress>()
                .then_some(FailureClass::AddressNotAllowed)
        })
        .or_else(|| {
            find(&|c| {
                c.is::<NameNotResolved>()
                    .then_some(FailureClass::NameDoesNotResolve)
            })
        })
        .or_else(|| find(&|c| c.downcast_ref::<rustls::Error>().map(tls_class)))
        .or_else(|| find(&|c| c.downcast_ref::<io::Error>().and_then(io_class)))?;
        Some(class.into())
    }
}

fn tls_class(e: &rustls::Error) -> FailureClass {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature | C::UnknownRevocationStatus => {
                FailureClass::TlsUntrusted
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => FailureClass::TlsWrongHost,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => FailureClass::TlsExpired,
            _ => FailureClass::Tls,
        },
        _ => FailureClass::Tls,
    }
}

fn io_class(e: &io::Error) -> Option<FailureClass> {
    use io::ErrorKind as K;
    Some(match e.kind() {
        K::ConnectionRefused => FailureClass::ConnectionRefused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            FailureClass::ConnectionBroke
        }
        K::TimedOut => FailureClass::TimedOut,
        K::HostUnreachable | K::NetworkUnreachable => FailureClass::Unreachable,
        _ => return None,
    })
}

/// Each error in a chain, looking inside `io::Error`s (whose `source` skips
/// the error they wrap), for classification and for logs.
pub fn causes<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> + 'a {
    std::iter::successors(Some(e), |c: &&'a (dyn StdError + 'static)| {
        let c: &'a (dyn StdError + 'static) = *c;
        match c.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => c.source(),
        }
    })
    .take(32)
}

/// `error: cause: cause…`, for logs only (it may name addresses).
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = String::new();
    for c in causes(e) {
        let s = c.to_string();
        // Wrappers often repeat their source's text.
        if out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// The SSRF policy refused an address (raised before any connection is made,
/// and by the resolver at connect time). Its text names the address: logs only.
#[derive(Debug, thiserror::Error)]
#[error("{host} is refused: {ip} is {range}")]
pub struct ForbiddenAddress {
    pub host: String,
    pub ip: IpAddr,
    pub range: &'static str,
}

/// A host name did not resolve at connect time. Its text: logs only.
#[derive(Debug, thiserror::Error)]
#[error("{host} does not resolve")]
pub struct NameNotResolved {
    pub host: String,
    #[source]
    pub source: Option<io::Error>,
}

impl From<&ForbiddenAddress> for UpstreamFailure {
    fn from(_: &ForbiddenAddress) -> Self {
        FailureClass::AddressNotAllowed.into()
    }
}
