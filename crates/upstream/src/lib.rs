//! The HTTPS client every call to a provider goes through (the gateway's
//! proxying and the settings API's connectivity test), with the SSRF policy:
//! loopback, private, link-local, CGNAT, unspecified, multicast and other
//! special-purpose addresses are refused unless private upstreams are allowed
//! (the ranges: [`policy`]). Names are checked when saved and again,
//! unbypassably, when connecting: the client's resolver drops forbidden
//! addresses, which defeats DNS rebinding. Every refusal and failure leaves
//! this crate as an [`UpstreamFailure`] (a class and a fixed hint, safe to
//! show a client; the detail is for the log): see [`failure`]. The model
//! routes every caller asks alike are in [`models`].

pub mod body;
pub mod failure;
pub mod models;
pub mod policy;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::BaseUrl;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Host;

pub use failure::{
    causes, error_chain, FailureClass, ForbiddenAddress, NameNotResolved, UpstreamFailure,
};
pub use policy::{forbidden_range, is_forbidden};

/// `Authorization: Bearer {token}`, marked sensitive (redacted in `Debug`);
/// `None` when the token cannot be a header value.
pub fn bearer(token: &str) -> Option<reqwest::header::HeaderValue> {
    let mut auth = reqwest::header::HeaderValue::try_from(format!("Bearer {token}")).ok()?;
    auth.set_sensitive(true);
    Some(auth)
}

/// How the client reaches upstreams.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `LLMGW_UPSTREAM_ALLOW_PRIVATE`: permit private addresses (self-hosted).
    pub allow_private: bool,
    /// `LLMGW_UPSTREAM_ALLOW_HTTP`: permit plain-`http://` base URLs.
    pub allow_http: bool,
    /// `LLMGW_UPSTREAM_CA_FILE`: extra PEM roots (internal CAs).
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// `LLMGW_UPSTREAM_HTTP2`: use HTTP/2 when an upstream offers it (ALPN).
    /// Many streams then share one connection (far less memory per open
    /// stream); off, every request gets its own HTTP/1.1 connection.
    pub http2: bool,
    /// Total time for a non-streamed answer; for streams, the time to the
    /// response head and the longest silence between chunks.
    pub timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            allow_http: false,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            http2: false,
            timeout: Duration::from_secs(300),
        }
    }
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read upstream CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upstream CA file {0} holds no valid PEM certificate")]
    CaPem(PathBuf),
    #[error("cannot build HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The IP of a URL host that is an address literal, in any spelling the
/// URL parser normalizes (`2130706433`, `127.1`, `[::ffff:127.0.0.1]`).
pub fn literal_ip(host: &Host<String>) -> Option<IpAddr> {
    match host {
        Host::Ipv4(v4) => Some(IpAddr::V4(*v4)),
        Host::Ipv6(v6) => Some(IpAddr::V6(*v6)),
        Host::Domain(_) => None,
    }
}

/// Save-time check: refuses literal or resolved forbidden addresses; a name
/// that does not resolve is accepted (the connect-time check still applies).
/// The refusal names no address (logged at info instead): see [`failure`].
pub async fn check_base_url(url: &BaseUrl, allow_private: bool) -> Result<(), UpstreamFailure> {
    if allow_private {
        return Ok(());
    }
    let refused = |host: &str, ip: IpAddr, range: &'static str| {
        let e = ForbiddenAddress {
            host: host.to_owned(),
            ip,
            range,
        };
        tracing::info!(error = %e, "base_url refused by the SSRF policy at save time");
        UpstreamFailure::from(&e)
    };
    let Some(host) = url.host() else {
        return Err(FailureClass::AddressNotAllowed.into());
    };
    if let Some(ip) = literal_ip(&host) {
        return match forbidden_range(ip) {
            Some(range) => Err(refused(&host.to_string(), ip, range)),
            None => Ok(()),
        };
    }
    let Host::Domain(name) = host else {
        return Ok(());
    };
    let lookup = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::lookup_host((name.as_str(), 443)),
    )
    .await;
    if let Ok(Ok(addrs)) = lookup {
        for a in addrs {
            if let Some(range) = forbidden_range(a.ip()) {
                return Err(refused(&name, a.ip(), range));
            }
        }
    }
    Ok(())
}

/// Resolver that drops forbidden addresses at connect time.
#[derive(Debug, Clone)]
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str();
            let all: Vec<SocketAddr> = match tokio::net::lookup_host((host, 0)).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    return Err(Box::new(NameNotResolved {
                        host: host.to_owned(),
                        source: Some(e),
                    })
                        as Box<dyn std::error::Error + Send + Sync>)
                }
            };
            let allowed: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_forbidden(a.ip()))
                .collect();
            if allowed.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match all.first() {
                    None => Box::new(NameNotResolved {
                        host: host.to_owned(),
                        source: None,
                    }),
                    Some(a) => Box::new(ForbiddenAddress {
                        host: host.to_owned(),
                        ip: a.ip(),
                        range: forbidden_range(a.ip()).unwrap_or("refused"),
                    }),
                };
                return Err(err);
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The client for every upstream call, plus the policy for address literals
/// (which never reach a resolver).
///
/// Each thread gets its own `reqwest::Client` built from the same settings:
/// a pooled connection is driven by a task on the runtime that opened it, so
/// one client shared by the server's per-thread runtimes would pay a
/// cross-thread wake-up per read and write, and would lose its connections
/// when the thread that opened them stops first (graceful shutdown).
///
/// A connect timeout is client-wide in reqwest, so a provider's own
/// `connect_ms` ([`Self::http_with`]) gets a client of its own, built
/// lazily from the same settings (TLS roots, SSRF guard, no redirects):
/// at most [`MAX_CONNECT_TIMEOUTS`] distinct timeouts besides the global one.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    settings: Arc<Settings>,
    allow_private: bool,
    allow_http: bool,
    timeout: Duration,
}

#[derive(Debug)]
struct Settings {
    cfg: UpstreamConfig,
    roots: Vec<reqwest::Certificate>,
    /// Built in `new` with the same guards; used if a thread's own build
    /// ever fails, so the SSRF guard and no-redirect rule fail closed.
    fallback: Option<reqwest::Client>,
    /// The connect timeouts other than `cfg.connect_timeout` given a client
    /// so far (every thread builds the same ones), [`MAX_CONNECT_TIMEOUTS`] at most.
    connects: Mutex<Vec<Duration>>,
}

/// Distinct per-provider connect timeouts with a client of their own; a
/// further one is served by the client whose timeout is nearest (logged).
pub const MAX_CONNECT_TIMEOUTS: usize = 16;

impl Settings {
    /// The connect timeout a client is built with for a call asking `want`.
    fn connect_timeout(&self, want: Option<Duration>) -> Duration {
        let global = self.cfg.connect_timeout;
        let Some(want) = want.filter(|w| *w != global) else {
            return global;
        };
        let mut known = self.connects.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(&want) {
            return want;
        }
        if known.len() < MAX_CONNECT_TIMEOUTS {
            known.push(want);
            return want;
        }
        let near = known
            .iter()
            .copied()
            .chain([global])
            .min_by_key(|d| d.abs_diff(want))
            .unwrap_or(global);
        tracing::warn!(
            wanted_ms = want.as_millis() as u64,
            used_ms = near.as_millis() as u64,
            "more than {MAX_CONNECT_TIMEOUTS} distinct provider connect timeouts; using the nearest one"
        );
        near
    }
}

/// This thread's clients: the settings they were built from, their connect
/// timeout, the client. Entries of dropped `UpstreamClient`s are pruned when
/// a new one is added.
type ThreadClients = Vec<(std::sync::Weak<Settings>, Duration, reqwest::Client)>;

thread_local! {
    static CLIENTS: std::cell::RefCell<ThreadClients> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Why [`UpstreamClient::check`] refuses a base URL before connecting. Its
/// text may name the address: logs only; clients get its [`UpstreamFailure`].
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Address(#[from] ForbiddenAddress),
    /// Saved while `LLMGW_UPSTREAM_ALLOW_HTTP` was on, which it is no longer.
    #[error("plain-http base URL while LLMGW_UPSTREAM_ALLOW_HTTP is off")]
    PlainHttp,
}

impl From<&Refused> for UpstreamFailure {
    fn from(r: &Refused) -> Self {
        match r {
            Refused::Address(a) => a.into(),
            Refused::PlainHttp => FailureClass::PlainHttpNotAllowed.into(),
        }
    }
}

impl UpstreamClient {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, BuildError> {
        let mut roots = Vec::new();
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|source| BuildError::CaFile {
                path: path.clone(),
                source,
            })?;
            roots = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|_| BuildError::CaPem(path.clone()))?;
            if roots.is_empty() {
                return Err(BuildError::CaPem(path.clone()));
            }
        }
        let mut settings = Settings {
            cfg: cfg.clone(),
            roots,
            fallback: None,
            connects: Mutex::new(Vec::new()),
        };
        // Build once now so a bad setting fails at startup, not on a request.
        settings.fallback = Some(Self::build(&settings, cfg.connect_timeout)?);
        Ok(Self {
            settings: Arc::new(settings),
            allow_private: cfg.allow_private,
            allow_http: cfg.allow_http,
            timeout: cfg.timeout,
        })
    }

    fn build(s: &Settings, connect_timeout: Duration) -> Result<reqwest::Client, BuildError> {
        let cfg = &s.cfg;
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            // Backs up `check`: without the opt-in, no request goes out in clear text.
            .https_only(!cfg.allow_http)
            .tcp_nodelay(true)
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .user_agent(concat!("llmgw/", env!("CARGO_PKG_VERSION")));
        if !cfg.http2 {
            // One request per connection at a time: a misbehaving stream cannot
            // stall others, and self-hosted servers mostly speak HTTP/1.1 anyway.
            b = b.http1_only();
            // reqwest's own retries are for HTTP/2 refusals (REFUSED_STREAM,
            // a graceful GOAWAY), which HTTP/1.1 never sends; left on, they
            // copy every request's headers in case. The gateway's own retries
            // and fallbacks (README, "When llmgw retries") are unaffected.
            b = b.retry(reqwest::retry::never().max_retries_per_request(0));
        }
        if !cfg.allow_private {
            b = b.dns_resolver(Arc::new(GuardedResolver));
        }
        for c in &s.roots {
            b = b.add_root_certificate(c.clone());
        }
        Ok(b.build()?)
    }

    /// This thread's client, for building requests after [`Self::check`].
    pub fn http(&self) -> reqwest::Client {
        self.http_with(None)
    }

    /// This thread's client whose connect timeout is `connect` (a
    /// provider's `connect_ms`; `None`: the global one), built on first use.
    pub fn http_with(&self, connect: Option<Duration>) -> reqwest::Client {
        let mine = |c: &ThreadClients, timeout: Duration| {
            c.iter()
                .find(|(s, t, _)| {
                    *t == timeout && std::ptr::eq(s.as_ptr(), Arc::as_ptr(&self.settings))
                })
                .map(|(_, _, client)| client.clone())
        };
        CLIENTS.with(|c| {
            let wanted = connect.unwrap_or(self.settings.cfg.connect_timeout);
            if let Some(client) = mine(&c.borrow(), wanted) {
                return client;
            }
            let timeout = self.settings.connect_timeout(connect);
            if let Some(client) = mine(&c.borrow(), timeout) {
                return client;
            }
            // The same settings built fine in `new`; should a build fail now,
            // the guarded client from `new` serves, never an unguarded default.
            let client = Self::build(&self.settings, timeout)
                .ok()
                .or_else(|| self.settings.fallback.clone())
                .expect("the fallback client is built in `new`");
            let mut c = c.borrow_mut();
            c.retain(|(s, _, _)| s.strong_count() > 0);
            c.push((Arc::downgrade(&self.settings), timeout, client.clone()));
            client
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn allows_private(&self) -> bool {
        self.allow_private
    }

    /// Whether plain-`http://` base URLs may be saved and called.
    pub fn allows_http(&self) -> bool {
        self.allow_http
    }

    /// Connect-time check of the scheme and of address literals; names are
    /// checked by the resolver.
    pub fn check(&self, url: &BaseUrl) -> Result<(), Refused> {
        url.check_scheme(self.allow_http)
            .map_err(|_| Refused::PlainHttp)?;
        if self.allow_private {
            return Ok(());
        }
        let Some(host) = url.host() else {
            return Ok(());
        };
        match literal_ip(&host).and_then(|ip| Some((ip, forbidden_range(ip)?))) {
            Some((ip, range)) => Err(ForbiddenAddress {
                host: host.to_string(),
                ip,
                range,
            }
            .into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(url: &str) -> Option<IpAddr> {
        literal_ip(&BaseUrl::parse(url).unwrap().host().unwrap())
    }

    #[test]
    fn every_spelling_of_a_private_literal_is_forbidden() {
        for url in [
            "https://127.0.0.1",
            "https://127.1",
            "https://2130706433",
            "https://0x7f000001",
            "https://0177.0.0.1",
            "https://[::1]",
            "https://[::ffff:127.0.0.1]",
            "https://[::ffff:7f00:1]",
            "https://[::ffff:0:7f00:1]",
            "https://10.0.0.1",
            "https://172.16.5.4",
            "https://192.168.1.1",
            "https://169.254.169.254",
            "https://100.64.0.1",
            "https://0.0.0.0",
            "https://[::]",
            "https://224.0.0.1",
            "https://[fd00::1]",
            "https://[fe80::1]",
            "https://[ff02::1]",
        ] {
            let ip = host_of(url).unwrap_or_else(|| panic!("{url} not a literal"));
            assert!(is_forbidden(ip), "{url} ({ip}) allowed");
        }
        for url in [
            "https://8.8.8.8",
            "https://1.1.1.1",
            "https://[2606:4700::1111]",
        ] {
            assert!(!is_forbidden(host_of(url).unwrap()), "{url} refused");
        }
    }

    #[test]
    fn plain_http_is_refused_at_connect_time_without_the_opt_in() {
        let http = BaseUrl::parse("http://8.8.8.8:8000").unwrap();
        let off = UpstreamClient::new(&UpstreamConfig::default()).unwrap();
        let e = off.check(&http).unwrap_err();
        assert!(matches!(e, Refused::PlainHttp));
        let told = UpstreamFailure::from(&e).to_string();
        assert!(told.contains("LLMGW_UPSTREAM_ALLOW_HTTP=true"), "{told}");
        let on = UpstreamClient::new(&UpstreamConfig {
            allow_http: true,
            ..UpstreamConfig::default()
        })
        .unwrap();
        assert!(on.check(&http).is_ok());
        // The SSRF guard applies to http all the same.
        let private = BaseUrl::parse("http://127.0.0.1:8000").unwrap();
        assert!(matches!(on.check(&private), Err(Refused::Address(_))));
    }

    #[tokio::test]
    async fn save_time_check_refuses_private_and_accepts_unresolvable() {
        for url in [
            "https://127.0.0.1",
            "https://169.254.169.254",
            "https://[::1]",
            "https://10.0.0.1",
            "https://[2001::1]",
            "https://localhost",
        ] {
            let e = check_base_url(&BaseUrl::parse(url).unwrap(), false)
                .await
                .unwrap_err();
            assert_eq!(e.class, FailureClass::AddressNotAllowed, "{url}");
            let text = e.to_string();
            assert!(
                text.contains("LLMGW_UPSTREAM_ALLOW_PRIVATE"),
                "{url}: {text}"
            );
        }
        assert!(
            check_base_url(&BaseUrl::parse("https://127.0.0.1").unwrap(), true)
                .await
                .is_ok()
        );
        let unresolvable = BaseUrl::parse("https://does-not-exist.invalid").unwrap();
        assert!(check_base_url(&unresolvable, false).await.is_ok());
        assert!(
            check_base_url(&BaseUrl::parse("https://8.8.8.8").unwrap(), false)
                .await
                .is_ok()
        );
    }

    /// The attack: probe the internal network through the refusal's text.
    #[tokio::test]
    async fn save_time_refusals_name_no_address() {
        for url in [
            "https://10.1.2.3",
            "https://[fd12:3456::7]",
            "https://localhost",
            "https://localhost:8443/path",
        ] {
            let e = check_base_url(&BaseUrl::parse(url).unwrap(), false)
                .await
                .unwrap_err();
            let text = e.to_string();
            assert_eq!(
                text,
                format!("address not allowed — {}", failure::PRIVATE_HINT),
                "{url}"
            );
            for leak in ["10.1.2.3", "fd12", "127.0.0.1", "::1", "localhost"] {
                assert!(!text.contains(leak), "{url}: {text}");
            }
        }
    }

    fn client(allow_private: bool, ca: Option<&testkit::TestCa>) -> UpstreamClient {
        UpstreamClient::new(&UpstreamConfig {
            allow_private,
            allow_http: false,
            ca_file: ca.map(|c| c.ca_file.clone()),
            connect_timeout: Duration::from_secs(2),
            http2: false,
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    async fn fail(client: &UpstreamClient, url: &str) -> UpstreamFailure {
        let e = client.http().get(url).send().await.unwrap_err();
        UpstreamFailure::of(&e)
    }

    /// A provider's connect timeout applies, on a client with the same
    /// guards; the global one is untouched.
    #[tokio::test]
    async fn a_provider_connect_timeout_gets_a_client_of_its_own() {
        let hole = testkit::Blackhole::start();
        let slow = UpstreamClient::new(&UpstreamConfig {
            allow_private: true,
            connect_timeout: Duration::from_secs(5),
            ..UpstreamConfig::default()
        })
        .unwrap();
        let url = format!("{}/v1/models", hole.base_url());
        let start = std::time::Instant::now();
        let e = slow
            .http_with(Some(Duration::from_millis(200)))
            .get(&url)
            .send()
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert!(e.is_connect() && e.is_timeout(), "{e:?}");
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
            "{took:?}"
        );
        // The global client still waits longer than that.
        let start = std::time::Instant::now();
        let global = tokio::time::timeout(Duration::from_millis(600), slow.http().get(&url).send());
        assert!(global.await.is_err(), "the global connect timeout changed");
        assert!(start.elapsed() >= Duration::from_millis(600));

        // The SSRF guard is on every client.
        let mock = testkit::MockUpstream::start().await;
        let guarded = client(false, Some(&mock.ca));
        let e = guarded
            .http_with(Some(Duration::from_millis(300)))
            .get(format!("https://localhost:{}/v1/models", mock.port))
            .send()
            .await
            .unwrap_err();
        assert_eq!(
            UpstreamFailure::of(&e).class,
            FailureClass::AddressNotAllowed
        );
        let trusting = client(true, Some(&mock.ca));
        let ok = trusting
            .http_with(Some(Duration::from_millis(300)))
            .get(format!("{}/v1/models", mock.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200, "the test CA is trusted by it too");
    }

    #[test]
    fn distinct_connect_timeouts_are_capped_and_a_further_one_gets_the_nearest() {
        let c = UpstreamClient::new(&UpstreamConfig::default()).unwrap();
        let s = &c.settings;
        let ms = Duration::from_millis;
        assert_eq!(s.connect_timeout(None), ms(5000));
        assert_eq!(s.connect_timeout(Some(ms(5000))), ms(5000));
        for i in 1..=MAX_CONNECT_TIMEOUTS as u64 {
            assert_eq!(s.connect_timeout(Some(ms(i * 100))), ms(i * 100));
        }
        assert_eq!(s.connect_timeout(Some(ms(300))), ms(300), "known");
        assert_eq!(s.connect_timeout(Some(ms(251))), ms(300), "nearest");
        assert_eq!(
            s.connect_timeout(Some(ms(4900))),
            ms(5000),
            "the global one counts"
        );
        assert_eq!(s.connects.lock().unwrap().len(), MAX_CONNECT_TIMEOUTS);
        // Each thread builds a client per timeout once, then reuses it.
        let _ = c.http_with(Some(ms(300)));
        let _ = c.http_with(Some(ms(251)));
        let _ = c.http();
        let n = CLIENTS.with(|t| t.borrow().len());
        let _ = c.http_with(Some(ms(300)));
        assert_eq!(CLIENTS.with(|t| t.borrow().len()), n);
        assert_eq!(n, 2, "one for 300 ms (and 251 ms), one global");
    }

    #[tokio::test]
    async fn connect_time_failures_are_classified_by_type() {
        let mock = testkit::MockUpstream::start().await;
        let guarded = client(false, Some(&mock.ca));
        let f = fail(
            &guarded,
            &format!("https://localhost:{}/v1/models", mock.port),
        )
        .await;
        assert_eq!(f.class, FailureClass::AddressNotAllowed);
        let f = fail(&guarded, "https://does-not-exist.invalid/v1/models").await;
        assert_eq!(f.class, FailureClass::NameDoesNotResolve);

        // A certificate from a CA the client was not given.
        let stranger = client(true, None);
        let f = fail(&stranger, &format!("{}/v1/models", mock.base_url)).await;
        assert_eq!(f.class, FailureClass::TlsUntrusted);
        assert_eq!(
            f.to_string(),
            "TLS failure: certificate not trusted — set LLMGW_UPSTREAM_CA_FILE for an internal CA"
        );
        let trusting = client(true, Some(&mock.ca));
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let f = fail(&trusting, &format!("https://127.0.0.1:{closed}/")).await;
        assert_eq!(f.class, FailureClass::ConnectionRefused);
        assert_eq!(
            UpstreamFailure::status(404).to_string().split(" — ").next(),
            Some("HTTP 404")
        );
    }
}
