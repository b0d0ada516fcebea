//! The official OpenAI SDKs, unchanged, against the real `llmgw` binary and a
//! real HTTPS upstream (testkit's `MockUpstream`): Python's `openai` (the
//! interpreter named by `LLMGW_TEST_PYTHON`) and Node's `openai` (the package
//! in tests/node). For every call: what the client got, what the upstream
//! received (path, the model after the first `/`, the provider's token, the
//! body otherwise unchanged) and its usage row in `request_logs`.
//!
//! Each call sends its own `x-request-id`, which the gateway forwards
//! upstream and records as the row's `request_id`: the call, its upstream
//! request and its row are matched by it. The bytes each SDK sent are kept by
//! the SDK's own documented hooks (an httpx event hook, a `fetch` option)
//! in a scratch directory, so the upstream's body is compared with what the
//! client really sent.
//!
//! Spend controls as the SDKs see them: `RateLimitError` with the
//! `x-ratelimit-*` headers, a concurrency refusal retried after its
//! `Retry-After`, and `insufficient_quota` never retried.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Row;
use testkit::{MockUpstream, SeenRequest, TestDb};

use common::{provision, Running, Tenant};

const PROVIDER_TOKEN: &str = "sk-upstream-SECRET-token-42";

/// `(prompt_tokens, completion_tokens, total_tokens)` of a usage row.
type Tokens = (Option<i64>, Option<i64>, Option<i64>);

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("llmgw-sdk-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What an SDK sent for one request id, as its hook recorded it.
struct Sent {
    method: String,
    path: String,
    content_type: String,
    body: Vec<u8>,
}

/// The columns of a usage row these tests look at.
#[derive(Debug)]
struct UsageRow {
    endpoint: Option<String>,
    status: i16,
    streamed: bool,
    tokens: Tokens,
    requested_model: Option<String>,
    upstream_model: Option<String>,
}

/// `llmgw serve` (JSON logs at debug level) on a fresh database and a mock
/// upstream, with a tenant whose provider `mycompany` is that upstream.
struct Stack {
    t: TestDb,
    upstream: MockUpstream,
    running: Running,
    tenant: Tenant,
    scratch: Scratch,
}

impl Stack {
    async fn start() -> Self {
        let t = TestDb::new().await;
        let upstream = MockUpstream::start().await;
        let mut cmd = common::llmgw_against(&t, &upstream);
        cmd.env("LLMGW_LOG_FORMAT", "json").env(
            "RUST_LOG",
            "debug,sqlx=info,hyper=info,h2=info,rustls=info,reqwest=info",
        );
        let running = tokio::task::spawn_blocking(move || Running::start(cmd))
            .await
            .unwrap();
        let tenant = provision(&running.api, &upstream.base_url, PROVIDER_TOKEN).await;
        Self {
            t,
            upstream,
            running,
            tenant,
            scratch: Scratch::new(),
        }
    }

    fn dir(&self) -> &Path {
        &self.scratch.0
    }

    /// Runs an SDK script (blocking, off the runtime) and parses the JSON
    /// line it prints last.
    async fn run(&self, mut cmd: Command) -> Value {
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .expect("start the SDK script");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "SDK script failed ({}):\n{stderr}\n{stdout}\ngateway logs:\n{}",
            out.status,
            self.running.logs()
        );
        let last = stdout.trim().lines().last().unwrap_or_default();
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("SDK script printed no JSON ({e}):\n{stdout}\n{stderr}"))
    }

    /// What the SDK sent for request `rid`.
    fn sent(&self, rid: &str) -> Sent {
        let head: Value = serde_json::from_slice(
            &std::fs::read(self.dir().join(format!("{rid}.head")))
                .unwrap_or_else(|e| panic!("{rid}: the SDK's hook recorded nothing: {e}")),
        )
        .unwrap();
        Sent {
            method: head["method"].as_str().unwrap().to_owned(),
            path: head["path"].as_str().unwrap().to_owned(),
            content_type: head["content_type"].as_str().unwrap().to_owned(),
            body: std::fs::read(self.dir().join(format!("{rid}.body"))).unwrap(),
        }
    }

    /// The one upstream request that carries `x-request-id: rid`.
    fn upstream_request(&self, rid: &str) -> SeenRequest {
        let hits: Vec<SeenRequest> = self
            .upstream
            .seen()
            .into_iter()
            .filter(|s| s.header("x-request-id") == Some(rid))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{rid}: upstream requests with this id: {hits:?}"
        );
        hits.into_iter().next().unwrap()
    }

    /// The upstream's request for `rid`: on `path`, with the provider's
    /// token and none of the client's credentials.
    fn forwarded(&self, rid: &str, path: &str) -> (Sent, SeenRequest) {
        let sent = self.sent(rid);
        let seen = self.upstream_request(rid);
        assert_eq!(
            sent.path, path,
            "{rid}: the client and the upstream use the same path"
        );
        self.assert_upstream_auth(&seen, rid);
        assert_eq!(seen.method, sent.method, "{rid}");
        assert_eq!(seen.path, path, "{rid}");
        (sent, seen)
    }

    fn assert_upstream_auth(&self, seen: &SeenRequest, what: &str) {
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {PROVIDER_TOKEN}").as_str()),
            "{what}"
        );
        assert!(
            seen.headers
                .iter()
                .all(|(_, v)| !v.contains(&self.tenant.api_key)),
            "{what}: the client's API key went upstream"
        );
    }

    /// A JSON request `rid` reached `path` with its model rewritten to the
    /// part after the first `/` and every other field as the SDK sent it
    /// (`stream_options` is checked by the callers); returns the upstream's body.
    fn json_forwarded(&self, rid: &str, path: &str) -> Value {
        let (sent, seen) = self.forwarded(rid, path);
        assert!(sent.content_type.starts_with("application/json"), "{rid}");
        let mut want: Value = serde_json::from_slice(&sent.body).unwrap();
        let mut got = seen.json();
        let (_, model) = want["model"].as_str().unwrap().split_once('/').unwrap();
        assert_eq!(got["model"], model, "{rid}: the model after the first `/`");
        for v in [&mut want, &mut got] {
            let o = v
                .as_object_mut()
                .unwrap_or_else(|| panic!("{rid}: not an object"));
            o.remove("model");
            o.remove("stream_options");
        }
        assert_eq!(got, want, "{rid}: the body is unchanged but for the model");
        seen.json()
    }

    /// The usage rows of `ids`, polled until each has appeared (rows are
    /// written in batches); each id has exactly one.
    async fn rows(&self, ids: &[&str]) -> HashMap<String, UsageRow> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let all = sqlx::query(
                "SELECT request_id, endpoint, status_code, streamed, prompt_tokens, \
                 completion_tokens, total_tokens, requested_model, upstream_model FROM request_logs",
            )
            .fetch_all(self.t.db.pool())
            .await
            .unwrap();
            let mut rows: HashMap<String, UsageRow> = HashMap::new();
            for r in &all {
                let id: String = r.get(0);
                if !ids.contains(&id.as_str()) {
                    continue;
                }
                let row = UsageRow {
                    endpoint: r.get(1),
                    status: r.get(2),
                    streamed: r.get(3),
                    tokens: (r.get(4), r.get(5), r.get(6)),
                    requested_model: r.get(7),
                    upstream_model: r.get(8),
                };
                assert!(
                    rows.insert(id.clone(), row).is_none(),
                    "{id}: two usage rows"
                );
            }
            if rows.len() == ids.len() {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "usage rows missing for {:?}",
                ids.iter()
                    .filter(|i| !rows.contains_key(**i))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the binary: it exits 0, logs only JSON lines, and no secret
    /// (provider token, API key, password, session) appears in them.
    async fn finish(self) {
        let Self {
            running, tenant, ..
        } = self;
        let (status, logs) = tokio::task::spawn_blocking(move || running.terminate())
            .await
            .unwrap();
        assert!(status.success(), "{logs}");
        assert!(
            logs.lines().count() > 5,
            "expected request logs, got: {logs}"
        );
        for line in logs.lines() {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "not JSON: {line}"
            );
        }
        for secret in [
            PROVIDER_TOKEN,
            tenant.api_key.as_str(),
            "correct horse battery",
            tenant.bearer.trim_start_matches("Bearer "),
        ] {
            assert!(!logs.contains(secret), "a secret appears in the logs");
        }
    }
}

/// A 200 row for `endpoint` with these tokens.
fn assert_row(rows: &HashMap<String, UsageRow>, rid: &str, endpoint: &str, tokens: Tokens) {
    let r = &rows[rid];
    assert_eq!(r.status, 200, "{rid}: {r:?}");
    assert_eq!(r.endpoint.as_deref(), Some(endpoint), "{rid}: {r:?}");
    assert_eq!(r.tokens, tokens, "{rid}: {r:?}");
}

/// The tokens of a usage object as the client parsed it (chat's
/// `prompt_tokens`/`completion_tokens` or the Responses API's
/// `input_tokens`/`output_tokens`).
fn client_tokens(usage: &Value) -> Tokens {
    let get = |a: &str, b: &str| {
        usage
            .get(a)
            .or_else(|| usage.get(b))
            .and_then(Value::as_i64)
    };
    (
        get("prompt_tokens", "input_tokens"),
        get("completion_tokens", "output_tokens"),
        usage["total_tokens"].as_i64(),
    )
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The path of the Python named by `LLMGW_TEST_PYTHON`, or `None` (after
/// `skip_unless_ci`).
fn python() -> Option<String> {
    match std::env::var("LLMGW_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            testkit::skip_unless_ci(
                "LLMGW_TEST_PYTHON is not set: it names a Python with the `openai` package \
                 (python3 -m venv target/sdk-venv && target/sdk-venv/bin/pip install openai; .ci/run does this)",
            );
            None
        }
    }
}

/// The Python scripts' common start: a client whose httpx event hook keeps
/// each request's bytes under its `x-request-id`, and `rid(name)`, the
/// per-call header `x-request-id: py-{name}`.
const PY_PRELUDE: &str = r#"
import json, os, sys, openai
gateway, key, outdir = sys.argv[1:4]

def record(request):
    rid = request.headers.get("x-request-id")
    if rid:
        with open(os.path.join(outdir, rid + ".body"), "wb") as f:
            f.write(request.read())
        with open(os.path.join(outdir, rid + ".head"), "w") as f:
            json.dump({"method": request.method, "path": request.url.raw_path.decode(),
                       "content_type": request.headers.get("content-type", "")}, f)

client = openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=30,
                       http_client=openai.DefaultHttpxClient(event_hooks={"request": [record]}))

def rid(name):
    return {"extra_headers": {"x-request-id": "py-" + name}}

def usage(u):
    return None if u is None else u.model_dump(exclude_none=True)

out = {}
"#;

impl Stack {
    async fn run_python(&self, python: &str, body: &str) -> Value {
        self.run_python_with(python, body, &[]).await
    }

    /// [`Stack::run_python`] with more arguments (`sys.argv[4:]`).
    async fn run_python_with(&self, python: &str, body: &str, args: &[&str]) -> Value {
        let mut cmd = Command::new(python);
        cmd.arg("-c")
            .arg(format!("{PY_PRELUDE}{body}\nprint(json.dumps(out))\n"))
            .arg(&self.running.gateway)
            .arg(&self.tenant.api_key)
            .arg(self.dir())
            .args(args);
        self.run(cmd).await
    }
}

/// Checks both streamed chat calls `{prefix}chat-stream` (no
/// `stream_options`) and `{prefix}chat-stream-usage` (`include_usage`) and
/// the plain `{prefix}chat`, for either SDK's output `v`.
async fn assert_chat(s: &Stack, prefix: &str, v: &Value) -> Vec<String> {
    let id = |n: &str| format!("{prefix}{n}");
    // Plain: the model is split at the first `/`.
    assert_eq!(v["chat"]["content"], "echo from meta-llama/Llama-3-8B");
    s.json_forwarded(&id("chat"), "/v1/chat/completions");
    // Without `stream_options` the client sees no usage at all…
    let quiet = &v["chat_stream"];
    assert_eq!(quiet["text"], "tok0 tok1 tok2 ", "{v}");
    assert_eq!(
        quiet["usage"],
        json!([]),
        "no usage chunk reaches the client: {v}"
    );
    assert_eq!(quiet["empty_choices"], 0, "{v}");
    assert!(!String::from_utf8_lossy(&s.sent(&id("chat-stream")).body).contains("stream_options"));
    // …but the upstream was asked for it, once.
    let up = s.json_forwarded(&id("chat-stream"), "/v1/chat/completions");
    assert_eq!(up["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        count(
            &s.upstream_request(&id("chat-stream")).body,
            b"stream_options"
        ),
        1
    );
    // With `include_usage` the client gets exactly one usage chunk.
    let loud = &v["chat_stream_usage"];
    assert_eq!(loud["text"], "tok0 tok1 tok2 ", "{v}");
    assert_eq!(loud["usage"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(loud["empty_choices"], 1, "{v}");
    let up = s.json_forwarded(&id("chat-stream-usage"), "/v1/chat/completions");
    assert_eq!(up["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        count(
            &s.upstream_request(&id("chat-stream-usage")).body,
            b"stream_options"
        ),
        1
    );

    let ids = [id("chat"), id("chat-stream"), id("chat-stream-usage")];
    let rows = s
        .rows(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let plain = client_tokens(&v["chat"]["usage"]);
    assert!(plain.0.unwrap() > 0 && plain.1 == Some(5), "{v}");
    assert_row(&rows, &ids[0], "chat/completions", plain);
    let r = &rows[&ids[0]];
    assert_eq!(
        (
            r.requested_model.as_deref(),
            r.upstream_model.as_deref(),
            r.streamed
        ),
        (
            Some("mycompany/meta-llama/Llama-3-8B"),
            Some("meta-llama/Llama-3-8B"),
            false
        )
    );
    // Both streams sent the same messages: the same usage, whether or not
    // the client saw it.
    let streamed = client_tokens(&loud["usage"][0]);
    assert!(streamed.0.unwrap() > 0 && streamed.1 == Some(5), "{v}");
    assert_row(&rows, &ids[1], "chat/completions", streamed);
    assert_row(&rows, &ids[2], "chat/completions", streamed);
    assert!(rows[&ids[1]].streamed && rows[&ids[2]].streamed);
    ids.to_vec()
}

/// Every JSON endpoint through the Python SDK, plus the model list and two
/// client errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python() {
    let Some(python) = python() else { return };
    let s = Stack::start().await;
    let script = r#"
def chunks(stream):
    got = {"text": "", "usage": [], "empty_choices": 0}
    for c in stream:
        if c.usage is not None:
            got["usage"].append(usage(c.usage))
        if not c.choices:
            got["empty_choices"] += 1
        for ch in c.choices:
            got["text"] += ch.delta.content or ""
    return got

M = [{"role": "user", "content": "count to three"}]
r = client.chat.completions.create(model="mycompany/meta-llama/Llama-3-8B",
    messages=[{"role": "user", "content": "hi"}], temperature=0.2, **rid("chat"))
out["chat"] = {"content": r.choices[0].message.content, "usage": usage(r.usage)}
out["chat_stream"] = chunks(client.chat.completions.create(
    model="mycompany/oai", messages=M, stream=True, **rid("chat-stream")))
out["chat_stream_usage"] = chunks(client.chat.completions.create(
    model="mycompany/oai", messages=M, stream=True, stream_options={"include_usage": True},
    **rid("chat-stream-usage")))
r = client.completions.create(model="mycompany/gpt-3.5-turbo-instruct", prompt="say hi",
    max_tokens=3, **rid("completions"))
out["completions"] = {"text": r.choices[0].text, "usage": usage(r.usage)}
r = client.embeddings.create(model="mycompany/text-embedding-3-small", input=["a", "b"],
    **rid("embeddings"))
out["embeddings"] = {"vector": r.data[0].embedding, "usage": usage(r.usage)}
r = client.responses.create(model="mycompany/gpt-4.1", input="hi", **rid("responses"))
out["responses"] = {"text": r.output_text, "usage": usage(r.usage)}
events = list(client.responses.create(model="mycompany/gpt-4.1", input="hi", stream=True,
    **rid("responses-stream")))
out["responses_stream"] = {"types": [e.type for e in events],
    "text": "".join(e.delta for e in events if e.type == "response.output_text.delta"),
    "usage": usage(events[-1].response.usage)}
r = client.moderations.create(model="mycompany/omni-moderation-latest", input="hello",
    **rid("moderations"))
out["moderations"] = {"flagged": r.results[0].flagged}
r = client.images.generate(model="mycompany/gpt-image-1", prompt="a cat", n=1, **rid("images"))
out["images"] = {"b64": r.data[0].b64_json, "usage": usage(r.usage)}
out["models"] = sorted(m.id for m in client.models.list(**rid("models")))
try:
    client.chat.completions.create(model="nosuch/m", messages=M)
    out["no_provider"] = None
except openai.NotFoundError as e:
    out["no_provider"] = {"type": type(e).__name__, "status": e.status_code}
try:
    openai.OpenAI(base_url=gateway + "/v1", api_key="llmgw_wrong", max_retries=0).chat.completions.create(
        model="mycompany/m", messages=M)
    out["bad_key"] = None
except openai.AuthenticationError as e:
    out["bad_key"] = e.status_code
"#;
    let v = s.run_python(&python, script).await;
    let mut ids = assert_chat(&s, "py-", &v).await;

    assert_eq!(v["completions"]["text"], "echo");
    s.json_forwarded("py-completions", "/v1/completions");
    // The SDK asks for base64 by default and decodes it.
    assert_eq!(v["embeddings"]["vector"], json!([0.5, -0.25]));
    let up = s.json_forwarded("py-embeddings", "/v1/embeddings");
    assert_eq!(up["encoding_format"], "base64");
    assert_eq!(v["responses"]["text"], "hi");
    s.json_forwarded("py-responses", "/v1/responses");
    assert_eq!(
        v["responses_stream"]["types"],
        json!([
            "response.created",
            "response.output_text.delta",
            "response.completed"
        ])
    );
    assert_eq!(v["responses_stream"]["text"], "hi");
    s.json_forwarded("py-responses-stream", "/v1/responses");
    assert_eq!(v["moderations"]["flagged"], false);
    s.json_forwarded("py-moderations", "/v1/moderations");
    assert_eq!(v["images"]["b64"], "aGVsbG8=");
    s.json_forwarded("py-images", "/v1/images/generations");
    assert_eq!(
        v["models"],
        json!(["mycompany/model-a", "mycompany/model-b"])
    );
    let lists: Vec<SeenRequest> = s
        .upstream
        .seen()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/v1/models")
        .collect();
    assert!(!lists.is_empty());
    for l in &lists {
        s.assert_upstream_auth(l, "GET /v1/models");
    }
    assert_eq!(
        v["no_provider"],
        json!({"type": "NotFoundError", "status": 404})
    );
    assert_eq!(v["bad_key"], 401);

    let more = [
        (
            "py-completions",
            "completions",
            (Some(4), Some(1), Some(5)),
            &v["completions"],
        ),
        (
            "py-embeddings",
            "embeddings",
            (Some(6), None, Some(6)),
            &v["embeddings"],
        ),
        (
            "py-responses",
            "responses",
            (Some(8), Some(3), Some(11)),
            &v["responses"],
        ),
        (
            "py-responses-stream",
            "responses",
            (Some(8), Some(3), Some(11)),
            &v["responses_stream"],
        ),
        (
            "py-moderations",
            "moderations",
            (None, None, None),
            &Value::Null,
        ),
        (
            "py-images",
            "images/generations",
            (Some(7), Some(100), Some(107)),
            &v["images"],
        ),
    ];
    ids.extend(more.iter().map(|m| m.0.to_owned()));
    let rows = s
        .rows(&ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    for (rid, endpoint, tokens, got) in more {
        assert_row(&rows, rid, endpoint, tokens);
        if !got.is_null() {
            assert_eq!(
                client_tokens(&got["usage"]),
                tokens,
                "{rid}: the client's usage"
            );
        }
    }
    assert!(rows["py-responses-stream"].streamed);
    s.finish().await;
}

/// The parts of a `multipart/form-data` body: (name, filename, content), in order.
fn multipart_parts(content_type: &str, body: &[u8]) -> Vec<(String, Option<String>, Vec<u8>)> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .unwrap_or_else(|| panic!("no boundary in {content_type}"));
    // Every delimiter but the first follows a CRLF; the preamble is dropped.
    let delim = format!("\r\n--{boundary}");
    let body = [b"\r\n".as_slice(), body].concat();
    let mut chunks = split(&body, delim.as_bytes()).into_iter().skip(1);
    let mut parts = Vec::new();
    loop {
        let chunk = chunks.next().expect("a closing delimiter");
        if chunk.starts_with(b"--") {
            return parts;
        }
        let part = chunk
            .strip_prefix(b"\r\n".as_slice())
            .expect("CRLF after a delimiter");
        let at = find(part, b"\r\n\r\n").expect("part headers");
        let headers = String::from_utf8_lossy(&part[..at]).into_owned();
        let disposition = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .expect("content-disposition");
        let param = |key: &str| {
            disposition
                .split(';')
                .find_map(|p| p.trim().strip_prefix(&format!("{key}=")))
                .map(|v| v.trim_matches('"').to_owned())
        };
        parts.push((
            param("name").expect("part name"),
            param("filename"),
            part[at + 4..].to_vec(),
        ));
    }
}

/// `hay` cut at every occurrence of `needle`.
fn split<'a>(mut hay: &'a [u8], needle: &[u8]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    while let Some(at) = find(hay, needle) {
        pieces.push(&hay[..at]);
        hay = &hay[at + needle.len()..];
    }
    pieces.push(hay);
    pieces
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Audio (a transcription of a WAV made here, speech saved to a file both
/// ways) and `models.retrieve`, through the Python SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python_audio_and_models() {
    let Some(python) = python() else { return };
    let s = Stack::start().await;
    s.upstream.set_models(&["some-model", "model-a"]);
    let script = r#"
import math, struct, wave
wav = os.path.join(outdir, "hello.wav")
with wave.open(wav, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(8000)
    w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 8000)))
                           for i in range(2000)))
with open(wav, "rb") as f:
    r = client.audio.transcriptions.create(model="mycompany/whisper-1", file=f, **rid("transcription"))
out["transcription"] = {"text": r.text, "usage": usage(getattr(r, "usage", None))}
speech = dict(model="mycompany/tts-1", voice="alloy", input="The quick brown fox jumps over the lazy dog.")
client.audio.speech.create(**speech, **rid("speech")).write_to_file(os.path.join(outdir, "speech.mp3"))
with client.audio.speech.with_streaming_response.create(**speech, **rid("speech-streamed")) as r:
    out["speech_content_type"] = r.headers.get("content-type")
    r.stream_to_file(os.path.join(outdir, "speech-streamed.mp3"))
m = client.models.retrieve("mycompany/some-model", **rid("model"))
out["model"] = {"id": m.id, "object": m.object, "owned_by": m.owned_by}
"#;
    let v = s.run_python(&python, script).await;

    // Transcription: the multipart body reaches the upstream with only the
    // model field rewritten.
    let wav = std::fs::read(s.dir().join("hello.wav")).unwrap();
    assert_eq!(
        v["transcription"]["text"],
        format!("heard {} bytes of hello.wav as whisper-1", wav.len())
    );
    let (sent, seen) = s.forwarded("py-transcription", "/v1/audio/transcriptions");
    let mut want = multipart_parts(&sent.content_type, &sent.body);
    let got = multipart_parts(seen.header("content-type").unwrap_or_default(), &seen.body);
    let model = want
        .iter_mut()
        .find(|p| p.0 == "model")
        .expect("a model part");
    assert_eq!(model.2, b"mycompany/whisper-1");
    model.2 = b"whisper-1".to_vec();
    assert!(want
        .iter()
        .any(|p| p.0 == "file" && p.1.as_deref() == Some("hello.wav") && p.2 == wav));
    assert_eq!(got, want, "only the model part is rewritten");

    // Speech: both files hold exactly what the upstream answers for that body.
    assert_eq!(v["speech_content_type"], "audio/mpeg");
    let first = s.json_forwarded("py-speech", "/v1/audio/speech");
    let second = s.json_forwarded("py-speech-streamed", "/v1/audio/speech");
    assert_eq!(first, second);
    assert_eq!(first["model"], "tts-1");
    let ca = reqwest::Certificate::from_pem(s.upstream.ca.ca_pem.as_bytes()).unwrap();
    let direct = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap()
        .post(format!("{}/v1/audio/speech", s.upstream.base_url))
        .bearer_auth(PROVIDER_TOKEN)
        .json(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    let audio = direct.bytes().await.unwrap();
    assert!(audio.len() > 1024, "{} bytes", audio.len());
    for file in ["speech.mp3", "speech-streamed.mp3"] {
        let saved = std::fs::read(s.dir().join(file)).unwrap();
        assert!(
            saved == audio,
            "{file}: {} bytes, the upstream sent {}",
            saved.len(),
            audio.len()
        );
    }

    // models.retrieve: the SDK percent-encodes the `/` of the id.
    assert_eq!(s.sent("py-model").path, "/v1/models/mycompany%2Fsome-model");
    assert_eq!(
        v["model"],
        json!({"id": "mycompany/some-model", "object": "model", "owned_by": "mock"})
    );
    let retrieved: Vec<SeenRequest> = s
        .upstream
        .seen()
        .into_iter()
        .filter(|r| r.path == "/v1/models/some-model")
        .collect();
    assert_eq!(retrieved.len(), 1, "{retrieved:?}");
    assert_eq!(retrieved[0].method, "GET");
    s.assert_upstream_auth(&retrieved[0], "models.retrieve");

    let rows = s
        .rows(&["py-transcription", "py-speech", "py-speech-streamed"])
        .await;
    assert_row(
        &rows,
        "py-transcription",
        "audio/transcriptions",
        (Some(14), Some(5), Some(19)),
    );
    assert_eq!(
        client_tokens(&v["transcription"]["usage"]),
        (Some(14), Some(5), Some(19))
    );
    assert_row(&rows, "py-speech", "audio/speech", (None, None, None));
    assert_row(
        &rows,
        "py-speech-streamed",
        "audio/speech",
        (None, None, None),
    );
    // Model lookups are not usage: like `GET /v1/models`, a retrieve writes
    // no row (the rows above were flushed after it was answered).
    let retrieve_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM request_logs WHERE request_id = 'py-model'")
            .fetch_one(s.t.db.pool())
            .await
            .unwrap();
    assert_eq!(retrieve_rows, 0);
    s.finish().await;
}

/// The directory holding `node_modules/openai`: `LLMGW_TEST_NODE_SDK`, else
/// tests/node when installed there; `None` (after `skip_unless_ci`) when
/// neither, or when there is no `node`.
fn node_sdk_dir() -> Option<PathBuf> {
    let installed = |d: &Path| d.join("node_modules/openai/package.json").is_file();
    let dir = match std::env::var("LLMGW_TEST_NODE_SDK") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node"),
    };
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node || !installed(&dir) {
        testkit::skip_unless_ci(&format!(
            "node, or the npm package openai in {} (cd crates/server/tests/node && npm ci; \
             .ci/run does this; LLMGW_TEST_NODE_SDK names another directory holding it)",
            dir.display()
        ));
        return None;
    }
    Some(dir)
}

/// Chat (plain, streamed with and without `include_usage`) and embeddings
/// through the Node SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_node() {
    let Some(sdk) = node_sdk_dir() else { return };
    let s = Stack::start().await;
    let mut cmd = Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/sdk.mjs"))
        .arg(&s.running.gateway)
        .arg(&s.tenant.api_key)
        .arg(s.dir())
        .arg(&sdk);
    let v = s.run(cmd).await;
    assert_chat(&s, "node-", &v).await;
    assert_eq!(v["embeddings"]["vector"], json!([0.5, -0.25]), "{v}");
    let up = s.json_forwarded("node-embeddings", "/v1/embeddings");
    assert_eq!(up["encoding_format"], "base64");
    let rows = s.rows(&["node-embeddings"]).await;
    assert_row(
        &rows,
        "node-embeddings",
        "embeddings",
        (Some(6), None, Some(6)),
    );
    assert_eq!(
        client_tokens(&v["embeddings"]["usage"]),
        (Some(6), None, Some(6))
    );
    s.finish().await;
}

/// Three limited keys of the stack's org, as `(requests_per_minute: 1,
/// max_concurrent_requests: 1, tokens_per_day: 0)`.
async fn limited_keys(s: &Stack) -> [String; 3] {
    let key = |name: &'static str, limits: Value| async move {
        common::create_key(&s.running.api, &s.tenant, name, limits).await
    };
    [
        key("rpm", json!({"requests_per_minute": 1})).await,
        key("busy", json!({"max_concurrent_requests": 1})).await,
        key("quota", json!({"tokens_per_day": 0})).await,
    ]
}

impl Stack {
    /// The statuses and error classes of the rows of each id, once each id
    /// has at least `want` rows and a few more flushes brought no more.
    async fn row_statuses(&self, want: &[(&str, usize)]) -> HashMap<String, Vec<(i16, String)>> {
        let read = || async {
            let all: Vec<(String, i16, Option<String>)> = sqlx::query_as(
                "SELECT request_id, status_code, error_class FROM request_logs ORDER BY created_at",
            )
            .fetch_all(self.t.db.pool())
            .await
            .unwrap();
            let mut by_id: HashMap<String, Vec<(i16, String)>> = HashMap::new();
            for (id, status, class) in all {
                by_id
                    .entry(id)
                    .or_default()
                    .push((status, class.unwrap_or_default()));
            }
            by_id
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rows = read().await;
            if want
                .iter()
                .all(|(id, n)| rows.get(*id).map_or(0, Vec::len) >= *n)
            {
                break;
            }
            assert!(Instant::now() < deadline, "usage rows missing: {rows:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Rows are flushed every 200 ms: wait for any straggler.
        tokio::time::sleep(Duration::from_millis(600)).await;
        read().await
    }

    /// What either SDK's limits script reported (`v`), the rows the gateway
    /// wrote for it and what reached the upstream.
    async fn assert_limit_refusals(&self, prefix: &str, v: &Value) {
        let header = |h: &Value, name: &str| -> u64 {
            h[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {h}"))
                .parse()
                .unwrap()
        };
        // Admitted: the request headers only (no token limit is set).
        let ok = &v["rpm_ok"];
        let mut names: Vec<&String> = ok.as_object().unwrap().keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests"
            ],
            "{v}"
        );
        assert_eq!(header(ok, "x-ratelimit-limit-requests"), 1, "{v}");
        assert_eq!(header(ok, "x-ratelimit-remaining-requests"), 0, "{v}");
        // Refused: RateLimitError, with the same headers and a Retry-After
        // that is the reset in whole seconds, rounded up. The scripts read it
        // with retries off: at the SDKs' default of two, both would sleep
        // that Retry-After (here about 60 s) before each retry.
        let r = &v["rpm_refused"];
        assert_eq!(r["class"], "RateLimitError", "{v}");
        assert_eq!(r["status"], 429, "{v}");
        assert_eq!(r["type"], "requests", "{v}");
        assert_eq!(r["code"], "rate_limit_exceeded", "{v}");
        let h = &r["headers"];
        assert_eq!(header(h, "x-ratelimit-limit-requests"), 1, "{v}");
        assert_eq!(header(h, "x-ratelimit-remaining-requests"), 0, "{v}");
        let retry = header(h, "retry-after");
        assert!((1..=60).contains(&retry), "{v}");
        let reset = common::parse_reset(h["x-ratelimit-reset-requests"].as_str().unwrap());
        assert_eq!(reset.as_millis().div_ceil(1000) as u64, retry, "{v}");
        assert!(h.get("x-should-retry").is_none(), "{v}");

        // A concurrency refusal says Retry-After: 1, and both SDKs, left at
        // their default of two retries, retry it: a 429 without
        // `x-should-retry` is retryable for them, and they sleep its
        // Retry-After first, so the call is sent three times, a second apart,
        // before RateLimitError reaches the caller (the stream holding the
        // slot is still open).
        let busy = &v["busy"];
        assert_eq!(busy["class"], "RateLimitError", "{v}");
        assert_eq!(busy["status"], 429, "{v}");
        assert_eq!(busy["code"], "rate_limit_exceeded", "{v}");
        assert_eq!(busy["headers"]["retry-after"], "1", "{v}");
        let waited = busy["seconds"].as_f64().unwrap();
        assert!(
            (2.0..10.0).contains(&waited),
            "two retries a second apart: {waited} s"
        );
        // insufficient_quota says `x-should-retry: false`, which both SDKs
        // obey before looking at the status: one request, at once, even at
        // their default of two retries.
        let quota = &v["quota"];
        assert_eq!(quota["class"], "RateLimitError", "{v}");
        assert_eq!(quota["status"], 429, "{v}");
        assert_eq!(quota["type"], "insufficient_quota", "{v}");
        assert_eq!(quota["code"], "insufficient_quota", "{v}");
        assert_eq!(quota["headers"]["x-should-retry"], "false", "{v}");
        assert!(quota["headers"].get("retry-after").is_none(), "{v}");
        assert!(quota["seconds"].as_f64().unwrap() < 1.0, "{v}");

        // What the gateway counted: one row per request it received.
        let id = |n: &str| format!("{prefix}{n}");
        let rows = self
            .row_statuses(&[
                (&id("rpm-ok"), 1),
                (&id("rpm-refused"), 1),
                (&id("busy"), 3),
                (&id("quota"), 1),
            ])
            .await;
        let limited = (429, "rate_limit_exceeded".to_owned());
        assert_eq!(rows[&id("rpm-ok")], [(200, String::new())], "{rows:?}");
        assert_eq!(rows[&id("rpm-refused")], vec![limited.clone()], "{rows:?}");
        assert_eq!(rows[&id("busy")], vec![limited; 3], "{rows:?}");
        assert_eq!(
            rows[&id("quota")],
            [(429, "insufficient_quota".to_owned())],
            "{rows:?}"
        );
        // Refusals never reach the upstream.
        for n in ["rpm-refused", "busy", "quota"] {
            assert!(
                !self
                    .upstream
                    .seen()
                    .iter()
                    .any(|r| r.header("x-request-id") == Some(id(n).as_str())),
                "{n} reached the upstream"
            );
        }
    }
}

/// The Python SDK against limited keys: `RateLimitError` with the headers;
/// a retried concurrency refusal; an `insufficient_quota` sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python_sees_rate_limits_and_does_not_retry_insufficient_quota() {
    let Some(python) = python() else { return };
    let s = Stack::start().await;
    let [rpm, busy, quota] = limited_keys(&s).await;
    let script = r#"
import time
rpm_key, busy_key, quota_key = sys.argv[4:7]
M = [{"role": "user", "content": "hi"}]

def limit_headers(h):
    return {k: v for k, v in h.items()
            if k.startswith("x-ratelimit-") or k in ("retry-after", "x-should-retry")}

def refusal(e, started):
    return {"class": type(e).__name__, "status": e.status_code, "type": e.type, "code": e.code,
            "headers": limit_headers(e.response.headers), "seconds": time.monotonic() - started}

def sdk(key, **kw):
    return openai.OpenAI(base_url=gateway + "/v1", api_key=key, timeout=30, **kw)

c = sdk(rpm_key, max_retries=0)
r = c.chat.completions.with_raw_response.create(model="mycompany/m", messages=M, **rid("rpm-ok"))
out["rpm_ok"] = limit_headers(r.headers)
t = time.monotonic()
try:
    c.chat.completions.create(model="mycompany/m", messages=M, **rid("rpm-refused"))
    out["rpm_refused"] = None
except openai.RateLimitError as e:
    out["rpm_refused"] = refusal(e, t)

# The SDK's default retries (max_retries=2) from here on.
b = sdk(busy_key)
stream = b.chat.completions.create(model="mycompany/slowstream-50", messages=M, stream=True,
                                   **rid("busy-stream"))
next(iter(stream))
t = time.monotonic()
try:
    b.chat.completions.create(model="mycompany/m", messages=M, **rid("busy"))
    out["busy"] = None
except openai.RateLimitError as e:
    out["busy"] = refusal(e, t)
stream.close()

t = time.monotonic()
try:
    sdk(quota_key).chat.completions.create(model="mycompany/m", messages=M, **rid("quota"))
    out["quota"] = None
except openai.RateLimitError as e:
    out["quota"] = refusal(e, t)
"#;
    let v = s
        .run_python_with(&python, script, &[&rpm, &busy, &quota])
        .await;
    s.assert_limit_refusals("py-", &v).await;
    s.finish().await;
}

/// The same through the Node SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_node_sees_rate_limits_and_does_not_retry_insufficient_quota() {
    let Some(sdk) = node_sdk_dir() else { return };
    let s = Stack::start().await;
    let [rpm, busy, quota] = limited_keys(&s).await;
    let mut cmd = Command::new("node");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/limits.mjs"))
        .arg(&s.running.gateway)
        .args([&rpm, &busy, &quota])
        .arg(&sdk);
    let v = s.run(cmd).await;
    s.assert_limit_refusals("node-", &v).await;
    s.finish().await;
}
