//! `/v1/models` with a failing provider: the others are listed, and the log
//! says which provider failed and why (one test: it owns the global subscriber).

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failing_provider_is_logged_with_its_class_and_the_rest_listed() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("gateway=warn")
        .with_writer(move || sink.clone())
        .init();
    let env = Env::new().await;
    add_closed_port_provider(&env, "broken").await;
    let resp = env
        .http
        .get(format!("{}/v1/models", env.url))
        .bearer_auth(&env.org.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json_value().await;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mycompany/model-a", "mycompany/model-b"]);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line: Value = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "skipping provider in /v1/models")
        .unwrap_or_else(|| panic!("no warning logged:\n{text}"));
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["fields"]["provider"], "broken");
    assert_eq!(line["fields"]["class"], "connection refused");
    assert!(
        line["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "the cause is logged: {line}"
    );
    assert!(!text.contains(TOKEN));
    env.stop().await;
}
