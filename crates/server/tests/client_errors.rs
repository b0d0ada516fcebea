//! A client's malformed request is the client's mistake: it gets a 4xx or a
//! closed connection, and the server's log shows no error line for it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Sends `head` on a fresh connection and returns what came back.
fn exchange(base: &str, head: &[u8]) -> String {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(head);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_and_oversized_heads_log_no_error() {
    let t = testkit::TestDb::new().await;
    let upstream = testkit::MockUpstream::start().await;
    let cmd = llmgw_against(&t, &upstream);
    let running = tokio::task::spawn_blocking(move || Running::start(cmd))
        .await
        .unwrap();
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    for base in [running.gateway.clone(), running.api.clone()] {
        let answers = [
            exchange(&base, huge.as_bytes()),
            exchange(
                &base,
                b"GET / HTTP/1.1\r\nhost: x\r\nbad header line\r\n\r\n",
            ),
            exchange(
                &base,
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
            ),
        ];
        for a in &answers {
            // Either a 4xx status line or a connection closed without an answer.
            assert!(
                a.is_empty() || a.starts_with("HTTP/1.1 4"),
                "{base}: {a:.200}"
            );
        }
    }
    // The listeners still serve.
    let ok = reqwest::get(format!("{}/healthz", running.gateway))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let (status, logs) = tokio::task::spawn_blocking(move || running.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{logs}");
    assert!(
        !logs.lines().any(|l| l.contains("ERROR")),
        "a client's malformed request logged an error:\n{logs}"
    );
}
