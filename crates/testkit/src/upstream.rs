//! A real OpenAI-compatible HTTPS upstream on 127.0.0.1 for tests.
//!
//! Behaviour is chosen by the model name the upstream receives:
//! - anything else: a chat completion echoing the model, with `usage`;
//!   with `"stream": true`, SSE chunks, a usage chunk and `[DONE]`;
//! - `status-NNN`: answers status NNN with an OpenAI-shaped error body;
//! - `sleep-MS`: waits MS milliseconds before answering;
//! - `slowstream-MS`: streams a chunk every MS milliseconds, 10,000 times;
//! - `redirect`: answers 307 to another URL.
//!
//! Any path ending in `/v1/chat/completions` or `/v1/models` is served, so
//! base URLs with a path prefix work.

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
        let state = Arc::new(State::default());
        *state.models.lock().unwrap() = vec!["model-a".into(), "model-b".into()];
        let st = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::from(st.clone()))
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .default_service(web::to(handle))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind_rustls_0_23(("127.0.0.1", 0), ca.server_config())
        .expect("bind mock upstream");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            base_url: format!("https://127.0.0.1:{port}"),
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
    if path.ends_with("/v1/models") {
        let data: Vec<Value> = state
            .models
            .lock()
            .unwrap()
            .iter()
            .map(|id| json!({"id": id, "object": "model", "owned_by": "mock"}))
            .collect();
        return HttpResponse::Ok().json(json!({"object": "list", "data": data}));
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
    if model == "redirect" {
        return HttpResponse::TemporaryRedirect()
            .insert_header(("location", "https://127.0.0.1:1/elsewhere"))
            .finish();
    }
    if let Some(ms) = model
        .strip_prefix("sleep-")
        .and_then(|c| c.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let usage = usage_for(&body);
    if body["stream"] == json!(true) {
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
    HttpResponse::Ok().json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("echo from {model}")}, "finish_reason": "stop"}],
        "usage": usage,
    }))
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
