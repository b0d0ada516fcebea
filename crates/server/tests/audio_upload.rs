//! An audio upload near the body limit, against the real binary: with
//! `model` first the file streams through, so llmgw's memory stays flat;
//! with `model` last it is held (once), which shows the probe can see it.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use testkit::{MockUpstream, TestDb};

use common::{llmgw_against, peak_during, provision, rss_kib, Running};

const BOUNDARY: &str = "llmgw-rss-boundary-5f1c";
const MIB: usize = 1024 * 1024;

const MODEL_PART: &str =
    "Content-Disposition: form-data; name=\"model\"\r\n\r\nmycompany/whisper-1\r\n";
const FILE_HEAD: &str = "Content-Disposition: form-data; name=\"file\"; filename=\"long.wav\"\r\nContent-Type: audio/wav\r\n\r\n";

/// A transcription upload of a `size`-byte file, `model` first (or last),
/// sent in 64 KiB pieces with a pause between them (a slow client).
fn slow_upload(size: usize, model_first: bool) -> (reqwest::Body, usize) {
    let (head, tail) = if model_first {
        (
            format!("--{BOUNDARY}\r\n{MODEL_PART}--{BOUNDARY}\r\n{FILE_HEAD}"),
            format!("\r\n--{BOUNDARY}--\r\n"),
        )
    } else {
        (
            format!("--{BOUNDARY}\r\n{FILE_HEAD}"),
            format!("\r\n--{BOUNDARY}\r\n{MODEL_PART}--{BOUNDARY}--\r\n"),
        )
    };
    let piece = 64 * 1024;
    let pieces = size / piece;
    let body = futures_util::stream::iter(
        std::iter::once(head.into_bytes())
            .chain((0..pieces).map(move |i| vec![(i % 251) as u8; piece]))
            .chain(std::iter::once(tail.into_bytes())),
    )
    .then(|p| async move {
        tokio::time::sleep(Duration::from_millis(8)).await;
        Ok::<_, std::io::Error>(p)
    });
    (reqwest::Body::wrap_stream(body), pieces * piece)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_near_the_body_limit_keeps_rss_flat() {
    let db = TestDb::new().await;
    let upstream = MockUpstream::start().await;
    let mut cmd = llmgw_against(&db, &upstream);
    cmd.env("RUST_LOG", "warn");
    let running = tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap();
    let pid = running.pid();
    let tenant = provision(&running.api, &upstream.base_url, "sk-test-token-1234").await;
    let http = reqwest::Client::new();
    let send = |body: reqwest::Body| {
        http.post(format!("{}/v1/audio/transcriptions", running.gateway))
            .bearer_auth(&tenant.api_key)
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
    };
    // Warm up: the first request sets up connections, TLS and caches.
    let (small, _) = slow_upload(256 * 1024, true);
    assert_eq!(send(small).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_kib(pid);

    let (body, file) = slow_upload(9 * MIB, true);
    let (peak, resp) = peak_during(pid, send(body)).await;
    let resp = resp.unwrap();
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(
        answer["text"],
        format!("heard {file} bytes of long.wav as whisper-1")
    );
    let grown = peak.saturating_sub(idle);
    eprintln!(
        "RSS idle {} KiB, peak {peak} KiB during a {} MiB upload (+{grown} KiB)",
        idle,
        file / MIB
    );
    // Held whole (once, let alone twice) it would be 9 MiB or more.
    assert!(
        grown < 3 * 1024,
        "RSS grew by {grown} KiB during a {file}-byte streamed upload"
    );

    // The same file with `model` last must be held: the probe sees that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_kib(pid);
    let (body, _) = slow_upload(9 * MIB, false);
    let (peak, resp) = peak_during(pid, send(body)).await;
    assert_eq!(resp.unwrap().status(), 200);
    let held = peak.saturating_sub(idle);
    eprintln!("model last: +{held} KiB");
    assert!(
        held > 4 * 1024,
        "an upload held whole grew RSS by only {held} KiB: the probe is blind"
    );
    let (status, ..) = running.terminate();
    assert!(status.success());
}
