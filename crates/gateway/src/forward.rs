//! Stage 3: the upstream call. No client header is forwarded (so never its
//! key, cookies or hop-by-hop headers): the upstream gets `content-type`,
//! `accept`, `x-request-id` and `Authorization: Bearer {provider token}`
//! (with traces on, also its attempt's `traceparent`, see [`crate::traces`]).
//! Back to the client go the upstream's status, body, `content-type`,
//! `retry-after` and `x-ratelimit-*`.
//!
//! Each fault is bounded: no head within the upstream timeout ⇒ 504; a
//! non-streamed body not complete within it ⇒ 504; broken mid-body ⇒ 502; a
//! non-streamed body over `max_response_bytes` ⇒ 502
//! `upstream_response_too_large` (never held whole). A 200 whose body is not
//! JSON is relayed as sent, logged with no tokens and `error_class =
//! upstream_invalid_json`. A success answered as `text/event-stream` is
//! handed to the relay even when `stream` was not asked for. An error body
//! that echoes the provider's token gets `[redacted]` in its place.
//!
//! Audio: speech answers (bytes, not JSON) are handed on as a stream like
//! SSE; an upload ([`forward_upload`]) streams the client's multipart body
//! and is answered like a JSON request, its text answers (`response_format`
//! `text`, `srt`, `vtt`) relayed as sent without a class.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use actix_web::http::header as ax;
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use bytes::Bytes;
use reqwest::header as rq;
use upstream::{FailureClass, UpstreamFailure};

use crate::balance::{pick, Outstanding, Upstream};
use crate::cache::ProviderEntry;
use crate::collect::{read_capped, UpstreamBody};
use crate::endpoint::Endpoint;
use crate::error::{ErrorClass, ErrorNote, GatewayError};
use crate::retry::{backoff, retryable_failure, retryable_status, unhealthy_status, MAX_ATTEMPTS};
use crate::route::{storable, Fallback, Route};
use crate::state::State;
use crate::traces::TraceHeaders;
use crate::usage::{usage_of, LogGuard};

static UPSTREAM_REQUEST_ID: rq::HeaderName = rq::HeaderName::from_static("x-request-id");

/// What the upstream answered.
pub(crate) enum Answer {
    /// Read whole (or an error status): ready for the client, row finished.
    Full(HttpResponse),
    /// A successful event stream, its body still to be relayed.
    Stream {
        status: u16,
        upstream: reqwest::Response,
        /// The gateway asked for usage the client did not: withhold it.
        strip_usage: bool,
    },
    /// A successful answer of bytes (speech audio), still to be relayed as it arrives.
    Bytes {
        status: u16,
        upstream: reqwest::Response,
    },
}

/// An upstream call with the headers every one gets: the endpoint's token,
/// the provider's static headers, `x-request-id`, and with traces on the
/// attempt's `traceparent`.
pub(crate) fn request(
    gw: &State,
    method: reqwest::Method,
    url: reqwest::Url,
    provider: &ProviderEntry,
    upstream: &Upstream,
    request_id: &str,
    trace: Option<TraceHeaders>,
) -> reqwest::RequestBuilder {
    let mut rb = gw
        .client
        .http_with(upstream.connect)
        .request(method, url)
        .header(rq::AUTHORIZATION, upstream.auth.clone());
    for (name, value) in &provider.headers {
        rb = rb.header(name.clone(), value.clone());
    }
    if let Some(t) = trace {
        rb = t.apply(rb);
    }
    match rq::HeaderValue::from_str(request_id) {
        Ok(id) => rb.header(UPSTREAM_REQUEST_ID.clone(), id),
        Err(_) => rb,
    }
}

/// Sends the routed request upstream and reads a non-streamed answer whole.
/// A provider that refuses the `stream_options.include_usage` the gateway
/// added (a 400 naming `stream_options`) is asked again without it, once, and
/// not asked again by this process.
pub(crate) async fn forward(
    gw: &State,
    route: Route,
    log: &mut LogGuard,
) -> Result<Answer, GatewayError> {
    let mut ask_usage = route.asks_usage;
    let stream = route.stream;
    let bytes_out = route.endpoint.streams_bytes();
    // Streams and audio bytes: the timeout bounds the head, then each silence.
    let streamed = stream || bytes_out;
    let timeout = gw.client.timeout();
    let request_id = log.row.request_id.clone();
    let send = |provider: &ProviderEntry, up: &Upstream, body: Bytes, trace| {
        let url = up.url(route.endpoint);
        let rb = url.map(|url| {
            request(
                gw,
                reqwest::Method::POST,
                url,
                provider,
                up,
                &request_id,
                trace,
            )
            .header(
                rq::CONTENT_TYPE,
                rq::HeaderValue::from_static("application/json"),
            )
            .header(
                rq::ACCEPT,
                rq::HeaderValue::from_static(if stream {
                    "text/event-stream"
                } else if bytes_out {
                    "*/*"
                } else {
                    "application/json"
                }),
            )
            .body(body)
        });
        let name = provider.name.clone();
        let (head, total) = (
            provider.first_byte.unwrap_or(timeout),
            provider.total.unwrap_or(timeout),
        );
        async move {
            let Some(rb) = rb else {
                return Err(Sent::Refused(GatewayError::ProviderMisconfigured(name)));
            };
            if streamed {
                // Streams: the timeout bounds the wait for the head, then each silence.
                match tokio::time::timeout(head, rb.send()).await {
                    Ok(r) => r.map_err(Sent::Failed),
                    Err(_) => Err(Sent::Refused(timed_out(&name, head))),
                }
            } else {
                // The head within `first_byte_ms` when set; the whole within `total_ms`.
                match tokio::time::timeout(head.min(total), rb.timeout(total).send()).await {
                    Ok(r) => r.map_err(Sent::Failed),
                    Err(_) => Err(Sent::Refused(timed_out(&name, head.min(total)))),
                }
            }
        }
    };
    // Non-streamed answers: the timeout (the provider's `total_ms` when set)
    // bounds the whole exchange, body included; retries and fallbacks stay within it too.
    let deadline = tokio::time::Instant::now() + route.provider.total.unwrap_or(timeout);
    // The model, then each fallback while the last one failed in a retryable way.
    let mut provider: &ProviderEntry = &route.provider;
    let mut fallback: Option<&Fallback> = None;
    let mut next = route.fallbacks.iter();
    let (mut upstream, up) = loop {
        let body = match (fallback, &route.source) {
            (Some(f), Some((raw, splice))) => {
                splice.apply_as(raw, ask_usage, Some(f.upstream_model()))
            }
            _ => route.body.clone(),
        };
        let prefer = if fallback.is_none() {
            route.prefer
        } else {
            None
        };
        let result = attempts(gw, provider, prefer, deadline, log, |up, trace| {
            send(provider, up, body.clone(), trace)
        })
        .await;
        let failed_over = match &result {
            Ok((resp, _)) => retryable_status(resp.status().as_u16(), resp.headers()),
            Err(Sent::Failed(e)) => retryable_failure(e),
            Err(Sent::Refused(_)) => false,
        };
        match next.next() {
            Some(f) if failed_over && tokio::time::Instant::now() < deadline => {
                tracing::info!(request_id = %request_id, from = %provider.name, to = %f.model, "falling back to the next model");
                gw.metrics.retries.fetch_add(1, Relaxed);
                log.end_attempt();
                provider = &f.provider;
                fallback = Some(f);
                // Asking for usage depends on what this provider accepts.
                ask_usage =
                    ask_usage && !gw.refuses_stream_usage(provider.id, route.endpoint.path());
                log.row.provider_name = Some(storable(&provider.name));
                log.row.provider_key_id = Some(provider.id);
                log.row.upstream_model = Some(storable(f.upstream_model()));
            }
            _ => {
                break result.map_err(|e| match e {
                    Sent::Failed(e) => classify(&e, &provider.name, timeout, &request_id),
                    Sent::Refused(e) => e,
                })?
            }
        }
    };
    if !route.fallbacks.is_empty() {
        log.served = Some(fallback.map_or_else(
            || log.row.requested_model.clone().unwrap_or_default(),
            |f| f.model.clone(),
        ));
    }
    let fail = |e: reqwest::Error| classify(&e, &provider.name, timeout, &request_id);
    if ask_usage && upstream.status() == reqwest::StatusCode::BAD_REQUEST {
        log.set_ttfb();
        let headers = upstream.headers().clone();
        let bytes = read_whole(
            gw,
            &provider.name,
            upstream,
            tokio::time::Instant::now() + timeout,
            &fail,
        )
        .await?;
        if !bytes.windows(14).any(|w| w == b"stream_options") {
            return Ok(Answer::Full(full_answer(
                provider, log, 400, &headers, bytes, false,
            )));
        }
        tracing::info!(
            provider = %provider.name,
            "the provider refuses stream_options.include_usage; asking again without it"
        );
        gw.remember_stream_usage_refused(provider.id, route.endpoint.path());
        ask_usage = false;
        let (raw, splice) = route
            .source
            .as_ref()
            .ok_or_else(|| GatewayError::ProviderMisconfigured(provider.name.clone()))?;
        let trace = log.begin_attempt(&reqwest::Method::POST, &up.chat_url);
        let sent = send(
            provider,
            up,
            splice.apply_as(raw, false, fallback.map(Fallback::upstream_model)),
            trace,
        )
        .await;
        note_attempt(log, &sent);
        upstream = sent.map_err(|e| match e {
            Sent::Failed(e) => fail(e),
            Sent::Refused(e) => e,
        })?;
    }
    let expect = Expect {
        stream,
        strip_usage: ask_usage,
        bytes_out,
        text_ok: false,
    };
    settle(gw, provider, log, upstream, expect, deadline, &fail).await
}

/// Why an attempt got no answer: a failed call (perhaps worth another
/// try), or a refusal that ends the request.
enum Sent {
    Failed(reqwest::Error),
    Refused(GatewayError),
}

/// Sends with `send` to an endpoint of `provider` chosen by the balancer
/// (`prefer` first, when it is one of them),
/// again on another while the failure is one [`crate::retry`] retries and
/// the deadline, the attempt cap and the retry budget allow. Returns the
/// answer's head and the endpoint that gave it; the endpoint counts the
/// request as outstanding until the row is finished.
async fn attempts<'p, F, Fut>(
    gw: &State,
    provider: &'p ProviderEntry,
    prefer: Option<uuid::Uuid>,
    deadline: tokio::time::Instant,
    log: &mut LogGuard,
    send: F,
) -> Result<(reqwest::Response, &'p Upstream), Sent>
where
    F: Fn(&'p Upstream, Option<TraceHeaders>) -> Fut,
    Fut: std::future::Future<Output = Result<reqwest::Response, Sent>>,
{
    gw.retries.deposit();
    let ups = &provider.upstreams;
    // Endpoints the SSRF policy refuses are never tried (`route` refused the
    // provider when that is all of them).
    let mut tried: Vec<usize> = (0..ups.len())
        .filter(|&i| ups[i].refused.is_some())
        .collect();
    let mut attempt = 0u32;
    let mut reused = false;
    loop {
        let preferred = (attempt == 0)
            .then(|| ups.iter().position(|u| Some(u.id) == prefer))
            .flatten()
            .filter(|i| !tried.contains(i));
        let (picked, probes) = match preferred {
            Some(i) => (Some(i), Vec::new()),
            None => pick(&gw.health, ups, &tried),
        };
        for p in probes {
            probe_later(gw, p);
        }
        let i = match picked {
            Some(i) => i,
            None => match tried.last() {
                // Only a lost connection is tried again on the same endpoint, once.
                Some(&last) if attempt > 0 && !reused && ups.len() == 1 => {
                    reused = true;
                    last
                }
                _ => return Err(all_refused(provider)),
            },
        };
        let up = &ups[i];
        attempt += 1;
        tried.push(i);
        let hold = Outstanding::new(&up.health);
        let trace = log.begin_attempt(&reqwest::Method::POST, &up.chat_url);
        let result = send(up, trace).await;
        note_attempt(log, &result);
        let again = |gw: &State| {
            attempt < MAX_ATTEMPTS
                && tokio::time::Instant::now() + backoff(attempt) < deadline
                && gw.retries.withdraw()
        };
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if unhealthy_status(status) {
                    gw.health.failed(&up.health);
                } else {
                    gw.health.succeeded(&up.health);
                }
                if retryable_status(status, resp.headers()) && more(ups, &tried) && again(gw) {
                    tracing::info!(request_id = %log.row.request_id, provider = %provider.name, status, attempt, "retrying on another endpoint");
                    drop(resp);
                    log.end_attempt();
                    gw.metrics.retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                log.outstanding = Some(hold);
                log.attempts += attempt;
                log.endpoint_id = Some(up.id);
                return Ok((resp, up));
            }
            Err(Sent::Failed(e)) => {
                let retryable = retryable_failure(&e);
                if retryable || e.is_timeout() {
                    gw.health.failed(&up.health);
                }
                let lost = upstream::UpstreamFailure::of(&e).class == FailureClass::ConnectionBroke;
                let more = more(ups, &tried) || (lost && !reused && ups.len() == 1);
                if retryable && more && again(gw) {
                    tracing::info!(request_id = %log.row.request_id, provider = %provider.name, error = %upstream::error_chain(&e), attempt, "retrying on another endpoint");
                    gw.metrics.retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                log.attempts += attempt;
                log.endpoint_id = Some(up.id);
                return Err(Sent::Failed(e));
            }
            Err(refused) => {
                if let Sent::Refused(GatewayError::UpstreamTimeout { .. }) = &refused {
                    gw.health.failed(&up.health);
                }
                log.attempts += attempt;
                log.endpoint_id = Some(up.id);
                return Err(refused);
            }
        }
    }
}

/// What an attempt's client span records of its outcome (traces on).
fn note_attempt(log: &mut LogGuard, result: &Result<reqwest::Response, Sent>) {
    match result {
        Ok(r) => log.attempt_answered(r.status().as_u16()),
        Err(Sent::Failed(e)) => log.attempt_failed(&UpstreamFailure::of(e).class.to_string()),
        Err(Sent::Refused(e)) => log.attempt_failed(e.class().as_str()),
    }
}

/// Whether an endpoint not yet tried remains.
fn more(ups: &[Upstream], tried: &[usize]) -> bool {
    (0..ups.len()).any(|i| !tried.contains(&i))
}

/// No endpoint left to try: the SSRF policy refused the rest.
fn all_refused(provider: &ProviderEntry) -> Sent {
    Sent::Refused(GatewayError::UpstreamForbidden {
        provider: provider.name.clone(),
        failure: provider
            .primary()
            .refused
            .unwrap_or_else(|| FailureClass::AddressNotAllowed.into()),
    })
}

/// Probes an endpoint whose cooldown passed (`GET /v1/models`), off the
/// request path; its verdict decides whether it takes traffic again.
fn probe_later(gw: &State, up: &Upstream) {
    let (client, health, table) = (gw.client.clone(), up.health.clone(), gw.health.clone());
    let (base_url, auth, connect) = (up.base_url.clone(), up.auth.clone(), up.connect);
    tokio::spawn(async move {
        let probe = upstream::models::ModelsProbe {
            client: &client,
            base_url: &base_url,
            auth: &auth,
            connect,
        };
        let ok = probe.list().await.is_ok_and(|a| a.is_success());
        tracing::info!(base_url = %base_url.as_str(), healthy = ok, "endpoint probed");
        table.probed(&health, ok);
    });
}

/// What a request may be answered with.
#[derive(Clone, Copy)]
struct Expect {
    /// The client asked for a stream.
    stream: bool,
    /// The gateway asked for stream usage the client did not: withhold it.
    strip_usage: bool,
    /// Success is bytes to stream back (speech audio).
    bytes_out: bool,
    /// Success may be text, not JSON (transcriptions).
    text_ok: bool,
}

/// What becomes of an upstream's answer once its head is in: a stream to
/// relay, or a body read whole (within `deadline`) and the row finished.
async fn settle(
    gw: &State,
    provider: &ProviderEntry,
    log: &mut LogGuard,
    upstream: reqwest::Response,
    expect: Expect,
    deadline: tokio::time::Instant,
    fail: &impl Fn(reqwest::Error) -> GatewayError,
) -> Result<Answer, GatewayError> {
    let Expect {
        stream,
        strip_usage,
        bytes_out,
        text_ok,
    } = expect;
    let timeout = gw.client.timeout();
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
        return Ok(Answer::Stream {
            status,
            upstream,
            strip_usage,
        });
    }
    if success && bytes_out {
        log.row.streamed = true;
        return Ok(Answer::Bytes { status, upstream });
    }
    log.set_ttfb();
    gw.metrics.upstream_ttfb.observe(log.elapsed());
    let headers = upstream.headers().clone();
    // An error answer to a stream request gets a fresh timeout for its body.
    let deadline = if stream || bytes_out {
        tokio::time::Instant::now() + timeout
    } else {
        deadline
    };
    let bytes = read_whole(gw, &provider.name, upstream, deadline, fail).await?;
    Ok(Answer::Full(full_answer(
        provider, log, status, &headers, bytes, text_ok,
    )))
}

/// Sends a multipart upload whose body `pump` streams from the client
/// (`body` is the upstream's end of it), and reads the answer whole. The
/// upstream has the upstream timeout to answer once the body is all sent,
/// and to take each piece of it. Never retried: the body is gone once sent
/// (retries must leave uploads alone).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward_upload(
    gw: &State,
    endpoint: Endpoint,
    provider: &ProviderEntry,
    content_type: rq::HeaderValue,
    length: Option<u64>,
    body: reqwest::Body,
    pump: impl std::future::Future<Output = Result<(), GatewayError>>,
    log: &mut LogGuard,
) -> Result<Answer, GatewayError> {
    let timeout = gw.client.timeout();
    let request_id = log.row.request_id.clone();
    let fail = |e: reqwest::Error| classify(&e, &provider.name, timeout, &request_id);
    // One attempt: the balancer's choice among the endpoints the policy allows.
    let refused: Vec<usize> = (0..provider.upstreams.len())
        .filter(|&i| provider.upstreams[i].refused.is_some())
        .collect();
    let up = match pick(&gw.health, &provider.upstreams, &refused).0 {
        Some(i) => &provider.upstreams[i],
        None => {
            return Err(match all_refused(provider) {
                Sent::Refused(e) => e,
                Sent::Failed(e) => fail(e),
            })
        }
    };
    log.outstanding = Some(Outstanding::new(&up.health));
    log.attempts = 1;
    log.endpoint_id = Some(up.id);
    let url = up
        .url(endpoint)
        .ok_or_else(|| GatewayError::ProviderMisconfigured(provider.name.clone()))?;
    let trace = log.begin_attempt(&reqwest::Method::POST, &up.chat_url);
    let mut rb = request(
        gw,
        reqwest::Method::POST,
        url,
        provider,
        up,
        &request_id,
        trace,
    )
    .header(rq::CONTENT_TYPE, content_type)
    .header(rq::ACCEPT, rq::HeaderValue::from_static("*/*"));
    if let Some(n) = length {
        rb = rb.header(rq::CONTENT_LENGTH, n);
    }
    let send = rb.body(body).send();
    tokio::pin!(send, pump);
    let upstream = async {
        Ok(tokio::select! {
            // The client's faults first: its 413 or 408 is the answer, and
            // dropping `send` cuts the upload the upstream was getting.
            biased;
            pumped = &mut pump => {
                pumped?;
                match tokio::time::timeout(timeout, &mut send).await {
                    Ok(r) => r.map_err(&fail)?,
                    Err(_) => return Err(timed_out(&provider.name, timeout)),
                }
            }
            // Answered before the whole upload was read (an early error status):
            // the rest is not read, and the upstream's answer is relayed.
            sent = &mut send => sent.map_err(&fail)?,
        })
    }
    .await;
    log.attempt_result(&upstream);
    let upstream = upstream?;
    let deadline = tokio::time::Instant::now() + timeout;
    let expect = Expect {
        stream: false,
        strip_usage: false,
        bytes_out: false,
        text_ok: true,
    };
    settle(gw, provider, log, upstream, expect, deadline, &fail).await
}

/// A non-streamed upstream body, within the response cap and `deadline`.
async fn read_whole(
    gw: &State,
    provider: &str,
    upstream: reqwest::Response,
    deadline: tokio::time::Instant,
    fail: &impl Fn(reqwest::Error) -> GatewayError,
) -> Result<Bytes, GatewayError> {
    match tokio::time::timeout_at(deadline, read_capped(upstream, gw.max_response)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(UpstreamBody::Failed(e))) => Err(fail(e)),
        Ok(Err(UpstreamBody::TooLarge)) => Err(GatewayError::UpstreamTooLarge {
            provider: provider.to_owned(),
            limit: gw.max_response,
        }),
        Err(_) => Err(timed_out(provider, gw.client.timeout())),
    }
}

/// The client's answer to a body read whole; the row is finished with its usage or class.
fn full_answer(
    provider: &ProviderEntry,
    log: &mut LogGuard,
    status: u16,
    headers: &rq::HeaderMap,
    bytes: Bytes,
    text_ok: bool,
) -> HttpResponse {
    let success = (200..300).contains(&status);
    let mut res =
        HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY));
    relay_headers(headers, &mut res);
    let bytes = if success {
        bytes
    } else {
        // Error bodies are relayed, but never with the provider's own secret in them.
        redact(bytes, provider.secrets())
    };
    if success {
        if let Some(t) = &mut log.trace {
            t.answered_by(&bytes);
        }
    }
    let error_class = if !success {
        Some(ErrorClass::UpstreamStatus)
    } else if let Some(u) = usage_of(&bytes) {
        log.set_usage(u);
        None
    } else if text_ok && is_text(headers) {
        // Said to be text (a transcription's `response_format: text`, `srt`, `vtt`): as sent.
        None
    } else if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
        // Relayed as sent (the client may know what to do with it), but
        // flagged: no tokens could be counted for this answer.
        Some(ErrorClass::UpstreamInvalidJson)
    } else {
        // Valid JSON without `usage`: some servers omit it; nothing is wrong.
        None
    };
    log.finish(status, error_class);
    let created = (success && log.endpoint == Endpoint::Responses.path())
        .then(|| crate::responses::created_id(&bytes))
        .flatten();
    let mut res = res.body(bytes);
    if let Some(id) = created {
        res.extensions_mut().insert(crate::responses::Created(id));
    }
    if let Some(code) = error_class {
        res.extensions_mut()
            .insert(ErrorNote { code, detail: None });
    }
    res
}

pub(crate) fn timed_out(provider: &str, after: Duration) -> GatewayError {
    GatewayError::UpstreamTimeout {
        provider: provider.to_owned(),
        after,
    }
}

/// Upstream headers a client needs: the content type and rate-limit advice.
pub(crate) fn relay_headers(from: &rq::HeaderMap, to: &mut actix_web::HttpResponseBuilder) {
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
    mime(headers).is_some_and(|m| m.eq_ignore_ascii_case("text/event-stream"))
}

/// A `text/*` answer other than an event stream (`text/plain`, `text/vtt`).
fn is_text(headers: &rq::HeaderMap) -> bool {
    mime(headers).is_some_and(|m| {
        m.get(..5).is_some_and(|t| t.eq_ignore_ascii_case("text/"))
            && !m.eq_ignore_ascii_case("text/event-stream")
    })
}

fn mime(headers: &rq::HeaderMap) -> Option<&str> {
    let v = headers.get(rq::CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or_default().trim())
}

/// Shortest secret worth redacting: replacing every occurrence of a one- or
/// two-letter "token" would garble the body and protect nothing.
const MIN_REDACTED_LEN: usize = 4;

/// `body` with every occurrence of each secret, raw or as JSON escapes it
/// (`\/`, `\"`, `\\`), replaced by `[redacted]`.
pub(crate) fn redact<'a>(body: Bytes, secrets: impl Iterator<Item = &'a [u8]>) -> Bytes {
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
pub(crate) fn classify(
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
