//! A real OpenAI-compatible HTTPS upstream on 127.0.0.1 for tests.
//!
//! Behaviour is chosen by the model name the upstream receives:
//! - anything else: a chat completion echoing the model, with `usage`;
//!   with `"stream": true`, SSE chunks, a usage chunk and `[DONE]`;
//! - `status-NNN`: answers status NNN with an OpenAI-shaped error body;
//! - `sleep-MS` or `slowhead-MS`: waits MS milliseconds before answering;
//! - `slowstream-MS`: streams a chunk every MS milliseconds, 10,000 times;
//! - `redirect`: answers 307 to another URL;
//! - `slowbody-MS`: sends the head and half of a JSON completion at once,
//!   the rest after MS milliseconds (whatever `stream` says);
//! - `reset-after-N`: sends N chunks (SSE events, or bytes of a JSON
//!   completion without `stream`), then breaks the connection mid-body;
//! - `garbage`: 200 `application/json` whose body is not JSON;
//! - `huge-MB`: a body of MB MiB, chunked without a `content-length`: a
//!   JSON completion, or with `stream` one MB-MiB SSE line, usage and `[DONE]`;
//! - `hang`: sends the head (and, with `stream`, one event) and then nothing, forever.
//! - `echo-token`: 401 whose error message quotes the bearer token it received
//!   (as some servers do), raw and JSON-escaped;
//! - `sse-always`: an SSE stream with a usage chunk whatever `stream` says.
//!
//! Audio: `POST …/v1/audio/transcriptions` and `/translations` read the
//! multipart body and answer `{"text": "heard <N> bytes of <filename> as
//! <model>", "usage": {…tokens 14/5/19}}` (`response_format=text`: that text
//! as `text/plain`); `POST …/v1/audio/speech` streams [`speech_audio`] of its
//! `input` as `audio/mpeg`, in [`SPEECH_CHUNKS`] chunks [`SPEECH_GAP`] apart.
//!
//! Any path ending in `/v1/chat/completions` or `/v1/models` is served, so
//! base URLs with a path prefix work. A path segment before `/v1/models`
//! picks a behaviour for the model list: `fail` (500), `slow` (1 s late),
//! `huge` (a 5 MiB list), `garbage` (not JSON). `GET /v1/models/{id}`
//! answers a listed model (404 for others, and always under a `vllm`
//! segment, which has no such route, like vLLM).
//!
//! `POST /v1/responses` answers with a new id per call (`resp_<uuid>`) and
//! stores the response: `GET|DELETE /v1/responses/{id}`, `POST
//! /v1/responses/{id}/cancel` and `GET /v1/responses/{id}/input_items`
//! serve stored ids (404 for others).
//!
//! The mock counts its open connections and unfinished response bodies, so
//! tests can check that the gateway let go of everything a fault left open.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::tls::TestCa;

/// One request the upstream received.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// The query string as sent (without `?`), empty when none.
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<SeenRequest>>,
    /// Streams whose client went away before the stream ended.
    disconnects: AtomicUsize,
    models: Mutex<Vec<String>>,
    /// Responses made by `POST /v1/responses`, by id, with their input items.
    responses: Mutex<std::collections::HashMap<String, (Value, Vec<Value>)>>,
    /// TLS connections currently open.
    connections: Arc<AtomicUsize>,
    /// Streamed response bodies not yet finished or dropped.
    bodies: Arc<AtomicUsize>,
}

/// Counts one live thing for as long as it exists.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running mock upstream; stops when dropped.
pub struct MockUpstream {
    pub base_url: String,
    pub port: u16,
    pub ca: Arc<TestCa>,
    state: Arc<State>,
    handle: actix_web::dev::ServerHandle,
}

impl MockUpstream {
    /// Starts an upstream with a certificate from a new test CA.
    pub async fn start() -> Self {
        Self::start_with_ca(Arc::new(TestCa::new())).await
    }

    pub async fn start_with_ca(ca: Arc<TestCa>) -> Self {
        Self::start_inner(ca, true, 0).await
    }

    /// Starts an HTTPS upstream on `port` (one stopped there comes back).
    pub async fn start_on(ca: Arc<TestCa>, port: u16) -> Self {
        Self::start_inner(ca, true, port).await
    }

    /// Stops listening and drops every connection at once (a server gone down).
    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }

    /// Starts the same upstream speaking plain http, as vLLM, Ollama and
    /// llama.cpp do by default (`base_url` is `http://127.0.0.1:{port}`).
    pub async fn start_plain_http() -> Self {
        Self::start_inner(Arc::new(TestCa::new()), false, 0).await
    }

    async fn start_inner(ca: Arc<TestCa>, tls: bool, port: u16) -> Self {
        let state = Arc::new(State::default());
        *state.models.lock().unwrap() = vec!["model-a".into(), "model-b".into()];
        let st = state.clone();
        let connections = state.connections.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::from(st.clone()))
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .default_service(web::to(handle))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        // Kept in the connection's extensions, dropped when the connection closes.
        .on_connect(move |_, ext| {
            ext.insert(Arc::new(Live::new(&connections)));
        });
        let listener = nodelay_listener(port);
        let server = if tls {
            server.listen_rustls_0_23(listener, ca.server_config())
        } else {
            server.listen(listener)
        }
        .expect("bind mock upstream");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        let scheme = if tls { "https" } else { "http" };
        Self {
            base_url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            ca,
            state,
            handle,
        }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.state.seen.lock().unwrap().clone()
    }

    /// How many streams were cut by their client.
    pub fn disconnects(&self) -> usize {
        self.state.disconnects.load(Ordering::SeqCst)
    }

    /// TLS connections open right now (the gateway's pooled ones included).
    pub fn open_connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Streamed response bodies still being sent. actix only notices a
    /// vanished client when it writes, so a `hang` body stays counted until
    /// the mock stops: use [`Self::client_connections`] to see the client's side.
    pub fn open_bodies(&self) -> usize {
        self.state.bodies.load(Ordering::SeqCst)
    }

    /// Established TCP connections towards this upstream as its clients see
    /// them (from `/proc/net/tcp*`): a client that closed its side no longer
    /// counts, even while the mock has not noticed yet.
    pub fn client_connections(&self) -> usize {
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .map(|t| {
                t.lines()
                    .skip(1)
                    .filter(|l| {
                        let cols: Vec<&str> = l.split_whitespace().collect();
                        let remote_port = cols
                            .get(2)
                            .and_then(|a| a.rsplit(':').next())
                            .and_then(|p| u16::from_str_radix(p, 16).ok());
                        // 01: ESTABLISHED.
                        remote_port == Some(self.port) && cols.get(3) == Some(&"01")
                    })
                    .count()
            })
            .sum()
    }

    /// Sets the ids `GET /v1/models` lists.
    pub fn set_models(&self, ids: &[&str]) {
        *self.state.models.lock().unwrap() = ids.iter().map(|s| s.to_string()).collect();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        let h = self.handle.clone();
        tokio::spawn(async move { h.stop(false).await });
    }
}

fn usage_for(body: &Value) -> Value {
    let prompt = body["messages"].to_string().len() as u64 / 4 + 1;
    json!({"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5})
}

struct DisconnectGuard {
    state: Arc<State>,
    finished: bool,
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.disconnects.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn handle(req: HttpRequest, body: Bytes, state: web::Data<State>) -> HttpResponse {
    state.seen.lock().unwrap().push(SeenRequest {
        method: req.method().to_string(),
        path: req.path().to_owned(),
        query: req.query_string().to_owned(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    });
    let path = req.path();
    if let Some((prefix, id)) = path.split_once("/v1/models/") {
        return retrieve_model(prefix, id, &state);
    }
    if let Some(res) = response_follow_up(&req, &state) {
        return res;
    }
    if path.ends_with("/v1/models") {
        let segment = |s: &str| path.split('/').any(|p| p == s);
        if segment("fail") {
            return HttpResponse::InternalServerError()
                .json(json!({"error": {"message": "mock: models failed"}}));
        }
        if segment("garbage") {
            return HttpResponse::Ok()
                .content_type("application/json")
                .body("<html>not a model list</html>");
        }
        if segment("huge") {
            let data: Vec<Value> = (0..80_000)
                .map(|i| json!({"id": format!("model-{i:0>40}"), "object": "model"}))
                .collect();
            return HttpResponse::Ok().json(json!({"object": "list", "data": data}));
        }
        if segment("slow") {
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let data: Vec<Value> = state
            .models
            .lock()
            .unwrap()
            .iter()
            .map(|id| json!({"id": id, "object": "model", "owned_by": "mock"}))
            .collect();
        return HttpResponse::Ok().json(json!({"object": "list", "data": data}));
    }
    if path.ends_with("/v1/audio/transcriptions") || path.ends_with("/v1/audio/translations") {
        return transcription(&req, &body);
    }
    if path.ends_with("/v1/audio/speech") {
        return speech(&body);
    }
    if let Some(res) = other_endpoint(path, &body, &state) {
        return res;
    }
    if !path.ends_with("/v1/chat/completions") {
        return HttpResponse::NotFound().json(json!({"error": {"message": "no such route"}}));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return HttpResponse::BadRequest().json(json!({"error": {"message": "mock: bad json"}}));
    };
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if let Some(code) = model
        .strip_prefix("status-")
        .and_then(|c| c.parse::<u16>().ok())
    {
        let status = actix_web::http::StatusCode::from_u16(code)
            .unwrap_or(actix_web::http::StatusCode::IM_A_TEAPOT);
        return HttpResponse::build(status)
            .json(json!({"error": {"message": format!("upstream says {code}"), "type": "upstream_error", "code": code}}));
    }
    if model == "echo-token" {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
        let escaped = token.replace('/', "\\/");
        let body = format!(
            "{{\"error\":{{\"message\":\"Incorrect API key provided: {token}\",\"param\":\"{escaped}\",\"code\":\"invalid_api_key\"}}}}"
        );
        return HttpResponse::Unauthorized()
            .content_type("application/json")
            .body(body);
    }
    if model == "redirect" {
        return HttpResponse::TemporaryRedirect()
            .insert_header(("location", "https://127.0.0.1:1/elsewhere"))
            .finish();
    }
    let arg = |prefix: &str| {
        model
            .strip_prefix(prefix)
            .and_then(|c| c.parse::<u64>().ok())
    };
    if let Some(ms) = arg("sleep-").or_else(|| arg("slowhead-")) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let usage = usage_for(&body);
    let streamed = body["stream"] == json!(true) || model == "sse-always";
    if let Some(res) = fault(&model, streamed, &usage, &state) {
        return res;
    }
    if streamed {
        if let Some(res) = scripted_stream(&model, &body, &usage) {
            return res;
        }
    }
    if streamed {
        let (delay, count) = match model
            .strip_prefix("slowstream-")
            .and_then(|c| c.parse::<u64>().ok())
        {
            Some(ms) => (Duration::from_millis(ms), 10_000usize),
            None => (Duration::ZERO, 3),
        };
        let mut guard = DisconnectGuard {
            state: state.into_inner(),
            finished: false,
        };
        let stream = async_stream(model, usage, delay, count, move |done| {
            // Capture the whole guard (not just the field) so it lives as long as the stream.
            let g = &mut guard;
            g.finished = done;
        });
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(("cache-control", "no-cache"))
            .streaming(stream);
    }
    HttpResponse::Ok().json(completion(&model, &usage))
}

/// Streams that honour `stream_options.include_usage` as real servers do, by model name:
/// `oai` (OpenAI: `"usage":null` on every chunk, then a usage-only chunk),
/// `llamacpp` (usage on the last content chunk), `strict` (as `oai`, but a
/// 400 naming `stream_options` when the field is sent, as some servers answer).
fn scripted_stream(model: &str, body: &Value, usage: &Value) -> Option<HttpResponse> {
    use futures_util::stream::{self, StreamExt};
    if !matches!(model, "oai" | "llamacpp" | "strict") {
        return None;
    }
    if model == "strict" && body.get("stream_options").is_some() {
        return Some(HttpResponse::BadRequest().json(json!({"error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error", "param": "stream_options", "code": null}})));
    }
    let include = body["stream_options"]["include_usage"] == json!(true);
    let chunk = |choices: Value, usage: Option<&Value>| {
        let mut c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
            "created": 1_700_000_000, "model": model, "choices": choices});
        if let Some(u) = usage {
            c["usage"] = u.clone();
        }
        c
    };
    let null = include
        .then_some(&Value::Null)
        .filter(|_| model != "llamacpp");
    let mut events: Vec<Value> = (0..3)
        .map(|i| {
            chunk(
                json!([{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]),
                null,
            )
        })
        .collect();
    let last = json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]);
    match (include, model) {
        (true, "llamacpp") => events.push(chunk(last, Some(usage))),
        (true, _) => {
            events.push(chunk(last, null));
            events.push(chunk(json!([]), Some(usage)));
        }
        (false, _) => events.push(chunk(last, None)),
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    for e in events {
        let text = format!("data: {e}\n\n");
        // One event split across two chunks, as TCP may deliver it.
        let (a, b) = text.split_at(text.len() / 2);
        chunks.push(Bytes::from(a.to_owned()));
        chunks.push(Bytes::from(b.to_owned()));
    }
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Some(
        HttpResponse::Ok()
            .content_type("text/event-stream")
            .streaming(
                stream::iter(chunks.into_iter().map(Ok::<_, actix_web::Error>)).boxed_local(),
            ),
    )
}

/// Answers of the JSON endpoints beside chat, each with the usage shape its API has.
fn other_endpoint(path: &str, body: &[u8], state: &State) -> Option<HttpResponse> {
    let endpoint = path.rsplit_once("/v1/")?.1;
    let body: Value = serde_json::from_slice(body).unwrap_or_default();
    let model = body["model"].clone();
    let answer = match endpoint {
        "completions" => json!({"id": "cmpl-mock", "object": "text_completion", "model": model,
            "choices": [{"index": 0, "text": "echo", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}}),
        "embeddings" => json!({"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": embedding_vector(&body)}],
            "usage": {"prompt_tokens": 6, "total_tokens": 6}}),
        "moderations" => json!({"id": "modr-mock", "model": model,
            "results": [{"flagged": false, "categories": {}, "category_scores": {}}]}),
        "rerank" => json!({"id": "rerank-mock", "model": model,
            "results": [{"index": 0, "relevance_score": 0.9}], "usage": {"total_tokens": 9}}),
        "images/generations" => json!({"created": 1_700_000_000,
            "data": [{"b64_json": "aGVsbG8="}],
            "usage": {"input_tokens": 7, "output_tokens": 100, "total_tokens": 107}}),
        "responses" => return Some(create_response(&body, state)),
        _ => return None,
    };
    Some(HttpResponse::Ok().json(answer))
}

/// The fields of a `multipart/form-data` body: (name, filename, content).
pub fn multipart_fields(content_type: &str, body: &[u8]) -> Vec<(String, Option<String>, Vec<u8>)> {
    let Some(boundary) = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .next()
    else {
        return Vec::new();
    };
    let delim = format!("--{boundary}");
    let mut fields = Vec::new();
    let mut rest = body;
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let Some(first) = find(rest, delim.as_bytes()) else {
        return fields;
    };
    rest = &rest[first + delim.len()..];
    let next = format!("\r\n{delim}");
    while rest.starts_with(b"\r\n") {
        let part = &rest[2..];
        let Some(head_end) = find(part, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&part[..head_end]).into_owned();
        let content = &part[head_end + 4..];
        let Some(end) = find(content, next.as_bytes()) else {
            break;
        };
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .unwrap_or_default();
        let param = |key: &str| {
            disposition.split(';').find_map(|p| {
                p.trim()
                    .strip_prefix(key)
                    .and_then(|v| v.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_owned())
            })
        };
        fields.push((
            param("name").unwrap_or_default(),
            param("filename"),
            content[..end].to_vec(),
        ));
        rest = &content[end + next.len()..];
    }
    fields
}

fn transcription(req: &HttpRequest, body: &[u8]) -> HttpResponse {
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let fields = multipart_fields(ct, body);
    let text_of = |name: &str| {
        fields
            .iter()
            .find(|f| f.0 == name)
            .map(|f| String::from_utf8_lossy(&f.2).into_owned())
    };
    let Some(file) = fields.iter().find(|f| f.0 == "file") else {
        return HttpResponse::BadRequest()
            .json(json!({"error": {"message": "mock: no file field", "param": "file"}}));
    };
    let text = format!(
        "heard {} bytes of {} as {}",
        file.2.len(),
        file.1.as_deref().unwrap_or_default(),
        text_of("model").unwrap_or_default()
    );
    if text_of("response_format").as_deref() == Some("text") {
        return HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(format!("{text}\n"));
    }
    HttpResponse::Ok().json(json!({"text": text,
        "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 5, "total_tokens": 19}}))
}

/// Chunks of a speech answer, each [`SPEECH_GAP`] after the one before.
pub const SPEECH_CHUNKS: usize = 8;
/// Time between two chunks of a speech answer.
pub const SPEECH_GAP: Duration = Duration::from_millis(40);

/// The 64 KiB the mock's `/v1/audio/speech` answers for `input` (a deterministic sequence).
pub fn speech_audio(input: &str) -> Vec<u8> {
    // FNV-1a of the input seeds an xorshift sequence.
    let mut x = input.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn speech(body: &[u8]) -> HttpResponse {
    use futures_util::stream::{self, StreamExt};
    let body: Value = serde_json::from_slice(body).unwrap_or_default();
    let Some(input) = body["input"].as_str() else {
        return HttpResponse::BadRequest()
            .json(json!({"error": {"message": "mock: no input", "param": "input"}}));
    };
    let audio = Bytes::from(speech_audio(input));
    let size = audio.len() / SPEECH_CHUNKS;
    let chunks = stream::iter(0..SPEECH_CHUNKS).then(move |i| {
        let piece = audio.slice(i * size..(i + 1) * size);
        async move {
            if i > 0 {
                tokio::time::sleep(SPEECH_GAP).await;
            }
            Ok::<_, actix_web::Error>(piece)
        }
    });
    HttpResponse::Ok()
        .content_type("audio/mpeg")
        .streaming(chunks.boxed_local())
}

/// `GET /v1/models/{id}`: the model when listed, else 404; a base URL with a
/// `vllm` segment has no such route (404 always), as vLLM does not.
fn retrieve_model(prefix: &str, id: &str, state: &State) -> HttpResponse {
    let known = state.models.lock().unwrap().iter().any(|m| m == id);
    if prefix.split('/').any(|s| s == "vllm") || !known {
        return HttpResponse::NotFound().json(json!({"error": {
            "message": format!("The model '{id}' does not exist"),
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}));
    }
    HttpResponse::Ok()
        .json(json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}))
}

/// `POST /v1/responses`: a new `resp_<uuid>` per call, stored for the
/// follow-ups; JSON, or with `stream` the events `response.created`, a
/// delta and `response.completed`.
fn create_response(body: &Value, state: &State) -> HttpResponse {
    let model = body["model"].clone();
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let usage = json!({"input_tokens": 8, "output_tokens": 3, "total_tokens": 11});
    let input: Vec<Value> = match &body["input"] {
        Value::Array(items) => items.clone(),
        Value::Null => Vec::new(),
        text => vec![json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]})],
    };
    let input = input
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if item.get("id").is_none() && item.is_object() {
                item["id"] = json!(format!("msg_{i}"));
            }
            item
        })
        .collect();
    let answer = json!({"id": id, "object": "response", "status": "completed", "model": model,
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
        "usage": usage});
    state
        .responses
        .lock()
        .unwrap()
        .insert(id.clone(), (answer.clone(), input));
    if body["stream"] != json!(true) {
        return HttpResponse::Ok().json(answer);
    }
    let events = [
        json!({"type": "response.created", "response": {"id": id, "model": model, "status": "in_progress", "usage": null}}),
        json!({"type": "response.output_text.delta", "delta": "hi"}),
        json!({"type": "response.completed", "response": answer}),
    ];
    let text: String = events
        .iter()
        .map(|e| {
            format!(
                "event: {}\ndata: {e}\n\n",
                e["type"].as_str().unwrap_or_default()
            )
        })
        .collect();
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .body(text)
}

/// `GET|DELETE /v1/responses/{id}`, `POST …/cancel`, `GET …/input_items`
/// for stored responses (404 for others); `None` for other paths.
fn response_follow_up(req: &HttpRequest, state: &State) -> Option<HttpResponse> {
    let rest = req.path().rsplit_once("/v1/responses/")?.1;
    let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
    let method = req.method().as_str();
    let mut stored = state.responses.lock().unwrap();
    let Some((response, input)) = stored.get_mut(id) else {
        return Some(HttpResponse::NotFound().json(json!({"error": {
            "message": format!("Response with id '{id}' not found."),
            "type": "invalid_request_error", "param": null, "code": null}})));
    };
    Some(match (method, action) {
        ("GET", "") => HttpResponse::Ok().json(response.clone()),
        ("DELETE", "") => {
            stored.remove(id);
            HttpResponse::Ok().json(json!({"id": id, "object": "response", "deleted": true}))
        }
        ("POST", "cancel") => {
            response["status"] = json!("cancelled");
            HttpResponse::Ok().json(response.clone())
        }
        ("GET", "input_items") => HttpResponse::Ok().json(json!({"object": "list",
            "data": input.clone(),
            "first_id": input.first().and_then(|i| i.get("id")).cloned(),
            "last_id": input.last().and_then(|i| i.get("id")).cloned(),
            "has_more": false})),
        _ => HttpResponse::MethodNotAllowed()
            .json(json!({"error": {"message": "mock: method not allowed"}})),
    })
}

/// The mock's one embedding, `[0.5, -0.25]`, encoded as the request asks:
/// floats, or with `"encoding_format": "base64"` the little-endian `f32`
/// bytes in base64, as OpenAI answers (and as the official SDKs ask by default).
fn embedding_vector(body: &Value) -> Value {
    use base64::Engine;
    let floats = [0.5f32, -0.25];
    if body["encoding_format"] == json!("base64") {
        let bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
        return json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    json!(floats)
}

fn completion(model: &str, usage: &Value) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("echo from {model}")}, "finish_reason": "stop"}],
        "usage": usage,
    })
}

type Chunks = futures_util::stream::LocalBoxStream<'static, Result<Bytes, actix_web::Error>>;

/// Answers for the fault-injecting model names, `None` for the others.
fn fault(model: &str, streamed: bool, usage: &Value, state: &Arc<State>) -> Option<HttpResponse> {
    use futures_util::stream::{self, StreamExt};
    let arg = |prefix: &str| {
        model
            .strip_prefix(prefix)
            .and_then(|c| c.parse::<u64>().ok())
    };
    let full = Bytes::from(serde_json::to_vec(&completion(model, usage)).unwrap());
    let sse = |i: u64| {
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]})
        ))
    };
    let (content_type, body): (&str, Chunks) = if let Some(ms) = arg("slowbody-") {
        let (a, b) = (full.slice(..full.len() / 2), full.slice(full.len() / 2..));
        let rest = async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(b)
        };
        (
            "application/json",
            stream::once(async { Ok(a) })
                .chain(stream::once(rest))
                .boxed_local(),
        )
    } else if let Some(n) = arg("reset-after-") {
        let chunks: Vec<Bytes> = if streamed {
            (0..n).map(sse).collect()
        } else {
            (0..(n as usize).min(full.len()))
                .map(|i| full.slice(i..i + 1))
                .collect()
        };
        let broken = stream::once(async {
            // Lets the chunks reach the wire before the connection breaks.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(actix_web::error::ErrorInternalServerError(
                "mock: connection reset",
            ))
        });
        let ct = if streamed {
            "text/event-stream"
        } else {
            "application/json"
        };
        (
            ct,
            stream::iter(chunks.into_iter().map(Ok))
                .chain(broken)
                .boxed_local(),
        )
    } else if model == "garbage" {
        return Some(
            HttpResponse::Ok()
                .content_type("application/json")
                .body("<html><body>502 Bad Gateway (not JSON)</body></html>"),
        );
    } else if let Some(mb) = arg("huge-") {
        let piece = Bytes::from(vec![b'a'; 64 * 1024]);
        let pieces = (mb as usize * 1024 * 1024).div_ceil(piece.len());
        let pad = stream::iter((0..pieces).map(move |_| Ok(piece.clone())));
        if streamed {
            let tail = format!(
                "\n\ndata: {}\n\ndata: [DONE]\n\n",
                json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "choices": [], "usage": usage})
            );
            (
                "text/event-stream",
                stream::once(async { Ok(Bytes::from_static(b"data: ")) })
                    .chain(pad)
                    .chain(stream::once(async move { Ok(Bytes::from(tail)) }))
                    .boxed_local(),
            )
        } else {
            (
                "application/json",
                stream::once(async { Ok(Bytes::from_static(b"{\"pad\":\"")) })
                    .chain(pad)
                    .chain(stream::once(async { Ok(Bytes::from_static(b"\"}")) }))
                    .boxed_local(),
            )
        }
    } else if model == "hang" {
        let first: Vec<Bytes> = if streamed { vec![sse(0)] } else { vec![] };
        let ct = if streamed {
            "text/event-stream"
        } else {
            "application/json"
        };
        (
            ct,
            stream::iter(first.into_iter().map(Ok))
                .chain(stream::pending())
                .boxed_local(),
        )
    } else {
        return None;
    };
    let live = Live::new(&state.bodies);
    let body = body.map(move |c| {
        let _live = &live;
        c
    });
    Some(
        HttpResponse::Ok()
            .content_type(content_type)
            .streaming(body),
    )
}

fn async_stream(
    model: String,
    usage: Value,
    delay: Duration,
    count: usize,
    mut on_end: impl FnMut(bool) + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>> {
    futures_util::stream::unfold(0usize, move |i| {
        let model = model.clone();
        let usage = usage.clone();
        let last = i == count + 1;
        if i > count + 1 {
            on_end(true);
            return futures_util::future::Either::Left(std::future::ready(None));
        }
        futures_util::future::Either::Right(async move {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let chunk = if last {
                format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage})
                )
            } else {
                format!(
                    "data: {}\n\n",
                    json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                        "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]})
                )
            };
            Some((Ok(Bytes::from(chunk)), i + 1))
        })
    })
}

/// A listener on 127.0.0.1:`port` whose accepted sockets have
/// `TCP_NODELAY` (Linux copies it from the listener), TLS ones included: a
/// response written in several parts (an HTTP/2 stream's last DATA frame
/// and its END_STREAM) must not wait for the client's delayed ACK, as it
/// does not from a real server.
fn nodelay_listener(port: u16) -> std::net::TcpListener {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind mock upstream");
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_NODELAY on the mock upstream's listener");
    listener
}
