//! `POST /v1/chat/completions`: authenticate, route, call the upstream, relay.
//!
//! No client header is forwarded (so never its key, cookies or hop-by-hop
//! headers): the upstream gets `content-type`, `accept`, `x-request-id` and
//! `Authorization: Bearer {provider token}`. Back to the client go the
//! upstream's status, body, `content-type`, `retry-after` and `x-ratelimit-*`.
//!
//! Client input: any `content-type` is accepted when the body is a JSON
//! object (SDKs send `application/json`, `curl -d` a form type); the body
//! must be UTF-8 and at most `max_body_bytes` (413, with or without a
//! `content-length`), and must arrive within `client_body_timeout` (408).
//! Valid JSON is not depth-limited here: the parts the gateway does not route
//! on are skipped without recursion and judged by the upstream.
//!
//! Upstream faults, each bounded: no head within the upstream timeout ⇒ 504;
//! a non-streamed body not complete within it ⇒ 504; broken mid-body ⇒ 502;
//! a non-streamed body over `max_response_bytes` ⇒ 502
//! `upstream_response_too_large` (never held whole). A 200 whose body is not
//! JSON is relayed as sent, logged with no tokens and `error_class =
//! upstream_invalid_json`. Streams are relayed chunk by chunk (the usage
//! scanner keeps one line, capped); a stream that breaks or falls silent
//! for the upstream timeout ends with an OpenAI-shaped `data: {"error":…}`
//! event, and its row keeps status 200 with `error_class`
//! `upstream_stream_error` or `upstream_timeout`. A success answered as
//! `text/event-stream` is relayed as a stream even when `stream` was not
//! asked for. An error body that echoes the provider's token gets
//! `[redacted]` in its place.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::http::header as ax;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use reqwest::header as rq;
use storage::secrets::{sha256, API_KEY_PREFIX};
use upstream::{FailureClass, UpstreamFailure};

use crate::body::ChatRequest;
use crate::cache::KeyEntry;
use crate::error::{error_body, ErrorNote, GatewayError};
use crate::metrics::Metrics;
use crate::usage::{usage_of, LogGuard, Usage};
use crate::{request_id, Inner};

static UPSTREAM_REQUEST_ID: rq::HeaderName = rq::HeaderName::from_static("x-request-id");

/// The key a client presented: `Authorization: Bearer` first, then `x-api-key`.
fn presented_key(req: &HttpRequest) -> Option<&str> {
    let headers = req.headers();
    if let Some(v) = headers.get(ax::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some((scheme, rest)) = v.trim().split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
                return Some(rest.trim());
            }
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// Authenticates the request's key (from the cache when known).
pub(crate) async fn authenticate(
    gw: &Inner,
    req: &HttpRequest,
) -> Result<Arc<KeyEntry>, GatewayError> {
    let key = presented_key(req).ok_or(GatewayError::MissingKey)?;
    // Anything that cannot be a gateway key is refused without a lookup.
    let plausible = key.starts_with(API_KEY_PREFIX)
        && key.len() <= 128
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !plausible {
        return Err(GatewayError::InvalidKey);
    }
    gw.keys
        .authenticate(&gw.db, &gw.metrics, &sha256(key))
        .await
}

/// Gathers a body's chunks, refusing more than `limit` bytes; a body of
/// one chunk is kept without a copy.
struct Collect {
    limit: usize,
    total: usize,
    first: Option<Bytes>,
    buf: Option<BytesMut>,
    /// Expected length, to allocate once.
    hint: usize,
}

/// The body outgrew its limit.
struct TooLarge;

impl Collect {
    fn new(limit: usize, hint: Option<usize>) -> Self {
        Self {
            limit,
            total: 0,
            first: None,
            buf: None,
            hint: hint.unwrap_or(0).min(limit),
        }
    }

    fn push(&mut self, chunk: Bytes) -> Result<(), TooLarge> {
        self.total += chunk.len();
        if self.total > self.limit {
            return Err(TooLarge);
        }
        match (&mut self.buf, self.first.take()) {
            (Some(b), _) => b.extend_from_slice(&chunk),
            (None, None) => self.first = Some(chunk),
            (None, Some(f)) => {
                let mut b = BytesMut::with_capacity(self.hint.max(f.len() + chunk.len()));
                b.extend_from_slice(&f);
                b.extend_from_slice(&chunk);
                self.buf = Some(b);
            }
        }
        Ok(())
    }

    fn finish(self) -> Bytes {
        match self.buf {
            Some(b) => b.freeze(),
            None => self.first.unwrap_or_default(),
        }
    }
}

/// Reads the client's body, refusing more than `limit` bytes. Callers bound
/// it in time: a client that stalls mid-body must not hold the request forever.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let declared = req
        .headers()
        .get(ax::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge(limit));
    }
    let mut body = Collect::new(limit, declared);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| GatewayError::BadBody(e.to_string()))?;
        body.push(chunk)
            .map_err(|TooLarge| GatewayError::PayloadTooLarge(limit))?;
    }
    Ok(body.finish())
}

/// Why a whole upstream body could not be read.
pub(crate) enum UpstreamBody {
    /// More than the cap: the response was dropped, which closes its connection.
    TooLarge,
    Failed(reqwest::Error),
}

/// Reads a whole upstream body into memory, holding at most `cap` bytes
/// (a declared larger `content-length` is refused before reading).
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<Bytes, UpstreamBody> {
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(UpstreamBody::TooLarge);
    }
    let mut body = Collect::new(cap, declared.map(|n| n as usize));
    while let Some(chunk) = resp.chunk().await.map_err(UpstreamBody::Failed)? {
        body.push(chunk)
            .map_err(|TooLarge| UpstreamBody::TooLarge)?;
    }
    Ok(body.finish())
}

enum Answer {
    Full(HttpResponse),
    Stream {
        status: u16,
        upstream: reqwest::Response,
    },
}

pub(crate) async fn chat_completions(
    req: HttpRequest,
    payload: web::Payload,
    gw: web::Data<Inner>,
) -> Result<HttpResponse, GatewayError> {
    let start = Instant::now();
    let key = authenticate(&gw, &req).await?;
    let mut log = LogGuard::new(
        gw.usage.clone(),
        gw.metrics.clone(),
        request_id(&req),
        key.org_id,
        key.id,
        start,
    );
    match proxy(&gw, &req, payload, key.org_id, &mut log).await {
        Ok(Answer::Full(res)) => Ok(res),
        Ok(Answer::Stream { status, upstream }) => {
            let mut res =
                HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::OK));
            relay_headers(upstream.headers(), &mut res);
            res.insert_header((ax::CACHE_CONTROL, ax::HeaderValue::from_static("no-cache")));
            let stream = RelayStream::new(
                upstream,
                log,
                gw.metrics.clone(),
                gw.client.timeout(),
                status,
            );
            Ok(res.streaming(stream))
        }
        Err(e) => {
            if let Some(kind) = e.upstream_kind() {
                gw.metrics.upstream_error(kind);
            }
            log.finish(e.status_code_u16(), Some(e.code()));
            Err(e)
        }
    }
}

impl GatewayError {
    fn status_code_u16(&self) -> u16 {
        actix_web::ResponseError::status_code(self).as_u16()
    }
}

async fn proxy(
    gw: &Inner,
    req: &HttpRequest,
    payload: web::Payload,
    org: uuid::Uuid,
    log: &mut LogGuard,
) -> Result<Answer, GatewayError> {
    let raw = tokio::time::timeout(gw.body_timeout, read_body(req, payload, gw.max_body))
        .await
        .map_err(|_| GatewayError::BodyTimeout(gw.body_timeout))??;
    // JSON is UTF-8; the parser does not check the strings it only skips.
    if std::str::from_utf8(&raw).is_err() {
        return Err(GatewayError::InvalidJson(
            "the request body is not valid UTF-8".to_owned(),
        ));
    }
    let chat = ChatRequest::parse(&raw).inspect_err(|e| {
        // Not routable, but the row still says what was asked for.
        if let GatewayError::ModelWithoutProvider(m) | GatewayError::StreamNotBool(m) = e {
            log.row.requested_model = Some(storable(m));
        }
    })?;
    let provider_name = chat.provider();
    log.row.requested_model = Some(storable(chat.model.as_ref()));
    log.row.provider_name = Some(storable(provider_name));
    log.row.upstream_model = Some(storable(chat.upstream_model()));
    log.row.streamed = chat.stream;
    let not_found = || GatewayError::ModelNotFound {
        model: chat.model.as_ref().to_owned(),
        provider: provider_name.to_owned(),
    };
    // Provider names are ^[a-z]+$: anything else cannot exist (and is not worth a lookup).
    if provider_name.len() > 64 || !provider_name.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(not_found());
    }
    let provider = gw
        .providers
        .get(&gw.db, &gw.client, &gw.metrics, org, provider_name)
        .await?
        .ok_or_else(not_found)?;
    log.row.provider_key_id = Some(provider.id);
    if !provider.active {
        return Err(GatewayError::ProviderInactive(provider.name.clone()));
    }
    if let Some(failure) = provider.refused {
        return Err(GatewayError::UpstreamForbidden {
            provider: provider.name.clone(),
            failure,
        });
    }
    let stream = chat.stream;
    let body = chat.rewrite(&raw);
    drop(chat);

    let mut rb = gw
        .client
        .http()
        .post(provider.chat_url.clone())
        .header(rq::AUTHORIZATION, provider.auth.clone())
        .header(
            rq::CONTENT_TYPE,
            rq::HeaderValue::from_static("application/json"),
        )
        .header(
            rq::ACCEPT,
            rq::HeaderValue::from_static(if stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
    if let Ok(id) = rq::HeaderValue::from_str(&log.row.request_id) {
        rb = rb.header(UPSTREAM_REQUEST_ID.clone(), id);
    }
    let rb = rb.body(body);
    let timeout = gw.client.timeout();
    let request_id = log.row.request_id.clone();
    let fail = |e: reqwest::Error| classify(&e, &provider.name, timeout, &request_id);
    // Non-streamed answers: the timeout bounds the whole exchange, body included.
    let deadline = tokio::time::Instant::now() + timeout;
    let upstream = if stream {
        // Streams: the timeout bounds the wait for the head, then each silence.
        match tokio::time::timeout(timeout, rb.send()).await {
            Ok(r) => r.map_err(fail)?,
            Err(_) => return Err(timed_out(&provider.name, timeout)),
        }
    } else {
        rb.timeout(timeout).send().await.map_err(fail)?
    };
    let status = upstream.status().as_u16();
    if (300..400).contains(&status) {
        return Err(GatewayError::UpstreamRedirect {
            provider: provider.name.clone(),
            status,
        });
    }
    let success = (200..300).contains(&status);
    // An SSE answer is relayed as a stream whatever the request said: never
    // buffered whole, and its usage read from its events.
    if success && (stream || is_event_stream(upstream.headers())) {
        log.row.streamed = true;
        return Ok(Answer::Stream { status, upstream });
    }
    log.set_ttfb();
    gw.metrics.upstream_ttfb.observe(log.elapsed());
    let mut res =
        HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY));
    relay_headers(upstream.headers(), &mut res);
    // An error answer to a stream request gets a fresh timeout for its body.
    let deadline = if stream {
        tokio::time::Instant::now() + timeout
    } else {
        deadline
    };
    let bytes =
        match tokio::time::timeout_at(deadline, read_capped(upstream, gw.max_response)).await {
            Ok(Ok(b)) => b,
            Ok(Err(UpstreamBody::Failed(e))) => return Err(fail(e)),
            Ok(Err(UpstreamBody::TooLarge)) => {
                return Err(GatewayError::UpstreamTooLarge {
                    provider: provider.name.clone(),
                    limit: gw.max_response,
                })
            }
            Err(_) => return Err(timed_out(&provider.name, timeout)),
        };
    let bytes = if success {
        bytes
    } else {
        // Error bodies are relayed, but never with the provider's own secret in them.
        redact(bytes, provider.secrets())
    };
    let error_class = if !success {
        Some("upstream_status")
    } else if let Some(u) = usage_of(&bytes) {
        log.set_usage(u);
        None
    } else if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
        // Relayed as sent (the client may know what to do with it), but
        // flagged: no tokens could be counted for this answer.
        Some("upstream_invalid_json")
    } else {
        // Valid JSON without `usage`: some servers omit it; nothing is wrong.
        None
    };
    log.finish(status, error_class);
    let mut res = res.body(bytes);
    if let Some(code) = error_class {
        res.extensions_mut()
            .insert(ErrorNote { code, detail: None });
    }
    Ok(Answer::Full(res))
}

fn timed_out(provider: &str, after: Duration) -> GatewayError {
    GatewayError::UpstreamTimeout {
        provider: provider.to_owned(),
        after,
    }
}

/// Upstream headers a client needs: the content type and rate-limit advice.
fn relay_headers(from: &rq::HeaderMap, to: &mut actix_web::HttpResponseBuilder) {
    for (k, v) in from {
        let name = k.as_str();
        if name == "content-type" || name == "retry-after" || name.starts_with("x-ratelimit-") {
            if let (Ok(k), Ok(v)) = (
                ax::HeaderName::from_bytes(name.as_bytes()),
                ax::HeaderValue::from_bytes(v.as_bytes()),
            ) {
                to.append_header((k, v));
            }
        }
    }
}

fn is_event_stream(headers: &rq::HeaderMap) -> bool {
    headers
        .get(rq::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Shortest secret worth redacting: replacing every occurrence of a one- or
/// two-letter "token" would garble the body and protect nothing.
const MIN_REDACTED_LEN: usize = 4;

/// `body` with every occurrence of each secret, raw or as JSON escapes it
/// (`\/`, `\"`, `\\`), replaced by `[redacted]`.
fn redact<'a>(body: Bytes, secrets: impl Iterator<Item = &'a [u8]>) -> Bytes {
    let mut out: Option<Vec<u8>> = None;
    for secret in secrets.filter(|s| s.len() >= MIN_REDACTED_LEN) {
        let mut forms = vec![secret.to_vec()];
        if let Ok(text) = std::str::from_utf8(secret) {
            if let Ok(json) = serde_json::to_string(text) {
                forms.push(json.as_bytes()[1..json.len() - 1].to_vec());
            }
            forms.push(text.replace('/', "\\/").into_bytes());
        }
        for form in forms {
            let cur = out.as_deref().unwrap_or(&body);
            if let Some(replaced) = replace_all(cur, &form, b"[redacted]") {
                out = Some(replaced);
            }
        }
    }
    out.map(Bytes::from).unwrap_or(body)
}

/// `hay` with every `needle` replaced, `None` when there is none.
fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = hay;
    let mut found = false;
    while let Some(i) = rest.windows(needle.len()).position(|w| w == needle) {
        found = true;
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(with);
        rest = &rest[i + needle.len()..];
    }
    found.then(|| {
        out.extend_from_slice(rest);
        out
    })
}

/// Maps a failed upstream call to the gateway's answer: the client gets the
/// class and hint only; the cause chain (which may name addresses) is logged.
fn classify(
    e: &reqwest::Error,
    provider: &str,
    timeout: Duration,
    request_id: &str,
) -> GatewayError {
    let failure = UpstreamFailure::of(e);
    tracing::warn!(
        request_id,
        provider,
        class = %failure.class,
        error = %upstream::error_chain(e),
        "upstream call failed"
    );
    let provider = provider.to_owned();
    match failure.class {
        FailureClass::AddressNotAllowed => GatewayError::UpstreamForbidden { provider, failure },
        FailureClass::TlsUntrusted
        | FailureClass::TlsWrongHost
        | FailureClass::TlsExpired
        | FailureClass::Tls => GatewayError::UpstreamTls { provider, failure },
        _ if e.is_timeout() && !e.is_connect() => timed_out(&provider, timeout),
        _ => GatewayError::UpstreamUnreachable { provider, failure },
    }
}

/// Finds the last `usage` in an SSE stream, reading a copy of each chunk.
#[derive(Default)]
struct SseUsage {
    partial: Vec<u8>,
    /// The current line outgrew the buffer: skip to its end.
    overflow: bool,
    usage: Option<Usage>,
}

const MAX_SSE_LINE: usize = 1 << 20;

impl SseUsage {
    fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(i) = chunk.iter().position(|b| *b == b'\n') {
            let (line, rest) = (&chunk[..i], &chunk[i + 1..]);
            chunk = rest;
            if self.overflow {
                self.overflow = false;
                self.partial.clear();
            } else if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut full = std::mem::take(&mut self.partial);
                full.extend_from_slice(line);
                self.line(&full);
                full.clear();
                self.partial = full;
            }
        }
        if !chunk.is_empty() && !self.overflow {
            if self.partial.len() + chunk.len() > MAX_SSE_LINE {
                self.overflow = true;
                self.partial.clear();
            } else {
                self.partial.extend_from_slice(chunk);
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if data.windows(7).any(|w| w == b"\"usage\"") {
            if let Some(u) = usage_of(data) {
                self.usage = Some(u);
            }
        }
    }
}

/// Relays upstream SSE bytes as they arrive. Dropped early (the client went
/// away), it drops the upstream response, which closes that request, and its
/// usage row says canceled.
struct RelayStream {
    upstream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    last_chunk: tokio::time::Instant,
    scanner: SseUsage,
    log: LogGuard,
    metrics: Arc<Metrics>,
    status: u16,
    first: bool,
    done: bool,
}

impl RelayStream {
    fn new(
        upstream: reqwest::Response,
        log: LogGuard,
        metrics: Arc<Metrics>,
        idle_timeout: Duration,
        status: u16,
    ) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            upstream: Box::pin(upstream.bytes_stream()),
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            idle_timeout,
            last_chunk: now,
            scanner: SseUsage::default(),
            log,
            metrics,
            status,
            first: true,
            done: false,
        }
    }

    fn end(&mut self, error: Option<GatewayError>) -> Option<Result<Bytes, Infallible>> {
        self.done = true;
        if let Some(u) = self.scanner.usage {
            self.log.set_usage(u);
        }
        match error {
            None => {
                self.log.finish(self.status, None);
                None
            }
            Some(e) => {
                // Headers are gone already: tell the client in the stream, as OpenAI does.
                let (code, kind, message) = match &e {
                    GatewayError::UpstreamTimeout { provider, after } => (
                        "upstream_timeout",
                        "timeout",
                        format!(
                            "the provider `{provider}` sent nothing for {} ms; the stream was cut",
                            after.as_millis()
                        ),
                    ),
                    GatewayError::UpstreamUnreachable { provider, failure } => (
                        "upstream_stream_error",
                        "stream",
                        format!("the provider `{provider}` broke off the stream: {failure}"),
                    ),
                    _ => ("upstream_stream_error", "stream", e.to_string()),
                };
                self.metrics.upstream_error(kind);
                self.log.finish(self.status, Some(code));
                tracing::warn!(request_id = %self.log.row.request_id, error = %message, "upstream stream failed");
                let mut event = b"data: ".to_vec();
                event.extend_from_slice(&error_body(&message, "upstream_error", None, code));
                event.extend_from_slice(b"\n\n");
                Some(Ok(Bytes::from(event)))
            }
        }
    }
}

impl Stream for RelayStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match this.upstream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.last_chunk = tokio::time::Instant::now();
                if this.first {
                    this.first = false;
                    this.log.set_ttfb();
                    this.metrics.upstream_ttfb.observe(this.log.elapsed());
                }
                this.scanner.feed(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let provider = this.log.row.provider_name.clone().unwrap_or_default();
                let e = classify(&e, &provider, this.idle_timeout, &this.log.row.request_id);
                Poll::Ready(this.end(Some(e)))
            }
            Poll::Ready(None) => Poll::Ready(this.end(None)),
            Poll::Pending => loop {
                // The timer is re-armed lazily, only when it fires, not per chunk.
                if this.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let deadline = this.last_chunk + this.idle_timeout;
                if deadline <= tokio::time::Instant::now() {
                    let provider = this.log.row.provider_name.clone().unwrap_or_default();
                    return Poll::Ready(this.end(Some(timed_out(&provider, this.idle_timeout))));
                }
                this.idle.as_mut().reset(deadline);
            },
        }
    }
}

/// A client-chosen string as a usage row may hold it: PostgreSQL text refuses
/// NUL, and one refused row would send a whole batch down the slow path.
fn storable(s: &str) -> String {
    const MAX: usize = 512;
    let mut end = s.len().min(MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].replace('\0', "\u{fffd}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_usage_is_found_across_chunk_boundaries() {
        let stream = b"data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":5,\"total_tokens\":12}}\r\n\r\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut s = SseUsage::default();
            s.feed(&stream[..split]);
            s.feed(&stream[split..]);
            let u = s.usage.expect("usage found");
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                (Some(7), Some(5), Some(12))
            );
        }
    }

    #[test]
    fn sse_usage_scanner_memory_is_bounded_by_one_line_cap() {
        let mut s = SseUsage::default();
        s.feed(b"data: ");
        let piece = vec![b'a'; 64 * 1024];
        for _ in 0..(4 * MAX_SSE_LINE / piece.len()) {
            s.feed(&piece);
            assert!(
                s.partial.capacity() <= 2 * MAX_SSE_LINE,
                "the copy grows with the line"
            );
        }
        s.feed(b"\n\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n");
        assert_eq!(s.usage.and_then(|u| u.total_tokens), Some(3));
    }
}
