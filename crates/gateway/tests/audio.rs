//! The audio endpoints: multipart uploads routed by their `model` field and
//! re-sent byte for byte with only that value rewritten (the file streamed
//! through), and speech audio streamed back as it arrives.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use storage::logs::RequestLog;

const BOUNDARY: &str = "------------------------llmgw0123456789";

/// A multipart body of `(name, filename, content)` fields, as curl writes one.
fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, filename, content) in fields {
        b.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes(),
            ),
            None => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        b.extend_from_slice(content);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

/// `n` bytes that look like audio (and hold CRLFs and dashes, as files do).
fn audio(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| {
            if i % 997 == 0 {
                return b'\r';
            }
            if i % 997 == 1 {
                return b'\n';
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as u8
        })
        .collect()
}

fn content_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

async fn upload(env: &Env, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    env.http
        .post(format!("{}/v1/audio/{path}", env.url))
        .bearer_auth(&env.org.key)
        .header("content-type", content_type())
        .body(body)
        .send()
        .await
        .unwrap()
}

/// `body` sent in `piece`-byte chunks without a `content-length`.
fn chunked(body: Vec<u8>, piece: usize, gap: Duration) -> reqwest::Body {
    let pieces: Vec<Vec<u8>> = body.chunks(piece).map(<[u8]>::to_vec).collect();
    reqwest::Body::wrap_stream(
        futures_util::stream::iter(pieces).then(move |p| async move {
            tokio::time::sleep(gap).await;
            Ok::<_, std::io::Error>(p)
        }),
    )
}

/// `body` with its first `from` replaced by `to`.
fn replaced(body: &[u8], from: &str, to: &str) -> Vec<u8> {
    let at = body
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap();
    let mut out = body[..at].to_vec();
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(&body[at + from.len()..]);
    out
}

async fn endpoint_of(env: &Env, row: &RequestLog) -> String {
    sqlx::query_scalar::<_, Option<String>>("SELECT endpoint FROM request_logs WHERE id = $1")
        .bind(row.id)
        .fetch_one(env.db().pool())
        .await
        .unwrap()
        .unwrap_or_default()
}

/// Checks what the upstream got for an upload of `sent` with model `mycompany/{model}`.
fn assert_upstream_got(env: &Env, path: &str, sent: &[u8], model: &str) {
    let seen = env.upstream.seen();
    assert_eq!(seen.len(), 1);
    let got = &seen[0];
    assert_eq!(got.path, format!("/v1/audio/{path}"));
    assert_eq!(
        got.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(got.header("content-type"), Some(content_type().as_str()));
    assert!(got.header("x-request-id").is_some());
    let want = replaced(sent, &format!("mycompany/{model}"), model);
    assert_eq!(got.body.len(), want.len());
    assert!(got.body == want, "only the model value differs");
}

#[tokio::test]
async fn transcription_with_model_first_is_streamed_with_only_the_model_rewritten() {
    let env = Env::new().await;
    let file = audio(300 * 1024);
    let body = multipart(&[
        ("model", None, b"mycompany/whisper-1"),
        ("file", Some("speech.wav"), &file),
        ("response_format", None, b"json"),
    ]);
    let resp = upload(&env, "transcriptions", body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let answer = resp.json_value().await;
    assert_eq!(
        answer["text"],
        format!("heard {} bytes of speech.wav as whisper-1", file.len())
    );
    assert_upstream_got(&env, "transcriptions", &body, "whisper-1");
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.status_code, 200);
    assert!(r.error_class.is_none(), "{:?}", r.error_class);
    assert_eq!(r.requested_model.as_deref(), Some("mycompany/whisper-1"));
    assert_eq!(r.upstream_model.as_deref(), Some("whisper-1"));
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.total_tokens),
        (Some(14), Some(5), Some(19))
    );
    assert_eq!(endpoint_of(&env, r).await, "audio/transcriptions");
    env.stop().await;
}

#[tokio::test]
async fn transcription_with_model_after_the_file_is_held_then_sent_whole() {
    let env = Env::new().await;
    let file = audio(200 * 1024);
    // curl's order (`-F file=@… -F model=…`), sent chunked without a content-length.
    let body = multipart(&[
        ("file", Some("clip.mp3"), &file),
        ("language", None, b"en"),
        ("model", None, b"mycompany/org/whisper-large"),
    ]);
    let resp = upload(
        &env,
        "transcriptions",
        chunked(body.clone(), 7001, Duration::ZERO),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let answer = resp.json_value().await;
    assert_eq!(
        answer["text"],
        format!(
            "heard {} bytes of clip.mp3 as org/whisper-large",
            file.len()
        )
    );
    assert_upstream_got(&env, "transcriptions", &body, "org/whisper-large");
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].total_tokens, Some(19));
    env.stop().await;
}

#[tokio::test]
async fn translations_are_routed_and_text_answers_are_relayed_as_sent() {
    let env = Env::new().await;
    let file = audio(10_000);
    let body = multipart(&[
        ("model", None, b"mycompany/whisper-1"),
        ("response_format", None, b"text"),
        ("file", Some("de.wav"), &file),
    ]);
    let resp = upload(&env, "translations", body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(
        resp.text().await.unwrap(),
        "heard 10000 bytes of de.wav as whisper-1\n"
    );
    assert_upstream_got(&env, "translations", &body, "whisper-1");
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.status_code, 200);
    assert!(r.error_class.is_none(), "text is not invalid JSON");
    assert_eq!(r.total_tokens, None);
    assert_eq!(endpoint_of(&env, r).await, "audio/translations");
    env.stop().await;
}

#[tokio::test]
async fn uploads_without_a_routable_model_are_400_in_openai_shape() {
    let env = Env::new().await;
    let file = audio(1000);
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (
            content_type(),
            multipart(&[("file", Some("a.wav"), &file)]),
            "model",
        ),
        (
            content_type(),
            multipart(&[
                ("model", None, b"whisper-1"),
                ("file", Some("a.wav"), &file),
            ]),
            "model",
        ),
        (
            content_type(),
            multipart(&[
                ("model", None, b"mycompany/a"),
                ("file", Some("a.wav"), &file),
                ("model", None, b"other/b"),
            ]),
            "model",
        ),
        (
            "application/json".into(),
            b"{\"model\":\"mycompany/x\"}".to_vec(),
            "",
        ),
        ("multipart/form-data".into(), multipart(&[]), ""),
    ];
    for (ct, body, param) in cases {
        let resp = env
            .http
            .post(format!("{}/v1/audio/transcriptions", env.url))
            .bearer_auth(&env.org.key)
            .header("content-type", &ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{ct}");
        let v = resp.json_value().await;
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        if param.is_empty() {
            assert!(v["error"]["param"].is_null(), "{v}");
        } else {
            assert_eq!(v["error"]["param"], param, "{v}");
        }
    }
    let rows = env.rows().await;
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.status_code == 400), "{rows:#?}");
    // The duplicated model was caught while streaming; its upload was cut, never answered.
    assert!(env
        .upstream
        .seen()
        .iter()
        .all(|s| s.path != "/v1/audio/transcriptions" || s.body.is_empty()));
    env.stop().await;
}

#[tokio::test]
async fn an_unknown_or_other_orgs_provider_is_404() {
    let env = Env::new().await;
    let other = make_org(env.db()).await;
    add_provider(env.db(), other.id, "othercorp", &env.upstream.base_url).await;
    for model in ["othercorp/whisper-1", "nosuch/whisper-1"] {
        let body = multipart(&[
            ("model", None, model.as_bytes()),
            ("file", Some("a.wav"), &audio(100)),
        ]);
        let (_, code) = openai_error(upload(&env, "transcriptions", body).await, 404).await;
        assert_eq!(code, "model_not_found", "{model}");
    }
    assert!(env.upstream.seen().is_empty());
    let rows = env.rows().await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.status_code == 404));
    env.stop().await;
}

#[tokio::test]
async fn an_upload_over_the_limit_is_413_even_once_streaming() {
    let env = Env::with(Opts {
        max_body_bytes: 64 * 1024,
        ..Opts::default()
    })
    .await;
    // Model first: routed and streaming before the limit is passed.
    let body = multipart(&[
        ("model", None, b"mycompany/whisper-1"),
        ("file", Some("big.wav"), &audio(256 * 1024)),
    ]);
    let resp = env
        .http
        .post(format!("{}/v1/audio/transcriptions", env.url))
        .bearer_auth(&env.org.key)
        .header("content-type", content_type())
        .body(chunked(body.clone(), 8 * 1024, Duration::from_millis(2)))
        .send()
        .await;
    match resp {
        Ok(resp) => {
            let (msg, code) = openai_error(resp, 413).await;
            assert_eq!(code, "request_too_large");
            assert!(msg.contains("65536"), "{msg}");
        }
        // Answered before the whole body was sent: the connection may close first.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    // A declared length over the limit is refused before anything is read.
    let (_, code) = openai_error(upload(&env, "transcriptions", body).await, 413).await;
    assert_eq!(code, "request_too_large");
    // The cut upload reached the upstream as a broken body: nothing was answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        env.upstream.seen().is_empty(),
        "{:?}",
        env.upstream.seen().len()
    );
    let rows = env.rows().await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for r in &rows {
        assert_eq!(r.status_code, 413);
        assert_eq!(r.error_class.as_deref(), Some("request_too_large"));
        assert_eq!(r.total_tokens, None);
    }
    env.stop().await;
}

#[tokio::test]
async fn speech_is_streamed_back_as_it_arrives() {
    let env = Env::new().await;
    let started = Instant::now();
    let resp = env
        .http
        .post(format!("{}/v1/audio/speech", env.url))
        .bearer_auth(&env.org.key)
        .json_body(&json!({"model": "mycompany/tts-1", "input": "Hello there.", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    assert!(resp.headers().contains_key("x-request-id"));
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    let mut first = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if !chunk.is_empty() && first.is_none() {
            first = Some(started.elapsed());
        }
        got.extend_from_slice(&chunk);
    }
    let total = started.elapsed();
    assert!(
        got == testkit::upstream::speech_audio("Hello there."),
        "every byte, in order"
    );
    let spread = testkit::upstream::SPEECH_GAP * (testkit::upstream::SPEECH_CHUNKS as u32 - 1);
    let first = first.unwrap();
    assert!(
        total - first >= spread / 2,
        "the first bytes came at {first:?}, the last at {total:?}: not streamed"
    );
    let seen = env.upstream.seen();
    assert_eq!(seen[0].path, "/v1/audio/speech");
    assert_eq!(
        seen[0].json(),
        json!({"model": "tts-1", "input": "Hello there.", "voice": "alloy"})
    );
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.status_code, 200);
    assert!(r.error_class.is_none(), "{:?}", r.error_class);
    assert!(!r.canceled);
    assert_eq!(endpoint_of(&env, r).await, "audio/speech");
    env.stop().await;
}

#[tokio::test]
async fn speech_errors_are_relayed_and_a_missing_model_is_400() {
    let env = Env::new().await;
    let resp = env
        .http
        .post(format!("{}/v1/audio/speech", env.url))
        .bearer_auth(&env.org.key)
        .json_body(&json!({"model": "mycompany/tts-1", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "the upstream's own error");
    let v: Value = resp.json_value().await;
    assert_eq!(v["error"]["param"], "input");
    let resp = env
        .http
        .post(format!("{}/v1/audio/speech", env.url))
        .bearer_auth(&env.org.key)
        .json_body(&json!({"input": "hi"}))
        .send()
        .await
        .unwrap();
    let (_, code) = openai_error(resp, 400).await;
    assert_eq!(code, "invalid_model");
    let rows = env.rows().await;
    assert_eq!(rows.len(), 2);
    env.stop().await;
}

#[tokio::test]
async fn a_speech_client_that_leaves_cancels_the_upstream_and_its_row_says_so() {
    let env = Env::new().await;
    let mut resp = env
        .http
        .post(format!("{}/v1/audio/speech", env.url))
        .bearer_auth(&env.org.key)
        .json_body(&json!({"model": "mycompany/tts-1", "input": "a long story"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.chunk().await.unwrap().unwrap().is_empty());
    drop(resp);
    // The gateway notices at its next write, and drops the upstream's answer.
    eventually("the relay ends", || env.gw.in_flight() == 0).await;
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0].streamed && rows[0].canceled, "{:?}", rows[0]);
    assert_eq!(rows[0].error_class.as_deref(), Some("client_canceled"));
    assert!(rows[0].ttfb_ms.is_some());
    env.stop().await;
}

#[tokio::test]
async fn a_streamed_upload_slower_than_the_body_timeout_is_408() {
    let env = Env::with(Opts {
        client_body_timeout: Duration::from_millis(400),
        ..Opts::default()
    })
    .await;
    let body = multipart(&[
        ("model", None, b"mycompany/whisper-1"),
        ("file", Some("slow.wav"), &audio(64 * 1024)),
    ]);
    // Routed at once, then 16 pieces 50 ms apart: the body takes 800 ms.
    let resp = upload(
        &env,
        "transcriptions",
        chunked(body, 4096, Duration::from_millis(50)),
    )
    .await;
    let (_, code) = openai_error(resp, 408).await;
    assert_eq!(code, "request_timeout");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        env.upstream.seen().is_empty(),
        "the cut upload was not answered"
    );
    let rows = env.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status_code, 408);
    assert_eq!(rows[0].provider_name.as_deref(), Some("mycompany"));
    env.stop().await;
}
