//! Every setting comes from the environment (`LLMGW_*`, `DATABASE_URL`,
//! `RUST_LOG`), or from `./.env` for what the environment does not set; a
//! bad value names its variable in one line.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// One setting as users see it: in `llmgw serve --help` and `.env.example`.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    /// What an unset variable means, written as it would be set (`""`: unset).
    pub default: &'static str,
    pub about: &'static str,
}

const fn s(name: &'static str, default: &'static str, about: &'static str) -> Setting {
    Setting {
        name,
        default,
        about,
    }
}

/// Every setting of the binary. Tests hold `.env.example` and the names read
/// in this file to exactly this list, and the defaults to `Config`'s own.
pub const SETTINGS: &[Setting] = &[
    s("DATABASE_URL", "", "PostgreSQL URL (postgres://user:password@host:5432/db). Unset: `llmgw serve` runs an embedded cluster under LLMGW_DATA_DIR (local use only)."),
    s("LLMGW_ENCRYPTION_KEYS", "", "Keys of the provider tokens, 1:<base64 32 bytes>,2:<...>; the highest id encrypts, all decrypt. Required with DATABASE_URL; `llmgw keys generate` makes one. Unset with the embedded cluster: a key kept in LLMGW_DATA_DIR/encryption.key."),
    s("LLMGW_DATA_DIR", "./.llmgw", "Where the embedded cluster and its generated key live (only without DATABASE_URL)."),
    s("LLMGW_GATEWAY_ADDR", "127.0.0.1:8080", "Gateway (OpenAI-compatible) listener: IP:port, or host:port to listen on every address the host name resolves to."),
    s("LLMGW_API_ADDR", "127.0.0.1:8081", "Settings API listener: IP:port or host:port."),
    s("LLMGW_METRICS_ADDR", "", "Separate listener for /metrics (IP:port or host:port). Unset: /metrics is served on the gateway listener."),
    s("LLMGW_TRUSTED_PROXIES", "", "Comma-separated addresses or CIDR ranges of reverse proxies whose X-Forwarded-For is believed. Unset: none."),
    s("LLMGW_UPSTREAM_ALLOW_PRIVATE", "false", "Allow upstreams on loopback, private, link-local and similar addresses (self-hosted models)."),
    s("LLMGW_UPSTREAM_ALLOW_HTTP", "false", "Allow plain http:// provider base URLs (self-hosted servers on a private network); the address rules above still apply."),
    s("LLMGW_UPSTREAM_CA_FILE", "", "PEM file of extra root certificates trusted for upstream TLS (internal CAs)."),
    s("LLMGW_UPSTREAM_HTTP2", "false", "Use HTTP/2 towards upstreams that offer it (ALPN): streams share connections, far less memory per open stream."),
    s("LLMGW_UPSTREAM_CONNECT_TIMEOUT_MS", "5000", "Upstream TCP and TLS connect timeout, milliseconds."),
    s("LLMGW_UPSTREAM_TIMEOUT_MS", "300000", "Upstream timeout, milliseconds: the whole answer when not streamed; the head and each gap between chunks when streamed."),
    s("LLMGW_MAX_BODY_BYTES", "10485760", "Largest request body accepted, bytes (10 MiB)."),
    s("LLMGW_API_BODY_TIMEOUT_MS", "10000", "Longest time a settings API client may take to send a request body, milliseconds."),
    s("LLMGW_API_MAX_CONNECTIONS", "256", "Most connections the settings API holds open at once."),
    s("LLMGW_ALLOW_SIGNUP", "true", "Allow anyone to sign up on the settings API."),
    s("LLMGW_PUBLIC_URL", "", "Where browsers reach the API listener (the admin UI), e.g. https://llmgw.example.com. Required with single sign-on; an https URL makes the session cookie Secure."),
    s("LLMGW_GATEWAY_PUBLIC_URL", "", "The gateway URL the admin UI shows in its quick start (e.g. https://llm.example.com). Unset: the UI guesses it from its own address."),
    s("LLMGW_OIDC_ISSUER", "", "Single sign-on by OpenID Connect (authorization code + PKCE): the issuer URL turns it on; register {LLMGW_PUBLIC_URL}/api/v1/auth/oidc/callback as the redirect URI."),
    s("LLMGW_OIDC_CLIENT_ID", "", "The client id registered with the issuer (required with LLMGW_OIDC_ISSUER)."),
    s("LLMGW_OIDC_CLIENT_SECRET", "", "The client secret registered with the issuer."),
    s("LLMGW_OIDC_CA_FILE", "", "PEM file of extra root certificates trusted for the issuer's TLS (an internal CA)."),
    s("LLMGW_OIDC_AUTO_CREATE", "true", "A first SSO sign-in with a verified email creates an account (false: existing accounts only)."),
    s("LLMGW_PASSWORD_LOGIN", "true", "Password login and signup (false: single sign-on only; needs LLMGW_OIDC_ISSUER)."),
    s("LLMGW_SESSION_TTL_HOURS", "168", "Settings API session lifetime, hours (at most 8784)."),
    s("LLMGW_SESSION_IDLE_MINUTES", "720", "A settings API session unused for this long ends, minutes."),
    s("LLMGW_LOG_FORMAT", "pretty", "Log format: json or pretty (coloured only on a terminal). The Docker image sets json."),
    s("RUST_LOG", "info", "Log level filter (tracing EnvFilter syntax, e.g. info,gateway=debug)."),
    s("LLMGW_SHUTDOWN_GRACE_MS", "30000", "How long in-flight requests and streams may run after SIGTERM/SIGINT, milliseconds."),
    s("LLMGW_DB_MAX_CONNECTIONS", "16", "Largest number of database connections per process."),
    s("LLMGW_GATEWAY_WORKERS", "", "Gateway worker threads. Unset: one per CPU."),
    s("LLMGW_CACHE_TTL_MS", "30000", "Safety-net lifetime of cached keys and providers (changes arrive within a second through NOTIFY), milliseconds."),
    s("LLMGW_LOG_QUEUE_CAPACITY", "100000", "Usage rows held in memory while the database is slow or down."),
    s("LLMGW_LOG_BATCH_SIZE", "500", "Usage rows written per INSERT."),
    s("LLMGW_LOG_FLUSH_INTERVAL_MS", "200", "Longest wait before a partial batch of usage rows is written, milliseconds."),
    s("LLMGW_LOG_RETENTION_DAYS", "90", "Days of usage rows (request_logs, one partition per UTC day) and of their hourly rollups kept; every process drops older days at start and hourly (0: the default)."),
    s("LLMGW_REDIS_URL", "", "Redis holding the spend controls' counters for every replica and the gateways' views of endpoint health (redis://host:6379, rediss:// for TLS; several comma-separated URLs: the nodes of a Redis Cluster). Unset: limits are counted in this process (one replica), with a warning at start, and the API shows every endpoint's health as unknown."),
    s("LLMGW_LIMITS_FAIL_OPEN", "true", "Redis unreachable or slower than 50 ms: keep serving on this replica's own counters (true), or refuse limited requests with 503 (false)."),
    s("LLMGW_LIMITS_LEASE_TTL_MS", "30000", "How long a concurrency slot outlives a gateway that stopped renewing it (killed), milliseconds."),
    s("LLMGW_LIMITS_HOLD_MS", "50", "With Redis: how long a gateway admits a busy key's requests from quota it took from Redis ahead (a grant), before asking again, milliseconds (0 to 1000; 0: every request asks Redis). Units a replica holds unused are unavailable to the others for at most this long."),
    s("OTEL_EXPORTER_OTLP_ENDPOINT", "", "OpenTelemetry collector base URL (http(s)://host:4318): traces of every gateway request go to {it}/v1/traces over OTLP/HTTP in JSON. Unset (and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT unset): no traces, at no cost."),
    s("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", "The collector's full traces URL, used as written (wins over OTEL_EXPORTER_OTLP_ENDPOINT)."),
    s("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "OTLP encoding: http/json only (no gRPC, no protobuf)."),
    s("OTEL_EXPORTER_OTLP_HEADERS", "", "Headers sent to the collector, key=value pairs separated by commas, values percent-encoded (e.g. authorization=Bearer%20abc)."),
    s("OTEL_EXPORTER_OTLP_TIMEOUT", "10000", "Longest an export to the collector may take, milliseconds; a slower one is dropped (counted in llmgw_gateway_trace_spans_dropped_total)."),
    s("OTEL_EXPORTER_OTLP_CERTIFICATE", "", "PEM file of extra root certificates trusted for the collector's TLS."),
    s("OTEL_SERVICE_NAME", "llmgw", "service.name of the exported traces."),
    s("OTEL_TRACES_SAMPLER_ARG", "1.0", "Share of new traces recorded, 0 to 1 (by trace id); a client's traceparent decides for its own trace (sampled flag)."),
    s("OTEL_BSP_MAX_QUEUE_SIZE", "2048", "Finished spans held in memory for export; beyond, new ones are dropped (counted)."),
    s("OTEL_BSP_SCHEDULE_DELAY", "5000", "Longest wait before queued spans are exported, milliseconds."),
    s("LLMGW_ALERT_WEBHOOK_URL", "", "http(s) URL the gateways POST a JSON event to when a key's or org's day or month budget reaches its soft_limit_percent, and when it reaches the limit (once per period across every replica). Called as configured (private addresses allowed). Unset: no alerts."),
];

/// The settings as `--help` shows them: name, default, wrapped description.
pub fn help_text() -> String {
    let mut out = String::from(
        "Settings (environment variables; also read from ./.env, where the environment wins):\n",
    );
    for st in SETTINGS {
        let default = if st.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", st.default)
        };
        out.push_str(&format!("  {}{default}\n", st.name));
        let mut line = String::new();
        for word in st.about.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > 72 {
                out.push_str(&format!("          {line}\n"));
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push_str(&format!("          {line}\n"));
    }
    out
}

/// A setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// A listen address as configured: `IP:port`, or `host:port` for every
/// address the host name resolves to (checked when the settings are read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr(String);

impl ListenAddr {
    fn parse(var: &'static str, v: &str) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError { var, message };
        if v.parse::<SocketAddr>().is_ok() {
            return Ok(Self(v.to_owned()));
        }
        let well_formed = v
            .rsplit_once(':')
            .filter(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if well_formed.is_none() {
            return Err(err(format!(
                "expected IP:port or host:port (e.g. 127.0.0.1:8080, localhost:8080, [::1]:8080), got {v:?}"
            )));
        }
        match v.to_socket_addrs() {
            Ok(addrs) if addrs.len() > 0 => Ok(Self(v.to_owned())),
            Ok(_) | Err(_) => Err(err(format!(
                "cannot resolve the host of {v:?} (use IP:port, e.g. 127.0.0.1:8080)"
            ))),
        }
    }

    /// The address as configured, for binding (a host name is resolved again there).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn listen_addr(env: Env, var: &'static str, default: &str) -> Result<ListenAddr, ConfigError> {
    ListenAddr::parse(var, get(env, var).as_deref().unwrap_or(default))
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// The whole configuration. `Debug` is written by hand: the URL may carry a
/// password and the keys are the master secrets.
#[derive(Clone)]
#[cfg_attr(test, derive(PartialEq))]
pub struct Config {
    pub database_url: Option<String>,
    pub data_dir: PathBuf,
    pub encryption_keys: Option<String>,
    pub gateway_addr: ListenAddr,
    pub api_addr: ListenAddr,
    /// `LLMGW_METRICS_ADDR`: when set, `/metrics` is served there and not on the gateway port.
    pub metrics_addr: Option<ListenAddr>,
    pub allow_private: bool,
    pub allow_http: bool,
    pub upstream_http2: bool,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub max_body_bytes: usize,
    pub allow_signup: bool,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub session_ttl: Duration,
    pub session_idle: Duration,
    pub api_body_timeout: Duration,
    pub api_max_connections: usize,
    pub db_max_connections: u32,
    pub gateway_workers: usize,
    pub cache_ttl: Duration,
    pub log_queue_capacity: usize,
    pub log_batch_size: usize,
    pub log_flush_interval: Duration,
    /// `LLMGW_LOG_RETENTION_DAYS`: days of usage rows and rollups kept.
    pub log_retention_days: u32,
    pub trusted_proxies: api::TrustedProxies,
    /// `LLMGW_PUBLIC_URL`: where browsers reach the API listener (no trailing `/`;
    /// cookie `Secure` when https).
    pub public_url: Option<String>,
    /// `LLMGW_GATEWAY_PUBLIC_URL`: the gateway URL shown in the admin UI's quick start.
    pub gateway_public_url: Option<String>,
    /// `LLMGW_PASSWORD_LOGIN` and the `LLMGW_OIDC_*` settings.
    pub sso: api::SsoConfig,
    /// `LLMGW_REDIS_URL`, split at commas (several: a Redis Cluster).
    pub redis_urls: Vec<String>,
    pub limits_fail_open: bool,
    pub limits_lease_ttl: Duration,
    pub limits_hold: Duration,
    /// `LLMGW_ALERT_WEBHOOK_URL`: where spend alerts are POSTed.
    pub alert_webhook_url: Option<String>,
    /// The `OTEL_*` settings; `None` without a collector endpoint (traces off).
    pub traces: Option<gateway::TraceConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "[REDACTED]"),
            )
            .field(
                "encryption_keys",
                &self.encryption_keys.as_ref().map(|_| "[REDACTED]"),
            )
            .field("data_dir", &self.data_dir)
            .field("gateway_addr", &self.gateway_addr)
            .field("api_addr", &self.api_addr)
            .field("allow_private", &self.allow_private)
            .finish_non_exhaustive()
    }
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn get(env: Env, var: &'static str) -> Option<String> {
    env(var)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(
    env: Env,
    var: &'static str,
    default: T,
    what: &str,
) -> Result<T, ConfigError> {
    match get(env, var) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ConfigError {
            var,
            message: format!("expected {what}, got {v:?}"),
        }),
    }
}

fn flag(env: Env, var: &'static str, default: bool) -> Result<bool, ConfigError> {
    match get(env, var).map(|v| v.to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => Ok(true),
        Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => Ok(false),
        Some(v) => Err(ConfigError {
            var,
            message: format!("expected true or false, got {v:?}"),
        }),
    }
}

/// An `http(s)://host[:port][/path]` URL, without its trailing `/`.
fn public_url(env: Env, var: &'static str) -> Result<Option<String>, ConfigError> {
    let Some(v) = get(env, var) else {
        return Ok(None);
    };
    let bad = |message: &str| ConfigError {
        var,
        message: format!("{message}, got {v:?}"),
    };
    let url = url::Url::parse(&v).map_err(|_| bad("expected an http(s) URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("expected an http(s) URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad("expected no user, query or fragment"));
    }
    Ok(Some(v.trim_end_matches('/').to_owned()))
}

/// An `http(s)://` URL with a host, kept as written (a query or a secret
/// path is the receiver's business).
fn webhook_url(env: Env, var: &'static str) -> Result<Option<String>, ConfigError> {
    let Some(v) = get(env, var) else {
        return Ok(None);
    };
    // The URL often carries a token: the message does not repeat it.
    let bad = || ConfigError {
        var,
        message: "expected an http(s) URL with a host".into(),
    };
    let url = url::Url::parse(&v).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad());
    }
    Ok(Some(v))
}

fn millis(env: Env, var: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
    let ms: u64 = parse(env, var, default_ms, "a whole number of milliseconds")?;
    if ms == 0 {
        return Err(ConfigError {
            var,
            message: "must be greater than 0".into(),
        });
    }
    Ok(Duration::from_millis(ms))
}

/// `LLMGW_LIMITS_HOLD_MS`: 0 (every request asks Redis) to 1000.
fn limits_hold(env: Env) -> Result<Duration, ConfigError> {
    let var = "LLMGW_LIMITS_HOLD_MS";
    let ms: u64 = parse(env, var, 50, "a whole number of milliseconds")?;
    if ms > 1000 {
        return Err(ConfigError {
            var,
            message: "must be at most 1000".into(),
        });
    }
    Ok(Duration::from_millis(ms))
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    env: Env,
    var: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    let v = parse(env, var, default, "a positive whole number")?;
    if v <= T::default() {
        return Err(ConfigError {
            var,
            message: "must be greater than 0".into(),
        });
    }
    Ok(v)
}

/// `LLMGW_LOG_RETENTION_DAYS`: 0 or unset is the default.
fn log_retention_days(env: Env) -> Result<u32, ConfigError> {
    let default = storage::partitions::DEFAULT_LOG_RETENTION_DAYS;
    let days: u32 = parse(
        env,
        "LLMGW_LOG_RETENTION_DAYS",
        default,
        "a whole number of days",
    )?;
    Ok(if days == 0 { default } else { days })
}

fn redis_urls(env: Env) -> Result<Vec<String>, ConfigError> {
    let Some(v) = get(env, "LLMGW_REDIS_URL") else {
        return Ok(Vec::new());
    };
    v.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            if u.starts_with("redis://") || u.starts_with("rediss://") {
                Ok(u.to_owned())
            } else {
                Err(ConfigError {
                    var: "LLMGW_REDIS_URL",
                    message: "each URL must start with redis:// or rediss://".into(),
                })
            }
        })
        .collect()
}

/// An `http(s)://` URL with a host, for the collector.
fn collector_url(env: Env, var: &'static str) -> Result<Option<reqwest::Url>, ConfigError> {
    let Some(v) = get(env, var) else {
        return Ok(None);
    };
    let bad = || ConfigError {
        var,
        message: "expected an http(s) URL with a host (e.g. http://otel-collector:4318)".into(),
    };
    let url = reqwest::Url::parse(&v).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad());
    }
    Ok(Some(url))
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value,key2=value2`, values percent-encoded.
/// Values are often tokens: no message repeats one.
fn otlp_headers(env: Env) -> Result<reqwest::header::HeaderMap, ConfigError> {
    let var = "OTEL_EXPORTER_OTLP_HEADERS";
    let mut headers = reqwest::header::HeaderMap::new();
    let Some(v) = get(env, var) else {
        return Ok(headers);
    };
    for (i, pair) in v
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        let bad = |what: &str| ConfigError {
            var,
            message: format!("pair {} {what} (expected key=value,key2=value2)", i + 1),
        };
        let (k, v) = pair.split_once('=').ok_or_else(|| bad("has no ="))?;
        let name = reqwest::header::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| bad("has an invalid header name"))?;
        let value = percent_encoding::percent_decode_str(v.trim())
            .decode_utf8()
            .ok()
            .and_then(|v| reqwest::header::HeaderValue::from_str(&v).ok())
            .ok_or_else(|| bad("has an invalid value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The `OTEL_*` settings, all checked; `None` when no endpoint is set.
fn traces(env: Env) -> Result<Option<gateway::TraceConfig>, ConfigError> {
    let protocol = get(env, "OTEL_EXPORTER_OTLP_PROTOCOL");
    if protocol.as_deref().is_some_and(|p| p != "http/json") {
        return Err(ConfigError {
            var: "OTEL_EXPORTER_OTLP_PROTOCOL",
            message: format!(
                "only http/json is supported (collectors take it on port 4318), got {:?}",
                protocol.unwrap_or_default()
            ),
        });
    }
    let base = collector_url(env, "OTEL_EXPORTER_OTLP_ENDPOINT")?.map(|mut u| {
        let path = format!("{}/v1/traces", u.path().trim_end_matches('/'));
        u.set_path(&path);
        u
    });
    let endpoint = collector_url(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?.or(base);
    let headers = otlp_headers(env)?;
    let export_timeout = millis(env, "OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?;
    let ca_file = get(env, "OTEL_EXPORTER_OTLP_CERTIFICATE").map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            return Err(ConfigError {
                var: "OTEL_EXPORTER_OTLP_CERTIFICATE",
                message: format!("{} is not a readable file", p.display()),
            });
        }
    }
    let service_name = get(env, "OTEL_SERVICE_NAME").unwrap_or_else(|| "llmgw".into());
    let sample_ratio: f64 = parse(env, "OTEL_TRACES_SAMPLER_ARG", 1.0, "a number from 0 to 1")?;
    if !(0.0..=1.0).contains(&sample_ratio) {
        return Err(ConfigError {
            var: "OTEL_TRACES_SAMPLER_ARG",
            message: format!("expected a number from 0 to 1, got {sample_ratio}"),
        });
    }
    let queue_capacity = positive(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)?;
    let schedule_delay = millis(env, "OTEL_BSP_SCHEDULE_DELAY", 5_000)?;
    Ok(endpoint.map(|endpoint| gateway::TraceConfig {
        headers,
        service_name,
        sample_ratio,
        queue_capacity,
        schedule_delay,
        export_timeout,
        ca_file,
        ..gateway::TraceConfig::new(endpoint)
    }))
}

fn session_ttl(env: Env) -> Result<Duration, ConfigError> {
    let hours: u64 = positive(env, "LLMGW_SESSION_TTL_HOURS", 24 * 7)?;
    if hours > 24 * 366 {
        return Err(ConfigError {
            var: "LLMGW_SESSION_TTL_HOURS",
            message: "must be at most 8784 (one year)".into(),
        });
    }
    Ok(Duration::from_secs(3600 * hours))
}

fn session_idle(env: Env) -> Result<Duration, ConfigError> {
    let minutes: u64 = positive(env, "LLMGW_SESSION_IDLE_MINUTES", 12 * 60)?;
    if minutes > 366 * 24 * 60 {
        return Err(ConfigError {
            var: "LLMGW_SESSION_IDLE_MINUTES",
            message: "must be at most 527040 (one year)".into(),
        });
    }
    Ok(Duration::from_secs(60 * minutes))
}

fn sso(env: Env, public_url: Option<&str>) -> Result<api::SsoConfig, ConfigError> {
    let password_login = flag(env, "LLMGW_PASSWORD_LOGIN", true)?;
    let auto_create = flag(env, "LLMGW_OIDC_AUTO_CREATE", true)?;
    let Some(issuer) = get(env, "LLMGW_OIDC_ISSUER") else {
        if !password_login {
            return Err(ConfigError {
                var: "LLMGW_PASSWORD_LOGIN",
                message: "false needs LLMGW_OIDC_ISSUER: nobody could sign in otherwise".into(),
            });
        }
        return Ok(api::SsoConfig::default());
    };
    if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
        return Err(ConfigError {
            var: "LLMGW_OIDC_ISSUER",
            message: format!("expected the issuer's https URL, got {issuer:?}"),
        });
    }
    let client_id = get(env, "LLMGW_OIDC_CLIENT_ID").ok_or_else(|| ConfigError {
        var: "LLMGW_OIDC_CLIENT_ID",
        message: "required when LLMGW_OIDC_ISSUER is set".into(),
    })?;
    let public_url = public_url.ok_or_else(|| ConfigError {
        var: "LLMGW_PUBLIC_URL",
        message: "required when LLMGW_OIDC_ISSUER is set (the redirect URI is {LLMGW_PUBLIC_URL}/api/v1/auth/oidc/callback)".into(),
    })?;
    let ca_file = get(env, "LLMGW_OIDC_CA_FILE").map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            return Err(ConfigError {
                var: "LLMGW_OIDC_CA_FILE",
                message: format!("{} is not a readable file", p.display()),
            });
        }
    }
    Ok(api::SsoConfig {
        password_login,
        oidc: Some(api::OidcConfig {
            issuer,
            client_id,
            client_secret: get(env, "LLMGW_OIDC_CLIENT_SECRET").map(secrecy::SecretString::from),
            public_url: public_url.to_owned(),
            auto_create,
            ca_file,
            timeout: Duration::from_secs(10),
        }),
    })
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    /// Reads the configuration through `env` (tests pass a map).
    pub fn from_lookup(env: Env) -> Result<Self, ConfigError> {
        let log_format = match get(env, "LLMGW_LOG_FORMAT").as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    var: "LLMGW_LOG_FORMAT",
                    message: format!("expected json or pretty, got {other:?}"),
                })
            }
        };
        let database_url = get(env, "DATABASE_URL");
        if let Some(url) = &database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError {
                    var: "DATABASE_URL",
                    message: "must start with postgres:// or postgresql://".into(),
                });
            }
            storage::Db::options_from_url(url).map_err(|e| ConfigError {
                var: "DATABASE_URL",
                message: format!("not a valid PostgreSQL URL ({e})"),
            })?;
        }
        let encryption_keys = get(env, "LLMGW_ENCRYPTION_KEYS");
        if let Some(spec) = &encryption_keys {
            storage::Keyring::parse(spec).map_err(|e| ConfigError {
                var: "LLMGW_ENCRYPTION_KEYS",
                message: format!(
                    "{e} (format: 1:<base64 32 bytes>,2:<...>; `llmgw keys generate` makes one)"
                ),
            })?;
        } else if database_url.is_some() {
            return Err(ConfigError {
                var: "LLMGW_ENCRYPTION_KEYS",
                message: "required when DATABASE_URL is set (format: 1:<base64 32 bytes>; `llmgw keys generate` makes one)".into(),
            });
        }
        let ca_file = get(env, "LLMGW_UPSTREAM_CA_FILE").map(PathBuf::from);
        if let Some(p) = &ca_file {
            if !p.is_file() {
                return Err(ConfigError {
                    var: "LLMGW_UPSTREAM_CA_FILE",
                    message: format!("{} is not a readable file", p.display()),
                });
            }
        }
        let api_public_url = public_url(env, "LLMGW_PUBLIC_URL")?;
        let sso = sso(env, api_public_url.as_deref())?;
        let default_workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            database_url,
            data_dir: get(env, "LLMGW_DATA_DIR")
                .map_or_else(|| PathBuf::from("./.llmgw"), PathBuf::from),
            encryption_keys,
            gateway_addr: listen_addr(env, "LLMGW_GATEWAY_ADDR", "127.0.0.1:8080")?,
            api_addr: listen_addr(env, "LLMGW_API_ADDR", "127.0.0.1:8081")?,
            metrics_addr: get(env, "LLMGW_METRICS_ADDR")
                .map(|v| ListenAddr::parse("LLMGW_METRICS_ADDR", &v))
                .transpose()?,
            allow_private: flag(env, "LLMGW_UPSTREAM_ALLOW_PRIVATE", false)?,
            allow_http: flag(env, "LLMGW_UPSTREAM_ALLOW_HTTP", false)?,
            upstream_http2: flag(env, "LLMGW_UPSTREAM_HTTP2", false)?,
            ca_file,
            connect_timeout: millis(env, "LLMGW_UPSTREAM_CONNECT_TIMEOUT_MS", 5_000)?,
            upstream_timeout: millis(env, "LLMGW_UPSTREAM_TIMEOUT_MS", 300_000)?,
            max_body_bytes: positive(env, "LLMGW_MAX_BODY_BYTES", 10 * 1024 * 1024)?,
            allow_signup: flag(env, "LLMGW_ALLOW_SIGNUP", true)?,
            log_format,
            shutdown_grace: millis(env, "LLMGW_SHUTDOWN_GRACE_MS", 30_000)?,
            session_ttl: session_ttl(env)?,
            session_idle: session_idle(env)?,
            api_body_timeout: millis(env, "LLMGW_API_BODY_TIMEOUT_MS", 10_000)?,
            api_max_connections: positive(env, "LLMGW_API_MAX_CONNECTIONS", 256)?,
            db_max_connections: positive(env, "LLMGW_DB_MAX_CONNECTIONS", 16)?,
            gateway_workers: positive(env, "LLMGW_GATEWAY_WORKERS", default_workers)?,
            cache_ttl: millis(env, "LLMGW_CACHE_TTL_MS", 30_000)?,
            log_queue_capacity: positive(env, "LLMGW_LOG_QUEUE_CAPACITY", 100_000)?,
            log_batch_size: positive(
                env,
                "LLMGW_LOG_BATCH_SIZE",
                storage::logs::DEFAULT_LOG_BATCH_SIZE,
            )?,
            log_flush_interval: millis(env, "LLMGW_LOG_FLUSH_INTERVAL_MS", 200)?,
            log_retention_days: log_retention_days(env)?,
            trusted_proxies: api::TrustedProxies::parse(
                &get(env, "LLMGW_TRUSTED_PROXIES").unwrap_or_default(),
            )
            .map_err(|message| ConfigError {
                var: "LLMGW_TRUSTED_PROXIES",
                message,
            })?,
            public_url: api_public_url,
            gateway_public_url: public_url(env, "LLMGW_GATEWAY_PUBLIC_URL")?,
            sso,
            redis_urls: redis_urls(env)?,
            limits_fail_open: flag(env, "LLMGW_LIMITS_FAIL_OPEN", true)?,
            limits_lease_ttl: millis(env, "LLMGW_LIMITS_LEASE_TTL_MS", 30_000)?,
            limits_hold: limits_hold(env)?,
            alert_webhook_url: webhook_url(env, "LLMGW_ALERT_WEBHOOK_URL")?,
            traces: traces(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_design() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.gateway_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.api_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.max_body_bytes, 10 * 1024 * 1024);
        assert!(c.allow_signup && !c.allow_private);
        assert_eq!(c.data_dir, PathBuf::from("./.llmgw"));
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn public_urls_lose_their_trailing_slash() {
        let c = cfg(&[
            ("LLMGW_PUBLIC_URL", "https://llmgw.example.com/"),
            ("LLMGW_GATEWAY_PUBLIC_URL", "http://127.0.0.1:8080"),
        ])
        .unwrap();
        assert_eq!(c.public_url.as_deref(), Some("https://llmgw.example.com"));
        assert_eq!(
            c.gateway_public_url.as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert!(cfg(&[]).unwrap().public_url.is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, val) in [
            ("LLMGW_GATEWAY_ADDR", "nope"),
            ("LLMGW_UPSTREAM_ALLOW_PRIVATE", "maybe"),
            ("LLMGW_MAX_BODY_BYTES", "-1"),
            ("LLMGW_PUBLIC_URL", "llmgw.example.com"),
            ("LLMGW_GATEWAY_PUBLIC_URL", "ftp://gw.example.com"),
            ("LLMGW_MAX_BODY_BYTES", "0"),
            ("LLMGW_SESSION_TTL_HOURS", "3000000000"),
            ("LLMGW_SESSION_IDLE_MINUTES", "0"),
            ("LLMGW_SESSION_IDLE_MINUTES", "600000"),
            ("LLMGW_API_BODY_TIMEOUT_MS", "0"),
            ("LLMGW_API_MAX_CONNECTIONS", "none"),
            ("LLMGW_UPSTREAM_TIMEOUT_MS", "abc"),
            ("LLMGW_LOG_FORMAT", "xml"),
            ("LLMGW_ENCRYPTION_KEYS", "1:short"),
            ("LLMGW_UPSTREAM_CA_FILE", "/does/not/exist.pem"),
            ("LLMGW_TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal"),
            ("DATABASE_URL", "mysql://x"),
            ("LLMGW_ALERT_WEBHOOK_URL", "hooks.example.com/llmgw"),
            ("LLMGW_LOG_RETENTION_DAYS", "-1"),
            ("LLMGW_LOG_RETENTION_DAYS", "ninety"),
            ("LLMGW_ALERT_WEBHOOK_URL", "ftp://hooks.example.com/llmgw"),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.var, var, "{e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = cfg(&[
            ("DATABASE_URL", "postgres://u:hunter2@db/x"),
            (
                "LLMGW_ENCRYPTION_KEYS",
                "1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ])
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("AAAA"), "{dbg}");
    }

    /// Variables `.env.example` holds for docker-compose.yml, not for the binary.
    const COMPOSE_ONLY: &[&str] = &["POSTGRES_PASSWORD"];

    /// `NAME=value` and commented-out `#NAME=value` lines of `.env.example`.
    fn env_example() -> Vec<(String, String)> {
        include_str!("../../../.env.example")
            .lines()
            .filter_map(|l| {
                let (k, v) = l.strip_prefix('#').unwrap_or(l).split_once('=')?;
                let is_name = k.starts_with(|c: char| c.is_ascii_uppercase())
                    && k.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                is_name.then(|| (k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    #[test]
    fn env_example_lists_exactly_the_settings_with_their_defaults() {
        let listed = env_example();
        let mut names: Vec<&str> = listed
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| !COMPOSE_ONLY.contains(k))
            .collect();
        let mut table: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        table.sort_unstable();
        assert_eq!(names, table, ".env.example and SETTINGS differ");
        for st in SETTINGS {
            let (_, v) = listed.iter().find(|(k, _)| k == st.name).unwrap();
            assert_eq!(
                v, st.default,
                ".env.example shows another default for {}",
                st.name
            );
            assert!(!st.about.is_empty(), "{} has no description", st.name);
        }
    }

    #[test]
    fn every_variable_read_here_is_in_the_table() {
        let src = include_str!("config.rs");
        let mut read = Vec::new();
        for prefix in ["\"LLMGW_", "\"OTEL_", "\"DATABASE_URL\""] {
            for (i, _) in src.match_indices(prefix) {
                let name: String = src[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.ends_with('_') {
                    read.push(name);
                }
            }
        }
        assert!(read.len() > 20, "{read:?}");
        for name in read {
            assert!(
                SETTINGS.iter().any(|s| s.name == name),
                "{name} is read but missing from SETTINGS (and so from --help and .env.example)"
            );
        }
    }

    #[test]
    fn table_defaults_are_the_defaults_in_effect() {
        let pairs: Vec<(&str, &str)> = SETTINGS
            .iter()
            .filter(|s| !s.default.is_empty())
            .map(|s| (s.name, s.default))
            .collect();
        assert!(cfg(&pairs).unwrap() == cfg(&[]).unwrap());
    }

    #[test]
    fn help_text_names_every_setting() {
        let help = help_text();
        for st in SETTINGS {
            assert!(help.contains(st.name), "{}", st.name);
        }
        assert!(help.contains("[default: 127.0.0.1:8080]"), "{help}");
        assert!(help.lines().all(|l| l.len() <= 100), "{help}");
    }

    #[test]
    fn listen_addresses_take_ip_or_host_names() {
        for ok in [
            "localhost:8080",
            "0.0.0.0:8080",
            "[::1]:8080",
            "127.0.0.1:0",
        ] {
            let c = cfg(&[("LLMGW_GATEWAY_ADDR", ok)]).unwrap();
            assert_eq!(c.gateway_addr.as_str(), ok);
        }
        for bad in [
            "localhost",
            "8080",
            ":8080",
            "localhost:http",
            "no-such-host.invalid:8080",
        ] {
            let e = cfg(&[("LLMGW_API_ADDR", bad)]).unwrap_err();
            assert_eq!(e.var, "LLMGW_API_ADDR");
            assert!(e.message.contains("IP:port"), "{e}");
        }
    }

    #[test]
    fn oidc_needs_a_public_url_and_a_client_id() {
        let issuer = ("LLMGW_OIDC_ISSUER", "https://id.example.com");
        let id = ("LLMGW_OIDC_CLIENT_ID", "llmgw");
        assert_eq!(cfg(&[issuer]).unwrap_err().var, "LLMGW_OIDC_CLIENT_ID");
        let e = cfg(&[issuer, id]).unwrap_err();
        assert_eq!(e.var, "LLMGW_PUBLIC_URL", "{e}");
        let c = cfg(&[issuer, id, ("LLMGW_PUBLIC_URL", "https://gw.example.com/")]).unwrap();
        let oidc = c.sso.oidc.expect("oidc configured");
        assert_eq!(oidc.public_url, "https://gw.example.com");
        assert!(oidc.auto_create && c.sso.password_login);
        let e = cfg(&[("LLMGW_PASSWORD_LOGIN", "false")]).unwrap_err();
        assert_eq!(e.var, "LLMGW_PASSWORD_LOGIN");
        assert_eq!(
            cfg(&[("LLMGW_PUBLIC_URL", "ftp://x")]).unwrap_err().var,
            "LLMGW_PUBLIC_URL"
        );
    }

    #[test]
    fn alert_webhook_url_is_kept_as_written_and_not_echoed_when_bad() {
        let url = "https://hooks.example.com/T0/B1/secret?x=1";
        let c = cfg(&[("LLMGW_ALERT_WEBHOOK_URL", url)]).unwrap();
        assert_eq!(c.alert_webhook_url.as_deref(), Some(url));
        assert!(cfg(&[]).unwrap().alert_webhook_url.is_none());
        let e = cfg(&[("LLMGW_ALERT_WEBHOOK_URL", "secret-token-123")]).unwrap_err();
        assert!(!e.to_string().contains("secret-token-123"), "{e}");
    }

    #[test]
    fn log_retention_of_zero_is_the_default() {
        assert_eq!(cfg(&[]).unwrap().log_retention_days, 90);
        let c = cfg(&[("LLMGW_LOG_RETENTION_DAYS", "0")]).unwrap();
        assert_eq!(c.log_retention_days, 90);
        let c = cfg(&[("LLMGW_LOG_RETENTION_DAYS", "7")]).unwrap();
        assert_eq!(c.log_retention_days, 7);
    }

    #[test]
    fn traces_are_off_without_an_endpoint_and_follow_the_otel_variables() {
        assert!(cfg(&[]).unwrap().traces.is_none());
        assert!(cfg(&[("OTEL_SERVICE_NAME", "x")]).unwrap().traces.is_none());
        let t = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")])
            .unwrap()
            .traces
            .unwrap();
        assert_eq!(t.endpoint.as_str(), "http://collector:4318/v1/traces");
        assert_eq!(t.service_name, "llmgw");
        assert_eq!(t.sample_ratio, 1.0);
        let t = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c.example.com/otlp/")])
            .unwrap()
            .traces
            .unwrap();
        assert_eq!(t.endpoint.as_str(), "https://c.example.com/otlp/v1/traces");
        let t = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://collector:4318/custom",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20abc, x-tenant = t1",
            ),
            ("OTEL_SERVICE_NAME", "gw-eu"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ])
        .unwrap()
        .traces
        .unwrap();
        assert_eq!(t.endpoint.as_str(), "http://collector:4318/custom");
        assert_eq!(t.headers["authorization"], "Bearer abc");
        assert_eq!(t.headers["x-tenant"], "t1");
        assert_eq!(
            (t.service_name.as_str(), t.sample_ratio, t.queue_capacity),
            ("gw-eu", 0.25, 100)
        );
        assert!(!format!("{t:?}").contains("abc"), "{t:?}");
    }

    #[test]
    fn bad_otel_values_name_their_variable_and_never_echo_a_header_value() {
        for (var, val) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "grpc://collector:4317",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/does/not/exist.pem"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ("OTEL_TRACES_SAMPLER_ARG", "half"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ] {
            let e = cfg(&[(var, val)]).unwrap_err();
            assert_eq!(e.var, var, "{e}");
        }
        for bad in ["novalue-secret123", "bad name=secret123", "k=secret123%0A"] {
            let e = cfg(&[("OTEL_EXPORTER_OTLP_HEADERS", bad)]).unwrap_err();
            assert_eq!(e.var, "OTEL_EXPORTER_OTLP_HEADERS");
            assert!(!e.to_string().contains("secret123"), "{e}");
        }
    }

    #[test]
    fn database_url_requires_encryption_keys() {
        let e = cfg(&[("DATABASE_URL", "postgres://localhost/x")]).unwrap_err();
        assert_eq!(e.var, "LLMGW_ENCRYPTION_KEYS");
    }
}
