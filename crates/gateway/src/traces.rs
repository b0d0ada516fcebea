//! OpenTelemetry traces: one server span per proxied request, with the
//! GenAI semantic conventions' attributes, and a client span per upstream
//! attempt (each retry and fallback its own), exported by [`crate::otlp`].
//!
//! Context: a client's W3C `traceparent` continues its trace (the gateway's
//! server span is its child); an invalid one is ignored and a new trace
//! begins, never an error. Each upstream attempt carries a `traceparent`
//! naming its client span (and the client's `tracestate`, as received).
//! Sampling follows the parent's `sampled` flag, else
//! `OTEL_TRACES_SAMPLER_ARG` of new traces (by trace id, so every replica
//! agrees); an unsampled request still passes its context on, flagged 00.
//!
//! Off (no `OTEL_EXPORTER_OTLP_*ENDPOINT`), nothing here runs: the state's
//! tracer is `None`, checked once per request, and no `traceparent` reaches
//! the upstream (it gets only the headers `forward` lists).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use rand::Rng;
use reqwest::header as rq;
use storage::logs::RequestLog;

use crate::error::GatewayError;
use crate::otlp::Exporter;

static TRACEPARENT: rq::HeaderName = rq::HeaderName::from_static("traceparent");
static TRACESTATE: rq::HeaderName = rq::HeaderName::from_static("tracestate");

/// Longest `tracestate` passed on (the W3C limit is 32 members; 512 bytes is what
/// the spec says a participant may cut to).
const MAX_TRACESTATE: usize = 512;

/// OTLP span kinds (`SpanKind` in the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanKind {
    Server = 2,
    Client = 3,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// A finished span, ready for export.
#[derive(Debug, Clone)]
pub(crate) struct SpanData {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    /// Unix time, nanoseconds.
    pub start: u64,
    pub end: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// Status `ERROR` (else unset).
    pub error: bool,
}

/// Makes request traces and hands their finished spans to the exporter.
pub(crate) struct Tracer {
    exporter: Exporter,
    /// New traces are sampled when their id's last 8 bytes are below this.
    threshold: u64,
}

/// A client's `traceparent`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl Parent {
    /// A W3C `traceparent` (`00-{trace id}-{parent id}-{flags}`), or `None`
    /// when it is not a valid one. Later versions are read as version 00,
    /// as the spec asks.
    pub fn parse(v: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(v).ok()?.trim();
        let b = s.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex::<1>(&s[0..2])?[0];
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let trace_id = hex::<16>(&s[3..35])?;
        let span_id = hex::<8>(&s[36..52])?;
        let flags = hex::<1>(&s[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }
}

/// Lowercase hex of exactly `N` bytes (the spec refuses uppercase).
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(b[2 * i])? << 4 | nibble(b[2 * i + 1])?;
    }
    Some(out)
}

pub(crate) fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

fn span_id() -> [u8; 8] {
    let mut rng = rand::thread_rng();
    loop {
        let id: [u8; 8] = rng.gen();
        if id != [0; 8] {
            return id;
        }
    }
}

impl Tracer {
    pub fn new(exporter: Exporter, sample_ratio: f64) -> Self {
        let ratio = sample_ratio.clamp(0.0, 1.0);
        let threshold = if ratio >= 1.0 {
            u64::MAX
        } else {
            (ratio * u64::MAX as f64) as u64
        };
        Self {
            exporter,
            threshold,
        }
    }

    /// The trace of a request that just arrived with these headers.
    pub fn begin(self: &Arc<Self>, req: &HttpRequest, endpoint: &'static str) -> Box<RequestTrace> {
        let headers = req.headers();
        let parent = headers
            .get("traceparent")
            .and_then(|v| Parent::parse(v.as_bytes()));
        let tracestate = parent
            .and_then(|_| headers.get("tracestate"))
            .filter(|v| v.len() <= MAX_TRACESTATE)
            .and_then(|v| rq::HeaderValue::from_bytes(v.as_bytes()).ok());
        let (trace_id, sampled) = match parent {
            Some(p) => (p.trace_id, p.sampled),
            None => {
                let mut rng = rand::thread_rng();
                let id: [u8; 16] = loop {
                    let id: [u8; 16] = rng.gen();
                    if id != [0; 16] {
                        break id;
                    }
                };
                let low = u64::from_be_bytes(id[8..].try_into().unwrap_or_default());
                (id, self.threshold == u64::MAX || low < self.threshold)
            }
        };
        Box::new(RequestTrace {
            tracer: self.clone(),
            trace_id,
            span_id: span_id(),
            parent: parent.map(|p| p.span_id),
            sampled,
            tracestate,
            start: now(),
            operation: operation(endpoint),
            method: req.method().as_str().to_owned(),
            attempt: None,
            response_model: None,
        })
    }
}

/// The GenAI `gen_ai.operation.name` of an endpoint (its path where the
/// conventions name none).
fn operation(endpoint: &'static str) -> &'static str {
    match endpoint {
        "chat/completions" | "responses" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        other => other,
    }
}

/// The `traceparent` (and `tracestate`) of one upstream attempt.
pub(crate) struct TraceHeaders {
    traceparent: rq::HeaderValue,
    tracestate: Option<rq::HeaderValue>,
}

impl TraceHeaders {
    pub fn apply(self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let rb = rb.header(TRACEPARENT.clone(), self.traceparent);
        match self.tracestate {
            Some(ts) => rb.header(TRACESTATE.clone(), ts),
            None => rb,
        }
    }
}

/// An upstream attempt whose client span is open.
struct Attempt {
    span_id: [u8; 8],
    start: u64,
    name: String,
    attributes: Vec<(&'static str, Value)>,
    error: bool,
}

/// One request's trace: its server span (open until the request's row is
/// finished: a stream's when the stream ends) and its open attempt.
pub(crate) struct RequestTrace {
    tracer: Arc<Tracer>,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    sampled: bool,
    tracestate: Option<rq::HeaderValue>,
    start: u64,
    operation: &'static str,
    method: String,
    attempt: Option<Attempt>,
    /// The `model` the upstream's answer names.
    response_model: Option<String>,
}

fn span_name(operation: &str, model: Option<&str>) -> String {
    match model {
        Some(m) if !m.is_empty() => format!("{operation} {m}"),
        _ => operation.to_owned(),
    }
}

fn text(v: &str) -> Value {
    Value::Str(v.to_owned())
}

impl RequestTrace {
    /// Opens the client span of an attempt to `url` (ending the previous
    /// attempt's, if still open) and returns the headers that carry it.
    pub fn begin_attempt(
        &mut self,
        method: &str,
        provider: Option<&str>,
        model: Option<&str>,
        url: &reqwest::Url,
    ) -> TraceHeaders {
        self.end_attempt();
        let id = span_id();
        let flags = if self.sampled { "01" } else { "00" };
        let traceparent = format!("00-{}-{}-{flags}", to_hex(&self.trace_id), to_hex(&id));
        if self.sampled {
            let mut attributes = vec![
                ("gen_ai.operation.name", text(self.operation)),
                ("http.request.method", text(method)),
            ];
            if let Some(p) = provider {
                attributes.push(("gen_ai.provider.name", text(p)));
                attributes.push(("gen_ai.system", text(p)));
            }
            if let Some(m) = model {
                attributes.push(("gen_ai.request.model", text(m)));
            }
            if let Some(host) = url.host_str() {
                attributes.push(("server.address", text(host)));
            }
            if let Some(port) = url.port_or_known_default() {
                attributes.push(("server.port", Value::Int(i64::from(port))));
            }
            self.attempt = Some(Attempt {
                span_id: id,
                start: now(),
                name: span_name(self.operation, model),
                attributes,
                error: false,
            });
        }
        TraceHeaders {
            // Hex and dashes only: always a valid header value.
            traceparent: rq::HeaderValue::from_str(&traceparent)
                .unwrap_or_else(|_| rq::HeaderValue::from_static("")),
            tracestate: self.tracestate.clone(),
        }
    }

    /// The open attempt got an answer with this status (its span stays
    /// open until its body is read, or the next attempt begins).
    pub fn attempt_answered(&mut self, status: u16) {
        if let Some(a) = &mut self.attempt {
            a.attributes
                .push(("http.response.status_code", Value::Int(i64::from(status))));
            if status >= 400 {
                a.attributes
                    .push(("error.type", Value::Str(status.to_string())));
                a.error = true;
            }
        }
    }

    /// Notes the `model` an answer (a JSON body, or a stream's first event) names.
    pub fn answered_by(&mut self, json: &[u8]) {
        if self.sampled && self.response_model.is_none() {
            self.response_model = response_model(json);
        }
    }

    /// The open attempt failed without an answer: its span ends now.
    pub fn attempt_failed(&mut self, error_type: &str) {
        if let Some(a) = &mut self.attempt {
            a.attributes.push(("error.type", text(error_type)));
            a.error = true;
        }
        self.end_attempt();
    }

    /// Ends the open attempt's span.
    pub fn end_attempt(&mut self) {
        if let Some(a) = self.attempt.take() {
            self.tracer.exporter.push(SpanData {
                trace_id: self.trace_id,
                span_id: a.span_id,
                parent: Some(self.span_id),
                name: a.name,
                kind: SpanKind::Client,
                start: a.start,
                end: now(),
                attributes: a.attributes,
                error: a.error,
            });
        }
    }

    /// Ends the trace with its request's row: the open attempt, then the server span.
    pub fn finish(mut self: Box<Self>, row: &RequestLog, endpoint: &str) {
        self.end_attempt();
        if !self.sampled {
            return;
        }
        let mut attributes = vec![
            ("gen_ai.operation.name", text(self.operation)),
            ("http.request.method", text(&self.method)),
            ("http.route", Value::Str(format!("/v1/{endpoint}"))),
            (
                "http.response.status_code",
                Value::Int(i64::from(row.status_code)),
            ),
            ("llmgw.request_id", text(&row.request_id)),
        ];
        if !row.org_id.is_nil() {
            attributes.push(("llmgw.org_id", Value::Str(row.org_id.to_string())));
        }
        if let Some(k) = row.api_key_id {
            attributes.push(("llmgw.api_key_id", Value::Str(k.to_string())));
        }
        if let Some(p) = &row.provider_name {
            attributes.push(("gen_ai.provider.name", text(p)));
            attributes.push(("gen_ai.system", text(p)));
        }
        if let Some(m) = &row.requested_model {
            attributes.push(("llmgw.requested_model", text(m)));
        }
        let model = row.upstream_model.as_deref();
        if let Some(m) = model {
            attributes.push(("gen_ai.request.model", text(m)));
        }
        if let Some(m) = self.response_model.take() {
            attributes.push(("gen_ai.response.model", Value::Str(m)));
        }
        if let Some(n) = row.prompt_tokens {
            attributes.push(("gen_ai.usage.input_tokens", Value::Int(n)));
        }
        if let Some(n) = row.completion_tokens {
            attributes.push(("gen_ai.usage.output_tokens", Value::Int(n)));
        }
        if row.streamed {
            attributes.push(("llmgw.streamed", Value::Bool(true)));
        }
        if let Some(n) = row.attempts {
            attributes.push(("llmgw.attempts", Value::Int(i64::from(n))));
        }
        let error_type = row
            .error_class
            .clone()
            .or_else(|| (row.status_code >= 500).then(|| row.status_code.to_string()));
        let name = span_name(self.operation, model);
        self.emit(name, attributes, error_type);
    }

    /// Ends the trace of a request refused before it had a row (its key).
    pub fn refused(self: Box<Self>, request_id: &str, endpoint: &str, e: &GatewayError) {
        if !self.sampled {
            return;
        }
        let status = actix_web::ResponseError::status_code(e).as_u16();
        let attributes = vec![
            ("gen_ai.operation.name", text(self.operation)),
            ("http.request.method", text(&self.method)),
            ("http.route", Value::Str(format!("/v1/{endpoint}"))),
            ("http.response.status_code", Value::Int(i64::from(status))),
            ("llmgw.request_id", text(request_id)),
        ];
        let name = self.operation.to_owned();
        self.emit(name, attributes, Some(e.class().as_str().to_owned()));
    }

    fn emit(
        &self,
        name: String,
        mut attributes: Vec<(&'static str, Value)>,
        error_type: Option<String>,
    ) {
        let error = error_type.is_some();
        if let Some(e) = error_type {
            attributes.push(("error.type", Value::Str(e)));
        }
        self.tracer.exporter.push(SpanData {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            name,
            kind: SpanKind::Server,
            start: self.start,
            end: now(),
            attributes,
            error,
        });
    }
}

/// The `model` member of a JSON answer, or of the first `data:` event of a stream's chunk.
fn response_model(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    let json = match bytes.windows(5).position(|w| w == b"data:") {
        Some(i) if bytes.first() != Some(&b'{') => {
            let rest = &bytes[i + 5..];
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            &rest[..end]
        }
        _ => bytes,
    };
    serde_json::from_slice::<Named>(json)
        .ok()?
        .model
        .filter(|m| !m.is_empty() && m.len() <= 256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_parsed_as_the_w3c_spec_says() {
        let ok = Parent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(to_hex(&ok.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&ok.span_id), "00f067aa0ba902b7");
        assert!(ok.sampled);
        let unsampled =
            Parent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        // A later version may carry more fields.
        assert!(
            Parent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz").is_some()
        );
        for bad in [
            &b""[..],
            b"garbage",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01".as_bytes(),
        ] {
            assert_eq!(
                Parent::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_response_model_is_read_from_a_body_or_a_first_event() {
        assert_eq!(
            response_model(br#"{"id":"x","model":"gpt-4o-2024","usage":{}}"#).as_deref(),
            Some("gpt-4o-2024")
        );
        assert_eq!(
            response_model(
                b"data: {\"model\":\"m1\",\"choices\":[]}\n\ndata: {\"model\":\"m2\"}\n\n"
            )
            .as_deref(),
            Some("m1")
        );
        assert_eq!(response_model(b"data: {\"model\":\"cut"), None);
        assert_eq!(response_model(b"not json"), None);
    }

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&b), "0001abff");
        assert_eq!(hex::<4>("0001abff"), Some(b));
    }
}
