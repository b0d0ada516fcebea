//! Faults: upstreams that misbehave and clients that send bad input. Each
//! test pins what the client sees, the usage row, and that nothing is left
//! open afterwards (the mock's connections and response bodies, the
//! gateway's client connections).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A gateway whose upstream timeout is one second.
async fn impatient() -> Env {
    Env::with(Opts {
        timeout: secs(1.0),
        ..Opts::default()
    })
    .await
}

/// The gateway let go of the upstream: it holds no connection to it beyond
/// `pooled` idle keep-alive ones, and (unless the mock cannot notice, see
/// `hang`) the mock's connections and response bodies are gone too.
async fn upstream_released(env: &Env, pooled: usize) {
    eventually("the gateway's upstream connections are closed", || {
        env.upstream.client_connections() <= pooled
    })
    .await;
    eventually("the mock's response bodies are dropped", || {
        env.upstream.open_bodies() == 0
    })
    .await;
    eventually("the mock's connections are closed", || {
        env.upstream.open_connections() <= pooled
    })
    .await;
}

/// For `hang`: the mock never writes again, so only the gateway's side can be seen closing.
async fn gateway_released(env: &Env) {
    eventually("the gateway's upstream connections are closed", || {
        env.upstream.client_connections() == 0
    })
    .await;
}

/// The data lines of an SSE answer.
fn events(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}

// ---- upstream faults ------------------------------------------------------

#[tokio::test]
async fn slow_response_head_is_504_and_frees_the_connection() {
    let env = impatient().await;
    let started = Instant::now();
    let (msg, code) = openai_error(
        env.chat(&json!({"model": "mycompany/slowhead-2000", "messages": messages()}))
            .await,
        504,
    )
    .await;
    assert_eq!(code, "upstream_timeout");
    assert!(msg.contains("1000 ms"), "{msg}");
    assert!(started.elapsed() < secs(1.8), "{:?}", started.elapsed());
    upstream_released(&env, 0).await;
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status_code, 504);
    assert_eq!(rows[0].error_class.as_deref(), Some("upstream_timeout"));
    assert!(rows[0].ttfb_ms.is_none() && rows[0].total_tokens.is_none());
    env.stop().await;
}

#[tokio::test]
async fn slow_body_is_504_within_the_total_timeout() {
    let env = impatient().await;
    let started = Instant::now();
    let (_, code) = openai_error(
        env.chat(&json!({"model": "mycompany/slowbody-2000", "messages": messages()}))
            .await,
        504,
    )
    .await;
    assert_eq!(code, "upstream_timeout");
    assert!(started.elapsed() < secs(1.8), "{:?}", started.elapsed());
    upstream_released(&env, 0).await;
    let rows = env.rows().await;
    assert_eq!(rows[0].status_code, 504);
    assert_eq!(rows[0].error_class.as_deref(), Some("upstream_timeout"));
    assert!(rows[0].ttfb_ms.is_some(), "the head did arrive");
    env.stop().await;
}

#[tokio::test]
async fn reset_mid_stream_relays_what_came_then_an_error_event() {
    let env = Env::new().await;
    let resp = env
        .chat(&json!({"model": "mycompany/reset-after-3", "stream": true, "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("the stream itself ends cleanly");
    let events = events(&text);
    assert_eq!(events.len(), 4, "{text}");
    for (i, e) in events[..3].iter().enumerate() {
        assert!(e.contains(&format!("tok{i} ")), "{e}");
    }
    let err: Value = serde_json::from_str(events[3]).unwrap();
    assert_eq!(err["error"]["code"], "upstream_stream_error");
    assert_eq!(err["error"]["type"], "upstream_error");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broke off the stream"),
        "{err}"
    );
    assert!(!text.contains("[DONE]") && !text.contains(TOKEN));
    upstream_released(&env, 0).await;
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert!(r.streamed && !r.canceled);
    assert_eq!(r.status_code, 200);
    assert_eq!(r.error_class.as_deref(), Some("upstream_stream_error"));
    assert!(r.total_tokens.is_none());
    env.stop().await;
}

#[tokio::test]
async fn reset_mid_body_without_stream_is_502() {
    let env = Env::new().await;
    let (msg, code) = openai_error(
        env.chat(&json!({"model": "mycompany/reset-after-20", "messages": messages()}))
            .await,
        502,
    )
    .await;
    assert_eq!(code, "upstream_unreachable");
    assert!(msg.ends_with(": connection broken"), "{msg}");
    upstream_released(&env, 0).await;
    let rows = env.rows().await;
    assert_eq!(rows[0].status_code, 502);
    assert_eq!(rows[0].error_class.as_deref(), Some("upstream_unreachable"));
    env.stop().await;
}

#[tokio::test]
async fn garbage_200_is_relayed_as_is_and_logged_without_tokens() {
    let env = Env::new().await;
    let resp = env
        .chat(&json!({"model": "mycompany/garbage", "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(
        resp.text().await.unwrap(),
        "<html><body>502 Bad Gateway (not JSON)</body></html>"
    );
    // The finished exchange leaves one reusable connection at most.
    upstream_released(&env, 1).await;
    let rows = env.rows().await;
    let r = &rows[0];
    assert_eq!(r.status_code, 200);
    assert_eq!(r.error_class.as_deref(), Some("upstream_invalid_json"));
    assert!(r.prompt_tokens.is_none() && r.completion_tokens.is_none() && r.total_tokens.is_none());
    env.stop().await;
}

#[tokio::test]
async fn huge_answer_is_502_without_being_buffered_whole() {
    let env = Env::with(Opts {
        max_response_bytes: 1 << 20,
        ..Opts::default()
    })
    .await;
    let started = Instant::now();
    let (msg, code) = openai_error(
        env.chat(&json!({"model": "mycompany/huge-64", "messages": messages()}))
            .await,
        502,
    )
    .await;
    assert_eq!(code, "upstream_response_too_large");
    assert!(msg.contains("1048576 bytes"), "{msg}");
    // Refused after 1 MiB, not after reading all 64.
    assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());
    upstream_released(&env, 0).await;
    // Under the cap it is an ordinary answer.
    let resp = env
        .chat(&json!({"model": "mycompany/huge-0", "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let rows = env.rows().await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].status_code, 502);
    assert_eq!(
        rows[0].error_class.as_deref(),
        Some("upstream_response_too_large")
    );
    assert_eq!(rows[1].status_code, 200);
    env.stop().await;
}

#[tokio::test]
async fn huge_stream_is_relayed_whole_and_its_usage_still_found() {
    // The cap is for bodies held in memory; a stream is passed through.
    let env = Env::with(Opts {
        max_response_bytes: 1 << 20,
        ..Opts::default()
    })
    .await;
    let mut resp = env
        .chat(&json!({"model": "mycompany/huge-8", "stream": true, "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let (mut total, mut tail) = (0usize, Vec::new());
    while let Some(c) = resp.chunk().await.unwrap() {
        total += c.len();
        tail.extend_from_slice(&c);
        let keep = tail.len().saturating_sub(4096);
        tail.drain(..keep);
    }
    assert!(total > 8 << 20, "{total}");
    let tail = String::from_utf8_lossy(&tail);
    assert!(tail.trim_end().ends_with("data: [DONE]"), "{tail}");
    upstream_released(&env, 1).await;
    let rows = env.rows().await;
    assert_eq!(rows[0].status_code, 200);
    assert!(rows[0].error_class.is_none());
    assert_eq!(rows[0].completion_tokens, Some(5));
    env.stop().await;
}

#[tokio::test]
async fn never_ending_stream_is_cut_with_a_timeout_event() {
    let env = impatient().await;
    let started = Instant::now();
    let resp = env
        .chat(&json!({"model": "mycompany/hang", "stream": true, "messages": messages()}))
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(started.elapsed() < secs(2.5), "{:?}", started.elapsed());
    let events = events(&text);
    assert_eq!(events.len(), 2, "{text}");
    assert!(events[0].contains("tok0 "));
    let err: Value = serde_json::from_str(events[1]).unwrap();
    assert_eq!(err["error"]["code"], "upstream_timeout");
    gateway_released(&env).await;
    let rows = env.rows().await;
    let r = &rows[0];
    assert!(r.streamed && !r.canceled);
    assert_eq!(r.status_code, 200);
    assert_eq!(r.error_class.as_deref(), Some("upstream_timeout"));
    env.stop().await;
}

#[tokio::test]
async fn never_ending_body_without_stream_is_504() {
    let env = impatient().await;
    let (_, code) = openai_error(
        env.chat(&json!({"model": "mycompany/hang", "messages": messages()}))
            .await,
        504,
    )
    .await;
    assert_eq!(code, "upstream_timeout");
    gateway_released(&env).await;
    let rows = env.rows().await;
    assert_eq!(rows[0].status_code, 504);
    env.stop().await;
}

#[tokio::test]
async fn model_lists_that_are_huge_or_garbage_are_skipped() {
    let env = Env::new().await;
    for name in ["huge", "garbage"] {
        add_provider(
            env.db(),
            env.org.id,
            name,
            &format!("{}/{name}", env.upstream.base_url),
        )
        .await;
    }
    let v: Value = env.models().await;
    let mut ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["mycompany/model-a", "mycompany/model-b"]);
    upstream_released(&env, 3).await;
    env.stop().await;
}

#[tokio::test]
async fn a_failing_provider_is_retried_after_a_few_seconds_not_on_every_call() {
    let env = Env::new().await;
    add_provider(
        env.db(),
        env.org.id,
        "down",
        &format!("{}/fail", env.upstream.base_url),
    )
    .await;
    let fetches = || {
        env.upstream
            .seen()
            .iter()
            .filter(|s| s.path == "/fail/v1/models")
            .count()
    };
    for _ in 0..3 {
        let v = env.models().await;
        assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
    }
    assert_eq!(fetches(), 1, "the incomplete list is reused briefly");
    env.stop().await;
}

#[tokio::test]
async fn a_provider_change_during_a_models_fetch_is_not_cached_over() {
    let env = Env::new().await;
    add_provider(
        env.db(),
        env.org.id,
        "slow",
        &format!("{}/slow", env.upstream.base_url),
    )
    .await;
    let first = env.models();
    let change = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        add_provider(env.db(), env.org.id, "fresh", &env.upstream.base_url).await;
    };
    let (v, ()) = tokio::join!(first, change);
    let count = |v: &Value| {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["id"].as_str().unwrap().starts_with("fresh/"))
            .count()
    };
    assert_eq!(count(&v), 0, "fetched before the change");
    // Give the notification time to arrive, then the next call must see it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(count(&env.models().await), 2);
    env.stop().await;
}

// ---- bad client input ------------------------------------------------------

impl Env {
    async fn models(&self) -> Value {
        let resp = self
            .http
            .get(format!("{}/v1/models", self.url))
            .bearer_auth(&self.org.key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json_value().await
    }

    async fn post_raw(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(&self.org.key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// The gateway still answers (no worker is stuck or dead).
    async fn still_serves(&self) {
        let resp = self
            .chat(&json!({"model": "mycompany/m", "messages": messages()}))
            .await;
        assert_eq!(resp.status(), 200);
    }
}

/// Sends raw bytes on a fresh connection, then reads until the server closes
/// it or `wait` passes; returns what came back and whether it was closed.
async fn raw_exchange(
    addr: std::net::SocketAddr,
    parts: &[&[u8]],
    wait: Duration,
) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for p in parts {
        // The server may close early; what it answered still counts.
        if s.write_all(p).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test]
async fn malformed_bodies_are_400_and_never_reach_the_upstream() {
    let env = Env::new().await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", b"{\"model\": \"mycompany/x\",".to_vec(), "invalid_json"),
        ("empty", Vec::new(), "invalid_json"),
        ("not an object", b"[{\"model\":\"mycompany/x\"}]".to_vec(), "invalid_json"),
        (
            "invalid UTF-8",
            b"{\"model\":\"mycompany/x\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                .to_vec(),
            "invalid_json",
        ),
        ("NUL", b"{\"model\":\"mycompany/x\"\0}".to_vec(), "invalid_json"),
        ("no model", b"{\"messages\":[]}".to_vec(), "invalid_model"),
        ("model not a string", b"{\"model\":[\"mycompany/x\"]}".to_vec(), "invalid_model"),
        ("model without provider", b"{\"model\":\"gpt-4o\"}".to_vec(), "invalid_model"),
    ];
    for (what, body, expected) in cases {
        let (_, code) = openai_error(env.post_raw("application/json", body).await, 400).await;
        assert_eq!(code, expected, "{what}");
    }
    assert!(env.upstream.seen().is_empty());
    env.still_serves().await;
    env.stop().await;
}

#[tokio::test]
async fn any_content_type_is_accepted_when_the_body_is_json() {
    let env = Env::new().await;
    let body =
        serde_json::to_vec(&json!({"model": "mycompany/m", "messages": messages()})).unwrap();
    // curl -d sends form content types; SDKs send JSON. The body decides.
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=utf-8",
    ] {
        assert_eq!(env.post_raw(ct, body.clone()).await.status(), 200, "{ct}");
    }
    let resp = env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .bearer_auth(&env.org.key)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "no content type at all");
    let (_, code) = openai_error(
        env.post_raw("application/x-www-form-urlencoded", "model=mycompany%2Fm")
            .await,
        400,
    )
    .await;
    assert_eq!(code, "invalid_json");
    for s in env.upstream.seen() {
        assert_eq!(s.header("content-type"), Some("application/json"));
    }
    env.stop().await;
}

#[tokio::test]
async fn deeply_nested_json_is_400_not_a_crash() {
    let env = Env::new().await;
    let depth = 100_000;
    let mut nested = b"{\"model\":\"mycompany/x\",\"messages\":".to_vec();
    nested.extend(std::iter::repeat_n(b'[', depth));
    nested.extend(std::iter::repeat_n(b']', depth));
    nested.push(b'}');
    // Valid JSON: the gateway skips what it does not route on without
    // recursing, so it relays it; the upstream judges it (the mock refuses).
    let resp = env.post_raw("application/json", nested).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json_value().await["error"]["message"],
        "mock: bad json",
        "the upstream's answer, unchanged"
    );
    assert_eq!(env.upstream.seen().len(), 1);
    let only_brackets = vec![b'['; depth];
    openai_error(env.post_raw("application/json", only_brackets).await, 400).await;
    let mut objects = Vec::new();
    for _ in 0..depth {
        objects.extend_from_slice(b"{\"a\":");
    }
    openai_error(env.post_raw("application/json", objects).await, 400).await;
    assert_eq!(env.upstream.seen().len(), 1);
    env.still_serves().await;
    env.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413_with_or_without_content_length() {
    let env = Env::with(Opts {
        max_body_bytes: 4096,
        ..Opts::default()
    })
    .await;
    let big = serde_json::to_vec(
        &json!({"model": "mycompany/m", "messages": [{"role": "user", "content": "x".repeat(8000)}]}),
    )
    .unwrap();
    let (msg, code) = openai_error(env.post_raw("application/json", big.clone()).await, 413).await;
    assert_eq!(code, "request_too_large");
    assert!(msg.contains("4096"), "{msg}");
    // Chunked, no content-length: counted as it arrives.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    match env
        .http
        .post(format!("{}/v1/chat/completions", env.url))
        .bearer_auth(&env.org.key)
        .body(chunked)
        .send()
        .await
    {
        Ok(resp) => {
            let (_, code) = openai_error(resp, 413).await;
            assert_eq!(code, "request_too_large");
        }
        // Answered before the whole body was sent: the connection may close first.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    // A lying content-length far over the limit is refused without reading.
    let (head, closed) = raw_exchange(
        env.addr,
        &[format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-length: 1099511627776\r\n\r\n{{",
            env.org.key
        )
        .as_bytes()],
        secs(3.0),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(closed, "the unread body is not waited for");
    assert!(env.upstream.seen().is_empty());
    env.still_serves().await;
    let rows = env.rows().await;
    assert!(
        rows.iter().filter(|r| r.status_code == 413).count() >= 2,
        "{rows:#?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn huge_headers_are_refused_and_the_connection_closed() {
    let env = Env::new().await;
    let long = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\nx-junk: {}\r\n\r\n",
        "a".repeat(256 * 1024)
    );
    let (head, closed) = raw_exchange(env.addr, &[long.as_bytes()], secs(3.0)).await;
    assert!(closed, "{head}");
    assert!(head.is_empty() || head.starts_with("HTTP/1.1 4"), "{head}");
    let mut many = String::from("GET /v1/models HTTP/1.1\r\nhost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (head, closed) = raw_exchange(env.addr, &[many.as_bytes()], secs(3.0)).await;
    assert!(closed, "{head}");
    assert!(head.is_empty() || head.starts_with("HTTP/1.1 4"), "{head}");
    env.still_serves().await;
    env.stop().await;
}

#[tokio::test]
async fn a_client_that_stalls_in_its_head_is_cut_off() {
    let env = Env::with(Opts {
        client_request_timeout: secs(1.0),
        ..Opts::default()
    })
    .await;
    let started = Instant::now();
    let (head, closed) = raw_exchange(
        env.addr,
        &[b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"],
        secs(4.0),
    )
    .await;
    assert!(closed, "still open after {:?}: {head}", started.elapsed());
    assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 408"),
        "{head}"
    );
    eventually("the gateway closed the connection", || {
        env.conns.load(Ordering::SeqCst) == 0
    })
    .await;
    env.still_serves().await;
    env.stop().await;
}

#[tokio::test]
async fn a_client_that_stalls_in_its_body_gets_408() {
    let env = Env::with(Opts {
        client_body_timeout: secs(1.0),
        ..Opts::default()
    })
    .await;
    let started = Instant::now();
    let (answer, closed) = raw_exchange(
        env.addr,
        &[format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":",
            env.org.key
        )
        .as_bytes()],
        secs(4.0),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(closed, "the half-sent body is not waited for");
    assert!(started.elapsed() < secs(3.0), "{:?}", started.elapsed());
    eventually("the gateway closed the connection", || {
        env.conns.load(Ordering::SeqCst) == 0
    })
    .await;
    env.still_serves().await;
    let rows = env.rows().await;
    assert_eq!(rows[0].status_code, 408);
    assert_eq!(rows[0].error_class.as_deref(), Some("request_timeout"));
    env.stop().await;
}
